"""The models of a synthetic FLUX.1 weights folder: class, real config, folder, and how each library stores it.

Each component is built on the meta device from weights/real_configs.py; only the layer counts (`Layers`) may
differ from the real ones. Its key is its folder under the weights root ("FLUX.1-dev/transformer"), which also
seeds its values (values.py).

Stored names are those of the real checkpoints: diffusers' state-dict names for the transformers and the VAE,
and for transformers' models the names its save_pretrained writes, plus the two legacy prefixes the real files
still carry (CLIP's "text_model.", and the CompVis checker's nested "vision_model.vision_model."), so loading
runs the same renaming that real weights go through. A tied tensor (T5's embedding) is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weights import real_configs as real
from weights.manifest import MANIFEST

DIFFUSERS, TRANSFORMERS = "diffusers", "transformers"
# File names and largest shard as each library's save_pretrained wrote the real repos (FLUX.1-dev's transformer:
# 3 shards of at most 10 GB; its T5: 2 of at most 5 GB).
WEIGHTS_FILE = {DIFFUSERS: "diffusion_pytorch_model{suffix}.safetensors", TRANSFORMERS: "model{suffix}.safetensors"}
MAX_SHARD_SIZE = {DIFFUSERS: "10GB", TRANSFORMERS: "5GB"}
STAGE2_LABELS = {0: "normal", 1: "nsfw"}


@dataclass(frozen=True)
class Layers:
    """Layer counts; the defaults are the real ones."""

    double: int = 19
    single: int = 38
    t5: int = 24

    def __str__(self) -> str:
        return f"{self.double} double, {self.single} single, {self.t5} T5 layers"


FULL_SIZE = Layers()


@dataclass(frozen=True)
class Component:
    key: str  # its folder under the weights root, e.g. "FLUX.1-dev/transformer"; seeds its values
    kind: str  # "transformer-dev", "transformer-schnell", "clip", "t5", "vae", "safety-stage1", "safety-stage2"

    @property
    def library(self) -> str:
        return DIFFUSERS if self.kind.startswith("transformer") or self.kind == "vae" else TRANSFORMERS

    def folder(self, root: Path) -> Path:
        return Path(root) / self.key

    def build_on_meta(self, layers: Layers = FULL_SIZE):
        """The model with the real config (and these layer counts), on the meta device: shapes, no values."""
        import torch

        with torch.device("meta"):
            return _BUILDERS[self.kind](layers)

    def write_config(self, model: Any, directory: Path) -> None:
        """config.json as the library writes it for this model."""
        if self.library == DIFFUSERS:
            model.save_config(directory)
        else:
            model.config.save_pretrained(directory)

    def stored_names(self, model: Any) -> dict[str, str]:
        """Stored name -> the model's parameter name, in the order the library's save_pretrained writes them."""
        params = dict(model.named_parameters())  # a tied tensor once, under its first name
        if self.library == DIFFUSERS:
            return {name: name for name in params}
        from transformers.core_model_loading import revert_weight_conversion

        name_of = {id(tensor): name for name, tensor in params.items()}
        stored = revert_weight_conversion(model, params)  # transformers 5 renames some layers when it saves
        if any(id(tensor) not in name_of for tensor in stored.values()):
            raise ValueError(f"{self.key}: transformers converts tensors on save; only renaming is supported")
        return {_legacy_name(self.kind, file_name): name_of[id(tensor)] for file_name, tensor in stored.items()}


def _legacy_name(kind: str, name: str) -> str:
    if kind == "clip":
        return "text_model." + name
    if kind == "safety-stage1" and name.startswith("vision_model."):
        return name.replace("vision_model.", "vision_model.vision_model.", 1)
    return name


def components() -> list[Component]:
    """Every component, in the order a folder is written (the dev repo first, then schnell, then safety)."""
    dev, schnell = MANIFEST["dev"].folder, MANIFEST["schnell"].folder
    return [
        Component(f"{dev}/transformer", "transformer-dev"),
        Component(f"{dev}/text_encoder", "clip"),
        Component(f"{dev}/text_encoder_2", "t5"),
        Component(f"{dev}/vae", "vae"),
        Component(f"{schnell}/transformer", "transformer-schnell"),
        Component(MANIFEST["safety_stage1"].folder, "safety-stage1"),
        Component(MANIFEST["safety_stage2"].folder, "safety-stage2"),
    ]


def component(kind: str) -> Component:
    return next(c for c in components() if c.kind == kind)


# --- the models, from the real configs ----------------------------------------------------------------------

def _transformer(model: str):
    def build(layers: Layers):
        from diffusers import FluxTransformer2DModel

        config = real.TRANSFORMER | {"num_layers": layers.double, "num_single_layers": layers.single}
        return FluxTransformer2DModel(**config, guidance_embeds=real.GUIDANCE_EMBEDS[model])

    return build


def _clip(layers: Layers):
    from transformers import CLIPTextConfig, CLIPTextModel

    # openai/clip-vit-large-patch14's ids. eos_token_id 2 makes CLIP pool at the highest id in each sequence,
    # which is the end-of-text token in the real vocabulary and in the tiny tokenizer we ship alike.
    config = CLIPTextConfig(**real.CLIP_TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(_as_stored(config, "CLIPTextModel"))


def _t5(layers: Layers):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**real.T5_XXL | {"num_layers": layers.t5}, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(_as_stored(config, "T5EncoderModel"))


def _vae(layers: Layers):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**real.VAE)


def _safety_stage1(layers: Layers):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    text = {key: value for key, value in real.CLIP_TEXT.items() if key != "projection_dim"}
    config = CLIPConfig(
        text_config=text | {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config=real.SAFETY_STAGE1_VISION,
        projection_dim=real.SAFETY_STAGE1_PROJECTION,
    )
    return StableDiffusionSafetyChecker(_as_stored(config, "StableDiffusionSafetyChecker"))


def _safety_stage2(layers: Layers):
    from transformers import ViTConfig, ViTForImageClassification

    shape = {key: value for key, value in real.SAFETY_STAGE2.items() if key != "num_labels"}
    labels = {index: label for index, label in STAGE2_LABELS.items()}
    config = ViTConfig(**shape, id2label=labels, label2id={label: index for index, label in labels.items()})
    return ViTForImageClassification(_as_stored(config, "ViTForImageClassification"))


def _as_stored(config: Any, architecture: str) -> Any:
    """The fields the real config.json files carry beyond the shape: the class, and bf16 storage."""
    import torch

    config.architectures = [architecture]
    config.dtype = torch.bfloat16
    return config


_BUILDERS = {
    "transformer-dev": _transformer("dev"),
    "transformer-schnell": _transformer("schnell"),
    "clip": _clip,
    "t5": _t5,
    "vae": _vae,
    "safety-stage1": _safety_stage1,
    "safety-stage2": _safety_stage2,
}
