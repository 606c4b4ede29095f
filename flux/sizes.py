"""Output sizes: the aspect-ratio table, custom sizes and input-image fitting. Pure logic, no torch."""

from __future__ import annotations

from errors import UserError

# Width x height at 1 megapixel, as on the Replicate model pages.
SIZES_1MP: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
ASPECT_RATIOS = [*SIZES_1MP, "custom"]
MEGAPIXELS = ["1", "0.25"]

CUSTOM_MIN, CUSTOM_MAX = 256, 1440
MAX_IMAGE_SIDE = 1440  # input images are fitted inside this square
MIN_IMAGE_SIDE = 64  # smaller inputs (or fitted sizes) carry too little to work from; refused with a clear error
MULTIPLE = 16  # FLUX needs sides divisible by 16 (8x VAE, 2x2 latent packing)


def round_up_to_multiple(value: int, multiple: int = MULTIPLE) -> int:
    """The next multiple at or above value (1010 -> 1024), as the hosted model rounds custom and fitted sizes."""
    return (value + multiple - 1) // multiple * multiple


def output_size(
    aspect_ratio: str, megapixels: str = "1", width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """(width, height) for a text-to-image request."""
    if aspect_ratio == "custom":
        if width is None or height is None:
            missing = " and ".join(n for n, v in (("width", width), ("height", height)) if v is None)
            raise UserError(f"aspect_ratio: 'custom' needs {missing}; set both width and height (256 to 1440).")
        return _custom_side("width", width), _custom_side("height", height)
    if aspect_ratio not in SIZES_1MP:
        raise UserError(f"aspect_ratio: {aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}.")
    if megapixels not in MEGAPIXELS:
        raise UserError(f"megapixels: {megapixels!r} is not one of {', '.join(MEGAPIXELS)}.")
    w, h = SIZES_1MP[aspect_ratio]
    if megapixels == "0.25":
        w, h = w // 2, h // 2
    return w, h


def _custom_side(name: str, value: int) -> int:
    if not CUSTOM_MIN <= value <= CUSTOM_MAX:
        raise UserError(f"{name}: {value} is out of range; use {CUSTOM_MIN} to {CUSTOM_MAX}.")
    return round_up_to_multiple(value)  # stays within 1440, itself a multiple of 16


def fit_image_size(width: int, height: int) -> tuple[int, int]:
    """Size an input image is resized to, as the hosted model does: scaled down (never up) to fit inside
    1440x1440 with its aspect ratio, each side truncated, then rounded up to a multiple of 16.

    Rounding up cannot pass 1440: a fitted side is at most 1440, which is a multiple of 16. Unlike the hosted
    model (4000x64 -> 1440x32), a side that would end under 64 px is refused: stretching it would distort the
    image and a 16 or 32 px side leaves FLUX too little to work from.
    """
    scale = min(1.0, MAX_IMAGE_SIDE / width, MAX_IMAGE_SIDE / height)
    fitted = round_up_to_multiple(int(width * scale)), round_up_to_multiple(int(height * scale))
    if min(fitted) < MIN_IMAGE_SIDE:
        raise UserError(
            f"image: {width}x{height} is too elongated; fitted inside {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} it would be "
            f"{fitted[0]}x{fitted[1]}, and each side must be at least {MIN_IMAGE_SIDE} pixels. "
            "Crop or pad it to a less extreme aspect ratio (at most about 29:1)."
        )
    return fitted
