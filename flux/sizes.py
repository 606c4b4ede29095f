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
MIN_IMAGE_SIDE = 64  # smaller inputs carry too little to work from; refused with a clear error
MULTIPLE = 16  # FLUX needs sides divisible by 16 (8x VAE, 2x2 latent packing)


def round_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    """Nearest multiple, halves rounded up (1000 -> 1008), never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


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
    return min(CUSTOM_MAX, round_to_multiple(value))


def fit_image_size(width: int, height: int) -> tuple[int, int]:
    """Size an input image is resized to: inside 1440x1440 with its aspect ratio, sides multiples of 16."""
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height))
    return (
        min(MAX_IMAGE_SIDE, round_to_multiple(width * scale)),
        min(MAX_IMAGE_SIDE, round_to_multiple(height * scale)),
    )
