"""LoraFuser: W + scale·(alpha/rank)·B@A exactly once, separate main/extra scales, bit-exact unloading,
no rewrite when nothing changed, and a clean model after a failure halfway."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora.apply import LoraFuser, OriginalsBudget
from lora.deltas import LoraDelta
from lora.formats import LoraWeights, convert_lora
from tests.fixtures import lora_factory as factory
from weights.tiny.flux import tiny_transformer

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def pristine():
    return tiny_transformer(guidance_embeds=True), factory.tiny_clip()


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def models(request, pristine):
    transformer, clip = copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])
    return transformer.to(request.param), clip.to(request.param)


def components(models) -> dict[str, nn.Module]:
    return {"transformer": models[0], "text_encoder": models[1]}


def snapshot(models) -> dict[str, torch.Tensor]:
    return {f"{root}.{name}": p.detach().clone() for root, module in components(models).items()
            for name, p in module.named_parameters()}


def assert_bit_identical(models, expected: dict[str, torch.Tensor]) -> None:
    now = snapshot(models)
    changed = [name for name in expected if not torch.equal(now[name], expected[name])]
    assert not changed, f"changed: {changed[:5]}"


def lora(models, spec: factory.LoraSpec, identity: str) -> LoraWeights:
    tensors, _ = factory.LAYOUTS["diffusers"](spec, models[0])
    return convert_lora(tensors, input_name="lora_weights", transformer=models[0], text_encoder=models[1],
                        identity=identity)


def hand_merged(original: torch.Tensor, terms: list[tuple[factory.ModuleLora, float]]) -> torch.Tensor:
    merged = original.float()
    for module_lora, scale in terms:
        merged = merged + scale * (module_lora.alpha / module_lora.rank) * (module_lora.up @ module_lora.down)
    return merged.to(original.dtype)


def assert_fused(models, originals, terms: list[tuple[factory.LoraSpec, float]]) -> None:
    """Every Linear equals the hand-merged sum of the terms that touch it (originals elsewhere)."""
    for root, component in components(models).items():
        for name, module in component.named_modules():
            if isinstance(module, nn.Linear):
                path = f"{root}.{name}"
                touching = [(spec.modules[path], scale) for spec, scale in terms if path in spec.modules]
                expected = hand_merged(originals[f"{path}.weight"], touching)
                if touching:  # the fuser adds B@A inside one GEMM (addmm): the same sum, rounded in its own order
                    ulp = torch.finfo(expected.dtype).eps
                    torch.testing.assert_close(module.weight.float(), expected.float(), rtol=ulp, atol=ulp * expected.abs().max().item(), msg=path)
                else:
                    assert torch.equal(module.weight, expected), path


# Two LoRAs that overlap on some modules and not on others.
MAIN_ONLY = ["transformer.transformer_blocks.0.attn.to_q", "transformer.proj_out",
             "text_encoder.encoder.layers.0.self_attn.q_proj"]
SHARED = ["transformer.single_transformer_blocks.1.proj_mlp", "transformer.transformer_blocks.1.ff.net.2"]
EXTRA_ONLY = ["transformer.x_embedder", "transformer.single_transformer_blocks.0.attn.to_v"]


@pytest.fixture
def main_and_extra(models):
    main_spec = factory.make_spec(*models, only=MAIN_ONLY + SHARED, seed=1, alpha=2.0)
    extra_spec = factory.make_spec(*models, only=SHARED + EXTRA_ONLY, seed=2, rank=8, alpha=16.0)
    return (main_spec, lora(models, main_spec, "main")), (extra_spec, lora(models, extra_spec, "extra"))


def test_main_lora_is_w_plus_scaled_ba_once(models, main_and_extra):
    (main_spec, main), _ = main_and_extra
    originals = snapshot(models)
    LoraFuser(components(models)).apply([(main, 0.8)])
    assert_fused(models, originals, [(main_spec, 0.8)])


def test_main_and_extra_have_their_own_scales(models, main_and_extra):
    (main_spec, main), (extra_spec, extra) = main_and_extra
    originals = snapshot(models)
    LoraFuser(components(models)).apply([(main, 1.25), (extra, -0.5)])
    assert_fused(models, originals, [(main_spec, 1.25), (extra_spec, -0.5)])


def test_extra_lora_without_main(models, main_and_extra):
    _, (extra_spec, extra) = main_and_extra
    originals = snapshot(models)
    LoraFuser(components(models)).apply([(extra, 0.7)])
    assert_fused(models, originals, [(extra_spec, 0.7)])


def test_eight_loras_of_different_ranks_on_the_same_modules_are_the_hand_merged_sum(models):
    """MultiLoraPredictor's case: the plain LoRA terms of a module go into one GEMM, their factors stacked along
    the rank; that is still W + Σ scale·(alpha/rank)·B@A, each term at its own scale and alpha/rank."""
    shared = MAIN_ONLY + SHARED
    terms = []
    for index, (rank, alpha, scale) in enumerate([(4, 2.0, 1.0), (8, 16.0, -0.5), (16, 4.0, 0.3), (4, 4.0, 3.0),
                                                  (8, 2.0, -1.0), (2, 2.0, 0.75), (16, 32.0, 0.1), (4, 1.0, 2.0)]):
        spec = factory.make_spec(*models, only=shared if index % 2 else shared + EXTRA_ONLY, seed=10 + index, rank=rank, alpha=alpha)
        terms.append((spec, lora(models, spec, f"lora-{index}"), scale))
    originals = snapshot(models)
    LoraFuser(components(models)).apply([(weights, scale) for _, weights, scale in terms])
    for path in shared + EXTRA_ONLY:  # against the exact sum: float32 arithmetic, then one rounding to the dtype
        root, _, name = path.partition(".")
        weight = components(models)[root].get_submodule(name).weight
        expected = originals[f"{path}.weight"].double()
        for spec, _, scale in terms:
            if path in spec.modules:
                module_lora = spec.modules[path]
                expected += scale * (module_lora.alpha / module_lora.rank) * (module_lora.up.double() @ module_lora.down.double())
        float32_error = 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        torch.testing.assert_close(weight.double(), expected.to(weight.dtype).double(), rtol=torch.finfo(weight.dtype).eps,
                                   atol=float32_error, msg=path)


def test_scale_zero_is_bit_identical_to_no_lora(models, main_and_extra):
    (_, main), (extra_spec, extra) = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 0.0), (extra, 0)])
    assert_bit_identical(models, originals)
    fuser.apply([(main, 0.0), (extra, 0.7)])  # main at 0 contributes nothing
    assert_fused(models, originals, [(extra_spec, 0.7)])


def test_missing_lora_entries_are_skipped_and_scales_must_be_finite(models, main_and_extra):
    (main_spec, main), _ = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(None, 1.0), (main, 1)])
    assert fuser.active == (("main", 1.0),)
    with pytest.raises(ValueError, match="finite"):
        fuser.apply([(main, float("nan"))])
    assert_fused(models, originals, [(main_spec, 1.0)])  # refused before any write


def test_reset_restores_originals_bit_exactly(models, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 1.0), (extra, 1.0)])
    assert snapshot(models).keys() == originals.keys()
    assert not all(torch.equal(snapshot(models)[k], originals[k]) for k in originals)  # the LoRAs did change it
    fuser.apply([(main, 0.3)])
    fuser.reset()
    assert_bit_identical(models, originals)
    assert fuser.active == () and fuser.changed_modules == frozenset()


def test_no_request_after_loras_restores_originals(models, main_and_extra):
    (_, main), _ = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 1.0)])
    assert fuser.apply([]) is True
    assert_bit_identical(models, originals)


def test_same_loras_and_scales_write_nothing(models, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    fuser = LoraFuser(components(models))
    assert fuser.apply([(main, 1.0), (extra, 0.5)]) is True
    versions = {name: p._version for name, p in models[0].named_parameters()}
    # a fresh conversion of the same file (same identity) counts as the same LoRA
    same_main = LoraWeights(deltas=main.deltas, matched=main.matched, ignored={}, identity="main")
    assert fuser.apply([(same_main, 1), (extra, 0.5)]) is False
    assert versions == {name: p._version for name, p in models[0].named_parameters()}
    assert fuser.apply([(main, 1.0), (extra, 0.6)]) is True  # a new scale is a change
    assert versions != {name: p._version for name, p in models[0].named_parameters()}


def test_module_of_previous_request_is_restored(models, main_and_extra):
    (main_spec, main), (extra_spec, extra) = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 1.0)])
    fuser.apply([(extra, 1.0)])
    assert_fused(models, originals, [(extra_spec, 1.0)])  # MAIN_ONLY modules back to their originals
    assert fuser.changed_modules == frozenset(extra_spec.modules)


def _with_unreadable_delta(weights: LoraWeights, path: str) -> LoraWeights:
    """The same LoRA, but one module's up matrix has no data (as when storage fails late)."""
    deltas = dict(weights.deltas)
    broken = deltas[path]
    deltas[path] = LoraDelta(down=broken.down, up=torch.empty(broken.up.shape, device="meta"), factor=broken.factor)
    return LoraWeights(deltas=deltas, matched=weights.matched, ignored={}, identity="broken")


