"""LoRAs on fp8 weights: fused, and re-quantised from the bf16 checkpoint weight, never from the fp8 weight.

For every fp8 Linear a request's LoRAs touch:

    W_fp8 = quantise(cast(W_bf16 + Σ_i scale_i · (alpha_i / rank_i) · B_i @ A_i))

where W_bf16 is the module's weight read from the checkpoint when its backup is taken (the first fuse that
touches it after it was last restored) and kept with that backup. That is
bit for bit the fp8 build of the bf16 model with these LoRAs fused, so go_fast keeps a LoRA's full strength
with no multiplier. The obvious alternative, dequantise the fp8 weight, add, requantise, rounds twice: a
typical LoRA change (a few percent of W) is smaller than half an fp8 step for most elements, so they round
back to where they were and the LoRA loses much of its strength (measured in README, "go_fast (fp8)").

Taking LoRAs off copies back the exact fp8 data and scales saved before the first fuse, so the weights are
bit-identical to a fresh build. Writes go into the existing tensors, so parameters keep their identity and a
compiled model does not recompile. Modules that are not fp8 (the text encoder, the transformer's embedders
and output layers) are handled exactly as by the plain LoraFuser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux.fast.quantize import is_fp8, quantise_weight
from lora.apply import Backup, LoraFuser


@dataclass(frozen=True, eq=False)
class Fp8Backup(Backup):
    """An fp8 module's exact fp8 data and scales, and its bf16 weight from the checkpoint (in `weight`)."""

    qdata: Tensor
    scale: Tensor


class Fp8LoraFuser(LoraFuser):
    """A LoraFuser for components whose Linear weights may be torchao Float8Tensors.

    read_source(path) returns the original high-precision weight of the module at `path` ("transformer.x.y"),
    e.g. from the checkpoint; config is the torchao config the weights were quantised with."""

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        *,
        read_source: Callable[[str], Tensor],
        config,
        backup_device: torch.device | str | None = None,
    ):
        super().__init__(components, backup_device=backup_device)
        self._read_source = read_source
        self._config = config
        self._paths = {
            module: f"{component}.{name}"
            for component, root in components.items()
            for name, module in root.named_modules()
        }

    def snapshot(self, module: nn.Linear) -> Backup:
        if not is_fp8(module.weight):
            return super().snapshot(module)
        quantised = module.weight
        device = self._backup_device
        source = self._read_source(self._paths[module]).to(device or quantised.device)
        if tuple(source.shape) != tuple(quantised.shape) or source.dtype != quantised.dtype:
            raise ValueError(f"the checkpoint weight of {self._paths[module]} does not match the loaded model")
        bias = None if module.bias is None else module.bias.detach().to(device, copy=True)
        return Fp8Backup(
            weight=source,
            bias=bias,
            qdata=quantised.qdata.detach().to(device, copy=True),
            scale=quantised.scale.detach().to(device, copy=True),
        )

    def restore(self, module: nn.Linear, backup: Backup) -> None:
        if not isinstance(backup, Fp8Backup):
            return super().restore(module, backup)
        with torch.no_grad():
            module.weight.qdata.copy_(backup.qdata)
            module.weight.scale.copy_(backup.scale)
            if backup.bias is not None:
                module.bias.copy_(backup.bias)

    def original_as_float32(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        if not isinstance(backup, Fp8Backup):
            return super().original_as_float32(module, backup)
        device = module.weight.qdata.device
        weight = backup.weight.to(device, torch.float32, copy=True)
        bias = None if backup.bias is None else backup.bias.to(device, torch.float32, copy=True)
        return weight, bias

    def write_fused(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
        if not is_fp8(module.weight):
            return super().write_fused(module, weight, bias)
        # round to the model dtype first, as the bf16 model with this LoRA holds it, then quantise as the build does
        fused = quantise_weight(weight.to(module.weight.dtype), self._config)
        with torch.no_grad():
            module.weight.qdata.copy_(fused.qdata)
            module.weight.scale.copy_(fused.scale)
            if bias is not None:
                module.bias.copy_(bias)
