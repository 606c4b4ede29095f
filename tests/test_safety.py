"""The two-stage safety checker, run for real on the tiny safety models.

The tiny models (weights/tiny/safety.py) judge by colour: stage 1 flags mostly red and mostly green pictures,
stage 2 calls mostly red ones "nsfw". So red is flagged and confirmed, green is flagged and overturned, and
blue, grey and noise pass stage 1. Tests steer further only through the models themselves: stage 1's concept
thresholds, stage 2's classifier head, or a torch hook that makes a model's forward raise.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from errors import UserError
from safety.checker import SafetyChecker, stage1_dtype
from safety.verdicts import ALL_IMAGES_UNSAFE_MESSAGE, SafetyReport
from weights.tiny.safety import MARKER_FILE, STAGING_PREFIX, ensure_tiny_safety

RED = (1.0, 0.0, 0.0)
GREEN = (0.0, 1.0, 0.0)
DARK_GREEN = (0.0, 0.6, 0.0)
BRIGHT_GREEN = (0.5, 1.0, 0.5)
BLUE = (0.0, 0.0, 1.0)
GREY = (0.5, 0.5, 0.5)
REPO_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", MARKER_FILE}


def picture(colour: tuple[float, float, float], size: tuple[int, int] = (256, 256), seed: int = 0) -> Image.Image:
    """A noisy picture of one colour (noise, so the processors see texture and not a flat field)."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = np.array(colour) * 255 + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def noise_picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return ensure_tiny_safety(tmp_path_factory.mktemp("tiny-safety"))


@pytest.fixture
def checker(tiny_dirs) -> SafetyChecker:
    return SafetyChecker.load(tiny_dirs["stage1"], tiny_dirs["stage2"], "cpu")


@pytest.fixture
def logs(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="safety.checker")
    return caplog


def count_forward_calls(model: torch.nn.Module) -> list[int]:
    """A forward hook (torch's own mechanism) that records one entry per call of the real model."""
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def flag_everything_in_stage1(checker: SafetyChecker) -> None:
    with torch.no_grad():
        checker.stage1_model.concept_embeds_weights.fill_(-1.0)  # any cosine beats -1


# --- the tiny models on disk --------------------------------------------------------------------------------


def test_tiny_repos_have_the_real_layouts(tiny_dirs):
    for repo in tiny_dirs.values():
        assert {path.name for path in repo.iterdir()} == REPO_FILES

    stage1_config = json.loads((tiny_dirs["stage1"] / "config.json").read_text())
    assert stage1_config["model_type"] == "clip"
    assert stage1_config["architectures"] == ["StableDiffusionSafetyChecker"]
    assert stage1_config["vision_config"]["image_size"] == 224
    assert "text_config" in stage1_config
    with safe_open(tiny_dirs["stage1"] / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    # The real checkpoint's key names, which transformers 5 must map onto its own module tree.
    assert "vision_model.vision_model.embeddings.patch_embedding.weight" in keys
    assert {"concept_embeds", "concept_embeds_weights", "special_care_embeds", "visual_projection.weight"} <= keys

    stage2_config = json.loads((tiny_dirs["stage2"] / "config.json").read_text())
    assert stage2_config["model_type"] == "vit"
    assert stage2_config["architectures"] == ["ViTForImageClassification"]
    assert stage2_config["id2label"] == {"0": "normal", "1": "nsfw"}
    with safe_open(tiny_dirs["stage2"] / "model.safetensors", "pt") as weights:
        assert "vit.encoder.layer.0.attention.attention.query.weight" in set(weights.keys())


def test_tiny_build_is_deterministic_and_reused(tiny_dirs, tmp_path):
    rebuilt = ensure_tiny_safety(tmp_path)
    for stage, repo in tiny_dirs.items():
        for name in REPO_FILES:
            assert (rebuilt[stage] / name).read_bytes() == (repo / name).read_bytes(), (stage, name)

    before = {path: path.stat().st_mtime_ns for repo in rebuilt.values() for path in repo.iterdir()}
    assert ensure_tiny_safety(tmp_path) == rebuilt
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_unfinished_and_outdated_builds_are_replaced(tiny_dirs, tmp_path):
    unfinished = tmp_path / tiny_dirs["stage1"].name
    shutil.copytree(tiny_dirs["stage1"], unfinished)
    (unfinished / MARKER_FILE).unlink()
    (unfinished / "model.safetensors").write_bytes(b"truncated")
    outdated = tmp_path / tiny_dirs["stage2"].name
    shutil.copytree(tiny_dirs["stage2"], outdated)
    (outdated / MARKER_FILE).write_text("0")
    (outdated / "config.json").write_text("{}")
    leftover = tmp_path / f"{STAGING_PREFIX}crashed"
    leftover.mkdir()

    rebuilt = ensure_tiny_safety(tmp_path)

    for stage, repo in tiny_dirs.items():
        for name in REPO_FILES:
            assert (rebuilt[stage] / name).read_bytes() == (repo / name).read_bytes(), (stage, name)
    assert not leftover.exists()


# --- loading ------------------------------------------------------------------------------------------------


def test_loads_from_the_tiny_layout_in_fp32_on_cpu(checker):
    assert checker.stage1_model.dtype == torch.float32
    assert type(checker.stage1_model).__name__ == "StableDiffusionSafetyChecker"
    assert type(checker.stage1_processor).__name__.startswith("CLIPImageProcessor")
    assert checker.stage1_processor.crop_size["height"] == 224
    assert type(checker.stage2_model).__name__ == "ViTForImageClassification"
    assert checker.stage2_model.config.id2label == {0: "normal", 1: "nsfw"}


def test_loading_a_missing_folder_fails_without_trying_the_hub(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SafetyChecker.load(tiny_dirs["stage1"], tmp_path / "nsfw_image_detection", "cpu")


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cuda", torch.float16),
        ("cuda:1", torch.float16),
        (torch.device("cuda", 0), torch.float16),
        ("cpu", torch.float32),
    ],
)
def test_stage1_runs_in_fp16_only_on_cuda(device, dtype):
    assert stage1_dtype(device) == dtype


