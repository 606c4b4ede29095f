"""The GPU memory plan (flux/fast/memory.py): byte counts of the real FLUX.1 components built on the meta device,
the counting rule checked against torchao's real fp8 tensors, the plan of every deployed class on every GPU size,
and setup's refusal on a GPU too small (its size faked)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

import predict
from flux.fast import memory, sizes
from flux.fast.cards import BF16_TENSOR_CORES, CARDS, card_refusal
from flux.fast.kernels import go_fast_kernel
from flux.fast.memory import (
    GIB,
    GPU,
    HOST,
    LAZY,
    RESIDENT,
    UNAVAILABLE,
    Demand,
    NotEnoughGpuMemory,
    demand_for,
    fit_to_gpu,
    plan_memory,
)
from flux.fast.quantize import is_quantised_linear, quantise_weight
from flux.fast.sizes import T5, Sizes, module_bytes
from flux.variants import Variant, default_resident
from weights.pinned import SLAB_BYTES, arena_bytes, caching_host_bytes
from weights.real_configs import TRANSFORMER
from weights.tiny.flux import tiny_transformer

# --- the counting rule, against real tensors -----------------------------------------------------------------


def _real_bytes(module: nn.Module) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        parts = [tensor.qdata, tensor.scale] if hasattr(tensor, "qdata") else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_counting_matches_the_tensors_torchao_makes(dtype):
    transformer = tiny_transformer(guidance_embeds=True).to(dtype)
    element = torch.finfo(dtype).bits // 8
    assert module_bytes(transformer, element) == _real_bytes(transformer)

    config = go_fast_kernel(torch.device("cpu"), dtype).config
    for name, module in transformer.named_modules():
        if is_quantised_linear(name, module):
            module.weight = nn.Parameter(quantise_weight(module.weight.detach(), config), requires_grad=False)
    assert module_bytes(transformer, element, quantised=is_quantised_linear) == _real_bytes(transformer)


def test_lora_originals_count_every_linear_weight_in_bf16():
    transformer = tiny_transformer(guidance_embeds=True)
    linears = [m for m in transformer.modules() if isinstance(m, nn.Linear)]
    assert sizes.linear_weight_bytes(transformer) == 2 * sum(m.weight.numel() for m in linears)


# --- the real components, on meta ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_models():
    return sizes.build_on_meta()


@pytest.fixture(scope="module")
def real_sizes(real_models):
    return sizes.real_sizes(real_models)


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_models_have_the_known_parameter_counts(real_models):
    assert all(p.is_meta for model in real_models.values() for p in model.parameters())  # no weights were made
    counts = {name: _parameters(model) for name, model in real_models.items()}
    assert counts["transformer-dev"] == pytest.approx(11.9e9, rel=0.005)
    assert counts["transformer-dev"] - counts["transformer-schnell"] == pytest.approx(10.2e6, rel=0.01)  # guidance
    assert counts["clip"] == pytest.approx(123e6, rel=0.005)
    assert counts["vae"] == pytest.approx(84e6, rel=0.005)
    assert counts["safety-stage1"] == pytest.approx(304e6, rel=0.005)
    assert counts["safety-stage2"] == pytest.approx(86e6, rel=0.005)
    # T5: 4.76 B, as the checkpoint's 9.52 GB of bf16 says. The often-quoted 4.89 B counts the token embedding
    # twice (`shared` and `encoder.embed_tokens`, which are one tensor).
    t5 = real_models["t5"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert counts["t5"] == pytest.approx(4.762e9, rel=0.001)
    assert counts["t5"] + t5.shared.weight.numel() == pytest.approx(4.89e9, rel=0.001)


def test_transformer_config_is_the_library_default_except_guidance():
    defaults = {name: p.default for name, p in inspect.signature(FluxTransformer2DModel.__init__).parameters.items()}
    for key, value in TRANSFORMER.items():
        assert tuple(defaults[key]) == value if isinstance(value, tuple) else defaults[key] == value, key
    assert defaults["guidance_embeds"] is False  # hence dev sets it


def test_component_sizes(real_sizes):
    v = real_sizes.variants
    assert v["dev-bf16"] == pytest.approx(23.8e9, rel=0.005)  # 2 bytes per parameter
    # fp8 halves the blocks' Linear weights: 99.6% of the transformer
    assert v["dev-fp8"] / v["dev-bf16"] == pytest.approx(0.502, abs=0.002)
    assert real_sizes.t5 == real_sizes.shared[T5] == pytest.approx(9.52e9, rel=0.005)
    assert real_sizes.shared_total == pytest.approx(10.89e9, rel=0.01)
    # a LoRA on every Linear keeps 2 bytes per weight: nearly the whole bf16 transformer, on fp8 as on bf16
    originals = real_sizes.lora_originals
    assert originals["dev-fp8"] == originals["dev-bf16"] == pytest.approx(23.97e9, rel=0.005)


# --- every deployed class on every GPU size (real sizes) -----------------------------------------------------

@pytest.fixture(scope="module")
def plans(real_sizes):
    return memory.plans_by_gpu(real_sizes)


FP8, BF16 = ["dev-fp8", "schnell-fp8"], ["dev-bf16", "schnell-bf16"]
EVERY = {"Predictor": BF16 + FP8, "FastPredictor": FP8 + BF16, "LegacyPredictor": BF16}
# GPU GiB -> class -> (resident, lazy, unavailable, t5); None: setup refuses
STREAMING = {name: ([], every, [], HOST) for name, every in EVERY.items()}  # every variant in the slot, streaming
EXPECTED = {
    12: dict(Predictor=None, FastPredictor=None, LegacyPredictor=None),
    16: STREAMING,
    24: STREAMING,
    48: {name: ([], every, [], GPU) for name, every in EVERY.items()},
    80: dict(Predictor=(BF16, FP8, [], GPU), FastPredictor=(FP8, BF16, [], GPU), LegacyPredictor=(BF16, [], [], GPU)),
    141: {name: (every, [], [], GPU) for name, every in EVERY.items()},
}


@pytest.mark.parametrize("gpu", memory.GPU_SIZES_GIB)
@pytest.mark.parametrize("name", memory.DEPLOYED)
def test_each_class_on_each_gpu(plans, real_sizes, gpu, name):
    plan, expected = plans[gpu][name], EXPECTED[gpu][name]
    assert plan.fits == (expected is not None), plan.error
    if expected is None:
        assert f"A {gpu}.00 GiB GPU" in plan.error and f"cannot serve {name}" in plan.error
        return
    resident, lazy, unavailable, t5 = expected
    assert (plan.variants(RESIDENT), plan.variants(LAZY), plan.variants(UNAVAILABLE), plan.t5) == (resident, lazy, unavailable, t5)
    assert plan.peak <= plan.budget == gpu * GIB - memory.CUDA_CONTEXT
    assert plan.setup_peak <= plan.budget and plan.max_bf16_copies <= 1
    assert not plan.vae_tiling  # one untiled 1440x1440 decode fits the room kept for activations
    assert plan.slot == max((_slot_bytes(real_sizes, plan, v) for v in lazy), default=0)
    # originals: for each variant that may be in memory at once; GPU room first, the rest pinned on the host
    in_memory = resident + ([max(lazy, key=real_sizes.variants.get)] if lazy else [])
    assert plan.lora_originals_bytes == sum(real_sizes.lora_originals[v] for v in in_memory)
    assert plan.lora_originals_gpu + plan.lora_originals_host == plan.lora_originals_bytes
    # pinned host memory as torch takes it: whole slabs, a little more than they hold (weights/pinned.py)
    t5_layers = sum(real_sizes.streamable_blocks(T5)) if t5 == HOST else 0
    held = plan.lora_originals_host + t5_layers + max(plan.streamed_bytes.values(), default=0)
    assert held <= plan.host_pinned <= 1.05 * held + (len(in_memory) + 2) * SLAB_BYTES


def _slot_bytes(real_sizes, plan, variant: str) -> int:
    """GPU bytes of a variant in the slot: all of it, or what does not stream and IN_FLIGHT blocks in flight."""
    if variant not in plan.streamed:
        return real_sizes.variants[variant]
    blocks = real_sizes.streamable_blocks(variant)
    return real_sizes.variants[variant] - plan.streamed_bytes[variant] + memory.IN_FLIGHT * max(blocks)


def test_pinned_host_memory_is_counted_as_torch_takes_it(plans, real_sizes):
    """torch's caching host allocator rounds each pinned block up to a power of two: T5 pinned tensor by tensor
    took 12.25 GiB, a transformer's originals 34.9 GiB. In slabs they take about their size, and the plan says so."""
    t5 = real_sizes.pinned_blocks[T5]  # its layers' tensors: the embedding and final norm go to the GPU
    assert sum(t5) == sum(real_sizes.streamable_blocks(T5)) and caching_host_bytes(t5) > 1.37 * sum(t5)
    fast24 = plans[24]["FastPredictor"]
    assert fast24.t5 == HOST and fast24.t5_pinned == arena_bytes(t5) < 1.05 * sum(t5)
    originals = real_sizes.pinned_blocks["dev-fp8"]
    assert sum(originals) == real_sizes.lora_originals["dev-fp8"] and caching_host_bytes(originals) > 1.5 * sum(originals)
    assert fast24.lora_originals_pinned < 1.05 * fast24.lora_originals_host
    h100 = plans[80]["Predictor"]  # was 63.6 GiB as counted, 99 GiB as pinned one by one
    assert h100.lora_originals_host <= h100.host_pinned < 1.03 * h100.lora_originals_host


