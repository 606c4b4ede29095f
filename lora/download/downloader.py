"""HTTP downloads into a `FileCache`: parallel ranges with resume, a single-stream fallback, and the guards
that untrusted URLs need. Usable for LoRAs and for big model weight files alike.

How one download goes:
1. GET with `Range: bytes=0-<1 MiB>`, following redirects by hand. Credentials (`auth_headers`) go only to
   the origin (scheme, host, port) of the first URL; a redirect anywhere else (a signed storage URL) gets none.
2. 206: the total size is known. Check it against `max_size`, make room in the cache, and fetch the rest in
   chunks over `connections` keep-alive connections to the final URL, written in place. Finished chunks are
   recorded, so a later attempt (after a network failure, or after the process was killed) resumes when the
   server's validator (strong ETag or Last-Modified) and size are unchanged.
   200: the server ignores Range (CivitAI's storage sometimes does): one stream, from the start.
3. Checks (an expected sha256; a `finish` hook such as a format sniff or tar extraction), then the cache
   publishes the file in one rename.

Guards: http(s) only. The peer address of every connection is checked after connecting (which covers DNS
tricks and redirects): private, loopback, link-local and reserved addresses are refused unless
FLUX_ALLOW_PRIVATE_URLS=1, or the download starts at a base URL the operator configured (HF_ENDPOINT,
FLUX_CIVITAI_BASE_URL, FLUX_REPLICATE_BASE_URL: e.g. a self-hosted mirror). A size cap per file. Connect and read timeouts and an overall deadline. No proxies
or .netrc from the environment. Logs and errors show URLs without their query string (signed URLs carry
their signature there) and never show headers, so tokens stay out of both.

Environment (all optional):
  FLUX_DOWNLOAD_CONNECTIONS        parallel connections per file (8)
  FLUX_DOWNLOAD_CHUNK_MB           largest ranged chunk, in MiB (64)
  FLUX_DOWNLOAD_CONNECT_TIMEOUT_S  connect timeout (10)
  FLUX_DOWNLOAD_READ_TIMEOUT_S     longest wait for the next bytes (60)
  FLUX_DOWNLOAD_TIMEOUT_S          overall deadline for one file (1800)
  FLUX_DOWNLOAD_RETRIES            further attempts after a network failure (2)
  FLUX_ALLOW_PRIVATE_URLS          1: allow private and loopback addresses (self-hosting, tests)
The cache itself is configured in `lora.download.cache` (directory, size cap, FLUX_CACHE_MIN_FREE_GB).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

import settings
from errors import UserError
from lora.download.cache import MB, CacheSpaceError, FileCache, Work, sha256_file
from settings import TRUSTED_BASE_URL_SETTINGS

log = logging.getLogger(__name__)

MiB = 1 << 20
_READ_BYTES = 1 << 20
_MAX_REDIRECTS = 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PART_NAME = "download.part"


class DownloadError(UserError):
    """A download failed. The message names the input, the host and what to do; never a token or query."""

    keep_partial = False  # read by FileCache: keep the work directory so a later attempt can resume


class HTTPStatusError(DownloadError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failure worth another attempt (network trouble, 5xx). Its message is safe to show."""


class _Cancelled(Exception):
    """Another chunk failed; this one stops early."""


# ---------------------------------------------------------------- URLs and settings


