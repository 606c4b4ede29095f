"""Which weights this process runs: real FLUX from a directory, or the tiny test weights.

- FLUX_WEIGHTS=tiny forces the tiny random weights (tests, CPU demos).
- FLUX_WEIGHTS_DIR=/path points at real weights laid out as in weights/manifest.py (FLUX.1-dev/, FLUX.1-schnell/,
  stable-diffusion-safety-checker/, nsfw_image_detection/). Missing folders are downloaded into it: as
  `<FLUX_WEIGHTS_URL>/<folder>.tar` when that is set (weights/remote.py), otherwise from the Hub.
- Neither set: real weights in the project's model-cache/ when a CUDA GPU is present, otherwise the tiny weights.
- FLUX_SAFETY_WEIGHTS_DIR=/path takes the two safety checker folders from elsewhere (e.g. a tuned checker).

Every folder used is checked before it is trusted (weights/verify.py: headers only, milliseconds), the tiny ones
too. A folder that is all there is used as it is: a restart never touches the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import settings
from weights.manifest import MANIFEST
from weights.verify import verify_weights_folder

log = logging.getLogger(__name__)

# the project folder's (/src/model-cache in an image), whatever the working folder: script/serve runs coglet in its own
DEFAULT_REAL_DIR = Path(__file__).resolve().parent.parent / "model-cache"


@dataclass(frozen=True)
class WeightPaths:
    dev: Path
    schnell: Path
    safety_stage1: Path
    safety_stage2: Path
    tiny: bool


def resolve_weight_paths(cuda_available: bool) -> WeightPaths:
    paths = _flux_weight_paths(cuda_available)
    safety_dir = settings.text("FLUX_SAFETY_WEIGHTS_DIR")
    if safety_dir:
        paths = replace(
            paths,
            safety_stage1=Path(safety_dir) / MANIFEST["safety_stage1"].folder,
            safety_stage2=Path(safety_dir) / MANIFEST["safety_stage2"].folder,
        )
    for folder in (paths.dev, paths.schnell, paths.safety_stage1, paths.safety_stage2):
        verify_weights_folder(folder)
    return paths


def _flux_weight_paths(cuda_available: bool) -> WeightPaths:
    choice = settings.text("FLUX_WEIGHTS").lower()
    directory = settings.text("FLUX_WEIGHTS_DIR")
    if choice == "tiny" or (not directory and not cuda_available and choice != "real"):
        return tiny_weight_paths()
    root = Path(directory) if directory else DEFAULT_REAL_DIR
    paths = {name: root / source.folder for name, source in MANIFEST.items()}
    missing = [name for name, path in paths.items() if not path.is_dir()]
    if missing and settings.is_set("FLUX_WEIGHTS_URL"):
        from weights.remote import fetch_weight_folders

        fetch_weight_folders(root, [MANIFEST[name].folder for name in missing], settings.text("FLUX_WEIGHTS_URL"))
    elif missing:
        download_real_weights(root, missing)
    return WeightPaths(**paths, tiny=False)


def tiny_weight_paths() -> WeightPaths:
    from weights.tiny.flux import default_tiny_root, ensure_tiny_flux
    from weights.tiny.safety import ensure_tiny_safety

    root = default_tiny_root()
    flux = ensure_tiny_flux(root)
    safety = ensure_tiny_safety(root)
    return WeightPaths(
        dev=flux["dev"], schnell=flux["schnell"], safety_stage1=safety["stage1"], safety_stage2=safety["stage2"], tiny=True
    )


def download_real_weights(root: Path, names: list[str]) -> None:
    """Fetch missing components from the Hub (parallel, resumable) into a temp folder, then move into place."""
    from huggingface_hub import snapshot_download

    for name in names:
        source = MANIFEST[name]
        target = root / source.folder
        staging = root / f".{source.folder}.partial"
        log.info("Downloading %s from %s into %s", name, source.repo_id, target)
        snapshot_download(
            source.repo_id,
            local_dir=staging,
            allow_patterns=list(source.allow_patterns),
            max_workers=8,
            endpoint=settings.text("HF_ENDPOINT"),  # huggingface_hub reads it only once, at import
        )
        staging.rename(target)  # only a complete download ever gets the real name
