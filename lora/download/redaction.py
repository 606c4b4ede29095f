"""Importing this module installs a filter on the HTTP libraries' loggers, whose request lines include the
query string (signed URLs carry their signature there). It re-exports the pure URL helpers of `urls`."""

from __future__ import annotations

import logging
import re

from lora.download.urls import DEFAULT_PORTS, redact_url, url_origin

__all__ = ["DEFAULT_PORTS", "redact_url", "url_origin"]  # the pure helpers live in `urls`


class _RedactQueryStrings(logging.Filter):
    """urllib3 (DEBUG) and httpx (INFO) log request lines with the query; a signed URL's signature must not get out."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = self._QUERY.sub("?...", message), None
        return True


for _name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.poolmanager", "httpx", "httpx2"):
    logging.getLogger(_name).addFilter(_RedactQueryStrings())
