"""go_fast's quantised ("fp8" variant) transformer and LoRAs on it, below the predictor: the torchao build, exact
restore, exact re-quantisation, quality bounds, and the pure rules (variants, fallbacks, fused scales). Every
kernel go_fast runs (flux/fast/kernels.py) is built, fused and restored here on CPU: the CPU's fp8 weight-only,
Ada-to-Blackwell's fp8 x fp8 and Ampere/Turing's int8 x int8."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn
from torchao.quantization import quantize_

from flux.fast.kernels import kernel_for
from flux.fast.lora_fp8 import Fp8LoraFuser
from flux.fast.quantize import is_quantised, is_quantised_linear, load_fp8_transformer
from flux.lora_scales import fused_scales
from flux.variants import Variant, go_fast_fallback, resident_variants, variant_for
from lora.apply import LoraFuser
from lora.formats import load_lora
from tests.fixtures.lora_factory import make_spec, tiny_clip, write_layout
from weights.store import SafetensorsFolder, WeightsFolder

CPU, FP32 = torch.device("cpu"), torch.float32


# --- pure rules ----------------------------------------------------------------------------------------------

def test_scales_are_linear_by_default_and_the_multiplier_applies_to_every_lora_on_fp8_only():
    assert fused_scales([0.5, -1.0], fp8=False) == [0.5, -1.0]
    assert fused_scales([0.5, -1.0], fp8=False, multiplier=1.5) == [0.5, -1.0]
    assert fused_scales([0.5, -1.0], fp8=True, multiplier=1.5) == [0.75, -1.5]
    assert fused_scales([0.5], fp8=True) == [0.5]


def test_hosted_curve_squares_exactly_one_lora_without_go_fast():
    assert fused_scales([0.5], fp8=False, curve="hosted") == [0.25]
    assert fused_scales([-1.0], fp8=False, curve="hosted") == [1.0]
    assert fused_scales([0.5, 0.5], fp8=False, curve="hosted") == [0.5, 0.5]  # two LoRAs: linear there
    assert fused_scales([0.5], fp8=True, curve="hosted", multiplier=1.5) == [0.75]  # fp8: linear there
    with pytest.raises(ValueError, match="FLUX_LORA_SCALE_CURVE"):
        fused_scales([1.0], fp8=False, curve="quadratic")


def test_resident_variants_setting(monkeypatch):
    assert resident_variants() == (Variant("dev"), Variant("schnell"))
    # go_fast on by default (FastPredictor): fp8 first, bf16 after for the fallbacks
    assert resident_variants(go_fast_default=True) == (
        Variant("dev", "fp8"), Variant("schnell", "fp8"), Variant("dev"), Variant("schnell")
    )
    monkeypatch.setenv("FLUX_RESIDENT_VARIANTS", " dev-fp8, schnell ,dev-fp8")
    assert resident_variants() == (Variant("dev", "fp8"), Variant("schnell", "bf16"))
    monkeypatch.setenv("FLUX_RESIDENT_VARIANTS", "dev-int4")
    with pytest.raises(ValueError, match="FLUX_RESIDENT_VARIANTS"):
        resident_variants()


def test_go_fast_falls_back_for_images_masks_and_custom_sizes():
    assert go_fast_fallback(has_image=False, has_mask=False, custom_size=False) is None
    assert "img2img" in go_fast_fallback(has_image=True, has_mask=False, custom_size=False)
    assert "mask" in go_fast_fallback(has_image=True, has_mask=True, custom_size=False)
    assert "custom" in go_fast_fallback(has_image=False, has_mask=False, custom_size=True)
    assert variant_for("schnell", go_fast=True, fallback_reason=None) == Variant("schnell", "fp8")
    assert variant_for("schnell", go_fast=True, fallback_reason="custom") == Variant("schnell", "bf16")
    assert variant_for("dev", go_fast=False, fallback_reason=None) == Variant("dev", "bf16")


# --- the fp8 build -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dev_dir(tiny_weights):
    return tiny_weights.dev


# (dtype, config) of each kernel go_fast runs: CPU's fp8 weight-only; fp8 x fp8 (capability >= 8.9) with bf16
# weights, whose matmul needs a GPU but whose weights are built, fused and restored on CPU by the same code; and
# int8 x int8 (Ampere, Turing), which runs on CPU too
CONFIGS = {
    "weight-only": (FP32, kernel_for(None, FP32).config),
    "dynamic-activation": (torch.bfloat16, kernel_for((9, 0), torch.bfloat16).config),
    "int8": (torch.bfloat16, kernel_for((8, 6), torch.bfloat16).config),
}


def fresh_fp8(dev_dir, config: str = "weight-only") -> FluxTransformer2DModel:
    dtype, torchao_config = CONFIGS[config]
    return load_fp8_transformer(dev_dir, CPU, dtype, torchao_config)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    reference_parameters = dict(reference.named_parameters())
    assert set(dict(model.named_parameters())) == set(reference_parameters)
    for name, parameter in model.named_parameters():
        other = reference_parameters[name]
        assert type(parameter) is type(other), name
        if is_quantised(parameter):
            inner, _ = parameter.__tensor_flatten__()  # data and scales; int8's zero points too
            assert inner == other.__tensor_flatten__()[0] and {"qdata", "scale"} <= set(inner), name
            for part in inner:
                ours, theirs = getattr(parameter, part), getattr(other, part)
                assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), f"{name}.{part}"
        else:
            assert torch.equal(parameter, other), name


def test_fp8_build_from_the_checkpoint_equals_torchao_quantize_of_the_bf16_model(dev_dir):
    built = fresh_fp8(dev_dir)
    reference = FluxTransformer2DModel.from_pretrained(dev_dir, subfolder="transformer", dtype=FP32)
    quantize_(reference, CONFIGS["weight-only"][1], filter_fn=lambda module, name: is_quantised_linear(name, module))
    assert_same_weights(built, reference)
    fp8_names = {name for name, module in built.named_modules() if isinstance(module, nn.Linear) and is_quantised(module.weight)}
    assert fp8_names and all(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in fp8_names)
    assert "proj_out" not in fp8_names and "x_embedder" not in fp8_names
    assert not any(parameter.is_meta for parameter in built.parameters())
    assert built.config.guidance_embeds


@pytest.fixture(scope="module")
def loras(dev_dir, tmp_path_factory):
    """Two LoRAs converted against the tiny dev transformer (one with biases and CLIP modules)."""
    folder = tmp_path_factory.mktemp("fp8-loras")
    transformer = FluxTransformer2DModel.from_pretrained(dev_dir, subfolder="transformer", dtype=FP32)
    clip = tiny_clip()
    specs = [make_spec(transformer, clip, seed=3, magnitude=0.2, with_bias=True), make_spec(transformer, seed=4, magnitude=0.2)]
    return [
        load_lora(write_layout("diffusers", spec, transformer, folder / f"{i}.safetensors"), input_name="extra_lora",
                  transformer=transformer, text_encoder=clip, identity=f"lora-{i}")
        for i, spec in enumerate(specs)
    ], clip


def fp8_fuser(model: nn.Module, dev_dir, clip: nn.Module | None = None, config: str = "weight-only") -> Fp8LoraFuser:
    dtype, torchao_config = CONFIGS[config]
    checkpoint = SafetensorsFolder(dev_dir / "transformer")
    components = {"transformer": model} | ({"text_encoder": clip} if clip is not None else {})
    return Fp8LoraFuser(components, config=torchao_config,
                        read_source=lambda path, device: checkpoint.read(path.removeprefix("transformer.") + ".weight", device, dtype))


@pytest.mark.parametrize("config", CONFIGS)
def test_after_any_lora_sequence_the_fp8_weights_equal_a_fresh_build(dev_dir, loras, config, allow_gpu_config_on_cpu):
    (first, second), clip = loras
    clip_before = {name: tensor.clone() for name, tensor in clip.state_dict().items()}
    model = fresh_fp8(dev_dir, config)
    fuser = fp8_fuser(model, dev_dir, clip, config)
    to_q = model.transformer_blocks[0].attn.to_q.weight
    before = to_q.qdata.clone(), to_q.scale.clone()
    for step in ([(first, 1.0)], [(second, -0.7)], [(first, 0.5), (second, 2.0)], [(first, 0.0)], [(second, 1.0)]):
        fuser.apply(step)
    assert not torch.equal(to_q.qdata.view(torch.uint8), before[0].view(torch.uint8))
    fuser.apply([])
    assert model.transformer_blocks[0].attn.to_q.weight is to_q  # written in place: a compiled model keeps its graph
    assert_same_weights(model, fresh_fp8(dev_dir, config))
    assert all(torch.equal(tensor, clip_before[name]) for name, tensor in clip.state_dict().items())


def test_same_loras_at_same_scales_write_nothing(dev_dir, loras):
    (first, _), _ = loras
    fuser = fp8_fuser(fresh_fp8(dev_dir), dev_dir, tiny_clip())
    assert fuser.apply([(first, 0.8)]) is True
    assert fuser.apply([(first, 0.8)]) is False


@pytest.mark.parametrize("config", CONFIGS)
def test_a_lora_on_fp8_is_the_fp8_build_of_the_bf16_model_with_that_lora(dev_dir, loras, config, allow_gpu_config_on_cpu):
    """Re-quantised from the checkpoint weight, not from the fp8 weight: no double rounding, full strength."""
    (first, second), _ = loras
    fused = fresh_fp8(dev_dir, config)
    fp8_fuser(fused, dev_dir, tiny_clip(), config).apply([(first, 0.6), (second, 1.0)])
    dtype, torchao_config = CONFIGS[config]
    reference = FluxTransformer2DModel.from_pretrained(dev_dir, subfolder="transformer", dtype=dtype)
    LoraFuser({"transformer": reference, "text_encoder": tiny_clip()}).apply([(first, 0.6), (second, 1.0)])
    quantize_(reference, torchao_config, filter_fn=lambda module, name: is_quantised_linear(name, module))
    assert_same_weights(fused, reference)


# --- quality in numbers (script/_go_fast_quality.py prints the same figures) -----------------------------------

def test_go_fast_keeps_a_typical_loras_strength_and_stays_close_to_bf16(tmp_path):
    from script._go_fast_quality import measure_quality, tiny_pipelines, typical_lora

    pipelines = tiny_pipelines()
    lora = typical_lora(pipelines.transformer("dev-bf16"), tmp_path)
    quality = measure_quality(pipelines, lora, size=256, steps=1)
    assert 0.02 < quality.delta_ratio < 0.05  # "a few percent", as real FLUX LoRAs
    assert quality.psnr_lora_effect < quality.psnr_with_lora  # the LoRA shows more than fp8 rounding does
    assert 0.9 <= quality.strength <= 1.1
    assert quality.psnr_without_lora > 50 and quality.psnr_with_lora > 50


# --- variants in memory ----------------------------------------------------------------------------------------

def dev_fp8_with_a_lora(tiny_weights, tmp_path, monkeypatch):
    """Pipelines with dev-bf16 resident, and dev-fp8 built on demand with a LoRA on it and on the text encoder:
    (pipelines, LoRA state, the LoRA's path, the text encoder's tensors before)."""
    from flux.lora_state import LoraState
    from flux.pipelines import FluxPipelines
    from flux.request import build_request

    pipelines = FluxPipelines(WeightsFolder(tiny_weights.dev, tiny_weights.schnell), CPU, FP32, resident=(Variant("dev"),))
    transformer = pipelines.transformer("dev")
    lora = write_layout("diffusers", make_spec(transformer, pipelines.text_encoder, seed=9, magnitude=0.3), transformer,
                        tmp_path / "lora.safetensors")
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path))
    clip_before = {name: tensor.clone() for name, tensor in pipelines.text_encoder.state_dict().items()}
    state = LoraState(pipelines)
    state.prepare(build_request(prompt="x", go_fast=True, extra_lora=str(lora)), Variant("dev", "fp8"))
    return pipelines, state, lora, clip_before


def test_a_variant_that_is_not_resident_is_built_on_use_one_at_a_time(tiny_weights, tmp_path, monkeypatch):
    """Resident variants stay; a non-resident one is built when asked for and dropped for the next one, and the
    LoRA it carried (text encoder included) does not outlive it."""
    from flux.request import build_request

    pipelines, state, lora, clip_before = dev_fp8_with_a_lora(tiny_weights, tmp_path, monkeypatch)
    transformer = pipelines.transformer("dev")
    dev_fp8 = weakref.ref(pipelines.transformer("dev-fp8"))
    assert is_quantised(dev_fp8().transformer_blocks[0].attn.to_q.weight)
    assert pipelines.is_loaded("dev-fp8") and not pipelines.is_loaded("schnell-fp8")
    assert any(not torch.equal(t, clip_before[n]) for n, t in pipelines.text_encoder.state_dict().items())

    build, alive_while_building = pipelines._build, []

    def observed_build(variant):  # the real build, noting whether the old one is still in memory
        gc.collect()
        alive_while_building.append(dev_fp8() is not None)
        return build(variant)

    monkeypatch.setattr(pipelines, "_build", observed_build)
    state.prepare(build_request(prompt="x", go_fast=True, model="schnell"), Variant("schnell", "fp8"))
    assert alive_while_building == [False]  # never two non-resident transformers in memory at once
    assert pipelines.is_loaded("schnell-fp8") and not pipelines.is_loaded("dev-fp8")
    assert pipelines.is_loaded("dev") and pipelines.transformer("dev") is transformer
    assert all(torch.equal(t, clip_before[n]) for n, t in pipelines.text_encoder.state_dict().items())
    assert not pipelines.get("schnell-fp8", "txt2img").transformer.config.guidance_embeds

    state.prepare(build_request(prompt="x", go_fast=True, extra_lora=str(lora)), Variant("dev", "fp8"))
    rebuilt = pipelines.transformer("dev-fp8")  # built again, and the LoRA fused into the new one
    assert not torch.equal(rebuilt.x_embedder.weight, fresh_fp8(tiny_weights.dev).x_embedder.weight)
    state.prepare(build_request(prompt="x", go_fast=True), Variant("dev", "fp8"))
    assert_same_weights(rebuilt, fresh_fp8(tiny_weights.dev))


def test_a_variant_the_memory_plan_has_no_room_for_is_refused_naming_go_fast(tiny_weights):
    from errors import UserError
    from flux.pipelines import FluxPipelines

    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    pipelines = FluxPipelines(store, CPU, FP32, resident=(Variant("dev", "fp8"),), unavailable=frozenset({Variant("dev")}))
    with pytest.raises(UserError, match=r"go_fast: FLUX dev-bf16 does not fit .* use go_fast=true"):
        pipelines.get("dev", "img2img")
    assert not pipelines.is_loaded("dev")  # refused before anything was built
    assert is_quantised(pipelines.transformer("dev-fp8").transformer_blocks[0].attn.to_q.weight)


def test_with_nothing_resident_the_plans_warm_variant_waits_in_the_slot_and_gives_way(tiny_weights):
    from flux.pipelines import FluxPipelines

    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    pipelines = FluxPipelines(store, CPU, FP32, resident=(), warm=Variant("dev", "fp8"))
    assert pipelines.is_loaded("dev-fp8")  # built at setup: the first request does not wait for it
    pipelines.transformer("schnell-fp8")
    assert pipelines.is_loaded("schnell-fp8") and not pipelines.is_loaded("dev-fp8")  # one slot, one variant


def test_the_slot_is_announced_before_a_variant_is_built_into_it_and_when_it_is_empty_again(tiny_weights):
    """LoRA state lends the slot's room to GPU originals while it is empty (flux/lora_state.py): it must hear of
    the slot being taken before the build, so originals can leave the GPU first."""
    from flux.pipelines import FluxPipelines

    pipelines = FluxPipelines(WeightsFolder(tiny_weights.dev, tiny_weights.schnell), CPU, FP32, resident=(Variant("dev"),))
    events = []
    pipelines.on_slot(lambda in_use: events.append((in_use, sorted(map(str, pipelines._transformers)))))
    pipelines.transformer("dev-fp8")
    pipelines.transformer("schnell-fp8")
    pipelines.transformer("dev")  # resident: the slot is not involved
    assert events == [
        (True, ["dev-bf16"]),  # before dev-fp8 is built
        (False, ["dev-bf16"]),  # dev-fp8 dropped
        (True, ["dev-bf16"]),  # before schnell-fp8 is built
    ]


def test_a_build_that_runs_out_of_memory_leaves_the_slot_empty_and_its_room_lent_again(tiny_weights, monkeypatch):
    """Nothing was built into the slot: LoRA state must hear that it is empty again, or the originals' GPU budget
    stays short of the slot's room for the server's life."""
    from flux.fast import quantize
    from flux.lora_state import LoraState
    from flux.pipelines import FluxPipelines
    from lora.apply import OriginalsBudget

    pipelines = FluxPipelines(WeightsFolder(tiny_weights.dev, tiny_weights.schnell), CPU, FP32, resident=(Variant("dev"),))
    budget = OriginalsBudget(10, lendable=50)
    LoraState(pipelines, originals_budget=budget)

    def out_of_memory(*args, **kwargs):  # torchao's quantize_, as the fp8 build calls it
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB.")

    monkeypatch.setattr(quantize, "quantize_", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        pipelines.transformer("dev-fp8")
    assert not pipelines.is_loaded("dev-fp8") and budget.left == 60
    monkeypatch.undo()
    pipelines.transformer("dev-fp8")  # the next request builds it
    assert pipelines.is_loaded("dev-fp8") and budget.left == 10


def test_dropping_a_variant_restores_the_shared_text_encoder_and_writes_nothing_into_its_transformer(
    tiny_weights, tmp_path, monkeypatch,
):
    """Restoring the originals of a transformer that is dropped next is wasted work: on fp8 every touched weight
    would be re-quantised (1-2 s per slot swap at full size). Only the CLIP encoder, shared, comes back."""
    pipelines, _, _, clip_before = dev_fp8_with_a_lora(tiny_weights, tmp_path, monkeypatch)
    dropped = pipelines.transformer("dev-fp8")
    fused = {name: (p.qdata.clone() if is_quantised(p) else p.detach().clone()) for name, p in dropped.named_parameters()}

    pipelines.transformer("schnell-fp8")  # the slot changes hands: dev-fp8 is dropped
    assert not pipelines.is_loaded("dev-fp8")
    for name, parameter in dropped.named_parameters():  # as it was, LoRA and all: nothing was written into it
        assert torch.equal(parameter.qdata if is_quantised(parameter) else parameter, fused[name]), name
    assert all(torch.equal(tensor, clip_before[name]) for name, tensor in pipelines.text_encoder.state_dict().items())