def test_what_the_goals_ask(plans, real_sizes):
    # every class on 16 and 24 GiB: nothing resident, nothing refused; a bf16 transformer streams what does not fit
    # (22.2 GiB of blocks) beside T5's embedding, CLIP, the VAE, the safety models and the activations
    for gpu in (16, 24):
        assert all(plan.fits and not plan.variants(UNAVAILABLE) for plan in plans[gpu].values())
    predictor16, predictor24, fast24 = plans[16]["Predictor"], plans[24]["Predictor"], plans[24]["FastPredictor"]
    assert predictor16.streamed_bytes["dev-bf16"] / GIB == pytest.approx(19.7, abs=0.1)
    assert predictor24.streamed_bytes["dev-bf16"] / GIB == pytest.approx(11.6, abs=0.1)
    assert 0 not in predictor24.streamed["dev-bf16"]  # the first block never streams: nothing to overlap its copy
    # FastPredictor on 24 GiB: its fp8 transformers whole, its bf16 fallbacks (image, mask, custom size) streaming
    assert "dev-fp8" not in fast24.streamed and fast24.streamed_bytes["dev-bf16"] == predictor24.streamed_bytes["dev-bf16"]
    assert fast24.warm_slot == Variant("dev", "fp8") and fast24.t5 == HOST
    assert fast24.activations >= memory.IN_FLIGHT * max(real_sizes.streamable_blocks(T5))
    # on 48 GiB nothing streams: one bf16 transformer at a time, T5 on the GPU
    assert all(plans[48][name].fits and not plans[48][name].streamed for name in memory.DEPLOYED)
    # on an H200 every variant is resident, and LegacyPredictor's LoRA originals all stay on the GPU
    assert plans[141]["LegacyPredictor"].lora_originals == GPU
    assert plans[141]["Predictor"].lora_originals == f"{GPU}+{HOST}"  # four variants' originals: 89 GiB at worst


