"""go_fast quality on the tiny weights: PSNR against bf16 and LoRA strength, for two ways of putting a LoRA
on fp8 weights, plus switch and per-step costs. Run: script/go_fast_quality

Ways compared (the fp8 transformer is the same torchao build for both):
- requantise from bf16 (ours, flux/fast/lora_fp8.py): quantise(W_bf16 + s·ΔW), W_bf16 read from the checkpoint;
- dequantise-add-requantise: quantise(dequantise(W_fp8) + s·ΔW), rounding twice.
Strength = projection of (fast with LoRA - fast without) onto (bf16 with LoRA - bf16 without), over the
squared norm of the latter; 1 means the LoRA acts on fp8 exactly as strongly as on bf16.
On CPU, "bf16" is the model dtype there (fp32) and fp8 is weight-only; CPU timings say nothing about a GPU.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["FLUX_WEIGHTS"] = "tiny"
os.environ.setdefault("FLUX_TINY_WEIGHTS_DIR", str(ROOT / ".cache" / "tiny-weights"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from torchao.quantization import Float8WeightOnlyConfig, PerTensor  # noqa: E402

from flux.fast.lora_fp8 import Fp8LoraFuser  # noqa: E402
from flux.fast.quality import lora_strength, psnr  # noqa: E402
from flux.fast.quantize import load_fp8_transformer  # noqa: E402
from flux.pipelines import FluxPipelines, dtype_name, pick_dtype  # noqa: E402
from flux.variants import Variant  # noqa: E402
from lora.apply import LoraFuser  # noqa: E402
from lora.formats import LoraWeights, load_lora  # noqa: E402
from tests.fixtures.lora_factory import make_spec, write_layout  # noqa: E402
from weights.locations import tiny_weight_paths  # noqa: E402
from weights.store import WeightsFolder  # noqa: E402

PROMPT = "a photo of TOK riding a bicycle"
TARGET_RATIO = 0.03  # ||scale·(alpha/rank)·B·A|| / ||W|| per module: a few percent, as in real FLUX LoRAs


@dataclass
class Quality:
    psnr_without_lora: float
    psnr_with_lora: float
    strength: float  # requantised from bf16 (ours)
    strength_requantising_fp8: float  # dequantise-add-requantise
    psnr_with_lora_requantising_fp8: float
    delta_ratio: float  # median ||ΔW|| / ||W|| of the LoRA used
    psnr_lora_effect: float  # bf16 with LoRA vs bf16 without: how visible the LoRA is


def tiny_pipelines() -> FluxPipelines:
    paths = tiny_weight_paths()
    device = torch.device("cpu")
    both = (Variant("dev"), Variant("dev", "fp8"))  # compared side by side, so both stay in memory
    return FluxPipelines(WeightsFolder(paths.dev, paths.schnell), device, pick_dtype(device), resident=both)


def typical_lora(transformer: torch.nn.Module, folder: Path, seed: int = 0, ratio: float = TARGET_RATIO) -> LoraWeights:
    """A transformer-only LoRA whose per-module ||ΔW||/||W|| has the given median (ΔW scales as magnitude²)."""
    def build(magnitude: float) -> LoraWeights:
        spec = make_spec(transformer, seed=seed, magnitude=magnitude)
        path = write_layout("diffusers", spec, transformer, folder / f"lora-{seed}-{magnitude:.4f}.safetensors")
        return load_lora(path, input_name="extra_lora", transformer=transformer, identity=f"typical-{seed}-{magnitude}")

    probe = build(1.0)
    magnitude = (ratio / delta_ratio(probe, transformer)) ** 0.5
    return build(magnitude)


@torch.no_grad()
def delta_ratio(weights: LoraWeights, transformer: torch.nn.Module) -> float:
    ratios = []
    for path, delta in weights.deltas.items():
        weight = transformer.get_submodule(path.removeprefix("transformer.")).weight
        weight = weight.dequantize() if hasattr(weight, "dequantize") else weight.detach()
        ratios.append(float((delta.weight_delta() * delta.factor).norm() / weight.float().norm()))
    return statistics.median(ratios)


def render(pipelines: FluxPipelines | FluxPipeline, variant: str, *, size: int, steps: int, seed: int = 0) -> np.ndarray:
    pipe = pipelines.get(variant, "txt2img") if isinstance(pipelines, FluxPipelines) else pipelines
    with torch.inference_mode():
        return pipe(
            prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=3.5,
            generator=torch.Generator().manual_seed(seed), max_sequence_length=64, output_type="np",
        ).images[0]


def fp8_fusers(pipelines: FluxPipelines, transformer=None, config=None) -> tuple[Fp8LoraFuser, Fp8LoraFuser]:
    """(ours, dequantise-add-requantise) fusers on an fp8 dev transformer (default: the dev-fp8 variant)."""
    transformer = transformer or pipelines.transformer("dev-fp8")
    config = config or pipelines.go_fast.config
    checkpoint, dtype = pipelines.originals("dev"), pipelines.dtype
    ours = Fp8LoraFuser({"transformer": transformer}, config=config,
                        read_source=lambda path, device: checkpoint.read(path.removeprefix("transformer.") + ".weight", device, dtype))
    naive = Fp8LoraFuser({"transformer": transformer}, config=config,
                         read_source=lambda path, _: transformer.get_submodule(path.removeprefix("transformer.")).weight.dequantize())
    return ours, naive


def per_tensor_strengths(pipelines: FluxPipelines, lora: LoraWeights, *, size: int = 256, steps: int = 2) -> tuple[float, float]:
    """(ours, dequantise-add-requantise) strengths with ONE scale per weight tensor, as the hosted model's fp8."""
    config = Float8WeightOnlyConfig(granularity=PerTensor())
    transformer = load_fp8_transformer(pipelines.store.folder("dev"), pipelines.device, pipelines.dtype, config)
    pipe = FluxPipeline(**{**pipelines.get("dev-fp8", "txt2img").components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    base_fuser = LoraFuser({"transformer": pipelines.transformer("dev-bf16")})
    base_without = render(pipelines, "dev-bf16", size=size, steps=steps)
    base_fuser.apply([(lora, 1.0)])
    base_with = render(pipelines, "dev-bf16", size=size, steps=steps)
    base_fuser.reset()
    fast_without = render(pipe, "", size=size, steps=steps)
    strengths = []
    for fuser in fp8_fusers(pipelines, transformer, config):
        fuser.apply([(lora, 1.0)])
        strengths.append(lora_strength(render(pipe, "", size=size, steps=steps), fast_without, base_with, base_without))
        fuser.reset()
    return strengths[0], strengths[1]


def measure_quality(pipelines: FluxPipelines, lora: LoraWeights, *, size: int = 256, steps: int = 2) -> Quality:
    base_fuser = LoraFuser({"transformer": pipelines.transformer("dev-bf16")})
    ours, naive = fp8_fusers(pipelines)
    base_without = render(pipelines, "dev-bf16", size=size, steps=steps)
    fast_without = render(pipelines, "dev-fp8", size=size, steps=steps)
    base_fuser.apply([(lora, 1.0)])
    base_with = render(pipelines, "dev-bf16", size=size, steps=steps)
    base_fuser.reset()
    ours.apply([(lora, 1.0)])
    fast_with = render(pipelines, "dev-fp8", size=size, steps=steps)
    ours.reset()
    naive.apply([(lora, 1.0)])
    naive_with = render(pipelines, "dev-fp8", size=size, steps=steps)
    naive.reset()
    return Quality(
        psnr_without_lora=psnr(fast_without, base_without),
        psnr_with_lora=psnr(fast_with, base_with),
        strength=lora_strength(fast_with, fast_without, base_with, base_without),
        strength_requantising_fp8=lora_strength(naive_with, fast_without, base_with, base_without),
        psnr_with_lora_requantising_fp8=psnr(naive_with, base_with),
        delta_ratio=delta_ratio(lora, pipelines.transformer("dev-bf16")),
        psnr_lora_effect=psnr(base_with, base_without),
    )


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    pipelines = tiny_pipelines()
    dtype = dtype_name(pipelines.dtype)
    folder, device = pipelines.store.folder("dev"), pipelines.device
    build = median_seconds(lambda: load_fp8_transformer(folder, device, pipelines.dtype, pipelines.go_fast.config), 3)
    print(f"Tiny FLUX on {pipelines.device.type}, base dtype {dtype}, go_fast kernel {pipelines.go_fast.name}")
    print(f"fp8 transformer build from the checkpoint: {build * 1000:.0f} ms (median of 3)")
    with tempfile.TemporaryDirectory() as tmp:
        transformer = pipelines.transformer("dev-bf16")
        loras = [typical_lora(transformer, Path(tmp), seed=seed) for seed in (0, 1)]
        weak = typical_lora(transformer, Path(tmp), seed=2, ratio=TARGET_RATIO / 3)
        rows = [measure_quality(pipelines, lora) for lora in (*loras, weak)]
        print("LoRAs: rank 4 on every transformer Linear; 256x256, 2 steps")
        print(f"{'median ||ΔW||/||W|| per module':<42}" + "".join(f"{row.delta_ratio:>8.3f}  " for row in rows))
        for label, field in (
            ("PSNR bf16 with LoRA vs without (dB)", "psnr_lora_effect"),
            ("PSNR fp8 vs bf16, no LoRA (dB)", "psnr_without_lora"),
            ("PSNR fp8 vs bf16, with LoRA (dB)", "psnr_with_lora"),
            ("strength, requantise from bf16 (ours)", "strength"),
            ("strength, dequantise-add-requantise", "strength_requantising_fp8"),
            ("PSNR with LoRA, dequantise-add-requant", "psnr_with_lora_requantising_fp8"),
        ):
            print(f"{label:<42}" + "".join(f"{getattr(row, field):>8.3f}  " for row in rows))
        per_tensor = [per_tensor_strengths(pipelines, lora) for lora in (*loras, weak)]
        print(f"{'strength, one scale per tensor, ours':<42}" + "".join(f"{ours:>8.3f}  " for ours, _ in per_tensor))
        print(f"{'strength, one scale per tensor, deq-add-req':<42}" + "".join(f"{naive:>8.3f}  " for _, naive in per_tensor))
        ours, naive = fp8_fusers(pipelines)
        base = LoraFuser({"transformer": transformer})
        for name, fuser in (("bf16", base), ("fp8, ours", ours), ("fp8, dequantise-add-requantise", naive)):
            fuser.apply([(loras[0], 1.0)])  # first use: backups taken
            flip = iter([loras[1], loras[0]] * 10)
            switch = median_seconds(lambda fuser=fuser, flip=flip: fuser.apply([(next(flip), 1.0)]))
            same = median_seconds(lambda fuser=fuser: fuser.apply([(loras[0] if fuser.active[0][0] == loras[0].identity else loras[1], 1.0)]))
            fuser.reset()
            print(f"switch between two cached LoRAs, {name:<32}: {switch * 1000:7.1f} ms (same LoRA again: {same * 1e6:.0f} µs)")
        # steps 2-4 of a 4-step run minus a 1-step run: the per-step cost without encoding and decoding; the two
        # variants interleaved, medians of 5, as this machine is shared
        samples: dict[str, list[float]] = {"dev-bf16": [], "dev-fp8": []}
        for _ in range(5):
            for variant in samples:
                one = median_seconds(lambda v=variant: render(pipelines, v, size=256, steps=1), 1)
                four = median_seconds(lambda v=variant: render(pipelines, v, size=256, steps=4), 1)
                samples[variant].append((four - one) / 3)
        step_times = {variant: statistics.median(times) for variant, times in samples.items()}
        print("cost per denoising step at 256x256 on this CPU: "
              + ", ".join(f"{v} {t * 1000:.0f} ms" for v, t in step_times.items())
              + " (a fused LoRA adds nothing per step on either)")


if __name__ == "__main__":
    main()
