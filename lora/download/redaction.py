"""Query strings kept out of the HTTP libraries' logs: urllib3 (DEBUG) and httpx (INFO) log request lines with
the query, and a signed URL carries its signature there. `install_redaction()` puts a filter on their loggers;
setup calls it (predict.py), once per process, before anything downloads. Importing this module changes
nothing. It re-exports the pure URL helpers of `urls`."""

from __future__ import annotations

import logging
import re

from lora.download.urls import DEFAULT_PORTS, redact_url, url_origin

__all__ = ["DEFAULT_PORTS", "install_redaction", "redact_url", "url_origin"]  # the pure helpers live in `urls`

_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.poolmanager", "httpx", "httpx2")


class _RedactQueryStrings(logging.Filter):
    """Replaces every query string of a record's message with `?...`."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = self._QUERY.sub("?...", message), None
        return True


_FILTER = _RedactQueryStrings()


def install_redaction() -> None:
    """Filter the HTTP libraries' loggers. Idempotent: a logger keeps one copy of the same filter object."""
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
