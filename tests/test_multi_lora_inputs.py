"""MultiLoraPredictor's list inputs (extra_loras, extra_lora_scales) validated into a request: the rules README
states, each refusal naming the input (and the entry) and what to do. No model here."""

from __future__ import annotations

import pytest

from errors import UserError
from flux.request import MAX_EXTRA_LORAS, build_request

A, B, C = "owner/style-a", "huggingface.co/owner/style-b", "https://example.com/c.safetensors"


def listed(**inputs) -> list[tuple[str, str, float]]:
    request = build_request(prompt="x", **inputs)
    return [(spec.input_name, spec.source, spec.scale) for spec in request.loras]


def test_each_entry_is_a_lora_with_its_own_scale_named_by_its_index():
    assert listed(replicate_weights="owner/main", lora_scale=0.5, extra_loras=[A, B, C], extra_lora_scales=[0.8, -1, 3]) == [
        ("replicate_weights", "owner/main", 0.5),
        ("extra_loras[0]", A, 0.8),
        ("extra_loras[1]", B, -1.0),
        ("extra_loras[2]", C, 3.0),
    ]


@pytest.mark.parametrize("scales", [None, []])
def test_no_scales_apply_every_lora_at_one(scales):
    assert [scale for *_, scale in listed(extra_loras=[A, B], extra_lora_scales=scales)] == [1.0, 1.0]


@pytest.mark.parametrize("loras", [None, []])
def test_no_extra_loras_is_no_extra_lora(loras):
    assert listed(extra_loras=loras) == []


def test_eight_is_the_most():
    sources = [f"owner/style-{i}" for i in range(MAX_EXTRA_LORAS)]
    assert len(listed(extra_loras=sources)) == MAX_EXTRA_LORAS == 8
    with pytest.raises(UserError, match=r"^extra_loras: 9 LoRAs given; one request takes at most 8\."):
        listed(extra_loras=[*sources, "owner/style-8"])


@pytest.mark.parametrize("loras, scales", [([A, B, C], [0.5, 0.5]), ([A], [0.5, 0.5]), ([], [1.0])])
def test_scales_are_one_per_lora_or_none(loras, scales):
    message = rf"^extra_lora_scales: {len(scales)} scale\(s\) for {len(loras)} LoRA\(s\) in extra_loras; give one scale per LoRA"
    with pytest.raises(UserError, match=message):
        listed(extra_loras=loras, extra_lora_scales=scales)


@pytest.mark.parametrize("bad", [3.5, -1.5, float("nan"), float("inf")])
def test_a_scale_out_of_range_names_its_entry(bad):
    with pytest.raises(UserError, match=r"^extra_lora_scales\[1\]: .* is out of range; use -1 to 3\."):
        listed(extra_loras=[A, B], extra_lora_scales=[1, bad])


@pytest.mark.parametrize("bad", [True, "0.5", None])
def test_a_scale_must_be_a_number(bad):
    with pytest.raises(UserError, match=r"^extra_lora_scales\[0\]: expected a number"):
        listed(extra_loras=[A], extra_lora_scales=[bad])


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_entry_is_refused_not_skipped(blank):
    """A blank entry shifts nothing silently: it is a mistake (a row left empty), and the scales would no longer
    line up with the LoRAs if it were dropped."""
    with pytest.raises(UserError, match=r"^extra_loras\[1\]: is empty; remove the entry \(and its scale\)"):
        listed(extra_loras=[A, blank, B])


@pytest.mark.parametrize(
    "loras, main, message",
    [
        ([A, B, A], None, r"^extra_loras\[2\]: is the same LoRA as extra_loras\[0\]"),
        # the same source however it is spelled: Replicate reference and page URL, HF with ?download=true
        (["owner/style-a", "https://replicate.com/owner/style-a"], None, r"^extra_loras\[1\]: is the same LoRA as extra_loras\[0\]"),
        ([B, "https://huggingface.co/owner/style-b?download=true"], None, r"^extra_loras\[1\]: is the same LoRA as extra_loras\[0\]"),
        ([B, A], "owner/style-a", r"^extra_loras\[1\]: is the same LoRA as replicate_weights"),
    ],
)
def test_the_same_lora_twice_is_refused(loras, main, message):
    with pytest.raises(UserError, match=message + r"; list each LoRA once, with one scale\."):
        listed(extra_loras=loras, replicate_weights=main)


@pytest.mark.parametrize("name, value", [("extra_loras", "owner/style-a"), ("extra_lora_scales", 0.5)])
def test_a_lone_value_is_not_a_list(name, value):
    """coglet answers 422 for these by the schema; an in-process call gets the same refusal by name."""
    with pytest.raises(UserError, match=rf"^{name}: expected a list"):
        listed(**{name: value})


def test_an_entry_that_is_not_text_is_refused():
    with pytest.raises(UserError, match=r"^extra_loras\[0\]: expected a LoRA source \(text\), got 5"):
        listed(extra_loras=[5])


def test_a_bad_source_is_refused_before_anything_is_fetched():
    with pytest.raises(UserError, match=r"^extra_loras\[1\]: .*pickle"):
        listed(extra_loras=[A, "https://example.com/model.ckpt"])
