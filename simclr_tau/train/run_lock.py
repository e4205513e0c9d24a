"""One writer per run directory: ``<run>/run.lock``.

Two runs writing one directory (the same ``train.run_name`` launched twice, a requeued job while the first still
runs) interleave metrics.jsonl, prune each other's checkpoints and crash. The lock is an exclusive ``flock`` on
``run.lock``, held by the main process for the whole run; the file holds ``{"pid", "host", "started"}`` of the
holder, so that a refused writer can say who has it.

- The kernel drops the lock when its process dies, however it dies (SIGKILL, OOM, node reboot on a local disk).
  A later writer then finds the file still naming the dead holder: it takes the lock over and says so.
- A clean end empties the file (and keeps it): the next writer takes it silently.
- ``flock`` works across the nodes of an NFS mount (the Linux client maps it to a POSIX lock the server keeps),
  so a job requeued on another node takes over the lock of one that died with its node. Where locks are local to
  a node (Lustre mounted ``localflock``), the lock guards against a second writer on the same node only.
  On a filesystem that refuses locks (``ENOLCK``, ``EOPNOTSUPP``) the file alone decides: a holder named on this
  host that is still running refuses the run, a dead one is taken over, one on another host refuses (this
  process cannot see whether it lives); the message says which file to delete when no run holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from simclr_tau.errors import UserError

LOCK_NAME = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe(holder: Dict[str, Any]) -> str:
    started = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The exclusive lock of one run directory; :meth:`acquire` or refuse, :meth:`release` at the end.

    A context manager: ``with RunLock(run_dir).acquire(): ...`` releases even when the run raises.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def _read(self, fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"pid": "?", "host": "?", "unreadable": text[:80]}
        return holder if isinstance(holder, dict) else {}

    def _write(self, fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": int(time.time())}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)

    def _refuse(self, holder: Dict[str, Any], fd: int, kernel_lock: bool = True) -> None:
        os.close(fd)
        extra = "" if kernel_lock else f"; this filesystem has no locks: delete {self.path} if no run holds it"
        raise UserError(f"run directory {self.path.parent} is in use by {_describe(holder)} ({self.path}): wait for "
                        f"that run to end or choose another train.run_name{extra}")

    def acquire(self) -> "RunLock":
        """Take the lock; a live holder is a UserError naming it (pid, host). Prints one line when it takes over
        the lock of a process that died holding it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except BlockingIOError:
            # held: the holder writes its name right after locking; give it a moment to appear
            holder: Dict[str, Any] = {}
            for _ in range(20):
                holder = self._read(fd)
                if holder and "unreadable" not in holder:  # empty or half-written: not yet
                    break
                time.sleep(0.05)
            self._refuse(holder, fd)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            kernel_lock = False  # no locks on this filesystem: the file's content decides
        previous = self._read(fd)
        if previous and not kernel_lock:
            same_host = previous.get("host") == socket.gethostname()
            pid = previous.get("pid")
            if not same_host or not isinstance(pid, int) or (pid != os.getpid() and pid_alive(pid)):
                self._refuse(previous, fd, kernel_lock=False)
        self._write(fd)
        self.fd = fd
        if previous:
            print(f"took over the stale lock {self.path} of {_describe(previous)}: no process holds it any more",
                  flush=True)
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NoLock:
    """What a non-main process holds: the main process has the lock for the whole group."""

    def release(self) -> None:
        pass

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