def test_failure_halfway_restores_originals(models, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 1.0)])
    broken = _with_unreadable_delta(extra, "transformer.single_transformer_blocks.0.attn.to_v")  # after others
    with pytest.raises((RuntimeError, NotImplementedError)):
        fuser.apply([(main, 1.0), (broken, 1.0)])
    assert_bit_identical(models, originals)
    assert fuser.active == ()
    fuser.apply([(main, 1.0)])  # and it works again afterwards
    assert fuser.active == (("main", 1.0),)


class _InterruptedFuser(LoraFuser):
    """Stops like Ctrl-C after a few modules have been written."""

    def __init__(self, *args, writes_before_interrupt: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes_left = writes_before_interrupt

    def write_fused(self, module, weight, bias):
        if self.writes_left == 0:
            raise KeyboardInterrupt
        self.writes_left -= 1
        super().write_fused(module, weight, bias)


def test_interrupt_halfway_restores_originals(models, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    originals = snapshot(models)
    fuser = _InterruptedFuser(components(models), writes_before_interrupt=3)
    with pytest.raises(KeyboardInterrupt):
        fuser.apply([(main, 1.0), (extra, 1.0)])
    assert fuser.writes_left == 0  # it did stop halfway
    assert_bit_identical(models, originals)


class _CountingFuser(LoraFuser):
    """The real fuser, counting how often it takes an original."""

    snapshots = 0

    def snapshot(self, module):
        self.snapshots += 1
        return super().snapshot(module)


def test_originals_are_taken_once_and_kept_through_requests_without_loras(models, main_and_extra):
    (main_spec, main), (extra_spec, extra) = main_and_extra
    originals = snapshot(models)
    fuser = _CountingFuser(components(models))
    for step in ([(main, 1.0)], [], [(extra, 0.5)], [(main, 1.0)], [], [(main, 1.0), (extra, 1.0)]):
        fuser.apply(step)
    assert_fused(models, originals, [(main_spec, 1.0), (extra_spec, 1.0)])
    touched = set(main_spec.modules) | set(extra_spec.modules)
    assert fuser.snapshots == len(touched)  # each module's original taken once, never again per switch
    fuser.apply([])
    assert_bit_identical(models, originals)
    assert fuser.changed_modules == frozenset() and fuser.kept_originals["cpu"] > 0
    fuser.release()
    assert fuser.kept_originals == {}
    assert_bit_identical(models, originals)


def test_the_gpu_budget_for_originals_is_shared_and_given_back():
    budget = OriginalsBudget(100)
    assert budget.take(60) and not budget.take(60) and budget.take(40)
    budget.give(60)
    assert budget.left == 60


def test_the_slots_room_is_lent_to_originals_and_taken_back():
    budget = OriginalsBudget(100, lendable=50)
    assert budget.take(130) and budget.left == 20  # the plan's share and the empty slot's room
    assert budget.shrink() == 30  # a variant is built into the slot: 30 bytes of originals must leave the GPU
    assert budget.shrink() == 30  # taking it back twice takes nothing more
    budget.give(30)  # the fusers moved them to the host
    assert budget.left == 0
    budget.grow()
    assert budget.left == 50


# --- what the model computes --------------------------------------------------------------------------

def _forward(transformer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    dtype = transformer.dtype
    image_tokens, text_tokens = 16, 8
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, image_tokens, 16, generator=generator).to(dtype),
            encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator).to(dtype),
            pooled_projections=torch.randn(1, 32, generator=generator).to(dtype),
            timestep=torch.tensor([0.5], dtype=dtype),
            guidance=torch.tensor([3.5], dtype=dtype),
            img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
        ).sample


