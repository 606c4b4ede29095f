"""Writing safetensors files tensor by tensor, sharded as the libraries shard, at disk speed.

The safetensors format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}, "__metadata__": {...}}, padded with spaces to a multiple of 8) and the raw bytes of each tensor
in offset order. The header follows from the shapes alone, so it is written first and each tensor's bytes are
made and written one at a time: no file, shard or model is ever held in memory. One writer thread writes while
the caller makes the next tensor, so drawing and writing overlap; each file is fsynced before it counts as done.

Shards: huggingface_hub's split_torch_state_dict_into_shards, the rule diffusers' and transformers'
save_pretrained use (greedy in stored order, a new shard when the next tensor would pass max_shard_size). One
shard is one plain file without an index, as save_pretrained writes it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from weights.tiny.repo_build import write_json

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
METADATA = {"format": "pt"}
WRITES_IN_FLIGHT = 2  # tensors made but not yet written: enough to overlap, little memory


def header_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """The length prefix and JSON header of a file holding these tensors (in this order) in `dtype`."""
    header: dict[str, object] = {"__metadata__": METADATA}
    offset = 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make: Callable[[str], Tensor]
) -> int:
    """Write `path` with make(name) for each tensor (any device; it must have the declared shape and dtype).
    Returns the bytes of tensor data written."""
    written = 0
    with open(path, "wb") as file, ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer") as pool:
        file.write(header_bytes(shapes, dtype))
        pending: deque = deque()
        for name, shape in shapes.items():
            tensor = make(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            pending.append(pool.submit(file.write, memoryview(data)))
            while len(pending) > WRITES_IN_FLIGHT:
                written += pending.popleft().result()
        while pending:
            written += pending.popleft().result()
        file.flush()
        os.fsync(file.fileno())
    return written


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, pattern: str, max_shard_size: str):
    """huggingface_hub's split of these tensors (a StateDictSplit: filename_to_tensors, is_sharded, ...)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    on_meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()}
    return split_torch_state_dict_into_shards(on_meta, filename_pattern=pattern, max_shard_size=max_shard_size)


def write_sharded(
    directory: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make: Callable[[str], Tensor], *,
    pattern: str, max_shard_size: str,
) -> int:
    """Write the tensors into shards named by `pattern` ("model{suffix}.safetensors"), with the index JSON
    save_pretrained writes when there is more than one. Returns the bytes of tensor data written."""
    split = plan_shards(shapes, dtype, pattern, max_shard_size)
    written = 0
    for filename, names in split.filename_to_tensors.items():
        written += write_safetensors(directory / filename, {name: shapes[name] for name in names}, dtype, make)
    if split.is_sharded:
        total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        write_json(directory / (pattern.format(suffix="") + ".index.json"), index)
    return written