def redact_url(url: str) -> str:
    """scheme://host[:port]/path, without user info, query or fragment: safe for logs and errors."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}{query}"


def url_origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


@dataclass(frozen=True)
class DownloadSettings:
    connections: int = 8
    max_chunk_bytes: int = 64 * MiB
    probe_bytes: int = 1 * MiB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 1800.0
    retries: int = 2
    retry_backoff_s: float = 0.5
    allow_private: bool = False
    # Origins (scheme, host, port) the operator configured as base URLs: downloads that start there may use
    # private addresses (a self-hosted Hub mirror and its storage), while user-given URLs may not.
    trusted_origins: frozenset[tuple[str, str, int]] = frozenset()
    progress_interval_s: float = 5.0

    @classmethod
    def from_env(cls) -> DownloadSettings:
        return cls(
            connections=max(1, int(settings.number("FLUX_DOWNLOAD_CONNECTIONS"))),
            max_chunk_bytes=max(1, int(settings.number("FLUX_DOWNLOAD_CHUNK_MB") * MiB)),
            connect_timeout_s=settings.number("FLUX_DOWNLOAD_CONNECT_TIMEOUT_S"),
            read_timeout_s=settings.number("FLUX_DOWNLOAD_READ_TIMEOUT_S"),
            total_timeout_s=settings.number("FLUX_DOWNLOAD_TIMEOUT_S"),
            retries=max(0, int(settings.number("FLUX_DOWNLOAD_RETRIES"))),
            allow_private=settings.flag("FLUX_ALLOW_PRIVATE_URLS"),
            trusted_origins=frozenset(
                url_origin(settings.text(name)) for name in TRUSTED_BASE_URL_SETTINGS if settings.is_set(name)
            ),
        )

    def plan_chunks(self, total: int, first_end: int) -> list[tuple[int, int]]:
        """[start, end) ranges: the probe's, then shrinking chunks (each a 1/(2·connections) share of what is
        left, between probe_bytes and max_chunk_bytes). Big chunks first keep requests few; small ones last
        let the connections finish together instead of waiting on one big tail."""
        chunks = [(0, first_end)]
        start = first_end
        while start < total:
            share = math.ceil((total - start) / (2 * self.connections))
            end = min(total, start + max(self.probe_bytes, min(self.max_chunk_bytes, share)))
            chunks.append((start, end))
            start = end
        return chunks


@dataclass(frozen=True)
class Resolved:
    """Where a source's file is, once known (the result of an API lookup)."""

    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class FetchResult:
    path: Path
    size: int
    cache_hit: bool
    seconds: float


# ---------------------------------------------------------------- the address guard


class _PrivateAddressError(Exception):
    def __init__(self, host: str, address: str) -> None:
        super().__init__(host, address)
        self.host = host
        self.address = address


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PeerCheck:
    """Checks the address we actually connected to, after DNS, so rebinding and redirects cannot dodge it."""

    host: str

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        address = sock.getpeername()[0]
        if not is_public_address(address):
            sock.close()
            raise _PrivateAddressError(self.host, address)
        return sock


class _CheckedHTTPConnection(_PeerCheck, HTTPConnection):
    pass


class _CheckedHTTPSConnection(_PeerCheck, HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}


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


# ---------------------------------------------------------------- the downloader


@dataclass
class _Job:
    url: str
    input_name: str
    label: str
    max_size: int
    headers: dict[str, str]
    auth_headers: dict[str, str]
    deadline: float
    origin: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.origin = url_origin(self.url)

    def fail(self, what: str) -> DownloadError:
        return DownloadError(f"{self.input_name}: {what}")


