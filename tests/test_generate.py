"""Generation through the in-process Predictor on the tiny weights: determinism, batches, modes, formats."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from flux.generate import out_of_memory_error
from flux.request import build_request
from script.cog_inputs import predict_with_defaults

FAST = {"prompt": "a photo of TOK", "num_inference_steps": 2, "megapixels": "0.25", "disable_safety_checker": True}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_same_request_gives_byte_identical_files(predictor):
    first = [p.read_bytes() for p in predict_with_defaults(predictor, **FAST, seed=11, num_outputs=2)]
    second = [p.read_bytes() for p in predict_with_defaults(predictor, **FAST, seed=11, num_outputs=2)]
    assert first == second
    assert first[0] != first[1]  # seed+1 is a different image


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(predictor):
    batch = [pixels(p) for p in predict_with_defaults(predictor, **FAST, seed=100, num_outputs=3, output_format="png")]
    for i in (1, 2):
        single = pixels(predict_with_defaults(predictor, **FAST, seed=100 + i, output_format="png")[0])
        difference = np.abs(single - batch[i])
        assert difference.max() <= 2, "batched kernels may differ by float noise only"
        assert (difference > 0).mean() < 0.01
    assert np.abs(batch[0] - batch[1]).mean() > 5


def test_one_request_in_flight_leaves_no_files_behind(predictor):
    first = predict_with_defaults(predictor, **FAST, seed=1)
    second = predict_with_defaults(predictor, **FAST, seed=1)
    assert not first[0].exists() and second[0].exists()
    assert first[0].parent != second[0].parent


@pytest.mark.parametrize("output_format, pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_formats_and_names(predictor, output_format, pil_format):
    paths = predict_with_defaults(predictor, **FAST, seed=3, num_outputs=2, output_format=output_format, aspect_ratio="3:2")
    assert [p.name for p in paths] == [f"out-0.{output_format}", f"out-1.{output_format}"]
    for path in paths:
        image = Image.open(path)
        assert image.format == pil_format and image.size == (608, 416)


@pytest.mark.parametrize("output_format", ["jpg", "webp"])
def test_quality_changes_lossy_file_size(predictor, output_format):
    low = predict_with_defaults(predictor, **FAST, seed=4, output_format=output_format, output_quality=10)[0].stat().st_size
    high = predict_with_defaults(predictor, **FAST, seed=4, output_format=output_format, output_quality=95)[0].stat().st_size
    assert high > low * 1.5


def test_png_ignores_quality(predictor):
    a = predict_with_defaults(predictor, **FAST, seed=4, output_format="png", output_quality=10)[0].read_bytes()
    b = predict_with_defaults(predictor, **FAST, seed=4, output_format="png", output_quality=95)[0].read_bytes()
    assert a == b


def test_schnell_ignores_guidance_and_dev_uses_it(predictor):
    def image(model, guidance):
        return predict_with_defaults(predictor, **FAST, seed=5, model=model, guidance_scale=guidance, output_format="png")[0].read_bytes()

    assert image("schnell", 0) == image("schnell", 7)
    assert image("dev", 0) != image("dev", 7)
    assert image("dev", 3) != image("schnell", 3)


def test_custom_size(predictor):
    path = predict_with_defaults(predictor, **FAST, aspect_ratio="custom", width=300, height=520)[0]
    assert Image.open(path).size == (304, 528)


def test_img2img_uses_the_input_size_and_strength(predictor, tmp_path):
    source = tmp_path / "in.png"
    Image.effect_noise((500, 333), 60).convert("RGB").save(source)
    def run(strength):
        path = predict_with_defaults(predictor, **{**FAST, "num_inference_steps": 4}, seed=6, image=source, prompt_strength=strength, output_format="png")[0]
        return pixels(path)

    weak, strong = run(0.3), run(1.0)
    assert weak.shape == (336, 512, 3)  # 500x333, each side rounded up to a multiple of 16
    assert weak.tolist() != strong.tolist()


def test_prompt_strength_zero_runs_and_stays_close_to_the_input(predictor, tmp_path):
    source = tmp_path / "in.png"
    Image.effect_noise((256, 256), 60).convert("RGB").save(source)
    kept = pixels(predict_with_defaults(predictor, **FAST, seed=6, image=source, prompt_strength=0, output_format="png")[0])
    redrawn = pixels(predict_with_defaults(predictor, **FAST, seed=6, image=source, prompt_strength=1, output_format="png")[0])
    original = pixels(source)
    assert np.abs(kept - original).mean() < np.abs(redrawn - original).mean()


def test_inpaint_depends_on_the_mask(predictor, tmp_path):
    source, left, right = tmp_path / "in.png", tmp_path / "left.png", tmp_path / "right.png"
    Image.effect_noise((256, 256), 60).convert("RGB").save(source)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))
    mask.save(left)
    mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(right)
    a = pixels(predict_with_defaults(predictor, **FAST, seed=7, image=source, mask=left, output_format="png")[0])
    b = pixels(predict_with_defaults(predictor, **FAST, seed=7, image=source, mask=right, output_format="png")[0])
    assert a.shape == (256, 256, 3)
    assert a.tolist() != b.tolist()


def test_bad_input_is_a_user_error_and_the_predictor_keeps_working(predictor, tmp_path):
    with pytest.raises(UserError, match="^mask: "):
        predict_with_defaults(predictor, **FAST, mask=tmp_path / "missing.png")
    assert predict_with_defaults(predictor, **FAST)[0].exists()


@pytest.mark.parametrize("variant", ["FastPredictor", "LegacyPredictor"])
def test_schema_variants_run_on_the_same_generator(predictor, variant):
    import predict

    other = getattr(predict, variant)()
    other.generator = predictor.generator  # same loaded models; only the schema layer differs
    paths = predict_with_defaults(other, prompt="x", num_inference_steps=2, num_outputs=2, aspect_ratio="16:9", seed=2)
    assert [Image.open(p).size for p in paths] == [(1344, 768)] * 2


def test_running_out_of_gpu_memory_says_what_to_change_and_frees_the_memory_for_the_next_request(predictor, monkeypatch):
    transformer = predictor.generator.pipelines.transformer("dev")
    held = []

    def out_of_memory(*args, **kwargs):  # the transformer's forward, as CUDA fails it
        activations = torch.empty(1024)  # what the failed step holds
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB")

    monkeypatch.setattr(transformer, "forward", out_of_memory)
    with pytest.raises(UserError, match=r"GPU ran out of memory .* try fewer num_outputs than 2, or a smaller size") as caught:
        predict_with_defaults(predictor, **FAST, num_outputs=2)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)  # kept for the log, its frames cleared
    assert held and held[0]() is None  # the failed request's tensors are freed before the user hears of it
    monkeypatch.undo()
    assert predict_with_defaults(predictor, **FAST)[0].exists()


def test_the_out_of_memory_message_names_only_what_would_help():
    message = str(out_of_memory_error(build_request(prompt="x", num_outputs=4, megapixels="1"), go_fast_input=True))
    assert message == ("The GPU ran out of memory for this request (4 x 1024x1024); try fewer num_outputs than 4, or a "
                       "smaller size than 1024x1024 (megapixels, or width and height with aspect_ratio=custom), or go_fast=true.")
    one_fast = str(out_of_memory_error(build_request(prompt="x", go_fast=True), go_fast_input=True))
    assert "num_outputs" not in one_fast and "go_fast" not in one_fast
    assert "go_fast" not in str(out_of_memory_error(build_request(prompt="x"), go_fast_input=False))  # LegacyPredictor
    custom = build_request(prompt="x", aspect_ratio="custom", width=512, height=512)  # bf16 even with go_fast
    assert "go_fast" not in str(out_of_memory_error(custom, go_fast_input=True))
