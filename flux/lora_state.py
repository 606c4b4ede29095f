"""Per-request LoRA state: resolve the requested LoRAs, convert them, and fuse exactly those into the model.

Every request states its whole LoRA set, and the fuser makes the weights equal to the originals plus exactly
that set (nothing when it is empty), so nothing leaks between requests. The same set at the same scales as the
last request costs nothing. A request's LoRA files are fetched in parallel (each through lora/fetch.py's
downloader and cache). Converted LoRAs stay in an in-memory LRU sized in bytes (FLUX_LORA_MEMORY_GB; a request
with 8 rank-128 LoRAs holds about 5 GB in float32), so alternating LoRAs does not re-read files; the LoRAs of the
request being prepared are never dropped, so one request may take more than the budget until the next needs the
room. Each variant's fuser keeps the originals it took, so a switch never takes them again. The main LoRA falls
back to the deployment's default (see `default_main_lora`) when a request has none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

import settings
from flux.fast.lora_fp8 import fuser_for
from flux.lora_scales import configured_fused_scales
from flux.pipelines import FluxPipelines
from flux.request import GenerationRequest, LoraSpec
from flux.variants import Variant
from lora.apply import LoraFuser, OriginalsBudget
from lora.download.errors import DownloadCancelled
from lora.fetch import fetch_lora
from lora.formats import LoraWeights, load_lora
from units import GiB

log = logging.getLogger(__name__)

MAIN_INPUT = "replicate_weights"


def default_main_lora(setup_weights: str | None) -> str | None:
    """The deployment's main LoRA: cog's setup(weights) / COG_WEIGHTS wins over FLUX_DEFAULT_LORA."""
    for candidate in (setup_weights, settings.text("FLUX_DEFAULT_LORA")):
        if candidate and str(candidate).strip():
            return str(candidate).strip()
    return None


class LoraState:
    def __init__(
        self, pipelines: FluxPipelines, default_main: str | None = None, *, memory_bytes: int | None = None,
        originals_budget: OriginalsBudget | None = None,
    ):
        """memory_bytes: host bytes of converted LoRAs to keep (default FLUX_LORA_MEMORY_GB); originals_budget:
        GPU bytes the fusers may keep originals in (the memory plan's); None: no limit."""
        self._pipelines = pipelines
        self.default_main = default_main
        self._memory_bytes = memory_bytes if memory_bytes is not None else int(settings.number("FLUX_LORA_MEMORY_GB") * GiB)
        # the count cap of earlier versions, kept for operators who set it; unset: bytes alone decide
        self._memory_slots = int(settings.number("FLUX_LORA_MEMORY_SLOTS")) if settings.is_set("FLUX_LORA_MEMORY_SLOTS") else None
        self._originals_budget = originals_budget
        self._converted: OrderedDict[tuple[str, str], LoraWeights] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}  # bytes of each entry of _converted
        self._fusers: dict[Variant, LoraFuser] = {}
        pipelines.on_drop(self._forget)
        pipelines.on_slot(self._slot_in_use)
        configured_fused_scales([1.0], fp8=True)  # a bad FLUX_LORA_SCALE_CURVE or multiplier fails setup, not a request

    def requested(self, request: GenerationRequest) -> list[LoraSpec]:
        """The request's LoRAs, the deployment's main LoRA first when the request names none."""
        specs = list(request.loras)
        if self.default_main and not any(spec.input_name == MAIN_INPUT for spec in specs):
            specs.insert(0, LoraSpec(self.default_main, request.main_lora_scale, MAIN_INPUT, chosen_by_operator=True))
        return specs

    def prepare(self, request: GenerationRequest, variant: Variant | None = None, cancelled: Callable[[], bool] | None = None) -> None:
        """Make the variant's model (default: request.model in bf16) carry exactly the request's LoRAs, and
        every other variant none. Scales go through flux/lora_scales.py (go_fast multiplier, scale curve)."""
        variant = variant or Variant(request.model)
        specs = self.requested(request)
        transformer = self._pipelines.transformer(variant)  # builds a variant that is not resident
        loaded = self._load(specs, variant.model, transformer, cancelled)  # all errors before any weight changes
        scales = configured_fused_scales([spec.scale for spec in specs], fp8=variant.fp8)
        for other, fuser in self._fusers.items():
            if other != variant:
                fuser.reset()  # the text encoder is shared by every variant
        changed = self._fuser(variant, transformer).apply(list(zip(loaded, scales, strict=True)))
        for spec, weights, scale in zip(specs, loaded, scales, strict=True):
            state = "not applied" if scale == 0 else "fused" if changed else "already in place"
            fused_as = f" (fused at {scale:g})" if scale != spec.scale else ""
            log.info("%s: %d modules, scale %g%s, %s", spec.input_name, len(weights.deltas), spec.scale, fused_as, state)

    def preload_default(self) -> None:
        """Fetch and convert the deployment's main LoRA at setup, so the first request does not wait for it.
        Converted against a transformer already in memory (a conversion fits every precision of its model), so
        the preload never drops one, e.g. the compiled warm fp8 variant, nor builds one the GPU has no room for."""
        if self.default_main:
            variant, transformer = self._pipelines.any_transformer()
            self._load([LoraSpec(self.default_main, 1.0, MAIN_INPUT, chosen_by_operator=True)], variant.model, transformer)

    def _load(self, specs: list[LoraSpec], model: str, transformer: torch.nn.Module,
              cancelled: Callable[[], bool] | None = None) -> list[LoraWeights]:
        """The converted LoRAs of one request, in order: files fetched in parallel, each converted once."""
        in_use: set[tuple[str, str]] = set()  # this request's entries: kept while it needs them
        return [
            self._convert(spec, path, model, transformer, in_use)
            for spec, path in zip(specs, fetch_all(specs, cancelled), strict=True)
        ]

    def _convert(self, spec: LoraSpec, path: Path, model: str, transformer: torch.nn.Module,
                 in_use: set[tuple[str, str]]) -> LoraWeights:
        stat = path.stat()
        identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        key = (identity, model)  # a conversion fits every precision of the model: the module shapes are the same
        in_use.add(key)
        if key in self._converted:
            self._converted.move_to_end(key)
            return self._converted[key]
        weights = load_lora(
            path, input_name=spec.input_name, transformer=transformer, text_encoder=self._pipelines.text_encoder,
            identity=identity,
        )
        self._converted[key], self._sizes[key] = weights, converted_bytes(weights)
        self._evict(keep=in_use)
        return weights

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        """Drop the least recently used conversions, except `keep`, until the budget (and the count cap) hold."""
        def over() -> bool:
            too_many = self._memory_slots is not None and len(self._converted) > self._memory_slots
            return too_many or sum(self._sizes.values()) > self._memory_bytes

        for key in [key for key in self._converted if key not in keep]:
            if not over():
                return
            del self._converted[key], self._sizes[key]

    def _fuser(self, variant: Variant, transformer: torch.nn.Module) -> LoraFuser:
        if variant not in self._fusers:
            self._fusers[variant] = fuser_for(
                transformer, self._pipelines.text_encoder, source=self._pipelines.originals(variant.model),
                dtype=self._pipelines.dtype, config=self._pipelines.go_fast.config, originals_budget=self._originals_budget,
                compute_device=self._pipelines.device,  # the GPU fuses streamed blocks' host copies too
            )
        return self._fusers[variant]

    def _forget(self, variant: Variant) -> None:
        """The pipelines drop this variant: take its LoRAs off the shared text encoder and free its originals (its
        transformer is left as it is: it goes next)."""
        fuser = self._fusers.pop(variant, None)
        if fuser is not None:
            fuser.release(outliving=("text_encoder",))

    def _slot_in_use(self, in_use: bool) -> None:
        """The slot's room is lent to GPU originals while no variant is built into it: take it back (moving the
        originals it holds to pinned host memory) before one is, and lend it again once it is empty."""
        budget = self._originals_budget
        if budget is None:
            return
        if not in_use:
            budget.grow()
            return
        excess, started = budget.shrink(), time.perf_counter()
        freed = 0
        for fuser in self._fusers.values():
            if freed >= excess:
                break
            freed += fuser.demote(excess - freed)
        if freed:
            log.info("Moved %.1f GB of LoRA originals to host memory for the slot in %.2fs", freed / 1e9, time.perf_counter() - started)


