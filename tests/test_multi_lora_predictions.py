"""MultiLoraPredictor in process: each entry of extra_loras is treated as extra_lora is today, on fp8 (the go_fast
multiplier), in the bf16 fallbacks (img2img) and under the hosted scale curve."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from predict import MultiLoraPredictor
from script.cog_inputs import predict_with_defaults
from tests.fixtures.lora_factory import make_spec, write_layout

BASE = {"prompt": "a photo of TOK", "num_inference_steps": 1, "seed": 5, "output_format": "png", "disable_safety_checker": True}
SQUARE = {"aspect_ratio": "custom", "width": 256, "height": 256}  # custom size: the bf16 fallback, cheap
FAST = {"aspect_ratio": "21:9", "megapixels": "0.25"}  # the smallest fp8-eligible size


@pytest.fixture(scope="module")
def multi(predictor) -> MultiLoraPredictor:
    """The fourth class on the session's generator (setup is the same for every class on CPU)."""
    instance = MultiLoraPredictor()
    instance.generator = predictor.generator
    return instance


def run(predictor, **inputs) -> bytes:
    return predict_with_defaults(predictor, **{**BASE, **inputs})[0].read_bytes()


@pytest.fixture(scope="module")
def lora_folder(predictor, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("multi-predictions")
    transformer = predictor.generator.pipelines.transformer("dev")
    return [str(write_layout("diffusers", make_spec(transformer, seed=60 + i, magnitude=0.5), transformer, folder / f"{i}.safetensors"))
            for i in range(3)]


@pytest.fixture
def loras(monkeypatch, lora_folder) -> list[str]:
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(Path(lora_folder[0]).parent))
    return lora_folder


def test_one_entry_is_the_extra_lora_of_predictor(predictor, multi, loras):
    assert run(multi, **SQUARE, extra_loras=[loras[0]], extra_lora_scales=[0.7]) == run(predictor, **SQUARE, extra_lora=loras[0], extra_lora_scale=0.7)
    two = run(multi, **SQUARE, replicate_weights=loras[1], lora_scale=0.5, extra_loras=[loras[0]], extra_lora_scales=[0.7])
    assert two == run(predictor, **SQUARE, replicate_weights=loras[1], lora_scale=0.5, extra_lora=loras[0], extra_lora_scale=0.7)


def test_the_go_fast_multiplier_scales_every_lora_on_fp8(multi, loras, monkeypatch, caplog):
    reference = run(multi, **FAST, go_fast=True, extra_loras=loras, extra_lora_scales=[0.75, 0.375, -0.75])
    monkeypatch.setenv("FLUX_GO_FAST_LORA_MULTIPLIER", "1.5")
    with caplog.at_level(logging.INFO):
        scaled = run(multi, **FAST, go_fast=True, extra_loras=loras, extra_lora_scales=[0.5, 0.25, -0.5])
    assert scaled == reference
    assert "go_fast: running FLUX dev-fp8" in caplog.text
    for index, fused in enumerate(["0.75", "0.375", "-0.75"]):
        assert f"extra_loras[{index}]: " in caplog.text and f"(fused at {fused})" in caplog.text


def test_img2img_falls_back_to_bf16_with_every_lora_at_its_own_scale(multi, loras, monkeypatch, caplog, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (256, 256), (120, 60, 200)).save(picture)
    inputs = {"image": picture, "prompt_strength": 0.9, "extra_loras": loras, "extra_lora_scales": [0.5, 0.25, -0.5]}
    plain = run(multi, **inputs)
    monkeypatch.setenv("FLUX_GO_FAST_LORA_MULTIPLIER", "1.5")  # fp8 only: the fallback runs bf16
    with caplog.at_level(logging.INFO):
        assert run(multi, **inputs, go_fast=True) == plain
    assert "instead of fp8 because of img2img" in caplog.text


def test_the_hosted_curve_squares_a_lone_extra_lora_and_leaves_several_linear(multi, loras, monkeypatch):
    quarter = run(multi, **SQUARE, extra_loras=[loras[0]], extra_lora_scales=[0.25])
    linear_pair = run(multi, **SQUARE, extra_loras=loras[:2], extra_lora_scales=[0.5, 0.5])
    monkeypatch.setenv("FLUX_LORA_SCALE_CURVE", "hosted")
    assert run(multi, **SQUARE, extra_loras=[loras[0]], extra_lora_scales=[0.5]) == quarter
    assert run(multi, **SQUARE, extra_loras=loras[:2], extra_lora_scales=[0.5, 0.5]) == linear_pair
