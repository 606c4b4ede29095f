"""The ModelStore (weights/store.py) of synthetic weights: FLUX.1 made on the device it runs on, no weight files.

flux/pipelines.py loads through it exactly as through a folder: each transformer is built from a TensorSource
(values.py draws every tensor on the target device), the fp8 build and the fp8 LoRA fuser read their bf16
originals from the same source, and the text encoders and VAE are made in place (modules.py). Only small
files are written, into `workdir`: the tokenizers (the tiny ones), and with `write_safety_folders` the two
safety models, which safety/checker.py loads from folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weights.synthetic.components import FULL_SIZE, Layers, component
from weights.synthetic.folder import REPOS, write_repo
from weights.synthetic.modules import build_synthetic_module
from weights.synthetic.values import SyntheticTensors
from weights.tiny.flux import SCHEDULER_CONFIGS
from weights.tiny.tokenizers import write_clip_tokenizer, write_t5_tokenizer


class SyntheticStore:
    """FLUX.1 dev and schnell with the real configs and `layers`, values from `seed`."""

    def __init__(self, workdir: Path, layers: Layers = FULL_SIZE, seed: int = 0):
        self.workdir, self.layers, self.seed = Path(workdir), layers, seed
        self._meta: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"SyntheticStore({self.layers}, seed {self.seed})"

    def meta_transformer(self, model: str):
        """The model's transformer on the meta device (shapes and names only)."""
        kind = f"transformer-{model}"
        if kind not in self._meta:
            self._meta[kind] = component(kind).build_on_meta(self.layers)
        return self._meta[kind]

    def transformer_config(self, model: str) -> dict[str, Any]:
        return dict(self.meta_transformer(model).config)

    def transformer_tensors(self, model: str) -> SyntheticTensors:
        return SyntheticTensors(component(f"transformer-{model}"), self.meta_transformer(model), self.seed)

    def shared_components(self, device: torch.device, dtype: torch.dtype, *,
                          t5_device: torch.device | None = None) -> dict[str, Any]:
        """text_encoder, text_encoder_2 (T5, on t5_device when given), tokenizer, tokenizer_2 and vae."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        tokenizers = self.workdir / "tokenizers"
        if not tokenizers.is_dir():
            write_clip_tokenizer(tokenizers / "tokenizer")
            write_t5_tokenizer(tokenizers / "tokenizer_2")
        places = (("text_encoder", "clip", device), ("text_encoder_2", "t5", t5_device or device), ("vae", "vae", device))
        made = {name: build_synthetic_module(kind, place, dtype, self.layers, self.seed) for name, kind, place in places}
        return made | {
            "tokenizer": CLIPTokenizer.from_pretrained(tokenizers / "tokenizer"),
            "tokenizer_2": T5TokenizerFast.from_pretrained(tokenizers / "tokenizer_2"),
        }

    def scheduler(self, model: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[model])

    def write_safety_folders(self, draw_device: str = "cpu") -> dict[str, Path]:
        """Write both safety models (about 0.8 GB, drawn on draw_device) into workdir; stage -> folder."""
        folders = {}
        for stage in ("safety_stage1", "safety_stage2"):
            folders[stage] = self.workdir / REPOS[stage]
            if not folders[stage].is_dir():
                write_repo(stage, folders[stage], self.layers, self.seed, draw_device)
        return folders
