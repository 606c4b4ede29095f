"""A prediction request: the user's inputs validated into one immutable object. No torch here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from errors import UserError
from flux.images import prepare_image, prepare_mask
from flux.seeds import batch_seeds, resolve_seed
from flux.sizes import ASPECT_RATIOS, MEGAPIXELS, output_size
from flux.variants import MODELS
from lora.sources import parse_source

log = logging.getLogger(__name__)

MAX_SEED = 2**63  # torch generators take 64-bit seeds; seed + i must stay in range
OUTPUT_FORMATS = ["webp", "jpg", "png"]
# Inclusive bounds of the trained-LoRA pages (Predictor, FastPredictor). predict.py repeats them as literals for cog's
# static schema reader; tests/test_schema.py checks every variant's bounds and defaults against this module.
LIMITS: dict[str, tuple[float, float]] = {
    "prompt_strength": (0, 1),
    "num_outputs": (1, 4),
    "num_inference_steps": (1, 50),
    "guidance_scale": (0, 10),
    "output_quality": (0, 100),
    "lora_scale": (-1, 3),
    "extra_lora_scale": (-1, 3),
    "extra_lora_scales": (-1, 3),  # MultiLoraPredictor: each entry
}
MAX_EXTRA_LORAS = 8  # MultiLoraPredictor's extra_loras: LoRAs one request may add besides the main one
# The older flux-fine-tuner page (LegacyPredictor) allows lora_scale up to 2 only; in-process calls keep to it too.
LEGACY_LIMITS: dict[str, tuple[float, float]] = {**LIMITS, "lora_scale": (-1, 2)}


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: where it comes from, how strongly, which input named it (for errors), and who chose it:
    a request's LoRA may come only from where requests may read; the deployment's own (cog's setup weights or
    FLUX_DEFAULT_LORA) is the operator's choice and may be any local file."""

    source: str
    scale: float
    input_name: str
    chosen_by_operator: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    model: str
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    output_quality: int
    disable_safety_checker: bool
    go_fast: bool
    prompt_strength: float = 0.8
    image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)
    loras: tuple[LoraSpec, ...] = ()
    main_lora_scale: float = 1.0  # also applies to a main LoRA configured at deploy time
    custom_size: bool = False  # aspect_ratio=custom: go_fast falls back to bf16 for it, as the hosted model does

    @property
    def mode(self) -> str:
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def seeds(self) -> list[int]:
        return batch_seeds(self.seed, self.num_outputs)


def build_request(
    *,
    prompt: str,
    image: str | Path | None = None,
    mask: str | Path | None = None,
    aspect_ratio: str = "1:1",
    width: int | None = None,
    height: int | None = None,
    megapixels: str = "1",
    prompt_strength: float = 0.8,
    model: str = "dev",
    num_outputs: int = 1,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int | None = None,
    output_format: str = "webp",
    output_quality: int = 80,
    disable_safety_checker: bool = False,
    go_fast: bool = False,
    replicate_weights: str | None = None,
    lora_scale: float = 1.0,
    extra_lora: str | None = None,
    extra_lora_scale: float = 1.0,
    extra_loras: Sequence[str] | None = None,
    extra_lora_scales: Sequence[float] | None = None,
    limits: Mapping[str, tuple[float, float]] = LIMITS,
) -> GenerationRequest:
    """Validate raw inputs (as cog passes them: no type coercion) and decode the images.

    `limits` are the bounds of the schema variant that was called (LIMITS or LEGACY_LIMITS). The cheap checks
    come first, so a bad number is reported without decoding an image. Every step raises UserError only.
    """
    _check_prompt(prompt)
    _check_choice("model", model, MODELS)
    _check_choice("output_format", output_format, OUTPUT_FORMATS)
    _check_choice("aspect_ratio", aspect_ratio, ASPECT_RATIOS)
    _check_choice("megapixels", str(megapixels), MEGAPIXELS)
    strength = _number("prompt_strength", prompt_strength, limits)
    outputs = _integer("num_outputs", num_outputs, limits)
    steps = _integer("num_inference_steps", num_inference_steps, limits)
    guidance = _number("guidance_scale", guidance_scale, limits)
    quality = _integer("output_quality", output_quality, limits)
    main_lora_scale = _number("lora_scale", lora_scale, limits)
    listed = _listed_loras(extra_loras, extra_lora_scales, limits)
    loras = _lora_specs(
        ("replicate_weights", replicate_weights, main_lora_scale),
        ("extra_lora", extra_lora, _number("extra_lora_scale", extra_lora_scale, limits)),
        *listed,
    )
    if listed:
        _check_distinct(loras)
    checked_seed = _seed(seed)
    picture, mask_image = _images(image, mask)
    width, height = _resolve_size(picture, aspect_ratio, str(megapixels), width, height)
    return GenerationRequest(
        prompt=prompt,
        model=model,
        width=width,
        height=height,
        num_outputs=outputs,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=resolve_seed(checked_seed),
        output_format=output_format,
        output_quality=quality,
        disable_safety_checker=bool(disable_safety_checker),
        go_fast=bool(go_fast),
        prompt_strength=strength,
        image=picture,
        mask=mask_image,
        loras=loras,
        main_lora_scale=main_lora_scale,
        custom_size=aspect_ratio == "custom",
    )


