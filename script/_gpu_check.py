"""The GPU check (script/gpu_check): full-size synthetic FLUX.1 on one CUDA device, through the product's own code.

No weight files and no network: weights/synthetic's SyntheticStore makes both transformers, T5 XXL, CLIP and the
VAE on the GPU (the safety models are written to a scratch folder, about 0.8 GB, because safety/checker.py loads
folders). flux.generate.FluxGenerator then runs as under Predictor/FastPredictor: the same pipelines, fp8
build, LoRA fusers and compile_for_serving. Stages, cheapest first; each figure is printed and OUT/gpu_check.json
rewritten as it lands, so a run cut short keeps what it measured:
1. device (torch.cuda's facts; nvidia-smi's line too where it is installed), torch, CUDA and cuDNN versions, free
   memory, and the allocator settings (cog.yaml's `environment:`, set here as in the image unless already set);
2. setup phases: shared components, bf16 and fp8 builds, safety checker; later compile + warm-up per model;
3. dev (28 steps) and schnell (4 steps) at 1024x1024: bf16 eager, fp8 eager, fp8 compiled, each without and with
   a synthetic full-coverage rank-16 LoRA; median of 3 (1 with --quick) after one unmeasured run, with the text
   encoding, denoise, VAE decode and safety phases (script/_benchmark_phases.py's clock);
4. the switch between two cached LoRAs per variant (LoraState.prepare, as a request runs it);
5. peak GPU memory per row, and graphs Dynamo compiled during a row after the warm-up (0 = no recompile);
   a row is "compiled" only if its transformer's blocks are (a compile that failed says so, and runs eagerly);
6. the VAE decoding 4 images at 1440x1440: time and peak memory.
--cpu runs every stage on the 1/1/1 real-width model in bf16 at 128x128 with one step (requests are shrunk after
validation, as no preset is that small; one variant resident, the others built when their rows start; nothing
compiles on CPU, so no compiled rows), so the script is tested where there is no GPU. CPU figures say nothing
about a GPU. --smoke runs each stage once (one step, one run, none unmeasured first; its times are not measurements:
tests/test_gpu_check_simulated.py runs it on a simulated H100); --no-compile or FLUX_COMPILE=0: no compiled rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of TOK riding a bicycle in a park"
VARIANTS = ("dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8")


class Report:
    """Prints each figure and rewrites OUT/gpu_check.json (atomically) with every figure so far."""

    def __init__(self, out: Path):
        self.path, self.records, self.started = out / "gpu_check.json", [], time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, stage: str, line: str, **figures: object) -> None:
        print(line, flush=True)
        self.records.append({"stage": stage, "elapsed_s": round(time.perf_counter() - self.started, 2), **figures})
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.records, indent=1) + "\n")
        partial.replace(self.path)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and repeats: full size at 1 MP on CUDA, the 1/1/1 model at 128x128 on CPU."""

    cpu: bool
    quick: bool
    smoke: bool = False  # each stage once: one step, one run, no unmeasured run first
    compile: bool = True  # whether the compiled rows run (on CUDA)

    @property
    def layers(self):
        from weights.synthetic.components import FULL_SIZE, Layers

        return Layers(1, 1, 1) if self.cpu else FULL_SIZE

    side = property(lambda self: 128 if self.cpu else 1024)
    vae_side = property(lambda self: 128 if self.cpu else 1440)
    steps = property(lambda self: {"dev": 1, "schnell": 1} if self.cpu or self.smoke else {"dev": 28, "schnell": 4})
    repeats = property(lambda self: 1 if self.quick or self.smoke else 3)
    warm_runs = property(lambda self: 0 if self.smoke or (self.cpu and self.quick) else 1)

    def no_compile_reason(self) -> str | None:
        """Why the compiled rows are left out, or None when they run."""
        return "nothing compiles on CPU" if self.cpu else None if self.compile else "--no-compile or FLUX_COMPILE=0"


def set_cog_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """cog.yaml's `environment:` (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), as the deployed image has it,
    except the variables the user set. Call before torch is imported: its CUDA allocator reads them once.
    Returns what it set."""
    from script.cog_inputs import cog_environment

    missing = {name: value for name, value in cog_environment().items() if name not in environ}
    environ.update(missing)
    return missing


