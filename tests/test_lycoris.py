"""LyCORIS LoKr and LoHa, and DoRA: files in their real key layouts give the weights merged here by hand.

The files come from tests/fixtures/lycoris_factory.py; the merges are written out below with torch.kron, the
Hadamard product and DoRA's norm, from the rules in lora/lycoris.py's docstring (LyCORIS's own scaling rules).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from errors import UserError
from lora.apply import LoraFuser
from lora.formats import convert_lora, load_lora
from tests.fixtures import lycoris_factory as lyco
from tests.fixtures.lora_factory import write_tensors
from weights.tiny.flux import tiny_transformer

SCALE = 0.75
# BFL fused layers (split by rows across our Linears) and plain ones.
KOHYA_MODULES = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mlp.0",
                 "single_blocks.0.linear2", "img_in"]
DIFFUSERS_MODULES = ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.1.proj_mlp",
                     "transformer.transformer_blocks.1.ff.net.2", "transformer.x_embedder"]


@pytest.fixture(scope="module")
def pristine():
    return tiny_transformer(guidance_embeds=True)


@pytest.fixture
def transformer(pristine):
    return copy.deepcopy(pristine)


def only_for(naming: str) -> list[str]:
    return KOHYA_MODULES if naming == lyco.KOHYA else DIFFUSERS_MODULES


def linear_weights(transformer: nn.Module) -> dict[str, torch.Tensor]:
    return {f"transformer.{n}": m.weight.detach().clone() for n, m in transformer.named_modules()
            if isinstance(m, nn.Linear)}


# --- hand merges ---------------------------------------------------------------------------------------

def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """factor · kron(w1, w2) with LyCORIS's rule: alpha/rank only when a factor is factorised."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    factor = t["alpha"].item() / rank if rank and "alpha" in t else 1.0
    return factor * torch.kron(w1, w2)


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    rank = t["hada_w1_b"].shape[0]
    factor = t["alpha"].item() / rank if "alpha" in t else 1.0
    return factor * ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]))


def lora_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    down = t.get("lora_down.weight", t.get("lora_A.weight"))
    up = t.get("lora_up.weight", t.get("lora_B.weight"))
    factor = t["alpha"].item() / down.shape[0] if "alpha" in t else 1.0
    return factor * (up @ down)


