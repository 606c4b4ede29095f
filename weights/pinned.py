"""Pinned host memory in a few large slabs, each tensor a view carved out of one.

torch's caching host allocator (ATen/core/CachingHostAllocator.h) rounds every pinned block up to a power of two
(c10::llvm::PowerOf2Ceil; torch 2.13 skips that above PYTORCH_CUDA_ALLOC_CONF's pinned_max_round_threshold_mb,
which this deployment does not set) and keeps freed blocks for reuse. Pinned tensor by tensor, T5's 80 MiB
feed-forward weights take 128 MiB each: 12.25 GiB for its 8.87, and a transformer's LoRA originals take 34.9 GiB for
22.3. A slab of a power-of-two size is taken as it is, and first fit leaves little unused (counted at full size:
T5 1.04x, all of a transformer's originals 1.02x). `arena_bytes` counts what an arena takes, for the memory plan.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from units import MiB

# holds T5's largest tensor (its 251 MiB embedding); an arena's last slab, partly used, wastes at most this
SLAB_BYTES = 256 * MiB
ALIGNMENT = 256  # every view starts at a multiple: any dtype, and the GPU's copy engines read it at full speed


def caching_host_bytes(blocks: Iterable[int]) -> int:
    """Bytes torch's caching host allocator takes for pinned blocks of these sizes: each rounded up to a power of two."""
    return sum(1 << (size - 1).bit_length() for size in blocks if size > 0)


class _FirstFit:
    """Where blocks go in slabs: the first slab with room, else a new one of `slab_bytes` (or of the block's size
    rounded up to a power of two, for a larger block). Arithmetic only: the arena and the memory plan share it."""

    def __init__(self, slab_bytes: int):
        self.slab_bytes = slab_bytes
        self.capacity: list[int] = []  # of each slab
        self.used: list[int] = []

    def fit(self, nbytes: int) -> int | None:
        """The first slab with room for the block, or None."""
        size = _aligned(nbytes)
        return next((i for i, (used, cap) in enumerate(zip(self.used, self.capacity, strict=True)) if used + size <= cap), None)

    def new_slab(self, nbytes: int) -> int:
        """The capacity of the slab to open for a block that fits nowhere."""
        return max(self.slab_bytes, caching_host_bytes([_aligned(nbytes)]))

    def open(self, capacity: int) -> int:
        self.capacity.append(capacity)
        self.used.append(0)
        return len(self.used) - 1

    def take(self, slab: int, nbytes: int) -> int:
        """Take room for the block in this slab (fit() said it has some); returns its byte offset."""
        offset, self.used[slab] = self.used[slab], self.used[slab] + _aligned(nbytes)
        return offset

    def place(self, nbytes: int) -> None:
        slab = self.fit(nbytes)
        self.take(self.open(self.new_slab(nbytes)) if slab is None else slab, nbytes)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def arena_bytes(blocks: Iterable[int], slab_bytes: int = SLAB_BYTES) -> int:
    """Pinned bytes a PinnedArena takes for tensors of these byte sizes, copied into it in this order."""
    packer = _FirstFit(slab_bytes)
    for nbytes in blocks:
        packer.place(nbytes)
    return caching_host_bytes(packer.capacity)


def spilled_arena_bytes(groups: Iterable[Iterable[int]], device_bytes: int) -> int:
    """Pinned bytes taken when blocks go to the device while its room lasts (each one that fits there; as
    lora.apply.OriginalsBudget.take decides) and the others to an arena per group."""
    left, pinned = device_bytes, 0
    for group in groups:
        host = []
        for nbytes in group:
            if nbytes <= left:
                left -= nbytes
            else:
                host.append(nbytes)
        pinned += arena_bytes(host)
    return pinned


class PinnedArena:
    """Exact host copies of tensors, carved out of slabs of pinned memory (plain host memory when pin is False:
    what the meta device and tests use). The arena keeps its slabs until it is dropped, with its copies."""

    def __init__(self, *, pin: bool = True, slab_bytes: int = SLAB_BYTES):
        self.pin = pin
        self._packer = _FirstFit(slab_bytes)
        self._slabs: list[Tensor] = []

    @property
    def nbytes(self) -> int:
        """Host bytes the slabs take, as the caching host allocator rounds them."""
        return caching_host_bytes(self._packer.capacity)

    def holds(self, tensor: Tensor) -> bool:
        """Whether `tensor` is a view of one of the arena's slabs (already copied there)."""
        # the storages' identity (their StorageImpl), not data_ptr(): that is 0 for every tensor without memory
        return tensor.device.type == "cpu" and any(
            tensor.untyped_storage()._cdata == slab.untyped_storage()._cdata for slab in self._slabs)

    def copy(self, tensor: Tensor) -> Tensor:
        """An exact copy of `tensor` (on any device) in the arena."""
        slab = self._packer.fit(tensor.nbytes)
        if slab is None:
            capacity = self._packer.new_slab(tensor.nbytes)
            self._slabs.append(torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pin))  # may fail: nothing taken yet
            slab = self._packer.open(capacity)
        offset = self._packer.take(slab, tensor.nbytes)
        view = self._slabs[slab][offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        return view.copy_(tensor.detach())
