"""An on-disk cache of downloaded files, keyed by a normalised source string.

Layout under the root (h = sha256 of the key, so keys with tokens or signed queries never reach the disk):

    entries/<h>/<file>      the cached file (`data.safetensors`, ...)
    entries/<h>/meta.json   size, sha256 and a log-safe description; its mtime is the last use (LRU)
    partial/<h>/            the work directory of an unfinished download (resumable); never served
    locks/<h>.lock          flock per key: one producer per key across threads and processes
    locks/evict.lock        one eviction pass at a time

A finished work directory becomes an entry by one `rename`, so a process killed at any moment leaves either
nothing or a complete entry. A hit is checked before it is served: its size always, and its sha256 whenever
the file is not the one we wrote (its mtime or inode changed: something wrote to it or replaced it), unless
`verify_hits=False`. Hashing every hit would cost seconds per request for big files; damage that keeps the
mtime is found by the caller's format check when it uses the file, and `remove` drops the entry. A truncated
or corrupt entry is removed and produced again.

Eviction (least recently used first, unfinished downloads before entries) keeps the cache under `max_bytes`
and the disk above `min_free_bytes`. It skips keys whose lock another producer holds.

Limitation: a path returned by `get_or_create` can still be evicted by another process before the caller
opens it, if that process needs the room. Size the cap so that this needs more concurrent new files than fit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from units import MB, MiB

log = logging.getLogger(__name__)

_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CacheSpaceError(OSError):
    """The cache cannot make room for a file now (size cap or free-disk floor)."""


class LargerThanCache(CacheSpaceError):
    """The file alone is over the cache's size cap, so it will never fit."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock; yields whether it was taken. Works between threads too: each call opens the
    file again, and flock locks belong to the open file description. The kernel drops it if we die."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            acquired = True
        except BlockingIOError:
            acquired = False
        yield acquired
    finally:
        os.close(fd)


def _fingerprint(stat: os.stat_result) -> list[int]:
    return [stat.st_ino, stat.st_mtime_ns, stat.st_size]