def nvidia_smi_line() -> str | None:
    """nvidia-smi's view of the GPU (driver, power limit, clocks), or None where it is not installed or fails:
    a container may have the driver's libraries without the tool."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def configure_environment(plan: Plan, workdir: Path) -> None:
    """Settings the product reads, before it is imported: all four variants resident, built eagerly (the compiled
    rows compile later, in stage 3), LoRAs from the scratch folder, nothing cached outside it."""
    os.environ.update({
        # on CPU one resident variant and the others built when their rows start (the product's on-demand path,
        # one at a time), so the run fits in a few GB of memory
        "FLUX_RESIDENT_VARIANTS": VARIANTS[0] if plan.cpu else ",".join(VARIANTS),
        "FLUX_COMPILE": "0",
        "FLUX_LORA_LOCAL_DIRS": str(workdir / "loras"),
        "FLUX_LORA_CACHE_DIR": str(workdir / "lora-cache"),
        "FLUX_COMPILE_CACHE_DIR": str(workdir / "compile-cache"),
    })
    if plan.cpu:
        os.environ["FLUX_DTYPE"] = "bf16"  # on this CPU class bf16 matmuls are ~5x fp32's, and half the memory


def device_stage(report: Report) -> None:
    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if not torch.cuda.is_available():
        report.add("device", f"device: CPU ({torch.get_num_threads()} threads), torch {versions['torch']}", **versions)
        return
    free, total = torch.cuda.mem_get_info()
    card = torch.cuda.get_device_properties()
    facts = {"name": card.name, "capability": f"{card.major}.{card.minor}", "multiprocessors": card.multi_processor_count,
             "cudnn": torch.backends.cudnn.version(), "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}
    report.add("device", f"device: {card.name} (compute {facts['capability']}, {card.multi_processor_count} SMs), torch "
               f"{versions['torch']}, CUDA {versions['cuda']}, cuDNN {facts['cudnn']}, {facts['free_gib']:.1f} of "
               f"{facts['total_gib']:.1f} GiB free, PYTORCH_CUDA_ALLOC_CONF={versions['alloc_conf']}", **facts, **versions)
    if line := nvidia_smi_line():
        report.add("device", f"nvidia-smi: {line}", nvidia_smi=line)


def setup_stage(report: Report, plan: Plan, workdir: Path):
    """The FluxGenerator on synthetic weights, each setup phase timed by the product functions it runs."""
    import torch

    import flux.generate
    import flux.pipelines
    from safety.checker import SafetyChecker
    from script._benchmark_phases import PhaseClock
    from weights.locations import WeightPaths
    from weights.synthetic.store import SyntheticStore

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    store = SyntheticStore(workdir, plan.layers)
    started = time.perf_counter()
    safety = store.write_safety_folders("cuda" if torch.cuda.is_available() else "cpu")
    report.add("setup", f"setup: safety models written in {time.perf_counter() - started:.2f}s",
               phase="safety files", seconds=round(time.perf_counter() - started, 3))
    clock = PhaseClock(sync)
    clock.wrap(SyntheticStore, "shared_components", "text encoders + VAE")
    clock.wrap(flux.pipelines, "flux_transformer", "bf16 builds")
    clock.wrap(flux.pipelines, "build_fp8_transformer", "fp8 builds")
    clock.wrap(SafetyChecker, "load", "safety load")
    paths = WeightPaths(dev=workdir, schnell=workdir, safety_stage1=safety["safety_stage1"],
                        safety_stage2=safety["safety_stage2"], tiny=False)
    built: dict[str, object] = {}
    try:
        seconds = clock.run(lambda: built.setdefault("generator", flux.generate.FluxGenerator(paths, store=store)))
    finally:
        clock.restore()
    for phase, value in seconds.items():
        report.add("setup", f"setup: {phase} {value:.2f}s", phase=phase, seconds=round(value, 3))
    generator = built["generator"]
    resident = [str(v) for v in generator.pipelines.resident]
    report.add("setup", f"setup: resident {', '.join(resident)} ({store})", resident=resident)
    return generator, store


def build_stage(report: Report, generator, variant: str) -> None:
    """A variant that is not resident is built when first asked for (dropping the last one built so)."""
    if generator.pipelines.is_loaded(variant):
        return
    started = time.perf_counter()
    generator.pipelines.transformer(variant)
    seconds = time.perf_counter() - started
    report.add("setup", f"setup: built {variant} on demand in {seconds:.2f}s", phase=f"build {variant}",
               seconds=round(seconds, 3))


def compile_stage(report: Report, generator, model: str):
    """compile_for_serving on the model's fp8 pipeline, as setup runs it for a resident fp8 variant; its
    CompileReport (compiled=False: the compile failed and the transformer runs eagerly, as logged)."""
    from flux.fast.compile import compile_for_serving
    from flux.pipelines import MAX_SEQUENCE_LENGTH

    os.environ["FLUX_COMPILE"] = "1"
    started = time.perf_counter()
    pipe = generator.pipelines.get(f"{model}-fp8", "txt2img")
    result = compile_for_serving(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH[model], label=f"FLUX {model}-fp8")
    seconds = time.perf_counter() - started
    report.add("setup", f"setup: compile + warm-up {model}-fp8 {seconds:.1f}s ({result})", phase=f"compile {model}-fp8",
               seconds=round(seconds, 2), **dataclasses.asdict(result))
    return result


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Whether a row ran compiled, read from its transformer, and whether a compile was asked for and failed."""

    compiled: bool
    failed: bool

    @classmethod
    def of(cls, transformer, compile_report=None) -> Compiled:
        """compile_report: compile_stage's CompileReport for the rows meant to run compiled, None for eager rows."""
        from flux.fast.compile import is_compiled

        return cls(is_compiled(transformer), compile_report is not None and not compile_report.compiled)

    def label(self, variant: str) -> str:
        if self.compiled:
            return f"{variant} compiled"
        return f"{variant} eager (compile failed)" if self.failed else variant


