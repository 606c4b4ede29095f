"""Per-phase times of real predictions (`bench/benchmark --gpu`): dev at 28 steps and schnell at 4, at 1 MP, in
bf16 and go_fast, with and without a LoRA; the switch time between two cached LoRAs; peak GPU memory.

On CUDA it takes the real weights (FLUX_WEIGHTS_DIR, or the Hub cache; see README "Real weights and GPUs") and
keeps the variants the memory plan keeps for go_fast (fp8 dev and schnell resident; a bf16 variant is built when
its rows start). Without CUDA the same table runs on the tiny CPU weights, smaller (0.25 MP, 4 and 2 steps),
and says so: CPU figures say nothing about a GPU.

Phases are timed by wrapping, in this process only, the functions each phase runs (CUDA synchronised at
each edge): text encoding = the pipeline's encode_prompt, VAE decode = AutoencoderKL.decode, denoising = from
the end of text encoding to the start of decoding, safety = SafetyChecker.check, file encoding = save_images
(it runs beside the safety check, so the two overlap), LoRA = LoraState.prepare, total = Predictor.run() end to end.

Each row is the median of --repeats runs after one unmeasured run (which loads, compiles and fetches).
It lives in script/, not bench/, because script/gpu_check times its rows with the same clock.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("lora", "text", "denoise", "vae", "safety", "encode", "total")
PROMPT = "a photo of TOK riding a bicycle in a park"


@dataclass
class PhaseClock:
    """Wraps functions so that each call records (phase, start, end); `restore()` puts the originals back."""

    sync: Callable[[], None]
    marks: list[tuple[str, float, float]] = field(default_factory=list)
    _originals: list[tuple[object, str, object, bool]] = field(default_factory=list)

    def wrap(self, owner: object, name: str, phase: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)
        own = vars(owner).get(name)  # as stored (a classmethod stays one), read before `timed` replaces it

        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.marks.append((phase, started, time.perf_counter()))

        setattr(owner, name, timed)
        self._originals.append((owner, name, own, had_own))

    def restore(self) -> None:
        for owner, name, original, had_own in reversed(self._originals):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

    def run(self, call: Callable[[], object]) -> dict[str, float]:
        """Seconds per phase of one call."""
        self.marks.clear()
        self.sync()
        started = time.perf_counter()
        call()
        self.sync()
        seconds = defaultdict(float, total=time.perf_counter() - started)
        for phase, start, end in self.marks:
            seconds[phase] += end - start
        texts = [end for phase, _, end in self.marks if phase == "text"]
        decodes = [start for phase, start, _ in self.marks if phase == "vae"]
        if texts and decodes:
            seconds["denoise"] = min(decodes) - max(texts)
        return dict(seconds)


def product_phase_clock(sync: Callable[[], None]) -> PhaseClock:
    """A PhaseClock on the functions each phase of a prediction runs (see the module docstring)."""
    from diffusers import AutoencoderKL, FluxPipeline

    import flux.generate
    from flux.lora_state import LoraState
    from safety.checker import SafetyChecker

    clock = PhaseClock(sync)
    clock.wrap(FluxPipeline, "encode_prompt", "text")
    clock.wrap(AutoencoderKL, "decode", "vae")
    clock.wrap(SafetyChecker, "check", "safety")
    clock.wrap(flux.generate, "save_images", "encode")
    clock.wrap(LoraState, "prepare", "lora")
    return clock


def synthetic_loras(transformer, folder: Path) -> list[str]:
    """Two LoRAs of rank 16 on every Linear of the transformer, each B·A a few percent of a typical weight."""
    from tests.fixtures.lora_factory import make_spec, write_layout

    paths = []
    for seed in (1, 2):
        # dev's guidance embedder is left out: schnell has none, and the LoRA is used on both
        spec = make_spec(transformer, rank=16, seed=seed, magnitude=0.02).subset(lambda path: "guidance_embedder" not in path)
        paths.append(str(write_layout("diffusers", spec, transformer, folder / f"bench-lora-{seed}.safetensors")))
    return paths


def main(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["FLUX_WEIGHTS"] = "tiny"
    os.environ.setdefault("FLUX_RESIDENT_VARIANTS", "dev-fp8,schnell-fp8" if cuda else "dev-bf16,dev-fp8,schnell-bf16,schnell-fp8")
    lora_dir = Path(tempfile.mkdtemp(prefix="flux-bench-loras-"))
    # the benchmark's LoRAs are local files: allow their folders beside any the operator allows
    allowed = [os.environ.get("FLUX_LORA_LOCAL_DIRS", ""), str(lora_dir), *(str(Path(p).resolve().parent) for p in args.lora or [])]
    os.environ["FLUX_LORA_LOCAL_DIRS"] = os.pathsep.join(part for part in allowed if part)
    sys.path.insert(0, str(ROOT))

    import logging

    from errors import UserError
    from flux.fast.compile import is_compiled
    from predict import Predictor
    from script.cog_inputs import predict_with_defaults

    size = {"aspect_ratio": "1:1", "megapixels": "1" if cuda else "0.25"}
    steps = {"dev": args.dev_steps or (28 if cuda else 4), "schnell": args.schnell_steps or (4 if cuda else 2)}
    repeats = args.repeats or (3 if cuda else 2)
    predictor = Predictor()
    predictor.setup()
    generator = predictor.generator
    logging.disable(logging.INFO)  # step logs would drown the table

    if cuda:
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        print(f"device: {name} (capability {major}.{minor}), torch {torch.__version__}, real weights", flush=True)
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: TINY random weights at "
              f"{size['megapixels']} MP, dev {steps['dev']} and schnell {steps['schnell']} steps (CPU figures say "
              "nothing about a GPU; fp8 is weight-only here and nothing is compiled)", flush=True)

    loras = args.lora or synthetic_loras(generator.pipelines.transformer(generator.pipelines.resident[0]), lora_dir)
    if len(loras) < 2:
        loras = [loras[0], loras[0]]
    print(f"LoRAs: {', '.join(Path(p).name for p in loras)}; {repeats} measured runs per row (medians)\n", flush=True)

    clock = product_phase_clock(torch.cuda.synchronize if cuda else (lambda: None))

    def predict(model: str, go_fast: bool, lora: str | None) -> None:
        inputs = dict(prompt=PROMPT, model=model, go_fast=go_fast, num_inference_steps=steps[model], seed=7,
                      replicate_weights=lora, **size)
        try:
            predict_with_defaults(predictor, **inputs)
        except UserError as error:  # e.g. every image flagged by the safety checker: the phases still ran
            if "NSFW" not in str(error):
                raise

    header = f"{'variant':<13}{'steps':>6}  {'LoRA':<5}" + "".join(f"{p:>9}" for p in PHASES) + f"{'peak GiB':>10}  compiled"
    print(header + "\n" + "-" * len(header), flush=True)
    switches = []
    try:
        for model in ("dev", "schnell"):
            for go_fast in (False, True):
                variant = f"{model}-{'fp8' if go_fast else 'bf16'}"
                for lora in (None, loras[0]):
                    request = partial(predict, model, go_fast, lora)
                    request()  # unmeasured: loads, compiles, fetches and fuses
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    runs = [clock.run(request) for _ in range(repeats)]
                    peak = f"{torch.cuda.max_memory_allocated() / 1024**3:10.2f}" if cuda else f"{'-':>10}"
                    compiled = is_compiled(generator.pipelines.transformer(variant))
                    medians = "".join(f"{statistics.median(r.get(p, 0.0) for r in runs):9.3f}" for p in PHASES)
                    print(f"{variant:<13}{steps[model]:>6}  {'yes' if lora else 'no':<5}{medians}{peak}  {'yes' if compiled else 'no'}", flush=True)
                # switching between two cached LoRAs (both fetched and converted above)
                predict(model, go_fast, loras[1])
                times = [clock.run(partial(predict, model, go_fast, loras[i % 2]))["lora"] for i in range(2 * repeats)]
                switches.append((variant, statistics.median(times)))
    finally:
        clock.restore()
    print()
    for variant, seconds in switches:
        print(f"LoRA switch between two cached LoRAs, {variant}: {seconds:.3f}s (median of {2 * repeats})")
    if cuda:
        print("Targets (issue 8): dev with a LoRA <= 2.5 s, schnell <= 0.45 s, a LoRA switch <= 0.5 s (total column).")
    return 0
