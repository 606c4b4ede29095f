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
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from errors import UserError
from safety.checker import SafetyChecker, stage1_dtype
from safety.verdicts import ALL_IMAGES_UNSAFE_MESSAGE, ImageVerdict, SafetyReport, short_error
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


# --- a checker that fails is not a verdict --------------------------------------------------------------

TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
             "1.06 GiB is free. Of the allocated memory 76.2 GiB is allocated by PyTorch.")


activations: list[weakref.ref] = []  # the tensors each failing forward allocated


@pytest.fixture
def cache_emptied(monkeypatch) -> list[bool]:
    """Records each torch.cuda.empty_cache() call (a no-op on this CPU), and whether the tensors the failed
    forward made were already gone by then: cached memory can only be freed once nothing holds it."""
    calls: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(all(ref() is None for ref in activations)))
    activations.clear()
    return calls



def run_out_of_memory(*, on: object = None):
    """A forward pre-hook that allocates like a forward, then raises torch's OOM (on every call, or on the
    images whose mean normalised pixel is above 0 when on="bright")."""

    def hook(module, args, kwargs):
        pixels = kwargs.get("pixel_values", kwargs.get("clip_input"))
        if on == "bright" and pixels.mean() <= 0:
            return
        workspace = torch.empty(1024, 1024)
        activations.append(weakref.ref(workspace))
        raise torch.OutOfMemoryError(TORCH_OOM)

    return hook


@pytest.mark.parametrize("stages", [("stage2",), ("stage1", "stage2")])
def test_out_of_memory_says_the_checker_failed_not_nsfw(checker, cache_emptied, logs, stages):
    images = [picture(RED, seed=1), picture(GREEN, seed=2)]
    flag_everything_in_stage1(checker)
    for stage in stages:
        getattr(checker, f"{stage}_model").register_forward_pre_hook(run_out_of_memory(), with_kwargs=True)

    report = checker.check(images)

    assert report.failed_indices == report.dropped_indices == [0, 1]
    with pytest.raises(UserError) as raised:
        report.kept_or_raise(images)
    assert str(raised.value) == (
        "The safety checker failed (torch.OutOfMemoryError: CUDA out of memory) on 2 image(s), so they were not "
        "returned. Try fewer num_outputs or a smaller size, or run it again."
    )
    assert cache_emptied == [True] * (len(stages) + 1)  # after every OOM, once its tensors were released
    assert "2 dropped (0 judged unsafe, 2 because the checker failed on it)" in logs.text


def test_a_cuda_error_on_every_image_says_so_and_suggests_a_rerun(checker, cache_emptied):
    def fail(module, args, kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                                     "might be asynchronously reported at some other API call")

    checker.stage2_model.register_forward_pre_hook(fail, with_kwargs=True)
    images = [picture(RED), picture(GREEN)]

    with pytest.raises(UserError) as raised:
        checker.check(images).kept_or_raise(images)
    assert str(raised.value) == (
        "The safety checker failed (torch.AcceleratorError: CUDA error: an illegal memory access was encountered) "
        "on 2 image(s), so they were not returned. Try running it again."
    )
    assert cache_emptied == []  # not an OOM: there is nothing to give back


def test_judged_and_failed_images_are_told_apart(checker, cache_emptied):
    images = [picture(RED), picture(BRIGHT_GREEN)]  # red is judged nsfw; stage 2 runs out of memory on bright green
    checker.stage2_model.register_forward_pre_hook(run_out_of_memory(on="bright"), with_kwargs=True)

    report = checker.check(images)

    assert report.verdicts[0].stage2_label == "nsfw" and not report.verdicts[0].failed
    assert report.failed_indices == [1]
    with pytest.raises(UserError, match=r"on 1 image\(s\), so they were not returned \(the other 1 contained NSFW "
                                        r"content\)\. Try fewer num_outputs"):
        report.kept_or_raise(images)


def test_a_partly_failed_batch_returns_the_rest_and_the_log_says_so(checker, cache_emptied, logs):
    images = [picture(DARK_GREEN), picture(BRIGHT_GREEN), picture(BLUE)]
    checker.stage2_model.register_forward_pre_hook(run_out_of_memory(on="bright"), with_kwargs=True)

    report = checker.check(images)

    assert report.kept_or_raise(images) == [(0, images[0]), (2, images[2])]
    assert ("The safety checker failed on 1 of 3 image(s) (indices [1]: torch.OutOfMemoryError: CUDA out of memory); "
            "they were dropped unjudged, the other 2 returned.") in logs.text
    assert cache_emptied == [True]


def test_the_user_sees_an_errors_type_and_first_sentence_and_never_a_path():
    assert short_error(f"torch.OutOfMemoryError: {TORCH_OOM}") == "torch.OutOfMemoryError: CUDA out of memory"
    assert short_error("KeyError: 1") == "KeyError: 1"
    assert short_error("RuntimeError: ") == "RuntimeError"
    assert short_error("OSError: cannot read /srv/weights/model.safetensors") == "OSError"
    assert len(short_error("RuntimeError: " + "x" * 500)) == 120
    failed = ImageVerdict(0, stage1_flagged=True, stage2_error="OSError: cannot read /srv/weights/x. Gone")
    with pytest.raises(UserError, match=r"^The safety checker failed \(OSError\) on 1 image\(s\)"):
        SafetyReport((failed,)).kept_or_raise(["image"])


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
