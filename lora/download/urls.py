"""URLs as logs and errors may show them, and whose origin they have. Pure: no logging set-up, no I/O.

A URL's user info (`user:password@`) and query string (signed URLs carry their signature there) are never shown;
the host keeps its IPv6 brackets, so `[::1]:8443` stays readable.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986, appendix B: splits any string, never raises (urlsplit raises on a malformed IPv6 host or port)
_URL_PARTS = re.compile(r"^(?:(?P<scheme>[^:/?#]+):)?(?://(?P<netloc>[^/?#]*))?(?P<path>[^?#]*)(?P<query>\?[^#]*)?")


def redact_url(url: str) -> str:
    """scheme://host[:port]/path, without user info, query (a `?...` marker instead) or fragment."""
    parts = _URL_PARTS.match(url)
    assert parts is not None  # every group is optional
    host_port = (parts["netloc"] or "").rpartition("@")[2].lower()
    query = "?..." if parts["query"] and parts["query"] != "?" else ""
    return f"{(parts['scheme'] or '').lower()}://{host_port}{parts['path']}{query}"


def url_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port): where credentials may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)
