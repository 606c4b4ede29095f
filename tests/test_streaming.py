"""Streaming blocks from host memory (flux/offload.py) on small GPUs: the same values as a resident model, with a
LoRA fused into the host copies, bf16 and go_fast's 8-bit weights alike. On CPU the "device" copies are real copies,
so every value is compared; the simulated GPU (tests/test_simulated_cards.py) checks the memory at full size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flux.fast import memory
from flux.fast.sizes import real_sizes
from flux.lora_state import LoraState
from flux.offload import StreamedBlocks, stream_t5, t5_layers, transformer_blocks
from flux.pipelines import FluxPipelines
from flux.request import build_request
from flux.variants import Variant
from tests.fixtures.lora_factory import make_spec, write_layout
from units import GiB
from weights.pinned import PinnedArena
from weights.store import WeightsFolder

CPU = torch.device("cpu")
STREAMED = (1, 2, 3)  # of the tiny transformer's 2 double + 2 single blocks in running order; never the first


def _pipelines(tiny_weights, streamed: dict | None = None, **kwargs) -> FluxPipelines:
    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    return FluxPipelines(store, CPU, torch.float32, resident=(), streamed=streamed, **kwargs)


def _image(pipelines: FluxPipelines, variant: str) -> torch.Tensor:
    pipe = pipelines.get(variant, "txt2img")
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.inference_mode():  # as FluxGenerator calls it: the device copies are inference tensors
        return pipe(prompt="a photo", width=256, height=256, num_inference_steps=2, generator=generator,
                    max_sequence_length=64, output_type="pt").images


@pytest.mark.parametrize("variant", ["dev-bf16", "dev-fp8"])
def test_a_streamed_transformer_makes_the_resident_ones_image_with_and_without_a_lora(tiny_weights, tmp_path, variant,
                                                                                      monkeypatch):
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path))
    resident, streamed = _pipelines(tiny_weights), _pipelines(tiny_weights, {Variant.parse(variant): STREAMED})
    transformer = streamed.transformer(variant)
    blocks = transformer_blocks(transformer)
    assert all(p.device == CPU for p in blocks[1].parameters())  # resting on the host, as on a GPU
    assert len(blocks) > max(STREAMED)
    lora = write_layout("diffusers", make_spec(resident.transformer(variant), seed=4, magnitude=0.3),
                        resident.transformer(variant), tmp_path / "style.safetensors")
    states = [LoraState(pipelines) for pipelines in (resident, streamed)]
    expected_plain = _image(resident, variant)
    assert torch.equal(_image(streamed, variant), expected_plain)

    go_fast = variant.endswith("fp8")
    for state in states:  # fused into the host copies of the streamed blocks, on the compute device
        state.prepare(build_request(prompt="x", replicate_weights=str(lora), go_fast=go_fast), Variant.parse(variant))
    expected_lora = _image(resident, variant)
    assert not torch.equal(expected_lora, expected_plain)
    assert torch.equal(_image(streamed, variant), expected_lora)

    for state in states:  # and off again, exactly
        state.prepare(build_request(prompt="x", go_fast=go_fast), Variant.parse(variant))
    assert torch.equal(_image(streamed, variant), expected_plain)


def test_blocks_visit_the_device_one_at_a_time_and_the_next_is_copied_before_it_runs():
    """The meta device stands in for the GPU. While block i runs, block i+1's copy is in flight (prefetched) and
    no other streamed block is on the device."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    streamed = StreamedBlocks(model, [model[1], model[2], model[4]], torch.device("meta"))
    seen = []
    for index, layer in enumerate(model):
        layer.register_forward_pre_hook(lambda m, args, i=index: seen.append(
            (i, [j for j, other in enumerate(model) if other.weight.device.type == "meta"], sorted(streamed._pending))))
    for layer in (model[0], model[3]):
        layer.to("meta")  # resident
    model(torch.zeros(2, 8, device="meta"))

    # (layer running, layers on the device, streamed blocks whose copy is in flight): the last streamed block's
    # copy overlaps the resident layer before it
    assert seen == [(0, [0, 3], [0]), (1, [0, 1, 3], [1]), (2, [0, 2, 3], [2]), (3, [0, 3], [2]), (4, [0, 3, 4], [])]
    assert all(p.device == CPU for i in (1, 2, 4) for p in model[i].parameters())  # back at rest afterwards


def test_an_error_inside_a_streamed_block_leaves_no_device_copy_behind():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    streamed = StreamedBlocks(model, [model[1], model[2]], torch.device("meta"))
    model[0].to("meta")

    def out_of_memory(_module, _args):
        raise RuntimeError("CUDA out of memory")

    model[1].register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        model(torch.zeros(2, 8, device="meta"))
    assert not streamed._pending
    assert all(p.device == CPU for i in (1, 2) for p in model[i].parameters())


