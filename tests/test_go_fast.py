"""go_fast through run(): the fp8 variant runs and stays close to bf16, the fallbacks run bf16 and say
why, LoRAs work on fp8 (an extra_lora alone too), and the scale settings act in one place."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flux.fast.quality import psnr
from script.cog_inputs import predict_with_defaults
from tests.fixtures.lora_factory import make_spec, write_layout

BASE = {"prompt": "a photo of TOK", "num_inference_steps": 1, "seed": 5, "output_format": "png", "disable_safety_checker": True}
SQUARE = {"aspect_ratio": "custom", "width": 256, "height": 256}  # custom size: the bf16 fallback, cheap
FAST = {"aspect_ratio": "21:9", "megapixels": "0.25"}  # the smallest fp8-eligible size: 768x320


def run(predictor, **inputs) -> bytes:
    return predict_with_defaults(predictor, **{**BASE, **inputs})[0].read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def lora_path(predictor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("go-fast-loras")
    transformer = predictor.generator.pipelines.transformer("dev")
    spec = make_spec(transformer, seed=7, magnitude=0.5)
    return str(write_layout("diffusers", spec, transformer, folder / "style.safetensors"))


@pytest.fixture
def local_loras(monkeypatch, lora_path):
    from pathlib import Path

    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(Path(lora_path).parent))
    return lora_path


def test_go_fast_runs_fp8_and_stays_close_to_bf16(predictor, caplog):
    plain = run(predictor, **FAST)
    with caplog.at_level(logging.INFO):
        fast = run(predictor, **FAST, go_fast=True)
    assert "go_fast: running FLUX dev-fp8 (fp8 weights only)" in caplog.text  # the CPU kernel, named
    assert fast != plain  # really another transformer
    assert psnr(pixels(fast), pixels(plain)) > 35


@pytest.mark.parametrize("case", ["custom", "image", "mask"])
def test_go_fast_falls_back_to_bf16_and_says_why(predictor, caplog, tmp_path, case):
    inputs = dict(SQUARE)
    if case != "custom":
        picture = tmp_path / "in.png"
        Image.new("RGB", (256, 256), (120, 60, 200)).save(picture)
        inputs = {"image": picture, "prompt_strength": 0.9}
        if case == "mask":
            mask = tmp_path / "mask.png"
            Image.new("L", (256, 256), 255).save(mask)
            inputs["mask"] = mask
    plain = run(predictor, **inputs)
    with caplog.at_level(logging.INFO):
        fast = run(predictor, **inputs, go_fast=True)
    assert fast == plain
    reason = {"custom": "aspect_ratio=custom", "image": "img2img", "mask": "inpainting"}[case]
    assert f"instead of fp8 because of {reason}" in caplog.text


def test_an_extra_lora_alone_works_on_fp8(predictor, local_loras, caplog):
    without = run(predictor, **FAST, go_fast=True)
    with caplog.at_level(logging.INFO):
        extra = run(predictor, **FAST, go_fast=True, extra_lora=local_loras)
    assert "extra_lora:" in caplog.text and "fused" in caplog.text
    assert extra != without
    assert extra == run(predictor, **FAST, go_fast=True, replicate_weights=local_loras)
    assert run(predictor, **FAST, go_fast=True) == without  # and it comes off exactly


def test_go_fast_multiplier_scales_both_loras_on_fp8_only(predictor, local_loras, monkeypatch):
    reference = run(predictor, **FAST, go_fast=True, extra_lora=local_loras, extra_lora_scale=0.75)
    bf16 = run(predictor, **FAST, extra_lora=local_loras, extra_lora_scale=0.5)
    monkeypatch.setenv("FLUX_GO_FAST_LORA_MULTIPLIER", "1.5")
    assert run(predictor, **FAST, go_fast=True, extra_lora=local_loras, extra_lora_scale=0.5) == reference
    assert run(predictor, **FAST, extra_lora=local_loras, extra_lora_scale=0.5) == bf16


def test_hosted_scale_curve_makes_one_lora_at_half_act_as_a_quarter(predictor, local_loras, monkeypatch):
    quarter = run(predictor, **SQUARE, replicate_weights=local_loras, lora_scale=0.25)
    monkeypatch.setenv("FLUX_LORA_SCALE_CURVE", "hosted")
    assert run(predictor, **SQUARE, replicate_weights=local_loras, lora_scale=0.5) == quarter
    assert run(predictor, **SQUARE, replicate_weights=local_loras, lora_scale=0.5, extra_lora=local_loras, extra_lora_scale=0.0) != quarter


def test_the_deployed_schema_decides_the_resident_variants(tiny_weights):
    """FastPredictor (go_fast on by default) keeps fp8 in memory first; Predictor and LegacyPredictor bf16."""
    from flux.variants import Variant
    from predict import FastPredictor, LegacyPredictor, Predictor

    expected = {
        FastPredictor: (Variant("dev", "fp8"), Variant("schnell", "fp8"), Variant("dev"), Variant("schnell")),
        Predictor: (Variant("dev"), Variant("schnell")),
        LegacyPredictor: (Variant("dev"), Variant("schnell")),
    }
    for cls, resident in expected.items():
        instance = cls()
        instance.setup()
        assert instance.generator.pipelines.resident == resident, cls.__name__
        assert all(instance.generator.pipelines.is_loaded(variant) for variant in resident)  # built before READY


def test_bf16_components_keep_their_dtype_through_img2img_inpaint_and_go_fast(tiny_weights, monkeypatch, tmp_path):
    """Issue 18, defect 1: img2img and inpaint share the components of txt2img and must not cast them (diffusers'
    from_pipe cast them all to float32 in place), or the next go_fast request fails on mixed dtypes."""
    from predict import Predictor

    monkeypatch.setenv("FLUX_DTYPE", "bf16")  # real bfloat16 arithmetic on CPU, as on a GPU
    instance = Predictor()
    instance.setup()
    pipelines = instance.generator.pipelines
    components = {"text_encoder": pipelines.text_encoder, "text_encoder_2": pipelines.get("dev", "txt2img").text_encoder_2,
                  "vae": pipelines.vae, "dev": pipelines.transformer("dev")}
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (256, 256), (120, 60, 200)).save(picture)
    Image.new("L", (256, 256), 255).save(mask)
    for inputs in [{"image": picture}, {"image": picture, "mask": mask}, {**FAST, "go_fast": True}]:
        run(instance, **inputs)
        assert {name: module.dtype for name, module in components.items()} == dict.fromkeys(components, torch.bfloat16)
