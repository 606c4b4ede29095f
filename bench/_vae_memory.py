"""Peak memory of the VAE decode at FLUX.1's real widths (random weights, CPU): whole batch vs sliced vs tiled.

Each configuration runs in a fresh process and reports its peak resident memory during the decode alone (the
process's peak RSS after the decode less its RSS just before, with the model and latents already in memory), so
one configuration's allocations cannot hide another's. Prints each peak and its ratio to the whole-batch decode
(goal for 1440x1440 x 4: <= 0.35).

The decode at 1440x1440 x 4 in fp32 needs about 23 GiB, more than this 24 GiB machine can spare, so the default
measures 512 and 720 px with the same batch and extrapolates: activation memory is linear in pixels (the mid-block
attention runs through SDPA, which does not hold the attention matrix), so each mode's peak is fitted as
a + b * pixels through the two sizes and evaluated at 1440x1440. The tile scales with the size (flux/vae.py's
1024 px at 1440 is 512 at 720), so a tiled run has the tile layout it would have at full size. About 25 minutes
on 2 busy cores; bf16 halves the bytes (the GPU's dtype), but CPU bf16 convolutions are much slower.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("whole", "sliced", "sliced+tiled")
FULL_SIZE = 1440
MIB = 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def decode_once(mode: str, size: int, batch: int, dtype_name: str) -> dict:
    """In this process: build the real-width VAE, decode one batch in `mode`, report the decode's peak."""
    import torch
    from diffusers import AutoencoderKL

    from flux.vae import TILE_PX, configure_vae
    from weights.real_configs import VAE

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    vae = AutoencoderKL(**VAE).to(dtype).eval()
    if mode != "whole":
        configure_vae(vae, tiling=mode == "sliced+tiled", tile_px=max(8, round(TILE_PX * size / FULL_SIZE / 8) * 8))
    latents = torch.randn(batch, VAE["latent_channels"], size // 8, size // 8, dtype=dtype)
    before, peak_before = current_rss(), peak_rss()
    started = time.perf_counter()
    with torch.inference_mode():
        vae.decode(latents)
    return dict(peak_bytes=peak_rss() - before, seconds=time.perf_counter() - started, lower_bound=peak_before > before)


def run_child(mode: str, size: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--sizes", str(size), "--batch", str(args.batch),
               "--dtype", args.dtype]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def at_full_size(peaks: dict[int, int]) -> float:
    """The line a + b * pixels through the two largest sizes measured, at 1440x1440."""
    (small, low), (large, high) = sorted(peaks.items())[-2:]
    slope = (high - low) / (large**2 - small**2)
    return high + slope * (FULL_SIZE**2 - large**2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,720", help="image sides in pixels, multiples of 8 (default 512,720)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes, modes = [int(s) for s in args.sizes.split(",")], args.modes.split(",")
    if args.child:
        print(json.dumps(decode_once(args.child, sizes[0], args.batch, args.dtype)))
        return 0

    print(f"VAE decode at FLUX.1's real widths, random weights, {args.batch} images, {args.dtype}, CPU", flush=True)
    peaks: dict[str, dict[int, int]] = {mode: {} for mode in modes}
    for size in sizes:
        for mode in modes:  # each line as it lands
            result = run_child(mode, size, args)
            peaks[mode][size] = result["peak_bytes"]
            whole = peaks.get("whole", {}).get(size)
            ratio = f"{result['peak_bytes'] / whole:5.2f} of whole" if whole else ""
            note = "  (peak RSS was higher before the decode: a lower bound)" if result["lower_bound"] else ""
            print(f"  {size}x{size} {mode:<13} peak {result['peak_bytes'] / MIB:7.0f} MiB  {result['seconds']:6.1f} s  {ratio}{note}", flush=True)
    if len(sizes) > 1:
        full = {mode: at_full_size(by_size) for mode, by_size in peaks.items()}
        for mode, peak in full.items():
            ratio = f"{peak / full['whole']:5.2f} of whole" if "whole" in full else ""
            print(f"  1440x1440 {mode:<13} peak {peak / MIB:7.0f} MiB  (linear in pixels from {sizes[-2]} and {sizes[-1]})  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
