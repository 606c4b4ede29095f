"""One download job's HTTP: guarded sessions, redirects followed by hand, reads, and what each failure means.

Credentials (`auth_headers`) go only to the origin (scheme, host, port) of the job's first URL; a redirect
anywhere else (a signed storage URL) gets none. No proxies or .netrc from the environment. Errors carry our
own messages: library messages contain full URLs, queries included.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from lora.download.addresses import GuardedAdapter, PrivateAddressError
from lora.download.config import DownloadSettings
from lora.download.errors import DownloadError, DownloadRefused, DownloadStalled, HostFailed, HTTPStatusError
from lora.download.monitor import TransferMonitor
from lora.download.redaction import redact_url, url_origin
from units import MB, MiB

READ_BYTES = MiB
_MAX_REDIRECTS = 10


class Transient(Exception):
    """A quick failure worth another attempt (5xx, 429, a dropped connection). Its message is safe to show."""


@dataclass
class HttpJob:
    url: str
    input_name: str
    label: str  # the source as logs and errors show it
    max_size: int
    headers: dict[str, str]
    auth_headers: dict[str, str]
    settings: DownloadSettings
    monitor: TransferMonitor
    origin: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.origin = url_origin(self.url)

    def refuse(self, what: str) -> DownloadRefused:
        return DownloadRefused(f"{self.input_name}: {what}")

    def host_failed(self, what: str) -> HostFailed:
        return HostFailed(f"{self.input_name}: {what}")

    # -------------------------------------------------------------- requests

    def new_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxies or .netrc credentials picked up from the environment
        private_ok = self.settings.allow_private or self.origin in self.settings.trusted_origins
        adapter = GuardedAdapter(allow_private=private_ok, monitor=self.monitor)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "flux-lora-predictor"
        return session

    def open(
        self, session: requests.Session, url: str, extra_headers: Mapping[str, str]
    ) -> tuple[requests.Response, str]:
        """GET, following redirects by hand: (response, final URL)."""
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            if urlsplit(current).scheme not in ("http", "https"):
                raise self.refuse(f"only http(s) URLs can be downloaded, not {redact_url(current)}")
            with_auth = bool(self.auth_headers) and url_origin(current) == self.origin
            headers = {**self.headers, **extra_headers, **(self.auth_headers if with_auth else {})}
            self.monitor.check()
            try:
                response = session.get(
                    current,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(self.settings.connect_timeout_s, self.settings.stall_timeout_s),
                )
            except DownloadError:
                raise  # the monitor's reason (cancel, deadline), raised while connecting
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, PrivateAddressError) as exc:
                raise self.classify(exc, current) from None
            if not response.is_redirect:
                return response, current
            location = response.headers["Location"]
            response.close()
            current = urljoin(current, location)
        raise self.refuse(f"{self.label} redirected more than {_MAX_REDIRECTS} times")

    def read(self, response: requests.Response, amount: int, *, decode: bool = False) -> bytes:
        """Up to `amount` bytes as soon as some arrive; b"" at the end."""
        self.monitor.check()
        try:
            chunk = response.raw.read1(amount, decode_content=decode)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise self.classify(exc, self.url) from None
        if chunk:
            self.monitor.add(len(chunk))
        else:
            self.monitor.check()  # a socket the monitor shut reads as the end
        return chunk

    # -------------------------------------------------------------- checks and failures

    def check_size(self, size: int) -> None:
        if size > self.max_size:
            raise self.refuse(
                f"{self.label} is larger than the {self.max_size / MB:.1f} MB limit for this input "
                f"({size / MB:.1f} MB or more)"
            )

    def status_error(self, status: int) -> Exception:
        if status == 429 or status >= 500:
            return Transient(f"{self.label} answered HTTP {status}")
        hint = {
            401: "it is not public; a token may be needed",
            403: "access was refused",
            404: "no such file; check the URL",
        }.get(status, "check the URL")
        return HTTPStatusError(f"{self.input_name}: {self.label} answered HTTP {status}: {hint}", status)

    def classify(self, exc: BaseException, url: str) -> Exception:
        """Our own exception for a network failure. A socket the monitor shut down shows up here as some
        connection error, so the monitor's reason (cancel, stall, deadline) goes first."""
        self.monitor.check()
        host = urlsplit(url).hostname or "the server"
        if _find_in_chain(exc, PrivateAddressError) is not None:
            # The same words whatever is at that address: the guard never connected, so it learned nothing.
            return self.refuse(
                f"refusing to download from {host}: it is not a public internet address (private, loopback, "
                "link-local or reserved). Operators: FLUX_ALLOW_PRIVATE_URLS=1 allows such addresses."
            )
        if _find_in_chain(exc, (urllib3.exceptions.NameResolutionError, socket.gaierror)) is not None:
            return self.refuse(f"cannot resolve the host name {host}; check the URL")
        if isinstance(exc, requests.exceptions.SSLError) or _find_in_chain(exc, urllib3.exceptions.SSLError):
            return self.host_failed(f"TLS failed with {host}; its certificate was not accepted")
        if _find_in_chain(exc, urllib3.exceptions.NewConnectionError) is not None:  # a subclass of the next one
            return Transient(f"the connection to {host} was refused or failed")
        if isinstance(exc, requests.exceptions.ConnectTimeout) or _find_in_chain(
            exc, urllib3.exceptions.ConnectTimeoutError
        ):
            return self.host_failed(f"connecting to {host} timed out after {self.settings.connect_timeout_s:g} s")
        if isinstance(exc, (requests.exceptions.ReadTimeout, TimeoutError)) or _find_in_chain(
            exc, urllib3.exceptions.ReadTimeoutError
        ):
            return DownloadStalled(
                f"{self.input_name}: {host} sent nothing for {self.settings.stall_timeout_s:g} s "
                "(FLUX_DOWNLOAD_STALL_TIMEOUT_S); try again later"
            )
        if isinstance(exc, requests.exceptions.ChunkedEncodingError) or _find_in_chain(
            exc, (urllib3.exceptions.ProtocolError, http.client.IncompleteRead)
        ):
            return Transient(f"the connection to {host} closed before the end of the file")
        return Transient(f"the connection to {host} failed")


def _find_in_chain(exc: BaseException | None, kind: type | tuple[type, ...]) -> Any:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        for arg in getattr(exc, "args", ()):
            if isinstance(arg, kind):
                return arg
            if isinstance(arg, BaseException):
                inner = getattr(arg, "reason", None)
                if isinstance(inner, kind):
                    return inner
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__ or exc.__context__)
        seen += 1
    return None
