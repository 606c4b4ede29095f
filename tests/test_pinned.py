"""weights/pinned.py: pinned host memory counted as torch's caching host allocator takes it (each block rounded
up to a power of two), and an arena of few slabs whose views are exact copies and take little more than their sum."""

from __future__ import annotations

import pytest
import torch

from units import KiB, MiB
from weights.pinned import ALIGNMENT, SLAB_BYTES, PinnedArena, arena_bytes, caching_host_bytes, spilled_arena_bytes


def test_the_caching_host_allocator_rounds_each_block_up_to_a_power_of_two():
    assert caching_host_bytes([1, 2, 3, 1000, 0]) == 1 + 2 + 4 + 1024
    assert caching_host_bytes([80 * MiB, 32 * MiB, 251 * MiB]) == 128 * MiB + 32 * MiB + 256 * MiB
    assert caching_host_bytes([]) == 0


def t5_like_blocks() -> list[int]:
    """T5 XXL's tensors in bf16, in module order: the token embedding, then per layer q, k, v, o (4096x4096), the
    gated feed-forward (two 4096x10240 in, one out) and two norms; the relative position bias; the final norm."""
    layer = [4096 * 4096 * 2] * 4 + [4096 * 2] + [4096 * 10240 * 2] * 3 + [4096 * 2]
    return [32128 * 4096 * 2, 32 * 64 * 2, *layer * 24, 4096 * 2]


def test_t5_in_an_arena_takes_little_more_than_its_size_and_pinned_one_by_one_over_a_third_more():
    blocks = t5_like_blocks()
    assert sum(blocks) / 2**30 == pytest.approx(8.87, abs=0.01)
    assert caching_host_bytes(blocks) / sum(blocks) > 1.37  # tensor by tensor, as flux/offload.py pinned before
    assert arena_bytes(blocks) / sum(blocks) < 1.07
    assert arena_bytes(blocks) % SLAB_BYTES == 0  # whole slabs, which the allocator does not round further


def test_the_arenas_views_are_exact_copies_in_few_aligned_slabs():
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(300, 7, generator=generator).to(torch.bfloat16),
        torch.randn(5, generator=generator),
        torch.randn(4, 6, generator=generator).t(),  # not contiguous
        torch.tensor(3.5, dtype=torch.float64),  # 0-dim
        torch.arange(10, dtype=torch.int64),
        torch.empty(0, 3),
        torch.randn(2000, generator=generator).to(torch.float16),
    ]
    arena = PinnedArena(pin=False, slab_bytes=4 * KiB)
    copies = [arena.copy(tensor) for tensor in tensors]
    for tensor, copy in zip(tensors, copies, strict=True):
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and torch.equal(copy, tensor)
        assert copy.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        assert copy.storage_offset() * copy.element_size() % ALIGNMENT == 0
    slabs = {copy.untyped_storage().data_ptr(): copy.untyped_storage().nbytes() for copy in copies if copy.numel()}
    assert sum(slabs.values()) == arena.nbytes == arena_bytes([t.nbytes for t in tensors], slab_bytes=4 * KiB)
    assert len(slabs) < len(tensors)
    copies[0].zero_()  # a view, not a copy of the slab: its neighbours keep their values
    assert torch.equal(copies[1], tensors[1])


def test_a_block_larger_than_a_slab_gets_its_own_and_the_rest_fit_first():
    arena = PinnedArena(pin=False, slab_bytes=1 * KiB)
    big, small = torch.ones(700, dtype=torch.int16), torch.ones(100, dtype=torch.int16)  # 1400 and 200 bytes
    copies = arena.copy(big), arena.copy(small), arena.copy(small)
    assert arena.nbytes == 2 * KiB  # the big one's slab is rounded to 2 KiB, with room for both small ones
    assert len({copy.untyped_storage().data_ptr() for copy in copies}) == 1


def test_a_slab_that_cannot_be_allocated_leaves_the_arena_as_it_was(monkeypatch):
    arena, real_empty = PinnedArena(pin=False, slab_bytes=1 * KiB), torch.empty

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "empty", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        arena.copy(torch.ones(4))
    assert arena.nbytes == 0
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(arena.copy(torch.ones(4)), torch.ones(4)) and arena.nbytes == 1 * KiB


def test_blocks_spill_to_an_arena_per_group_once_the_device_room_is_used():
    slab = SLAB_BYTES
    assert spilled_arena_bytes([[100, 100], [100]], device_bytes=300) == 0
    assert spilled_arena_bytes([[100, 100], [100]], device_bytes=150) == 2 * slab  # one block of each group spills
    assert spilled_arena_bytes([[100, 50]], device_bytes=60) == slab  # the 50 still fits on the device
