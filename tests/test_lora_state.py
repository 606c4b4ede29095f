"""flux/lora_state.py: who chose a LoRA decides where it may come from, not what its string equals."""

from __future__ import annotations

import pytest
import torch

from errors import UserError
from flux.lora_state import LoraState
from flux.pipelines import FluxPipelines
from flux.request import build_request
from flux.variants import Variant
from tests.fixtures.lora_factory import make_spec, write_layout
from weights.store import WeightsFolder


@pytest.fixture(scope="module")
def pipelines(tiny_weights):
    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    return FluxPipelines(store, torch.device("cpu"), torch.float32, resident=(Variant("dev"),))


def test_a_request_naming_the_deployments_lora_path_is_still_a_request(pipelines, tmp_path, monkeypatch):
    """The deployment's default LoRA is the operator's choice and may be any local file; a request whose
    replicate_weights is the same string is the user's, and local paths outside FLUX_LORA_LOCAL_DIRS are refused."""
    monkeypatch.delenv("FLUX_LORA_LOCAL_DIRS", raising=False)
    transformer = pipelines.transformer("dev")
    baked = write_layout("diffusers", make_spec(transformer, seed=5, magnitude=0.2), transformer, tmp_path / "baked.safetensors")
    state = LoraState(pipelines, default_main=str(baked))
    before = transformer.transformer_blocks[0].attn.to_q.weight.clone()

    state.prepare(build_request(prompt="x"))  # no replicate_weights: the deployment's LoRA, read from its path
    assert not torch.equal(transformer.transformer_blocks[0].attn.to_q.weight, before)
    with pytest.raises(UserError, match="replicate_weights: .*FLUX_LORA_LOCAL_DIRS"):
        state.prepare(build_request(prompt="x", replicate_weights=str(baked)))
    state.prepare(build_request(prompt="x", lora_scale=0))
    assert torch.equal(transformer.transformer_blocks[0].attn.to_q.weight, before)


def test_lora_state_takes_the_slots_room_back_for_a_variant_and_lends_it_again(tiny_weights):
    from lora.apply import OriginalsBudget

    pipelines = FluxPipelines(WeightsFolder(tiny_weights.dev, tiny_weights.schnell), torch.device("cpu"), torch.float32,
                              resident=(Variant("dev"),))
    budget = OriginalsBudget(10, lendable=50)
    LoraState(pipelines, originals_budget=budget)
    assert budget.left == 60
    pipelines.transformer("dev-fp8")  # built into the slot
    assert budget.left == 10
    pipelines.transformer("schnell-fp8")  # the slot changes hands: lent and taken back in between
    assert budget.left == 10


@pytest.mark.parametrize("unavailable", [frozenset(), frozenset({Variant("dev")})], ids=["48GiB", "24GiB"])
def test_preloading_the_default_lora_keeps_the_warm_variant(tiny_weights, tmp_path, unavailable):
    """Issue 18, defect 3: with nothing resident (the memory plan's warm slot on 24 and 48 GiB), the preload
    converts against the warm dev-fp8 instead of building dev-bf16 (not servable on 24 GiB; on 48 GiB it would
    drop the compiled warm variant for an eager one)."""
    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    pipelines = FluxPipelines(store, torch.device("cpu"), torch.float32, resident=(), unavailable=unavailable,
                              warm=Variant("dev", "fp8"))
    transformer = pipelines.transformer("dev-fp8")
    lora = write_layout("diffusers", make_spec(transformer, seed=3), transformer, tmp_path / "default.safetensors")
    state = LoraState(pipelines, default_main=str(lora))

    state.preload_default()

    assert pipelines.is_loaded("dev-fp8") and pipelines.transformer("dev-fp8") is transformer
    assert not pipelines.is_loaded("dev")
    state.prepare(build_request(prompt="x", go_fast=True), Variant("dev", "fp8"))  # the preloaded conversion serves it


def test_with_no_transformer_in_memory_the_preload_builds_a_servable_one(tiny_weights):
    pipelines = FluxPipelines(WeightsFolder(tiny_weights.dev, tiny_weights.schnell), torch.device("cpu"), torch.float32,
                              resident=(), unavailable=frozenset({Variant("dev")}))
    variant, transformer = pipelines.any_transformer()
    assert variant == Variant("dev", "fp8") and pipelines.transformer(variant) is transformer
