"""Building fp8 FLUX transformers with torchao, straight from the bf16 checkpoint on disk.

Which torchao config (`fp8_config`):
- CUDA capability >= 8.9 (Ada, Hopper): `Float8DynamicActivationFloat8WeightConfig`, per-row scales for bf16
  weights: fp8 weights and fp8 activations, multiplied by the fp8 tensor cores.
- everywhere else, CPU included: `Float8WeightOnlyConfig` (per-row): fp8 storage, matmul in the model dtype.
  The same code path therefore runs in the tests on CPU.

What is quantised (`is_quantised_linear`): every Linear inside the 19 double and 38 single transformer blocks.
The embedders, the final norm and the output projection stay in the model dtype: they are 0.4% of the
weights and the first and last layers are where fp8 rounding shows most.

Setup never holds two full bf16 copies of a transformer: `build_fp8_transformer` builds the model on the meta
device and fills it tensor by tensor from its `TensorSource` (weights/store.py), quantising each Linear weight as
it arrives, so at most one bf16 tensor exists beside the growing fp8 model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8Tensor,
    Float8WeightOnlyConfig,
    PerRow,
    PerTensor,
    quantize_,
)

from weights.store import TensorSource, WeightsFolder, flux_transformer

log = logging.getLogger(__name__)

QUANTISED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def fp8_config(device: torch.device, dtype: torch.dtype):
    """The torchao config for this device: dynamic fp8 activations + fp8 weights on CUDA >= 8.9, else fp8 weights only.

    set_inductor_config=False: by default every quantize_ call (here at build and after each LoRA fuse) would set
    process-wide Inductor options (coordinate-descent tuning of every Triton kernel, int8-only fusions, the FX
    cache that is on anyway, kernel names). Tuning lengthens each compile and touches only the fused pointwise
    kernels, not the fp8 matmuls; flux/fast/compile.py decides what its own compile uses, for its graphs only."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        # torchao's per-row fp8 matmul needs bf16 weights; an fp32 model (FLUX_DTYPE=fp32) gets one scale per tensor
        granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
    return Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)


def is_quantised_linear(name: str, module: nn.Module) -> bool:
    """Whether go_fast stores this transformer module in fp8 (name as in named_modules(), no prefix)."""
    return isinstance(module, nn.Linear) and name.startswith(QUANTISED_BLOCKS)


def is_fp8(weight: Tensor) -> bool:
    return isinstance(weight, Float8Tensor)


def quantise_weight(weight: Tensor, config) -> Tensor:
    """What torchao's quantize_ makes of this Linear weight (a Float8Tensor, or the weight itself where torchao
    declines, e.g. dims not multiples of 16 for fp8 matmuls). Used at build AND after every LoRA fuse, so a
    fused weight is exactly the fp8 build of the bf16 model with that LoRA."""
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, config)
    return holder.weight.data if is_fp8(holder.weight) else weight


def build_fp8_transformer(
    config: dict, source: TensorSource, device: torch.device, dtype: torch.dtype, fp8=None,
) -> FluxTransformer2DModel:
    """The FLUX transformer of `config`, its blocks' Linear weights in fp8, filled from `source` (the bf16
    checkpoint, or synthetic weights) tensor by tensor: no full bf16 copy is ever made."""
    started = time.perf_counter()
    fp8 = fp8 or fp8_config(device, dtype)

    def quantise_block_linears(name: str, module: nn.Module, tensor: Tensor) -> Tensor:
        module_name, _, attribute = name.rpartition(".")
        quantised = attribute == "weight" and is_quantised_linear(module_name, module)
        return quantise_weight(tensor, fp8) if quantised else tensor

    model = flux_transformer(config, source, device, dtype, transform=quantise_block_linears)
    count = sum(is_fp8(module.weight) for module in model.modules() if isinstance(module, nn.Linear))
    log.info("Built the fp8 transformer (%s, %d Linear layers in fp8) in %.2fs",
             type(fp8).__name__, count, time.perf_counter() - started)
    return model


def load_fp8_transformer(folder: Path, device: torch.device, dtype: torch.dtype, fp8=None) -> FluxTransformer2DModel:
    """build_fp8_transformer from a diffusers model folder (its transformer/ subfolder)."""
    store = WeightsFolder(folder, folder)
    return build_fp8_transformer(store.transformer_config("dev"), store.transformer_tensors("dev"), device, dtype, fp8)