def test_the_setup_log_says_what_streams_and_its_cost(plans):
    note = plans[24]["Predictor"].streaming_note()
    assert note.startswith("Streaming from pinned host memory: FLUX dev-bf16 streams 11.60 GiB of its blocks at every "
                           "step (at 25 GB/s at least 0.50 s a step")
    assert "T5's layers stream for each prompt encoding" in note
    assert plans[80]["Predictor"].streaming_note() is None


def test_the_json_has_every_size_and_class(real_sizes, capsys):
    from bench._benchmark import print_memory_plan

    assert print_memory_plan(as_json=True, sizes=real_sizes) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["12", "16", "24", "48", "80", "141"]
    for by_class in printed.values():
        assert list(by_class) == list(memory.DEPLOYED)
        for plan in by_class.values():
            assert plan["fits"] == (plan["error"] is None) and isinstance(plan["resident"], list)
    assert printed["24"]["FastPredictor"]["t5"] == "host" and printed["12"]["FastPredictor"]["fits"] is False
    assert printed["16"]["Predictor"]["streamed_gib"]["dev-bf16"] == pytest.approx(19.7, abs=0.1)


def test_the_tables_print(real_sizes, capsys):
    from bench._benchmark import print_memory_plan

    print_memory_plan(as_json=False, sizes=real_sizes)
    out = capsys.readouterr().out
    assert "| T5 XXL encoder | bf16 | 8.87 |" in out
    assert "| 80 | FastPredictor | yes | dev-fp8, schnell-fp8 | dev-bf16, schnell-bf16 | — | gpu | — |" in out
    assert "| 24 | Predictor | yes | — | dev-bf16, schnell-bf16, dev-fp8, schnell-fp8 | — | host | dev-bf16 11.60" in out
    assert "12 GiB, FastPredictor: A 12.00 GiB GPU" in out


