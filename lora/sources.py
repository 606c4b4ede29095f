"""Parsing a LoRA source string (`replicate_weights`, `extra_lora`) into a typed source. Pure: no network,
no filesystem, no torch.

Accepted forms (scheme optional for the known hosts; `www.` and http/https are the same source):
- Replicate:    `owner/model`, `owner/model/<version>`, `owner/model:<version>`,
                `replicate.com/owner/model[/versions/<version>]`
- Hugging Face: `huggingface.co/owner/repo` (or `hf.co/...`), `.../tree/<rev>`, `.../<file.safetensors>`,
                `.../blob/<rev>/<path>`, `.../resolve/<rev>/<path>` (query strings such as ?download=true ignored)
- CivitAI:      `civitai.com/models/<id>[/<slug>]`, `...?modelVersionId=<version>`,
                `civitai.com/api/download/models/<version>` (its query is ignored: we ask for the SafeTensor file)
- any other http(s) URL (a .safetensors, or a .tar such as replicate.delivery's, query strings allowed)
- `data:` URIs (base64 or percent-encoded)
- local paths: `/abs`, `./rel`, `../rel`, `~/x`, `file:///abs`, or a relative path ending in .safetensors/.tar

Pickle formats (.ckpt, .pt, .pth, .bin, .pkl) are refused here already, before anything is downloaded.
Each source has a `cache_key` (the normalised source: equal for all spellings of one source) and a
`display` that is safe for logs (no query strings, no data).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit, urlunsplit

from errors import UserError
from lora.download.checks import PICKLE_SUFFIXES
from lora.download.urls import DEFAULT_PORTS, redact_url

_ACCEPTED_FILE_SUFFIXES = (".safetensors", ".tar")

_HF_HOSTS = {"huggingface.co", "hf.co"}
_CIVITAI_HOSTS = {"civitai.com"}
_REPLICATE_HOSTS = {"replicate.com"}

# Replicate: owners are letters, digits, dashes and underscores; model names may also hold dots.
_OWNER = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_MODEL = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_VERSION = r"[0-9a-fA-F]{64}"
_REPLICATE_REF = re.compile(rf"^(?P<owner>{_OWNER})/(?P<model>{_MODEL})(?:[/:](?P<version>{_VERSION}))?/?$")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIGITS = re.compile(r"^\d+$")
_UNSAFE_URL_CHARACTER = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ReplicateSource:
    owner: str
    model: str
    version: str | None = None

    @property
    def cache_key(self) -> str:
        return f"replicate:{self.owner}/{self.model}" + (f":{self.version}" if self.version else "")

    @property
    def display(self) -> str:
        return f"{self.owner}/{self.model}" + (f"/{self.version}" if self.version else "")


@dataclass(frozen=True)
class HuggingFaceSource:
    repo_id: str
    revision: str | None = None  # None: the default branch ("main")
    filename: str | None = None  # None: picked from the repo's files (see lora.fetch)

    @property
    def cache_key(self) -> str:
        return f"hf:{self.repo_id}@{self.revision or 'main'}:{self.filename or '*'}"

    @property
    def display(self) -> str:
        path = f"huggingface.co/{self.repo_id}"
        if self.revision:
            return f"{path}/resolve/{self.revision}/{self.filename or ''}".rstrip("/")
        return f"{path}/{self.filename}" if self.filename else path


@dataclass(frozen=True)
class CivitAISource:
    model_id: str | None = None
    version_id: str | None = None  # None: the model's newest version

    @property
    def cache_key(self) -> str:
        return f"civitai:version:{self.version_id}" if self.version_id else f"civitai:model:{self.model_id}"

    @property
    def display(self) -> str:
        if self.version_id:
            return f"civitai.com/api/download/models/{self.version_id}"
        return f"civitai.com/models/{self.model_id}"


@dataclass(frozen=True)
class UrlSource:
    url: str  # as given (normalised scheme and host), query included: signed URLs need it

    @property
    def cache_key(self) -> str:
        return f"url:{self.url}"

    @property
    def display(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class DataUriSource:
    data: bytes  # the media type is not kept: the content decides the format (lora.fetch)

    @property
    def cache_key(self) -> str:
        return f"data:sha256:{hashlib.sha256(self.data).hexdigest()}"

    @property
    def display(self) -> str:
        return f"data: URI ({len(self.data)} bytes)"


@dataclass(frozen=True)
class LocalPathSource:
    path: str  # normalised; relative paths stay relative (resolved when fetched)

    @property
    def cache_key(self) -> str:
        return f"file:{self.path}"

    @property
    def display(self) -> str:
        return self.path


LoraSource = ReplicateSource | HuggingFaceSource | CivitAISource | UrlSource | DataUriSource | LocalPathSource


def parse_source(text: str, *, input_name: str) -> LoraSource:
    """The typed source for a user's string; a UserError naming `input_name` if it is not one."""
    try:
        return _parse_source(text, input_name)
    except UserError:
        raise
    except ValueError:  # urllib's own: "Invalid IPv6 URL", "Port out of range", a port that is not a number
        raise UserError(
            f"{input_name}: {_short(text.strip())!r} is not a valid URL; check its host and port"
        ) from None


