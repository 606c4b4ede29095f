#!/usr/bin/env python
"""Weights from FLUX_WEIGHTS_URL on loopback, and the setup check of a real-size folder.

    python bench/bench_weights_url.py [--size-gib 1.5] [--rounds 2]     # fetch: download-then-extract vs streaming
    python bench/bench_weights_url.py --verify                         # verify a real-size FLUX folder's headers

Fetch: a tar of one folder (three valid .safetensors files) served by a FileServer in another process (so the
server does not share our GIL). Three ways, alternated, each into an empty folder:
- `shipped`: weights.remote as setup runs it: the ranged downloader (8 connections), then extract and check;
- `parallel_stream`: a prototype that streams the same 8 parallel ranges, in order, into tar extraction;
- `single_stream`: one plain GET streamed into tar extraction.
Prints JSON: median seconds of each and their throughput over `shipped`'s (>1: faster than shipped).

Verify: a FLUX weights folder with the real tensor names, shapes and shards (weights/synthetic's components),
whose files hold real headers and sparse data (no disk used): the seconds `verify_weights_folder` takes for
all four folders (headers only, as at every setup).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from units import GiB, MiB  # noqa: E402

FOLDER = "FLUX.1-dev"


def make_folder_tar(directory: Path, size: int) -> Path:
    """A tar of a folder with three .safetensors files (valid headers, zero data) adding up to `size` bytes."""
    folder = directory / "source"
    (folder / "transformer").mkdir(parents=True)
    for index in range(3):
        count = size // 3
        header = json.dumps({"weight": {"dtype": "U8", "shape": [count], "data_offsets": [0, count]}}).encode()
        with (folder / "transformer" / f"part-{index}.safetensors").open("wb") as file:
            file.write(struct.pack("<Q", len(header)) + header)
            file.truncate(8 + len(header) + count)  # sparse: quick to make, read back as zeros
    tar_path = directory / f"{FOLDER}.tar"
    with tarfile.open(tar_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    shutil.rmtree(folder)
    return tar_path


def serve(tar_path: Path) -> None:
    """The server process: prints its base URL, serves until stdin closes."""
    from tests.fixtures.servers import FileServer

    server = FileServer()
    server.add(f"/w/{FOLDER}.tar", tar_path.read_bytes())
    print(server.url + "/w", flush=True)
    sys.stdin.read()
    server.close()


def shipped(base: str, root: Path) -> None:
    from weights.remote import fetch_weight_folders

    fetch_weight_folders(root, [FOLDER], base)


class OrderedRanges(io.RawIOBase):
    """A readable stream over `connections` parallel range GETs of `chunk` bytes, delivered in order, with at
    most 2 x connections chunks in memory."""

    def __init__(self, url: str, total: int, connections: int = 8, chunk: int = 16 * MiB) -> None:
        import requests

        self._url, self._session = url, requests.Session()
        self._ranges = [(start, min(total, start + chunk)) for start in range(0, total, chunk)]
        self._pool = ThreadPoolExecutor(connections)
        self._futures = [self._pool.submit(self._get, r) for r in self._ranges[: 2 * connections]]
        self._next, self._buffer = len(self._futures), memoryview(b"")

    def _get(self, byte_range: tuple[int, int]) -> bytes:
        headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}", "Accept-Encoding": "identity"}
        return self._session.get(self._url, headers=headers).content

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        if not self._buffer:
            if not self._futures:
                return 0
            self._buffer = memoryview(self._futures.pop(0).result())
            if self._next < len(self._ranges):
                self._futures.append(self._pool.submit(self._get, self._ranges[self._next]))
                self._next += 1
        count = min(len(target), len(self._buffer))
        target[:count], self._buffer = self._buffer[:count], self._buffer[count:]
        return count

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        super().close()


def stream_extract(stream, root: Path) -> None:
    """The shipped tar rules (weights.remote's checked members, the data filter), over a stream."""
    from weights.remote import _checked_members
    from weights.verify import verify_weights_folder

    staging = root / f".{FOLDER}.partial"
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BufferedReader(stream, 4 * MiB), mode="r|", copybufsize=8 * MiB) as archive:
        archive.extractall(staging, members=_checked_members(archive, "bench"), filter="data")
    verify_weights_folder(staging, name=FOLDER)
    staging.rename(root / FOLDER)


