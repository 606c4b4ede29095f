"""What each component of the real FLUX.1 weighs on the GPU, counted, not guessed, for the memory plan
(flux/fast/memory.py).

`real_sizes()` builds the real-size transformer, T5, CLIP, VAE and both safety models on the `meta` device (no
weights, no memory) from weights/real_configs.py and adds up their parameters and buffers in the dtype each runs
in. fp8 (go_fast's variant) counts what flux/fast/quantize.py makes of a transformer with the GPU's kernel
(flux/fast/kernels.py): 1 byte per weight of the Linear layers it quantises (those inside the double and single
blocks) plus its scales (a float32 per output row; int8 adds an int8 zero point); everything else stays bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flux.variants import MODELS
from weights.synthetic.components import FULL_SIZE, Layers, components  # the real configs, built on meta

if TYPE_CHECKING:
    from flux.fast.kernels import GoFastKernel

# bytes per element of each component as safety/checker.py and flux/pipelines.py load them on CUDA
BF16, FP16, FP32 = 2, 2, 4
T5 = "T5 XXL encoder (bf16)"  # its key in Sizes.shared


def module_bytes(module, bytes_per_element: int, *, quantised: Callable[[str, object], bool] | None = None,
                 kernel: GoFastKernel | None = None) -> int:
    """Bytes of a module's parameters and buffers with floating tensors at `bytes_per_element` (others as they
    are). quantised(name, submodule) says which Linear weights `kernel` (default: the H100's) stores in 8 bits."""
    eight_bit = {f"{name}.weight" for name, sub in module.named_modules() if quantised and quantised(name, sub)}
    kernel = kernel or (default_kernel() if eight_bit else None)
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name in eight_bit:
            total += kernel.weight_bytes(*tensor.shape)
        elif tensor.is_floating_point():
            total += tensor.numel() * bytes_per_element
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def default_kernel() -> GoFastKernel:
    """go_fast's kernel on the GPU the plan assumes without one (an H100, bf16)."""
    import torch

    from flux.fast.kernels import kernel_for

    return kernel_for((9, 0), torch.bfloat16)


def build_on_meta(layers: Layers = FULL_SIZE) -> dict[str, object]:
    """Every real-size model (or with these layer counts), on the meta device, no weights: transformers for dev
    and schnell, T5, CLIP, VAE and the two safety stages, as weights/synthetic builds them from the real configs."""
    return {item.kind: item.build_on_meta(layers) for item in components()}


@dataclass(frozen=True)
class Sizes:
    """Bytes per variant ("dev-bf16" ...), per shared component (T5 ...), and of the originals a LoRA on every
    Linear of a variant keeps (per variant). pinned_blocks: the tensors that may wait in pinned host memory, as
    byte sizes in the order they are copied there: T5's, and each variant's originals."""

    variants: dict[str, int]
    shared: dict[str, int]
    lora_originals: dict[str, int] = field(default_factory=dict)
    pinned_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # what may stream (flux/offload.py): each variant's transformer blocks and T5's layers, bytes in running order
    streamable: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def shared_total(self) -> int:
        return sum(self.shared.values())

    @property
    def t5(self) -> int:
        return self.shared.get(T5, 0)

    def streamable_blocks(self, name: str) -> tuple[int, ...]:
        """streamable[name] (T5 or a variant), or none where they are not known (nothing streams)."""
        return self.streamable.get(name, ())

    def blocks(self, name: str) -> tuple[int, ...]:
        """pinned_blocks[name] (T5 or a variant), or its bytes as one block where they are not known."""
        return self.pinned_blocks.get(name) or ((self.t5,) if name == T5 else (self.lora_originals.get(name, 0),))


def linear_weight_blocks(module) -> tuple[int, ...]:
    """bf16 bytes of each Linear weight, in module order: the originals a LoRA touching all of them keeps
    (lora/apply.py keeps them in the model dtype; an fp8 fuser keeps the bf16 checkpoint weight and re-quantises
    it to restore). Biases, 0.03% of it, are left out."""
    from torch import nn

    return tuple(BF16 * sub.weight.numel() for sub in module.modules() if isinstance(sub, nn.Linear))


def linear_weight_bytes(module) -> int:
    return sum(linear_weight_blocks(module))


def _offloaded_blocks(module) -> tuple[int, ...]:
    """Byte sizes of a module's distinct tensors (floating ones in bf16) in the order flux/offload.py pins them."""
    tensors = {id(t): t for sub in module.modules() for t in [*sub._parameters.values(), *sub._buffers.values()]
               if t is not None}
    return tuple(t.numel() * (BF16 if t.is_floating_point() else t.element_size()) for t in tensors.values())


def real_sizes(models: dict[str, object] | None = None, *, kernel: GoFastKernel | None = None) -> Sizes:
    """The real FLUX.1 components' sizes as they sit on the GPU (about 10 s to build the models on meta), fp8
    variants as go_fast's `kernel` (default: the H100's) stores them."""
    from flux.fast.quantize import is_quantised_linear
    from flux.offload import t5_layers, transformer_blocks

    models = models or build_on_meta()
    # T5's layers rest in pinned host memory when T5 is not resident (its embedding and final norm go to the GPU)
    variants, originals = {}, {}
    pinned = {T5: tuple(nbytes for layer in t5_layers(models["t5"]) for nbytes in _offloaded_blocks(layer))}
    streamable = {T5: tuple(module_bytes(layer, BF16) for layer in t5_layers(models["t5"]))}

    def in_blocks(name: str, module: object) -> bool:  # quantised inside a block: every Linear there (quantize.py)
        return is_quantised_linear(f"transformer_blocks.{name}", module)

    for model in MODELS:
        transformer = models[f"transformer-{model}"]
        variants[f"{model}-bf16"] = module_bytes(transformer, BF16)
        variants[f"{model}-fp8"] = module_bytes(transformer, BF16, quantised=is_quantised_linear, kernel=kernel)
        running = transformer_blocks(transformer)
        streamable[f"{model}-bf16"] = tuple(module_bytes(block, BF16) for block in running)
        streamable[f"{model}-fp8"] = tuple(module_bytes(block, BF16, quantised=in_blocks, kernel=kernel) for block in running)
        blocks = linear_weight_blocks(transformer) + linear_weight_blocks(models["clip"])
        for precision in ("bf16", "fp8"):  # each variant's fuser keeps its own, the CLIP encoder's included
            originals[f"{model}-{precision}"], pinned[f"{model}-{precision}"] = sum(blocks), blocks
    shared = {
        T5: module_bytes(models["t5"], BF16),
        "CLIP text encoder (bf16)": module_bytes(models["clip"], BF16),
        "VAE (bf16)": module_bytes(models["vae"], BF16),
        "safety stage 1, CLIP ViT-L (fp16)": module_bytes(models["safety-stage1"], FP16),
        "safety stage 2, ViT-base (fp32)": module_bytes(models["safety-stage2"], FP32),
    }
    return Sizes(variants, shared, originals, pinned, streamable)
