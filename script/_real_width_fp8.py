"""LoRA strength on go_fast's 8-bit weights at FLUX.1's real widths (1 double + 1 single block): per layer and at the
output. Run: script/real_width_fp8

Two ways of putting a LoRA on an fp8 transformer (the same torchao build for both; "fp8" also stands for int8 here):
- requantise from bf16 (ours, flux/fast/lora_fp8.py): W_fp8' = quantise(W + ΔW), W the checkpoint's weight;
- dequantise-add-requantise: W_fp8' = quantise(dequantise(W_fp8) + ΔW), which rounds twice.
Strength per layer = <dequant(W_fp8') - dequant(W_fp8), ΔW> / |ΔW|², ΔW = scale·(alpha/rank)·B·A in float32, with
bf16 weights (the GPU's), for each kernel go_fast runs (flux/fast/kernels.py): CPU's fp8 weight-only, fp8 x fp8
from capability 8.9 (Float8DynamicActivationFloat8Weight, whose weights torchao builds on CPU too; its forward
needs a GPU) and int8 x int8 below it (Int8DynamicActivationInt8Weight, CPU too).
Strength at the output = <out_fp8_lora - out_fp8, out_lora - out> / |out_lora - out|² for one transformer forward at
256×256 (1024 image tokens), weight-only fp8, in float32 (the CPU product's dtype). Not bf16: one bf16 forward's own
rounding moves the output far more than the LoRA does (the last line prints both), so a bf16 "reference change"
would be mostly rounding noise. 1 = the LoRA acts as strongly as without fp8; the cosine says how much fp8's
re-rounding adds beside it.
The LoRAs are rank 16 on every block Linear, sized so that the median ‖scale·ΔW‖/‖W‖ per layer is 3% (real
FLUX LoRAs are a few percent).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flux.fast.kernels import kernel_for  # noqa: E402
from flux.fast.lora_fp8 import Fp8LoraFuser  # noqa: E402
from flux.fast.quantize import is_quantised, is_quantised_linear, quantise_weight  # noqa: E402
from lora.apply import LoraFuser  # noqa: E402
from lora.formats import LoraWeights, convert_lora  # noqa: E402
from tests.fixtures.lora_factory import LAYOUTS, make_spec  # noqa: E402
from tests.fixtures.real_width import IMAGE_SIZE, TEXT_TOKENS, float32_copy, real_width_modules, transformer_inputs  # noqa: E402

TARGET_RATIO, RANK = 0.03, 16  # median ‖scale·ΔW‖/‖W‖ per layer, as real FLUX LoRAs; a common trainer rank
CONFIGS = {  # go_fast's kernels (flux/fast/kernels.py), as on CPU, on capability >= 8.9 and below it
    "weight-only (CPU)": kernel_for(None, torch.float32).config,
    "dynamic-activation (CUDA)": kernel_for((9, 0), torch.bfloat16).config,
    "int8 (CUDA < 8.9)": kernel_for((8, 6), torch.bfloat16).config,
}
OURS, DEQUANTISE_ADD_REQUANTISE = "requantise from bf16 (ours)", "dequantise-add-requantise"
METHODS = (OURS, DEQUANTISE_ADD_REQUANTISE)
OUTPUT_SEEDS = (0, 1, 2)


def allow_cuda_config_on_cpu() -> None:
    """torchao refuses to build the fp8-activation config without a CUDA >= 8.9 GPU; building its weights needs
    none (running its matmul would), so lift that check for this process."""
    import torchao.quantization.quant_api as quant_api

    quant_api._check_hardware_support = lambda granularity: None


def submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.removeprefix("transformer."))


@torch.no_grad()
def median_delta_ratio(lora: LoraWeights, transformer: nn.Module, scale: float = 1.0) -> float:
    ratios = [float((delta.weight_delta() * (scale * delta.factor)).norm() / submodule(transformer, path).weight.float().norm())
              for path, delta in lora.deltas.items()]
    return statistics.median(ratios)


def realistic_lora(transformer: nn.Module, seed: int = 0, ratio: float = TARGET_RATIO) -> LoraWeights:
    """A rank-16 LoRA on every block Linear whose median ‖ΔW‖/‖W‖ is `ratio` (ΔW scales as the magnitude²)."""
    blocks = [f"transformer.{name}" for name, module in transformer.named_modules() if is_quantised_linear(name, module)]

    def build(magnitude: float) -> LoraWeights:
        spec = make_spec(transformer, only=blocks, rank=RANK, alpha=RANK, seed=seed, magnitude=magnitude)
        tensors, _ = LAYOUTS["diffusers"](spec, transformer)
        return convert_lora(tensors, input_name="extra_lora", transformer=transformer, identity=f"real-width-{seed}-{magnitude}")

    probe = build(0.1)
    return build(0.1 * (ratio / median_delta_ratio(probe, transformer)) ** 0.5)


def fp8_copy(transformer: nn.Module, config, *, in_place: bool = False) -> nn.Module:
    """The transformer with its block Linears quantised as flux/fast/quantize.py's build does (quantise_weight)."""
    model = transformer if in_place else copy.deepcopy(transformer)
    for name, module in model.named_modules():
        if is_quantised_linear(name, module):
            module.weight = nn.Parameter(quantise_weight(module.weight.detach(), config), requires_grad=False)
    return model


