"""What a failed download raises, split by whose fault it is.

- `DownloadRefused` (a `UserError`): the user's input is the problem. A bad or unresolvable URL, a 4xx answer
  (`HTTPStatusError`, with the status so callers can add hints), a file that is too large, a private address.
- `HostFailed` (an `UpstreamError`): the host is the problem. 5xx answers, refused or reset connections,
  timeouts, a stalled transfer (`DownloadStalled`). The same request may work later.
- `DownloadCancelled`: the request was canceled while it downloaded.
- `DownloadError` itself: neither, e.g. this server's cache has no room right now.

Every message names the input and the host, never a token or a query string.
"""

from __future__ import annotations

from errors import UpstreamError, UserError


class DownloadError(Exception):
    """Any failed download (the base of the classes below)."""


class DownloadRefused(DownloadError, UserError):
    """The user's fault: a bad URL, a missing or private file, too large, a private address."""


class HTTPStatusError(DownloadRefused):
    """A 4xx answer (other than 429), with its status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HostFailed(DownloadError, UpstreamError):
    """The host's fault: 5xx, a refused or lost connection, a timeout."""


class DownloadStalled(HostFailed):
    """No progress for one stall timeout; never retried, so a stalled host cannot hold the server for long."""


class DownloadCancelled(DownloadError):
    """The prediction was canceled during the download."""