def test_output_after_loras_equals_a_fresh_model(models, pristine, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    dtype = models[0].dtype
    fresh_output = _forward(copy.deepcopy(pristine[0]).to(dtype))
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 0.0)])
    assert torch.equal(_forward(models[0]), fresh_output)  # scale 0 == no LoRA
    fuser.apply([(main, 1.0), (extra, 1.0)])
    assert not torch.equal(_forward(models[0]), fresh_output)
    fuser.apply([])
    assert torch.equal(_forward(models[0]), fresh_output)


# --- letting go: a model dropped, memory that runs out -----------------------------------------------------------

def test_release_restores_only_the_components_that_outlive_the_model(models, main_and_extra):
    """The transformer is dropped right after release: writing its originals back is wasted (on fp8, every touched
    weight re-quantised); the shared text encoder stays in use and must come back bit-exactly."""
    (_, main), _ = main_and_extra
    originals = snapshot(models)
    fuser = LoraFuser(components(models))
    fuser.apply([(main, 1.0)])
    fused = snapshot(models)
    fuser.release(outliving=("text_encoder",))
    now = snapshot(models)
    assert any(not torch.equal(fused[name], originals[name]) for name in now if name.startswith("transformer."))
    assert all(torch.equal(now[name], fused[name]) for name in now if name.startswith("transformer."))
    assert all(torch.equal(now[name], originals[name]) for name in now if name.startswith("text_encoder."))
    assert fuser.kept_originals == {} and fuser.changed_modules == frozenset()
    with pytest.raises(ValueError, match="no 'transformer' was given"):  # the fuser no longer knows the dropped model
        fuser.apply([(main, 1.0)])


