"""Building go_fast's quantised FLUX transformers with torchao, straight from the bf16 checkpoint on disk.

Which torchao config: flux/fast/kernels.py (`go_fast_kernel`), per GPU generation: fp8 weights and activations
from Ada on, int8 weights and activations on Ampere and Turing, fp8 weights only on CPU. This module builds with
whichever it is given; the variant is still called "fp8" (flux/variants.py), the kernel is named in the logs.

What is quantised (`is_quantised_linear`): every Linear inside the 19 double and 38 single transformer blocks.
The embedders, the final norm and the output projection stay in the model dtype: they are 0.4% of the
weights and the first and last layers are where 8-bit rounding shows most.

Setup never holds two full bf16 copies of a transformer: `build_fp8_transformer` builds the model on the meta
device and fills it tensor by tensor from its `TensorSource` (weights/store.py), quantising each Linear weight as
it arrives, so at most one bf16 tensor exists beside the growing quantised model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn
from torchao.quantization import quantize_
from torchao.utils import TorchAOBaseTensor

from flux.fast.kernels import go_fast_kernel
from weights.store import TensorSource, WeightsFolder, flux_transformer

log = logging.getLogger(__name__)

QUANTISED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def is_quantised_linear(name: str, module: nn.Module) -> bool:
    """Whether go_fast quantises this transformer module (name as in named_modules(), no prefix)."""
    return isinstance(module, nn.Linear) and name.startswith(QUANTISED_BLOCKS)


def is_quantised(weight: Tensor) -> bool:
    """A torchao quantised weight (Float8Tensor, Int8Tensor...): its values live in inner tensors (qdata, scale...)."""
    return isinstance(weight, TorchAOBaseTensor)


def quantise_weight(weight: Tensor, config) -> Tensor:
    """What torchao's quantize_ makes of this Linear weight (a Float8Tensor or Int8Tensor, or the weight itself where
    torchao declines, e.g. dims not multiples of 16 for fp8 matmuls). Used at build AND after every LoRA fuse, so a
    fused weight is exactly the quantised build of the bf16 model with that LoRA."""
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, config)
    return holder.weight.data if is_quantised(holder.weight) else weight


def build_fp8_transformer(
    config: dict, source: TensorSource, device: torch.device, dtype: torch.dtype, quantisation=None,
    then: Callable[[str, nn.Module, Tensor], Tensor] | None = None,
) -> FluxTransformer2DModel:
    """The FLUX transformer of `config`, its blocks' Linear weights quantised with `quantisation` (a torchao
    config; default: this device's go_fast kernel), filled from `source` (the bf16 checkpoint, or synthetic
    weights) tensor by tensor: no full bf16 copy is ever made. then(name, module, tensor): a further step for
    each tensor once quantised (flux/pipelines.py parks a streamed block's in host memory)."""
    started = time.perf_counter()
    quantisation = quantisation or go_fast_kernel(device, dtype).config

    def quantise_block_linears(name: str, module: nn.Module, tensor: Tensor) -> Tensor:
        module_name, _, attribute = name.rpartition(".")
        quantised = attribute == "weight" and is_quantised_linear(module_name, module)
        tensor = quantise_weight(tensor, quantisation) if quantised else tensor
        return then(name, module, tensor) if then is not None else tensor

    model = flux_transformer(config, source, device, dtype, transform=quantise_block_linears)
    count = sum(is_quantised(module.weight) for module in model.modules() if isinstance(module, nn.Linear))
    log.info("Built the go_fast transformer (%s, %d Linear layers quantised) in %.2fs",
             type(quantisation).__name__, count, time.perf_counter() - started)
    return model


def load_fp8_transformer(folder: Path, device: torch.device, dtype: torch.dtype, quantisation=None) -> FluxTransformer2DModel:
    """build_fp8_transformer from a diffusers model folder (its transformer/ subfolder)."""
    store = WeightsFolder(folder, folder)
    return build_fp8_transformer(store.transformer_config("dev"), store.transformer_tensors("dev"), device, dtype, quantisation)
