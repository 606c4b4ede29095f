"""Fetching a LoRA source (`replicate_weights`, `extra_lora`) to a local .safetensors file.

    fetch_lora(source, input_name="extra_lora") -> Path

Sources (parsed by `lora.sources`) and where their bytes come from:
- Replicate `owner/model[/version]`: `{FLUX_REPLICATE_BASE_URL}/{owner}/{model}[/versions/{v}]/_weights`, a tar
  that must hold exactly one .safetensors. REPLICATE_API_TOKEN, if set, goes to that host only.
- Hugging Face: the Hub API of HF_ENDPOINT through huggingface_hub (listing the repo when no file is named),
  then `/{repo}/resolve/{rev}/{file}` through our downloader (cache, ranges, guards). The token is
  huggingface_hub's (HF_TOKEN or the saved login), sent to the Hub host only, never to its storage redirects.
- CivitAI: `{FLUX_CIVITAI_BASE_URL}/api/download/models/{version}?type=Model&format=SafeTensor`. For a model id
  without a version, `/api/v1/models/{id}` gives the newest version and its SafeTensor file's SHA-256.
  CIVITAI_API_TOKEN, if set, is sent as `Authorization: Bearer` (so it is in no URL) to the CivitAI host only.
- other http(s) URLs, data: URIs, and local paths. A request may name a local path only inside the folders of
  FLUX_LORA_LOCAL_DIRS (separated by `os.pathsep`; unset: none), so a hosted server never reads, or reveals the
  existence of, its own files for a user. The operator's own sources (the deployment's default LoRA) pass
  `allow_any_local_path=True`.
A downloaded file may be a .safetensors or a tar holding exactly one; the content decides, not the name.
Checks, each once: a name that says pickle (.ckpt/.bin...) is refused by `lora.sources` before any download;
the content is sniffed where its bytes arrive (`accepted_format`), and every file's safetensors header is
checked as the safetensors library would (`check_safetensors`). The format layer then trusts the file.
A cache hit's header is checked again before it is served (damage that kept size and mtime passes the cache's
own checks): a damaged entry is dropped and fetched once more. `cancelled` ends a download within a second.

Hugging Face pick rule, when the source names no file: the repo's .safetensors files (any folder) are the
candidates. One candidate: take it. Several: take `lora.safetensors` at the repo root, else
`pytorch_lora_weights.safetensors` at the root (the names Replicate's trainers and diffusers write). Otherwise
fail, listing the candidates and saying how to name one (`huggingface.co/owner/repo/<file>`).

Cache: keyed by the normalised source, so `owner/model` or `huggingface.co/owner/repo` (no version, branch)
is served from the cache after its first download even if the source later changes; name a version or a
commit to pin one. Settings (cache folder and caps, size limit, hosts, tokens): settings.py.

A host's refusal (401, 403, 404) gets the hint of its row in `_HINTS`, which says what to do about it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, get_token, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile

import settings
from errors import UserError
from lora.download.cache import FileCache
from lora.download.checks import PICKLE_SUFFIXES, accepted_format, check_safetensors, extract_single_safetensors
from lora.download.config import DownloadSettings
from lora.download.downloader import Cancelled, Downloader, FetchResult, Resolved
from lora.download.errors import HostFailed, HTTPStatusError
from lora.sources import (
    CivitAISource,
    DataUriSource,
    HuggingFaceSource,
    LocalPathSource,
    LoraSource,
    ReplicateSource,
    UrlSource,
    parse_source,
)
from units import GB, KB, MB

log = logging.getLogger(__name__)

PREFERRED_HF_FILES = ("lora.safetensors", "pytorch_lora_weights.safetensors")
_LORA_FILE = "lora.safetensors"


def lora_downloader() -> Downloader:
    """The downloader and cache configured by the environment (read on each call, so tests can set it)."""
    cache = FileCache(
        Path(settings.text("FLUX_LORA_CACHE_DIR")).expanduser(),
        max_bytes=int(settings.number("FLUX_LORA_CACHE_MAX_GB") * GB),
        min_free_bytes=int(settings.number("FLUX_CACHE_MIN_FREE_GB") * GB),
    )
    return Downloader(cache, DownloadSettings.from_env())


def fetch_lora(
    source: str,
    *,
    input_name: str,
    downloader: Downloader | None = None,
    allow_any_local_path: bool = False,
    cancelled: Cancelled | None = None,
) -> Path:
    """The path of a local, checked .safetensors file for a LoRA source string. UserError on bad input,
    UpstreamError when a host fails, DownloadCancelled once `cancelled()` is true."""
    parsed = parse_source(source, input_name=input_name)
    fetcher = _Fetcher(parsed, input_name, downloader or lora_downloader(), allow_any_local_path, cancelled)
    result, how = fetcher.fetch()
    log.info("%s: LoRA %s, %s, %.2f s, %s", input_name, parsed.display, _size(result.size), result.seconds, how)
    return result.path


def pick_hf_file(paths: list[str], *, repo_id: str, input_name: str) -> str:
    """The file to load from a Hugging Face repo whose source names none (rule in the module docstring)."""
    candidates = sorted(path for path in paths if path.lower().endswith(".safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    for preferred in PREFERRED_HF_FILES:
        if preferred in candidates:
            return preferred
    if not candidates:
        pickles = [path for path in paths if path.lower().endswith(PICKLE_SUFFIXES)]
        note = f" (it has {', '.join(pickles[:5])}: pickle formats are refused)" if pickles else ""
        raise UserError(f"{input_name}: huggingface.co/{repo_id} holds no .safetensors file{note}")
    shown = ", ".join(candidates[:20]) + (f" and {len(candidates) - 20} more" if len(candidates) > 20 else "")
    raise UserError(
        f"{input_name}: huggingface.co/{repo_id} holds {len(candidates)} .safetensors files ({shown}) and none "
        f"is named {' or '.join(PREFERRED_HF_FILES)}; name the one to use, "
        f"e.g. huggingface.co/{repo_id}/{candidates[0]}"
    )


_REPLICATE_REFUSED = (
    "Replicate refused access to {display} (HTTP {status}); for a private model set REPLICATE_API_TOKEN to a token "
    "of an account that can read it"
)
# What a host's refusal means: per host (and endpoint), HTTP status -> the hint shown to the user. The
# placeholders are the facts of the source (`_Remote.facts`) and the status. A status without a row keeps the
# downloader's own message. Hugging Face's API errors come as huggingface_hub classes: `_HUB_ERRORS` maps them.
_HINTS: dict[str, dict[int, str]] = {
    "Replicate": {
        401: _REPLICATE_REFUSED,
        403: _REPLICATE_REFUSED,
        404: "Replicate has no model {display}, or it has no trained weights; check the owner/model[/version] name",
    },
    "Hugging Face": {
        401: "{where} was not found or is private; check the name, and for a private repo set HF_TOKEN",
        403: "{where} is gated or your token cannot read it; accept its conditions on its page and set HF_TOKEN "
        "to a token of that account",
        404: "{where} has no {missing}; check the name",
    },
    "CivitAI": {
        401: "CivitAI requires a login to download {display}; set CIVITAI_API_TOKEN to an API key "
        "(civitai.com: Account settings, API Keys)",
        403: "CivitAI refused {display} (HTTP 403): the model may be in early access or need a purchase, or "
        "CIVITAI_API_TOKEN is not valid for it",
        404: "CivitAI returned 404 for version {number}. A version id differs from the model id in "
        "civitai.com/models/<id>: use the version id from the download link, or "
        "civitai.com/models/<id>?modelVersionId=<version>",
    },
    "CivitAI models API": {
        404: "CivitAI has no model {number}. If {number} is a version id (from a download link), use "
        "civitai.com/api/download/models/{number}",
    },
}
# The Hub API errors huggingface_hub names, with the status each stands for (GatedRepoError before its base class).
_HUB_ERRORS = ((GatedRepoError, 403), (RepositoryNotFoundError, 401), (RevisionNotFoundError, 404))


@dataclass(frozen=True)
class _Remote:
    """Where a remote source's file is (or the lookup that finds it), the credentials for its host, and the row
    of `_HINTS` that explains its host's refusals, with the facts the hints name."""

    url: str | Callable[[], Resolved]
    auth: dict[str, str]
    host: str | None = None  # None: a plain URL, whose 4xx needs no hint
    facts: dict[str, object] = field(default_factory=dict)


