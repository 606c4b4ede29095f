"""LoRA layouts: every layout of the same deltas gives the same, hand-checked weights; wrong files are refused.

The deltas come from tests/fixtures/lora_factory.py, which writes them in each layout with its own name
tables; the expected weights are merged here by hand: W + scale·(alpha/rank)·B@A.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from errors import UserError
from lora.apply import LoraFuser
from lora.deltas import alpha_factor, take_rows
from lora.formats import convert_lora, load_lora, read_lora
from tests.fixtures import lora_factory as factory
from weights.tiny.flux import tiny_transformer

SCALE = 0.75


@pytest.fixture(scope="module")
def pristine():
    return tiny_transformer(guidance_embeds=True), factory.tiny_clip()


@pytest.fixture
def models(pristine):
    """A fresh (transformer, clip) pair in float32 for each test."""
    return copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])


@pytest.fixture(scope="module")
def full_spec(pristine):
    return factory.make_spec(*pristine)


def parameters(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": p.detach().clone() for i, m in enumerate(modules) for name, p in m.named_parameters()}


def hand_merged(original: torch.Tensor, terms: list[tuple[factory.ModuleLora, float]]) -> torch.Tensor:
    """The reference: W + Σ scale·(alpha/rank)·B@A in float32, cast back once."""
    merged = original.float()
    for lora, scale in terms:
        merged = merged + scale * (lora.alpha / lora.rank) * (lora.up.float() @ lora.down.float())
    return merged.to(original.dtype)


def fuse_file(path, transformer, clip, scale=SCALE):
    weights = load_lora(path, input_name="extra_lora", transformer=transformer, text_encoder=clip)
    LoraFuser({"transformer": transformer, "text_encoder": clip}).apply([(weights, scale)])
    return weights


def assert_weights_are_hand_merged(spec, transformer, clip, originals, scale=SCALE):
    components = {"transformer": transformer, "text_encoder": clip}
    for path, module in [(f"{root}.{name}", m) for root, c in components.items() for name, m in c.named_modules()]:
        if not isinstance(module, nn.Linear):
            continue
        original = originals[path]
        if path not in spec.modules:
            assert torch.equal(module.weight, original), f"{path} was changed"
            continue
        expected = hand_merged(original, [(spec.modules[path], scale)])
        # the fuser adds B@A inside one GEMM (addmm): the same sum, rounded in the GEMM's order
        ulp = torch.finfo(expected.dtype).eps
        torch.testing.assert_close(module.weight.float(), expected.float(), rtol=ulp, atol=ulp * expected.abs().max().item(),
                                   msg=f"{path} differs from the hand-merged weight")


def linear_weights(transformer, clip) -> dict[str, torch.Tensor]:
    components = {"transformer": transformer, "text_encoder": clip}
    return {f"{root}.{name}": m.weight.detach().clone() for root, c in components.items()
            for name, m in c.named_modules() if isinstance(m, nn.Linear)}


# --- every layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(factory.LAYOUTS))
def test_layout_gives_hand_merged_weights(layout, models, full_spec, tmp_path):
    transformer, clip = models
    spec = factory.spec_for_layout(layout, full_spec, transformer)
    path = factory.write_layout(layout, spec, transformer, tmp_path / f"{layout}.safetensors")
    originals = linear_weights(transformer, clip)

    weights = fuse_file(path, transformer, clip)

    assert set(weights.deltas) == set(spec.modules)
    assert weights.ignored == {}
    assert_weights_are_hand_merged(spec, transformer, clip, originals)


def test_all_layouts_give_identical_weights(pristine, full_spec, tmp_path):
    fused = {}
    for layout in factory.LAYOUTS:
        transformer, clip = copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])
        spec = factory.spec_for_layout(layout, full_spec, transformer)
        fuse_file(factory.write_layout(layout, spec, transformer, tmp_path / f"{layout}.st"), transformer, clip)
        # The same deltas written in diffusers' layout are the yardstick for what each layout can hold.
        transformer_ref, clip_ref = copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])
        fuse_file(factory.write_layout("diffusers", spec, transformer, tmp_path / "ref.st"), transformer_ref, clip_ref)
        fused[layout] = parameters(transformer, clip)
        reference = parameters(transformer_ref, clip_ref)
        assert all(torch.equal(fused[layout][k], reference[k]) for k in reference), layout
    full_layouts = [layout for layout in factory.LAYOUTS if layout not in factory.TRANSFORMER_ONLY]
    first = fused[full_layouts[0]]
    for layout in full_layouts[1:]:
        assert all(torch.equal(first[k], fused[layout][k]) for k in first), layout


def test_bfl_final_layer_halves_are_swapped(models, tmp_path):
    """BFL stores the final modulation as (shift, scale), diffusers' norm_out.linear as (scale, shift)."""
    transformer, clip = models
    spec = factory.make_spec(transformer, only=["transformer.norm_out.linear"])
    tensors, _ = factory.LAYOUTS["kohya"](spec, transformer)
    up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].float()
    weights = convert_lora(tensors, input_name="lora_weights", transformer=transformer)
    converted = weights.deltas["transformer.norm_out.linear"].up.float()
    half = up.shape[0] // 2
    assert torch.equal(converted[:half], up[half:]) and torch.equal(converted[half:], up[:half])


