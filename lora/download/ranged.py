"""A ranged download: the file in chunks over several keep-alive connections, written in place at their offsets.

The first chunk is the probe's answer (`Range: bytes=0-<probe>`), which also told us the size. The rest is
planned as shrinking chunks, fetched by `connections` worker threads, each with its own session. Finished chunks
are recorded in the resume state, so a later attempt continues. Every connection registers with the job's
monitor, which wakes blocked workers when the download must end (cancel, stall, deadline).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests

from lora.download.cache import Work
from lora.download.http import READ_BYTES, HttpJob, Transient
from lora.download.resume import ResumeState, validator_of

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.IGNORECASE)


class _SiblingFailed(Exception):
    """Another chunk failed; this one stops early."""


def plan_chunks(
    total: int, first_end: int, *, connections: int, probe_bytes: int, max_chunk_bytes: int
) -> list[tuple[int, int]]:
    """[start, end) ranges: the probe's, then shrinking chunks (each a 1/(2·connections) share of what is
    left, between probe_bytes and max_chunk_bytes). Big chunks first keep requests few; small ones last
    let the connections finish together instead of waiting on one big tail."""
    chunks = [(0, first_end)]
    start = first_end
    while start < total:
        share = math.ceil((total - start) / (2 * connections))
        end = min(total, start + max(probe_bytes, min(max_chunk_bytes, share)))
        chunks.append((start, end))
        start = end
    return chunks


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    first, last, total = (int(group) for group in match.groups())
    return (first, last, total) if first <= last < total else None


def download_ranges(job: HttpJob, first: requests.Response, final_url: str, work: Work, dest: Path) -> Path:
    """The whole file at `dest`, given the probe's 206 answer `first` (which this consumes)."""
    content_range = parse_content_range(first.headers.get("Content-Range"))
    if content_range is None or content_range[0] != 0:
        raise job.host_failed(f"{job.label} answered a range request with a malformed Content-Range")
    _, first_last, total = content_range
    job.check_size(total)
    work.reserve(total)
    validator = validator_of(first.headers)
    settings = job.settings
    plan = plan_chunks(
        total,
        first_last + 1,
        connections=settings.connections,
        probe_bytes=settings.probe_bytes,
        max_chunk_bytes=settings.max_chunk_bytes,
    )
    state = ResumeState.open(work.dir, dest, total=total, validator=validator, chunks=plan)
    pending = state.pending()
    job.monitor.expect(total, already=state.bytes_done())
    stop = threading.Event()
    local = threading.local()
    sessions: list[requests.Session] = []

    def session_of_this_thread() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = job.new_session()
            sessions.append(local.session)
        return local.session

    def fetch_chunk(index: int, response: requests.Response | None, fd: int) -> None:
        start, end = state.chunks[index]
        if response is None:
            response, _ = job.open(session_of_this_thread(), final_url, {"Range": f"bytes={start}-{end - 1}"})
            with contextlib.closing(response):
                _check_chunk_answer(job, response, (start, end - 1, total), validator)
                _copy_range(job, response, fd, start, end - start, stop)
        else:
            _copy_range(job, response, fd, start, end - start, stop)
        state.mark_done(index)

    if 0 not in pending:
        first.close()  # resuming: the probe's bytes are already here
    fd = os.open(dest, os.O_RDWR)
    try:
        workers = max(1, min(settings.connections, len(pending)))
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
    job: HttpJob, response: requests.Response, expected: tuple[int, int, int], validator: str | None
) -> None:
    if response.status_code != 206:
        if response.status_code in (200, 416):
            raise Transient(f"{job.label} stopped honouring range requests")
        raise job.status_error(response.status_code)
    if parse_content_range(response.headers.get("Content-Range")) != expected:
        raise Transient(f"{job.label} answered with a different range or size (did the file change?)")
    if validator is not None and validator_of(response.headers) not in (None, validator):
        raise Transient(f"{job.label} changed during the download")


def _copy_range(
    job: HttpJob, response: requests.Response, fd: int, offset: int, length: int, stop: threading.Event
) -> None:
    position, end = offset, offset + length
    while position < end:
        if stop.is_set():
            raise _SiblingFailed()
        chunk = job.read(response, min(READ_BYTES, end - position))
        if not chunk:
            raise Transient(f"the connection closed after {position - offset} of {length} bytes of a range")
        view = memoryview(chunk)
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
