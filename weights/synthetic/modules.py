"""The synthetic components straight in memory on a device, with no files: what a folder from folder.py holds.

Each model is built on the meta device and every parameter is drawn on the target device (values.py), so a
full-size FLUX.1 (two transformers, T5 XXL, CLIP, VAE, both safety models) appears on a GPU in seconds, and each
tensor holds exactly what the files written on that device type would hold.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from weights.store import materialise
from weights.synthetic.components import FULL_SIZE, Layers, component, components
from weights.synthetic.values import SyntheticTensors

KINDS = tuple(item.kind for item in components())


def build_synthetic_modules(
    device: torch.device | str, dtype: torch.dtype, *, double: int = 19, single: int = 38, t5_layers: int = 24,
    seed: int = 0, kinds: Iterable[str] = KINDS,
) -> dict[str, nn.Module]:
    """kind ("transformer-dev", "transformer-schnell", "clip", "t5", "vae", "safety-stage1", "safety-stage2")
    -> the model on `device`, floating parameters in `dtype`, in eval mode. Defaults: full size, every kind."""
    layers = Layers(double, single, t5_layers)
    return {kind: build_synthetic_module(kind, device, dtype, layers, seed) for kind in kinds}


def build_synthetic_module(kind: str, device: torch.device | str, dtype: torch.dtype, layers: Layers = FULL_SIZE,
                           seed: int = 0) -> nn.Module:
    item = component(kind)
    model = item.build_on_meta(layers)
    fill(model, SyntheticTensors(item, model, seed), torch.device(device), dtype)
    return model


def fill(model: nn.Module, source: SyntheticTensors, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Every meta parameter drawn on `device` (weights/store.py materialise, tied ones together), and the
    non-persistent buffers set to what their constructors compute (CLIP's position ids)."""
    materialise(model, source, device, dtype)
    for name, buffer in model.named_buffers():
        module_name, _, attribute = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(attribute, _buffer_value(name, buffer, device), persistent=False)
    return model


def _buffer_value(name: str, buffer: Tensor, device: torch.device) -> Tensor:
    if name.endswith("position_ids"):
        return torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
    raise ValueError(f"no rule for the buffer {name} ({tuple(buffer.shape)})")
