"""A synthetic weights folder, laid out as FLUX_WEIGHTS_DIR expects (weights/manifest.py):

    FLUX.1-dev/       model_index.json, scheduler/, text_encoder/ (CLIP-L), text_encoder_2/ (T5 XXL encoder),
                      tokenizer/, tokenizer_2/, transformer/, vae/
    FLUX.1-schnell/   model_index.json, scheduler/, transformer/  (what the manifest fetches of it)
    stable-diffusion-safety-checker/, nsfw_image_detection/   config.json, preprocessor_config.json, model.safetensors

Real configs (components.py), bf16 shards as the real repos are sharded (shards.py), random values (values.py).
The tokenizers are the tiny ones (their ids are below the real vocab sizes); the schedulers, model index and
preprocessor configs are the real ones. Each repo is built in a staging folder and renamed when complete, with
a marker naming the layer counts and the seed, so a different request or a changed builder rebuilds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weights.manifest import MANIFEST
from weights.synthetic.components import FULL_SIZE, MAX_SHARD_SIZE, WEIGHTS_FILE, Component, Layers, components
from weights.synthetic.shards import write_sharded
from weights.synthetic.values import STORED_DTYPE, SyntheticTensors
from weights.tiny.flux import MODEL_INDEX, SCHEDULER_CONFIGS
from weights.tiny.repo_build import RepoBuild, write_json
from weights.tiny.safety import STAGE1_PREPROCESSOR, STAGE2_PREPROCESSOR
from weights.tiny.tokenizers import write_clip_tokenizer, write_t5_tokenizer

BUILDER_VERSION = "1"  # bump whenever the generated files change, so existing folders are rebuilt
REPOS = {"dev": MANIFEST["dev"].folder, "schnell": MANIFEST["schnell"].folder,
         "safety_stage1": MANIFEST["safety_stage1"].folder, "safety_stage2": MANIFEST["safety_stage2"].folder}
PREPROCESSORS = {"safety_stage1": STAGE1_PREPROCESSOR, "safety_stage2": STAGE2_PREPROCESSOR}


def repo_build(layers: Layers, seed: int) -> RepoBuild:
    return RepoBuild("synthetic-flux", version=f"{BUILDER_VERSION} {layers.double}/{layers.single}/{layers.t5} seed {seed}")


@dataclass
class WriteReport:
    """What a build wrote: bytes of tensor data and the seconds spent (0 and 0 when the folder was current)."""

    tensor_bytes: int = 0
    seconds: float = 0.0

    def add(self, other: WriteReport) -> None:
        self.tensor_bytes += other.tensor_bytes
        self.seconds += other.seconds


def ensure_synthetic_folder(
    root: Path, layers: Layers = FULL_SIZE, seed: int = 0, draw_device: str = "cpu",
    log: Callable[[str], None] = lambda line: None,
) -> WriteReport:
    """Build every repo under root that is missing, unfinished or from another request (see the module docstring)."""
    root = Path(root)
    report = WriteReport()

    def writer(repo: str) -> Callable[[Path], None]:
        return lambda directory: report.add(write_repo(repo, directory, layers, seed, draw_device, log))

    repo_build(layers, seed).ensure(root, {root / folder: writer(repo) for repo, folder in REPOS.items()})
    return report


def write_repo(repo: str, directory: Path, layers: Layers, seed: int, draw_device: str = "cpu",
               log: Callable[[str], None] = lambda line: None) -> WriteReport:
    """One repo (a key of REPOS) into the new folder `directory`."""
    directory.mkdir(parents=True)
    report = WriteReport()
    folder = REPOS[repo]
    if repo in ("dev", "schnell"):
        write_json(directory / "model_index.json", MODEL_INDEX)
        _write_scheduler(directory / "scheduler", repo)
    if repo == "dev":
        write_clip_tokenizer(directory / "tokenizer")
        write_t5_tokenizer(directory / "tokenizer_2")
    if repo in PREPROCESSORS:
        write_json(directory / "preprocessor_config.json", PREPROCESSORS[repo])
    for item in components():
        if item.key == folder or item.key.startswith(folder + "/"):
            target = directory / item.key.removeprefix(folder).lstrip("/")
            report.add(write_component(item, target, layers, seed, draw_device))
            log(f"  {item.key}: {report.tensor_bytes / 1e9:.2f} GB so far, {report.seconds:.1f}s")
    return report


def write_component(item: Component, directory: Path, layers: Layers, seed: int, draw_device: str = "cpu") -> WriteReport:
    """One model folder: config.json and its bf16 weights, drawn on draw_device tensor by tensor."""
    started = time.perf_counter()
    model = item.build_on_meta(layers)
    directory.mkdir(parents=True, exist_ok=True)
    item.write_config(model, directory)
    source = SyntheticTensors(item, model, seed)
    stored = item.stored_names(model)  # stored name -> parameter name
    params = dict(model.named_parameters())
    shapes = {stored_name: tuple(params[name].shape) for stored_name, name in stored.items()}
    written = write_sharded(
        directory, shapes, STORED_DTYPE, lambda stored_name: source.read(stored[stored_name], draw_device),
        pattern=WEIGHTS_FILE[item.library], max_shard_size=MAX_SHARD_SIZE[item.library],
    )
    return WriteReport(written, time.perf_counter() - started)


def _write_scheduler(directory: Path, model: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[model]).save_pretrained(directory)