def fusers(fp8: nn.Module, bf16: nn.Module, config, dtype: torch.dtype) -> dict[str, Fp8LoraFuser]:
    """The two methods as Fp8LoraFusers on a model in `dtype`: the product's reads the original weight (the
    checkpoint's bf16 values, here the shared module's), the other the dequantised fp8 weight."""
    def from_bf16(path: str, device: torch.device) -> torch.Tensor:
        return submodule(bf16, path).weight.detach().to(device, dtype)

    def from_fp8(path: str, device: torch.device) -> torch.Tensor:
        return submodule(fp8, path).weight.dequantize(dtype).to(device)

    return {method: Fp8LoraFuser({"transformer": fp8}, read_source=source, config=config)
            for method, source in zip(METHODS, (from_bf16, from_fp8), strict=True)}


def _dequantised(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric quantisation, as every kernel here (int8's zero points are all 0)."""
    return qdata.to(torch.float32) * scale.reshape(-1, 1)


@contextmanager
def exactly_restored(fp8: nn.Module) -> Iterator[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """Yields every fp8 Linear's data and scales as they are, and puts them back at the end: the
    dequantise-add-requantise fuser's own reset quantises its (dequantised, bf16-rounded) source again, which
    need not give the build's bits back."""
    saved = {module: (module.weight.qdata.clone(), module.weight.scale.clone())
             for module in fp8.modules() if isinstance(module, nn.Linear) and is_quantised(module.weight)}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for module, (qdata, scale) in saved.items():
                module.weight.qdata.copy_(qdata)
                module.weight.scale.copy_(scale)


@torch.no_grad()
def layer_strengths(fp8: nn.Module, fuser: Fp8LoraFuser, lora: LoraWeights, scale: float = 1.0) -> dict[str, float]:
    """Per fp8 layer the LoRA touches: the share of scale·ΔW that the fused fp8 weight carries."""
    strengths = {}
    with exactly_restored(fp8) as before:
        try:
            fuser.apply([(lora, scale)])
            for path, delta in lora.deltas.items():
                weight = submodule(fp8, path).weight
                if not is_quantised(weight):
                    continue
                change = _dequantised(weight.qdata, weight.scale).sub_(_dequantised(*before[submodule(fp8, path)]))
                exact = delta.weight_delta().mul_(scale * delta.factor)
                strengths[path] = float((change * exact).sum() / exact.square().sum())
        finally:
            fuser.release()
    return strengths


@torch.no_grad()
def forward(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return model(**transformer_inputs(dtype))[0].float()


def with_lora(fuser: LoraFuser, lora: LoraWeights, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """run() with the LoRA fused at scale 1; afterwards the fuser lets go of everything it kept."""
    try:
        fuser.apply([(lora, 1.0)])
        return run()
    finally:
        fuser.release()


def strength(change: torch.Tensor, reference: torch.Tensor) -> float:
    """The projection of `change` onto `reference`, over the latter's squared norm (flux/fast/quality.py's
    lora_strength, on tensors)."""
    return float((change * reference).sum() / reference.square().sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


@dataclass
class OutputFigures:
    """One forward's output: how much the LoRA changes it and fp8 rounding moves it, and per (LoRA, method) the
    strength and the cosine of the fp8 change against the float32 change."""

    lora_change: list[float]  # ‖out_lora - out‖ / ‖out‖ per LoRA, float32
    fp8_error: float  # ‖out_fp8 - out‖ / ‖out‖, no LoRA
    strengths: dict[tuple[int, str], tuple[float, float]]


def output_strengths(bf16: nn.Module, loras: list[LoraWeights], methods=METHODS, config=CONFIGS["weight-only (CPU)"]) -> OutputFigures:
    """Output strengths on a float32 copy of the transformer (see the module docstring for why not bf16),
    quantised in place after the float32 reference outputs are taken."""
    model = float32_copy(bf16)
    base = forward(model, torch.float32)
    changes = [with_lora(LoraFuser({"transformer": model}), lora, lambda: forward(model, torch.float32)) - base
               for lora in loras]
    fp8 = fp8_copy(model, config, in_place=True)
    fp8_base = forward(fp8, torch.float32)
    strengths = {}
    for index, (lora, change) in enumerate(zip(loras, changes, strict=True)):
        for method in methods:
            with exactly_restored(fp8):
                fuser = fusers(fp8, bf16, config, torch.float32)[method]
                fp8_change = with_lora(fuser, lora, lambda: forward(fp8, torch.float32)) - fp8_base
            strengths[index, method] = strength(fp8_change, change), cosine(fp8_change, change)
    return OutputFigures([relative(change, base) for change in changes], relative(fp8_base - base, base), strengths)


def bf16_noise_floor(bf16: nn.Module, lora: LoraWeights) -> tuple[float, float, float]:
    """Why the output is judged in float32: (‖out_bf16 - out_fp32‖/‖out_fp32‖, and the strength and cosine of
    bf16's own LoRA change against float32's)."""
    base16 = forward(bf16, torch.bfloat16)
    change16 = with_lora(LoraFuser({"transformer": bf16}), lora, lambda: forward(bf16, torch.bfloat16)) - base16
    model = float32_copy(bf16)
    base32 = forward(model, torch.float32)
    change32 = with_lora(LoraFuser({"transformer": model}), lora, lambda: forward(model, torch.float32)) - base32
    return relative(base16 - base32, base32), strength(change16, change32), cosine(change16, change32)


def summary(strengths: dict[str, float]) -> str:
    values = list(strengths.values())
    return f"min {min(values):.4f}  median {statistics.median(values):.4f}  max {max(values):.4f}  ({len(values)} layers)"


def main() -> None:
    started = time.perf_counter()
    allow_cuda_config_on_cpu()
    bf16 = real_width_modules().transformer
    loras = [realistic_lora(bf16, seed) for seed in OUTPUT_SEEDS]
    print(f"FLUX.1 real widths, 1 double + 1 single block; modules and LoRAs built in {time.perf_counter() - started:.0f} s")
    print(f"LoRAs: rank {RANK} on the {len(loras[0].deltas)} block Linears, median ||scale·ΔW||/||W|| "
          + ", ".join(f"{median_delta_ratio(lora, bf16):.4f}" for lora in loras) + f" (seeds {OUTPUT_SEEDS})")
    for config_name, config in CONFIGS.items():
        fp8 = fp8_copy(bf16, config)
        print(f"\nstrength per layer, {config_name}, bf16 weights (LoRA seed {OUTPUT_SEEDS[0]})")
        for method, fuser in fusers(fp8, bf16, config, torch.bfloat16).items():
            print(f"  {method:<30} {summary(layer_strengths(fp8, fuser, loras[0]))}", flush=True)
        del fp8
    for config_name in ("weight-only (CPU)", "int8 (CUDA < 8.9)"):  # the kernels whose forward runs on CPU
        print(f"\nstrength at the transformer output, {config_name}, float32 ({IMAGE_SIZE}x{IMAGE_SIZE}, "
              f"{TEXT_TOKENS} text tokens, one forward)")
        figures = output_strengths(bf16, loras, config=CONFIGS[config_name])
        print("  the LoRA changes the output by " + ", ".join(f"{change:.4f}" for change in figures.lora_change)
              + f"; quantising without LoRA moves it by {figures.fp8_error:.4f} (relative norms)")
        for method in METHODS:
            cells = [figures.strengths[index, method] for index in range(len(loras))]
            print(f"  {method:<30} " + "   ".join(f"{strength:.4f} (cos {cos:.3f})" for strength, cos in cells))
    error, bf16_strength, cos = bf16_noise_floor(bf16, loras[0])
    print(f"\nwhy not bf16: a bf16 forward differs from float32 by {error:.4f}; bf16's own LoRA change has strength "
          f"{bf16_strength:.4f} (cos {cos:.3f}) against float32's")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