def test_kohya_split_qkv_block_diagonal(models, tmp_path):
    """sd-scripts' split_qkv saves q|k|v with stacked A's and a block-diagonal B; alpha/rank uses the stacked rank."""
    transformer, clip = models
    rank, alpha, inner = 2, 3.0, 32
    generator = torch.Generator().manual_seed(1)
    downs = [torch.randn(rank, inner, generator=generator) for _ in range(3)]
    ups = [torch.randn(inner, rank, generator=generator) for _ in range(3)]
    block_diagonal = torch.block_diag(*ups)  # (3·inner) × (3·rank)
    tensors = {
        "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.cat(downs),
        "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": block_diagonal,
        "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(alpha),
    }
    originals = linear_weights(transformer, clip)
    weights = convert_lora(tensors, input_name="lora_weights", transformer=transformer)
    LoraFuser({"transformer": transformer}).apply([(weights, 1.0)])
    for name, down, up in zip(("to_q", "to_k", "to_v"), downs, ups, strict=True):
        path = f"transformer.transformer_blocks.1.attn.{name}"
        expected = originals[path] + alpha / (3 * rank) * (up @ down)
        torch.testing.assert_close(transformer.get_submodule(path[12:]).weight, expected, rtol=0, atol=1e-6)


def test_diffusers_metadata_alpha_pattern(models):
    transformer, _ = models
    spec = factory.make_spec(transformer, only=["transformer.proj_out", "transformer.x_embedder"], alpha=4.0)
    tensors, metadata = factory.LAYOUTS["diffusers_metadata"](spec, transformer)
    import json

    config = json.loads(metadata["lora_adapter_metadata"])
    config["transformer.alpha_pattern"] = {"x_embedder": 1.0}
    metadata["lora_adapter_metadata"] = json.dumps(config)
    weights = convert_lora(tensors, input_name="lora_weights", transformer=transformer, metadata=metadata)
    assert weights.deltas["transformer.proj_out"].factor == 4.0 / 4
    assert weights.deltas["transformer.x_embedder"].factor == 1.0 / 4


def test_lora_b_bias_is_applied(models, tmp_path):
    """ai-toolkit/PEFT lora_bias: the bias gets scale·(alpha/rank)·b_B too."""
    transformer, clip = models
    spec = factory.make_spec(transformer, only=["transformer.proj_out", "transformer.transformer_blocks.0.attn.to_q",
                                                "transformer.transformer_blocks.0.attn.to_k",
                                                "transformer.transformer_blocks.0.attn.to_v"], with_bias=True)
    original_bias = transformer.proj_out.bias.detach().clone()
    for layout in ("diffusers", "bfl"):
        model = copy.deepcopy(transformer)
        fuse_file(factory.write_layout(layout, spec, model, tmp_path / f"{layout}.st"), model, clip)
        lora = spec.modules["transformer.proj_out"]
        expected = original_bias + SCALE * (lora.alpha / lora.rank) * lora.up_bias
        assert torch.equal(model.proj_out.bias, expected), layout


