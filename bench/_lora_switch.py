"""LoRA switching at real widths on this CPU: each cost against its floor, measured in one run (bench/lora_switch).

The model is FLUX.1's transformer at its real widths (3072 wide, the real config) with 1 double and 1 single block
(or --double/--single), random weights, in the CPU model dtype (fp32); the LoRAs are two synthetic rank-16 LoRAs
on every Linear of the blocks (full coverage, as ai-toolkit trains them). Figures, medians of --repeats, interleaved:
- floor: one copy of the touched weights in the model dtype plus every B@A (what any exact switch must do here);
- switch: LoRA A fused -> LoRA B fused, through the product's fuser (lora/apply.py, flux/fast/lora_fp8.py);
- back after none: a request without a LoRA (restore), then LoRA A again: the second step is timed;
- per request: one transformer forward at 256x256 with the LoRA fused / without (the cost a LoRA that stays adds).
fp8 rows use the weight-only fp8 build of the same weights (CPU's go_fast), the LoRA re-quantised from bf16.

--multi N prints instead one figure for MultiLoraPredictor: fusing N LoRAs on the same Linears / fusing one
(goal for N = 4: <= 1.5, as the fuser passes over each touched weight once, whatever the number of LoRAs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weights.libraries import prepare_libraries  # noqa: E402

prepare_libraries()

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from torch import nn  # noqa: E402

from flux.fast.kernels import go_fast_kernel  # noqa: E402
from flux.fast.lora_fp8 import fuser_for  # noqa: E402
from flux.fast.quantize import build_fp8_transformer, is_quantised_linear  # noqa: E402
from lora.deltas import LoraDelta  # noqa: E402
from lora.formats import LoraWeights  # noqa: E402
from weights.real_configs import TRANSFORMER  # noqa: E402

RANK = 16


class StateDictSource:
    """A TensorSource over an in-memory model's tensors (the fp8 build and its LoRA originals read from it)."""

    def __init__(self, model: nn.Module):
        self._tensors = dict(model.state_dict())

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str):
        return self._tensors[name]

    def read(self, name, device, dtype):
        tensor = self._tensors[name]
        return tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def real_width_transformer(double: int, single: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    config = dict(TRANSFORMER, num_layers=double, num_single_layers=single, guidance_embeds=True)
    return FluxTransformer2DModel(**config).eval().requires_grad_(False)


def full_coverage_lora(transformer: nn.Module, seed: int) -> LoraWeights:
    """Rank-16 deltas on every block Linear, sized so |ΔW|/|W| is a few percent (as trained FLUX LoRAs)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in transformer.named_modules():
        if is_quantised_linear(name, module):
            out_features, in_features = module.weight.shape
            down = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
            up = torch.randn(out_features, RANK, generator=generator) * 0.03 * module.weight.std().item() * (in_features / RANK) ** 0.5
            deltas[f"transformer.{name}"] = LoraDelta(down=down, up=up, factor=1.0)
    return LoraWeights(deltas=deltas, matched=2 * len(deltas), ignored={}, identity=f"bench-{seed}")


class Floor:
    """One copy of every touched weight in the model dtype, and every B@A: the least an exact switch does. Into
    one buffer per weight allocated once, as the fuser writes into the existing weights (fresh allocations would
    time page faults, not the work)."""

    def __init__(self, source: StateDictSource, lora: LoraWeights):
        self.lora = lora
        self.originals = [source.tensor(path.removeprefix("transformer.") + ".weight") for path in lora.deltas]
        self.scratch = [torch.empty_like(weight) for weight in self.originals]

    def __call__(self) -> None:
        for original, scratch, delta in zip(self.originals, self.scratch, self.lora.deltas.values(), strict=True):
            scratch.copy_(original)
            torch.mm(delta.up, delta.down, out=scratch)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def forward(transformer: nn.Module, size: int = 256, text_tokens: int = 512) -> None:
    tokens = (size // 16) ** 2
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        transformer(
            hidden_states=torch.randn(1, tokens, 64, generator=generator),
            encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=generator),
            pooled_projections=torch.randn(1, 768, generator=generator),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
            img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
        )


def measure(label: str, transformer: nn.Module, source: StateDictSource, loras: list[LoraWeights], repeats: int) -> None:
    fuser = fuser_for(transformer, nn.Identity(), source=source, dtype=torch.float32, config=go_fast_kernel(torch.device("cpu"), torch.float32).config)
    a, b = loras
    floor_b = Floor(source, b)
    fuser.apply([(a, 1.0)])  # takes the originals once, as the first LoRA request does
    floors, switches, backs, restores, with_lora, without = [], [], [], [], [], []
    for _ in range(repeats):  # interleaved, so the machine's noise falls on every figure alike
        floors.append(timed(floor_b))
        switches.append(timed(lambda: fuser.apply([(b, 1.0)])))
        with_lora.append(timed(lambda: forward(transformer)))
        restores.append(timed(lambda: fuser.apply([])))
        without.append(timed(lambda: forward(transformer)))
        backs.append(timed(lambda: fuser.apply([(a, 1.0)])))
    del floor_b
    floor, switch, back = (statistics.median(x) for x in (floors, switches, backs))
    touched = sum(delta.shape[0] * delta.shape[1] for delta in a.deltas.values())
    print(f"{label}: {len(a.deltas)} Linears, {touched / 1e6:.0f} M touched weights")
    print(f"  floor (copy + every B@A)         {floor:7.3f}s")
    print(f"  switch A -> B                    {switch:7.3f}s  -> {switch / floor:4.2f}x floor (goal <= 2)")
    print(f"  restore (request without LoRA)   {statistics.median(restores):7.3f}s")
    print(f"  back to A after none             {back:7.3f}s  -> {back / switch:4.2f}x a switch (goal <= 1)")
    print(f"  forward 256x256 with / without   {statistics.median(with_lora):7.3f}s / {statistics.median(without):.3f}s"
          f"  -> {statistics.median(with_lora) / statistics.median(without):4.2f} (goal <= 1.05)", flush=True)


class FuseFloor:
    """What fusing these LoRAs must do at least per touched weight: copy the original, then add every B@A, either
    as one GEMM of the factors stacked along the rank (one pass over the weight; the arithmetic still grows with
    the LoRAs) or as one GEMM per LoRA (a pass each, as the fuser did before MultiLoraPredictor)."""

    def __init__(self, source: StateDictSource, loras: list[LoraWeights], scratch: list[torch.Tensor], *, stacked: bool):
        """scratch: one buffer per touched weight, allocated once and shared by the floors (memory)."""
        paths = list(loras[0].deltas)
        self.originals = [source.tensor(path.removeprefix("transformer.") + ".weight") for path in paths]
        self.scratch = scratch
        groups = [[lora] for lora in loras] if not stacked else [loras]
        self.factors = [[(torch.cat([lora.deltas[path].up for lora in group], dim=1),
                          torch.cat([lora.deltas[path].down for lora in group], dim=0)) for group in groups] for path in paths]

    def __call__(self) -> None:
        for original, scratch, factors in zip(self.originals, self.scratch, self.factors, strict=True):
            scratch.copy_(original)
            for up, down in factors:
                scratch.addmm_(up, down)


def measure_multi(transformer: nn.Module, source: StateDictSource, count: int, repeats: int) -> None:
    """One LoRA fused vs `count` LoRAs on the same Linears, each step a full rewrite of the touched weights."""
    fuser = fuser_for(transformer, nn.Identity(), source=source, dtype=torch.float32, config=go_fast_kernel(torch.device("cpu"), torch.float32).config)
    loras = [full_coverage_lora(transformer, seed) for seed in range(1, count + 1)]
    one, many = [(loras[0], 1.0)], [(lora, 1.0) for lora in loras]
    scratch = [torch.empty(delta.shape) for delta in loras[0].deltas.values()]
    steps = {
        "fuse 1": lambda: fuser.apply(one),
        f"fuse {count}": lambda: fuser.apply(many),
        "floor 1": FuseFloor(source, loras[:1], scratch, stacked=True),
        f"floor {count}, one pass": FuseFloor(source, loras, scratch, stacked=True),
        f"floor {count}, a pass each": FuseFloor(source, loras, scratch, stacked=False),
    }
    fuser.apply(one)  # takes the originals once, as the first LoRA request does
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved; fuse 1 and fuse N alternate, so each rewrites every touched weight
        for name, step in steps.items():
            times[name].append(timed(step))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        print(f"  {name:<28} {seconds:7.3f}s  -> {seconds / median[name.split(' ')[0] + ' 1']:4.2f}x its 1-LoRA figure")
    print(f"  fusing {count} LoRAs / fusing 1: {median[f'fuse {count}'] / median['fuse 1']:4.2f}x (goal <= 1.5 for 4; "
          f"one pass per weight, so the rest is the GEMM's arithmetic, {count}x that of one LoRA)", flush=True)


def multi_lora(count: int, repeats: int, double: int = 1, single: int = 0) -> None:
    """bench/benchmark --multi-lora and bench/lora_switch --multi: the fused-once figure."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FLUX.1 transformer at real widths, "
          f"{double} double + {single} single blocks, fp32 (the CPU model dtype); rank-{RANK} LoRAs on every block Linear", flush=True)
    model = real_width_transformer(double, single)
    measure_multi(model, StateDictSource(model), count, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--multi", type=int, metavar="N", help="fusing N LoRAs / fusing one, in the model dtype")
    args = parser.parse_args()
    if args.multi:
        return multi_lora(args.multi, args.repeats, args.double, args.single)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FLUX.1 transformer at real widths, "
          f"{args.double} double + {args.single} single blocks, fp32 (the CPU model dtype)", flush=True)
    bf16 = real_width_transformer(args.double, args.single)
    source = StateDictSource(bf16)
    loras = [full_coverage_lora(bf16, seed) for seed in (1, 2)]
    measure("model dtype (bf16 on a GPU)", bf16, source, loras, args.repeats)
    if not args.skip_fp8:
        cpu = torch.device("cpu")
        fp8 = build_fp8_transformer(bf16.config, source, cpu, torch.float32, go_fast_kernel(cpu, torch.float32).config)
        del bf16
        measure("fp8 (weight-only on CPU)", fp8, source, loras, args.repeats)


if __name__ == "__main__":
    main()
