"""Where the real weights come from, and the folder names they are kept under.

Each entry is a Hugging Face repo in diffusers/transformers layout. FLUX.1-dev is gated: accept its licence on
the Hub and set HF_TOKEN. Only the files the loaders read are fetched (no duplicate single-file checkpoints).
With FLUX_WEIGHTS_URL set, each folder comes instead as `<base>/<folder>.tar` (weights/remote.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSource:
    folder: str  # name under the weights directory
    repo_id: str
    allow_patterns: tuple[str, ...]


_DIFFUSERS_REPO = ("model_index.json", "*/config.json", "*/*.safetensors", "*/*.json", "*/*.txt", "*/*.model")

MANIFEST: dict[str, WeightSource] = {
    "dev": WeightSource("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", _DIFFUSERS_REPO),
    "schnell": WeightSource("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", ("model_index.json", "transformer/*", "scheduler/*")),
    "safety_stage1": WeightSource(
        "stable-diffusion-safety-checker",
        "CompVis/stable-diffusion-safety-checker",
        ("config.json", "preprocessor_config.json", "model.safetensors"),
    ),
    "safety_stage2": WeightSource(
        "nsfw_image_detection",
        "Falconsai/nsfw_image_detection",
        ("config.json", "preprocessor_config.json", "model.safetensors"),
    ),
}
