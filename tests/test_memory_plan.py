"""The GPU memory plan (flux/fast/memory.py): byte counts of the real FLUX.1 components built on the meta device,
the counting rule checked against torchao's real fp8 tensors, and the placement decision."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from flux.fast import memory
from flux.fast.memory import (
    GIB,
    LAZY,
    RESIDENT,
    SWAPPED,
    Sizes,
    default_wanted,
    fit_to_gpu,
    module_bytes,
    plan_memory,
)
from flux.fast.quantize import fp8_config, is_quantised_linear, quantise_weight
from flux.variants import Variant
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

    config = fp8_config(torch.device("cpu"), dtype)
    for name, module in transformer.named_modules():
        if is_quantised_linear(name, module):
            module.weight = nn.Parameter(quantise_weight(module.weight.detach(), config), requires_grad=False)
    assert module_bytes(transformer, element, fp8=is_quantised_linear) == _real_bytes(transformer)


# --- the real components, on meta ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_models():
    return memory.build_on_meta()


@pytest.fixture(scope="module")
def real_sizes(real_models):
    return memory.real_sizes(real_models)


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
    for key, value in memory.TRANSFORMER.items():
        assert tuple(defaults[key]) == value if isinstance(value, tuple) else defaults[key] == value, key
    assert defaults["guidance_embeds"] is False  # hence dev sets it


def test_component_sizes(real_sizes):
    v = real_sizes.variants
    assert v["dev-bf16"] == pytest.approx(23.8e9, rel=0.005)  # 2 bytes per parameter
    # fp8 halves the blocks' Linear weights: 99.6% of the transformer
    assert v["dev-fp8"] / v["dev-bf16"] == pytest.approx(0.502, abs=0.002)
    assert real_sizes.shared["T5 XXL encoder (bf16)"] == pytest.approx(9.52e9, rel=0.005)
    assert real_sizes.shared_total == pytest.approx(10.89e9, rel=0.01)


def test_the_deployed_defaults_fit_one_80gb_gpu(real_sizes):
    budget = dict(budget=79 * GIB, reserve=10 * GIB)

    plain = plan_memory(real_sizes, default_wanted(go_fast_default=False), **budget)
    assert plain.variants(RESIDENT) == ["dev-bf16", "schnell-bf16"]
    assert plain.variants(LAZY) == ["dev-fp8", "schnell-fp8"]  # a go_fast request builds one in the slot
    assert plain.fits and plain.setup_peak <= plain.budget and plain.max_bf16_copies == 1

    fast = plan_memory(real_sizes, default_wanted(go_fast_default=True), **budget)
    # all four do not fit (86.8 GiB with the reserve), so the fp8 pair stays and bf16 takes turns in the slot
    assert fast.variants(RESIDENT) == ["dev-fp8", "schnell-fp8"]
    assert fast.variants(LAZY) == ["dev-bf16", "schnell-bf16"]
    assert fast.slot == real_sizes.variants["dev-bf16"]
    assert fast.fits and fast.max_bf16_copies == 0  # fp8 is built from the checkpoint, not from a bf16 copy

    # what setup keeps on a real GPU (flux/generate.py): the plan's resident set, in the order wanted
    fast_wanted = [Variant.parse(name) for name in default_wanted(go_fast_default=True)]
    assert [str(v) for v in fit_to_gpu(fast_wanted, 80 * GIB, real_sizes)] == ["dev-fp8", "schnell-fp8"]
    assert fit_to_gpu(fast_wanted[2:], 40 * GIB, real_sizes) == ()  # nothing fits beside the slot: every variant on use

    swapping = plan_memory(real_sizes, default_wanted(go_fast_default=True), **budget, host_budget=64 * GIB)
    assert swapping.variants(SWAPPED) == ["dev-bf16", "schnell-bf16"]
    assert swapping.fits and swapping.max_bf16_copies == 1
    assert swapping.steps[-1].host_bytes == real_sizes.variants["dev-bf16"] + real_sizes.variants["schnell-bf16"]


def test_tables_print(real_sizes):
    assert "| T5 XXL encoder | bf16 | 8.87 |" in memory.sizes_table(real_sizes)
    plan = plan_memory(real_sizes, ["dev-bf16"], budget=79 * GIB, reserve=10 * GIB)
    assert "| dev-bf16 | 22.17 | resident |" in memory.plan_table(plan, real_sizes, "Predictor")


# --- the decision, on made-up sizes (pure arithmetic) ---------------------------------------------------------

SIZES = Sizes(variants={"dev-bf16": 20, "schnell-bf16": 20, "dev-fp8": 10, "schnell-fp8": 10}, shared={"text": 10})


def test_wanted_variants_are_resident_in_order_while_they_fit():
    plan = plan_memory(SIZES, ["schnell-fp8", "dev-fp8"], budget=100, reserve=5)
    assert plan.placement == {"schnell-fp8": RESIDENT, "dev-fp8": RESIDENT, "dev-bf16": LAZY, "schnell-bf16": LAZY}
    assert plan.slot == 20 and plan.peak == 10 + 20 + 20 + 5 and plan.fits


def test_the_slot_for_others_costs_the_least_wanted_resident_its_place():
    # 10 shared + 20 + 20 + 5 reserve = 55 of 60 leaves 5: too little for an fp8 in the slot (10), so
    # schnell-bf16 gives way, and the slot must then hold it (20)
    plan = plan_memory(SIZES, ["dev-bf16", "schnell-bf16"], budget=60, reserve=5)
    assert plan.variants(RESIDENT) == ["dev-bf16"]
    assert plan.placement["schnell-bf16"] == LAZY and plan.slot == 20 and plan.fits


def test_no_slot_when_every_variant_a_request_may_ask_for_is_resident():
    plan = plan_memory(SIZES, ["dev-bf16", "schnell-bf16"], budget=55, reserve=5,
                       all_variants=["dev-bf16", "schnell-bf16"])
    assert plan.variants(RESIDENT) == ["dev-bf16", "schnell-bf16"] and plan.slot == 0 and plan.fits


def test_swapped_while_host_memory_lasts_then_lazy():
    plan = plan_memory(SIZES, ["dev-fp8", "dev-bf16", "schnell-bf16"], budget=50, reserve=5, host_budget=25)
    assert plan.placement == {"dev-fp8": RESIDENT, "dev-bf16": SWAPPED, "schnell-bf16": LAZY, "schnell-fp8": LAZY}
    assert [step.host_bytes for step in plan.steps] == [0, 0, 20]


def test_a_budget_too_small_for_anything_says_it_does_not_fit():
    plan = plan_memory(SIZES, ["dev-bf16"], budget=30, reserve=5)
    assert plan.variants(RESIDENT) == [] and not plan.fits


def test_setup_steps_never_hold_two_bf16_copies_of_a_transformer():
    plan = plan_memory(SIZES, ["dev-fp8", "dev-bf16", "schnell-bf16"], budget=200, reserve=5, host_budget=100)
    assert [step.gpu_bytes for step in plan.steps] == [10, 20, 40, 60]
    assert plan.steps[1].bf16_copies == {"dev": 0, "schnell": 0}  # dev-fp8 comes from the checkpoint file
    assert plan.max_bf16_copies == 1


def test_variant_names_are_checked():
    with pytest.raises(ValueError, match="no variant"):
        plan_memory(SIZES, ["dev-int4"], budget=100, reserve=5)


def test_budgets_from_settings(monkeypatch):
    for name in ("FLUX_GPU_MEMORY_GB", "FLUX_GPU_RESERVE_GB", "FLUX_PINNED_MEMORY_GB"):
        monkeypatch.delenv(name, raising=False)
    assert memory.budgets_from_settings() == dict(budget=79 * GIB, reserve=10 * GIB, host_budget=0)
    assert memory.budgets_from_settings(gpu_total=80 * GIB)["budget"] == 80 * GIB - int(0.6 * GIB)
    monkeypatch.setenv("FLUX_GPU_MEMORY_GB", "40")
    monkeypatch.setenv("FLUX_PINNED_MEMORY_GB", "64")
    assert memory.budgets_from_settings(gpu_total=80 * GIB) == dict(budget=40 * GIB, reserve=10 * GIB, host_budget=64 * GIB)
