"""Weights checked at setup before they are trusted: files cut short, shards missing or lacking tensors fail setup
with the file named and the fix; complete folders pass."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from weights.verify import DamagedWeights, verify_weights_folder

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def weights_root(tiny_weights, tmp_path, monkeypatch):
    """A real-weights folder holding copies of the tiny folders, set up as FLUX_WEIGHTS_DIR."""
    root = tmp_path / "weights"
    for path in (tiny_weights.dev, tiny_weights.schnell, tiny_weights.safety_stage1, tiny_weights.safety_stage2):
        shutil.copytree(path, root / path.name)
    monkeypatch.setenv("FLUX_WEIGHTS", "real")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(root))
    monkeypatch.delenv("FLUX_WEIGHTS_URL", raising=False)
    return root


def sharded(folder: Path) -> Path:
    """A component saved as two shards and an index, as from_pretrained writes big models."""
    folder.mkdir(parents=True)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": np.ones((4, 4), np.float32), "b.weight": np.zeros(3, np.float32)},
        "model-00002-of-00002.safetensors": {"c.weight": np.arange(6, dtype=np.float32)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
        weight_map |= dict.fromkeys(tensors, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_complete_folders_pass(tiny_weights, tmp_path):
    assert verify_weights_folder(tiny_weights.dev) == 4  # transformer, two text encoders, VAE
    assert verify_weights_folder(sharded(tmp_path / "big" / "text_encoder_2").parent) == 2


def test_a_cut_short_file_fails_setup_naming_it(weights_root):
    """Through the real setup: it fails before any model loads."""
    from predict import Predictor

    path = weights_root / "FLUX.1-dev" / TRANSFORMER
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - 1)
    with pytest.raises(DamagedWeights) as failure:
        Predictor().setup()
    message = str(failure.value)
    assert f"FLUX.1-dev/{TRANSFORMER}" in message and "incomplete or damaged" in message
    assert f"Delete the folder {weights_root / 'FLUX.1-dev'} so that setup fetches it again" in message


def test_a_file_longer_than_its_header_declares_fails(weights_root):
    from weights.locations import resolve_weight_paths

    with (weights_root / "nsfw_image_detection" / "model.safetensors").open("ab") as file:
        file.write(b"\0" * 8)
    with pytest.raises(DamagedWeights, match=re.escape("nsfw_image_detection/model.safetensors")):
        resolve_weight_paths(cuda_available=False)


def test_a_missing_index_shard_fails_naming_it(tmp_path):
    folder = sharded(tmp_path / "FLUX.1-dev" / "text_encoder_2")
    (folder / "model-00002-of-00002.safetensors").unlink()
    shard = "FLUX.1-dev/text_encoder_2/model-00002-of-00002.safetensors"
    with pytest.raises(DamagedWeights, match=re.escape(f"{shard} is missing")):
        verify_weights_folder(tmp_path / "FLUX.1-dev")


def test_a_shard_without_the_tensors_its_index_names_fails(tmp_path):
    folder = sharded(tmp_path / "FLUX.1-dev" / "text_encoder_2")
    save_file({"other.weight": np.ones(2, np.float32)}, folder / "model-00002-of-00002.safetensors")
    with pytest.raises(DamagedWeights, match=re.escape("lacks 1 tensor(s)") + ".*'c.weight'"):
        verify_weights_folder(tmp_path / "FLUX.1-dev")


def test_an_unreadable_index_or_a_folder_without_weights_fails(tmp_path):
    folder = sharded(tmp_path / "FLUX.1-dev" / "text_encoder_2")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(DamagedWeights, match="not a readable safetensors index"):
        verify_weights_folder(tmp_path / "FLUX.1-dev")
    (tmp_path / "empty" / "vae").mkdir(parents=True)
    with pytest.raises(DamagedWeights, match="holds no .safetensors file"):
        verify_weights_folder(tmp_path / "empty")
