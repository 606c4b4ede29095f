"""Building fp8 FLUX transformers with torchao, straight from the bf16 checkpoint on disk.

Which torchao config (`fp8_config`):
- CUDA capability >= 8.9 (Ada, Hopper): `Float8DynamicActivationFloat8WeightConfig`, per-row scales for bf16
  weights: fp8 weights and fp8 activations, multiplied by the fp8 tensor cores.
- everywhere else, CPU included: `Float8WeightOnlyConfig` (per-row): fp8 storage, matmul in the model dtype.
  The same code path therefore runs in the tests on CPU.

What is quantised (`is_quantised_linear`): every Linear inside the 19 double and 38 single transformer blocks.
The embedders, the final norm and the output projection stay in the model dtype: they are 0.4% of the
weights and the first and last layers are where fp8 rounding shows most.

Setup never holds two full bf16 copies of a transformer: `load_fp8_transformer` builds the model on the meta
device and fills it tensor by tensor from the safetensors files, quantising each Linear weight as it arrives,
so at most one bf16 tensor exists beside the growing fp8 model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from torch import Tensor, nn
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8Tensor,
    Float8WeightOnlyConfig,
    PerRow,
    PerTensor,
    quantize_,
)

log = logging.getLogger(__name__)

QUANTISED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def fp8_config(device: torch.device, dtype: torch.dtype):
    """The torchao config for this device: dynamic fp8 activations + fp8 weights on CUDA >= 8.9, else fp8 weights only."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        # torchao's per-row fp8 matmul needs bf16 weights; an fp32 model (FLUX_DTYPE=fp32) gets one scale per tensor
        granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    return Float8WeightOnlyConfig(granularity=PerRow())


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


class CheckpointWeights:
    """Read access to the tensors of one diffusers model folder (one or more .safetensors shards), by name."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}  # one open (memory-mapped) handle per shard, not one per tensor
        for file in sorted(self.folder.glob("*.safetensors")):
            self._handles[file] = safe_open(file, framework="pt")
            self._file_of.update(dict.fromkeys(self._handles[file].keys(), file))
        if not self._file_of:
            raise FileNotFoundError(f"no .safetensors files in {self.folder}")

    def names(self) -> list[str]:
        """Every tensor name, grouped by shard."""
        return list(self._file_of)

    def read(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """The tensor as the model holds it: floating tensors in the model dtype (as from_pretrained casts them)."""
        tensor = self._handles[self._file_of[name]].get_tensor(name)
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device, dtype)


def load_fp8_transformer(folder: Path, device: torch.device, dtype: torch.dtype, config=None) -> FluxTransformer2DModel:
    """The FLUX transformer in `folder` (its transformer/ subfolder), with the blocks' Linear weights in fp8.

    Built on the meta device and filled tensor by tensor, so no full bf16 copy is ever made."""
    started = time.perf_counter()
    config = config or fp8_config(device, dtype)
    checkpoint = CheckpointWeights(Path(folder) / "transformer", dtype)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(checkpoint.folder))
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    missing = expected - set(checkpoint.names())
    if missing:
        raise ValueError(f"{checkpoint.folder} lacks {len(missing)} transformer weights, e.g. {sorted(missing)[0]}")
    for name in [name for name in checkpoint.names() if name in expected]:  # shard by shard, not in set order
        module_name, _, attribute = name.rpartition(".")
        module = modules[module_name]
        tensor = checkpoint.read(name, device)
        if attribute == "weight" and is_quantised_linear(module_name, module):
            tensor = quantise_weight(tensor, config)
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))
    model.eval()
    count = sum(is_fp8(module.weight) for module in model.modules() if isinstance(module, nn.Linear))
    log.info("Built the fp8 transformer (%s, %d Linear layers in fp8) in %.2fs",
             type(config).__name__, count, time.perf_counter() - started)
    return model
