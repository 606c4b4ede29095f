"""Resume state of a ranged download: which chunks of the part file are complete, so a later attempt (after a
network failure, a stall, a cancel or a killed process) fetches only the rest.

Kept only when the server gave a validator (a strong ETag or Last-Modified) and only reused while the
validator, the size and the first range are unchanged. A chunk is recorded after all its bytes were written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def validator_of(headers: Mapping[str, str]) -> str | None:
    """What tells us the file is unchanged between attempts; weak ETags don't promise identical bytes."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return f"etag:{etag}"
    modified = headers.get("Last-Modified")
    return f"last-modified:{modified}" if modified else None


class ResumeState:
    _PLAN = "resume.json"
    _DONE = "resume.done"

    def __init__(self, work_dir: Path, chunks: list[tuple[int, int]], done: set[int], persistent: bool) -> None:
        self._done_path = work_dir / self._DONE
        self._persistent = persistent
        self._lock = threading.Lock()
        self.chunks = chunks
        self.done = done

    @classmethod
    def open(
        cls, work_dir: Path, dest: Path, *, total: int, validator: str | None, chunks: list[tuple[int, int]]
    ) -> ResumeState:
        """The saved state when it is for the same file (size, validator, first range), else a fresh one.
        A resumed download keeps its saved chunk plan, whatever the settings are now."""
        plan_path = work_dir / cls._PLAN
        saved = _read_json(plan_path)
        saved_chunks = _valid_plan(saved.get("chunks"), total) if isinstance(saved, dict) else None
        same_file = (
            validator is not None
            and saved_chunks is not None
            and saved.get("total") == total
            and saved.get("validator") == validator
            and saved_chunks[0] == chunks[0]
            and dest.is_file()
            and dest.stat().st_size == total
        )
        if same_file:
            state = cls(work_dir, saved_chunks, set(), persistent=True)  # type: ignore[arg-type]
            state.done = state._read_done()
            if state.done:
                log.info("resuming a download: %d of %d chunks already here", len(state.done), len(state.chunks))
            return state
        cls.clear(work_dir)
        with dest.open("wb") as part:
            part.truncate(total)  # sparse; chunks land at their offsets
        if validator is not None:
            plan_path.write_text(json.dumps({"total": total, "validator": validator, "chunks": chunks}))
        return cls(work_dir, chunks, set(), persistent=validator is not None)

    @classmethod
    def exists(cls, work_dir: Path) -> bool:
        return (work_dir / cls._PLAN).exists()

    @classmethod
    def clear(cls, work_dir: Path) -> None:
        for name in (cls._PLAN, cls._DONE):
            with contextlib.suppress(FileNotFoundError):
                (work_dir / name).unlink()

    def pending(self) -> list[int]:
        return [index for index in range(len(self.chunks)) if index not in self.done]

    def bytes_done(self) -> int:
        return sum(self.chunks[index][1] - self.chunks[index][0] for index in self.done)

    def _read_done(self) -> set[int]:
        try:
            lines = self._done_path.read_text().split("\n")
        except FileNotFoundError:
            return set()
        # Only full lines count: a kill can cut the last one short.
        return {int(line) for line in lines[:-1] if line.isdigit() and int(line) < len(self.chunks)}

    def mark_done(self, index: int) -> None:
        with self._lock:
            self.done.add(index)
            if self._persistent:
                with self._done_path.open("a") as done:
                    done.write(f"{index}\n")

    def finish(self) -> None:
        self.clear(self._done_path.parent)


def _valid_plan(value: Any, total: int) -> list[tuple[int, int]] | None:
    """The saved chunk list if it tiles [0, total) exactly; a damaged plan is not trusted."""
    if not isinstance(value, list) or not value:
        return None
    chunks, position = [], 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and item[0] == position and isinstance(item[1], int)):
            return None
        if item[1] <= position:
            return None
        chunks.append((position, item[1]))
        position = item[1]
    return chunks if position == total else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
