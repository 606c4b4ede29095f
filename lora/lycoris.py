"""LyCORIS LoKr and LoHa modules, and DoRA magnitudes of any module: from a file module's tensors to deltas.

The rules, checked against LyCORIS's own modules (lycoris/modules/lokr.py and loha.py, v3.3), ComfyUI's weight
adapters and diffusers' LoKr loader, which agree:
- LoKr: ΔW = kron(w1, w2) with w1 = lokr_w1 or lokr_w1_a·lokr_w1_b, and w2 = lokr_w2 or lokr_w2_a·lokr_w2_b.
  factor = alpha / rank, where rank is the inner dimension of the factorised factor (w2's when both are, as
  diffusers and ComfyUI read it; LyCORIS writes the same rank in both). When w1 and w2 are both whole matrices
  there is no rank and no scaling (factor 1) whatever alpha says: LyCORIS sets alpha = rank itself then.
- LoHa: ΔW = (hada_w1_a·hada_w1_b) ⊙ (hada_w2_a·hada_w2_b), factor = alpha / rank, rank = hada_w1_b's rows.
- No alpha, or alpha 0: factor 1 (LyCORIS reads a missing or zero alpha as alpha = rank).
- DoRA magnitude (`dora_scale`, PEFT's `lora_magnitude_vector`), on a LoRA, LoKr or LoHa module: (out,) or
  (out, 1) is one value per output row (PEFT; LyCORIS ≥ 3.2, `wd_on_output`); (1, in) is one per input column
  (LyCORIS 3.1 and older). How the fuser applies it: lora/deltas.py.
- A BFL fused layer (qkv, linear1) is split by rows as for LoRA: LoKr parts compute their rows of the kron,
  LoHa parts take their rows of w1_a and w2_a, and a per-row magnitude is split the same way. A per-column
  magnitude is shared by the parts, which name each other (`norm_group`): the fuser takes the column norms
  over the whole fused matrix, as the trainer did.

Not supported, and refused with the reason: Tucker factors (lokr_t2, hada_t1/t2), which LyCORIS writes only for
convolutions.
"""

from __future__ import annotations

from torch import Tensor

from lora.deltas import HadamardDelta, KronDelta, alpha_factor, take_rows
from lora.layouts import ALPHA, DOWN, LOHA_ROLES, LOKR_ROLES, MAGNITUDE, UP, Target

LORA, LOKR, LOHA = "LoRA", "LoKr", "LoHa"


class Unsupported(Exception):
    """A module in a format we know but cannot apply; the message says which and why."""


def algorithm(roles: set[str]) -> str | None:
    """Which algorithm a file module's roles belong to (None: no weight tensors, e.g. a lone alpha)."""
    kinds = {LORA for role in roles if role in (DOWN, UP)}
    kinds |= {LOKR for role in roles if role in LOKR_ROLES} | {LOHA for role in roles if role in LOHA_ROLES}
    if len(kinds) > 1:
        raise Unsupported(f"mixes {' and '.join(sorted(kinds))} tensors in one module")
    return kinds.pop() if kinds else None


def _size(tensor: Tensor) -> str:
    return "×".join(map(str, tensor.shape))


def _factor(tensors: dict[str, Tensor], rank: int | None) -> float:
    return alpha_factor(float(tensors[ALPHA].item()) if ALPHA in tensors else None, rank)


def _factor_pair(tensors: dict[str, Tensor], keys: dict[str, str], name: str) -> tuple[Tensor, ...]:
    """(lokr_wN,) or (lokr_wN_a, lokr_wN_b), checked to be matrices that multiply."""
    whole, a, b = f"lokr_{name}", f"lokr_{name}_a", f"lokr_{name}_b"
    if whole in tensors and a not in tensors and b not in tensors:
        factors = (tensors[whole],)
    elif a in tensors and b in tensors and whole not in tensors:
        factors = (tensors[a], tensors[b])
    else:
        present = [keys[role] for role in (whole, a, b) if role in keys]
        raise ValueError(f"LoKr needs {whole} or {a} with {b}, the file has {present}")
    if any(factor.ndim != 2 for factor in factors):
        raise ValueError(f"{keys[a if len(factors) == 2 else whole]!r} is {_size(factors[0])}, LoKr needs matrices")
    if len(factors) == 2 and factors[0].shape[1] != factors[1].shape[0]:
        raise ValueError(f"{keys[a]!r} ({_size(factors[0])}) and {keys[b]!r} ({_size(factors[1])}) do not multiply")
    return factors