# --- stage 3-5: the rows --------------------------------------------------------------------------------------

class Rows:
    """Predictions through FluxGenerator.run, timed by phase (script/_benchmark_phases.py's clock)."""

    def __init__(self, report: Report, plan: Plan, generator, loras: list[str]):
        import torch

        from script._benchmark_phases import product_phase_clock

        self.report, self.plan, self.generator, self.loras = report, plan, generator, loras
        self.cuda = torch.cuda.is_available()
        self.clock = product_phase_clock(torch.cuda.synchronize if self.cuda else (lambda: None))

    def request(self, model: str, go_fast: bool, lora: str | None):
        from flux.request import LIMITS, build_request

        request = build_request(prompt=PROMPT, model=model, go_fast=go_fast, num_inference_steps=self.plan.steps[model],
                                seed=7, replicate_weights=lora, aspect_ratio="1:1", megapixels="1", limits=LIMITS)
        if self.plan.cpu:  # no preset is this small; the size is not validated again after this point
            request = dataclasses.replace(request, width=self.plan.side, height=self.plan.side)
        return request

    def row(self, model: str, go_fast: bool, compile_report, lora: str | None) -> None:
        """compile_report: compile_stage's, for a row meant to run compiled; None for an eager row."""
        import torch
        from torch._dynamo.utils import counters

        variant = f"{model}-{'fp8' if go_fast else 'bf16'}"
        compiled = Compiled.of(self.generator.pipelines.transformer(variant), compile_report)
        label = compiled.label(variant)
        request = self.request(model, go_fast, lora)
        for _ in range(self.plan.warm_runs):
            self.generator.run(request)  # unmeasured: fetches and converts the LoRA
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        graphs = counters["stats"]["unique_graphs"]
        runs = [self.clock.run(lambda: self.generator.run(request)) for _ in range(self.plan.repeats)]
        medians = {phase: round(statistics.median(run.get(phase, 0.0) for run in runs), 3)
                   for phase in ("lora", "text", "denoise", "vae", "safety", "total")}
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None
        recompiled = counters["stats"]["unique_graphs"] - graphs
        line = (f"{label:<21}{request.num_inference_steps:>4} steps  LoRA {'yes' if lora else 'no ':<4}"
                + "".join(f" {phase} {value:7.3f}" for phase, value in medians.items())
                + f"  peak {peak if peak is not None else '-'} GiB  graphs compiled {recompiled}")
        self.report.add("row", line, variant=variant, compiled=compiled.compiled, compile_failed=compiled.failed,
                        lora=bool(lora), steps=request.num_inference_steps, size=[request.width, request.height],
                        runs=len(runs), warm_runs=self.plan.warm_runs,
                        median_s=medians, peak_gib=peak, graphs_compiled=recompiled)

    def switch(self, model: str, go_fast: bool, compile_report) -> None:
        """Seconds of LoraState.prepare going from one cached LoRA to the other (both fetched and converted)."""
        from flux.variants import Variant

        variant = Variant(model, "fp8" if go_fast else "bf16")
        requests = [self.request(model, go_fast, lora) for lora in self.loras]
        if self.plan.smoke:  # once, to the second LoRA, fetched and converted inside the switch
            targets = requests[1:]
        else:
            self.generator.loras.prepare(requests[1], variant)  # converts the second LoRA once
            targets = [requests[i % 2] for i in range(1 if self.plan.quick else 2 * self.plan.repeats)]
        times = [self.clock.run(lambda r=r: self.generator.loras.prepare(r, variant))["total"] for r in targets]
        compiled = Compiled.of(self.generator.pipelines.transformer(variant), compile_report)
        median = round(statistics.median(times), 3)
        self.report.add("switch", f"switch {compiled.label(str(variant))}: {median:.3f}s (median of {len(times)})",
                        variant=str(variant), compiled=compiled.compiled, compile_failed=compiled.failed,
                        median_s=median, runs=len(times))


