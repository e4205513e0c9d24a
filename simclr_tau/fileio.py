"""Atomic file writes with ordinary permissions, and the check that a directory can be written.

``tempfile.mkstemp`` (and safetensors' ``save_file``) create files with mode 0600, whatever the umask, and
an atomic write renames that temporary file over the target: exported encoders, checkpoints and caches
then came out readable by their owner alone. :func:`atomic_write` gives the file the mode a plain
``open(path, "w")`` would (``0o666 & ~umask``: 0644 under umask 022) before the rename.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from simclr_tau.errors import UserError


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


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = False,
                 when_full: str = "its previous version, if any, is intact: free disk space and run again") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, give it the default mode, rename it over ``path``.

    A crash leaves the old file or the new one, never half a file; the temporary file is removed on failure.
    With ``fsync`` the data and the directory entry reach the disk before this returns. A full disk or quota
    is a :class:`UserError` (one line: the file, then ``when_full``, what to do), not a traceback.
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on device while saving {path} ({os.strerror(e.errno)}); {when_full}"
                            ) from None
        raise
    return path


def check_writable_dir(path: str | Path, key: str) -> None:
    """Refuse (:class:`UserError` naming ``key`` and ``path``) a directory this process cannot create or write:
    ``path`` or its nearest existing parent is a file, or a file cannot be created there (tried, not guessed
    from the mode bits: root ignores them, a read-only mount does not)."""
    p = Path(path)
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={str(p)!r}: {existing} is a file, not a directory; point {key} at a directory "
                        "(it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{key}={str(p)!r}: cannot write in {existing} ({e.strerror or e}); point {key} at a "
                        "writable directory") from None