def dora_merged(original: torch.Tensor, delta: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """m · (W + D) / ‖W + D‖: PEFT's vector and an out×1 dora_scale per output row, a 1×in one per column."""
    merged = original + delta
    if "lora_magnitude_vector" in t:
        return t["lora_magnitude_vector"][:, None] * merged / merged.norm(dim=1, keepdim=True)
    magnitude = t["dora_scale"]
    norm = merged.norm(dim=1, keepdim=True) if magnitude.shape[1] == 1 else merged.norm(dim=0, keepdim=True)
    return magnitude * merged / norm


def expected_weights(originals, modules, delta_of, scale=SCALE) -> dict[str, torch.Tensor]:
    """The originals with each file module merged at `scale`: its full delta (and DoRA merge) is computed on
    the whole (fused) matrix and then cut into its members' rows."""
    expected = dict(originals)
    for module in modules:
        full_original = torch.cat([originals[m] for m in module.members])
        delta = delta_of(module.tensors)
        if "dora_scale" in module.tensors or "lora_magnitude_vector" in module.tensors:
            change = scale * (dora_merged(full_original, delta, module.tensors) - full_original)
        else:
            change = scale * delta
        merged = full_original + change
        start = 0
        for member in module.members:
            rows = originals[member].shape[0]
            expected[member] = merged[start:start + rows]
            start += rows
    return expected


def fuse(transformer, tensors, scale=SCALE):
    weights = convert_lora(tensors, input_name="extra_lora", transformer=transformer)
    LoraFuser({"transformer": transformer}).apply([(weights, scale)])
    return weights


def assert_weights(transformer, expected):
    for path, weight in linear_weights(transformer).items():
        torch.testing.assert_close(weight, expected[path], rtol=1e-5, atol=1e-6, msg=path)


# --- LoKr ----------------------------------------------------------------------------------------------

LOKR_VARIANTS = {
    "w1 whole, w2 factorised": dict(w1_factored=False, w2_factored=True),
    "both factorised": dict(w1_factored=True, w2_factored=True),
    "both whole (alpha ignored)": dict(w1_factored=False, w2_factored=False, alpha=7.0),
    "no alpha": dict(w1_factored=False, w2_factored=True, alpha=None),
}


@pytest.mark.parametrize("naming", [lyco.KOHYA, lyco.LYCORIS, lyco.PEFT])
@pytest.mark.parametrize("variant", sorted(LOKR_VARIANTS))
def test_lokr_gives_hand_merged_weights(transformer, naming, variant):
    options = dict(LOKR_VARIANTS[variant])
    if naming == lyco.PEFT:
        options["alpha"] = None  # PEFT files carry no alpha key
    modules = lyco.lokr_modules(transformer, naming, only_for(naming), **options)
    expected = expected_weights(linear_weights(transformer), modules, lokr_delta)

    weights = fuse(transformer, lyco.file_tensors(modules, torch.float32))

    assert weights.ignored == {}
    assert "LoKr" in weights.layout
    assert_weights(transformer, expected)


def test_lokr_alpha_over_rank_is_applied(transformer):
    """The rule itself, not only the test's copy of it: alpha 4 at rank 2 doubles the delta of alpha = rank."""
    deltas = {}
    for alpha in (2.0, 4.0):
        modules = lyco.lokr_modules(transformer, lyco.LYCORIS, ["transformer.x_embedder"], rank=2, alpha=alpha)
        weights = convert_lora(lyco.file_tensors(modules), input_name="extra_lora", transformer=transformer)
        delta = weights.deltas["transformer.x_embedder"]
        deltas[alpha] = delta.factor * delta.weight_delta()
    torch.testing.assert_close(deltas[4.0], 2 * deltas[2.0], rtol=0, atol=0)


def test_lokr_file_in_bf16_through_load_lora(transformer, pristine, tmp_path):
    modules = lyco.lokr_modules(transformer, lyco.KOHYA, KOHYA_MODULES, w1_factored=True)
    expected = expected_weights(linear_weights(transformer), modules, lokr_delta)
    path = write_tensors(lyco.file_tensors(modules, torch.bfloat16), tmp_path / "lokr.safetensors")

    weights = load_lora(path, input_name="lora_weights", transformer=transformer)
    fuser = LoraFuser({"transformer": transformer})
    fuser.apply([(weights, SCALE)])
    assert_weights(transformer, expected)
    fuser.reset()
    assert all(torch.equal(w, linear_weights(pristine)[p]) for p, w in linear_weights(transformer).items())


def test_lokr_on_bfl_final_layer_has_its_halves_swapped(transformer):
    """BFL's final modulation is (shift, scale), diffusers' norm_out.linear (scale, shift): rows of the kron too."""
    modules = lyco.lokr_modules(transformer, lyco.KOHYA, ["final_layer.adaLN_modulation.1"], w1_factored=True)
    original = transformer.norm_out.linear.weight.detach().clone()
    delta = lokr_delta(modules[0].tensors)
    half = delta.shape[0] // 2
    fuse(transformer, lyco.file_tensors(modules, torch.float32))
    expected = original + SCALE * torch.cat([delta[half:], delta[:half]])
    torch.testing.assert_close(transformer.norm_out.linear.weight, expected, rtol=1e-5, atol=1e-6)


# --- LoHa ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("naming", [lyco.KOHYA, lyco.LYCORIS, lyco.PEFT])
def test_loha_gives_hand_merged_weights(transformer, naming):
    modules = lyco.loha_modules(transformer, naming, only_for(naming), rank=4, alpha=None if naming == lyco.PEFT else 2.0)
    expected = expected_weights(linear_weights(transformer), modules, loha_delta)

    weights = fuse(transformer, lyco.file_tensors(modules, torch.float32))

    assert weights.ignored == {}
    assert "LoHa" in weights.layout
    assert_weights(transformer, expected)


# --- DoRA ----------------------------------------------------------------------------------------------

DORA_CASES = {
    # PEFT/diffusers: lora_A/lora_B + lora_magnitude_vector (one per output row)
    "peft lora": (lyco.lora_modules, lyco.PEFT, "peft"),
    # LyCORIS ≥ 3.2 (wd_on_output): dora_scale out×1, on kohya's fused layers too (split by rows)
    "kohya locon, per row": (lyco.lora_modules, lyco.KOHYA, "row"),
    "kohya lokr, per row": (lyco.lokr_modules, lyco.KOHYA, "row"),
    "lycoris loha, per row": (lyco.loha_modules, lyco.LYCORIS, "row"),
    # LyCORIS 3.1 and older: dora_scale 1×in, one per input column
    "lycoris locon, per column": (lyco.lora_modules, lyco.LYCORIS, "column"),
    "lycoris lokr, per column": (lyco.lokr_modules, lyco.LYCORIS, "column"),
    # ... on kohya's fused layers, whose column norms run over all their parts
    "kohya locon, per column": (lyco.lora_modules, lyco.KOHYA, "column"),
    "kohya loha, per column": (lyco.loha_modules, lyco.KOHYA, "column"),
}
DELTA_OF = {lyco.lora_modules: lora_delta, lyco.lokr_modules: lokr_delta, lyco.loha_modules: loha_delta}


@pytest.mark.parametrize("scale", [1.0, SCALE])
@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_gives_hand_merged_weights(transformer, case, scale):
    make, naming, per = DORA_CASES[case]
    options = {"alpha": None} if naming == lyco.PEFT else {}
    modules = lyco.with_dora(transformer, make(transformer, naming, only_for(naming), **options), per=per)
    expected = expected_weights(linear_weights(transformer), modules, DELTA_OF[make], scale=scale)

    weights = fuse(transformer, lyco.file_tensors(modules, torch.float32), scale=scale)

    assert weights.ignored == {}
    assert "DoRA" in weights.layout
    assert_weights(transformer, expected)


def test_dora_row_norms_equal_the_magnitude_at_scale_1(transformer):
    """What DoRA means, checked without the test's merge: each output row's norm becomes its magnitude."""
    modules = lyco.with_dora(transformer, lyco.lora_modules(transformer, lyco.PEFT, DIFFUSERS_MODULES, alpha=None),
                             per="peft")
    fuse(transformer, lyco.file_tensors(modules, torch.float32), scale=1.0)
    for module in modules:
        weight = transformer.get_submodule(module.members[0].removeprefix("transformer.")).weight
        torch.testing.assert_close(weight.norm(dim=1), module.tensors["lora_magnitude_vector"], rtol=1e-5, atol=1e-6)


def test_two_dora_loras_and_a_plain_one_add_up_in_any_order(transformer, pristine):
    """Each DoRA LoRA is merged against the original as if alone; the changes add (lora/deltas.py)."""
    path = ["transformer.transformer_blocks.0.attn.to_q"]
    first = lyco.with_dora(transformer, lyco.lora_modules(transformer, lyco.PEFT, path, alpha=None, seed=1), per="peft")
    second = lyco.with_dora(transformer, lyco.lokr_modules(transformer, lyco.LYCORIS, path, seed=2), per="row", seed=3)
    plain = lyco.lora_modules(transformer, lyco.LYCORIS, path, seed=4)
    files = [(first, lora_delta, 1.0), (second, lokr_delta, 0.5), (plain, lora_delta, -0.8)]
    original = linear_weights(transformer)[path[0]]
    expected = original.clone()
    for modules, delta_of, scale in files:
        expected += expected_weights({path[0]: original}, modules, delta_of, scale=scale)[path[0]] - original
    loras = [(convert_lora(lyco.file_tensors(m, torch.float32), input_name="extra_lora", transformer=transformer), s)
             for m, _, s in files]

    results = []
    for order in (loras, loras[::-1]):
        LoraFuser({"transformer": transformer}).apply(order)
        results.append(transformer.get_submodule("transformer_blocks.0.attn.to_q").weight.detach().clone())
        transformer.load_state_dict(pristine.state_dict())
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_dora_scale_0_leaves_the_weights_untouched(transformer):
    modules = lyco.with_dora(transformer, lyco.lora_modules(transformer, lyco.KOHYA, KOHYA_MODULES), per="row")
    before = linear_weights(transformer)
    fuse(transformer, lyco.file_tensors(modules), scale=0.0)
    assert all(torch.equal(before[path], weight) for path, weight in linear_weights(transformer).items())


# --- refused -------------------------------------------------------------------------------------------

def test_lokr_tucker_factor_is_refused_naming_it(transformer):
    tensors = lyco.file_tensors(lyco.lokr_modules(transformer, lyco.KOHYA, ["img_in"]))
    tensors["lora_unet_img_in.lokr_t2"] = torch.zeros(2, 2, 3, 3)
    with pytest.raises(UserError, match=r"^lora_weights: .*'lora_unet_img_in.lokr_t2' is a LoKr Tucker factor"):
        convert_lora(tensors, input_name="lora_weights", transformer=transformer)


@pytest.mark.parametrize("make", [lyco.lokr_modules, lyco.loha_modules])
def test_lycoris_module_of_another_size_does_not_fit(transformer, make):
    tensors = lyco.file_tensors(make(transformer, lyco.LYCORIS, ["transformer.x_embedder"]))
    renamed = {key.replace("x_embedder", "context_embedder"): value for key, value in tensors.items()}  # 32×32
    with pytest.raises(UserError, match=r"^extra_lora: this LoRA does not fit FLUX\.1"):
        convert_lora(renamed, input_name="extra_lora", transformer=transformer)


@pytest.mark.parametrize(("key", "value"), [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", float("nan")),
    ("lora_unet_img_in.lokr_w2_b", float("inf")),
    ("lora_unet_single_blocks_1_linear1.dora_scale", float("-inf")),
])
def test_non_finite_lora_is_refused_naming_the_key(transformer, key, value):
    modules = (lyco.lora_modules(transformer, lyco.KOHYA, ["double_blocks.0.img_attn.qkv"])
               + lyco.lokr_modules(transformer, lyco.KOHYA, ["img_in"])
               + lyco.with_dora(transformer, lyco.lora_modules(transformer, lyco.KOHYA, ["single_blocks.1.linear1"]),
                                per="row"))
    tensors = lyco.file_tensors(modules)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    with pytest.raises(UserError, match=rf"^extra_lora: the LoRA file has non-finite values \(NaN or Inf\) in '{key}'"):
        convert_lora(tensors, input_name="extra_lora", transformer=transformer)
