"""Which transformer runs a request: a variant is a (model, precision) pair, e.g. dev-bf16 or schnell-fp8.

"bf16" is the model dtype FLUX ships in (fp32 on CPU, see flux.pipelines.pick_dtype); "fp8" is go_fast's
torchao build of it (flux/fast/quantize.py). Pure logic, no torch: the memory plan imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import settings

MODELS = ("dev", "schnell")
PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class Variant:
    model: str
    precision: str = "bf16"

    def __post_init__(self):
        if self.model not in MODELS or self.precision not in PRECISIONS:
            raise ValueError(f"no variant {self.model}-{self.precision}: models {MODELS}, precisions {PRECISIONS}")

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    def __str__(self) -> str:
        return f"{self.model}-{self.precision}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """'dev-fp8' -> Variant('dev', 'fp8'); a bare model name means its bf16 variant."""
        model, _, precision = text.strip().partition("-")
        return cls(model, precision or "bf16")


def default_resident(go_fast_default: bool) -> tuple[Variant, ...]:
    """What the deployed schema uses, most wanted first: go_fast off by default (Predictor) bf16 dev and schnell;
    go_fast on by default (FastPredictor) fp8 dev and schnell, then bf16 for the fallbacks (image, mask, custom
    size). On a GPU the memory plan keeps those that fit (flux/fast/memory.py); the rest are built on use."""
    bf16 = tuple(Variant(model) for model in MODELS)
    return tuple(Variant(model, "fp8") for model in MODELS) + bf16 if go_fast_default else bf16


def resident_variants(go_fast_default: bool = False) -> tuple[Variant, ...]:
    """FLUX_RESIDENT_VARIANTS when set, else `default_resident`: the variants built at setup and kept; others are
    built when first asked for."""
    if not settings.is_set("FLUX_RESIDENT_VARIANTS"):
        return default_resident(go_fast_default)
    raw = settings.text("FLUX_RESIDENT_VARIANTS")
    try:
        variants = tuple(dict.fromkeys(Variant.parse(part) for part in raw.split(",") if part.strip()))
    except ValueError as error:
        raise ValueError(f"FLUX_RESIDENT_VARIANTS={raw!r}: {error}") from None
    return variants


def go_fast_fallback(*, has_image: bool, has_mask: bool, custom_size: bool) -> str | None:
    """Why a go_fast request runs in bf16 instead (as the hosted model does), or None when fp8 may run."""
    if has_mask:
        return "inpainting (a mask was given)"
    if has_image:
        return "img2img (an image was given)"
    if custom_size:
        return "aspect_ratio=custom"
    return None


def variant_for(model: str, *, go_fast: bool, fallback_reason: str | None) -> Variant:
    return Variant(model, "fp8" if go_fast and fallback_reason is None else "bf16")