def test_t5_streams_its_layers_keeps_its_tied_embedding_on_the_device_and_encodes_the_same(tiny_weights):
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_weights.dev / "text_encoder_2").eval()
    ids = torch.tensor([[5, 9, 1, 0]])
    with torch.no_grad():
        expected = t5(ids).last_hidden_state
    stream_t5(t5, torch.device("meta"))
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and t5.shared.weight.device.type == "meta"
    assert all(p.device == CPU for layer in t5_layers(t5) for p in layer.parameters())
    with torch.no_grad():
        output = t5(ids).last_hidden_state  # ids on the host: moved to the device with the call
    assert output.device.type == "meta" and output.shape == expected.shape

    t5 = T5EncoderModel.from_pretrained(tiny_weights.dev / "text_encoder_2").eval()
    stream_t5(t5, CPU)
    with torch.no_grad():
        torch.testing.assert_close(t5(ids).last_hidden_state, expected, rtol=0, atol=0)


def test_tensors_already_in_the_arena_are_not_copied_again():
    arena = PinnedArena(pin=False)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight = nn.Parameter(arena.copy(model[1].weight))
    parked = model[1].weight
    StreamedBlocks(model, [model[1]], torch.device("meta"), arena)
    assert model[1].weight.data_ptr() == parked.data_ptr()


# --- the plan: which blocks stream, on which cards ------------------------------------------------------------

def test_spread_streams_enough_evenly_and_never_the_first_block():
    sizes = [4] * 10
    assert memory.spread(sizes, 0) == []
    assert memory.spread(sizes, 20) == [1, 2, 4, 6, 8]  # half of them: every other one
    assert memory.spread(sizes, 8) == [2, 7]
    assert memory.spread([4, 4, 8, 4, 4], 10) == [1, 3, 4]  # enough bytes, though the big one is skipped
    assert memory.spread(sizes, 1000) == list(range(1, 10))


@pytest.fixture(scope="module")
def sizes():
    return real_sizes()


@pytest.mark.parametrize("gib", [15.70, 22.48, 23.65])
@pytest.mark.parametrize("name", list(memory.DEPLOYED))
def test_every_class_fits_a_16_to_24_gib_card_by_streaming(sizes, name, gib):
    total = int(gib * GiB)
    plan = memory.plan_memory(sizes, memory.demand_for(*memory.DEPLOYED[name]), budget=total - memory.CUDA_CONTEXT,
                              reserve=10 * GiB, gpu_total=total)
    assert plan.fits and plan.peak <= total - memory.CUDA_CONTEXT
    assert plan.t5 == memory.HOST
    for variant, blocks in plan.streamed.items():
        assert 0 not in blocks
        assert plan.streamed_bytes[variant] == sum(sizes.streamable_blocks(variant)[i] for i in blocks)
    if name != "FastPredictor":
        assert "bf16" in plan.streaming_note() and "s a step" in plan.streaming_note()


def test_on_a_simulated_gpu_each_copy_takes_the_side_stream_and_two_blocks_at_most_are_there():
    """The CUDA branch of flux/offload.py: copies issued on a side stream, the compute stream waiting on each
    block's event, every device part recorded on the compute stream; the streamed blocks in pinned slabs, and at
    most IN_FLIGHT of them on the card at once (the memory plan counts two)."""
    from tests.fixtures.simulated_gpu import simulated_gpu

    with simulated_gpu("RTX 4080") as gpu:
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
        model[0].to("cuda")
        block = sum(t.nbytes for t in model[1].parameters())
        streamed = StreamedBlocks(model, list(model)[1:], torch.device("cuda"))
        assert all(p.device == CPU and p.is_pinned() for layer in list(model)[1:] for p in layer.parameters())
        inputs = torch.zeros(4, 512, device="cuda")
        gpu.reset_peak()
        before = gpu.allocated
        output = model(inputs)
        assert output.device.type == "cuda" and streamed.nbytes == 5 * block
        assert gpu.stream_counts == {"wait_stream": 5, "on_side_stream": 5, "wait_event": 5, "record_stream": 10}
        # the simulator's host-to-device copy holds a second copy of the tensor while it copies (a GPU's does not)
        transient, activations = model[1].weight.nbytes, 2 * inputs.nbytes
        assert block * memory.IN_FLIGHT < gpu.peak - before <= block * memory.IN_FLIGHT + transient + activations
        del output
        assert gpu.allocated == before  # every device copy gone after the forward
