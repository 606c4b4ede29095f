"""`bench/benchmark --load`: setup's memory and load speed at the real widths, on CPU.

P7  setup's peak RSS, less that of a bare interpreter with the same imports, over the bytes of the parameters
    and buffers of the modules it holds (fp32 on CPU).                                   Goal <= 1.3
P8  load throughput (the .safetensors bytes setup loads / the seconds setup takes after its imports) over a
    plain read of the same files in 8 MiB chunks.                                         Goal >= 0.7
    Also printed, to tell the loader's own cost from the memory it must fill: the same tensors read and cast to
    the load's dtype and nothing else, and the same fresh memory only allocated and filled (no read at all).
P8b the same in bf16, the dtype a GPU runs (FLUX_DTYPE=bf16): no cast, so no fresh fp32 memory to fill; the load
    is timed until every byte it holds has been touched once (a bf16 load maps the files' pages).  Goal >= 0.7

The weights are the real-width folder (tests/fixtures/real_width_folder.py: real configs, 1 double + 1 single
block + 1 T5 layer), built on first use. Every side runs in a fresh process (Predictor.setup, as cog runs it),
interleaved, and the medians are used. The page cache is shared with whatever else runs on the machine, so it
is not dropped: one unmeasured read warms it and every side then reads warm.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 8 << 20
SIDES = ("setup", "setup-bf16", "bare", "read", "cast", "fill")


def main(repeats: int) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.real_width_folder import real_width_root

    root = real_width_root()
    files = sorted(root.rglob("*.safetensors"))
    file_bytes = sum(file.stat().st_size for file in files)
    print(f"real-width folder {root}: {len(files)} .safetensors files, {file_bytes / 1e9:.2f} GB; "
          f"{repeats} repeats, interleaved, warm page cache", flush=True)
    child(root, "read")  # warms the page cache
    runs: dict[str, list[dict[str, object]]] = {side: [] for side in SIDES}
    for _ in range(repeats):
        for side in SIDES:
            runs[side].append(child(root, side))
    median = {side: medians(runs[side]) for side in SIDES}
    setup, bare = median["setup"], median["bare"]
    held_rss = setup["peak_rss"] - bare["peak_rss"]
    print(f"P7  setup peak RSS - bare interpreter's ({setup['peak_rss'] / 1e9:.2f} - {bare['peak_rss'] / 1e9:.2f} GB)"
          f" / parameter bytes ({setup['held_bytes'] / 1e9:.2f} GB) -> {held_rss / setup['held_bytes']:5.2f}  (goal <= 1.3)")
    print(f"P8  load {file_bytes / setup['load_s'] / 1e9:.2f} GB/s ({setup['load_s']:.2f}s) / plain read "
          f"{file_bytes / median['read']['read_s'] / 1e9:.2f} GB/s ({median['read']['read_s']:.2f}s) "
          f"-> {median['read']['read_s'] / setup['load_s']:5.2f}  (goal >= 0.7)")
    bf16 = median["setup-bf16"]
    print(f"P8b load in bf16, every byte touched, {file_bytes / bf16['load_s'] / 1e9:.2f} GB/s ({bf16['load_s']:.2f}s) / "
          f"plain read -> {median['read']['read_s'] / bf16['load_s']:5.2f}  (goal >= 0.7; the safety models stay fp32)")
    read_s, cast_s, fill_s = median["read"]["read_s"], median["cast"]["cast_s"], median["fill"]["fill_s"]
    print(f"    floors: every tensor read and cast to {runs['setup'][0]['dtype']} into fresh memory {cast_s:.2f}s (load / that "
          f"{setup['load_s'] / cast_s:.2f}); the same fresh memory only filled, nothing read, {fill_s:.2f}s (plain read / "
          f"that {read_s / fill_s:.2f}); imports {setup['imports_s']:.2f}s (not in P8)")
    return 0


def medians(runs: list[dict[str, object]]) -> dict[str, float]:
    """Each figure's median over the runs (and each run's figures, printed)."""
    numbers = {key: [run[key] for run in runs] for key, value in runs[0].items() if isinstance(value, float)}
    print("    " + ", ".join(f"{key} {' '.join(f'{v:.3g}' for v in values)}" for key, values in numbers.items()), flush=True)
    return {key: statistics.median(values) for key, values in numbers.items()}


def child(root: Path, side: str) -> dict[str, float]:
    """One side in a fresh process; its figures are the last line it prints (setup logs before it)."""
    env = {**os.environ, "FLUX_WEIGHTS": "real", "FLUX_WEIGHTS_DIR": str(root)}
    if side == "setup-bf16":
        env["FLUX_DTYPE"] = "bf16"
    done = subprocess.run([sys.executable, __file__, "--child", side, str(root)], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(side: str, root: Path) -> dict[str, object]:
    if side == "read":
        return {"read_s": plain_read(root)}
    started = time.perf_counter()
    product_imports()
    imports_s = time.perf_counter() - started
    if side == "bare":
        return {"peak_rss": peak_rss()}
    if side in ("cast", "fill"):
        from flux.pipelines import pick_device, pick_dtype

        return {f"{side}_s": fresh_copies(root, pick_dtype(pick_device()), read=side == "cast")}
    from predict import Predictor

    predictor = Predictor()
    started = time.perf_counter()
    predictor.setup()
    if side == "setup-bf16":
        touch_every_byte(predictor.generator)
    load_s = time.perf_counter() - started
    return {"imports_s": imports_s, "load_s": load_s, "peak_rss": peak_rss(),
            "held_bytes": held_bytes(predictor.generator), "dtype": str(predictor.generator.dtype).removeprefix("torch.")}


def product_imports() -> None:
    """What a cog worker has imported before setup's loads start: predict.py, and what setup imports."""
    import predict  # noqa: F401  (cog)
    from weights.libraries import prepare_libraries

    prepare_libraries()
    import flux.generate  # noqa: F401
    import lora.download.redaction  # noqa: F401
    import safety.checker  # noqa: F401


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def held_modules(generator) -> list:
    pipelines = generator.pipelines
    modules = [generator.safety.stage1_model, generator.safety.stage2_model]
    for variant in pipelines.resident:
        modules += [c for c in pipelines.get(variant, "txt2img").components.values() if hasattr(c, "named_buffers")]
    return modules


def held_bytes(generator) -> float:
    """Bytes of every parameter and buffer of the modules the generator holds, each storage once."""
    storages = {}
    for module in held_modules(generator):
        for tensor in [*module.parameters(), *module.buffers()]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return float(sum(storages.values()))


def touch_every_byte(generator) -> None:
    """Read every held tensor once: a load that maps the files has read nothing until its pages are touched."""
    for module in held_modules(generator):
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.detach().view(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one element per page


def plain_read(root: Path) -> float:
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    for file in sorted(root.rglob("*.safetensors")):
        with open(file, "rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass
    return time.perf_counter() - started


def fresh_copies(root: Path, dtype, *, read: bool) -> float:
    """Every tensor of every file in `dtype`, in fresh memory, and kept: read and cast (the bytes a load must write,
    and no more), or only allocated and filled (what that fresh memory costs with nothing read)."""
    import torch
    from safetensors import safe_open

    kept, started = [], time.perf_counter()
    for file in sorted(root.rglob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if read:
                    kept.append(handle.get_tensor(name).to(dtype))
                else:
                    kept.append(torch.ones(handle.get_slice(name).get_shape(), dtype=dtype))
    return time.perf_counter() - started


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_child(sys.argv[2], Path(sys.argv[3]))))
