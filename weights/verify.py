"""Weights checked before they are trusted, at every setup: each .safetensors file holds what its header declares,
and each shard that a `*.safetensors.index.json` names is there and holds the tensors the index names.

Only headers are read, never tensor data, so a folder of real weights is checked in milliseconds. A file cut
short by a full disk or a killed copy, or a shard that never arrived, fails setup here, with the file named and
the fix (delete the folder so that it is fetched again), instead of an obscure error deep in a loader, or worse
a model that loads garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from errors import UserError
from lora.download.checks import check_safetensors


class DamagedWeights(RuntimeError):
    """A weights folder is incomplete or damaged; the message names the file and says how to fix it."""


def verify_weights_folder(folder: Path, *, name: str | None = None, fix: str | None = None) -> int:
    """Checks every .safetensors file and index under `folder`; returns how many .safetensors files it checked.
    Raises DamagedWeights when one does not hold what it declares, or there is none: the message names the file
    as `<name>/<path inside>` (`name`: the folder's own name by default) and ends with `fix` (default: delete
    the folder so that setup fetches it again)."""
    name = name or folder.name
    fix = fix or f"Delete the folder {folder} so that setup fetches it again, or restore it from a good copy."
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise DamagedWeights(f"{name} holds no .safetensors file: it is not a complete weights folder. {fix}")
    for path in files:
        try:
            check_safetensors(path, input_name=_shown(path, folder, name))
        except UserError as error:
            advice = str(error).removesuffix("; try again")  # a LoRA's advice; a folder has its own fix
            raise DamagedWeights(f"{advice}. {fix}") from None
    for index in sorted(folder.rglob("*.safetensors.index.json")):
        _check_index(index, folder, name, fix)
    return len(files)


def _check_index(index: Path, folder: Path, name: str, fix: str) -> None:
    """Every shard the index names exists next to it and holds every tensor the index assigns to it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        wanted: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            wanted.setdefault(shard, set()).add(tensor)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedWeights(f"{_shown(index, folder, name)} is not a readable safetensors index. {fix}") from None
    for shard, tensors in sorted(wanted.items()):
        path = index.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise DamagedWeights(
                f"{_shown(path, folder, name)} is missing: {_shown(index, folder, name)} names it. {fix}"
            )
        with safe_open(path, framework="numpy") as opened:  # the header only; the data stays on disk
            absent = tensors - set(opened.keys())
        if absent:
            example = sorted(absent)[0]
            raise DamagedWeights(
                f"{_shown(path, folder, name)} lacks {len(absent)} tensor(s) that {_shown(index, folder, name)} puts there "
                f"(e.g. {example!r}). {fix}"
            )


def _shown(path: Path, folder: Path, name: str) -> str:
    """The file as messages show it: the weights folder's name and the path inside it."""
    return str(Path(name) / path.relative_to(folder))
