"""Reading user images (input image and mask) safely: bounded size, clear errors, fitted to FLUX sizes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from errors import UserError
from flux.inputs import read_input_file
from flux.sizes import MIN_IMAGE_SIDE, fit_image_size

MAX_INPUT_PIXELS = 50_000_000  # a decompression-bomb guard; a 50 MP photo is already far beyond 1440x1440


def open_image(path: str | Path, input_name: str) -> Image.Image:
    """Decode an uploaded image, refusing non-images, tiny images and pixel bombs before decoding."""
    data = read_input_file(path, input_name)  # refuses paths a request may not name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixel_count(image.width, image.height, input_name)
            image.load()
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, for sizes far beyond ours, fires inside Image.open before we see the size
        raise _too_large(input_name, f"its declared size is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP") from None
    except UnidentifiedImageError:
        raise UserError(f"{input_name}: the file is not an image we can read; upload a PNG, JPEG or WebP.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{input_name}: the image could not be decoded ({exc}); upload a valid PNG, JPEG or WebP.") from None
    image = ImageOps.exif_transpose(image)  # phone photos carry their rotation in EXIF
    if min(image.size) < MIN_IMAGE_SIDE:
        raise UserError(
            f"{input_name}: {image.width}x{image.height} is too small; "
            f"each side must be at least {MIN_IMAGE_SIDE} pixels."
        )
    return image


def prepare_image(path: str | Path) -> Image.Image:
    """The input image as RGB, fitted inside 1440x1440 with sides that are multiples of 16 (LANCZOS)."""
    image = open_image(path, "image")
    image = _flatten_to_rgb(image)
    size = fit_image_size(*image.size)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def prepare_mask(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """The mask as 8-bit grey at the image's size (NEAREST keeps it hard-edged). White is repainted."""
    mask = open_image(path, "mask").convert("L")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


def _check_pixel_count(width: int, height: int, input_name: str) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise _too_large(input_name, f"{width}x{height} is {width * height / 1e6:.0f} MP")


def _too_large(input_name: str, size: str) -> UserError:
    return UserError(
        f"{input_name}: the image is too large: {size}; the limit is {MAX_INPUT_PIXELS // 1_000_000} MP. "
        "Downscale it and try again."
    )


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become white rather than whatever colour they happened to hold."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
