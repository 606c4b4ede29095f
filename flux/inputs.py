"""Which files a request may hand us as `image` or `mask`, and reading them without hanging or revealing anything.

cog's server passes a file input to run() as a path. For a URL or a data URI it first saves the bytes with
`tempfile.NamedTemporaryFile` into `tempfile.gettempdir()`; any other string arrives as a path, unchecked. So:

- `claim_upload_folder()` (once, at setup) points this process's temp folder at a new private folder, removed at
  exit. cog's saved uploads land directly in it; nothing else a user could name does.
- A request's file must be a direct child of that folder, or lie inside a folder of FLUX_INPUT_LOCAL_DIRS
  (an operator's choice; `script/predict` allows every folder). Symlinks are resolved before the check.
- Anything else (missing, a folder, a FIFO, a device, some other file) gets one and the same refusal, so the
  answer never tells whether a path exists.
- Only regular files are opened (checked before and after opening, O_NOFOLLOW|O_NONBLOCK), and they are read in
  chunks under a size cap and a deadline: no input can block the request thread, and a cancel lands between chunks.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import settings
from errors import UserError
from units import MiB

MAX_INPUT_BYTES = 200 * MiB  # far above any image under the 50 MP pixel cap
READ_DEADLINE_S = 30.0
_CHUNK = MiB

_upload_folder: Path | None = None


def claim_upload_folder() -> Path:
    """Give this process a private temp folder (mode 0700) for the uploads cog saves; removed at exit."""
    global _upload_folder
    if _upload_folder is None:
        _upload_folder = Path(tempfile.mkdtemp(prefix="flux-uploads-")).resolve()
        atexit.register(shutil.rmtree, _upload_folder, ignore_errors=True)
        tempfile.tempdir = str(_upload_folder)
    return _upload_folder


def refusal(input_name: str) -> UserError:
    return UserError(
        f"{input_name}: give the file as a URL or a data URI; this server does not open file paths "
        "(operators: FLUX_INPUT_LOCAL_DIRS names folders that request files may come from)."
    )


def is_allowed(path: Path) -> bool:
    """Whether a resolved path may be read for a request (see the module notes)."""
    if _upload_folder is not None and path.parent == _upload_folder:
        return True
    folders = [Path(folder).expanduser().resolve() for folder in settings.paths("FLUX_INPUT_LOCAL_DIRS")]
    return any(path.is_relative_to(folder) for folder in folders)


def read_input_file(path: str | os.PathLike, input_name: str) -> bytes:
    """The bytes of a request's file, or the one refusal (UserError) if it is not one we may read."""
    resolved = Path(os.path.realpath(os.fspath(path)))
    if not is_allowed(resolved):
        raise refusal(input_name)
    try:
        before = os.stat(resolved)
        if not stat.S_ISREG(before.st_mode):  # never open a FIFO, device or folder: opening alone can block
            raise refusal(input_name)
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise refusal(input_name) from None
    try:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise refusal(input_name)  # swapped between the check and the open
        if opened.st_size > MAX_INPUT_BYTES:
            raise UserError(f"{input_name}: the file is over {MAX_INPUT_BYTES >> 20} MB; upload a smaller image.")
        return _read_bounded(descriptor, input_name)
    finally:
        os.close(descriptor)


def _read_bounded(descriptor: int, input_name: str) -> bytes:
    deadline = time.monotonic() + READ_DEADLINE_S
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(descriptor, _CHUNK):
        total += len(chunk)
        if total > MAX_INPUT_BYTES:
            raise UserError(f"{input_name}: the file is over {MAX_INPUT_BYTES >> 20} MB; upload a smaller image.")
        if time.monotonic() > deadline:
            raise UserError(f"{input_name}: reading the file took over {READ_DEADLINE_S:.0f} s; try again.")
        chunks.append(chunk)
    return b"".join(chunks)
