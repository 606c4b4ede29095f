"""Per-request LoRA state: fetch and convert the requested LoRAs, then fuse exactly those into the model.

Every request states its whole LoRA set, and the fuser makes the weights equal to the originals plus exactly
that set (nothing when it is empty), so nothing leaks between requests. The same set at the same scales as the
last request costs nothing. Converted LoRAs stay in a small in-memory LRU, so alternating LoRAs does not re-read
files. The main LoRA falls back to the deployment's default (see `default_main_lora`) when a request has none.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

import settings
from flux.fast.lora_fp8 import Fp8LoraFuser
from flux.fast.quantize import CheckpointWeights
from flux.lora_scales import configured_fused_scales
from flux.pipelines import FluxPipelines
from flux.request import GenerationRequest, LoraSpec
from flux.variants import Variant
from lora.apply import LoraFuser
from lora.fetch import fetch_lora
from lora.formats import LoraWeights, load_lora

log = logging.getLogger(__name__)

MAIN_INPUT = "replicate_weights"


def default_main_lora(setup_weights: str | None) -> str | None:
    """The deployment's main LoRA: cog's setup(weights) / COG_WEIGHTS wins over FLUX_DEFAULT_LORA."""
    for candidate in (setup_weights, settings.text("FLUX_DEFAULT_LORA")):
        if candidate and str(candidate).strip():
            return str(candidate).strip()
    return None


class LoraState:
    def __init__(self, pipelines: FluxPipelines, default_main: str | None = None, memory_slots: int | None = None):
        self._pipelines = pipelines
        self.default_main = default_main
        self._memory_slots = memory_slots or int(settings.number("FLUX_LORA_MEMORY_SLOTS"))
        self._converted: OrderedDict[tuple[str, str], LoraWeights] = OrderedDict()
        self._fusers: dict[Variant, LoraFuser] = {}
        self._fused_models: dict[Variant, torch.nn.Module] = {}  # the transformer each fuser was made for
        # On a GPU the originals are kept in host memory: a full-coverage FLUX LoRA touches ~24 GB of weights.
        backup = settings.text("FLUX_LORA_BACKUP_DEVICE") or ("cpu" if pipelines.device.type == "cuda" else None)
        self._backup_device = backup
        configured_fused_scales([1.0], fp8=True)  # a bad FLUX_LORA_SCALE_CURVE or multiplier fails setup, not a request

    def requested(self, request: GenerationRequest) -> list[LoraSpec]:
        specs = list(request.loras)
        if self.default_main and not any(spec.input_name == MAIN_INPUT for spec in specs):
            specs.insert(0, LoraSpec(self.default_main, request.main_lora_scale, MAIN_INPUT))
        return specs

    def prepare(self, request: GenerationRequest, variant: Variant | None = None, cancelled: Callable[[], bool] | None = None) -> None:
        """Make the variant's model (default: request.model in bf16) carry exactly the request's LoRAs, and
        every other variant none. Scales go through flux/lora_scales.py (go_fast multiplier, scale curve)."""
        variant = variant or Variant(request.model)
        specs = self.requested(request)
        if variant not in self._pipelines.resident and not self._pipelines.is_loaded(variant):
            # building it drops the other non-resident variant: let go of that one's fuser (and its references to
            # the old transformer) first, so the memory is really freed before the new one is built
            for other in [v for v in self._fusers if v not in self._pipelines.resident]:
                self._fusers.pop(other).reset()
                del self._fused_models[other]
        transformer = self._pipelines.transformer(variant)  # builds a variant that is not resident
        loaded = [self._load(spec, variant.model, transformer, cancelled) for spec in specs]  # all errors before any write
        scales = configured_fused_scales([spec.scale for spec in specs], fp8=variant.fp8)
        for other, fuser in list(self._fusers.items()):
            if other != variant:
                fuser.reset()  # the text encoder is shared by every variant
            if not self._pipelines.is_loaded(other) or self._pipelines.transformer(other) is not self._fused_models[other]:
                del self._fusers[other], self._fused_models[other]  # its transformer was dropped
        changed = self._fuser(variant, transformer).apply(list(zip(loaded, scales, strict=True)))
        for spec, weights, scale in zip(specs, loaded, scales, strict=True):
            state = "not applied" if scale == 0 else "fused" if changed else "already in place"
            fused_as = f" (fused at {scale:g})" if scale != spec.scale else ""
            log.info("%s: %d modules, scale %g%s, %s", spec.input_name, len(weights.deltas), spec.scale, fused_as, state)

    def preload_default(self) -> None:
        """Fetch and convert the deployment's main LoRA at setup, so the first request does not wait for it."""
        if self.default_main:
            variant = next(iter(self._pipelines.resident), Variant("dev"))
            self._load(LoraSpec(self.default_main, 1.0, MAIN_INPUT), variant.model, self._pipelines.transformer(variant))

    def _load(self, spec: LoraSpec, model: str, transformer: torch.nn.Module, cancelled: Callable[[], bool] | None = None) -> LoraWeights:
        # the deployment's default LoRA is the operator's choice, so it may be any local file (e.g. baked in)
        operator_given = spec.source == self.default_main
        path = fetch_lora(spec.source, input_name=spec.input_name, allow_any_local_path=operator_given, cancelled=cancelled)
        stat = path.stat()
        identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        key = (identity, model)  # a conversion fits every precision of the model: the module shapes are the same
        if key in self._converted:
            self._converted.move_to_end(key)
            return self._converted[key]
        weights = load_lora(
            path,
            input_name=spec.input_name,
            transformer=transformer,
            text_encoder=self._pipelines.text_encoder,
            identity=identity,
        )
        self._converted[key] = weights
        while len(self._converted) > self._memory_slots:
            self._converted.popitem(last=False)
        return weights

    def _fuser(self, variant: Variant, transformer: torch.nn.Module) -> LoraFuser:
        if variant not in self._fusers:
            components = {"transformer": transformer, "text_encoder": self._pipelines.text_encoder}
            if variant.fp8:
                checkpoint = CheckpointWeights(self._pipelines.checkpoint_dir(variant.model) / "transformer", self._pipelines.dtype)
                self._fusers[variant] = Fp8LoraFuser(
                    components,
                    read_source=lambda path: checkpoint.read(path.removeprefix("transformer.") + ".weight"),
                    config=self._pipelines.fp8_config,
                    backup_device=self._backup_device,
                )
            else:
                self._fusers[variant] = LoraFuser(components, backup_device=self._backup_device)
            self._fused_models[variant] = transformer
        return self._fusers[variant]
