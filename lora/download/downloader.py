"""HTTP downloads into a `FileCache`: parallel ranges with resume, a single-stream fallback, and the guards
that untrusted URLs need. Usable for LoRAs and for big model weight files alike.

How one download goes:
1. GET with `Range: bytes=0-<1 MiB>`, following redirects by hand (`http`: credentials stay on their origin).
2. 206: the size is known. Check it against `max_size`, make room in the cache, fetch the rest in chunks over
   several connections (`ranged`), resumable (`resume`). 200: the server ignores Range (CivitAI's storage
   sometimes does): one stream, from the start.
3. Checks (an expected sha256; a `finish` hook such as a format check or tar extraction), then the cache
   publishes the file in one rename.

Guards: http(s) only; every connection goes to an address checked before connecting (`addresses`); a size cap
per file; a monitor (`monitor`) that ends the download on cancel, on a stall and at the deadline; only quick
failures (5xx, a dropped connection) are retried. Logs and errors show URLs without their query string
(`redaction`) and never show headers. Failures say whose fault they are (`errors`). Settings: `config`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from lora.download.cache import CacheSpaceError, FileCache, LargerThanCache, Work, sha256_file
from lora.download.config import DownloadSettings
from lora.download.errors import DownloadError, DownloadRefused
from lora.download.http import READ_BYTES, HttpJob, Transient
from lora.download.monitor import TransferMonitor
from lora.download.ranged import download_ranges
from lora.download.redaction import redact_url
from lora.download.resume import ResumeState
from units import MiB

log = logging.getLogger(__name__)

_PART_NAME = "download.part"
Cancelled = Callable[[], bool]  # e.g. threading.Event().is_set: True once the prediction is canceled


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
        auth_headers: Mapping[str, str] | None = None,
        expected_sha256: str | None = None,
        finish: Callable[[Path], Path] | None = None,
        description: str | None = None,
        cancelled: Cancelled | None = None,
    ) -> FetchResult:
        """A complete cached file for `key`, downloading on a miss.

        `url` is a URL, or a resolver called only on a miss (e.g. an API lookup) that returns the URL and an
        optional published sha256. `auth_headers` are credentials: sent only to the first URL's origin, never
        logged. `finish` gets the downloaded file (in the work directory) and returns the file to cache, e.g.
        one extracted next to it; it raises to refuse the download, which then leaves nothing behind.
        `cancelled` is polled during the download; once it returns True the download ends within a second."""
        started = time.monotonic()
        if description is None:
            if callable(url):
                raise TypeError("a description is needed when the URL comes from a resolver")
            description = redact_url(url)
        label = description

        def create(work: Work) -> Path:
            target = url() if callable(url) else Resolved(url, expected_sha256)
            headers_sent = {"Accept-Encoding": "identity"}
            with self._monitor(input_name, label, cancelled) as monitor:
                job = self._job(target.url, input_name, label, max_size, headers_sent, auth_headers, monitor)
                downloaded = self._with_retries(job, lambda: self._attempt(job, work), work=work)
            if target.sha256 and sha256_file(downloaded) != target.sha256.lower():
                raise job.host_failed(f"the file from {label} does not match its published SHA-256; try again")
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
        cancelled: Cancelled | None = None,
    ) -> Any:
        """GET a small JSON document with the same guards, redirect rules, monitor and retries as downloads."""
        label = redact_url(url)
        with self._monitor(input_name, label, cancelled) as monitor:
            job = self._job(url, input_name, label, max_bytes, {"Accept": "application/json"}, auth_headers, monitor)
            return self._with_retries(job, lambda: self._read_json(job, max_bytes))

    def drop(self, key: str) -> None:
        """Forget the cached file of `key` (it turned out damaged), so the next fetch downloads it again."""
        self.cache.remove(key)

    # -------------------------------------------------------------- internals

    def _monitor(self, input_name: str, label: str, cancelled: Cancelled | None) -> TransferMonitor:
        return TransferMonitor(
            input_name=input_name,
            label=label,
            cancelled=cancelled,
            stall_timeout_s=self.settings.stall_timeout_s,
            total_timeout_s=self.settings.total_timeout_s,
            progress_interval_s=self.settings.progress_interval_s,
        )

    def _job(
        self,
        url: str,
        input_name: str,
        label: str,
        max_size: int,
        headers: dict[str, str],
        auth_headers: Mapping[str, str] | None,
        monitor: TransferMonitor,
    ) -> HttpJob:
        return HttpJob(url, input_name, label, max_size, headers, dict(auth_headers or {}), self.settings, monitor)

    def _through_cache(
        self, key: str, create: Callable[[Work], Path], label: str, input_name: str, started: float
    ) -> FetchResult:
        try:
            path, hit = self.cache.get_or_create(key, create, description=label)
        except CacheSpaceError as exc:
            error_type = DownloadRefused if isinstance(exc, LargerThanCache) else DownloadError
            raise error_type(f"{input_name}: {label}: {exc.strerror}") from None
        except OSError as exc:
            # Writing (a chunk, the resume state, an extracted tar) or reading a local tar failed on this server:
            # neither the user's input nor the remote host is at fault, so a plain DownloadError. Its message
            # would name a path on this server, so users get the error's kind and the log gets the whole of it.
            log.warning("%s: %s: %r", input_name, label, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(f"{input_name}: the server's disk is full; try again later") from None
            kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise DownloadError(f"{input_name}: {label}: this server could not write or read a file ({kind})") from None
        return FetchResult(path, path.stat().st_size, hit, time.monotonic() - started)

    def _with_retries(self, job: HttpJob, attempt: Callable[[], Any], *, work: Work | None = None) -> Any:
        """Quick failures (`Transient`) are tried again; everything else, stalls included, ends at once."""
        try:
            for number in range(self.settings.retries + 1):
                try:
                    return attempt()
                except Transient as exc:
                    if number == self.settings.retries:
                        raise job.host_failed(f"could not download {job.label}: {exc}. Try again later.") from None
                    delay = self.settings.retry_backoff_s * 2**number
                    log.warning("%s: %s; retrying in %.1f s", job.label, exc, delay)
                    job.monitor.sleep(delay)
            raise AssertionError("unreachable")
        except DownloadError:
            if work is not None and ResumeState.exists(work.dir):
                work.keep_for_resume()  # worth keeping only what a later attempt can resume
            raise

    def _attempt(self, job: HttpJob, work: Work) -> Path:
        dest = work.dir / _PART_NAME
        with contextlib.closing(job.new_session()) as session:
            probe = {"Range": f"bytes=0-{self.settings.probe_bytes - 1}"}
            response, final_url = job.open(session, job.url, probe)
            with contextlib.closing(response):
                if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                    raise job.host_failed(f"{job.label} sent a compressed body although none was asked for")
                if response.status_code == 206:
                    return download_ranges(job, response, final_url, work, dest)
                if response.status_code == 200:
                    return self._single_stream(job, response, work, dest)
                if response.status_code == 416:
                    raise job.refuse(f"{job.label} is an empty file")
                raise job.status_error(response.status_code)

    def _single_stream(self, job: HttpJob, response: requests.Response, work: Work, dest: Path) -> Path:
        length = _int_or_none(response.headers.get("Content-Length"))
        if length is not None:
            job.check_size(length)
        work.reserve(length or 0)
        ResumeState.clear(work.dir)
        log.info("%s: the server does not support ranges; downloading as one stream", job.label)
        job.monitor.expect(length)
        written = 0
        with dest.open("wb") as out:
            while chunk := job.read(response, READ_BYTES):
                written += len(chunk)
                job.check_size(written)
                out.write(chunk)
        if length is not None and written != length:
            raise Transient(f"the connection closed after {written} of {length} bytes")
        return dest

    def _read_json(self, job: HttpJob, max_bytes: int) -> Any:
        with contextlib.closing(job.new_session()) as session:
            response, _ = job.open(session, job.url, {})
            with contextlib.closing(response):
                if response.status_code != 200:
                    raise job.status_error(response.status_code)
                body = bytearray()
                # APIs compress JSON when the client allows it (requests does by default): decode it.
                while chunk := job.read(response, READ_BYTES, decode=True):
                    body += chunk
                    if len(body) > max_bytes:
                        raise job.host_failed(f"{job.label} answered with more than {max_bytes // MiB} MiB of JSON")
        try:
            return json.loads(body)
        except ValueError:
            raise job.host_failed(f"{job.label} did not answer with JSON") from None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