class _Fetcher:
    """One fetch of one source. Each step returns what it found; nothing is kept between steps."""

    def __init__(
        self, source: LoraSource, input_name: str, downloader: Downloader, allow_any_local_path: bool,
        cancelled: Cancelled | None = None,
    ) -> None:
        self.source, self.input_name, self.downloader = source, input_name, downloader
        self.allow_any_local_path, self.cancelled = allow_any_local_path, cancelled
        self.max_size = int(settings.number("FLUX_LORA_MAX_GB") * GB)

    def fetch(self) -> tuple[FetchResult, str]:
        """The checked file, and how it came: "downloaded", "cache hit" or "local file"."""
        key, result = self._fetch()
        if key is None:
            return result, "local file"
        if result.cache_hit:
            result = self._intact_hit(key, result)
        return result, "cache hit" if result.cache_hit else "downloaded"

    def _fetch(self) -> tuple[str | None, FetchResult]:
        """(the cache key the file is under, or None for a local file used where it is; the file)."""
        source = self.source
        if isinstance(source, LocalPathSource):
            return self._local(source)
        if isinstance(source, DataUriSource):
            return source.cache_key, self._data_uri(source)
        return source.cache_key, self._download(self._remote(source))

    def _intact_hit(self, key: str, result: FetchResult) -> FetchResult:
        """A cache hit whose header still checks out; a damaged one is dropped and fetched once more."""
        try:
            check_safetensors(result.path, input_name=self.input_name)
            return result
        except UserError:
            log.warning("%s: the cached copy of %s is damaged; fetching it again", self.input_name, self.source.display)
        self.downloader.drop(key)
        _, again = self._fetch()
        if again.cache_hit:  # someone else fetched it meanwhile: check theirs too, but fetch no more
            check_safetensors(again.path, input_name=self.input_name)
        return again

    # -------------------------------------------------------------- remote sources: where, and what refusals mean

    def _remote(self, source: LoraSource) -> _Remote:
        if isinstance(source, ReplicateSource):
            path = f"{source.owner}/{source.model}" + (f"/versions/{source.version}" if source.version else "")
            url = f"{_base_url('FLUX_REPLICATE_BASE_URL')}/{path}/_weights"
            return _Remote(url, _bearer(settings.text("REPLICATE_API_TOKEN")), "Replicate", {"display": source.display})
        if isinstance(source, HuggingFaceSource):
            return self._huggingface(source)
        if isinstance(source, CivitAISource):
            return self._civitai(source)
        assert isinstance(source, UrlSource), source
        return _Remote(source.url, auth={})

    def _huggingface(self, source: HuggingFaceSource) -> _Remote:
        endpoint, token = _base_url("HF_ENDPOINT"), get_token()
        revision = source.revision or "main"
        where = f"huggingface.co/{source.repo_id}"
        missing = f"file {source.filename or 'to pick'!r} at revision {revision!r}"

        def resolve() -> Resolved:
            filename, sha256 = source.filename, None
            if filename is None:
                listed = self._list_hf_repo(endpoint, token, source.repo_id, revision)
                filename = pick_hf_file(list(listed), repo_id=source.repo_id, input_name=self.input_name)
                entry = listed[filename]
                if entry.size > self.max_size:
                    raise self._error(f"{filename} is {entry.size / MB:.1f} MB, over the LoRA size limit")
                sha256 = entry.lfs.sha256 if entry.lfs else None
            return Resolved(hf_hub_url(source.repo_id, filename, revision=revision, endpoint=endpoint), sha256)

        return _Remote(resolve, _bearer(token or ""), "Hugging Face", {"where": where, "missing": missing})

    def _list_hf_repo(self, endpoint: str, token: str | None, repo_id: str, revision: str) -> dict[str, RepoFile]:
        where = f"huggingface.co/{repo_id}"
        try:
            tree = HfApi(endpoint=endpoint, token=token).list_repo_tree(repo_id, revision=revision, recursive=True)
            return {item.path: item for item in tree if isinstance(item, RepoFile)}
        except HfHubHTTPError as exc:
            named = next((status for kind, status in _HUB_ERRORS if isinstance(exc, kind)), None)
            if named is not None:
                hint = _HINTS["Hugging Face"][named]
                raise self._error(hint.format(where=where, missing=f"revision {revision!r}")) from None
            status = exc.response.status_code if exc.response is not None else "?"
            if isinstance(status, int) and 400 <= status < 500 and status != 429:
                raise self._error(f"Hugging Face answered HTTP {status} when listing {where}; check the name") from None
            raise HostFailed(
                f"{self.input_name}: Hugging Face answered HTTP {status} when listing {where}; try again later"
            ) from None
        except Exception as exc:  # network failures come from httpx inside huggingface_hub
            raise HostFailed(
                f"{self.input_name}: could not reach Hugging Face at {endpoint} ({type(exc).__name__}); try again later"
            ) from None

    def _civitai(self, source: CivitAISource) -> _Remote:
        base = _base_url("FLUX_CIVITAI_BASE_URL")
        auth = _bearer(settings.text("CIVITAI_API_TOKEN"))

        def resolve() -> Resolved:
            version_id, sha256 = source.version_id, None
            if version_id is None:
                version_id, sha256 = self._civitai_newest_version(base, auth, str(source.model_id))
            return Resolved(f"{base}/api/download/models/{version_id}?type=Model&format=SafeTensor", sha256)

        facts = {"display": source.display, "number": source.version_id or source.model_id}
        return _Remote(resolve, auth, "CivitAI", facts)

    def _civitai_newest_version(self, base: str, auth: dict[str, str], model_id: str) -> tuple[str, str | None]:
        with self._hints("CivitAI models API", number=model_id):
            info = self.downloader.get_json(
                f"{base}/api/v1/models/{model_id}", input_name=self.input_name, auth_headers=auth,
                cancelled=self.cancelled,
            )
        versions = info.get("modelVersions") if isinstance(info, dict) else None
        try:  # a malformed answer (versions or files not lists, metadata not a dict...) is CivitAI's fault
            if not versions or not isinstance(versions[0], dict) or "id" not in versions[0]:
                raise self._error(f"CivitAI model {model_id} has no downloadable version")
            version_id, files = str(versions[0]["id"]), versions[0].get("files") or []
            files = [f for f in files if isinstance(f, dict) and f.get("type", "Model") == "Model"]
            safetensors = [f for f in files if (f.get("metadata") or {}).get("format") == "SafeTensor"]
            sha256 = ((safetensors[0].get("hashes") or {}).get("SHA256") if safetensors else None) or None
        except (KeyError, TypeError, AttributeError):
            raise HostFailed(f"{self.input_name}: CivitAI answered unexpected JSON for model {model_id}") from None
        if files and not safetensors:
            raise self._error(
                f"CivitAI model {model_id} (version {version_id}) has no SafeTensor file; pickle formats are refused"
            )
        return version_id, sha256.lower() if isinstance(sha256, str) else None

    # -------------------------------------------------------------- files made here

    def _data_uri(self, source: DataUriSource) -> FetchResult:
        if len(source.data) > self.max_size:
            raise self._error("the data: URI is over the LoRA size limit")

        def produce(work_dir: Path) -> Path:
            upload = work_dir / "upload.part"
            upload.write_bytes(source.data)
            return self._as_safetensors(upload)

        return self.downloader.store(source.cache_key, produce, input_name=self.input_name, description=source.display)

    def _local(self, source: LocalPathSource) -> tuple[str | None, FetchResult]:
        """A local .safetensors is used where it is (no key); a local tar's file is cached under a key that names
        the tar's size and mtime, so a changed tar is a new source."""
        started = time.monotonic()
        path = Path(os.path.expanduser(source.path)).resolve()
        allowed = [Path(d).expanduser().resolve() for d in settings.paths("FLUX_LORA_LOCAL_DIRS")]
        if not self.allow_any_local_path and not any(path.is_relative_to(folder) for folder in allowed):
            if not allowed:
                raise self._error(
                    "local file paths are not accepted by this server; give a URL, a Hugging Face, CivitAI or "
                    "Replicate reference (operators: FLUX_LORA_LOCAL_DIRS names folders LoRAs may come from)"
                )
            raise self._error(f"local LoRA paths must be inside FLUX_LORA_LOCAL_DIRS; {source.path} is not")
        if not path.is_file():
            raise self._error(f"no such file: {source.path}")
        stat = path.stat()
        if stat.st_size > self.max_size:
            raise self._error(f"{source.path} is {stat.st_size / MB:.1f} MB, over the LoRA size limit")
        if accepted_format(path, input_name=self.input_name, display=source.display) == "safetensors":
            check_safetensors(path, input_name=self.input_name)
            return None, FetchResult(path, stat.st_size, False, time.monotonic() - started)

        def produce(work_dir: Path) -> Path:
            return self._from_tar(path, work_dir / _LORA_FILE)

        key = f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
        return key, self.downloader.store(key, produce, input_name=self.input_name, description=source.display)

    # -------------------------------------------------------------- shared

    def _download(self, remote: _Remote) -> FetchResult:
        """The one download path of every remote source."""
        with self._hints(remote.host, **remote.facts):
            return self.downloader.fetch(
                remote.url,
                key=self.source.cache_key,
                input_name=self.input_name,
                max_size=self.max_size,
                auth_headers=remote.auth,
                finish=self._as_safetensors,
                description=self.source.display,
                cancelled=self.cancelled,
            )

    @contextlib.contextmanager
    def _hints(self, host: str | None, **facts: object) -> Iterator[None]:
        """A 4xx from `host` with a row in `_HINTS` becomes that hint, naming the input."""
        try:
            yield
        except HTTPStatusError as exc:
            hint = _HINTS.get(host or "", {}).get(exc.status)
            if hint is None:
                raise
            raise self._error(hint.format(status=exc.status, **facts)) from None

    def _as_safetensors(self, path: Path) -> Path:
        """The checked .safetensors for a fetched file: itself, or the one file of a tar."""
        if accepted_format(path, input_name=self.input_name, display=self.source.display) == "tar":
            return self._from_tar(path, path.with_name(_LORA_FILE))
        check_safetensors(path, input_name=self.input_name)
        return path.rename(path.with_name(_LORA_FILE))

    def _from_tar(self, tar_path: Path, dest: Path) -> Path:
        extract_single_safetensors(tar_path, dest, input_name=self.input_name, max_bytes=self.max_size)
        check_safetensors(dest, input_name=self.input_name)
        return dest

    def _error(self, message: str) -> UserError:
        return UserError(f"{self.input_name}: {message}")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _base_url(variable: str) -> str:
    return settings.text(variable).rstrip("/")


def _size(nbytes: int) -> str:
    return f"{nbytes / MB:.1f} MB" if nbytes >= MB // 10 else f"{nbytes / KB:.1f} kB"
