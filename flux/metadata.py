"""What an image file says about how it was made, when the operator sets FLUX_WRITE_METADATA: one JSON record
per image, and the XMP packet that carries it in WebP and JPEG (PNG carries it in a text chunk; the writing is
flux/output.py's). Pure: no torch, no PIL, no I/O.

The record holds what made the image and nothing of the server's. A LoRA source is written as the user gave it,
less its user info (`user:pass@`), query string (a signed URL's signature, a `?token=`) and fragment; a local
file as its file name alone (which LoRA it was, not where the server keeps it: a folder can name a user, a mount
or a customer); a data: URI as its SHA-256. Tokens never reach a record: they live in the environment, never in
a source.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from xml.sax.saxutils import escape

from errors import UserError
from flux.request import GenerationRequest, LoraSpec
from lora.sources import DataUriSource, LocalPathSource, UrlSource, parse_source
from version import NAME, VERSION

RECORD_KEY = "parameters"  # the PNG text chunk's keyword and the XMP property's name: `exiftool -Parameters` reads both
XMP_NAMESPACE = f"urn:{NAME}:generation:1/"
XMP_PREFIX = "flux"  # exiftool's group for the property: XMP-flux
JPEG_XMP_LIMIT = 65504  # bytes of XMP in JPEG's one APP1 marker (65533 less Pillow's 29-byte header)

# Up to the path: scheme://, the authority (user info and host), the path; the query and fragment are what is left.
_URL_HEAD = re.compile(r"^(?P<scheme>[^:/?#]+://)?(?P<authority>[^/?#]*)(?P<path>[^?#]*)")
# Characters XML cannot hold, and lone surrogates UTF-8 cannot encode; JSON escapes them as \uXXXX instead.
_NOT_IN_XML = re.compile(r"[\ud800-\udfff\ufffe\uffff]")


def image_records(
    request: GenerationRequest, loras: Sequence[LoraSpec], *, precision: str, fused_scales: Sequence[float]
) -> list[dict]:
    """One record per image of the batch, image i with its own seed (seed + i). `loras` are the LoRAs that ran
    (the deployment's main LoRA included), `fused_scales` theirs as fused; `precision` is what ran: fp8, int8, bf16
    or fp32. Keys are the input names where an input says the same, so a record reads as a request."""
    lora_entries = [_lora_entry(spec, fused) for spec, fused in zip(loras, fused_scales, strict=True)]
    records = []
    for seed in request.seeds:
        record = {
            "prompt": request.prompt,
            "seed": seed,
            "model": request.model,
            "mode": request.mode,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
        }
        if request.image is not None:
            record["prompt_strength"] = request.prompt_strength
        record |= {"go_fast": request.go_fast, "precision": precision, "loras": lora_entries, "software": NAME, "version": VERSION}
        records.append(record)
    return records


def _lora_entry(spec: LoraSpec, fused_scale: float) -> dict:
    entry = {"input": spec.input_name, "source": shareable_source(spec), "scale": spec.scale}
    if fused_scale != spec.scale:  # the go_fast multiplier or the hosted scale curve changed it
        entry["fused_scale"] = fused_scale
    if spec.chosen_by_operator:
        entry["deployment_default"] = True
    return entry


def shareable_source(spec: LoraSpec) -> str:
    """The source as it may be published: no user info, query string, fragment or server folder (module doc)."""
    source = parse_source(spec.source, input_name=spec.input_name)
    if isinstance(source, LocalPathSource):
        return PurePosixPath(source.path).name or "local file"
    if isinstance(source, DataUriSource):
        return source.cache_key  # data:sha256:<hex>: which LoRA it was, not its bytes
    given = without_secrets(spec.source.strip())
    if isinstance(source, UrlSource):
        return given
    # Replicate, Hugging Face, CivitAI: a query may say which LoRA (civitai.com/models/1?modelVersionId=2);
    # where cutting it changes the LoRA, the canonical form says the same without one
    try:
        same = parse_source(given, input_name=spec.input_name).cache_key == source.cache_key
    except UserError:
        same = False
    return given if same else source.display


def without_secrets(text: str) -> str:
    """A URL or host-relative source (`owner/model`, `host/x`) without user info, query string and fragment."""
    parts = _URL_HEAD.match(text)
    assert parts is not None  # every group is optional
    return f"{parts['scheme'] or ''}{parts['authority'].rpartition('@')[2]}{parts['path']}"


def record_json(record: dict) -> str:
    """The record as one line of JSON, non-ASCII text as it is (a prompt stays readable in exiftool)."""
    text = json.dumps(record, ensure_ascii=False)
    return _NOT_IN_XML.sub(lambda match: f"\\u{ord(match[0]):04x}", text)  # inside JSON strings: valid escapes


def xmp_packet(record: dict, max_bytes: int | None = None) -> bytes | None:
    """The record as an XMP packet: one property, flux:parameters, holding its JSON. Within max_bytes (JPEG's one
    marker) a prompt too long to fit is cut, and the record says so (`prompt_truncated`); None if even an empty
    prompt does not fit (sources of tens of kilobytes)."""
    packet = _xmp(record)
    if max_bytes is None or len(packet) <= max_bytes:
        return packet

    def cut(length: int) -> bytes:
        return _xmp({**record, "prompt": record["prompt"][:length], "prompt_truncated": True})

    # the longest prompt that fits: the packet grows with the prompt's length, so bisect on it
    fits = bisect.bisect_right(range(len(record["prompt"]) + 1), max_bytes, key=lambda length: len(cut(length))) - 1
    return cut(fits) if fits >= 0 else None


def _xmp(record: dict) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:{XMP_PREFIX}="{XMP_NAMESPACE}">\n'
        f"   <{XMP_PREFIX}:{RECORD_KEY}>{escape(record_json(record))}</{XMP_PREFIX}:{RECORD_KEY}>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()
