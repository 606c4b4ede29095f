"""weights/store.py's SafetensorsFolder: a shard is unmapped once a pass has read its last tensor."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weights.store import SafetensorsFolder

MAPS = Path("/proc/self/maps")
pytestmark = pytest.mark.skipif(not MAPS.exists(), reason="needs Linux's /proc/self/maps")


def mapped(file: Path) -> bool:
    return str(file.resolve()) in MAPS.read_text()


def test_a_full_pass_leaves_no_shard_mapped_and_reading_again_works(tmp_path):
    tensors = {name: torch.randn(64, 64, dtype=torch.bfloat16) for name in ("a.weight", "b.weight")}
    file = tmp_path / "model.safetensors"
    save_file(tensors, file)
    source = SafetensorsFolder(tmp_path)
    first, last = source.names()
    assert not mapped(file)  # listing the names keeps nothing open

    kept = {first: source.read(first, "cpu", torch.float32)}
    assert mapped(file)  # mid-pass the shard stays open: one mapping for all its tensors
    kept[last] = source.read(last, "cpu", torch.float32)
    assert not mapped(file)  # the fp32 copies hold no reference to the file's pages

    again = source.read(first, "cpu", torch.float32)
    for name, tensor in kept.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, tensors[name].float())
    assert torch.equal(again, kept[first])