class Downloader:
    def __init__(self, cache: FileCache, settings: DownloadSettings | None = None) -> None:
        self.cache = cache
        self.settings = settings or DownloadSettings()

    def fetch(
        self,
        url: str | Callable[[], Resolved],
        *,
        key: str,
        input_name: str,
        max_size: int,
        headers: Mapping[str, str] | None = None,
        auth_headers: Mapping[str, str] | None = None,
        expected_sha256: str | None = None,
        finish: Callable[[Path], Path] | None = None,
        description: str | None = None,
    ) -> FetchResult:
        """A complete cached file for `key`, downloading on a miss.

        `url` is a URL, or a resolver called only on a miss (e.g. an API lookup) that returns the URL and an
        optional published sha256. `auth_headers` are credentials: sent only to the first URL's origin, never
        logged. `finish` gets the downloaded file (in the work directory) and returns the file to cache, e.g.
        one extracted next to it; it raises to refuse the download, which then leaves nothing behind."""
        started = time.monotonic()
        if description is None:
            if callable(url):
                raise TypeError("a description is needed when the URL comes from a resolver")
            description = redact_url(url)
        label = description

        def create(work: Work) -> Path:
            target = url() if callable(url) else Resolved(url, expected_sha256)
            job = _Job(
                url=target.url,
                input_name=input_name,
                label=label,
                max_size=max_size,
                headers={"Accept-Encoding": "identity", **(headers or {})},
                auth_headers=dict(auth_headers or {}),
                deadline=time.monotonic() + self.settings.total_timeout_s,
            )
            downloaded = self._with_retries(job, lambda: self._attempt(job, work), work=work)
            if target.sha256 and sha256_file(downloaded) != target.sha256.lower():
                raise job.fail(f"the file from {label} does not match its published SHA-256; try again")
            return finish(downloaded) if finish else downloaded

        return self._through_cache(key, create, label, input_name, started)

    def store(self, key: str, produce: Callable[[Path], Path], *, input_name: str, description: str) -> FetchResult:
        """Cache a file made locally (a data: URI, a local tar): `produce(work_dir)` returns its path."""
        return self._through_cache(key, lambda work: produce(work.dir), description, input_name, time.monotonic())

    def get_json(
        self,
        url: str,
        *,
        input_name: str,
        auth_headers: Mapping[str, str] | None = None,
        max_bytes: int = 16 * MiB,
    ) -> Any:
        """GET a small JSON document with the same guards, redirect rules and retries as downloads."""
        job = _Job(
            url=url,
            input_name=input_name,
            label=redact_url(url),
            max_size=max_bytes,
            headers={"Accept": "application/json"},
            auth_headers=dict(auth_headers or {}),
            deadline=time.monotonic() + self.settings.total_timeout_s,
        )

        def attempt() -> Any:
            with contextlib.closing(self._new_session(job)) as session:
                response, _final, _ = self._open(session, job.url, job, {})
                with contextlib.closing(response):
                    if response.status_code != 200:
                        raise self._status_error(response.status_code, job)
                    body = bytearray()
                    # APIs compress JSON when the client allows it (requests does by default): decode it.
                    while chunk := self._read(response, job, _READ_BYTES, decode=True):
                        body += chunk
                        if len(body) > max_bytes:
                            raise job.fail(f"{job.label} answered with more than {max_bytes // MiB} MiB of JSON")
            try:
                return json.loads(body)
            except ValueError:
                raise job.fail(f"{job.label} did not answer with JSON") from None

        return self._with_retries(job, attempt)

    # -------------------------------------------------------------- internals

    def _through_cache(
        self, key: str, create: Callable[[Work], Path], label: str, input_name: str, started: float
    ) -> FetchResult:
        try:
            path, hit = self.cache.get_or_create(key, create, description=label)
        except CacheSpaceError as exc:
            raise DownloadError(f"{input_name}: {label}: {exc.strerror}") from None
        return FetchResult(path, path.stat().st_size, hit, time.monotonic() - started)

    def _with_retries(self, job: _Job, attempt: Callable[[], Any], *, work: Work | None = None) -> Any:
        for number in range(self.settings.retries + 1):
            try:
                return attempt()
            except _Transient as exc:
                if number == self.settings.retries:
                    error = job.fail(f"could not download {job.label}: {exc}. Check the URL and try again.")
                    error.keep_partial = work is not None and _ResumeState.exists(work.dir)
                    raise error from None
                delay = self.settings.retry_backoff_s * 2**number
                log.warning("%s: %s; retrying in %.1f s", job.label, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _new_session(self, job: _Job) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxies or .netrc credentials picked up from the environment
        private_ok = self.settings.allow_private or job.origin in self.settings.trusted_origins
        adapter = HTTPAdapter(max_retries=0) if private_ok else _PublicOnlyAdapter(max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "flux-lora-predictor"
        return session

    def _open(
        self, session: requests.Session, url: str, job: _Job, extra_headers: Mapping[str, str]
    ) -> tuple[requests.Response, str, bool]:
        """GET, following redirects by hand: (response, final URL, whether credentials went with it)."""
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            if urlsplit(current).scheme not in ("http", "https"):
                raise job.fail(f"only http(s) URLs can be downloaded, not {redact_url(current)}")
            with_auth = bool(job.auth_headers) and url_origin(current) == job.origin
            headers = {**job.headers, **extra_headers, **(job.auth_headers if with_auth else {})}
            self._check_deadline(job)
            try:
                response = session.get(
                    current,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(self.settings.connect_timeout_s, self.settings.read_timeout_s),
                )
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, _PrivateAddressError) as exc:
                raise self._classify(exc, job, current) from None
            if not response.is_redirect:
                return response, current, with_auth
            location = response.headers["Location"]
            response.close()
            current = urljoin(current, location)
        raise job.fail(f"{job.label} redirected more than {_MAX_REDIRECTS} times")

    def _attempt(self, job: _Job, work: Work) -> Path:
        dest = work.dir / _PART_NAME
        with contextlib.closing(self._new_session(job)) as session:
            probe = {"Range": f"bytes=0-{self.settings.probe_bytes - 1}"}
            response, final_url, _ = self._open(session, job.url, job, probe)
            with contextlib.closing(response):
                if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                    raise job.fail(f"{job.label} sent a compressed body although none was asked for")
                if response.status_code == 206:
                    return self._ranged(response, final_url, job, work, dest)
                if response.status_code == 200:
                    return self._single_stream(response, job, work, dest)
                if response.status_code == 416:
                    raise job.fail(f"{job.label} is an empty file")
                raise self._status_error(response.status_code, job)

    def _single_stream(self, response: requests.Response, job: _Job, work: Work, dest: Path) -> Path:
        length = _int_or_none(response.headers.get("Content-Length"))
        if length is not None:
            self._check_size(length, job)
        work.reserve(length or 0)
        _ResumeState.clear(work.dir)
        log.info("%s: the server does not support ranges; downloading as one stream", job.label)
        progress = _Progress(job.label, length, self.settings.progress_interval_s)
        written = 0
        with dest.open("wb") as out:
            while chunk := self._read(response, job, _READ_BYTES):
                written += len(chunk)
                self._check_size(written, job)
                out.write(chunk)
                progress.add(len(chunk))
        if length is not None and written != length:
            raise _Transient(f"the connection closed after {written} of {length} bytes")
        return dest

    def _ranged(self, first: requests.Response, final_url: str, job: _Job, work: Work, dest: Path) -> Path:
        content_range = _parse_content_range(first.headers.get("Content-Range"))
        if content_range is None or content_range[0] != 0:
            raise job.fail(f"{job.label} answered a range request with a malformed Content-Range")
        _, first_last, total = content_range
        self._check_size(total, job)
        work.reserve(total)
        validator = _validator(first.headers)
        state = _ResumeState.open(
            work.dir, dest, total=total, validator=validator, chunks=self.settings.plan_chunks(total, first_last + 1)
        )
        pending = [index for index in range(len(state.chunks)) if index not in state.done]
        already = total - sum(state.chunks[i][1] - state.chunks[i][0] for i in pending)
        progress = _Progress(job.label, total, self.settings.progress_interval_s, already)
        stop = threading.Event()
        local = threading.local()
        sessions: list[requests.Session] = []

        def session_of_this_thread() -> requests.Session:
            if not hasattr(local, "session"):
                local.session = self._new_session(job)
                sessions.append(local.session)
            return local.session

        def fetch_chunk(index: int, response: requests.Response | None, fd: int) -> None:
            start, end = state.chunks[index]
            if response is None:
                response, _, _ = self._open(
                    session_of_this_thread(), final_url, job, {"Range": f"bytes={start}-{end - 1}"}
                )
                with contextlib.closing(response):
                    self._check_chunk_answer(response, job, (start, end - 1, total), validator)
                    self._copy_range(response, fd, start, end - start, job, progress, stop)
            else:
                self._copy_range(response, fd, start, end - start, job, progress, stop)
            state.mark_done(index)

        if 0 not in pending:
            first.close()  # resuming: the probe's bytes are already here
        fd = os.open(dest, os.O_RDWR)
        try:
            workers = max(1, min(self.settings.connections, len(pending)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
                futures = [pool.submit(fetch_chunk, i, first if i == 0 else None, fd) for i in pending]
                try:
                    for future in as_completed(futures):
                        future.result()
                except BaseException:
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            os.close(fd)
            for session in sessions:
                session.close()
        state.finish()
        return dest

    def _check_chunk_answer(
        self, response: requests.Response, job: _Job, expected: tuple[int, int, int], validator: str | None
    ) -> None:
        if response.status_code != 206:
            if response.status_code in (200, 416):
                raise _Transient(f"{job.label} stopped honouring range requests")
            raise self._status_error(response.status_code, job)
        if _parse_content_range(response.headers.get("Content-Range")) != expected:
            raise _Transient(f"{job.label} answered with a different range or size (did the file change?)")
        if validator is not None and _validator(response.headers) not in (None, validator):
            raise _Transient(f"{job.label} changed during the download")

    def _copy_range(
        self,
        response: requests.Response,
        fd: int,
        offset: int,
        length: int,
        job: _Job,
        progress: _Progress,
        stop: threading.Event,
    ) -> None:
        position, end = offset, offset + length
        while position < end:
            if stop.is_set():
                raise _Cancelled()
            chunk = self._read(response, job, min(_READ_BYTES, end - position))
            if not chunk:
                raise _Transient(f"the connection closed after {position - offset} of {length} bytes of a range")
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            progress.add(len(chunk))

    def _read(self, response: requests.Response, job: _Job, amount: int, *, decode: bool = False) -> bytes:
        """Up to `amount` bytes as soon as some arrive (so the deadline is checked often); b"" at the end."""
        self._check_deadline(job)
        try:
            return response.raw.read1(amount, decode_content=decode)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise self._classify(exc, job, job.url) from None

    def _check_deadline(self, job: _Job) -> None:
        if time.monotonic() > job.deadline:
            error = job.fail(
                f"downloading {job.label} took longer than {self.settings.total_timeout_s:.0f} s "
                "(FLUX_DOWNLOAD_TIMEOUT_S); try again or use a faster host"
            )
            error.keep_partial = True
            raise error

    def _check_size(self, size: int, job: _Job) -> None:
        if size > job.max_size:
            raise job.fail(
                f"{job.label} is larger than the {job.max_size / MB:.1f} MB limit for this input "
                f"({size / MB:.1f} MB or more)"
            )

    def _status_error(self, status: int, job: _Job) -> Exception:
        if status == 429 or status >= 500:
            return _Transient(f"{job.label} answered HTTP {status}")
        hint = {
            401: "it is not public; a token may be needed",
            403: "access was refused",
            404: "no such file; check the URL",
        }.get(status, "check the URL")
        return HTTPStatusError(f"{job.input_name}: {job.label} answered HTTP {status}: {hint}", status)

    def _classify(self, exc: BaseException, job: _Job, url: str) -> Exception:
        """Our own message for a network failure: library messages contain full URLs, queries included."""
        host = urlsplit(url).hostname or "the server"
        private = _find_in_chain(exc, _PrivateAddressError)
        if private is not None:
            return job.fail(
                f"refusing to download from {private.host}: it is at {private.address}, a private, loopback or "
                "link-local address. For self-hosting on a private network set FLUX_ALLOW_PRIVATE_URLS=1."
            )
        if _find_in_chain(exc, urllib3.exceptions.NameResolutionError) is not None:
            return job.fail(f"cannot resolve the host name {host}; check the URL")
        if isinstance(exc, requests.exceptions.SSLError) or _find_in_chain(exc, urllib3.exceptions.SSLError):
            return job.fail(f"TLS failed with {host}; its certificate was not accepted")
        if isinstance(exc, requests.exceptions.ConnectTimeout) or _find_in_chain(
            exc, urllib3.exceptions.ConnectTimeoutError
        ):
            return _Transient(f"connecting to {host} timed out after {self.settings.connect_timeout_s:g} s")
        if isinstance(exc, (requests.exceptions.ReadTimeout, TimeoutError)) or _find_in_chain(
            exc, urllib3.exceptions.ReadTimeoutError
        ):
            return _Transient(f"{host} sent nothing for {self.settings.read_timeout_s:g} s")
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return job.fail("the disk is full; free space or lower the cache size cap")
        if isinstance(exc, requests.exceptions.ChunkedEncodingError) or _find_in_chain(
            exc, (urllib3.exceptions.ProtocolError, http.client.IncompleteRead)
        ):
            return _Transient(f"the connection to {host} closed before the end of the file")
        return _Transient(f"the connection to {host} failed")


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


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    first, last, total = (int(group) for group in match.groups())
    return (first, last, total) if first <= last < total else None


def _validator(headers: Mapping[str, str]) -> str | None:
    """What tells us the file is unchanged between attempts; weak ETags don't promise identical bytes."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return f"etag:{etag}"
    modified = headers.get("Last-Modified")
    return f"last-modified:{modified}" if modified else None


class _ResumeState:
    """Which chunks of the part file are complete, so a later attempt continues a ranged download.

    Kept only when the server gave a validator; a chunk is recorded after all its bytes were written."""

    _PLAN = "resume.json"
    _DONE = "resume.done"

    def __init__(self, work_dir: Path, chunks: list[tuple[int, int]], done: set[int], persistent: bool) -> None:
        self._done_path = work_dir / self._DONE
        self._persistent = persistent
        self._lock = threading.Lock()
        self.chunks = chunks
        self.done = done

    @classmethod
    def open(
        cls, work_dir: Path, dest: Path, *, total: int, validator: str | None, chunks: list[tuple[int, int]]
    ) -> _ResumeState:
        """The saved state when it is for the same file (size, validator, first range), else a fresh one.
        A resumed download keeps its saved chunk plan, whatever the settings are now."""
        plan_path = work_dir / cls._PLAN
        saved = _read_json(plan_path)
        saved_chunks = _valid_plan(saved.get("chunks"), total) if isinstance(saved, dict) else None
        same_file = (
            validator is not None
            and saved_chunks is not None
            and saved.get("total") == total
            and saved.get("validator") == validator
            and saved_chunks[0] == chunks[0]
            and dest.is_file()
            and dest.stat().st_size == total
        )
        if same_file:
            state = cls(work_dir, saved_chunks, set(), persistent=True)  # type: ignore[arg-type]
            state.done = state._read_done()
            if state.done:
                log.info("resuming a download: %d of %d chunks already here", len(state.done), len(state.chunks))
            return state
        cls.clear(work_dir)
        with dest.open("wb") as part:
            part.truncate(total)  # sparse; chunks land at their offsets
        if validator is not None:
            plan_path.write_text(json.dumps({"total": total, "validator": validator, "chunks": chunks}))
        return cls(work_dir, chunks, set(), persistent=validator is not None)

    @classmethod
    def exists(cls, work_dir: Path) -> bool:
        return (work_dir / cls._PLAN).exists()

    @classmethod
    def clear(cls, work_dir: Path) -> None:
        for name in (cls._PLAN, cls._DONE):
            with contextlib.suppress(FileNotFoundError):
                (work_dir / name).unlink()

    def _read_done(self) -> set[int]:
        try:
            lines = self._done_path.read_text().split("\n")
        except FileNotFoundError:
            return set()
        # Only full lines count: a kill can cut the last one short.
        return {int(line) for line in lines[:-1] if line.isdigit() and int(line) < len(self.chunks)}

    def mark_done(self, index: int) -> None:
        with self._lock:
            self.done.add(index)
            if self._persistent:
                with self._done_path.open("a") as done:
                    done.write(f"{index}\n")

    def finish(self) -> None:
        self.clear(self._done_path.parent)


def _valid_plan(value: Any, total: int) -> list[tuple[int, int]] | None:
    """The saved chunk list if it tiles [0, total) exactly; a damaged plan is not trusted."""
    if not isinstance(value, list) or not value:
        return None
    chunks, position = [], 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and item[0] == position and isinstance(item[1], int)):
            return None
        if item[1] <= position:
            return None
        chunks.append((position, item[1]))
        position = item[1]
    return chunks if position == total else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Progress:
    """Thread-safe byte counter that logs a progress line every `interval_s`."""

    def __init__(self, label: str, total: int | None, interval_s: float, already: int = 0) -> None:
        self._label, self._total, self._interval = label, total, interval_s
        self._lock = threading.Lock()
        self._done = already
        self._new = 0
        self._started = self._last = time.monotonic()

    def add(self, count: int) -> None:
        with self._lock:
            self._done += count
            self._new += count
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            rate = self._new / max(now - self._started, 1e-6) / MB
            if self._total:
                log.info(
                    "downloading %s: %d%% of %.1f MB, %.1f MB/s",
                    self._label,
                    100 * self._done // self._total,
                    self._total / MB,
                    rate,
                )
            else:
                log.info("downloading %s: %.1f MB so far, %.1f MB/s", self._label, self._done / MB, rate)


# ---------------------------------------------------------------- file checks: safetensors sniff, tar