def fetch_all(specs: list[LoraSpec], cancelled: Callable[[], bool] | None = None) -> list[Path]:
    """Each LoRA's checked local file, fetched in parallel through lora/fetch.py (its downloader and cache). The
    first failure stops the other downloads; the error raised is that of the first input in request order that
    failed by itself (not one stopped because another failed)."""
    failed = threading.Event()

    def fetch(spec: LoraSpec) -> Path:
        try:
            return fetch_lora(spec.source, input_name=spec.input_name, allow_any_local_path=spec.chosen_by_operator,
                              cancelled=lambda: failed.is_set() or bool(cancelled and cancelled()))
        except BaseException:
            failed.set()
            raise

    if len(specs) <= 1:
        return [fetch(spec) for spec in specs]
    with ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="lora-fetch") as pool:
        futures = [pool.submit(fetch, spec) for spec in specs]
    errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        raise next((error for error in errors if not isinstance(error, DownloadCancelled)), errors[0])
    return [future.result() for future in futures]


def converted_bytes(weights: LoraWeights) -> int:
    """Host bytes a converted LoRA holds: its deltas' tensors, a storage that deltas share counted once."""
    storages: dict[int, int] = {}
    pending: list[object] = [value for delta in weights.deltas.values() for value in vars(delta).values()]
    while pending:
        value = pending.pop()
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, tuple):
            pending.extend(value)
    return sum(storages.values())