# --- verdicts -----------------------------------------------------------------------------------------------


def test_nothing_flagged_keeps_everything_and_skips_stage2(checker, logs):
    images = [picture(BLUE), picture(GREY), noise_picture()]
    stage2_calls = count_forward_calls(checker.stage2_model)

    report = checker.check(images)

    assert [verdict.stage1_flagged for verdict in report.verdicts] == [False, False, False]
    assert report.kept_or_raise(images) == list(enumerate(images))
    assert stage2_calls == []
    assert "Safety check took" in logs.text and "0 flagged by stage 1, 0 dropped" in logs.text


def test_flagged_and_confirmed_images_are_dropped_with_their_index(checker, logs):
    images = [picture(BLUE), picture(RED), picture(GREY)]
    stage2_calls = count_forward_calls(checker.stage2_model)

    report = checker.check(images)

    assert report.verdicts[1].stage1_flagged and report.verdicts[1].stage2_label == "nsfw"
    assert report.dropped_indices == [1]
    assert report.kept_or_raise(images) == [(0, images[0]), (2, images[2])]
    assert len(stage2_calls) == 1  # only the flagged image went to stage 2
    assert "dropped image 1: stage 1 flagged it, stage 2 said 'nsfw'" in logs.text


def test_stage2_overturns_a_stage1_flag(checker, logs):
    images = [picture(GREEN), picture(BLUE)]

    report = checker.check(images)

    assert report.verdicts[0].stage1_flagged and report.verdicts[0].stage2_label == "normal"
    assert report.kept_indices == [0, 1]
    assert "kept image 0: stage 1 flagged it, stage 2 said 'normal'" in logs.text


def test_all_dropped_raises_the_user_error(checker, logs):
    images = [picture(RED, seed=1), picture(RED, seed=2)]

    report = checker.check(images)

    assert report.kept_indices == []
    with pytest.raises(UserError) as raised:
        report.kept_or_raise(images)
    assert str(raised.value) == (
        "All generated images contained NSFW content. Try running it again with a different prompt."
    )
    assert str(raised.value) == ALL_IMAGES_UNSAFE_MESSAGE
    assert "dropped image 0" in logs.text and "dropped image 1" in logs.text


def test_thresholds_steer_stage1_and_stage2_decides_every_flag(checker):
    images = [picture(BLUE), picture(GREY), picture(RED)]
    flag_everything_in_stage1(checker)
    stage2_calls = count_forward_calls(checker.stage2_model)

    report = checker.check(images)

    assert [verdict.stage1_flagged for verdict in report.verdicts] == [True, True, True]
    assert [verdict.stage2_label for verdict in report.verdicts] == ["normal", "normal", "nsfw"]
    assert report.kept_indices == [0, 1]
    assert len(stage2_calls) == 3


def test_stage2_head_steered_to_nsfw_drops_every_flagged_image(checker):
    images = [picture(BLUE), picture(GREEN)]
    flag_everything_in_stage1(checker)
    with torch.no_grad():
        checker.stage2_model.classifier.bias.copy_(torch.tensor([0.0, 100.0]))  # "nsfw" wins everywhere

    report = checker.check(images)

    assert [verdict.stage2_label for verdict in report.verdicts] == ["nsfw", "nsfw"]
    with pytest.raises(UserError, match="All generated images contained NSFW content"):
        report.kept_or_raise(images)


