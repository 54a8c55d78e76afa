"""Writing files so that a reader never sees half of one: the one helper every writer uses.

Standard library only, so every layer of the package may import it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_directory"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Run ``write(handle)`` on a temporary file next to ``path``, then rename it into place.

    A failed or interrupted write leaves the previous file (if any) untouched and no temporary
    file behind. The temporary file sits in the target's folder, so the rename is atomic on one
    filesystem, and is opened with mode ``"x"`` so it gets the usual umask permissions. Creates the
    parent folder if needed. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "xb") if binary else open(temporary, "x", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_directory(directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(folder)`` on a new temporary folder beside ``directory``, then swap it into place.

    A reader sees the old folder or the new one, never a mix; a failed ``fill`` leaves the old folder
    untouched and no temporary folder behind. Creates the parent folder if needed. Returns
    ``directory``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        fill(temporary)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            temporary.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temporary.rename(directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return directory
