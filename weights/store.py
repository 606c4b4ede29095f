"""Where FLUX's components come from, as one protocol: a weights folder on disk, or synthetic weights.

flux/pipelines.py loads through a `ModelStore` and never opens a folder itself, so the same pipelines, LoRA fusers
and compile run on real weights, on the tiny test weights, and on synthetic full-size weights made straight on a
GPU with no files at all (weights/synthetic, for script/gpu_check).

Transformers are built from a `TensorSource` (names, and each tensor read on the device it will live on):
`materialise` makes the model on the meta device and fills it tensor by tensor, so a component never exists twice
in host memory and a GPU load copies each tensor once, from the file's pages to the device. The fp8 build and the
fp8 LoRA fuser read their bf16 originals through the same source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


class TensorSource(Protocol):
    """The tensors of one model, by name, as the model holds them."""

    def names(self) -> list[str]:
        """Every tensor name, in the order reading is cheapest (file by file)."""
        ...

    def read(self, name: str, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """The tensor on `device`; floating tensors in `dtype` (as from_pretrained casts them)."""
        ...


class ModelStore(Protocol):
    """FLUX's components for both models (dev, schnell): what flux/pipelines.py needs and nothing more."""

    def transformer_config(self, model: str) -> dict[str, Any]: ...

    def transformer_tensors(self, model: str) -> TensorSource: ...

    def shared_components(self, device: torch.device, dtype: torch.dtype, *, t5_device: torch.device | None = None) -> dict[str, Any]:
        """text_encoder, text_encoder_2 (T5; on t5_device when given), tokenizer, tokenizer_2 and vae, on `device`."""
        ...

    def scheduler(self, model: str) -> Any: ...


class SafetensorsFolder:
    """A TensorSource over one diffusers/transformers model folder (one or more .safetensors shards)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._last_of: dict[Path, str] = {}  # each shard's last tensor in names() order
        self._handles: dict[Path, Any] = {}  # one open (memory-mapped) handle per shard, not one per tensor
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                names = list(handle.keys())
            self._file_of.update(dict.fromkeys(names, file))
            if names:
                self._last_of[file] = names[-1]
        if not self._file_of:
            raise FileNotFoundError(f"no .safetensors files in {self.folder}")

    def names(self) -> list[str]:
        return list(self._file_of)

    def read(self, name: str, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        from safetensors import safe_open

        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        tensor = self._handles[file].get_tensor(name)
        if name == self._last_of[file]:
            # A pass over the shard is done: unmap it, or every page read stays in our RSS for as long as this
            # source is kept (a real-width CPU setup: peak RSS 1.31x the bytes it holds, 1.04x unmapped).
            # The next read maps it again.
            del self._handles[file]
        return tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)


def materialise(
    model: nn.Module, source: TensorSource, device: torch.device, dtype: torch.dtype,
    transform: Callable[[str, nn.Module, Tensor], Tensor] | None = None,
) -> nn.Module:
    """Fill a model built on the meta device from `source`, tensor by tensor, on `device`.

    transform(name, module, tensor) may replace a tensor as it arrives (the fp8 build quantises there), so
    at most one source tensor exists beside the growing model. Every parameter must be in the source, under its
    first name; a tied parameter (T5's embedding) is read once and set under all of its names."""
    modules = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    tied = {names[0]: names for names in names_of.values()}  # first name (as named_parameters() gives it) -> all
    missing = set(tied) - set(source.names())
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensors of {type(model).__name__}, e.g. {sorted(missing)[0]}")
    for name in [name for name in source.names() if name in tied]:
        module_name, _, attribute = name.rpartition(".")
        tensor = source.read(name, device, dtype)
        if transform is not None:
            tensor = transform(name, modules[module_name], tensor)
        parameter = nn.Parameter(tensor, requires_grad=False)
        for alias in tied[name]:
            owner, _, alias_attribute = alias.rpartition(".")
            setattr(modules[owner], alias_attribute, parameter)
    return model.eval()


def flux_transformer(config: dict[str, Any], source: TensorSource, device: torch.device, dtype: torch.dtype,
                     transform: Callable[[str, nn.Module, Tensor], Tensor] | None = None) -> nn.Module:
    """A FluxTransformer2DModel from its config, filled from `source` on `device` (see `materialise`)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    return materialise(model, source, device, dtype, transform)


class WeightsFolder:
    """The ModelStore of a weights folder laid out as weights/manifest.py says (and as the tiny weights are)."""

    def __init__(self, dev_dir: Path, schnell_dir: Path):
        self._dirs = {"dev": Path(dev_dir), "schnell": Path(schnell_dir)}

    def __repr__(self) -> str:
        return f"WeightsFolder({self._dirs['dev'].parent})"

    def folder(self, model: str) -> Path:
        return self._dirs[model]

    def transformer_config(self, model: str) -> dict[str, Any]:
        from diffusers import FluxTransformer2DModel

        return dict(FluxTransformer2DModel.load_config(self._dirs[model] / "transformer"))

    def transformer_tensors(self, model: str) -> SafetensorsFolder:
        return SafetensorsFolder(self._dirs[model] / "transformer")

    def shared_components(self, device: torch.device, dtype: torch.dtype, *, t5_device: torch.device | None = None) -> dict[str, Any]:
        """Each component loaded straight onto its device (device_map), not to the host first and copied after."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        root = self._dirs["dev"]
        place = {"device_map": str(device)}
        t5_place = {"device_map": str(t5_device or device)}
        return {
            "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **place),
            "text_encoder_2": T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=dtype, **t5_place),
            "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
            "tokenizer_2": T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
            "vae": AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, **place),
        }

    def scheduler(self, model: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(self._dirs[model], subfolder="scheduler")