def test_unflagged_images_skip_stage2_even_if_it_would_say_nsfw(checker):
    images = [picture(BLUE), picture(GREEN)]
    with torch.no_grad():
        checker.stage2_model.classifier.bias.copy_(torch.tensor([0.0, 100.0]))

    report = checker.check(images)

    assert report.verdicts[0].stage2_label is None
    assert report.kept_indices == [0]


def test_stage2_failure_drops_only_the_image_it_failed_on(checker, logs):
    # Stage 2 raises on bright pictures (mean normalised pixel above 0): here the bright green one.
    def fail_on_bright_pictures(module, args, kwargs):
        if kwargs["pixel_values"].mean() > 0:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    checker.stage2_model.register_forward_pre_hook(fail_on_bright_pictures, with_kwargs=True)
    images = [picture(DARK_GREEN), picture(BRIGHT_GREEN), picture(BLUE)]

    report = checker.check(images)

    assert [verdict.stage1_flagged for verdict in report.verdicts] == [True, True, False]
    assert report.verdicts[0].stage2_label == "normal"
    assert report.verdicts[1].stage2_error.startswith("RuntimeError: CUDA error")
    assert report.kept_indices == [0, 2]
    assert "dropped image 1: stage 1 flagged it, stage 2 failed (RuntimeError: CUDA error" in logs.text


def test_a_corrupted_stage2_label_table_makes_its_verdicts_unsafe(checker):
    checker.stage2_model.config.id2label = {0: "normal"}  # the "nsfw" entry is gone
    images = [picture(RED), picture(GREEN)]

    report = checker.check(images)

    assert report.verdicts[0].stage2_error.startswith("KeyError")
    assert report.kept_indices == [1]


def test_a_stage1_failure_sends_every_image_to_stage2(checker, logs):
    def fail(module, args, kwargs):
        raise RuntimeError("out of memory")

    checker.stage1_model.register_forward_pre_hook(fail, with_kwargs=True)
    images = [picture(RED), picture(GREEN), picture(BLUE)]

    report = checker.check(images)

    assert all(verdict.stage1_flagged for verdict in report.verdicts)
    assert [verdict.stage2_label for verdict in report.verdicts] == ["nsfw", "normal", "normal"]
    assert report.kept_indices == [1, 2]
    assert "stage 1 failed (RuntimeError: out of memory); sending every image to stage 2" in logs.text


def test_disabled_skips_both_stages_and_says_so(checker, logs):
    images = [picture(RED), picture(RED, seed=1)]
    flag_everything_in_stage1(checker)
    stage1_calls = count_forward_calls(checker.stage1_model)
    stage2_calls = count_forward_calls(checker.stage2_model)

    report = checker.check(images, disabled=True)

    assert report.kept_or_raise(images) == list(enumerate(images))
    assert not any(verdict.checked for verdict in report.verdicts)
    assert stage1_calls == [] and stage2_calls == []
    assert "Safety checker disabled (disable_safety_checker=true): skipping both stages." in logs.text


# --- order and indices --------------------------------------------------------------------------------------


def test_full_size_batch_keeps_order_and_indices(checker, logs):
    images = [picture(colour, size=(1024, 1024), seed=i) for i, colour in enumerate((BLUE, RED, GREEN, RED))]

    report = checker.check(images)

    assert [verdict.index for verdict in report.verdicts] == [0, 1, 2, 3]
    kept = report.kept_or_raise(images)
    assert [index for index, _ in kept] == [0, 2]
    assert all(image is images[index] for index, image in kept)
    dropped_lines = [record.getMessage() for record in logs.records if "dropped image" in record.getMessage()]
    assert [line.split(":")[0] for line in dropped_lines] == [
        "Safety checker dropped image 1",
        "Safety checker dropped image 3",
    ]


def test_an_empty_batch_has_nothing_to_judge(checker, logs):
    assert checker.check([]).kept_or_raise([]) == []
    assert "failed" not in logs.text


def test_non_square_outputs_are_checked(checker):
    images = [picture(RED, size=(1344, 768)), picture(BLUE, size=(640, 1536))]

    assert checker.check(images).kept_indices == [1]


def test_report_must_match_the_batch_it_judged():
    report = SafetyReport.unchecked(2)
    with pytest.raises(ValueError, match="2 images, not 3"):
        report.kept_or_raise(["a", "b", "c"])
    assert SafetyReport.unchecked(0).kept_or_raise([]) == []
