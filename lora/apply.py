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

Originals are taken once per module and kept for the fuser's life, through requests without LoRAs and LoRAs that
touch other modules, so a switch never takes them again (on fp8 that would mean re-reading the checkpoint). Where
they live is the memory plan's choice (`originals_budget`): beside the weight up to that many bytes (a GPU switch
is then bound by GPU memory bandwidth), the rest in pinned host memory in the model dtype, copied to the GPU
without blocking and cast there (bound by PCIe, 2 bytes per weight). The plain LoRA terms of a module are fused
by one `addmm_` into the working copy, their factors stacked along the rank: B@A is never materialised beside
it, and each touched weight is read and written once however many LoRAs touch it.

Extension point for fp8 (flux/fast/lora_fp8.py): override `snapshot`, `restore`, `original_as_float32`,
`working_copy` and `write_fused`, which are the only places that read or write a weight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Container, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lora.deltas import LoraDelta, WeightDelta, dora_change
from lora.formats import LoraWeights
from weights.pinned import PinnedArena

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


class OriginalsBudget:
    """GPU bytes that kept originals may take, shared by the fusers: the memory plan's share for them, plus the
    room it keeps for a variant built on demand (the slot) while that room is empty. `shrink` takes the lent room
    back and says how many bytes of originals must leave the GPU first; `grow` lends it again."""

    def __init__(self, nbytes: int, lendable: int = 0):
        self.total, self.used, self.lendable, self.lent = nbytes + lendable, 0, lendable, True

    @property
    def left(self) -> int:
        return self.total - self.used

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes

    def shrink(self) -> int:
        """Take the lent room back (a variant is about to be built into it): bytes of originals to move to the host."""
        if self.lent:
            self.total, self.lent = self.total - self.lendable, False
        return max(0, self.used - self.total)

    def grow(self) -> None:
        """The slot is empty again: lend its room to the originals."""
        if not self.lent:
            self.total, self.lent = self.total + self.lendable, True


