"""Stop signals: SIGTERM (preemption: ``scancel``, ``docker stop``, ``kill -TERM -- -PGID``) and SIGINT (Ctrl-C)
finish the current step, checkpoint and exit 0. The main process owns that shutdown.

A scheduler signals the whole process group, DataLoader workers included. A worker killed by it takes the run
down with ``RuntimeError: DataLoader worker ... killed by signal: Terminated`` (torch's SIGCHLD handler raises it
in the main process wherever it is, the checkpoint save included), so workers drop the stop signals of others
(:class:`IgnoreStopSignals`) and are started with them blocked (:func:`stop_signals_blocked`), so that one
landing between the fork and the worker's init function is dropped too. A SIGTERM from the worker's parent still
ends it, as torch's own worker handler does: torch ends a hung worker that way, and multiprocessing ends every
live worker that way at interpreter exit, then joins it (a worker ignoring its parent hangs the exit after an
error).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit cleanly (preemption, Ctrl-C)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn`` (a class, so that a spawned worker can unpickle it): SIGINT ignored, and
    SIGTERM, kept blocked in every thread of the worker, taken by a thread that ends the worker if its parent
    sent it and drops it otherwise (``kill -TERM -- -PGID``). Then ``then(worker_id)``, an existing init function."""

    def __init__(self, then: Optional[Callable[[int], None]] = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is dropped: ignored now
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here inherit it
        threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm", daemon=True).start()
        if self.then is not None:
            self.then(worker_id)


def _exit_on_sigterm_from_parent() -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(0)  # what torch's worker SIGTERM handler does for its parent


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM / SIGINT in this thread while DataLoader workers start (``iter(loader)``): a forked worker
    inherits the mask, so none dies of a signal before its init function ignores it. A signal arriving meanwhile
    stays pending for this process and reaches the :class:`StopFlag` on exit."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