def _write_json(path: Path, data: dict[str, object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(frozen=True)
class _Stored:
    """One evictable thing on disk: a finished entry or an unfinished download."""

    key_hash: str
    path: Path
    size: int
    last_used: float
    finished: bool


class Work:
    """The work directory of one key, handed to a producer while the key's lock is held.

    When the producer fails, the directory is removed, unless the producer called `keep_for_resume()`: then
    the next attempt for the key finds it as it was left."""

    def __init__(self, cache: FileCache, key_hash: str, directory: Path) -> None:
        self._cache = cache
        self.key_hash = key_hash
        self.dir = directory
        self.kept_for_resume = False

    def keep_for_resume(self) -> None:
        """Keep the directory if this attempt fails: it holds what a later attempt can resume."""
        self.kept_for_resume = True

    def reserve(self, nbytes: int) -> None:
        """Make room for a file of `nbytes` before writing it (evicts other entries if needed)."""
        self._cache.make_room(nbytes, keep=self.key_hash)


class FileCache:
    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int,
        min_free_bytes: int = 0,
        verify_hits: bool = True,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
    ) -> None:
        """`max_bytes` <= 0 means no size cap. `free_bytes` reports the free disk space under the root."""
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.verify_hits = verify_hits
        self._free_bytes = free_bytes
        for sub in ("entries", "partial", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def get_or_create(self, key: str, create: Callable[[Work], Path], *, description: str) -> tuple[Path, bool]:
        """(path, was_hit). On a miss, `create(work)` writes one file inside `work.dir` and returns its path;
        it becomes the entry. Concurrent callers for one key wait for the first one and then share its entry."""
        key_hash = self.key_hash(key)
        with self._key_lock(key_hash, description):
            hit = self._valid_entry(key_hash)
            if hit is not None:
                return hit, True
            work_dir = self.root / "partial" / key_hash
            work_dir.mkdir(parents=True, exist_ok=True)
            work = Work(self, key_hash, work_dir)
            try:
                produced = create(work)
                return self._commit(key_hash, produced, description), False
            except BaseException:
                if not work.kept_for_resume:
                    _remove(work_dir)
                raise

    def remove(self, key: str) -> None:
        """Drop the entry of `key` (a caller found damage that kept its size and mtime, which the hit checks
        below cannot see without hashing)."""
        key_hash = self.key_hash(key)
        with file_lock(self._lock_path(key_hash)):
            _remove(self.root / "entries" / key_hash)

    def make_room(self, nbytes: int, *, keep: str | None = None, on_disk: bool = False) -> None:
        """Evict until a new file of `nbytes` fits under the cap and above the free-disk floor.
        `on_disk`: the file is already written, so it no longer takes free space."""
        if 0 < self.max_bytes < nbytes:
            raise LargerThanCache(
                errno.ENOSPC,
                f"the file is {nbytes / MB:.1f} MB, more than the whole cache may hold ({self.max_bytes / MB:.1f} MB)",
            )
        with file_lock(self.root / "locks" / "evict.lock"):
            stored = [item for item in self._scan() if item.key_hash != keep]
            used = sum(item.size for item in stored)
            # Unfinished downloads go first (least valuable), then entries by last use.
            stored.sort(key=lambda item: (item.finished, item.last_used))
            for item in stored:
                if self._fits(used, nbytes, on_disk):
                    return
                if self._evict(item):
                    used -= item.size
            if not self._fits(used, nbytes, on_disk):
                free = self._free_bytes(self.root)
                details = (
                    f"{free / MB:.1f} MB free on disk, floor {self.min_free_bytes / MB:.1f} MB, "
                    f"cap {self.max_bytes / MB:.1f} MB with {used / MB:.1f} MB in use by files being used"
                )
                log.warning("cache at %s: no room for %.1f MB (%s)", self.root, nbytes / MB, details)
                # the message reaches users: the numbers, not the server's path
                raise CacheSpaceError(
                    errno.ENOSPC, f"not enough room for {nbytes / MB:.1f} MB in the cache ({details})"
                )

    def _fits(self, used: int, nbytes: int, on_disk: bool) -> bool:
        under_cap = self.max_bytes <= 0 or used + nbytes <= self.max_bytes
        if on_disk:  # already written: the floor was checked when it was reserved
            return under_cap
        return under_cap and self._free_bytes(self.root) - nbytes >= self.min_free_bytes

    def _evict(self, item: _Stored) -> bool:
        with file_lock(self._lock_path(item.key_hash), blocking=False) as acquired:
            if not acquired:
                return False  # someone is producing or reading it right now
            what = self._description(item.path) if item.finished else "an unfinished download"
            _remove(item.path)
        log.info("cache: evicted %s (%.1f MB)", what, item.size / MB)
        return True

    def _scan(self) -> list[_Stored]:
        found: list[_Stored] = []
        for finished, sub in ((True, "entries"), (False, "partial")):
            for path in (self.root / sub).iterdir():
                try:
                    stamp = (path / "meta.json") if finished else path
                    last_used = stamp.stat().st_mtime
                except FileNotFoundError:
                    last_used = 0.0
                found.append(_Stored(path.name, path, _tree_bytes(path), last_used, finished))
        return found

    def _commit(self, key_hash: str, produced: Path, description: str) -> Path:
        work_dir = self.root / "partial" / key_hash
        if produced.parent != work_dir or not produced.is_file():
            raise RuntimeError(f"producer must return a file inside {work_dir}, got {produced}")
        size = produced.stat().st_size
        self.make_room(size, keep=key_hash, on_disk=True)
        suffix = produced.suffix if _SAFE_FILE_NAME.match("data" + produced.suffix) else ""
        file_name = "data" + suffix
        for other in work_dir.iterdir():
            if other != produced:
                _remove(other)
        produced.rename(work_dir / file_name)
        data = work_dir / file_name
        meta = {
            "version": 1,
            "file": file_name,
            "size": size,
            "sha256": sha256_file(data),
            "fingerprint": _fingerprint(data.stat()),  # renaming the folder keeps inode and mtime
            "source": description,
            "created": time.time(),
        }
        _write_json(work_dir / "meta.json", meta)
        entry = self.root / "entries" / key_hash
        _remove(entry)  # an invalid old entry; we hold the key's lock
        os.rename(work_dir, entry)  # the one atomic step that publishes the entry
        return entry / file_name

    def _valid_entry(self, key_hash: str) -> Path | None:
        entry = self.root / "entries" / key_hash
        meta_path = entry / "meta.json"
        if not meta_path.exists():
            if entry.exists():
                _remove(entry)
            return None
        problem = None
        try:
            meta = json.loads(meta_path.read_text())
            file_name = meta["file"]
            if not _SAFE_FILE_NAME.match(file_name):
                raise ValueError("bad file name")
            data = entry / file_name
            stat = data.stat()
            if stat.st_size != meta["size"]:
                problem = "truncated"
            elif self.verify_hits and _fingerprint(stat) != meta.get("fingerprint"):
                if sha256_file(data) != meta["sha256"]:
                    problem = "corrupt (sha256 mismatch)"
                else:  # touched but intact (a copy, a restore): remember the new fingerprint
                    _write_json(meta_path, {**meta, "fingerprint": _fingerprint(stat)})
        except (OSError, ValueError, KeyError, TypeError):
            problem = "missing or unreadable"
        if problem is not None:
            log.warning("cache: entry for %s is %s; fetching it again", self._description(entry), problem)
            _remove(entry)
            return None
        os.utime(meta_path)  # the LRU clock
        return data

    @staticmethod
    def _description(entry: Path) -> str:
        try:
            return str(json.loads((entry / "meta.json").read_text())["source"])
        except (OSError, ValueError, KeyError, TypeError):
            return entry.name[:12]

    def _lock_path(self, key_hash: str) -> Path:
        return self.root / "locks" / f"{key_hash}.lock"

    @contextlib.contextmanager
    def _key_lock(self, key_hash: str, description: str) -> Iterator[None]:
        path = self._lock_path(key_hash)
        with file_lock(path, blocking=False) as acquired:
            if acquired:
                yield
                return
        log.info("cache: waiting for another download of %s", description)
        with file_lock(path):
            yield
