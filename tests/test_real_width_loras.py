"""LoRA layouts at FLUX.1's real widths, against diffusers' own loader (its converters assume those widths).

Reference: a FluxPipeline on float32 copies of the shared real-width modules, `load_lora_weights(file)` +
`fuse_lora(lora_scale=0.7)`. Ours: lora.formats.load_lora + lora.apply.LoraFuser.apply at 0.7 on other float32
copies (float32 is the product's CPU dtype; the copies are exact). The LoRA files come from
tests/fixtures/lora_factory.py: rank 16 with alpha 8, so alpha/rank (0.5) is applied and a missing factor shows.

Tolerance: every side computes W + 0.7·(alpha/rank)·B·A in float32, in a different order (we fuse with one
addmm_, PEFT scales B·A after the matmul, diffusers' kohya converter first folds alpha/rank into A and B, the hand
merge adds the scaled product), so an element may round differently by a few float32 ulps: we allow 8·eps·max|W|
per module (measured: at most 1·eps·max|W|, 1.5e-8). A wrong key mapping, row split or alpha moves elements by
the LoRA's own size (here up to 1.5e-3), about 10⁴ times more.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FluxPipeline
from torch import nn

from lora.apply import LoraFuser
from lora.formats import LoraWeights, load_lora
from tests.fixtures import lora_factory as factory
from tests.fixtures.real_width import float32_copy, real_width_fixture  # noqa: F401 (provides real_width)

pytestmark = pytest.mark.real_width

SCALE = 0.7
RANK, ALPHA = 16, 8.0  # alpha/rank a power of two, so the factory's layouts without alpha store it exactly
BLOCK_PREFIXES = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")
# diffusers 0.42.1's kohya converter (ComfyUI files go through it too) names img_in, txt_in, time_in, vector_in,
# guidance_in and final_layer without the "transformer." prefix, so load_lora_weights drops them without a word.
DROPS_OUTSIDE_BLOCKS = {"kohya", "comfyui"}


@pytest.fixture(scope="module")
def spec(real_width):
    return factory.make_spec(real_width.transformer, real_width.text_encoder, rank=RANK, alpha=ALPHA, magnitude=0.0125)


def linear_weights(transformer: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    components = {"transformer": transformer, "text_encoder": text_encoder}
    return {f"{root}.{name}": module.weight.detach() for root, component in components.items()
            for name, module in component.named_modules() if isinstance(module, nn.Linear)}


def fused_by_us(path, real_width) -> tuple[dict[str, torch.Tensor], LoraWeights]:
    transformer, text_encoder = float32_copy(real_width.transformer), float32_copy(real_width.text_encoder)
    weights = load_lora(path, input_name="extra_lora", transformer=transformer, text_encoder=text_encoder)
    LoraFuser({"transformer": transformer, "text_encoder": text_encoder}).apply([(weights, SCALE)])
    return linear_weights(transformer, text_encoder), weights  # the fuser and its backups go


def fused_by_diffusers(path, real_width) -> dict[str, torch.Tensor]:
    transformer, text_encoder = float32_copy(real_width.transformer), float32_copy(real_width.text_encoder)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=SCALE)
    pipe.unload_lora_weights()  # takes the adapter layers out; the fused weights stay
    return linear_weights(transformer, text_encoder)


def changed(weights: dict[str, torch.Tensor], real_width) -> set[str]:
    originals = linear_weights(real_width.transformer, real_width.text_encoder)
    return {path for path, weight in weights.items() if not torch.equal(weight, originals[path].float())}


def hand_merged(original: torch.Tensor, lora: factory.ModuleLora) -> torch.Tensor:
    return original.float() + SCALE * (lora.alpha / lora.rank) * (lora.up @ lora.down)


def assert_rounding_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding: 8·eps·max|W| (see the module docstring)."""
    difference = float((ours - reference).abs().max())
    assert difference <= 8 * torch.finfo(torch.float32).eps * float(reference.abs().max()), f"{what} differs by {difference}"


