"""Generated repos (the tiny test weights) on disk: a folder is complete and current, or it gets rebuilt.

Each repo is written into a staging folder and renamed into place, with a version marker written last, under a
file lock shared by all processes (parallel test runs share one cache). A build killed halfway leaves only a
staging folder, which the next builder removes.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RepoBuild:
    name: str  # names the lock, the marker and the staging folders, e.g. "tiny-flux"
    version: str  # bump whenever the generated files change, so existing caches are rebuilt

    @property
    def marker(self) -> str:
        return f".{self.name}-format"

    @property
    def staging_prefix(self) -> str:
        return f".building-{self.name}-"

    def is_complete(self, repo_dir: Path) -> bool:
        try:
            return (repo_dir / self.marker).read_text() == self.version
        except OSError:
            return False

    def ensure(self, root: Path, writers: dict[Path, Callable[[Path], None]]) -> None:
        """Build every target (in order) that is missing, unfinished or outdated. writers: target -> writer,
        a function that writes the complete repo into the empty folder it is given."""
        if all(self.is_complete(target) for target in writers):
            return  # the common case: no lock, no torch import
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root / f".{self.name}.lock"):
            # Anything half-built belongs to a process that died: we hold the lock, so no one is writing it.
            for leftover in root.glob(self.staging_prefix + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
            for target, write in writers.items():
                if not self.is_complete(target):  # another process may have built it while we waited
                    self._build(target, write)

    def _build(self, target: Path, write: Callable[[Path], None]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=self.staging_prefix, dir=target.parent))
        try:
            built = staging / target.name
            write(built)
            (built / self.marker).write_text(self.version)  # last, so only finished builds carry it
            if target.exists():
                target.rename(staging / "stale")  # rename cannot overwrite a folder
            built.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    """Deterministic JSON (sorted keys), as generated repos need for byte-identical rebuilds."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