# --- partial LoRAs and partial matches ----------------------------------------------------------------

def test_partial_lora_fal_style(models, tmp_path, caplog):
    """Only some of q/k/v and no proj_mlp (fal's trainer): exactly those modules change."""
    transformer, clip = models
    only = ["transformer.single_transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k",
            "transformer.transformer_blocks.1.attn.to_v", "transformer.transformer_blocks.1.attn.add_q_proj"]
    spec = factory.make_spec(transformer, only=only)
    originals = linear_weights(transformer, clip)
    with caplog.at_level(logging.INFO, logger="lora"):
        weights = fuse_file(factory.write_layout("ai_toolkit", spec, transformer, tmp_path / "fal.st"), transformer, clip)
    assert sorted(weights.deltas) == sorted(only)
    assert_weights_are_hand_merged(spec, transformer, clip, originals)
    assert "changes 4 modules" in caplog.text


def test_partial_match_logs_matched_and_ignored_counts(models, tmp_path, caplog):
    transformer, clip = models
    spec = factory.make_spec(transformer, only=["transformer.proj_out"])
    tensors, _ = factory.LAYOUTS["kohya"](spec, transformer)
    tensors |= {
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 32),  # T5
        "lora_unet_single_blocks_0_linear1.dora_scale": torch.ones(1, 32),  # a DoRA magnitude without its LoRA
        "lora_unet_some_block_we_do_not_have.lora_down.weight": torch.zeros(4, 32),
    }
    with caplog.at_level(logging.INFO, logger="lora"):
        weights = convert_lora(tensors, input_name="extra_lora", transformer=transformer)
    assert weights.matched == 3 and len(weights.ignored) == 3
    assert "extra_lora: partial match: 3 keys matched, 3 ignored" in caplog.text
    assert "T5" in caplog.text


def test_clip_keys_without_text_encoder_are_ignored_with_a_log_line(models, full_spec, caplog):
    transformer, _ = models
    tensors, _ = factory.LAYOUTS["kohya"](full_spec, transformer)
    with caplog.at_level(logging.INFO, logger="lora"):
        weights = convert_lora(tensors, input_name="lora_weights", transformer=transformer, text_encoder=None)
    assert all(path.startswith("transformer.") for path in weights.deltas)
    assert len(weights.ignored) == 12 * 3  # 12 CLIP Linears × (down, up, alpha)
    assert "CLIP text encoder, which is not loaded" in caplog.text


def test_unknown_prefix_before_block_names(models):
    transformer, _ = models
    spec = factory.make_spec(transformer, only=["transformer.transformer_blocks.0.attn.to_out.0"])
    tensors, _ = factory.LAYOUTS["kohya"](spec, transformer)
    renamed = {key.replace("lora_unet_", "lora_flux_"): value for key, value in tensors.items()}
    weights = convert_lora(renamed, input_name="lora_weights", transformer=transformer)
    assert list(weights.deltas) == ["transformer.transformer_blocks.0.attn.to_out.0"]


