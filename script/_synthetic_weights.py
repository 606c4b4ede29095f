"""Writes a synthetic FLUX.1 weights folder (weights/synthetic/folder.py) and says how close to disk speed it ran.

    script/synthetic_weights OUT [--double N] [--single N] [--t5-layers N] [--seed S] [--device cuda]

With no layer flags it is full size (19 double, 38 single blocks, 24 T5 layers: about 58 GB). Before building, it
times a plain write of the same number of bytes into OUT's parent (written and fsynced in 64 MiB blocks, then
deleted, so the disk never holds both), and prints the build's time against it. Afterwards every file is opened
with safetensors.safe_open and every tensor's shape checked against its header. Then point the product at it:
FLUX_WEIGHTS=real FLUX_WEIGHTS_DIR=OUT.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = 64 * 1024 * 1024


def plain_write_seconds(directory: Path, size: int) -> float:
    """Seconds to write and fsync `size` bytes into a scratch file in `directory` (then deleted)."""
    block = os.urandom(BLOCK)
    descriptor, name = tempfile.mkstemp(prefix=".plain-write-", dir=directory)
    started = time.perf_counter()
    try:
        with os.fdopen(descriptor, "wb") as file:
            for offset in range(0, size, BLOCK):
                file.write(memoryview(block)[: min(BLOCK, size - offset)])
            file.flush()
            os.fsync(file.fileno())
        return time.perf_counter() - started
    finally:
        os.unlink(name)


def verify(root: Path) -> tuple[int, int]:
    """Open every .safetensors file under root; return (files, tensors)."""
    from safetensors import safe_open

    files = tensors = 0
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                if any(size < 0 for size in shape):
                    raise ValueError(f"{path}: {name} has shape {shape}")
                tensors += 1
        files += 1
    return files, tensors


def main(argv: list[str]) -> int:
    from weights.synthetic.components import Layers, components
    from weights.synthetic.folder import ensure_synthetic_folder, repo_build
    from weights.synthetic.values import SyntheticTensors

    parser = argparse.ArgumentParser(prog="script/synthetic_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--double", type=int, default=19, help="double-stream blocks (real: 19)")
    parser.add_argument("--single", type=int, default=38, help="single-stream blocks (real: 38)")
    parser.add_argument("--t5-layers", type=int, default=24, help="T5 encoder layers (real: 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where values are drawn (cuda is faster; its values differ from cpu's)")
    args = parser.parse_args(argv)
    layers = Layers(args.double, args.single, args.t5_layers)
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)

    total = sum(SyntheticTensors(c, c.build_on_meta(layers), args.seed).nbytes() for c in components())
    print(f"synthetic FLUX.1 ({layers}, seed {args.seed}): {total / 1e9:.2f} GB of bf16 tensors into {root}", flush=True)
    marker = repo_build(layers, args.seed)
    if all(marker.is_complete(root / c.key.split("/")[0]) for c in components()):
        print("already complete (same layers, seed and builder version): nothing to write")
        return 0
    plain = plain_write_seconds(root, total)
    print(f"plain write of {total / 1e9:.2f} GB: {plain:.1f}s ({total / plain / 1e9:.2f} GB/s)", flush=True)
    started = time.perf_counter()
    report = ensure_synthetic_folder(root, layers, args.seed, args.device, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    print(f"built in {seconds:.1f}s ({report.tensor_bytes / seconds / 1e9:.2f} GB/s): {seconds / plain:.2f}x the plain write")
    files, tensors = verify(root)
    print(f"verified: {files} safetensors files, {tensors} tensors open with safetensors.safe_open")
    print(f"use it: FLUX_WEIGHTS=real FLUX_WEIGHTS_DIR={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