def on_meta(models) -> dict[str, nn.Module]:
    """The models on the meta device, which stands in for the GPU: originals there count against the budget."""
    return {name: copy.deepcopy(module).to("meta") for name, module in components(models).items()}


def test_release_gives_every_gpu_byte_of_originals_back(models, main_and_extra):
    (_, main), (_, extra) = main_and_extra
    budget = OriginalsBudget(10**9)
    fuser = LoraFuser(on_meta(models), originals_budget=budget)
    fuser.apply([(main, 1.0), (extra, 1.0)])
    assert budget.used == fuser.kept_originals["meta"] > 0
    fuser.release(outliving=("text_encoder",))
    assert budget.used == 0


@pytest.mark.parametrize("failing_copy", [1, 2], ids=["weight", "bias"])
def test_an_original_whose_copy_runs_out_of_memory_gives_its_budget_back(models, main_and_extra, monkeypatch, failing_copy):
    """OriginalsBudget.take counts the bytes before the copy is made: a copy that fails must not keep them, nor
    the weight's when its bias is the one that fails."""
    (_, main), _ = main_and_extra
    budget = OriginalsBudget(10**9)
    fuser = LoraFuser(on_meta(models), originals_budget=budget)
    real_to, copies = torch.Tensor.to, []

    def out_of_memory_on_copy(tensor, *args, **kwargs):
        copies.append(kwargs.get("copy"))
        if copies.count(True) == failing_copy:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB.")
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory_on_copy)
    with pytest.raises(torch.OutOfMemoryError):
        fuser.apply([(main, 1.0)])
    assert budget.used == 0 and fuser.kept_originals == {}
    monkeypatch.undo()  # memory is free again: the same request takes its originals and counts them once
    fuser.apply([(main, 1.0)])
    assert budget.used == fuser.kept_originals["meta"] > 0
