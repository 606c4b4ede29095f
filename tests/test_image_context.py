"""What `cog build` sends to Docker and copies into the image: this folder minus what .dockerignore names, computed
with Docker's own rules (docker-py's `exclude_paths`, not .gitignore's). Nothing over 10 MB may be sent but the
weights meant for the image, on this checkout and on a folder laid out as one that has run the whole suite."""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from pathlib import Path

from docker.utils.build import exclude_paths

from units import MB

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 10 * MB
WEIGHTS_FOR_THE_IMAGE = {"model-cache", "compile-cache"}  # docs/image.md: baked weights and compile cache


def dockerignore_patterns(root: Path) -> list[str]:
    """The patterns as Docker reads them: one a line, blank lines and `#` comments skipped."""
    path = root / ".dockerignore"
    lines = [line.strip() for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line and not line.startswith("#")]


def sent_files(root: Path) -> dict[str, int]:
    """Every regular file the build context holds, with its size. Symlinks are sent as links (Docker does not follow
    them), so they weigh nothing here."""
    files = {}
    for relative in exclude_paths(str(root), dockerignore_patterns(root)):
        mode = os.lstat(root / relative)
        if stat.S_ISREG(mode.st_mode):
            files[relative] = mode.st_size
    return files


def oversized(root: Path) -> dict[str, int]:
    """Top-level entries of the context over LIMIT in all, other than the weights meant for the image."""
    totals: dict[str, int] = defaultdict(int)
    for relative, size in sent_files(root).items():
        totals[Path(relative).parts[0]] += size
    return {top: size for top, size in totals.items() if size > LIMIT and top not in WEIGHTS_FOR_THE_IMAGE}


def test_this_checkout_sends_nothing_large_but_weights() -> None:
    assert oversized(ROOT) == {}
    assert {"predict.py", "cog.yaml", "requirements.txt", ".cog/openapi_schema.json"} <= set(sent_files(ROOT))


# A folder after `script/test`, `script/predict` and a compile cache baked in, with one large file where each tool
# leaves its output (sparse: the size is what Docker would send, not disk used here).
ARTEFACTS = [
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
    ".venv-checkov/lib/python3.11/site-packages/boto3/data.json",
    ".cache/real-width-weights/FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors",
    ".cache/tiny-weights/FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors",
    ".cache/compile-cache/torch-2.11.0-cpu.bin",
    ".cache/wheels/torchao-0.18.0-py3-none-any.whl",
    ".git/objects/pack/pack-1.pack",
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.17.6/cache",
    ".hypothesis/examples/0/1",
    "flux/__pycache__/generate.cpython-311.pyc",
    "output.0.webp",
    "out-0.png",
]
KEPT = [
    "model-cache/FLUX.1-dev/transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "compile-cache/torch-2.11.0-NVIDIA-H100.bin",
]
SOURCE = ["predict.py", "cog.yaml", ".cog/openapi_schema.json", "flux/generate.py", "weights/tiny/__init__.py",
          "script/serve", "deploy/kubernetes.yaml"]


def folder_after_the_suite(root: Path) -> Path:
    for relative in ARTEFACTS + KEPT + SOURCE:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            file.truncate(2 * LIMIT if relative in ARTEFACTS + KEPT else 100)
    return root


def test_a_folder_that_ran_the_suite_sends_its_source_and_the_weights_only(tmp_path: Path) -> None:
    root = folder_after_the_suite(tmp_path / "project")
    (root / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    sent = set(sent_files(root))
    assert oversized(root) == {}
    assert sorted(sent & set(ARTEFACTS)) == []
    assert set(KEPT + SOURCE) <= sent


def test_without_a_dockerignore_the_artefacts_would_be_sent(tmp_path: Path) -> None:
    root = folder_after_the_suite(tmp_path / "project")
    tops = {Path(relative).parts[0] for relative in ARTEFACTS}
    assert set(oversized(root)) == tops
