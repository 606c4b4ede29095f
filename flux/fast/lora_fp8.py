"""LoRAs on go_fast's quantised weights: fused, and re-quantised from the bf16 checkpoint weight, never from the
quantised weight. Written for fp8; the same holds for int8 (flux/fast/kernels.py picks the format per GPU), and
below "fp8" means either: the fuser copies whatever inner tensors torchao's weight holds (data, scales, zero points).

For every fp8 Linear a request's LoRAs touch:

    W_fp8 = quantise(cast(W_bf16 + Σ_i scale_i · (alpha_i / rank_i) · B_i @ A_i))

where W_bf16 is the module's original weight in the model dtype, read from the checkpoint (the `TensorSource` the
transformer was built from) the first time a LoRA touches the module, and kept for the fuser's life. That is
bit for bit the fp8 build of the bf16 model with these LoRAs fused, so go_fast keeps a LoRA's full strength
with no multiplier. The obvious alternative, dequantise the fp8 weight, add, requantise, rounds twice: a
typical LoRA change (a few percent of W) is smaller than half an fp8 step for most elements, so they round
back to where they were and the LoRA loses much of its strength (measured in docs/go-fast.md).

Taking LoRAs off quantises the kept W_bf16 again, exactly as the build did, so the weights are bit-identical to
a fresh build and no second (fp8) copy is kept: 2 bytes per touched weight, wherever the originals live.
Writes go into the existing tensors, so parameters keep their identity and a compiled model does not
recompile. Modules that are not fp8 (the text encoder, the transformer's embedders and output layers) are
handled exactly as by the plain LoraFuser.

`fuser_for` is the one place that builds the fuser a variant needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from flux.fast.quantize import is_quantised, quantise_weight
from lora.apply import Backup, LoraFuser, OriginalsBudget
from weights.store import TensorSource


class Fp8LoraFuser(LoraFuser):
    """A LoraFuser for components whose Linear weights may be torchao quantised tensors (Float8Tensor, Int8Tensor).

    read_source(path, device) returns the original weight, in the model dtype, of the module at `path`
    ("transformer.x.y") on `device`, e.g. from the checkpoint; config is the torchao config the weights were quantised with."""

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        *,
        read_source: Callable[[str, torch.device], Tensor],
        config,
        originals_budget: OriginalsBudget | None = None,
        compute_device: torch.device | None = None,
    ):
        super().__init__(components, originals_budget=originals_budget, compute_device=compute_device)
        self._read_source = read_source
        self._config = config
        self._paths = {
            module: f"{component}.{name}"
            for component, root in components.items()
            for name, module in root.named_modules()
        }

    def snapshot(self, module: nn.Linear) -> Backup:
        if not is_quantised(module.weight):
            return super().snapshot(module)
        device = module.weight.qdata.device
        source = self._read_source(self._paths[module], device)
        if tuple(source.shape) != tuple(module.weight.shape) or source.dtype != module.weight.dtype:
            raise ValueError(f"the checkpoint weight of {self._paths[module]} does not match the loaded model")
        return self.keep_backup(source, module.bias, device)

    def restore(self, module: nn.Linear, backup: Backup) -> None:
        if not is_quantised(module.weight):
            return super().restore(module, backup)
        source = backup.weight.to(self.compute_on(module.weight), non_blocking=True)
        self.write_fused(module, source, backup.bias)  # quantised exactly as the build did

    def original_as_float32(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        if not is_quantised(module.weight):
            return super().original_as_float32(module, backup)
        device = self.compute_on(module.weight)
        bias = None if backup.bias is None else self.float32_on(backup.bias, device)
        return self.float32_on(backup.weight, device), bias

    def working_copy(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        if not is_quantised(module.weight):
            return super().working_copy(module, backup)
        return self.original_as_float32(module, backup)

    def write_fused(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
        if not is_quantised(module.weight):
            return super().write_fused(module, weight, bias)
        # round to the model dtype first, as the bf16 model with this LoRA holds it, then quantise as the build does
        fused = quantise_weight(weight.to(module.weight.dtype), self._config)
        inner, _ = module.weight.__tensor_flatten__()  # qdata and scale; int8's zero point too
        with torch.no_grad():
            for name in inner:
                getattr(module.weight, name).copy_(getattr(fused, name))
            if bias is not None:
                module.bias.copy_(bias)


def fuser_for(
    transformer: nn.Module, text_encoder: nn.Module, *, source: TensorSource, dtype: torch.dtype, config,
    originals_budget: OriginalsBudget | None = None, compute_device: torch.device | None = None,
) -> LoraFuser:
    """The fuser for one variant's transformer (and the shared CLIP text encoder): the fp8 one when the
    transformer has quantised Linears, reading its originals from `source`, the plain one otherwise.
    compute_device: where weights resting on the host (streamed blocks) are fused (LoraFuser)."""
    components = {"transformer": transformer, "text_encoder": text_encoder}
    if not any(is_quantised(module.weight) for module in transformer.modules() if isinstance(module, nn.Linear)):
        return LoraFuser(components, originals_budget=originals_budget, compute_device=compute_device)

    def read_source(path: str, device: torch.device) -> Tensor:
        return source.read(path.removeprefix("transformer.") + ".weight", device, dtype)

    return Fp8LoraFuser(components, read_source=read_source, config=config, originals_budget=originals_budget,
                        compute_device=compute_device)
