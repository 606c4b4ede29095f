"""Weights from the operator's own host, as the hosted model fetches them: with `FLUX_WEIGHTS_URL=<base>`, each
missing component folder of the weights folder is `<base>/<folder>.tar` (e.g. `<base>/FLUX.1-dev.tar`), an
uncompressed tar of that folder's contents (`<folder>/...` entries, a tar of the folder itself, work too).

- Fetched with the project's downloader (lora.download): parallel ranged connections, resume, stall and deadline
  guards, a progress line every few seconds. The base URL is the operator's, trusted like HF_ENDPOINT: its host
  may be private or loopback (an in-cluster store), for these downloads only; LoRA URLs from requests still may not.
- No size cap: the weights are tens of GB. The guards are the disk's: the downloader reserves the tar's size above
  FLUX_CACHE_MIN_FREE_GB before writing, and extraction checks that the contents fit next to the tar.
- Extracted with the rules LoRA tars follow: regular files and folders only, no links or devices, no absolute or
  `..` names, at most `MAX_MEMBERS` entries. Download first, then extract: streaming the extraction during the
  download measured no faster on loopback once tarfile copies 8 MiB at a time (bench/bench_weights_url.py).
- Never half there: the tar lives in `<root>/.downloads/` (a killed download resumes from there; a process killed
  while extracting downloads again), the contents go to `<root>/.<folder>.partial`, are checked (weights.verify),
  and get the real name in one rename.
- One fetcher per weights folder at a time (a file lock), so replicas sharing a volume fetch each folder once.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tarfile
import time
from pathlib import Path

import settings
from errors import UserError
from lora.download.cache import FileCache, file_lock
from lora.download.checks import checked_members
from lora.download.config import DownloadSettings
from lora.download.downloader import Cancelled, Downloader
from lora.download.errors import DownloadError
from lora.download.urls import redact_url, url_origin
from units import GB, MiB
from weights.verify import verify_weights_folder

log = logging.getLogger(__name__)

INPUT_NAME = "FLUX_WEIGHTS_URL"
MAX_MEMBERS = 10_000  # FLUX.1-dev's folder has about 30 files
_NO_SIZE_CAP = 1 << 62
_COPY_BYTES = 8 * MiB  # tarfile copies 16 KiB at a time by default: several times slower for multi-GB files
_DOWNLOADS = ".downloads"


def fetch_weight_folders(root: Path, folders: list[str], base_url: str, *, cancelled: Cancelled | None = None) -> None:
    """Every folder of `folders` that is missing under `root`, fetched from `<base_url>/<folder>.tar`."""
    root.mkdir(parents=True, exist_ok=True)
    downloader = _weights_downloader(root, base_url)
    with file_lock(root / ".fetch.lock"):
        for folder in folders:
            if not (root / folder).is_dir():  # another process may have fetched it while we waited
                _fetch_folder(downloader, root, folder, f"{base_url.rstrip('/')}/{folder}.tar", cancelled)
        shutil.rmtree(root / _DOWNLOADS, ignore_errors=True)  # every folder is here: nothing left to resume


def _weights_downloader(root: Path, base_url: str) -> Downloader:
    defaults = DownloadSettings.from_env()
    config = dataclasses.replace(
        defaults,
        total_timeout_s=settings.number("FLUX_WEIGHTS_TIMEOUT_S"),
        trusted_origins=defaults.trusted_origins | {url_origin(base_url)},
    )
    # No size cap; the free-disk floor still holds. The cache is only the resumable place of unfinished tars.
    cache = FileCache(
        root / _DOWNLOADS, max_bytes=0, min_free_bytes=int(settings.number("FLUX_CACHE_MIN_FREE_GB") * GB)
    )
    return Downloader(cache, config)


def _fetch_folder(downloader: Downloader, root: Path, folder: str, url: str, cancelled: Cancelled | None) -> None:
    label = redact_url(url)
    staging = root / f".{folder}.partial"
    started = time.monotonic()
    times: dict[str, float] = {}

    def extract_and_publish(tar_path: Path) -> Path:
        times["download"] = time.monotonic() - started
        shutil.rmtree(staging, ignore_errors=True)  # left by a process that died while extracting
        try:
            _check_room(tar_path, root, label)
            contents = extract_folder_tar(tar_path, staging, folder=folder, label=label)
            verify_weights_folder(contents, name=folder, fix=f"Nothing was kept; put a complete tar at {label}.")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        tar_path.unlink()  # before the rename: the disk holds the tar and its contents only while both are needed
        contents.rename(root / folder)  # the one step that gives the folder its real name
        shutil.rmtree(staging, ignore_errors=True)  # empty now, or the wrapper of a `<folder>/...` tar
        done = tar_path.with_name("extracted")
        done.write_text(folder)
        return done  # what the downloader's cache keeps: a few bytes, removed once every folder is here

    log.info("Fetching %s from %s", folder, label)
    downloader.drop(url)  # the marker of an earlier fetch whose folder was deleted since
    downloader.fetch(
        url, key=url, input_name=INPUT_NAME, max_size=_NO_SIZE_CAP, finish=extract_and_publish, description=label,
        cancelled=cancelled,
    )  # fmt: skip
    extract_s = time.monotonic() - started - times["download"]
    log.info("Fetched %s: %.1f s download, %.1f s extract and check", folder, times["download"], extract_s)


def _check_room(tar_path: Path, root: Path, label: str) -> None:
    """The contents take about the tar's size, and the tar stays until they are all out."""
    need = tar_path.stat().st_size + int(settings.number("FLUX_CACHE_MIN_FREE_GB") * GB)
    free = shutil.disk_usage(root).free
    if free < need:
        raise DownloadError(
            f"{INPUT_NAME}: extracting {label} needs {need / GB:.1f} GB free next to the weights folder "
            f"(its size, and FLUX_CACHE_MIN_FREE_GB), {free / GB:.1f} GB are free"
        )


def extract_folder_tar(tar_path: Path, staging: Path, *, folder: str, label: str) -> Path:
    """Extracts the tar into the new folder `staging`, entry by entry after checking each; returns the folder
    that holds the contents (`staging`, or `staging/<folder>` for a tar of the folder itself)."""
    staging.mkdir()
    try:
        archive = tarfile.open(tar_path, mode="r:", copybufsize=_COPY_BYTES)
    except tarfile.TarError:
        raise UserError(f"{INPUT_NAME}: {label} is not an uncompressed .tar file") from None
    with archive:
        try:
            # the "data" filter also refuses what escapes `staging` and drops odd permission bits
            archive.extractall(staging, members=checked_members(archive, what=f"{INPUT_NAME}: {label}", max_members=MAX_MEMBERS), filter="data")
        except tarfile.TarError as error:
            raise UserError(f"{INPUT_NAME}: {label} is damaged or truncated ({error})") from None
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].name == folder and entries[0].is_dir():
        return entries[0]
    return staging