def _parse_source(text: str, input_name: str) -> LoraSource:
    value = text.strip()
    if not value:
        raise UserError(f"{input_name}: empty LoRA source")
    lowered = value.lower()
    if lowered.startswith("data:"):
        return _parse_data_uri(value, input_name)
    if lowered.startswith("file://"):
        return _local(unquote(urlsplit(value).path), input_name)
    if value.startswith(("/", "./", "../", "~")):
        return _local(value, input_name)
    scheme = urlsplit(value).scheme.lower() if "://" in value else ""
    if scheme and scheme not in ("http", "https"):
        raise UserError(f"{input_name}: unsupported URL scheme {scheme!r}; use an https:// URL")
    if not scheme:
        match = _REPLICATE_REF.match(value)
        if match and not lowered.endswith(_ACCEPTED_FILE_SUFFIXES + PICKLE_SUFFIXES):
            return _replicate(match["owner"], match["model"], match["version"])
        first = value.split("/", 1)[0].lower().removeprefix("www.")
        if first in _HF_HOSTS | _CIVITAI_HOSTS | _REPLICATE_HOSTS:
            value, scheme = "https://" + value, "https"
        elif lowered.endswith(_ACCEPTED_FILE_SUFFIXES) and ("/" not in value or "." not in first):
            return _local(value, input_name)  # "lora.safetensors", "loras/x.safetensors"
        else:
            _refuse_if_pickle(value, input_name)
            raise UserError(
                f"{input_name}: cannot tell what {_short(value)!r} is. Use owner/model[/version] for Replicate, "
                "huggingface.co/owner/repo, civitai.com/models/<id>, an https:// URL of a .safetensors file, "
                "a data: URI, or a local path starting with / or ./"
            )
    return _parse_url(value, input_name)


def _parse_url(value: str, input_name: str) -> LoraSource:
    if _UNSAFE_URL_CHARACTER.search(value):
        raise UserError(f"{input_name}: the URL {_short(value)!r} contains spaces or control characters")
    parts = urlsplit(value)
    host = (parts.hostname or "").lower()
    if not host:
        raise UserError(f"{input_name}: the URL {_short(value)!r} has no host")
    if parts.port == 0 or not _valid_host(host):
        raise UserError(f"{input_name}: {_short(value)!r} is not a valid URL; check its host and port")
    bare_host = host.removeprefix("www.")
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    if bare_host in _HF_HOSTS and parts.port is None:
        return _parse_huggingface(segments, value, input_name)
    if bare_host in _CIVITAI_HOSTS and parts.port is None:
        return _parse_civitai(segments, parts.query, value, input_name)
    if bare_host in _REPLICATE_HOSTS and parts.port is None:
        return _parse_replicate_url(segments, value, input_name)
    _refuse_if_pickle(parts.path, input_name)
    # Normalise what does not change the resource: scheme and host case, a default port.
    netloc = parts.netloc.rpartition("@")
    host_port = netloc[2].lower()
    scheme = parts.scheme.lower()
    if parts.port == DEFAULT_PORTS[scheme]:
        host_port = host_port.rsplit(":", 1)[0]
    normalised = urlunsplit((scheme, netloc[0] + netloc[1] + host_port, parts.path or "/", parts.query, ""))
    return UrlSource(normalised)


