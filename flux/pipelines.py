"""Loading FLUX and handing out the pipeline for a variant (model, precision) and a mode.

Everything is loaded through a `ModelStore` (weights/store.py): a weights folder, or synthetic weights made on
the device. Text encoders, tokenizers and VAE are loaded once and shared by every variant; a variant adds only
its transformer (bf16, or go_fast's "fp8" variant built by flux/fast/quantize.py from the same bf16 tensors, in
the 8-bit kernel flux/fast/kernels.py picks for this GPU) and its model's scheduler. Each component goes
straight to the device it runs on. Each mode's pipeline (txt2img, img2img, inpaint) is built from those same
component objects, so no weights are copied, and none is cast: diffusers' from_pipe would cast every shared
component to float32 in place when given no dtype.

Every resident variant (FLUX_RESIDENT_VARIANTS, flux/variants.py) is built during setup, fp8 ones compiled and
warmed up on CUDA (flux/fast/compile.py), so a server that says READY has nothing left to build or compile and
no request ever waits behind a variant it does not use. A variant that is not resident is built when first
asked for and kept until another non-resident one is asked for, so at most one transformer beyond the resident
set is ever in memory; whoever holds state for a variant (the LoRA fusers) hears when it is dropped. An fp8 one
is compiled on the graphs setup compiled, when they fit it (compile_reusing_graphs): no compile, no warm-up.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping

import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxTransformer2DModel

import settings
from errors import UserError
from flux.fast.compile import block_shapes, compile_for_serving, compile_reusing_graphs
from flux.fast.kernels import GoFastKernel, go_fast_kernel
from flux.fast.quantize import build_fp8_transformer
from flux.offload import StreamedBlocks, stream_t5, to_arena, transformer_blocks
from flux.vae import configure_vae
from flux.variants import MODELS, PRECISIONS, Variant
from units import GiB
from weights.pinned import PinnedArena
from weights.store import ModelStore, TensorSource, flux_transformer

log = logging.getLogger(__name__)

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
        self, store: ModelStore, device: torch.device, dtype: torch.dtype, resident: tuple[Variant, ...], *,
        unavailable: frozenset[Variant] = frozenset(), t5_on_host: bool = False, vae_tiling: bool = False,
        warm: Variant | None = None, go_fast: GoFastKernel | None = None,
        streamed: Mapping[Variant, tuple[int, ...]] | None = None,
    ):
        """resident: the variants built now and kept (flux/variants.py resident_variants). From the GPU memory
        plan: unavailable variants (no room for them here), T5 waiting in host memory between requests, whether
        the VAE decodes large images in tiles (flux/vae.py), and the variant that waits in the slot from setup
        when none fits resident (built and compiled now, then dropped for the next one asked for). go_fast: the
        fp8 variant's kernel, default this device's (flux/fast/kernels.py; tests pass another GPU's to run it on CPU).
        streamed: the transformer blocks (indices in running order) each variant streams from pinned host memory
        at every step where the GPU has no room for all of them (flux/offload.py)."""
        started = time.perf_counter()
        self.store, self.device, self.dtype, self.resident = store, device, dtype, resident
        self.unavailable = unavailable
        self.go_fast = go_fast or go_fast_kernel(device, dtype)  # its config also re-quantises LoRAs on the fp8 variant
        self.streamed = dict(streamed or {})
        host = torch.device("cpu")
        self._shared = store.shared_components(device, dtype, t5_device=host if t5_on_host else None)
        if t5_on_host:  # its layers stream through the GPU for each encoding (flux/offload.py)
            stream_t5(self._shared["text_encoder_2"], device)
        configure_vae(self._shared["vae"], tiling=vae_tiling)
        self._schedulers = {model: store.scheduler(model) for model in MODELS}
        self._sources: dict[str, TensorSource] = {}
        self._transformers: dict[Variant, FluxTransformer2DModel] = {}
        self._pipes: dict[tuple[Variant, str], FluxPipeline] = {}
        self._on_demand: Variant | None = None  # the one non-resident variant in memory, if any
        self._drop_listeners: list[Callable[[Variant], None]] = []
        self._slot_listeners: list[Callable[[bool], None]] = []
        self._compiled_shapes: set[frozenset] = set()  # block shapes of the fp8 transformers setup compiled
        log.info("Loaded the FLUX text encoders and VAE (%s, %s) in %.2fs", device.type, dtype_name(dtype), time.perf_counter() - started)
        log.info("go_fast's kernel here: %s (%s)", self.go_fast.name, self.go_fast.why)
        for variant in resident:
            self._transformers[variant] = self._build(variant, compile=True)
        if warm is not None:
            self._transformers[warm], self._on_demand = self._build(warm, compile=True), warm

    def on_drop(self, listener: Callable[[Variant], None]) -> None:
        """listener(variant) is called just before a variant's transformer is dropped, while it still exists."""
        self._drop_listeners.append(listener)

    def on_slot(self, listener: Callable[[bool], None]) -> None:
        """listener(True) is called just before a variant is built into the slot (the room the memory plan keeps
        for one non-resident variant), listener(False) once the slot is empty again."""
        self._slot_listeners.append(listener)

    def originals(self, model: str) -> TensorSource:
        """The model's transformer tensors in the store (what fp8 is built from, and fp8 LoRAs are fused from)."""
        if model not in self._sources:
            self._sources[model] = self.store.transformer_tensors(model)
        return self._sources[model]

    def _build(self, variant: Variant, compile: bool = False) -> FluxTransformer2DModel:
        started = time.perf_counter()
        config, source = self.store.transformer_config(variant.model), self.originals(variant.model)
        blocks = config["num_layers"] + config["num_single_layers"]
        # the plan counts FLUX.1's 57 blocks; a synthetic test model with fewer streams those of its own it names
        streamed = tuple(i for i in self.streamed.get(variant, ()) if i < blocks)
        arena = PinnedArena(pin=self.device.type == "cuda") if streamed else None
        resting = _resting_names(config, streamed)

        def park(name: str, _module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
            """A streamed block's tensor goes to pinned host memory as it arrives: the block never sits on the GPU."""
            return to_arena(tensor, arena) if name.startswith(resting) else tensor

        if variant.fp8:
            transformer = build_fp8_transformer(config, source, self.device, self.dtype, self.go_fast.config,
                                                then=park if streamed else None)
        else:
            transformer = flux_transformer(config, source, self.device, self.dtype, transform=park if streamed else None)
        log.info("Loaded FLUX %s in %.2fs", variant, time.perf_counter() - started)
        if streamed:
            return self._stream(variant, transformer, streamed, arena)
        if variant.fp8 and compile:
            # go_fast = 8-bit matmuls + torch.compile (CUDA only, flux/fast/compile.py), warmed up at setup. bf16
            # runs eagerly.
            pipe = FluxPipeline(**self._shared, transformer=transformer, scheduler=self._schedulers[variant.model])
            pipe.set_progress_bar_config(disable=True)
            label, length = f"FLUX {variant}", MAX_SEQUENCE_LENGTH[variant.model]
            report = compile_for_serving(pipe, max_sequence_length=length, label=label, options=self.go_fast.inductor_options)
            if report.compiled:
                self._compiled_shapes.add(block_shapes(transformer))
            elif self.device.type == "cuda":
                log.warning("FLUX %s runs without torch.compile, so go_fast (%s) is slower than bf16 here: the "
                            "quantising and scaling around each matmul run as separate kernels.", variant, self.go_fast.name)
        elif variant.fp8:  # built for a request: compiled only if setup's graphs fit it, never warmed up here
            compiled = compile_reusing_graphs(transformer, self._compiled_shapes, label=f"FLUX {variant}",
                                              options=self.go_fast.inductor_options)
            if not compiled and self.device.type == "cuda":
                log.warning("FLUX %s runs without torch.compile (setup compiled no go_fast variant of these shapes; "
                            "FLUX_RESIDENT_VARIANTS with an fp8 variant compiles one), so go_fast (%s) may be slower "
                            "than bf16 here.", variant, self.go_fast.name)
        return transformer

    def _stream(self, variant: Variant, transformer, streamed: tuple[int, ...], arena: PinnedArena):
        """The transformer with these blocks streaming at every step. Not compiled: its blocks' hooks swap their
        tensors at every call, which Dynamo would trace into the graph."""
        blocks = transformer_blocks(transformer)
        streaming = StreamedBlocks(transformer, [blocks[i] for i in streamed], self.device, arena)
        log.info("FLUX %s: %d of its %d blocks (%s GiB) stream from pinned host memory at every step, the rest stay "
                 "on the %s (not compiled)", variant, len(streamed), len(blocks), f"{streaming.nbytes / GiB:.2f}",
                 self.device.type)
        return transformer

    def is_loaded(self, variant: Variant | str) -> bool:
        return _as_variant(variant) in self._transformers

    def any_transformer(self) -> tuple[Variant, FluxTransformer2DModel]:
        """A transformer of any variant, for work that needs only a model's module shapes (every precision of a
        model has the same): one in memory (resident first, then the slot's), never dropping one; with none in
        memory, the first servable variant is built."""
        candidates = [*self.resident, self._on_demand, *(Variant(m, p) for m in MODELS for p in PRECISIONS)]
        variant = next(v for v in candidates if v is not None and v not in self.unavailable)
        return variant, self.transformer(variant)

    def transformer(self, variant: Variant | str) -> FluxTransformer2DModel:
        """The variant's transformer, building it first if it is not in memory."""
        variant = _as_variant(variant)
        if variant in self.unavailable:
            raise UserError(_unavailable_message(variant))
        if variant not in self._transformers:
            if self._on_demand is not None:
                self._drop(self._on_demand)  # first, so two non-resident transformers never coexist
            log.info("FLUX %s is not resident (FLUX_RESIDENT_VARIANTS); building it now.", variant)
            for listener in self._slot_listeners:
                listener(True)
            try:
                self._transformers[variant] = self._build(variant)
            except BaseException:  # e.g. out of GPU memory: nothing was built into the slot, so it is empty again
                for listener in self._slot_listeners:
                    listener(False)
                raise
            self._on_demand = variant
        return self._transformers[variant]

    def _drop(self, variant: Variant) -> None:
        for listener in self._drop_listeners:
            listener(variant)
        del self._transformers[variant]
        for key in [key for key in self._pipes if key[0] == variant]:
            del self._pipes[key]
        self._on_demand = None
        gc.collect()
        for listener in self._slot_listeners:
            listener(False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("Dropped FLUX %s to make room for another variant.", variant)

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._shared["text_encoder"]

    @property
    def vae(self) -> torch.nn.Module:
        return self._shared["vae"]

    def get(self, variant: Variant | str, mode: str) -> FluxPipeline:
        variant = _as_variant(variant)
        transformer = self.transformer(variant)
        key = (variant, mode)
        if key not in self._pipes:
            # the mode's class straight from the shared components, never from_pipe (see the module docstring)
            self._pipes[key] = MODES[mode](**self._shared, transformer=transformer, scheduler=self._schedulers[variant.model])
            self._pipes[key].set_progress_bar_config(disable=True)  # we log steps ourselves, one line each
        return self._pipes[key]


def _resting_names(config: dict, streamed: tuple[int, ...]) -> tuple[str, ...]:
    """Tensor name prefixes of the blocks at these indices (running order: double blocks, then single ones)."""
    double = config["num_layers"]
    return tuple(f"transformer_blocks.{i}." if i < double else f"single_transformer_blocks.{i - double}." for i in streamed)


def _unavailable_message(variant: Variant) -> str:
    if variant.fp8:
        return f"go_fast: FLUX {variant} does not fit on this server's GPU (its memory plan has no room for it); run with go_fast=false."
    return (f"go_fast: FLUX {variant} does not fit on this server's GPU, and this request needs it (go_fast=false, or an "
            "image, a mask or aspect_ratio=custom, which run in bf16); use go_fast=true without those.")


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32": for log lines."""
    return str(dtype).removeprefix("torch.")
