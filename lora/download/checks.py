"""Checks on downloaded files before anything parses them: format sniffing, safetensors headers, and taking
the one .safetensors out of a tar without trusting its entries (no absolute or `..` names, no links or devices,
bounded member count and size).
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

from errors import UserError
from units import MB, MiB

_READ_BYTES = MiB

_MAX_SAFETENSORS_HEADER = 100 * MiB
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")  # names of pickled checkpoints


def sniff_format(path: Path) -> str:
    """'safetensors', 'tar', 'gzip', 'pickle', 'zip' (a torch.save archive) or 'unknown', from the first bytes."""
    with path.open("rb") as file:
        head = file.read(512)
    if len(head) >= 9:
        (header_length,) = struct.unpack("<Q", head[:8])
        if 2 <= header_length <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "pickle"
    return "unknown"


def accepted_format(path: Path, *, input_name: str, display: str) -> str:
    """'safetensors' or 'tar' (a tar that may hold one), from the file's first bytes; anything else is refused
    here, with a message that says what it is. The one content check of a fetched file's format."""
    kind = sniff_format(path)
    if kind in ("safetensors", "tar"):
        return kind
    if kind in ("pickle", "zip"):  # torch.save writes a zip; older versions and .ckpt files a bare pickle
        raise UserError(
            f"{input_name}: {display} is a PyTorch pickle checkpoint (.ckpt/.pt/.bin), which can run code when "
            "loaded; only .safetensors LoRAs are accepted. Convert it to .safetensors first."
        )
    if kind == "gzip":
        raise UserError(f"{input_name}: {display} is compressed; use a .safetensors file or a plain .tar holding one")
    raise UserError(f"{input_name}: {display} is not a .safetensors file (nor a .tar holding one)")


# bits per element of each dtype safetensors knows
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
    "F64": 64,
}  # fmt: skip


def check_safetensors(path: Path, *, input_name: str) -> int:
    """Checks a safetensors header as the safetensors library does when it opens a file (JSON, known dtypes,
    shapes that match their byte ranges, ranges that tile the data exactly, no missing bytes), without reading
    the tensors. Returns the number of tensors. A file that passes opens; the format layer reads its tensors."""
    size = path.stat().st_size
    with path.open("rb") as file:
        raw_length = file.read(8)
        if len(raw_length) < 8:
            raise UserError(f"{input_name}: the file is not a .safetensors file (too short)")
        (header_length,) = struct.unpack("<Q", raw_length)
        if not 2 <= header_length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise UserError(f"{input_name}: the file is not a .safetensors file (bad header length)")
        try:
            header = json.loads(file.read(header_length).decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            raise UserError(f"{input_name}: the file is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{input_name}: the file is not a .safetensors file (bad header)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise UserError(f"{input_name}: the .safetensors header is malformed (its metadata)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    if not tensors:
        raise UserError(f"{input_name}: the .safetensors file holds no tensors")
    ranges = sorted(_byte_range(name, info, input_name) for name, info in tensors.items())
    position = 0
    for start, end in ranges:
        if start != position:
            raise UserError(f"{input_name}: the .safetensors header is malformed (overlapping or gapped data)")
        position = end
    if 8 + header_length + position != size:
        raise UserError(
            f"{input_name}: the .safetensors file is incomplete or damaged (its header declares "
            f"{8 + header_length + position} bytes, the file has {size}); try again"
        )
    return len(tensors)


def _byte_range(name: str, info: object, input_name: str) -> tuple[int, int]:
    """A tensor's [start, end) in the data, checked against its dtype and shape."""
    malformed = UserError(f"{input_name}: the .safetensors header is malformed (tensor {name[:100]!r})")
    if not isinstance(info, dict):
        raise malformed
    offsets, shape, bits = info.get("data_offsets"), info.get("shape"), _DTYPE_BITS.get(info.get("dtype"))  # type: ignore[arg-type]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise malformed
    if bits is None or not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise malformed
    count = 1
    for dimension in shape:
        count *= dimension
    start, end = offsets
    if end < start or count * bits % 8 or count * bits // 8 != end - start:
        raise malformed
    return start, end


def unsafe_member_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or "\x00" in name or re.match(r"^[A-Za-z]:", name) is not None


def extract_single_safetensors(
    tar_path: Path, dest: Path, *, input_name: str, max_bytes: int, max_members: int = 10_000
) -> Path:
    """Copies the one .safetensors member of an uncompressed tar to `dest`, after checking every entry:
    no absolute or '..' paths, no links, devices or fifos, exactly one .safetensors. Nothing else is
    written to disk, so entry names never become paths."""
    try:
        archive = tarfile.open(tar_path, mode="r:")
    except tarfile.TarError:
        raise UserError(f"{input_name}: the archive is not a valid uncompressed .tar file") from None
    with archive:
        candidates: list[tarfile.TarInfo] = []
        refused_formats: list[str] = []
        try:
            for member in checked_members(archive, what=f"{input_name}: the tar archive", max_members=max_members):
                lower = member.name.lower()
                if member.isfile() and lower.endswith(".safetensors"):
                    candidates.append(member)
                elif member.isfile() and lower.endswith(PICKLE_SUFFIXES):
                    refused_formats.append(member.name)
        except tarfile.TarError:
            raise UserError(f"{input_name}: the tar archive is damaged or truncated") from None
        if not candidates:
            found = f" (found {', '.join(refused_formats[:5])}: pickle formats are refused)" if refused_formats else ""
            raise UserError(f"{input_name}: the tar archive holds no .safetensors file{found}")
        if len(candidates) > 1:
            names = ", ".join(member.name for member in candidates[:10])
            raise UserError(
                f"{input_name}: the tar archive holds {len(candidates)} .safetensors files ({names}); "
                "it must hold exactly one"
            )
        member = candidates[0]
        if member.size > max_bytes:
            raise UserError(f"{input_name}: {member.name} is larger than the {max_bytes / MB:.1f} MB limit")
        source = archive.extractfile(member)
        if source is None:
            raise UserError(f"{input_name}: cannot read {member.name!r} from the tar archive")
        copied = 0
        with source, dest.open("wb") as out:
            while block := source.read(_READ_BYTES):
                copied += len(block)
                out.write(block)
        if copied != member.size:
            raise UserError(f"{input_name}: the tar archive is truncated inside {member.name!r}")
    return dest


def checked_members(archive: tarfile.TarFile, *, what: str, max_members: int) -> Iterator[tarfile.TarInfo]:
    """The archive's entries, each checked before anyone uses it: the first bad one refuses the whole tar with
    `what` ("extra_lora: the tar archive") naming it. No absolute or '..' names, no links, devices, fifos or
    sparse files, at most max_members entries. The LoRA tars and the weights tars (weights/remote.py) share it."""
    member, count = archive.next(), 0
    while member is not None:
        count += 1
        if count > max_members:
            raise UserError(f"{what} has more than {max_members} entries")
        if unsafe_member_name(member.name):
            raise UserError(f"{what} has an unsafe entry name {member.name!r}")
        if member.issym() or member.islnk():
            raise UserError(f"{what} has a link ({member.name!r}); links are refused")
        if member.issparse() or not (member.isfile() or member.isdir()):
            raise UserError(f"{what} has a special entry ({member.name!r}: device, fifo, sparse...)")
        yield member
        member = archive.next()
