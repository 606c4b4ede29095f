"""The simulated GPU itself (tests/fixtures/simulated_gpu): torch.cuda's answers, the memory counters on known
allocations, and the failures a GPU has that a CPU fake would let pass."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from flux.fast.cards import CARDS, card
from tests.fixtures.simulated_gpu import is_cuda_fake, simulated_gpu
from tests.fixtures.simulated_gpu.memory import CUDA_CONTEXT, PinnedMemory, format_size
from units import GiB, MiB


@pytest.fixture
def gpu():
    with simulated_gpu("H100") as simulated:
        yield simulated


def test_the_card_table_answers_each_cards_name_capability_and_memory():
    h100 = card("H100")
    assert (h100.name, h100.capability, round(h100.total_gib, 1)) == ("NVIDIA H100 80GB HBM3", (9, 0), 79.6)
    assert card("T4").capability == (7, 5) and card("B200").capability == (10, 0)
    assert 22 < card("A10G").total_gib < 23 and 22 < card("L4").total_gib < 23
    assert len({item.short for item in CARDS}) == len(CARDS) == 13
    assert all(item.total_bytes % MiB == 0 for item in CARDS)
    with pytest.raises(KeyError, match="known: T4"):
        card("V100")


@pytest.mark.parametrize("short", ["T4", "L40S", "B200"])
def test_torch_cuda_reports_the_card_inside_and_nothing_after(short):
    with simulated_gpu(short) as gpu:
        properties = torch.cuda.get_device_properties(0)
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        assert torch.cuda.get_device_name() == properties.name == gpu.card.name
        assert torch.cuda.get_device_capability() == (properties.major, properties.minor) == gpu.card.capability
        assert properties.total_memory == gpu.card.total_bytes
        assert torch.cuda.mem_get_info() == (gpu.card.total_bytes - CUDA_CONTEXT, gpu.card.total_bytes)
    assert not torch.cuda.is_available()
    assert torch.Generator is torch._C.Generator


def test_a_tensor_is_counted_once_with_its_views_and_freed_when_it_goes(gpu):
    tensor = torch.zeros(1024, 1024, device="cuda", dtype=torch.bfloat16)
    assert is_cuda_fake(tensor) and tensor.device == torch.device("cuda", 0)
    views = [tensor[0], tensor[:, 1:3], tensor.view(-1), tensor.t()]
    assert gpu.allocated == torch.cuda.memory_allocated() == 2 * MiB
    assert [tuple(v.shape) for v in views] == [(1024,), (1024, 2), (1024 * 1024,), (1024, 1024)]
    copy = tensor.float()  # a new storage: 4 MiB more
    assert gpu.allocated == 6 * MiB
    del tensor, views, copy
    gc.collect()
    assert gpu.allocated == 0
    assert gpu.peak == torch.cuda.max_memory_allocated() == 6 * MiB
    torch.cuda.reset_peak_memory_stats()
    assert gpu.peak == 0


def test_an_allocation_past_the_card_raises_torchs_out_of_memory_error():
    with simulated_gpu("T4") as gpu:
        room = gpu.card.total_bytes - CUDA_CONTEXT
        kept = torch.empty(room - MiB, dtype=torch.uint8, device="cuda")
        torch.empty(MiB, dtype=torch.uint8, device="cuda")  # exactly full: fits
        with pytest.raises(torch.OutOfMemoryError) as error:
            torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        assert str(error.value).startswith(
            f"CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of {format_size(gpu.card.total_bytes)} "
            "of which 1024.00 KiB is free.")  # torch writes 1 MiB so
        assert gpu.allocated == kept.nbytes  # the failed allocation is not counted
        with gpu.capacity(kept.nbytes):  # a smaller card for a while
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(1, device="cuda")


def test_pinned_blocks_are_counted_as_the_caching_host_allocator_takes_them(gpu):
    host = torch.arange(3 * MiB // 4, dtype=torch.float32)  # 3 MiB
    pinned = host.pin_memory()
    assert pinned.is_pinned() and not host.is_pinned()
    assert torch.equal(pinned, host)  # a real tensor pinned keeps its values
    assert gpu.pinned == 4 * MiB and gpu.pinned_memory.requested == 3 * MiB
    empty = torch.empty(5 * MiB, dtype=torch.uint8, pin_memory=True)  # filled from the GPU: no RAM taken
    assert empty.is_pinned() and gpu.pinned == 12 * MiB
    del pinned, empty
    gc.collect()
    assert gpu.pinned == 0 and gpu.pinned_memory.peak == 12 * MiB


def test_pinned_rounding_stops_at_torchs_threshold(monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,pinned_max_round_threshold_mb:64")
    blocks = PinnedMemory()
    assert blocks.block_size(3 * MiB) == 4 * MiB and blocks.block_size(65 * MiB) == 65 * MiB
    assert PinnedMemory(round_threshold=1 << 62).block_size(9 * GiB + 1) == 16 * GiB


def test_mixing_a_cpu_and_a_cuda_tensor_fails_as_on_a_gpu(gpu):
    on_gpu, on_host = torch.ones(4, 4, device="cuda"), torch.ones(4, 4)
    for operation in (lambda: on_gpu + on_host, lambda: on_gpu @ on_host, lambda: F.linear(on_host, on_gpu)):
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            operation()
    assert (on_gpu * torch.tensor(2.0)).device.type == "cuda"  # a CPU scalar is fine, as on a GPU


def test_a_generator_on_the_wrong_device_fails_as_on_a_gpu(gpu):
    generator = torch.Generator("cuda").manual_seed(7)
    assert generator.device == torch.device("cuda", 0)
    assert torch.randn(3, generator=generator, device="cuda").device.type == "cuda"
    with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
        torch.randn(3, generator=torch.Generator("cpu"), device="cuda")
    assert torch.randn(3, generator=torch.Generator("cpu")).sum() != 0  # CPU work stays real


def test_a_float32_by_bfloat16_matmul_fails_with_cudas_message(gpu):
    weight = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    activations = torch.ones(2, 8, device="cuda")
    message = "expected mat1 and mat2 to have the same dtype, but got: float != c10::BFloat16"
    for operation in (lambda: activations @ weight, lambda: F.linear(activations, weight),
                      lambda: torch.bmm(activations[None], weight[None])):
        with pytest.raises(RuntimeError, match=message):
            operation()
    bias = torch.zeros(8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype, but got Float and BFloat16"):
        F.linear(activations, weight, bias)  # addmm: torch 2.13's message on CPU and CUDA alike
    assert F.linear(activations.bfloat16(), weight, bias).dtype == torch.bfloat16


def test_module_to_dtype_converts_fake_parameters_as_on_a_gpu(gpu):
    layer = torch.nn.Linear(256, 256, device="cuda")
    assert gpu.allocated == (256 * 256 + 256) * 4
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and is_cuda_fake(layer.weight)
    assert isinstance(layer.weight, torch.nn.Parameter)
    gc.collect()
    assert gpu.allocated == (256 * 256 + 256) * 2
    layer.to("cpu")  # read back: real zeros on the host
    assert not is_cuda_fake(layer.weight) and layer.weight.abs().sum() == 0


def test_values_read_back_are_zeros(gpu):
    tensor = torch.ones(2, 3, device="cuda")
    assert torch.equal(tensor.cpu(), torch.zeros(2, 3)) and type(tensor.cpu()) is torch.Tensor
    assert tensor.sum().item() == 0.0 and not bool(tensor.any()) and tensor.tolist() == [[0.0] * 3] * 2
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        tensor.numpy()


def test_indexing_a_cuda_tensor_gives_the_shapes_of_cpu_indexing(gpu):
    host, device = torch.zeros(4, 5, 6), torch.zeros(4, 5, 6, device="cuda")
    for index in (0, -1, slice(1, 3), (Ellipsis, 2), (None, 1), (slice(None), None, slice(0, 6, 2)),
                  ([0, 2],), (slice(None), torch.tensor([1, 3])), (0, Ellipsis, None)):
        assert device[index].shape == host[index].shape, index
    device[1:3, 0] = 1.0
    device[:, :, 0] = torch.ones(4, 5, device="cuda")
    device[[0, 1]] = 2.0


def test_threads_started_inside_run_on_the_simulated_gpu(gpu):
    with ThreadPoolExecutor(max_workers=2) as pool:
        tensors = list(pool.map(lambda _: torch.ones(256, 1024, device="cuda"), range(2)))
    assert all(is_cuda_fake(t) for t in tensors) and gpu.allocated == 2 * MiB


def test_attention_runs_the_kernel_cuda_would_choose(gpu):
    query = torch.empty(1, 24, 4096, 128, device="cuda", dtype=torch.bfloat16)  # one 1024x1024 FLUX attention
    gpu.reset_peak()
    before = gpu.allocated
    output = F.scaled_dot_product_attention(query, query, query)
    assert output.shape == query.shape
    assert gpu.peak - before < 2 * query.nbytes  # flash: the output and its log-sum-exp, no 4096² matrix
    with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same dtype"):
        F.scaled_dot_product_attention(query, query.float(), query)
