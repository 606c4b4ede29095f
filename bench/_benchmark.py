"""CPU benchmark on the tiny weights. Every figure is a ratio of two timings taken in this one run.

P1  run() end to end (safety + encoding included) / a bare diffusers FluxPipeline call
    (1024x1024, 4 steps, 1 output).                                                        Goal <= 1.10
P2  request with an already-fused LoRA / the same request without LoRA.                    Goal <= 1.05
P3  requests alternating two cached LoRAs / requests without LoRA.                         Goal <= 1.20
P4  parallel ranged download / single stream, local server throttled per connection.       Goal >= 3.5x
P5  cold setup (fresh process: import predict + Predictor.setup) / cold bare
    (fresh process: import diffusers + FluxPipeline.from_pretrained).                      Goal <= 1.3
    Also printed: the same two without process start and imports (warm, in-process).
P6  HTTP round trip through coglet / in-process run().                                     Goal <= 1.10
The two sides of each ratio are interleaved and the medians of the repeats are used, as this machine is noisy.

--gpu prints per-phase times of real predictions instead (script/_benchmark_phases.py): on CUDA with the real
weights; without CUDA the same table on the tiny weights, smaller. --memory-plan prints the GPU memory plans of
every deployed class on 12, 16, 24, 48, 80 and 141 GiB (flux/fast/memory.py), --memory-plan --json as one JSON object.
--load prints P7 (setup's peak RSS / the bytes it holds) and P8 (load throughput / a plain read of the same files)
at the real widths on CPU, each side in a fresh process (bench/_benchmark_load.py).
--multi-lora N prints the fused-once figure of MultiLoraPredictor at real widths on CPU: fusing N LoRAs on the same
Linears / fusing one (goal for 4: <= 1.5), beside the floors of one pass and of a pass per LoRA
(bench/_lora_switch.py; 1 double block, about 3.5 GB).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of TOK riding a bicycle"
REQUEST = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 1, "guidance_scale": 3.5}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(repeats: int, ours: Callable[[], object], base: Callable[[], object]) -> tuple[float, float]:
    ours_times, base_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(ours))
        base_times.append(timed(base))
    return statistics.median(ours_times), statistics.median(base_times)


def report(goal_id: str, label: str, ours: float, base: float, goal: str, inverse: bool = False) -> None:
    ratio = base / ours if inverse else ours / base
    print(f"{goal_id}  {label:<60} {ours:8.3f}s vs {base:8.3f}s -> {ratio:5.2f}{'x' if inverse else ''}  (goal {goal})", flush=True)


def cold_process(code: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, env={**os.environ, "FLUX_WEIGHTS": "tiny"})

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="per figure (default: 5; --gpu: 3 on CUDA, 2 on CPU; --load: 3)")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="per-phase times of real predictions (see above)")
    parser.add_argument("--lora", action="append", help="--gpu: a LoRA file (twice for the switch; default: synthetic)")
    parser.add_argument("--dev-steps", type=int, help="--gpu: dev steps (default: 28 on CUDA, 4 on CPU)")
    parser.add_argument("--schnell-steps", type=int, help="--gpu: schnell steps (default: 4 on CUDA, 2 on CPU)")
    parser.add_argument("--memory-plan", action="store_true", help="print the GPU memory plans and stop")
    parser.add_argument("--json", action="store_true", help="--memory-plan: one JSON object instead of tables")
    parser.add_argument("--load", action="store_true", help="P7 and P8 at real widths on CPU, and stop (see above)")
    parser.add_argument("--multi-lora", type=int, metavar="N", help="fusing N LoRAs / one at real widths, and stop")
    args = parser.parse_args()
    if args.multi_lora:
        from script import _lora_switch

        _lora_switch.multi_lora(args.multi_lora, args.repeats or 5)
        return 0
    if args.memory_plan:
        return print_memory_plan(args.json)
    if args.load:
        from script import _benchmark_load

        return _benchmark_load.main(args.repeats or 3)
    if args.gpu:
        from script import _benchmark_phases

        return _benchmark_phases.main(args)
    args.repeats = args.repeats or 5
    os.environ["FLUX_WEIGHTS"] = "tiny"
    os.environ.setdefault("FLUX_LORA_LOCAL_DIRS", tempfile.gettempdir())  # the benchmark's LoRAs are local files

    import torch
    from diffusers import FluxPipeline

    from predict import Predictor
    from script.cog_inputs import predict_with_defaults
    from weights.locations import tiny_weight_paths

    weights = tiny_weight_paths()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny weights in {weights.dev.parent}", flush=True)

    # --- P1: end to end vs bare pipeline ---
    predictor = Predictor()
    predictor.setup()
    logging.disable(logging.INFO)  # keep step logs out of the figures
    bare = FluxPipeline.from_pretrained(weights.dev, dtype=torch.float32)
    bare.set_progress_bar_config(disable=True)

    def bare_call() -> None:
        bare(prompt=PROMPT, width=1024, height=1024, num_inference_steps=4, guidance_scale=3.5,
             generator=[torch.Generator("cpu").manual_seed(1)], max_sequence_length=512)

    def our_predict(**extra: object) -> Callable[[], None]:
        return lambda: predict_with_defaults(predictor, **REQUEST, **extra)

    bare_call(), our_predict()()  # warm-up
    report("P1", "run() end to end / bare FluxPipeline call", *interleave(args.repeats, our_predict(), bare_call), "<= 1.10")

    # --- P2, P3: LoRAs ---
    from tests.fixtures.lora_factory import make_spec, write_layout

    with tempfile.TemporaryDirectory() as tmp:
        pipelines = predictor.generator.pipelines
        loras = []
        for seed in (1, 2):
            spec = make_spec(pipelines.transformer("dev"), pipelines.text_encoder, rank=16, seed=seed)
            loras.append(str(write_layout("kohya", spec, pipelines.transformer("dev"), Path(tmp) / f"lora{seed}.safetensors")))
        with_lora = our_predict(replicate_weights=loras[0])
        with_lora()  # fetch, convert and fuse once
        report("P2", "request with an already-fused LoRA / no LoRA", *interleave(args.repeats, with_lora, our_predict()), "<= 1.05")
        our_predict(replicate_weights=loras[1])()  # both cached
        turn = iter(range(10**6))

        def alternate() -> None:
            our_predict(replicate_weights=loras[next(turn) % 2])()

        report("P3", "alternating two cached LoRAs / no LoRA", *interleave(args.repeats, alternate, our_predict()), "<= 1.20")
    predict_with_defaults(predictor, **REQUEST)  # back to no LoRA

    # --- P4: downloads ---
    from bench.bench_download import measure_p4

    p4 = measure_p4(connections=4)
    report("P4", "single stream / 4 ranged connections (24 MiB, 6 MiB/s each)", p4["parallel_s"], p4["single_stream_s"], ">= 3.5x", inverse=True)

    # --- P5: setup ---
    cold_ours = cold_process("from predict import Predictor; Predictor().setup()")
    cold_bare = cold_process(
        "import torch; from diffusers import FluxPipeline; "
        f"FluxPipeline.from_pretrained({str(weights.dev)!r}, dtype=torch.float32)"
    )
    report("P5", "cold: fresh process + setup / fresh process + from_pretrained", *interleave(max(3, args.repeats // 2), cold_ours, cold_bare), "<= 1.3")
    warm_ours, warm_bare = [], []
    for _ in range(args.repeats):
        fresh = Predictor()
        warm_ours.append(timed(fresh.setup))  # ready to serve both models: every resident variant is built in setup
        logging.disable(logging.INFO)
        warm_bare.append(timed(lambda: FluxPipeline.from_pretrained(weights.dev, dtype=torch.float32)))
    report("  ", "warm: Predictor.setup() / FluxPipeline.from_pretrained", statistics.median(warm_ours), statistics.median(warm_bare), "(info)")

    # --- P6: HTTP ---
    if not args.skip_http:
        from tests.fixtures.cog_server import start_cog_server, stop_cog_server

        with tempfile.TemporaryDirectory() as tmp:
            server = start_cog_server(Path(tmp))
            try:
                overheads = []

                def http_call() -> None:
                    started = time.perf_counter()
                    body = server.predict(input=REQUEST).json()
                    assert body["status"] == "succeeded", body
                    overheads.append(time.perf_counter() - started - body["metrics"]["predict_time"])

                http_call()
                report("P6", "HTTP round trip through coglet / in-process run()", *interleave(args.repeats, http_call, our_predict()), "<= 1.10")
                print(f"    HTTP + coglet overhead per request (wall - server predict_time): {statistics.median(overheads) * 1000:.1f} ms")
            finally:
                stop_cog_server(server)
    return 0


# --- --memory-plan: the GPU memory plans (flux/fast/memory.py) as tables or JSON ----------------------------

def print_memory_plan(as_json: bool, sizes=None) -> int:
    """Each deployed class on each GPU of memory.GPU_SIZES_GIB: docs/gpus.md's tables, or one JSON object
    {"<GiB>": {"<class>": {"fits": ..., "error": ..., "resident": [...], ...}}}. sizes: real_sizes() (flux/fast/sizes.py)."""
    from flux.fast import memory
    from flux.fast.sizes import real_sizes

    sizes = sizes or real_sizes()
    plans = memory.plans_by_gpu(sizes)
    if as_json:
        print(json.dumps({str(gpu): {name: plan_json(plan) for name, plan in by_class.items()} for gpu, by_class in plans.items()}, indent=2))
        return 0
    print(sizes_table(sizes) + "\n\n" + summary_table(plans))
    for gpu, by_class in plans.items():
        for name, plan in by_class.items():
            if not plan.fits:
                print(f"\n{gpu} GiB, {name}: {plan.error}")
    return 0


def sizes_table(sizes) -> str:
    """Markdown: component, dtype, GiB."""
    from flux.fast.memory import gib

    rows = ["| component | dtype | GiB |", "|---|---|---|"]
    for variant, size in sizes.variants.items():
        model, precision = variant.split("-")
        rows.append(f"| FLUX.1 {model} transformer | {precision} | {gib(size)} |")
    for name, size in sizes.shared.items():
        component, _, dtype = name.rpartition(" (")
        rows.append(f"| {component} | {dtype.rstrip(')')} | {gib(size)} |")
    rows.append(f"| shared components together | | {gib(sizes.shared_total)} |")
    for variant, size in sizes.lora_originals.items():
        rows.append(f"| originals kept for a LoRA on every Linear of {variant} and CLIP | bf16 | {gib(size)} |")
    return "\n".join(rows)


def summary_table(plans) -> str:
    """Markdown: one row per GPU size and class."""
    from flux.fast.memory import LAZY, RESIDENT, UNAVAILABLE, gib

    rows = ["| GPU GiB | class | fits | resident | built when asked for | unavailable | T5 | streamed per step GiB | LoRA originals GPU / host GiB (at worst) | serving peak / budget GiB | pinned host GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for gpu, by_class in plans.items():
        for name, plan in by_class.items():
            listed = " | ".join(", ".join(plan.variants(where)) or "—" for where in (RESIDENT, LAZY, UNAVAILABLE))
            if plan.fits:
                streamed = ", ".join(f"{v} {gib(n)}" for v, n in plan.streamed_bytes.items()) or "—"
                rest = (f"{plan.t5} | {streamed} | {gib(plan.lora_originals_gpu)} / {gib(plan.lora_originals_host)} | "
                        f"{gib(plan.peak)} / {gib(plan.budget)} | {gib(plan.host_pinned)}")
            else:
                rest = f"— | — | — | — / {gib(plan.budget)} | —"
            rows.append(f"| {gpu} | {name} | {'yes' if plan.fits else '**no**'} | {listed} | {rest} |")
    return "\n".join(rows)


def plan_json(plan) -> dict[str, object]:
    """One plan for --json: its decisions, and its byte counts in GiB."""
    from flux.fast.memory import GIB, LAZY, RESIDENT, UNAVAILABLE

    def in_gib(count: int) -> float:
        return round(count / GIB, 2)

    return dict(
        fits=plan.fits, error=plan.error, resident=plan.variants(RESIDENT), lazy=plan.variants(LAZY),
        unavailable=plan.variants(UNAVAILABLE), t5=plan.t5, vae_tiling=plan.vae_tiling, lora_originals=plan.lora_originals,
        lora_originals_gpu_gib=in_gib(plan.lora_originals_gpu), lora_originals_host_gib=in_gib(plan.lora_originals_host),
        host_pinned_gib=in_gib(plan.host_pinned), budget_gib=in_gib(plan.budget), peak_gib=in_gib(plan.peak),
        slot_gib=in_gib(plan.slot), activations_gib=in_gib(plan.activations), setup_peak_gib=in_gib(plan.setup_peak),
        max_bf16_copies=plan.max_bf16_copies,
        streamed_gib={variant: in_gib(nbytes) for variant, nbytes in plan.streamed_bytes.items()},
    )


if __name__ == "__main__":
    sys.exit(main())
