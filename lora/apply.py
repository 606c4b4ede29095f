"""Applying LoRAs by fusing them into the model's weights, with exact backups so they come off bit-exactly.

Why fuse rather than keep PEFT adapter layers: a fused LoRA costs nothing per denoising step, and restoring a
saved copy of the original weight is exact, whereas subtracting a delta again is not in bf16.

For every Linear touched by the requested LoRAs:

    W = cast(W_original.float() + Σ_i scale_i · (alpha_i / rank_i) · ΔW_i)

always computed from the saved original, so requests never accumulate rounding. ΔW is B @ A for a LoRA, or a
LyCORIS product (lora/deltas.py). A LoRA with a DoRA magnitude adds instead scale · (its DoRA-merged weight − W),
its merge computed against the original W as if it were alone: so two DoRA LoRAs on one module, or DoRA and
plain LoRAs, add up independently of their order, and each one at scale 1 alone gives exactly its own merge.
A term with scale 0 is left out, so scale 0 everywhere restores the originals bit-exactly.

Extension point for fp8 (torchao-quantized weights, not implemented here): override `snapshot`, `restore`,
`original_as_float32` and `write_fused`, which are the only places that read or write a weight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora.deltas import WeightDelta, dora_change
from lora.formats import LoraWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Backup:
    """The original parameters of one module, bit for bit."""

    weight: Tensor
    bias: Tensor | None


@dataclass(frozen=True, eq=False)
class _Term:
    delta: WeightDelta
    scale: float  # the user's scale
    lora: LoraWeights  # the whole LoRA, for the parts of a fused layer (norm_group)


class LoraFuser:
    """Fuses LoRAs into named model components, e.g. {"transformer": ..., "text_encoder": ...}.

    `apply([(lora_weights, scale), ...])` makes the weights equal to the originals plus exactly these LoRAs;
    `reset()` restores the originals. After a failure inside `apply` (even KeyboardInterrupt) the originals
    are restored before the exception propagates, so the next request starts clean.
    """

    def __init__(self, components: Mapping[str, nn.Module], *, backup_device: torch.device | str | None = None):
        """backup_device: where original weights are kept (None = next to the weight; "cpu" saves GPU memory)."""
        self._components = dict(components)
        self._backup_device = backup_device
        self._backups: dict[str, Backup] = {}  # module path -> originals of every module we have changed
        self._active: tuple[tuple[str, float], ...] = ()  # (identity, scale) of the fused LoRAs
        self._column_norms: dict[tuple[int, tuple[str, ...]], Tensor] = {}  # during apply: fused layers' DoRA norms

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(identity, scale) of the LoRAs now fused into the weights, in order."""
        return self._active

    @property
    def changed_modules(self) -> frozenset[str]:
        return frozenset(self._backups)

    def apply(self, loras: Sequence[tuple[LoraWeights | None, float]]) -> bool:
        """Fuse exactly these LoRAs at these scales (None entries and scale 0 are skipped).

        Returns False when exactly these were already fused, in which case nothing is written."""
        loras = [(weights, float(scale)) for weights, scale in loras if weights is not None and float(scale) != 0.0]
        if not all(math.isfinite(scale) for _, scale in loras):
            raise ValueError(f"LoRA scales must be finite numbers, got {[scale for _, scale in loras]}")
        wanted = tuple((weights.identity, scale) for weights, scale in loras)
        if wanted == self._active:
            return False
        started = time.perf_counter()
        try:
            plan = self._plan(loras)
            self._active = ()  # weights are in between states until the loop ends
            for path in [path for path in self._backups if path not in plan]:
                self.restore(self._module(path), self._backups[path])
                del self._backups[path]  # only once restored, so a failure can still restore it
            # Every original is saved before any is changed: a DoRA norm may need a neighbour's original.
            for path in plan:
                if path not in self._backups:
                    self._backups[path] = self.snapshot(self._module(path))
            for path, terms in plan.items():
                self._fuse(self._module(path), self._backups[path], terms)
        except BaseException:
            self.reset()
            raise
        finally:
            self._column_norms.clear()
        self._active = wanted
        if plan:
            log.info("LoRA: fused %d modules in %.2fs", len(plan), time.perf_counter() - started)
        return True

    def reset(self) -> None:
        """Restore every changed module to its original weights, bit-exactly."""
        self._active = ()
        while self._backups:
            path, backup = next(iter(self._backups.items()))
            self.restore(self._module(path), backup)
            del self._backups[path]

    # --- the only places that read or write weights (override for quantized weights) -------------------

    def snapshot(self, module: nn.Linear) -> Backup:
        """An exact copy of the module's original parameters."""
        device = self._backup_device
        copy = lambda tensor: tensor.detach().to(device, copy=True)  # noqa: E731
        return Backup(copy(module.weight), None if module.bias is None else copy(module.bias))

    def restore(self, module: nn.Linear, backup: Backup) -> None:
        with torch.no_grad():
            module.weight.copy_(backup.weight)
            if backup.bias is not None:
                module.bias.copy_(backup.bias)

    def original_as_float32(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        """Fresh float32 copies of the originals, on the module's device (callers add to them in place)."""
        device = module.weight.device
        weight = backup.weight.to(device, torch.float32, copy=True)
        bias = None if backup.bias is None else backup.bias.to(device, torch.float32, copy=True)
        return weight, bias

    def write_fused(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
        """Store float32 fused values into the module in its own dtype (round to nearest even)."""
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)

    # --- internals -------------------------------------------------------------------------------------

    def _module(self, path: str) -> nn.Module:
        component, _, name = path.partition(".")
        return self._components[component].get_submodule(name)

    def _plan(self, loras: Sequence[tuple[LoraWeights, float]]) -> dict[str, list[_Term]]:
        """Terms per module path, checked against the modules before anything is written."""
        plan: dict[str, list[_Term]] = {}
        for weights, scale in loras:
            for path, delta in weights.deltas.items():
                component = path.partition(".")[0]
                if component not in self._components:
                    raise ValueError(f"LoRA {weights.identity} changes {path}, but no {component!r} was given")
                module = self._module(path)
                # lora/formats.py checked every tensor of the file against the model and told the user which
                # key does not fit. This only guards against deltas converted for another model (a programming
                # error): a tuple comparison, needed because add_/copy_ would broadcast a wrong shape silently.
                if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(delta.shape):
                    raise ValueError(f"LoRA {weights.identity} does not fit {path} (needs a {delta.shape} Linear)")
                if delta.has_bias and module.bias is None:
                    raise ValueError(f"LoRA {weights.identity} changes the bias of {path}, which has none")
                plan.setdefault(path, []).append(_Term(delta, scale, weights))
        return plan

    def _fuse(self, module: nn.Linear, backup: Backup, terms: list[_Term]) -> None:
        weight, bias = self.original_as_float32(module, backup)
        device = weight.device
        # DoRA merges against the original: keep a copy only when some term needs it.
        original = weight.clone() if any(term.delta.magnitude is not None for term in terms) else None
        for term in terms:
            change = term.delta.weight_delta(device)
            if term.delta.magnitude is None:
                weight.add_(change.mul_(term.scale * term.delta.factor))
            else:
                norm = self._column_norm(term, device) if term.delta.norm_group else None
                change = dora_change(original, change.mul_(term.delta.factor), term.delta.magnitude, norm)
                weight.add_(change.mul_(term.scale))
            bias_delta = term.delta.bias_delta(device)
            if bias_delta is not None:
                bias.add_(bias_delta.mul_(term.scale * term.delta.factor))
        self.write_fused(module, weight, bias if any(t.delta.has_bias for t in terms) else None)

    def _column_norm(self, term: _Term, device: torch.device) -> Tensor:
        """‖W + D‖ per input column over all parts of a fused layer (computed once per LoRA and layer)."""
        key = (id(term.lora), term.delta.norm_group)
        if key not in self._column_norms:
            squares = torch.zeros(1, term.delta.shape[1], dtype=torch.float32, device=device)
            for path in term.delta.norm_group:
                module, delta = self._module(path), term.lora.deltas[path]
                merged, _ = self.original_as_float32(module, self._backups[path])
                merged.add_(delta.weight_delta(merged.device).mul_(delta.factor))
                squares.add_(merged.square().sum(dim=0, keepdim=True).to(device))
            self._column_norms[key] = squares.sqrt_()
        return self._column_norms[key]
