"""What one LoRA changes in one Linear, computed in float32: the kinds of delta, and DoRA's rescaling.

Every delta has the same interface (`WeightDelta`), which lora/apply.py and any fuser subclass (fp8) use:
- `shape`: (out_features, in_features) of the Linear it changes;
- `factor`: alpha/rank (1 when the format has no scaling), applied by the fuser with the user's scale;
- `weight_delta(device)`: the unscaled float32 (out, in) change ΔW;
- `has_bias`, `bias_delta(device)`: the unscaled float32 change of the bias, or None;
- `magnitude`: None, or DoRA's magnitude m shaped to broadcast against W: (out, 1), one per output row (PEFT's
  `lora_magnitude_vector`, LyCORIS ≥ 3.2's `dora_scale`), or (1, in), one per input column (LyCORIS < 3.2);
- `norm_group`: for a per-column magnitude on a BFL fused layer (qkv, linear1), the paths of the Linears whose
  stacked rows form that layer: its column norms run over all of them. Empty otherwise.

Kinds: `LoraDelta` ΔW = B·A (LoRA, LoCon); `KronDelta` ΔW = kron(w1, w2) (LyCORIS LoKr); `HadamardDelta`
ΔW = (w1a·w1b) ⊙ (w2a·w2b) (LyCORIS LoHa).

DoRA at scale s, with W the original weight and D = factor·ΔW (`dora_change` computes the bracket):

    W' = W + s · (m ⊙ (W + D) / ‖W + D‖ − W)          (norm along m's axis)

At s = 1 this is DoRA's merged weight m·(W+D)/‖W+D‖ in PEFT, LyCORIS and ComfyUI alike; at s = 0 it is exactly W,
and it is linear in between, as ComfyUI applies a DoRA strength (PEFT puts s inside instead, m·(W+sD)/‖W+sD‖,
which does not give W back at s = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, overload

import torch
from torch import Tensor

Device = torch.device | str | None


class WeightDelta(Protocol):
    """The interface of every delta kind (see the module docstring)."""

    factor: float
    magnitude: Tensor | None
    norm_group: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def has_bias(self) -> bool: ...

    def weight_delta(self, device: Device = None) -> Tensor: ...

    def bias_delta(self, device: Device = None) -> Tensor | None: ...


def alpha_factor(alpha: float | None, rank: int | None) -> float:
    """alpha/rank; a missing or zero alpha (or no rank, as for a LoKr of two whole matrices) means factor 1:
    kohya defined alpha 0 as no scaling, and LyCORIS reads a missing or zero alpha as alpha = rank."""
    return alpha / rank if alpha and rank else 1.0


@overload
def take_rows(tensor: Tensor, rows: tuple[slice, ...] | None) -> Tensor: ...
@overload
def take_rows(tensor: None, rows: tuple[slice, ...] | None) -> None: ...
def take_rows(tensor: Tensor | None, rows: tuple[slice, ...] | None) -> Tensor | None:
    """The rows of one part of a BFL fused layer (qkv, linear1), stacked; all of them for `rows` None."""
    if tensor is None or rows is None:
        return tensor
    return torch.cat([tensor[row] for row in rows]).contiguous()


def _f32(tensor: Tensor, device: Device) -> Tensor:
    return tensor.to(device, torch.float32)


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """A low-rank change: weight += scale·factor·up@down, bias += scale·factor·bias_delta."""

    down: Tensor  # A: rank × in_features
    up: Tensor  # B: out_features × rank
    factor: float  # alpha / rank
    up_bias: Tensor | None = None  # bias of B (PEFT lora_bias / ai-toolkit), out_features
    down_bias: Tensor | None = None  # bias of A (some BFL LoRAs), rank
    magnitude: Tensor | None = None  # DoRA, see the module docstring
    norm_group: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.up_bias is not None or self.down_bias is not None

    def weight_delta(self, device: Device = None) -> Tensor:
        """up@down in float32 (unscaled)."""
        return _f32(self.up, device) @ _f32(self.down, device)

    def bias_delta(self, device: Device = None) -> Tensor | None:
        """What the LoRA adds to the bias (unscaled): B(b_A) + b_B."""
        if not self.has_bias:
            return None
        delta = torch.zeros(self.up.shape[0], dtype=torch.float32, device=device)
        if self.down_bias is not None:
            delta += _f32(self.up, device) @ _f32(self.down_bias, device)
        if self.up_bias is not None:
            delta += _f32(self.up_bias, device)
        return delta


def _product(factors: tuple[Tensor, ...], device: Device) -> Tensor:
    """A matrix stored whole (one tensor) or as two factors (a @ b), in float32."""
    matrix = _f32(factors[0], device)
    return matrix @ _f32(factors[1], device) if len(factors) == 2 else matrix


@dataclass(frozen=True, eq=False)
class KronDelta:
    """LoKr: ΔW = kron(w1, w2), or some of its rows when the Linear is one part of a fused layer (BFL qkv).

    A Kronecker product does not split into per-part factors, so each part computes the rows it needs: row r of
    kron(w1, w2) comes from row r // p of w1, where p is w2's row count, so only those rows of w1 are used.
    """

    w1: tuple[Tensor, ...]  # (lokr_w1,) or (lokr_w1_a, lokr_w1_b)
    w2: tuple[Tensor, ...]  # (lokr_w2,) or (lokr_w2_a, lokr_w2_b)
    factor: float
    rows: tuple[slice, ...] | None = None  # rows of the full kron(w1, w2), concatenated; None = all
    magnitude: Tensor | None = None
    norm_group: tuple[str, ...] = ()
    has_bias = False

    @property
    def shape(self) -> tuple[int, int]:
        out1, in1 = self.w1[0].shape[0], self.w1[-1].shape[1]
        out2, in2 = self.w2[0].shape[0], self.w2[-1].shape[1]
        rows = out1 * out2 if self.rows is None else sum(row.stop - row.start for row in self.rows)
        return rows, in1 * in2

    def weight_delta(self, device: Device = None) -> Tensor:
        w1, w2 = _product(self.w1, device), _product(self.w2, device)
        if self.rows is None:
            return torch.kron(w1, w2)
        p = w2.shape[0]
        parts = []
        for row in self.rows:
            first, last = row.start // p, -(-row.stop // p)  # the rows of w1 that these rows come from
            parts.append(torch.kron(w1[first:last], w2)[row.start - first * p:row.stop - first * p])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def bias_delta(self, device: Device = None) -> None:
        return None


@dataclass(frozen=True, eq=False)
class HadamardDelta:
    """LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); a part of a fused layer holds its rows of w1a and w2a."""

    w1a: Tensor  # out × rank
    w1b: Tensor  # rank × in
    w2a: Tensor  # out × rank
    w2b: Tensor  # rank × in
    factor: float
    magnitude: Tensor | None = None
    norm_group: tuple[str, ...] = ()
    has_bias = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]

    def weight_delta(self, device: Device = None) -> Tensor:
        first = _f32(self.w1a, device) @ _f32(self.w1b, device)
        return first.mul_(_f32(self.w2a, device) @ _f32(self.w2b, device))

    def bias_delta(self, device: Device = None) -> None:
        return None


def dora_change(original: Tensor, change: Tensor, magnitude: Tensor, norm: Tensor | None = None) -> Tensor:
    """m ⊙ (W + D) / ‖W + D‖ − W in float32, the norm per output row for an (out, 1) magnitude and per input
    column for a (1, in) one, unless given (a fused layer's column norms). `change` is D = factor·ΔW and is
    overwritten."""
    merged = change.add_(original)
    if norm is None:
        per_row = magnitude.shape[1] == 1 and magnitude.shape[0] == merged.shape[0]
        norm = merged.norm(dim=1 if per_row else 0, keepdim=True)
    # As LyCORIS does, a tiny epsilon keeps an all-zero row or column at zero instead of NaN.
    merged.mul_(_f32(magnitude, merged.device) / (norm + torch.finfo(torch.float32).eps))
    return merged.sub_(original)
