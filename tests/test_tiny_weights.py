"""The tiny FLUX repos: real layout, dev vs schnell differences, determinism, safe builds, and that they run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weights.tiny import flux as tiny

REPO_ROOT = Path(__file__).resolve().parent.parent

# What black-forest-labs/FLUX.1-dev and FLUX.1-schnell hold that FluxPipeline.from_pretrained reads
# (the real repos shard the big safetensors; a single file is what save_pretrained writes at this size).
EXPECTED_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.ensure_tiny_flux(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="module")
def dev_pipe(repos: dict[str, Path]):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(repos["dev"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def repo_files(repo_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(repo_dir)): path.read_bytes() for path in repo_dir.rglob("*") if path.is_file()}


def assert_usable_image(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.size == size
    pixels = np.asarray(image)
    assert pixels.std() > 1, "a constant image means the pipeline produced NaNs or zeros"


def test_paths_are_named_like_the_hub_repos(repos: dict[str, Path]) -> None:
    assert repos["dev"].name == "FLUX.1-dev"
    assert repos["schnell"].name == "FLUX.1-schnell"
    assert repos["dev"].parent == repos["schnell"].parent


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_layout_has_every_file_the_pipeline_reads(repos: dict[str, Path], variant: str) -> None:
    repo_dir = repos[variant]
    missing = [name for name in EXPECTED_FILES if not (repo_dir / name).is_file()]
    assert missing == []
    index = read_json(repo_dir / "model_index.json")
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


def test_vae_is_shaped_like_fluxs(repos: dict[str, Path]) -> None:
    config = read_json(repos["dev"] / "vae" / "config.json")
    assert len(config["block_out_channels"]) == 4
    assert config["latent_channels"] * 4 == read_json(repos["dev"] / "transformer" / "config.json")["in_channels"]
    assert config["scaling_factor"] == pytest.approx(0.3611)
    assert config["shift_factor"] == pytest.approx(0.1159)


def test_schedulers_match_the_real_configs(repos: dict[str, Path]) -> None:
    dev = read_json(repos["dev"] / "scheduler" / "scheduler_config.json")
    schnell = read_json(repos["schnell"] / "scheduler" / "scheduler_config.json")
    assert dev["use_dynamic_shifting"] is True
    assert (dev["base_shift"], dev["max_shift"], dev["shift"]) == (0.5, 1.15, 3.0)
    assert (dev["base_image_seq_len"], dev["max_image_seq_len"]) == (256, 4096)
    assert schnell["use_dynamic_shifting"] is False
    assert schnell["shift"] == 1.0


def test_dev_has_a_guidance_embedding_and_schnell_does_not(repos: dict[str, Path]) -> None:
    from safetensors import safe_open

    def guidance_keys(variant: str) -> list[str]:
        weights = repos[variant] / "transformer" / "diffusion_pytorch_model.safetensors"
        with safe_open(weights, "pt") as handle:
            return [key for key in handle.keys() if "guidance_embedder" in key]

    assert read_json(repos["dev"] / "transformer" / "config.json")["guidance_embeds"] is True
    assert read_json(repos["schnell"] / "transformer" / "config.json")["guidance_embeds"] is False
    assert guidance_keys("dev")
    assert guidance_keys("schnell") == []


def test_dev_and_schnell_share_encoders_tokenizers_and_vae_but_not_the_transformer(repos: dict[str, Path]) -> None:
    dev, schnell = repo_files(repos["dev"]), repo_files(repos["schnell"])
    for name in dev:
        if name.split("/")[0] in tiny.SHARED_COMPONENTS:
            assert dev[name] == schnell[name], name
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert dev[weights] != schnell[weights]


def test_weights_are_fp32_holding_bf16_exact_values(repos: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    for component in ("transformer", "vae"):
        tensors = load_file(repos["dev"] / component / "diffusion_pytorch_model.safetensors")
        for name, tensor in tensors.items():
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor.bfloat16().float(), tensor), name


def test_builds_in_other_processes_at_once_are_byte_identical(repos: dict[str, Path], tmp_path: Path) -> None:
    # Two CLI processes race for one root (the lock makes one wait), with different hash seeds so
    # anything that depends on set or dict-of-hash order shows up as a difference.
    root = tmp_path / "raced"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "weights.tiny.flux", str(root)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert f"dev: {root / 'FLUX.1-dev'}" in stdout
    assert [path.name for path in root.iterdir() if path.name.startswith(tiny.PARTIAL_PREFIX)] == []
    for variant, repo_dir in repos.items():
        assert repo_files(root / repo_dir.name) == repo_files(repo_dir), variant


def test_a_present_build_is_reused_without_rebuilding(repos: dict[str, Path]) -> None:
    def inodes() -> dict[Path, int]:
        return {path: path.stat().st_ino for repo in repos.values() for path in repo.rglob("*")}

    before = inodes()
    assert tiny.ensure_tiny_flux(repos["dev"].parent) == repos
    assert inodes() == before  # a rebuild renames new folders and files into place


@pytest.mark.parametrize("damage", ["no_marker", "old_version", "no_target"])
def test_an_unfinished_or_outdated_build_is_replaced(repos: dict[str, Path], tmp_path: Path, damage: str) -> None:
    root = tmp_path / "root"
    for repo_dir in repos.values():
        shutil.copytree(repo_dir, root / repo_dir.name)
    # What a killed build leaves: a staging folder, and (before the marker) a repo that looks almost whole.
    leftover = root / (tiny.PARTIAL_PREFIX + "killed")
    leftover.mkdir()
    (leftover / "junk").write_text("half written")
    dev = root / "FLUX.1-dev"
    if damage == "no_target":
        shutil.rmtree(dev)
    else:
        (dev / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
        marker = dev / tiny.MARKER_FILE
        if damage == "no_marker":
            marker.unlink()
        else:
            marker.write_text("0")

    assert tiny.ensure_tiny_flux(root)["dev"] == dev

    assert not leftover.exists()
    assert (dev / tiny.MARKER_FILE).read_text() == tiny.FORMAT_VERSION
    assert repo_files(dev) == repo_files(repos["dev"])


def test_default_root_is_the_env_var_or_the_git_ignored_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLUX_TINY_WEIGHTS_DIR", str(tmp_path))
    assert tiny.default_tiny_root() == tmp_path
    monkeypatch.delenv("FLUX_TINY_WEIGHTS_DIR")
    assert tiny.default_tiny_root() == REPO_ROOT / ".cache" / "tiny-weights"


def test_tokenizers_load_and_pad_to_fluxs_lengths(dev_pipe) -> None:
    clip, t5 = dev_pipe.tokenizer, dev_pipe.tokenizer_2
    assert clip.model_max_length == 77
    # Trained on prompt-like text, common words are whole tokens (CLIP lower-cases, T5 keeps case).
    assert clip.tokenize("a photo of TOK") == ["a</w>", "photo</w>", "of</w>", "tok</w>"]
    assert t5.tokenize("a photo of TOK") == ["▁a", "▁photo", "▁of", "▁TOK"]
    for max_length in (512, 256):
        ids = t5(["a photo", "word " * 600], padding="max_length", max_length=max_length, truncation=True).input_ids
        assert [len(row) for row in ids] == [max_length, max_length]
        assert ids[0][-1] == t5.pad_token_id
        assert ids[1][-1] == t5.eos_token_id
    ids = clip(["a photo"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == clip.bos_token_id
    assert dev_pipe.text_encoder.config.vocab_size == len(clip)
    assert dev_pipe.text_encoder_2.config.vocab_size == len(t5)


def test_vae_downscales_by_eight(dev_pipe) -> None:
    assert dev_pipe.vae_scale_factor == 8
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        latents = dev_pipe.vae.encode(image).latent_dist.mode()
        decoded = dev_pipe.vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 6)
    assert decoded.shape == image.shape


def test_dev_generates_a_1024_image_in_4_steps(dev_pipe) -> None:
    generator = torch.Generator().manual_seed(0)
    result = dev_pipe("a photo of TOK", height=1024, width=1024, num_inference_steps=4, guidance_scale=3.5,
                      generator=generator)
    assert_usable_image(result.images[0], (1024, 1024))


def test_dev_is_reproducible_and_follows_the_prompt(dev_pipe) -> None:
    def generate(prompt: str) -> np.ndarray:
        generator = torch.Generator().manual_seed(7)
        image = dev_pipe(prompt, height=256, width=256, num_inference_steps=2, generator=generator).images[0]
        return np.asarray(image)

    first = generate("a photo of TOK")
    assert np.array_equal(first, generate("a photo of TOK"))
    assert not np.array_equal(first, generate("a watercolor painting of a lighthouse"))


def test_schnell_generates_with_256_tokens(repos: dict[str, Path]) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(repos["schnell"])
    pipe.set_progress_bar_config(disable=True)
    result = pipe("a photo of TOK", height=256, width=384, num_inference_steps=4, guidance_scale=0.0,
                  max_sequence_length=256, generator=torch.Generator().manual_seed(0))
    assert_usable_image(result.images[0], (384, 256))


def test_img2img_and_inpaint_pipelines_run_from_the_same_components(dev_pipe) -> None:
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    pixels = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    source = Image.fromarray(pixels)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    common = dict(prompt="a photo of TOK", image=source, strength=0.8, height=256, width=256,
                  num_inference_steps=4, guidance_scale=3.5)

    img2img = FluxImg2ImgPipeline.from_pipe(dev_pipe)
    img2img.set_progress_bar_config(disable=True)
    assert_usable_image(img2img(**common, generator=torch.Generator().manual_seed(0)).images[0], (256, 256))

    inpaint = FluxInpaintPipeline.from_pipe(dev_pipe)
    inpaint.set_progress_bar_config(disable=True)
    result = inpaint(**common, mask_image=mask, generator=torch.Generator().manual_seed(0))
    assert_usable_image(result.images[0], (256, 256))
