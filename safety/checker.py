"""The two-stage safety checker.

Stage 1, CompVis' StableDiffusionSafetyChecker (CLIP), looks at the whole batch. Only the images it flags go to
stage 2, Falconsai/nsfw_image_detection (a ViT classifier), which has the last word: an image is unsafe when
stage 2's label is not "normal" or when stage 2 fails on it. A failure drops the image (fail closed), but the
report keeps it apart from a verdict, so the user reads that the checker failed and why, not "NSFW content";
after an out-of-memory error the CUDA cache is emptied, so the next image or request has the room.

    checker = SafetyChecker.load(stage1_dir, stage2_dir, device)      # once, at setup
    report = checker.check(images, disabled=disable_safety_checker)   # per request
    kept = report.kept_or_raise(images)                                # [(index, image), ...] or UserError

Importing this module changes no library's configuration; setup calls `quiet_safety_checker_logs()` (after
weights.libraries.prepare_libraries(), which must run before transformers is imported for its choices to hold).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from safety.verdicts import ImageVerdict, SafetyReport

log = logging.getLogger(__name__)


def quiet_safety_checker_logs() -> None:
    """diffusers warns that flagged images "will be returned black"; we use only its flags, so that line would
    mislead the person reading the log. Idempotent."""
    logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)


def stage1_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA, where the CLIP checker is made to run; fp32 elsewhere (CPU fp16 is slow or unsupported)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class SafetyChecker:
    """Both stages' models and processors, loaded once and reused for every request."""

    def __init__(
        self,
        stage1_model: StableDiffusionSafetyChecker,
        stage1_processor: BaseImageProcessor,
        stage2_model: PreTrainedModel,
        stage2_processor: BaseImageProcessor,
        device: torch.device,
    ):
        self.stage1_model = stage1_model
        self.stage1_processor = stage1_processor
        self.stage2_model = stage2_model
        self.stage2_processor = stage2_processor
        self.device = device

    @classmethod
    def load(cls, stage1_dir: Path, stage2_dir: Path, device: str | torch.device) -> SafetyChecker:
        """Load from local folders in the layouts of CompVis/stable-diffusion-safety-checker and
        Falconsai/nsfw_image_detection (weights/manifest.py fetches them; weights/tiny/safety.py builds tiny ones)."""
        started = time.perf_counter()
        device = torch.device(device)
        for folder in (stage1_dir, stage2_dir):
            # from_pretrained would take a missing folder for a Hub repo id and try to download it
            if not Path(folder, "config.json").is_file():
                raise FileNotFoundError(f"no safety checker model in {folder} (config.json is missing)")
        place = {"device_map": str(device)}  # straight onto the device, not to the host first and copied after
        stage1 = StableDiffusionSafetyChecker.from_pretrained(stage1_dir, dtype=stage1_dtype(device), **place)
        stage2 = AutoModelForImageClassification.from_pretrained(stage2_dir, dtype=torch.float32, **place)
        checker = cls(
            stage1_model=stage1.eval(),
            stage1_processor=AutoImageProcessor.from_pretrained(stage1_dir),
            stage2_model=stage2.eval(),
            stage2_processor=AutoImageProcessor.from_pretrained(stage2_dir),
            device=device,
        )
        log.info("Loaded the safety checker (%s) in %.2fs", device, time.perf_counter() - started)
        return checker

    def check(self, images: Sequence[Image.Image], disabled: bool = False) -> SafetyReport:
        """Judge every image of a batch; log each dropped image's index and the time taken."""
        if disabled:
            log.info("Safety checker disabled (disable_safety_checker=true): skipping both stages.")
            return SafetyReport.unchecked(len(images))
        if not images:
            return SafetyReport(())
        started = time.perf_counter()
        flags, stage1_error = self._stage1_flags(images)
        verdicts = []
        for index, (image, flagged) in enumerate(zip(images, flags, strict=True)):
            verdict = ImageVerdict(index, stage1_flagged=flagged, stage1_error=stage1_error)
            if flagged:
                verdict = self._with_stage2(verdict, image)
            verdicts.append(verdict)
        report = SafetyReport(tuple(verdicts), seconds=time.perf_counter() - started)
        for verdict in report.verdicts:
            if not verdict.safe:
                log.warning("Safety checker dropped image %d: %s.", verdict.index, verdict.describe())
            elif verdict.stage1_flagged:
                log.info("Safety checker kept image %d: %s.", verdict.index, verdict.describe())
        if note := report.failure_note():
            log.warning(note)
        log.info("Safety check took %.2fs: %s", report.seconds, report.summary())
        return report

    def _stage1_flags(self, images: Sequence[Image.Image]) -> tuple[list[bool], str | None]:
        """Stage 1's flag per image. If stage 1 itself fails, every image is flagged, so stage 2 decides
        them all: a broken checker must not wave images through."""
        try:
            pixels = self.stage1_processor(images=list(images), return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, dtype=self.stage1_model.dtype)
            # The forward also blanks flagged entries of `images`; hand it throwaway rows, we only want the flags.
            placeholders = np.zeros((len(images), 1))
            with torch.inference_mode():
                _, has_nsfw_concepts = self.stage1_model(clip_input=pixels, images=placeholders)
            return [bool(flag) for flag in has_nsfw_concepts], None
        except Exception as error:  # any failure: fail closed, see above
            failure, out_of_memory = _summary(error), isinstance(error, torch.OutOfMemoryError)
        _free_cache_after(out_of_memory)
        log.warning("Safety checker stage 1 failed (%s); sending every image to stage 2.", failure)
        return [True] * len(images), failure

    def _with_stage2(self, verdict: ImageVerdict, image: Image.Image) -> ImageVerdict:
        """Classify one flagged image. One at a time, so a failure condemns only the image it happened on."""
        try:
            inputs = self.stage2_processor(images=image, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.stage2_model(**inputs).logits
            return replace(verdict, stage2_label=self.stage2_model.config.id2label[int(logits[0].argmax())])
        except Exception as error:  # any failure makes the image unsafe
            failure, out_of_memory = _summary(error), isinstance(error, torch.OutOfMemoryError)
        _free_cache_after(out_of_memory)
        return replace(verdict, stage2_error=failure)


def _summary(error: Exception) -> str:
    """"torch.OutOfMemoryError: CUDA out of memory. ...", "KeyError: 1": the type as the user can look it up."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {error}"


def _free_cache_after(out_of_memory: bool) -> None:
    """After an OOM, hand the memory the failed forward had cached back, so the next image, stage or request has
    room. Called once the except block has ended: until then its traceback keeps the forward's tensors alive.
    A no-op where CUDA never started."""
    if out_of_memory:
        torch.cuda.empty_cache()
