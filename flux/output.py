"""Encoding generated images to files named out-{i}.{ext}, each with its metadata record when there are records
(FLUX_WRITE_METADATA, flux/metadata.py): PNG in an iTXt chunk named `parameters`, WebP and JPEG in XMP."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from flux.metadata import JPEG_XMP_LIMIT, RECORD_KEY, record_json, xmp_packet

_PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def encoder_options(output_format: str, quality: int) -> dict:
    if output_format == "png":
        return {}  # lossless; quality does not apply
    if output_format == "webp":
        # method 0 is the fastest WebP effort level: about 2.5x faster than the default 4 for ~5% larger files
        return {"quality": quality, "method": 0}
    return {"quality": quality}


def metadata_options(output_format: str, record: dict) -> dict:
    """PIL save() arguments that write the record into a file of this format."""
    if output_format == "png":
        info = PngInfo()
        info.add_itxt(RECORD_KEY, record_json(record))  # iTXt: UTF-8 (tEXt is Latin-1 only)
        return {"pnginfo": info}
    packet = xmp_packet(record, max_bytes=JPEG_XMP_LIMIT if output_format == "jpg" else None)
    return {"xmp": packet} if packet else {}


def save_images(
    images: Sequence[tuple[int, Image.Image]], output_format: str, quality: int, out_dir: Path,
    records: Sequence[dict] | None = None,
) -> list[Path]:
    """Write (index, image) pairs; the index is the image's place in the batch, so dropped ones leave gaps.
    records[index], when given, is written into image index's file; without records the files hold pixels only."""
    options = encoder_options(output_format, quality)

    def save(item: tuple[int, Image.Image]) -> Path:
        index, image = item
        path = out_dir / f"out-{index}.{output_format}"
        metadata = metadata_options(output_format, records[index]) if records is not None else {}
        image.convert("RGB").save(path, _PIL_FORMATS[output_format], **options, **metadata)
        return path

    if len(images) == 1:
        return [save(images[0])]
    with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:  # PIL's encoders release the GIL
        return list(pool.map(save, images))
