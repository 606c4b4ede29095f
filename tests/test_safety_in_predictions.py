"""The safety checker inside real predictions: dropped images leave gaps, and all-dropped fails the request.

The checker is steered only through its models (stage 1's thresholds, stage 2's head or a torch hook), the
same way tests/test_safety.py does; the code under test is the production predictor.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import AutoModelForImageClassification

from errors import UserError
from safety.verdicts import ALL_IMAGES_UNSAFE_MESSAGE
from script.cog_inputs import predict_with_defaults

FAST = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "seed": 9}


@pytest.fixture
def steered(predictor):
    """Stage 1 flags everything; stage 2 raises on its 2nd call (so image 1 is dropped). Restored afterwards."""
    checker = predictor.generator.safety
    original = checker.stage1_model.concept_embeds_weights.detach().clone()
    calls = []

    def raise_on_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stage 2 exploded")

    with torch.no_grad():
        checker.stage1_model.concept_embeds_weights.fill_(-1.0)
    hook = checker.stage2_model.register_forward_pre_hook(raise_on_second_call)
    yield calls
    hook.remove()
    with torch.no_grad():
        checker.stage1_model.concept_embeds_weights.copy_(original)


def test_unflagged_batch_keeps_every_image(predictor, caplog):
    paths = predict_with_defaults(predictor, **FAST, num_outputs=3)
    assert [p.name for p in paths] == ["out-0.webp", "out-1.webp", "out-2.webp"]
    assert "Safety check took" in caplog.text


def test_dropped_image_leaves_a_gap_in_names_and_order_is_kept(predictor, steered, caplog):
    paths = predict_with_defaults(predictor, **FAST, num_outputs=3)
    assert [p.name for p in paths] == ["out-0.webp", "out-2.webp"]
    assert len(steered) == 3  # stage 2 saw every image stage 1 flagged
    assert "dropped image 1" in caplog.text


def test_disabled_checker_runs_no_stage(predictor, steered, caplog):
    paths = predict_with_defaults(predictor, **FAST, num_outputs=2, disable_safety_checker=True)
    assert [p.name for p in paths] == ["out-0.webp", "out-1.webp"] and steered == []
    assert "disable_safety_checker=true" in caplog.text


def write_all_unsafe_checker(source_stage1, source_stage2, target) -> None:
    """Copies of the tiny safety models whose stage 1 flags everything and whose stage 2 says 'nsfw'."""
    stage1 = StableDiffusionSafetyChecker.from_pretrained(source_stage1)
    with torch.no_grad():
        stage1.concept_embeds_weights.fill_(-1.0)
    stage1.save_pretrained(target / "stable-diffusion-safety-checker")
    stage2 = AutoModelForImageClassification.from_pretrained(source_stage2)
    nsfw = stage2.config.label2id["nsfw"]
    with torch.no_grad():
        stage2.classifier.bias.fill_(-100.0)
        stage2.classifier.bias[nsfw] = 100.0
    stage2.save_pretrained(target / "nsfw_image_detection")
    for source, folder in ((source_stage1, "stable-diffusion-safety-checker"), (source_stage2, "nsfw_image_detection")):
        shutil.copy(source / "preprocessor_config.json", target / folder / "preprocessor_config.json")


def test_all_flagged_fails_through_the_real_server(tiny_weights, tmp_path):
    from tests.fixtures.cog_server import start_cog_server, stop_cog_server

    write_all_unsafe_checker(tiny_weights.safety_stage1, tiny_weights.safety_stage2, tmp_path)
    server = start_cog_server(tmp_path, {"FLUX_SAFETY_WEIGHTS_DIR": str(tmp_path)})
    try:
        body = server.predict(input={**FAST, "num_outputs": 2}).json()
        assert body["status"] == "failed"
        assert ALL_IMAGES_UNSAFE_MESSAGE in body["error"]
        assert "dropped image 0" in server.logs() and "dropped image 1" in server.logs()
        # disabling the checker on the same server succeeds
        body = server.predict(input={**FAST, "disable_safety_checker": True}).json()
        assert body["status"] == "succeeded", body
    finally:
        stop_cog_server(server)


def test_all_flagged_in_process_raises_the_exact_message(predictor):
    checker = predictor.generator.safety
    bias = checker.stage2_model.classifier.bias.detach().clone()
    original = checker.stage1_model.concept_embeds_weights.detach().clone()
    nsfw = checker.stage2_model.config.label2id["nsfw"]
    try:
        with torch.no_grad():
            checker.stage1_model.concept_embeds_weights.fill_(-1.0)
            checker.stage2_model.classifier.bias.fill_(-100.0)
            checker.stage2_model.classifier.bias[nsfw] = 100.0
        with pytest.raises(UserError) as error:
            predict_with_defaults(predictor, **FAST, num_outputs=2)
        assert str(error.value) == ALL_IMAGES_UNSAFE_MESSAGE
    finally:
        with torch.no_grad():
            checker.stage1_model.concept_embeds_weights.copy_(original)
            checker.stage2_model.classifier.bias.copy_(bias)


def test_a_checker_out_of_memory_fails_the_request_saying_so_and_the_next_one_runs(predictor):
    """Fail closed, but tell the truth: the user reads that the checker ran out of memory, not that the images
    were NSFW, and the same predictor serves the next request."""
    checker = predictor.generator.safety
    original = checker.stage1_model.concept_embeds_weights.detach().clone()

    def out_of_memory(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity")

    with torch.no_grad():
        checker.stage1_model.concept_embeds_weights.fill_(-1.0)
    hook = checker.stage2_model.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(UserError) as error:
            predict_with_defaults(predictor, **FAST, num_outputs=2)
    finally:
        hook.remove()
        with torch.no_grad():
            checker.stage1_model.concept_embeds_weights.copy_(original)
    assert str(error.value) == (
        "The safety checker failed (torch.OutOfMemoryError: CUDA out of memory) on 2 image(s), so they were not "
        "returned. Try fewer num_outputs or a smaller size, or run it again."
    )
    assert len(predict_with_defaults(predictor, **FAST, num_outputs=2)) == 2