# --- setup: fit_to_gpu with the GPU size faked ---------------------------------------------------------------

@pytest.fixture
def plan_settings(monkeypatch):
    for name in ("FLUX_GPU_MEMORY_GB", "FLUX_GPU_RESERVE_GB"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fit_to_gpu_returns_the_plan_setup_follows(real_sizes, plan_settings):
    fast = [Variant.parse(name) for name in FP8 + BF16]
    plan = fit_to_gpu(fast, 80 * GIB, go_fast_default=True, sizes=real_sizes)
    assert plan.resident == (Variant("dev", "fp8"), Variant("schnell", "fp8")) and plan.warm_slot is None
    # FLUX_RESIDENT_VARIANTS decides what is wanted resident, not what the class must serve
    plan = fit_to_gpu([Variant("schnell")], 80 * GIB, go_fast_default=False, sizes=real_sizes)
    assert plan.variants(RESIDENT)[0] == "schnell-bf16" and plan.fits
    # an operator's small reserve leaves too little room for one untiled 1440x1440 decode: the VAE tiles
    plan_settings.setenv("FLUX_GPU_RESERVE_GB", "2")
    assert fit_to_gpu(fast, 80 * GIB, go_fast_default=True, sizes=real_sizes).vae_tiling


def test_setup_refuses_a_gpu_too_small_with_one_sentence(real_sizes, plan_settings):
    with pytest.raises(NotEnoughGpuMemory) as refused:
        fit_to_gpu([Variant("dev")], 12 * GIB, go_fast_default=False, sizes=real_sizes)
    message = str(refused.value)
    assert message.startswith("A 12.00 GiB GPU (11.40 GiB for the plan) cannot serve Predictor: even streaming its "
                              "bf16 transformer's blocks and T5's layers from host memory it needs 13.53 GiB")
    assert message.endswith("or a GPU of at least 15 GiB.") and "FLUX_GPU_RESERVE_GB=" in message
    assert message.count(". ") == 0  # one sentence
    with pytest.raises(NotEnoughGpuMemory, match="cannot serve LegacyPredictor"):
        fit_to_gpu([Variant("dev")], 12 * GIB, go_fast_default=False, go_fast_input=False, sizes=real_sizes)


def test_a_smaller_reserve_named_in_the_refusal_does_fit(real_sizes, plan_settings):
    # a 12 GB card (11.7 GiB as torch reports it): 1.9 GiB short of FastPredictor with the 10 GiB reserve
    gpu = int(11.7 * GIB)
    with pytest.raises(NotEnoughGpuMemory) as refused:
        fit_to_gpu([Variant("dev", "fp8")], gpu, go_fast_default=True, sizes=real_sizes)
    reserve = str(refused.value).split("FLUX_GPU_RESERVE_GB=")[1].split(" ")[0]
    plan_settings.setenv("FLUX_GPU_RESERVE_GB", reserve)
    plan = fit_to_gpu([Variant("dev", "fp8")], gpu, go_fast_default=True, sizes=real_sizes)
    assert plan.fits and plan.t5 == HOST and plan.activations == int(float(reserve) * GIB) < 10 * GIB


def test_budgets_from_settings(plan_settings):
    assert memory.budgets_from_settings() == dict(budget=79 * GIB, reserve=10 * GIB)
    assert memory.budgets_from_settings(gpu_total=80 * GIB)["budget"] == 80 * GIB - int(0.6 * GIB)
    plan_settings.setenv("FLUX_GPU_MEMORY_GB", "40")
    plan_settings.setenv("FLUX_GPU_RESERVE_GB", "6")
    assert memory.budgets_from_settings(gpu_total=80 * GIB) == dict(budget=40 * GIB, reserve=6 * GIB)


def test_deployed_classes_match_predict_py():
    for name, (go_fast_default, go_fast_input) in memory.DEPLOYED.items():
        cls = getattr(predict, name)
        assert cls.go_fast_default is go_fast_default, name
        assert ("go_fast" in inspect.signature(cls.run).parameters) is go_fast_input, name


# --- the decision, on made-up sizes (pure arithmetic) ---------------------------------------------------------

SIZES = Sizes(
    variants={"dev-bf16": 20, "schnell-bf16": 20, "dev-fp8": 10, "schnell-fp8": 10},
    shared={T5: 8, "clip": 2},
    lora_originals={"dev-bf16": 4, "schnell-bf16": 4, "dev-fp8": 4, "schnell-fp8": 4},
)
ALL = ("dev-bf16", "schnell-bf16", "dev-fp8", "schnell-fp8")


def demand(wanted, required=("dev-bf16",), servable=ALL) -> Demand:
    return Demand("Test", tuple(required), tuple(servable), tuple(wanted))


def test_wanted_variants_are_resident_in_order_while_a_slot_for_the_others_fits():
    # 10 shared + 5 reserve leave 45: both fp8 and a slot of 20 for either bf16
    plan = plan_memory(SIZES, demand(["schnell-fp8", "dev-fp8"]), budget=60, reserve=5)
    assert plan.placement == {"schnell-fp8": RESIDENT, "dev-fp8": RESIDENT, "dev-bf16": LAZY, "schnell-bf16": LAZY}
    assert plan.slot == 20 and plan.t5 == GPU and plan.fits
    # with room to spare, the variants nobody wanted become resident too
    assert plan_memory(SIZES, demand(["schnell-fp8"]), budget=100, reserve=5).variants(RESIDENT) == ["schnell-fp8", *ALL[:3]]
    # dev-bf16 (20) and a 20 slot fit in the 45, schnell-bf16 then does not, nor any fp8 beside a 20 slot
    plan = plan_memory(SIZES, demand(["dev-bf16", "schnell-bf16"]), budget=60, reserve=5)
    assert plan.variants(RESIDENT) == ["dev-bf16"] and plan.slot == 20


def test_every_servable_variant_resident_means_no_slot():
    plan = plan_memory(SIZES, demand(["dev-bf16", "schnell-bf16"], servable=ALL[:2]), budget=60, reserve=5)
    assert plan.variants(RESIDENT) == ["dev-bf16", "schnell-bf16"] and plan.slot == 0 and plan.fits


def test_t5_goes_to_the_host_only_when_the_class_does_not_fit_with_it():
    # 10 shared + 20 + 5 = 35: fits with T5; at 30 only without it, and T5 then takes the reserve's place (8 > 5)
    assert plan_memory(SIZES, demand(["dev-bf16"]), budget=35, reserve=5).t5 == GPU
    plan = plan_memory(SIZES, demand(["dev-bf16"]), budget=30, reserve=5)
    assert plan.fits and plan.t5 == HOST and plan.activations == 8 and plan.shared_gpu == 2
    assert plan.placement == {"dev-bf16": LAZY, "schnell-bf16": LAZY, "dev-fp8": LAZY, "schnell-fp8": LAZY}
    assert plan.warm_slot == Variant("dev") and plan.peak == 2 + 20 + 8
    assert plan.host_pinned == 2 * SLAB_BYTES  # T5's 8 bytes and the originals' 4 each take a slab of pinned memory


def test_variants_that_cannot_fit_alone_are_unavailable_and_a_required_one_refuses():
    plan = plan_memory(SIZES, demand(["dev-fp8"], required=["dev-fp8"]), budget=25, reserve=5)
    assert plan.fits and plan.variants(UNAVAILABLE) == ["dev-bf16", "schnell-bf16"]
    refused = plan_memory(SIZES, demand(["dev-bf16"]), budget=25, reserve=5)
    assert not refused.fits and "cannot serve Test" in refused.error


def test_lora_originals_take_the_gpu_room_left_and_the_rest_is_pinned():
    fp8 = demand(["dev-fp8", "schnell-fp8"], required=["dev-fp8"], servable=ALL[2:])
    plan = plan_memory(SIZES, fp8, budget=40, reserve=5)
    # 10 shared + 20 resident + 5 reserve leave 5 of the 8 bytes of originals (two variants) on the GPU
    assert (plan.lora_originals_bytes, plan.lora_originals_gpu, plan.lora_originals_host) == (8, 5, 3)
    assert plan.host_pinned == SLAB_BYTES  # one variant's 4 fit the GPU's 5; the other's go to its fuser's slab
    assert plan.lora_originals == f"{GPU}+{HOST}" and plan.peak == plan.budget
    roomy = plan_memory(SIZES, fp8, budget=100, reserve=5)
    assert roomy.lora_originals == GPU and roomy.lora_originals_host == 0


def test_setup_steps_never_hold_two_bf16_copies_of_a_transformer():
    plan = plan_memory(SIZES, demand(["dev-fp8", "dev-bf16", "schnell-bf16"]), budget=200, reserve=5)
    assert [step.gpu_bytes for step in plan.steps] == [10, 20, 40, 60, 70]
    assert plan.steps[1].bf16_copies == {"dev": 0, "schnell": 0}  # dev-fp8 comes from the checkpoint file
    assert plan.max_bf16_copies == 1


def test_demands_of_the_deployed_classes():
    fast = demand_for(go_fast_default=True)
    assert (fast.name, fast.required, fast.servable[:2]) == ("FastPredictor", tuple(FP8), tuple(FP8))
    legacy = demand_for(go_fast_default=False, go_fast_input=False)
    assert (legacy.name, legacy.servable) == ("LegacyPredictor", tuple(BF16))
    operator = demand_for(go_fast_default=False, go_fast_input=False, wanted=[Variant("schnell", "fp8")])
    assert operator.wanted == ("schnell-fp8",) and "schnell-fp8" in operator.servable


# --- the cards people have (flux/fast/cards.py) ----------------------------------------------------------------

def test_only_a_card_without_bf16_tensor_cores_is_refused_for_its_kind():
    refusals = {item.short: card_refusal(item.name, item.capability, item.total_bytes) for item in CARDS}
    assert [short for short, why in refusals.items() if why] == ["T4"]
    assert refusals["T4"].startswith("The Tesla T4 (compute capability 7.5, 14.75 GiB) cannot serve FLUX.1: it has "
                                     "no bfloat16 tensor cores")
    assert refusals["T4"].count(". ") == 0 and "compute capability 8.0 or newer" in refusals["T4"]


@pytest.mark.parametrize("name", memory.DEPLOYED)
def test_every_class_fits_every_card_from_16_gib_without_refusing_a_variant(real_sizes, plan_settings, name):
    go_fast_default, go_fast_input = memory.DEPLOYED[name]
    for item in CARDS:
        if item.capability < BF16_TENSOR_CORES:
            continue
        plan = fit_to_gpu(default_resident(go_fast_default), item.total_bytes, go_fast_default=go_fast_default,
                          go_fast_input=go_fast_input, sizes=real_sizes)
        assert plan.fits and not plan.variants(UNAVAILABLE), (item, plan.error)
        assert plan.peak <= plan.budget and plan.setup_peak <= plan.budget