def _lokr(tensors: dict[str, Tensor], keys: dict[str, str], target: Target) -> tuple[KronDelta, ...]:
    if "lokr_t2" in tensors:
        raise Unsupported(f"{keys['lokr_t2']!r} is a LoKr Tucker factor (convolutions only)")
    w1, w2 = _factor_pair(tensors, keys, "w1"), _factor_pair(tensors, keys, "w2")
    rank = w2[1].shape[0] if len(w2) == 2 else w1[1].shape[0] if len(w1) == 2 else None
    whole = KronDelta(w1, w2, _factor(tensors, rank))
    if whole.shape != (target.out_rows, target.in_features):
        w1_key, w2_key = (keys.get(f"lokr_{name}", keys.get(f"lokr_{name}_a")) for name in ("w1", "w2"))
        raise ValueError(
            f"LoKr {w1_key!r} ⊗ {w2_key!r} is {whole.shape[0]}×{whole.shape[1]}, "
            f"this model needs {target.out_rows}×{target.in_features}"
        )
    return tuple(KronDelta(w1, w2, whole.factor, piece.rows) for piece in target.pieces)


def _loha(tensors: dict[str, Tensor], keys: dict[str, str], target: Target) -> tuple[HadamardDelta, ...]:
    for role in ("hada_t1", "hada_t2"):
        if role in tensors:
            raise Unsupported(f"{keys[role]!r} is a LoHa Tucker factor (convolutions only)")
    missing = [role for role in LOHA_ROLES[:4] if role not in tensors]
    if missing:
        raise ValueError(f"LoHa module {keys[next(iter(keys))]!r} lacks {', '.join(missing)}")
    w1a, w1b, w2a, w2b = (tensors[role] for role in LOHA_ROLES[:4])
    out, inner = target.out_rows, target.in_features
    for a, b, a_role, b_role in ((w1a, w1b, "hada_w1_a", "hada_w1_b"), (w2a, w2b, "hada_w2_a", "hada_w2_b")):
        rank = a.shape[1] if a.ndim == 2 else None
        for tensor, role, shape in ((a, a_role, (out, rank)), (b, b_role, (rank, inner))):
            if tuple(tensor.shape) != shape:
                want = "×".join("rank" if size is None else str(size) for size in shape)
                raise ValueError(f"{keys[role]!r} is {_size(tensor)}, this model needs {want}")
    factor = _factor(tensors, w1b.shape[0])
    return tuple(
        HadamardDelta(take_rows(w1a, piece.rows), w1b, take_rows(w2a, piece.rows), w2b, factor)
        for piece in target.pieces
    )


def lycoris_deltas(kind: str, tensors: dict[str, Tensor], keys: dict[str, str], target: Target) -> tuple:
    """One delta per part of `target` for a LoKr or LoHa module (without magnitude).

    Raises ValueError (the file does not fit this model) or Unsupported."""
    return _lokr(tensors, keys, target) if kind == LOKR else _loha(tensors, keys, target)


def magnitudes(
    tensors: dict[str, Tensor], keys: dict[str, str], target: Target,
) -> tuple[tuple[Tensor | None, tuple[str, ...]], ...]:
    """(DoRA magnitude, norm group) for each part of `target`: the magnitude shaped (rows, 1) or (1, in), or
    None when there is none; the group as in lora/deltas.py. Raises ValueError when the size is wrong."""
    if MAGNITUDE not in tensors:
        return ((None, ()),) * len(target.pieces)
    magnitude, key = tensors[MAGNITUDE], keys[MAGNITUDE]
    out, inner = target.out_rows, target.in_features
    if tuple(magnitude.shape) in ((out,), (out, 1)):
        per_row = magnitude.reshape(out, 1)
        return tuple((take_rows(per_row, piece.rows), ()) for piece in target.pieces)
    if tuple(magnitude.shape) == (1, inner):
        group = tuple(piece.path for piece in target.pieces) if len(target.pieces) > 1 else ()
        return ((magnitude, group),) * len(target.pieces)
    raise ValueError(f"{key!r} is {_size(magnitude)}, this model needs {out} or {out}×1 or 1×{inner}")
