"""URLs as logs and errors may show them: no user info, no query string (signed URLs carry their signature
there). Importing this module also installs a filter on the HTTP libraries' loggers, whose request lines
include the query."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def redact_url(url: str) -> str:
    """scheme://host[:port]/path, without user info, query or fragment: safe for logs and errors."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}{query}"


def url_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port): where credentials may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)


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