@pytest.mark.parametrize("layout", ["ai_toolkit", "diffusers", "kohya", "comfyui", "xlabs"])
def test_fused_weights_match_diffusers_loader(layout, real_width, spec, tmp_path):
    """ai-toolkit and diffusers/PEFT names (transformer.*.lora_A/B; diffusers' file with .alpha keys and CLIP),
    kohya (lora_unet_* with fused qkv and linear1, lora_te1_* for CLIP), ComfyUI (diffusion_model.*, BFL
    names, text_encoders.clip_l.*) and XLabs (*.processor.*)."""
    lora_spec = factory.spec_for_layout(layout, spec, real_width.transformer)
    if layout in DROPS_OUTSIDE_BLOCKS:  # see test_diffusers_still_drops_kohya_loras_outside_the_blocks
        lora_spec = lora_spec.subset(lambda path: path.startswith((*BLOCK_PREFIXES, "text_encoder.")))
    path = factory.write_layout(layout, lora_spec, real_width.transformer, tmp_path / f"{layout}.safetensors")

    ours, weights = fused_by_us(path, real_width)
    assert set(weights.deltas) == set(lora_spec.modules) and not weights.ignored
    reference = fused_by_diffusers(path, real_width)

    assert changed(ours, real_width) == changed(reference, real_width) == set(lora_spec.modules)
    for module_path in lora_spec.modules:
        assert_rounding_close(ours[module_path], reference[module_path], f"{layout}: {module_path}")


def test_kohya_clip_keys_match_a_hand_merge(real_width, spec, tmp_path):
    """lora_te1_* (kohya's CLIP-L keys, `text_model.` names) land on transformers 5's flattened CLIPTextModel as
    W + scale·(alpha/rank)·B·A. (A LoRA must change the transformer too: one block Linear.)"""
    one_linear = "transformer.single_transformer_blocks.0.proj_out"
    clip_spec = spec.subset(lambda path: path.startswith("text_encoder.") or path == one_linear)
    path = factory.write_layout("kohya", clip_spec, real_width.transformer, tmp_path / "clip.safetensors")
    text_encoder = float32_copy(real_width.text_encoder)
    weights = load_lora(path, input_name="extra_lora", transformer=real_width.transformer, text_encoder=text_encoder)
    clip_deltas = {path: delta for path, delta in weights.deltas.items() if path != one_linear}
    assert set(clip_deltas) == set(clip_spec.modules) - {one_linear} and len(clip_deltas) == 6 * 12  # q k v out fc1 fc2
    LoraFuser({"text_encoder": text_encoder}).apply([(replace(weights, deltas=clip_deltas), SCALE)])
    originals = dict(real_width.text_encoder.named_modules())
    for name, module in text_encoder.named_modules():
        lora = clip_spec.modules.get(f"text_encoder.{name}")
        if lora is not None:
            assert_rounding_close(module.weight, hand_merged(originals[name].weight, lora), name)


def test_diffusers_still_drops_kohya_loras_outside_the_blocks(real_width, spec, tmp_path):
    """kohya's img_in, txt_in, time_in, vector_in, guidance_in and final_layer LoRAs (sd-scripts trains them on
    request): diffusers 0.42.1 leaves those weights unchanged, we merge them (BFL's final modulation with its
    (shift, scale) halves swapped into diffusers' (scale, shift) order)."""
    outside = spec.subset(lambda path: path.startswith("transformer.") and not path.startswith(BLOCK_PREFIXES))
    assert len(outside.modules) == 10
    path = factory.write_layout("kohya", outside, real_width.transformer, tmp_path / "outside.safetensors")

    ours, _ = fused_by_us(path, real_width)
    originals = linear_weights(real_width.transformer, real_width.text_encoder)
    for module_path, lora in outside.modules.items():
        assert_rounding_close(ours[module_path], hand_merged(originals[module_path], lora), module_path)
    reference = fused_by_diffusers(path, real_width)
    assert not changed(reference, real_width), (
        "diffusers now applies kohya LoRAs outside the blocks: compare them in "
        "test_fused_weights_match_diffusers_loader (remove DROPS_OUTSIDE_BLOCKS) and drop this test"
    )