# Key spellings seen in the wild -> (role, module paths it changes, in order).
REAL_WORLD_KEYS = {
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": ("down", ["transformer_blocks.0.attn.to_q"]),
    "transformer.transformer_blocks.0.attn.to_q.lora_A.default.weight": ("down", ["transformer_blocks.0.attn.to_q"]),
    "transformer.transformer_blocks.0.attn.to_q.lora.down.weight": ("down", ["transformer_blocks.0.attn.to_q"]),
    "transformer_blocks.0.ff.net.2.lora_linear_layer.up.weight": ("up", ["transformer_blocks.0.ff.net.2"]),
    "transformer.proj_out.lora_B.bias": ("up_bias", ["proj_out"]),
    "lora_unet_transformer_blocks_1_attn_to_add_out.lora_up.weight": ("up", ["transformer_blocks.1.attn.to_add_out"]),
    "lora_unet_time_in_in_layer.alpha": ("alpha", ["time_text_embed.timestep_embedder.linear_1"]),
    "lora_unet_guidance_in_out_layer.lora_down.weight": ("down", ["time_text_embed.guidance_embedder.linear_2"]),
    "lora_unet_vector_in_in_layer.lora_down.weight": ("down", ["time_text_embed.text_embedder.linear_1"]),
    "lora_transformer_single_transformer_blocks_1_attn_to_k.lora_down.weight": (
        "down", ["single_transformer_blocks.1.attn.to_k"]),
    "transformer.double_blocks.0.img_attn.qkv.lora_B.weight": (
        "up", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]),
    "model.diffusion_model.single_blocks.1.linear2.lora_down.weight": ("down", ["single_transformer_blocks.1.proj_out"]),
    "lycoris_single_blocks_1_modulation_lin.lora_down.weight": ("down", ["single_transformer_blocks.1.norm.linear"]),
    "base_model.model.txt_in.lora_A.weight": ("down", ["context_embedder"]),
    "diffusion_model.img_in.lora_up.weight": ("up", ["x_embedder"]),
    "single_blocks.0.processor.qkv_lora.up.weight": (
        "up", [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]),
    "single_blocks.0.linear1.lora_B.weight": (
        "up", [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"] + ["single_transformer_blocks.0.proj_mlp"]),
    "transformer.transformer_blocks.1.attn.to_added_qkv.lora_A.weight": (
        "down", [f"transformer_blocks.1.attn.add_{x}_proj" for x in "qkv"]),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.lora_up.weight": (
        "up", ["text_encoder:encoder.layers.1.mlp.fc2"]),
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight": (
        "down", ["text_encoder:encoder.layers.1.self_attn.out_proj"]),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": (
        "down", ["text_encoder:encoder.layers.0.self_attn.k_proj"]),
    # LyCORIS (kohya names, and diffusers names behind lycoris_) and DoRA
    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": (
        "lokr_w1", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]),
    "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": ("lokr_w2_b", ["transformer_blocks.0.attn.to_q"]),
    "lora_unet_single_blocks_1_linear2.hada_w1_a": ("hada_w1_a", ["single_transformer_blocks.1.proj_out"]),
    "diffusion_model.single_blocks.0.linear1.lokr_w2": (
        "lokr_w2", [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"] + ["single_transformer_blocks.0.proj_mlp"]),
    "transformer.transformer_blocks.0.attn.to_k.hada_w2_b": ("hada_w2_b", ["transformer_blocks.0.attn.to_k"]),
    "lora_unet_double_blocks_1_txt_mlp_0.dora_scale": ("magnitude", ["transformer_blocks.1.ff_context.net.0.proj"]),
    "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": ("magnitude", ["transformer_blocks.0.attn.to_q"]),
    "transformer.proj_out.lora_magnitude_vector.weight": ("magnitude", ["proj_out"]),
    "base_model.model.img_in.lora_magnitude_vector.default.weight": ("magnitude", ["x_embedder"]),
}


@pytest.mark.parametrize("key", sorted(REAL_WORLD_KEYS))
def test_real_world_key_spellings(key, pristine):
    from lora.layouts import ModuleTable, split_key

    role, members = REAL_WORLD_KEYS[key]
    expected = [m.replace("text_encoder:", "text_encoder.") if m.startswith("text_encoder:") else f"transformer.{m}"
                for m in members]
    module_name, found_role = split_key(key)
    target = ModuleTable(*pristine).resolve(module_name)
    assert found_role == role
    assert [piece.path for piece in target.pieces] == expected


@pytest.mark.parametrize("key", ["lora_unet_double_blocks_0_img_attn_qkv.a1.weight", "x.on_input",
                                 "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale",
                                 "lora_unet_single_blocks_0_linear1.diff_b", "transformer.x_embedder.weight"])
def test_non_lora_tensors_are_not_taken_for_lora(key):
    from lora.layouts import split_key

    assert split_key(key) is None


@pytest.mark.parametrize(("tensors", "named"), [
    ({"lycoris_double_blocks_0_img_attn_proj.diff": torch.zeros(32, 32)}, r"full weight differences"),
    ({"lora_unet_double_blocks_0_img_attn_proj.a1.weight": torch.zeros(4, 32)}, r"GLoRA"),
    ({"lora_unet_double_blocks_0_img_attn_proj.weight": torch.zeros(32),
      "lora_unet_double_blocks_0_img_attn_proj.on_input": torch.tensor(True)}, r"IA3"),
])
def test_file_of_an_algorithm_we_cannot_apply_is_refused_naming_it(models, tensors, named):
    with pytest.raises(UserError, match=rf"^extra_lora: .*{named}.*not supported"):
        convert_lora(tensors, input_name="extra_lora", transformer=models[0])


# --- refused files --------------------------------------------------------------------------------------

WRONG_FILES = {
    "sdxl": (factory.sdxl_tensors, "Stable Diffusion 1.5/SDXL"),
    "sd15": (factory.sd15_tensors, "Stable Diffusion 1.5/SDXL"),
    "sd3_diffusers_names": (factory.sd3_tensors, "other shapes"),
    "sd3_original_names": (factory.sd3_original_tensors, "Stable Diffusion 3"),
    "language_model": (factory.unmatched_tensors, "no key of this file matches"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_wrong_architecture_is_refused_and_models_untouched(kind, models, tmp_path):
    transformer, clip = models
    make_tensors, message = WRONG_FILES[kind]
    path = factory.write_tensors(make_tensors(), tmp_path / f"{kind}.safetensors")
    before = parameters(transformer, clip)
    with pytest.raises(UserError, match=rf"^extra_lora: .*{message}"):
        load_lora(path, input_name="extra_lora", transformer=transformer, text_encoder=clip)
    after = parameters(transformer, clip)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_misfitting_module_refuses_the_whole_file(models, full_spec):
    transformer, clip = models
    tensors, _ = factory.LAYOUTS["diffusers"](full_spec, transformer)
    tensors["transformer.single_transformer_blocks.1.proj_out.lora_A.weight"] = torch.zeros(4, 48)
    with pytest.raises(UserError, match=r"^replicate_weights: .*1 of its modules have other shapes.*proj_out"):
        convert_lora(tensors, input_name="replicate_weights", transformer=transformer, text_encoder=clip)


def test_text_encoder_only_lora_is_refused(models, full_spec):
    transformer, clip = models
    tensors, _ = factory.LAYOUTS["kohya"](full_spec.subset(lambda p: p.startswith("text_encoder.")), transformer)
    with pytest.raises(UserError, match="^lora_weights: no key of this file matches a FLUX.1 transformer module"):
        convert_lora(tensors, input_name="lora_weights", transformer=transformer, text_encoder=clip)


def test_empty_file_is_refused(models, tmp_path):
    path = factory.write_tensors({}, tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match="^lora_weights: the LoRA file holds no tensors"):
        load_lora(path, input_name="lora_weights", transformer=models[0])


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_save_zip", "legacy_pickle"])
def test_pickles_are_refused_unopened(zip_format, tmp_path):
    # lora.fetch names pickles as such before any file gets here (tests/test_lora_fetch.py); this is the backstop
    path = factory.write_pickle(tmp_path / "lora.ckpt", zip_format=zip_format)
    with pytest.raises(UserError, match=r"^extra_lora: lora.ckpt is a damaged .safetensors file"):
        read_lora(path, input_name="extra_lora")


@pytest.mark.parametrize("content", [b"", b"<!DOCTYPE html><html>Sign in</html>", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""],
                         ids=["empty", "html_page", "truncated"])
def test_non_safetensors_files_are_refused(content, tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"^lora_weights: lora.safetensors is (not a|a damaged) .safetensors file"):
        read_lora(path, input_name="lora_weights")


# --- the same mapping as diffusers' own converters, at FLUX.1's real sizes -----------------------------

@pytest.fixture(scope="module")
def flux1_on_meta():
    """FLUX.1-dev's transformer shapes without its memory (19 double, 38 single blocks, width 3072)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True)


def test_kohya_matches_diffusers_converter_at_flux1_size(flux1_on_meta):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    only = [f"transformer.{name}" for _, members in factory.bfl_groups(flux1_on_meta)
            for name in members if name.startswith(("transformer_blocks.3.", "single_transformer_blocks.37.",
                                                    "norm_out", "time_text_embed.guidance", "x_embedder"))]
    spec = factory.make_spec(flux1_on_meta, only=only, rank=2, alpha=1.0)
    tensors, _ = factory.LAYOUTS["kohya"](spec, flux1_on_meta)
    ours = convert_lora(tensors, input_name="lora_weights", transformer=flux1_on_meta)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    # diffusers names some top-level modules without the "transformer." prefix
    theirs = {key if key.startswith("transformer.") else f"transformer.{key}": value for key, value in theirs.items()}
    assert sorted(ours.deltas) == sorted(key.removesuffix(".lora_A.weight") for key in theirs if "lora_A" in key)
    for path, delta in ours.deltas.items():
        # diffusers bakes alpha/rank (0.5 here, exact) into A, except for final_layer, whose alpha it drops
        # ("TODO: alphas" in its converter); sd-scripts and ComfyUI apply alpha there too, and so do we.
        baked = delta.down if path in ("transformer.norm_out.linear", "transformer.proj_out") else delta.down * delta.factor
        assert delta.factor == 0.5
        assert torch.equal(baked, theirs[f"{path}.lora_A.weight"]), path
        assert torch.equal(delta.up, theirs[f"{path}.lora_B.weight"]), path


def test_xlabs_matches_diffusers_converter_at_flux1_size(flux1_on_meta):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    only = [path for path in factory.xlabs_modules(flux1_on_meta) if ".0." in path or ".37." in path]
    spec = factory.make_spec(flux1_on_meta, only=only, rank=2, alpha=2.0)
    tensors, _ = factory.LAYOUTS["xlabs"](spec, flux1_on_meta)
    ours = convert_lora(tensors, input_name="lora_weights", transformer=flux1_on_meta)
    theirs = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
    assert sorted(ours.deltas) == sorted(key.removesuffix(".lora_A.weight") for key in theirs if "lora_A" in key)
    for path, delta in ours.deltas.items():
        assert delta.factor == 1.0
        assert torch.equal(delta.down, theirs[f"{path}.lora_A.weight"]), path
        assert torch.equal(delta.up, theirs[f"{path}.lora_B.weight"]), path


def test_the_shared_alpha_and_row_rules() -> None:
    """LoRA (formats.py) and LyCORIS (lycoris.py) share these: missing or zero alpha is factor 1; a fused part's
    rows are its slices stacked, and None passes through."""
    assert alpha_factor(8.0, 4) == 2.0
    assert alpha_factor(None, 4) == alpha_factor(0.0, 4) == alpha_factor(8.0, None) == 1.0
    tensor = torch.arange(12.0).reshape(6, 2)
    assert take_rows(tensor, None) is tensor and take_rows(None, (slice(0, 1),)) is None
    assert take_rows(tensor, (slice(0, 1), slice(4, 6))).tolist() == [[0.0, 1.0], [8.0, 9.0], [10.0, 11.0]]