def parallel_stream(base: str, root: Path, total: int) -> None:
    stream_extract(OrderedRanges(f"{base}/{FOLDER}.tar", total), root)


def single_stream(base: str, root: Path, total: int) -> None:
    import requests

    with requests.get(f"{base}/{FOLDER}.tar", stream=True, headers={"Accept-Encoding": "identity"}) as response:
        stream_extract(response.raw, root)


def measure_fetch(size_gib: float, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        tar_path = make_folder_tar(Path(tmp), int(size_gib * GiB))
        total = tar_path.stat().st_size
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(tar_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            base = server.stdout.readline().strip()
            ways = {
                "shipped": lambda root: shipped(base, root),
                "parallel_stream": lambda root: parallel_stream(base, root, total),
                "single_stream": lambda root: single_stream(base, root, total),
            }
            seconds: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(rounds):
                for name, way in ways.items():
                    root = Path(tmp) / name
                    started = time.perf_counter()
                    way(root)
                    seconds[name].append(time.perf_counter() - started)
                    shutil.rmtree(root)
        finally:
            server.stdin.close()
            server.wait()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "tar_mb": round(total / 1e6),
        "rounds": rounds,
        "seconds": {name: [round(value, 2) for value in values] for name, values in seconds.items()},
        "mb_per_s": {name: round(total / 1e6 / value) for name, value in median.items()},
        "throughput_over_shipped": {name: round(median["shipped"] / value, 2) for name, value in median.items()},
    }


def sparse_real_folder(root: Path) -> None:
    """Every component's real shards and index, each file a real header followed by sparse data."""
    import math

    from weights.libraries import prepare_libraries

    prepare_libraries()  # no import noise from diffusers and transformers
    import torch

    from weights.synthetic.components import MAX_SHARD_SIZE, WEIGHTS_FILE, components
    from weights.synthetic.shards import header_bytes, plan_shards

    for item in components():
        model = item.build_on_meta()
        params = dict(model.named_parameters())
        shapes = {stored: tuple(params[name].shape) for stored, name in item.stored_names(model).items()}
        directory = item.folder(root)
        directory.mkdir(parents=True)
        pattern = WEIGHTS_FILE[item.library]
        split = plan_shards(shapes, torch.bfloat16, pattern, MAX_SHARD_SIZE[item.library])
        for filename, names in split.filename_to_tensors.items():
            header = header_bytes({name: shapes[name] for name in names}, torch.bfloat16)
            with (directory / filename).open("wb") as file:
                file.write(header)
                file.truncate(len(header) + sum(math.prod(shapes[name]) for name in names) * 2)
        if split.is_sharded:
            index = {"metadata": {}, "weight_map": split.tensor_to_filename}
            (directory / (pattern.format(suffix="") + ".index.json")).write_text(json.dumps(index))


def measure_verify(repeats: int = 20) -> dict[str, object]:
    from weights.manifest import MANIFEST
    from weights.verify import verify_weights_folder

    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        root = Path(tmp)
        sparse_real_folder(root)
        folders = [root / source.folder for source in MANIFEST.values()]
        files = sum(1 for _ in root.rglob("*.safetensors"))
        declared = sum(path.stat().st_size for path in root.rglob("*.safetensors"))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for folder in folders:
                verify_weights_folder(folder)
            times.append(time.perf_counter() - started)
    return {
        "safetensors_files": files,
        "declared_gb": round(declared / 1e9, 1),
        "verify_ms_median": round(1000 * statistics.median(times), 1),
        "verify_ms_max": round(1000 * max(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
    elif args.verify:
        print(json.dumps(measure_verify(), indent=1))
    else:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # shipped's phase times
        print(json.dumps(measure_fetch(args.size_gib, args.rounds), indent=1))


if __name__ == "__main__":
    main()