# --- stage 6 and the whole run --------------------------------------------------------------------------------

def vae_stage(report: Report, plan: Plan, generator) -> None:
    """The shared VAE decoding a batch of 4 latents at vae_side² (the largest request: 4 outputs, 1440x1440)."""
    import torch

    vae, cuda = generator.pipelines.vae, torch.cuda.is_available()
    latents = torch.randn(4, vae.config.latent_channels, plan.vae_side // 8, plan.vae_side // 8,
                          device=vae.device, dtype=vae.dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            vae.decode(latents, return_dict=False)
    except torch.OutOfMemoryError as error:
        report.add("vae", f"vae: 4 x {plan.vae_side}x{plan.vae_side} ran out of memory: {error}", out_of_memory=True)
        return
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2) if cuda else None
    report.add("vae", f"vae: 4 x {plan.vae_side}x{plan.vae_side} decoded in {seconds:.2f}s, peak above the "
               f"models {peak if peak is not None else '-'} GiB", side=plan.vae_side, seconds=round(seconds, 3),
               peak_above_models_gib=peak)


def run(plan: Plan, out: Path) -> None:
    """Every stage; the scratch folder (safety models, LoRAs: 0.8 to 1.4 GB) goes when it ends, however it ends."""
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        configure_environment(plan, workdir)
        report = Report(out)
        device_stage(report)
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
        from script._benchmark_phases import synthetic_loras  # its module imports no library
        from weights.libraries import prepare_libraries

        prepare_libraries()
        generator, store = setup_stage(report, plan, workdir)
        (workdir / "loras").mkdir()
        loras = synthetic_loras(store.meta_transformer("dev"), workdir / "loras")
        rows = Rows(report, plan, generator, loras)
        try:
            run_rows(report, plan, generator, rows)
        finally:
            rows.clock.restore()
        vae_stage(report, plan, generator)
        smoke = " (--smoke: each stage once, the times are not measurements)" * plan.smoke
        report.add("done", f"done in {time.perf_counter() - report.started:.1f}s{smoke}; figures in {report.path}", smoke=plan.smoke)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_rows(report: Report, plan: Plan, generator, rows: Rows) -> None:
    """Stages 3-5 per model: bf16 eager, fp8 eager, fp8 compiled (unless plan says no), without and with a LoRA."""
    for model in ("dev", "schnell"):
        for go_fast, compiled in ((False, False), (True, False), (True, True)):
            compile_report = None
            if compiled:
                if reason := plan.no_compile_reason():
                    report.add("setup", f"setup: no compiled rows for {model}-fp8 ({reason})", skipped=f"{model}-fp8 compiled",
                               reason=reason)
                    continue
                compile_report = compile_stage(report, generator, model)
            else:
                build_stage(report, generator, f"{model}-{'fp8' if go_fast else 'bf16'}")
            rows.row(model, go_fast, compile_report, None)
            rows.row(model, go_fast, compile_report, rows.loras[0])
            rows.switch(model, go_fast, compile_report)


def main(argv: list[str]) -> int:
    set_cog_environment(os.environ)  # first: before anything imports torch
    parser = argparse.ArgumentParser(prog="script/gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the 1/1/1 real-width model at 128x128 on CPU (a test)")
    parser.add_argument("--quick", action="store_true", help="one measured run per row instead of 3")
    parser.add_argument("--smoke", action="store_true", help="each stage once, briefly: one step, one run per row and "
                        "switch, none unmeasured first (a check that everything runs; its times are not measurements)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows (also when FLUX_COMPILE=0 "
                        "is set): for a machine where torch.compile cannot run")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / ".cache" / "gpu-check"),
                        help="where gpu_check.json goes (default: $OUT, else .cache/gpu-check)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device; --cpu runs the check on the CPU")
    import settings

    compiles = not args.no_compile and settings.flag("FLUX_COMPILE")  # the user's, before the check sets it for setup
    run(Plan(cpu=args.cpu, quick=args.quick, smoke=args.smoke, compile=compiles), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
