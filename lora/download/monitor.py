"""Watching one transfer: cancel, stall and deadline, and the progress lines.

A blocking socket read cannot look at a flag, and a short socket timeout would leave http.client's response
unusable. So a side thread looks every `poll_s` (0.2 s) at the cancel callable, the clock and the bytes that
arrived. When the transfer must end, it records why and shuts down the socket of every connection registered
with it: a blocked read wakes at once, sees an error or an early end, and the reader calls `check()`, which
raises the recorded reason instead of a misleading "connection closed".

Stalled means: fewer than `STALL_MIN_BYTES` arrived in the last `stall_timeout_s`, counted over all the
transfer's connections. A host that sends nothing and one that drips a byte every few seconds both fail after
one stall timeout, and a stall is never retried.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from lora.download.errors import DownloadCancelled, DownloadError, DownloadStalled, HostFailed
from units import MB, KiB

log = logging.getLogger(__name__)

STALL_MIN_BYTES = 16 * KiB


class TransferMonitor:
    """Use as a context manager around one transfer (its attempts and retries included)."""

    def __init__(
        self,
        *,
        input_name: str,
        label: str,
        cancelled: Callable[[], bool] | None,
        stall_timeout_s: float,
        total_timeout_s: float,
        progress_interval_s: float = 5.0,
        poll_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` is for tests that step time themselves (and call `poll()` in place of the side thread)."""
        self._input_name, self._label = input_name, label
        self._clock = clock
        self._cancelled = cancelled or (lambda: False)
        self._stall_s, self._total_s = stall_timeout_s, total_timeout_s
        self._progress_interval_s, self._poll_s = progress_interval_s, poll_s
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._failure: DownloadError | None = None
        self._stop = threading.Event()
        self._must_end = threading.Event()  # set with `_failure`
        self._thread: threading.Thread | None = None
        self._total: int | None = None
        self._done = self._new = 0
        self._started = self._last_log = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])  # (time, bytes so far), for stalls

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> TransferMonitor:
        self._started = self._last_log = self._clock()
        self._samples = deque([(self._started, 0)])
        self._thread = threading.Thread(target=self._watch, name="download-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # -------------------------------------------------------------- for readers

    def register(self, connection: Any) -> None:
        """A connection whose `.sock` is shut down when the transfer must end. Raises if it already must."""
        with self._lock:
            self._connections.add(connection)
        self.check()

    def check(self) -> None:
        """Raise the reason the transfer must end, if there is one."""
        if self._failure is not None:
            raise self._failure

    def sleep(self, seconds: float) -> None:
        """A pause (retry backoff) that a cancel or the deadline ends early."""
        self._must_end.wait(seconds)
        self.check()

    def expect(self, total: int | None, already: int = 0) -> None:
        """The size, once known, and the bytes already here (a resumed download). For the progress line only:
        a retry sets them back, so stall detection counts the bytes that arrived instead."""
        with self._lock:
            self._total, self._done = total, already

    def add(self, count: int) -> None:
        with self._lock:
            self._done += count
            self._new += count
            now = self._clock()
            if now - self._last_log < self._progress_interval_s:
                return
            self._last_log = now
            done, total, rate = self._done, self._total, self._new / max(now - self._started, 1e-6) / MB
        if total:
            left_s = (total - done) / MB / max(rate, 1e-6)
            log.info(
                "downloading %s: %d%% of %.1f MB, %.1f MB/s, %.0f s left",
                self._label, 100 * done // total, total / MB, rate, left_s,
            )  # fmt: skip
        else:
            log.info("downloading %s: %.1f MB so far, %.1f MB/s", self._label, done / MB, rate)

    # -------------------------------------------------------------- the side thread

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.poll()

    def poll(self) -> None:
        """One look at the cancel callable, the clock and the bytes; the side thread's step, every `poll_s`."""
        if self._failure is None:
            failure = self._reason_to_stop()
            if failure is None:
                return
            self._failure = failure
            self._must_end.set()
        self._shut_sockets()  # again on each poll: a connection may have been opened meanwhile

    def _reason_to_stop(self) -> DownloadError | None:
        now = self._clock()
        samples = self._samples
        prefix = f"{self._input_name}: "
        if self._cancelled():
            error: DownloadError = DownloadCancelled(
                f"{prefix}the prediction was canceled while downloading {self._label}"
            )
        elif now - self._started > self._total_s:
            error = HostFailed(
                f"{prefix}downloading {self._label} took longer than {self._total_s:.0f} s (FLUX_DOWNLOAD_TIMEOUT_S); "
                "try again later or use a faster host"
            )
        else:
            with self._lock:
                # bytes that arrived in this monitor's life: only grows, unlike `_done`, which `expect()`
                # sets back on a retry (to 0 or to what the resume state kept)
                samples.append((now, self._new))
            while len(samples) > 1 and samples[1][0] <= now - self._stall_s:
                samples.popleft()
            window_start, bytes_then = samples[0]
            if window_start > now - self._stall_s or samples[-1][1] - bytes_then >= STALL_MIN_BYTES:
                return None
            error = DownloadStalled(
                f"{prefix}{self._label} stalled: less than {STALL_MIN_BYTES // KiB} KiB arrived in "
                f"{self._stall_s:g} s (FLUX_DOWNLOAD_STALL_TIMEOUT_S); the host may be overloaded, try again later"
            )
        return error

    def _shut_sockets(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):  # closed already
                    sock.shutdown(socket.SHUT_RDWR)
