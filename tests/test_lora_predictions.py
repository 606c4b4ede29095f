"""LoRAs in real predictions: served over HTTP, converted from several layouts, fused and taken off exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from errors import UserError
from predict import Predictor
from script.cog_inputs import predict_with_defaults
from tests.fixtures.lora_factory import make_spec, sdxl_tensors, write_layout, write_tensors
from tests.fixtures.servers import PICKLE_BYTES

pytest_plugins = ["tests.fixtures.servers"]

BASE = {"prompt": "a photo of TOK", "num_inference_steps": 2, "megapixels": "0.25", "seed": 21, "output_format": "png", "disable_safety_checker": True}


def image_bytes(predictor, **inputs) -> bytes:
    return predict_with_defaults(predictor, **{**BASE, **inputs})[0].read_bytes()


@pytest.fixture(scope="module")
def baseline(predictor) -> bytes:
    """The no-LoRA image, taken before any LoRA was ever fused in this process... or after a reset, which must match."""
    return image_bytes(predictor)


@pytest.fixture
def lora_urls(predictor, file_server, tmp_path):
    """The same deltas in several layouts, plus a second LoRA, served on loopback."""
    pipelines = predictor.generator.pipelines
    spec = make_spec(pipelines.transformer("dev"), pipelines.text_encoder, seed=1, magnitude=0.5)
    other = make_spec(pipelines.transformer("dev"), seed=2, magnitude=0.5)
    urls = {}
    for layout in ("diffusers", "kohya", "comfyui"):
        path = write_layout(layout, spec, pipelines.transformer("dev"), tmp_path / f"{layout}.safetensors")
        urls[layout] = file_server.add(f"/{layout}.safetensors", path.read_bytes())
    path = write_layout("diffusers", other, pipelines.transformer("dev"), tmp_path / "other.safetensors")
    urls["other"] = file_server.add("/other.safetensors", path.read_bytes())
    urls["sdxl"] = file_server.add("/sdxl.safetensors", write_tensors(sdxl_tensors(), tmp_path / "sdxl.safetensors").read_bytes())
    urls["pickle"] = file_server.add("/model.safetensors", PICKLE_BYTES)
    return urls


def test_lora_changes_the_image_and_comes_off_exactly(predictor, baseline, lora_urls):
    with_lora = image_bytes(predictor, replicate_weights=lora_urls["diffusers"])
    assert with_lora != baseline
    assert image_bytes(predictor) == baseline


def test_same_deltas_in_every_layout_give_the_same_image(predictor, lora_urls):
    images = {layout: image_bytes(predictor, replicate_weights=lora_urls[layout]) for layout in ("diffusers", "kohya", "comfyui")}
    assert images["kohya"] == images["diffusers"] == images["comfyui"]


def test_scale_zero_is_byte_identical_to_no_lora(predictor, baseline, lora_urls):
    assert image_bytes(predictor, replicate_weights=lora_urls["diffusers"], lora_scale=0) == baseline


def test_extra_lora_alone_equals_the_same_lora_as_main(predictor, baseline, lora_urls):
    as_extra = image_bytes(predictor, extra_lora=lora_urls["diffusers"], extra_lora_scale=0.7)
    as_main = image_bytes(predictor, replicate_weights=lora_urls["diffusers"], lora_scale=0.7)
    assert as_extra == as_main != baseline


def test_main_and_extra_combine(predictor, lora_urls):
    main = image_bytes(predictor, replicate_weights=lora_urls["diffusers"])
    extra = image_bytes(predictor, extra_lora=lora_urls["other"])
    both = image_bytes(predictor, replicate_weights=lora_urls["diffusers"], extra_lora=lora_urls["other"])
    assert len({main, extra, both}) == 3


def test_same_loras_again_are_not_reloaded(predictor, lora_urls, file_server, caplog):
    image_bytes(predictor, replicate_weights=lora_urls["diffusers"], lora_scale=0.9)
    downloads = len(file_server.requests_for("/diffusers.safetensors"))
    with caplog.at_level(logging.INFO):
        image_bytes(predictor, replicate_weights=lora_urls["diffusers"], lora_scale=0.9)
    assert "already in place" in caplog.text
    assert len(file_server.requests_for("/diffusers.safetensors")) == downloads  # served from the cache


@pytest.mark.parametrize("bad, message", [("sdxl", "extra_lora: .*(SDXL|Stable Diffusion)"), ("pickle", "extra_lora: .*pickle")])
def test_a_bad_lora_fails_clearly_and_leaves_no_trace(predictor, baseline, lora_urls, bad, message):
    image_bytes(predictor, replicate_weights=lora_urls["other"])  # some LoRA is fused from the previous request
    with pytest.raises(UserError, match=message):
        image_bytes(predictor, replicate_weights=lora_urls["diffusers"], extra_lora=lora_urls[bad])
    assert image_bytes(predictor) == baseline


def test_unreachable_lora_fails_with_the_input_name(predictor, baseline):
    with pytest.raises(UserError, match="^replicate_weights: "):
        image_bytes(predictor, replicate_weights="https://127.0.0.1:9/missing.safetensors")
    assert image_bytes(predictor) == baseline


def test_deployment_default_lora_from_setup_weights(predictor, lora_urls, monkeypatch):
    expected = image_bytes(predictor, replicate_weights=lora_urls["diffusers"], lora_scale=0.8)
    other = image_bytes(predictor, replicate_weights=lora_urls["other"], lora_scale=0.8)
    monkeypatch.setenv("FLUX_DEFAULT_LORA", lora_urls["other"])  # setup(weights) wins over the env var
    deployed = Predictor()
    deployed.setup(weights=lora_urls["diffusers"])
    assert image_bytes(deployed, lora_scale=0.8) == expected
    assert image_bytes(deployed, replicate_weights=lora_urls["other"], lora_scale=0.8) == other  # the request wins


def test_after_loras_the_output_equals_a_fresh_process(predictor, lora_urls, tmp_path):
    import hashlib
    import subprocess
    import sys

    image_bytes(predictor, replicate_weights=lora_urls["diffusers"], extra_lora=lora_urls["other"], lora_scale=1.3)
    ours = hashlib.sha256(image_bytes(predictor)).hexdigest()
    script = (
        "import hashlib, logging; from predict import Predictor; from script.cog_inputs import predict_with_defaults\n"
        "p = Predictor(); p.setup(); logging.disable(logging.CRITICAL)\n"
        f"print('SHA', hashlib.sha256(predict_with_defaults(p, **{BASE!r})[0].read_bytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    fresh = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("SHA ")]
    assert fresh == [ours], result.stderr[-2000:]


def test_switching_models_takes_the_lora_off_the_shared_text_encoder(predictor, lora_urls):
    """dev and schnell share CLIP: a LoRA fused into it for dev must be gone for a plain schnell request."""
    schnell_plain = image_bytes(predictor, model="schnell")
    image_bytes(predictor, replicate_weights=lora_urls["diffusers"])  # this LoRA also changes the text encoder
    assert image_bytes(predictor, model="schnell") == schnell_plain
    with_lora_on_schnell = image_bytes(predictor, model="schnell", replicate_weights=lora_urls["diffusers"])
    assert with_lora_on_schnell != schnell_plain
    assert image_bytes(predictor, model="schnell") == schnell_plain
