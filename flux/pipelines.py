"""Loading FLUX once and handing out the pipeline for a (model, mode) pair.

dev and schnell differ only in transformer and scheduler; text encoders, tokenizers and VAE are loaded once from
the dev folder and shared. img2img and inpaint pipelines are views built with from_pipe, so no weights are copied.
The schnell transformer loads in a background thread once the rest of setup is done (model loading patches
torch globally, so two loads must never overlap); the first schnell request waits for it if needed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

import settings

log = logging.getLogger(__name__)
# loading bars and diffusers' advice to developers are noise in a prediction's logs
diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

# Loading a model patches torch globally for a moment (accelerate's empty-weights init), so two loads in one
# process must never overlap: every load in this project holds this lock.
MODEL_LOADING = threading.Lock()

MODES = {"txt2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}  # schnell was trained with 256 T5 tokens


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, as FLUX ships. On CPU fp32, which is faster there and exact; FLUX_DTYPE overrides."""
    choices = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    override = settings.text("FLUX_DTYPE").lower()
    if override and override not in choices:
        raise ValueError(f"FLUX_DTYPE={override!r} is not one of {', '.join(choices)}")
    if override:
        return choices[override]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class FluxPipelines:
    """Every pipeline the predictor may run, sharing one copy of each component."""

    def __init__(self, dev_dir: Path, schnell_dir: Path, device: torch.device, dtype: torch.dtype):
        started = time.perf_counter()
        self.device, self.dtype = device, dtype
        with MODEL_LOADING:
            dev = FluxPipeline.from_pretrained(dev_dir, dtype=dtype).to(device)
        dev.set_progress_bar_config(disable=True)  # we log steps ourselves, one line each
        self._txt2img = {"dev": dev}
        self._views: dict[tuple[str, str], FluxPipeline] = {}
        self._schnell_dir = schnell_dir
        self._schnell: Future[FluxPipeline] | None = None
        log.info("Loaded FLUX dev (%s, %s) in %.2fs", device.type, str(dtype).removeprefix("torch."), time.perf_counter() - started)

    def start_background_loads(self) -> None:
        """Call when no other model is being loaded any more (the end of setup)."""
        if self._schnell is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-schnell")
            self._schnell = pool.submit(self._load_schnell)
            pool.shutdown(wait=False)

    def _load_schnell(self) -> FluxPipeline:
        started = time.perf_counter()
        components = dict(self._txt2img["dev"].components)
        with MODEL_LOADING:
            components["transformer"] = FluxTransformer2DModel.from_pretrained(
                self._schnell_dir, subfolder="transformer", dtype=self.dtype
            ).to(self.device)
        components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(self._schnell_dir, subfolder="scheduler")
        schnell = FluxPipeline(**components)
        schnell.set_progress_bar_config(disable=True)
        log.info("Loaded FLUX schnell in %.2fs (in the background)", time.perf_counter() - started)
        return schnell

    def wait_for_background_loads(self) -> None:
        self._base("schnell")

    def _base(self, model: str) -> FluxPipeline:
        if model == "schnell" and model not in self._txt2img:
            self.start_background_loads()
            self._txt2img["schnell"] = self._schnell.result()  # re-raises a failed background load
        return self._txt2img[model]

    def transformer(self, model: str) -> FluxTransformer2DModel:
        return self._base(model).transformer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._txt2img["dev"].text_encoder

    def get(self, model: str, mode: str) -> FluxPipeline:
        base = self._base(model)
        if mode == "txt2img":
            return base
        key = (model, mode)
        if key not in self._views:
            self._views[key] = MODES[mode].from_pipe(base)
            self._views[key].set_progress_bar_config(disable=True)
        return self._views[key]