class LoraFuser:
    """Fuses LoRAs into named model components, e.g. {"transformer": ..., "text_encoder": ...}.

    `apply([(lora_weights, scale), ...])` makes the weights equal to the originals plus exactly these LoRAs;
    `reset()` restores the originals. After a failure inside `apply` (even KeyboardInterrupt) the originals
    are restored before the exception propagates, so the next request starts clean.
    """

    def __init__(self, components: Mapping[str, nn.Module], *, originals_budget: OriginalsBudget | None = None,
                 compute_device: torch.device | None = None):
        """originals_budget: GPU bytes the originals may take, shared by every fuser on that GPU (None: no limit);
        the rest go to pinned host memory. Weights on the CPU keep their originals beside them. compute_device:
        where fused values are computed for weights that rest on the host (a streamed model, flux/offload.py: the
        GPU, which fuses them as it would resident ones); None: each weight's own device."""
        self._components = dict(components)
        self._budget = originals_budget
        self._compute_device = compute_device
        self._backups: dict[str, Backup] = {}  # module path -> originals of every module ever changed (kept)
        self._changed: set[str] = set()  # the modules that now differ from their originals
        self._active: tuple[tuple[str, float], ...] = ()  # (identity, scale) of the fused LoRAs
        self._column_norms: dict[tuple[int, tuple[str, ...]], Tensor] = {}  # during apply: fused layers' DoRA norms
        self._host: PinnedArena | None = None  # originals moved to the host, in a few pinned slabs

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(identity, scale) of the LoRAs now fused into the weights, in order."""
        return self._active

    @property
    def changed_modules(self) -> frozenset[str]:
        return frozenset(self._changed)

    @property
    def kept_originals(self) -> dict[str, int]:
        """Bytes of kept originals by where they are ("cuda", "cpu"), for the memory plan's log."""
        kept: dict[str, int] = {}
        for backup in self._backups.values():
            for tensor in vars(backup).values():
                if isinstance(tensor, Tensor):
                    kept[tensor.device.type] = kept.get(tensor.device.type, 0) + tensor.nbytes
        return kept

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
            self._restore_all(keep=plan)
            # Every original is saved before any is changed: a DoRA norm may need a neighbour's original.
            for path in plan:
                if path not in self._backups:
                    self._backups[path] = self.snapshot(self._module(path))
            for path, terms in plan.items():
                self._changed.add(path)  # before the write, so a failure halfway restores it
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
        """Restore every changed module to its original weights, bit-exactly (the originals stay kept)."""
        self._active = ()
        self._restore_all()

    def release(self, outliving: Collection[str] | None = None) -> None:
        """Let go of the kept originals: the model is about to be dropped. Only the modules of the components in
        `outliving` (None: all of them) are restored first, e.g. ("text_encoder",), the CLIP encoder every variant
        shares: writing into a transformer that is dropped next is wasted (on fp8, a re-quantisation of every
        touched weight). The fuser then knows only those components."""
        outliving = self._components if outliving is None else outliving
        self._active = ()
        self._restore_all(keep={path for path in self._changed if path.partition(".")[0] not in outliving})
        if self._budget is not None:
            self._budget.give(sum(n for where, n in self.kept_originals.items() if where != "cpu"))
        self._backups.clear()
        self._changed.clear()
        self._host = None  # its slabs go with the last original
        self._components = {name: module for name, module in self._components.items() if name in outliving}

    def _restore_all(self, keep: Container[str] = frozenset()) -> None:
        """Restore every changed module except those in `keep` (which the caller is about to write, or drop)."""
        for path in [path for path in self._changed if path not in keep]:
            self.restore(self._module(path), self._backups[path])
            self._changed.discard(path)  # only once restored, so a failure can still restore it

    def demote(self, nbytes: int) -> int:
        """Move kept originals from the GPU to pinned host memory until `nbytes` are freed there (or none are
        left on it); returns the bytes freed. The weights themselves do not change."""
        freed = 0
        for path, backup in list(self._backups.items()):
            if freed >= nbytes:
                break
            on_device = [t for t in (backup.weight, backup.bias) if t is not None and t.device.type != "cpu"]
            if not on_device:
                continue
            self._backups[path] = replace(backup, **{
                field: self._host_copy(tensor) for field, tensor in vars(backup).items()
                if isinstance(tensor, Tensor) and tensor.device.type != "cpu"
            })
            moved = sum(t.nbytes for t in on_device)
            freed += moved
            if self._budget is not None:
                self._budget.give(moved)
        return freed

    def keep(self, tensor: Tensor, device: torch.device) -> Tensor:
        """An exact copy of `tensor` where the originals of weights on `device` live: on that device while the
        budget lasts (always, for the CPU), else in pinned host memory, which the GPU reads without staging."""
        tensor = tensor.detach()
        if device.type == "cpu" and self.compute_on(tensor).type == "cuda":  # a streamed weight's: pinned, for the GPU
            return self._host_copy(tensor)
        counted = device.type != "cpu" and self._budget is not None
        if counted and not self._budget.take(tensor.nbytes):
            return self._host_copy(tensor)
        try:
            return tensor.to(device, copy=True)
        except BaseException:
            if counted:  # taken before the copy: a copy that failed (out of memory) must not keep its bytes
                self._budget.give(tensor.nbytes)
            raise

    def keep_backup(self, weight: Tensor, bias: Tensor | None, device: torch.device) -> Backup:
        """Backup(keep(weight), keep(bias)), all or nothing: a bias that cannot be kept gives the weight's bytes back."""
        kept = self.keep(weight, device)
        try:
            return Backup(kept, None if bias is None else self.keep(bias, device))
        except BaseException:
            if self._budget is not None and kept.device.type != "cpu":  # on the device, so counted
                self._budget.give(kept.nbytes)
            raise

    def _host_copy(self, tensor: Tensor) -> Tensor:
        """An exact host copy, in the fuser's pinned slabs (weights/pinned.py: pinned one by one, each original
        would be rounded up to a power of two), which the GPU reads back without a staging copy."""
        if self._host is None:
            self._host = PinnedArena(pin="cuda" in (tensor.device.type, self.compute_on(tensor).type))
        return self._host.copy(tensor)

    @staticmethod
    def float32_on(tensor: Tensor, device: torch.device) -> Tensor:
        """A fresh float32 copy on `device`, cast there: 2 bytes per bf16 weight cross the host link, not 4
        (a blocking .to(device, float32) would cast on the host first), and the copy does not block."""
        moved = tensor.to(device, non_blocking=True)
        return moved.to(torch.float32, copy=moved is tensor)

    # --- the only places that read or write weights (override for quantized weights) -------------------

    def snapshot(self, module: nn.Linear) -> Backup:
        """An exact copy of the module's original parameters."""
        return self.keep_backup(module.weight, module.bias, module.weight.device)

    def restore(self, module: nn.Linear, backup: Backup) -> None:
        with torch.no_grad():
            module.weight.copy_(backup.weight)
            if backup.bias is not None:
                module.bias.copy_(backup.bias)

    def compute_on(self, weight: Tensor) -> torch.device:
        """Where the fused value of this weight is computed: compute_device for a weight resting on the host."""
        device = weight.device
        return self._compute_device if self._compute_device is not None and device.type == "cpu" else device

    def original_as_float32(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        """Fresh float32 copies of the originals, where the fused value is computed (callers add to them in place)."""
        device = self.compute_on(module.weight)
        weight = self.float32_on(backup.weight, device)
        bias = None if backup.bias is None else self.float32_on(backup.bias, device)
        return weight, bias

    def working_copy(self, module: nn.Linear, backup: Backup) -> tuple[Tensor, Tensor | None]:
        """Where `_fuse` accumulates: the module's own weight, reset to the original, when it is float32 beside
        its backup (a CPU model: one copy instead of two), else `original_as_float32`."""
        weight = module.weight
        if (type(weight) is not nn.Parameter or weight.dtype != torch.float32 or backup.weight.device != weight.device
                or self.compute_on(weight) != weight.device):
            return self.original_as_float32(module, backup)
        with torch.no_grad():
            weight.copy_(backup.weight)
        bias = None if backup.bias is None else self.float32_on(backup.bias, weight.device)
        return weight, bias

    def write_fused(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
        """Store float32 fused values into the module in its own dtype (round to nearest even)."""
        with torch.no_grad():
            if weight is not module.weight:  # rounded where it was computed: 2 bytes per weight cross a host link
                module.weight.copy_(weight.to(module.weight.dtype))
            if bias is not None:
                module.bias.copy_(bias.to(module.bias.dtype))

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

    @torch.no_grad()
    def _fuse(self, module: nn.Linear, backup: Backup, terms: list[_Term]) -> None:
        weight, bias = self.working_copy(module, backup)
        device = weight.device
        # DoRA merges against the original: keep a copy only when some term needs it.
        original = weight.clone() if any(term.delta.magnitude is not None for term in terms) else None
        low_rank = [term for term in terms if term.delta.magnitude is None and isinstance(term.delta, LoraDelta)]
        self._add_low_rank(weight, low_rank)
        for term in terms:
            if term.delta.magnitude is not None:
                change = term.delta.weight_delta(device)
                norm = self._column_norm(term, device) if term.delta.norm_group else None
                change = dora_change(original, change.mul_(term.delta.factor), term.delta.magnitude, norm)
                weight.add_(change.mul_(term.scale))
            elif term not in low_rank:  # a LyCORIS product (LoKr, LoHa)
                weight.add_(term.delta.weight_delta(device).mul_(term.scale * term.delta.factor))
            bias_delta = term.delta.bias_delta(device)
            if bias_delta is not None:
                bias.add_(bias_delta.mul_(term.scale * term.delta.factor))
        self.write_fused(module, weight, bias)  # the bias too: an earlier LoRA may have changed it

    @staticmethod
    def _add_low_rank(weight: Tensor, terms: list[_Term]) -> None:
        """W += Σ s·f·B@A as one GEMM into W, the terms' factors stacked along the rank: each touched weight is
        read and written once however many LoRAs touch it, and B@A never exists as an (out, in) tensor."""
        if not terms:
            return
        device = weight.device
        if len(terms) == 1:
            up, down = (factor.to(device, torch.float32) for factor in (terms[0].delta.up, terms[0].delta.down))
            weight.addmm_(up, down, alpha=terms[0].scale * terms[0].delta.factor)
            return
        ups = torch.cat([term.delta.up.to(device, torch.float32) for term in terms], dim=1)
        downs = torch.cat([term.delta.down.to(device, torch.float32) for term in terms], dim=0)
        row_scales = [term.scale * term.delta.factor for term in terms for _ in range(term.delta.down.shape[0])]
        downs.mul_(torch.tensor(row_scales, dtype=torch.float32, device=device)[:, None])  # s·f of each term's rows
        weight.addmm_(ups, downs)

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