def _parse_huggingface(segments: list[str], value: str, input_name: str) -> HuggingFaceSource:
    if segments and segments[0] in ("datasets", "spaces"):
        raise UserError(f"{input_name}: {_short(value)!r} is a Hugging Face {segments[0][:-1]}; use a model repo")
    if len(segments) < 2 or not all(_HF_NAME.match(name) for name in segments[:2]):
        raise UserError(
            f"{input_name}: {_short(value)!r} is not a Hugging Face model repo; "
            "use huggingface.co/owner/repo or huggingface.co/owner/repo/resolve/main/file.safetensors"
        )
    repo_id = f"{segments[0]}/{segments[1]}"
    rest = segments[2:]
    revision: str | None = None
    filename: str | None = None
    if rest and rest[0] in ("blob", "resolve"):
        if len(rest) < 3:
            raise UserError(f"{input_name}: {_short(value)!r} names no file after /{rest[0]}/<revision>/")
        revision, filename = rest[1], "/".join(rest[2:])
    elif rest and rest[0] == "tree":
        if len(rest) > 2:
            raise UserError(f"{input_name}: {_short(value)!r} is a folder; name a .safetensors file in it")
        revision = rest[1] if len(rest) == 2 else None
    elif rest:
        filename = "/".join(rest)
    if filename is not None:
        _refuse_if_pickle(filename, input_name)
    return HuggingFaceSource(repo_id, revision, filename)


def _parse_civitai(segments: list[str], query: str, value: str, input_name: str) -> CivitAISource:
    version = parse_qs(query).get("modelVersionId", [None])[0]
    if version is not None and not _DIGITS.match(version):
        raise UserError(f"{input_name}: modelVersionId in {_short(value)!r} must be a number")
    if len(segments) >= 2 and segments[0] == "models" and _DIGITS.match(segments[1]):
        return CivitAISource(model_id=segments[1], version_id=version)
    if len(segments) >= 4 and segments[:3] == ["api", "download", "models"] and _DIGITS.match(segments[3]):
        return CivitAISource(version_id=segments[3])
    raise UserError(
        f"{input_name}: {_short(value)!r} is not a CivitAI model link; use civitai.com/models/<id>, "
        "civitai.com/models/<id>?modelVersionId=<version> or civitai.com/api/download/models/<version>"
    )


def _parse_replicate_url(segments: list[str], value: str, input_name: str) -> ReplicateSource:
    if segments and segments[-1] == "_weights":
        segments = segments[:-1]
    ref = "/".join(segments[:2])
    version = None
    if len(segments) == 4 and segments[2] == "versions":
        version = segments[3]
    match = _REPLICATE_REF.match(ref)
    if (
        not match
        or len(segments) not in (2, 4)
        or (len(segments) == 4 and not re.match(rf"^{_VERSION}$", version or ""))
    ):
        raise UserError(
            f"{input_name}: {_short(value)!r} is not a Replicate model; use owner/model or owner/model/<version>"
        )
    return _replicate(match["owner"], match["model"], version)


def _valid_host(host: str) -> bool:
    """An IP address or a name that IDNA can encode (no empty labels, none over 63 characters)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _replicate(owner: str, model: str, version: str | None) -> ReplicateSource:
    # Replicate names are lowercase; the same model typed in another case is the same source.
    return ReplicateSource(owner.lower(), model.lower(), version.lower() if version else None)


def _parse_data_uri(value: str, input_name: str) -> DataUriSource:
    header, comma, payload = value[5:].partition(",")
    if not comma:
        raise UserError(f"{input_name}: malformed data: URI (no comma)")
    params = [part.strip() for part in header.split(";")]
    try:
        if "base64" in (param.lower() for param in params[1:]):
            data = base64.b64decode("".join(payload.split()), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise UserError(f"{input_name}: the data: URI is not valid base64") from None
    if not data:
        raise UserError(f"{input_name}: the data: URI is empty")
    return DataUriSource(data)


def _local(path: str, input_name: str) -> LocalPathSource:
    _refuse_if_pickle(path, input_name)
    if "\x00" in path:
        raise UserError(f"{input_name}: invalid local path")
    normalised = path if path.startswith("~") else posixpath.normpath(path)
    if path.startswith("./") and not normalised.startswith("."):
        normalised = "./" + normalised
    return LocalPathSource(os.fspath(normalised))


def _refuse_if_pickle(name: str, input_name: str) -> None:
    """A UserError if `name` ends like a pickle format (.ckpt, .pt, .pth, .bin, .pkl)."""
    if not name.lower().endswith(PICKLE_SUFFIXES):
        return
    suffix = os.path.splitext(name.rstrip("/"))[1].lower()
    raise UserError(
        f"{input_name}: {suffix} files are Python pickles, which can run code when loaded; only .safetensors "
        "LoRAs are accepted. Convert it to .safetensors and pass that instead."
    )


def _short(value: str) -> str:
    """The input as shown in errors: without user info or query string (may be signed), not too long."""
    if "://" in value:
        cut = redact_url(value)
    else:  # "user:password@host/x" typed without a scheme
        first, slash, rest = value.partition("/")
        cut = (first.rpartition("@")[2] + slash + rest).split("?", 1)[0]
    return cut if len(cut) <= 200 else cut[:200] + "..."