def _check_prompt(prompt: object) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("prompt: is empty; describe the image you want (for a trained LoRA, include its trigger word).")


def _lora_specs(*inputs: tuple[str, object, float]) -> tuple[LoraSpec, ...]:
    """(input name, source, scale) of each LoRA input, in order; a missing or blank source names no LoRA."""
    return tuple(
        LoraSpec(str(source).strip(), scale, input_name)
        for input_name, source, scale in inputs
        if source is not None and str(source).strip()
    )


def _listed_loras(sources: object, scales: object, limits: Mapping[str, tuple[float, float]]) -> list[tuple[str, str, float]]:
    """(input name, source, scale) of each entry of extra_loras, named by its index. Rules: at most
    MAX_EXTRA_LORAS; no scales means 1 for every LoRA, otherwise exactly one scale per LoRA (a partial list would
    put scales on the wrong LoRAs); an entry must name a LoRA (an empty one is a mistake, not "no LoRA")."""
    sources, scales = _list_input("extra_loras", sources), _list_input("extra_lora_scales", scales)
    if len(sources) > MAX_EXTRA_LORAS:
        raise UserError(f"extra_loras: {len(sources)} LoRAs given; one request takes at most {MAX_EXTRA_LORAS}.")
    if scales and len(scales) != len(sources):
        raise UserError(
            f"extra_lora_scales: {len(scales)} scale(s) for {len(sources)} LoRA(s) in extra_loras; give one scale "
            "per LoRA, in the same order, or none to apply every LoRA at 1."
        )
    listed = []
    for index, source in enumerate(sources):
        name = f"extra_loras[{index}]"
        if not isinstance(source, str):
            raise UserError(f"{name}: expected a LoRA source (text), got {source!r}.")
        if not source.strip():
            raise UserError(f"{name}: is empty; remove the entry (and its scale) or name a LoRA.")
        scale = _number(f"extra_lora_scales[{index}]", scales[index], limits, "extra_lora_scales") if scales else 1.0
        listed.append((name, source, scale))
    return listed


def _list_input(name: str, value: object) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{name}: expected a list, got {value!r}.")
    return list(value)


def _check_distinct(loras: tuple[LoraSpec, ...]) -> None:
    """Each LoRA once, whatever its spelling: two scales of one LoRA would add up, past its scale's bounds."""
    first: dict[str, str] = {}
    for spec in loras:
        key = parse_source(spec.source, input_name=spec.input_name).cache_key
        if key in first:
            raise UserError(
                f"{spec.input_name}: is the same LoRA as {first[key]}; list each LoRA once, with one scale."
            )
        first[key] = spec.input_name


def _seed(seed: object) -> int | None:
    """The user's seed, checked (None stays None: resolve_seed picks a random one)."""
    if seed is None:
        return None
    checked = _integer("seed", seed)
    if checked >= MAX_SEED:
        raise UserError(f"seed: {checked} is too large; use a number below {MAX_SEED} (or leave it empty for a random one).")
    return checked


def _images(
    image: str | Path | None, mask: str | Path | None
) -> tuple[Image.Image | None, Image.Image | None]:
    """The decoded input image and its mask, resized to it (flux/images.py); a mask needs an image."""
    if mask is not None and image is None:
        raise UserError("mask: a mask needs an input image; also set image (white mask areas are repainted).")
    if image is None:
        return None, None
    picture = prepare_image(image)
    return picture, prepare_mask(mask, picture.size) if mask is not None else None


def _resolve_size(
    picture: Image.Image | None, aspect_ratio: str, megapixels: str, width: object, height: object
) -> tuple[int, int]:
    """The output size: the processed input image's, else the aspect ratio's (width/height with `custom` only)."""
    if picture is not None:
        log.info("Input image resized to %dx%d; aspect_ratio, width, height and megapixels are ignored.", *picture.size)
        return picture.size
    custom = aspect_ratio == "custom"
    if not custom and (width is not None or height is not None):
        log.info("width and height are only used with aspect_ratio=custom; ignoring them.")
    return output_size(
        aspect_ratio,
        megapixels,
        _integer("width", width) if custom and width is not None else None,  # bounds: flux/sizes.py
        _integer("height", height) if custom and height is not None else None,
    )


def _check_choice(name: str, value: object, choices: list[str]) -> None:
    if value not in choices:
        raise UserError(f"{name}: {value!r} is not one of {', '.join(choices)}.")


def _number(name: str, value: object, limits: Mapping[str, tuple[float, float]], bounds_of: str | None = None) -> float:
    """A number within `limits[bounds_of or name]` (bounds_of: a list input whose entries are named by index)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name}: expected a number, got {value!r}.")
    _check_range(name, value, limits, bounds_of)
    return float(value)


def _integer(name: str, value: object, limits: Mapping[str, tuple[float, float]] | None = None) -> int:
    """A whole number (2.0 is accepted as 2), within `limits[name]` when limits are given."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}: expected a whole number, got {value!r}.")
    if limits is not None:
        _check_range(name, value, limits)
    return value


def _check_range(name: str, value: float, limits: Mapping[str, tuple[float, float]], bounds_of: str | None = None) -> None:
    low, high = limits[bounds_of or name]
    if not low <= value <= high:
        raise UserError(f"{name}: {value} is out of range; use {low:g} to {high:g}.")
