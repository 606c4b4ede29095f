"""The one place where a request's LoRA scales become the scales fused into the weights.

- go_fast multiplier (FLUX_GO_FAST_LORA_MULTIPLIER, default 1): multiplies every LoRA scale on the fp8 path.
  The hosted model's pages say "For go_fast we apply a 1.5x multiplier": that compensated for its own
  quantiser losing LoRA strength. Ours re-quantises from the bf16 weights (flux/fast/lora_fp8.py) and keeps
  the strength (measured: docs/go-fast.md), so 1 is right here; operators may set 1.5 to match.
- scale curve (FLUX_LORA_SCALE_CURVE): `linear` (default) fuses scale·ΔW, as the description promises.
  `hosted` reproduces the hosted model for users who tuned scales there: with exactly one LoRA and go_fast
  off it applied the scale twice (adapter weight and joint_attention_kwargs), so the effect was scale²
  (0.5 acts as 0.25, -1 as +1); with two LoRAs, or on fp8, it was linear.
"""

from __future__ import annotations

import settings

CURVES = ("linear", "hosted")


def fused_scales(scales: list[float], *, fp8: bool, multiplier: float = 1.0, curve: str = "linear") -> list[float]:
    """The scales to fuse for a request's LoRAs (one entry per LoRA given, including scale-0 ones)."""
    if curve not in CURVES:
        raise ValueError(f"FLUX_LORA_SCALE_CURVE must be one of {', '.join(CURVES)}, got {curve!r}")
    if curve == "hosted" and not fp8 and len(scales) == 1:
        scales = [scale * scale for scale in scales]
    factor = multiplier if fp8 else 1.0
    return [scale * factor for scale in scales]


def configured_fused_scales(scales: list[float], *, fp8: bool) -> list[float]:
    """fused_scales with the operator's settings."""
    return fused_scales(
        scales,
        fp8=fp8,
        multiplier=settings.number("FLUX_GO_FAST_LORA_MULTIPLIER"),
        curve=settings.text("FLUX_LORA_SCALE_CURVE").lower(),
    )
