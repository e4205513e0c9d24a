"""Atomic file writes with ordinary permissions.

``tempfile.mkstemp`` (and safetensors' ``save_file``) create files with mode 0600, whatever the umask, and
an atomic write renames that temporary file over the target: exported encoders, checkpoints and caches
then came out readable by their owner alone. :func:`atomic_write` gives the file the mode a plain
``open(path, "w")`` would (``0o666 & ~umask``: 0644 under umask 022) before the rename.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, give it the default mode, rename it over ``path``.

    A crash leaves the old file or the new one, never half a file; the temporary file is removed on failure.
    With ``fsync`` the data and the directory entry reach the disk before this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
