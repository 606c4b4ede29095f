#!/usr/bin/env python
"""Benchmark P4: parallel ranged download time ÷ single-stream time, through a local server throttled per
connection (as CDNs and storage hosts often are). Goal: >= 3.5x at 4+ connections.

    python bench/bench_download.py [--connections 4] [--size-mib 24] [--rate-mib-s 6]
    python bench/bench_download.py --cancel      # how fast a cancel and a stall end a download

Prints the numbers measured in this one run, as JSON. `measure_p4()` returns them (bench/benchmark uses it).
The single stream is the downloader's own fallback path (a server without Range support), over the same throttle.
`measure_cancel()` times, against hosts that drip one byte per second: seconds from a cancel to the download's
end (ranged and single stream), and seconds until a 2 s stall timeout ends a dripping download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora.download.cache import FileCache  # noqa: E402
from lora.download.config import DownloadSettings  # noqa: E402
from lora.download.downloader import Downloader  # noqa: E402
from lora.download.errors import DownloadCancelled, DownloadStalled  # noqa: E402
from tests.fixtures.servers import FileServer  # noqa: E402

MIB = 1 << 20


def measure_p4(connections: int = 4, size_mib: float = 24, rate_mib_s: float = 6.0) -> dict[str, float]:
    """Times one download of the same file each way; `ratio` = single-stream seconds / parallel seconds (the P4 number)."""
    data = hashlib.shake_256(b"p4").digest(int(size_mib * MIB))
    rate = rate_mib_s * MIB
    server = FileServer()
    try:
        single_url = server.add("/single.bin", data, ranges=False, rate=rate)
        ranged_url = server.add("/ranged.bin", data, ranges=True, rate=rate)
        with tempfile.TemporaryDirectory() as tmp:
            single_s = _time_download(Path(tmp) / "single", single_url, connections=1, expected=data)
            parallel_s = _time_download(Path(tmp) / "parallel", ranged_url, connections=connections, expected=data)
    finally:
        server.close()
    return {
        "connections": connections,
        "size_mib": size_mib,
        "rate_mib_s_per_connection": rate_mib_s,
        "single_stream_s": round(single_s, 3),
        "parallel_s": round(parallel_s, 3),
        "ratio": round(single_s / parallel_s, 2),
    }


def _time_download(cache_root: Path, url: str, *, connections: int, expected: bytes) -> float:
    cache = FileCache(cache_root, max_bytes=0, min_free_bytes=0, verify_hits=False)
    downloader = Downloader(cache, DownloadSettings(connections=connections, allow_private=True, retries=0))
    started = time.perf_counter()
    result = downloader.fetch(url, key=url, input_name="benchmark", max_size=len(expected) + 1)
    elapsed = time.perf_counter() - started
    if (
        result.size != len(expected)
        or hashlib.sha256(result.path.read_bytes()).digest() != hashlib.sha256(expected).digest()
    ):
        raise RuntimeError("the benchmark download is not byte-identical to the served file")
    return elapsed


def measure_cancel() -> dict[str, float]:
    data = hashlib.shake_256(b"cancel").digest(4 * MIB)
    server = FileServer()
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, options in {"ranged": {"ranges": True, "rate": 64 * 1024}, "stream": {"ranges": False, "drip": 1.0}}.items():
                url = server.add(f"/{name}.bin", data, **options)
                settings = DownloadSettings(connections=4, allow_private=True, retries=0)
                downloader = Downloader(FileCache(Path(tmp) / name, max_bytes=0), settings)
                cancel, set_at = threading.Event(), []
                threading.Timer(1.1, lambda: (set_at.append(time.monotonic()), cancel.set())).start()  # noqa: B023
                try:
                    downloader.fetch(url, key=url, input_name="benchmark", max_size=len(data) + 1, cancelled=cancel.is_set)
                    raise RuntimeError("the download was not cancelled")
                except DownloadCancelled:
                    results[f"cancel_to_end_{name}_s"] = round(time.monotonic() - set_at[0], 3)
            url = server.add("/drip.bin", data, ranges=False, drip=1.0)
            settings = DownloadSettings(allow_private=True, retries=2, stall_timeout_s=2.0)
            started = time.monotonic()
            try:
                Downloader(FileCache(Path(tmp) / "stall", max_bytes=0), settings).fetch(
                    url, key=url, input_name="benchmark", max_size=len(data) + 1
                )
                raise RuntimeError("the dripping download did not stall")
            except DownloadStalled:
                results["drip_to_stall_failure_s_at_2s_timeout"] = round(time.monotonic() - started, 3)
    finally:
        server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--size-mib", type=float, default=24)
    parser.add_argument("--rate-mib-s", type=float, default=6.0)
    parser.add_argument("--cancel", action="store_true", help="measure cancel and stall times instead")
    args = parser.parse_args()
    if args.cancel:
        print(json.dumps(measure_cancel()))
        return
    print(json.dumps(measure_p4(args.connections, args.size_mib, args.rate_mib_s)))


if __name__ == "__main__":
    main()
