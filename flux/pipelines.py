"""Loading FLUX and handing out the pipeline for a variant (model, precision) and a mode.

Text encoders, tokenizers and VAE are loaded once from the dev folder and shared by every variant; a variant
adds only its transformer (bf16 from_pretrained, or fp8 built by flux/fast/quantize.py) and its model's
scheduler. img2img and inpaint pipelines are views built with from_pipe, so no weights are copied.

Which variants live in memory is configurable (FLUX_RESIDENT_VARIANTS, flux/variants.py): the first resident
one loads during setup, the others in a background thread once setup is done (model loading patches torch
globally, so two loads must never overlap); a request for one still loading waits for it. A variant that is
not resident is built when first asked for and kept until another non-resident one is asked for, so at most
one transformer beyond the resident set is ever in memory. On CUDA, resident fp8 variants are compiled and
warmed up when built (flux/fast/compile.py); bf16 and non-resident variants run eagerly.
"""

from __future__ import annotations

import gc
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
from flux.fast.compile import compile_for_serving
from flux.fast.quantize import fp8_config, load_fp8_transformer
from flux.variants import Variant

log = logging.getLogger(__name__)
# loading bars and diffusers' advice to developers are noise in a prediction's logs
diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

# Loading a model patches torch globally for a moment (accelerate's empty-weights init), so two loads in one
# process must never overlap: every load in this project holds this lock.
MODEL_LOADING = threading.Lock()
# Every pipeline shares the scheduler of its model, the tokenizers and the text encoders, so pipeline calls take
# turns: a request's denoising and a background warm-up's steps (flux/fast/compile.py) hold this around each call.
PIPELINE_CALLS = threading.Lock()

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


def _as_variant(variant: Variant | str) -> Variant:
    return variant if isinstance(variant, Variant) else Variant.parse(variant)


class FluxPipelines:
    """Every pipeline the predictor may run, sharing one copy of each component.

    Methods taking a variant also accept a model name ("dev" = dev-bf16) or a name like "schnell-fp8"."""

    def __init__(
        self, dev_dir: Path, schnell_dir: Path, device: torch.device, dtype: torch.dtype,
        resident: tuple[Variant, ...],
    ):
        """resident: the variants built at setup and kept (flux/variants.py resident_variants)."""
        started = time.perf_counter()
        self.device, self.dtype = device, dtype
        self.fp8_config = fp8_config(device, dtype)  # also what LoRAs on fp8 are re-quantised with
        self.resident = resident
        self._dirs = {"dev": Path(dev_dir), "schnell": Path(schnell_dir)}
        with MODEL_LOADING:
            shared = FluxPipeline.from_pretrained(dev_dir, transformer=None, dtype=dtype).to(device)
        self._shared = {name: c for name, c in shared.components.items() if name not in ("transformer", "scheduler")}
        self._schedulers = {
            model: FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
            for model, folder in self._dirs.items()
        }
        self._transformers: dict[Variant, FluxTransformer2DModel] = {}
        self._pipes: dict[tuple[Variant, str], FluxPipeline] = {}
        self._on_demand: Variant | None = None  # the one non-resident variant in memory, if any
        self._pending: dict[Variant, Future] | None = None  # background loads, once started
        log.info("Loaded the FLUX text encoders and VAE (%s, %s) in %.2fs", device.type, dtype_name(dtype), time.perf_counter() - started)
        if self.resident:
            self._transformers[self.resident[0]] = self._load(self.resident[0])

    def checkpoint_dir(self, model: str) -> Path:
        """The model's diffusers folder (its transformer/ holds the bf16 weights fp8 LoRAs are fused from)."""
        return self._dirs[model]

    def start_background_loads(self) -> None:
        """Load the remaining resident variants, one after another. Call when no other model is being loaded
        any more (the end of setup)."""
        if self._pending is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-variants")
            self._pending = {
                variant: pool.submit(self._load_resident, variant)
                for variant in self.resident
                if variant not in self._transformers
            }
            pool.shutdown(wait=False)

    def _load_resident(self, variant: Variant) -> FluxTransformer2DModel:
        self._transformers[variant] = self._load(variant, background=True)
        return self._transformers[variant]

    def wait_for_background_loads(self) -> None:
        self.start_background_loads()
        for pending in self._pending.values():
            pending.result()  # re-raises a failed background load

    def _load(self, variant: Variant, background: bool = False) -> FluxTransformer2DModel:
        started = time.perf_counter()
        folder = self._dirs[variant.model]
        with MODEL_LOADING:
            if variant.fp8:
                transformer = load_fp8_transformer(folder, self.device, self.dtype, self.fp8_config)
            else:
                transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=self.dtype)
                transformer = transformer.to(self.device)
        where = " (in the background)" if background else ""
        log.info("Loaded FLUX %s in %.2fs%s", variant, time.perf_counter() - started, where)
        if variant.fp8 and variant in self.resident:
            # go_fast = fp8 + torch.compile (CUDA only, flux/fast/compile.py). Only resident variants: compiling
            # and warming up a variant built for one request would cost that request minutes. bf16 runs eagerly.
            pipe = FluxPipeline(**self._shared, transformer=transformer, scheduler=self._schedulers[variant.model])
            pipe.set_progress_bar_config(disable=True)
            compile_for_serving(
                pipe, max_sequence_length=MAX_SEQUENCE_LENGTH[variant.model], label=f"FLUX {variant}",
                exclusive=PIPELINE_CALLS,
            )
        return transformer

    def is_loaded(self, variant: Variant | str) -> bool:
        return _as_variant(variant) in self._transformers

    def transformer(self, variant: Variant | str) -> FluxTransformer2DModel:
        """The variant's transformer, loading it first if it is not in memory."""
        variant = _as_variant(variant)
        if variant in self._transformers:
            return self._transformers[variant]
        if variant in self.resident:
            self.start_background_loads()
            return self._pending[variant].result()  # waits for this one only; re-raises a failed load
        if self._on_demand is not None:
            self._drop(self._on_demand)
        log.info("FLUX %s is not resident (FLUX_RESIDENT_VARIANTS); building it now.", variant)
        self._transformers[variant] = self._load(variant)
        self._on_demand = variant
        return self._transformers[variant]

    def _drop(self, variant: Variant) -> None:
        del self._transformers[variant]
        for key in [key for key in self._pipes if key[0] == variant]:
            del self._pipes[key]
        self._on_demand = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("Dropped FLUX %s to make room for another variant.", variant)

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._shared["text_encoder"]

    def get(self, variant: Variant | str, mode: str) -> FluxPipeline:
        variant = _as_variant(variant)
        transformer = self.transformer(variant)
        key = (variant, mode)
        if key not in self._pipes:
            base = FluxPipeline(**self._shared, transformer=transformer, scheduler=self._schedulers[variant.model])
            self._pipes[key] = base if mode == "txt2img" else MODES[mode].from_pipe(base)
            self._pipes[key].set_progress_bar_config(disable=True)  # we log steps ourselves, one line each
        return self._pipes[key]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32": for log lines."""
    return str(dtype).removeprefix("torch.")
