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
from lora.download.cache import MB

MiB = 1 << 20
_READ_BYTES = 1 << 20

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


def check_safetensors(path: Path, *, input_name: str) -> int:
    """Checks a safetensors header and that the file holds all the bytes it declares (no truncation).
    Returns the number of tensors. A sniff, not a full load: the format layer parses the tensors."""
    size = path.stat().st_size
    with path.open("rb") as file:
        raw_length = file.read(8)
        if len(raw_length) < 8:
            raise UserError(f"{input_name}: the file is not a .safetensors file (too short)")
        (header_length,) = struct.unpack("<Q", raw_length)
        if not 2 <= header_length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise UserError(f"{input_name}: the file is not a .safetensors file (bad header length)")
        try:
            header = json.loads(file.read(header_length))
        except ValueError:
            raise UserError(f"{input_name}: the file is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{input_name}: the file is not a .safetensors file (bad header)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    data_end = 0
    for info in tensors.values():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UserError(f"{input_name}: the .safetensors header is malformed")
        data_end = max(data_end, offsets[1])
    if not tensors:
        raise UserError(f"{input_name}: the .safetensors file holds no tensors")
    if 8 + header_length + data_end != size:
        raise UserError(
            f"{input_name}: the .safetensors file is incomplete or damaged (its header declares "
            f"{8 + header_length + data_end} bytes, the file has {size}); try again"
        )
    return len(tensors)


def _unsafe_member_name(name: str) -> bool:
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
            for count, member in enumerate(_members(archive), start=1):
                if count > max_members:
                    raise UserError(f"{input_name}: the tar archive has more than {max_members} entries")
                if _unsafe_member_name(member.name):
                    raise UserError(f"{input_name}: the tar archive has an unsafe entry name {member.name!r}")
                if member.issym() or member.islnk():
                    raise UserError(f"{input_name}: the tar archive has a link ({member.name!r}); links are refused")
                if not (member.isfile() or member.isdir()):
                    raise UserError(
                        f"{input_name}: the tar archive has a special entry ({member.name!r}: device, fifo...)"
                    )
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


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    member = archive.next()
    while member is not None:
        yield member
        member = archive.next()
