"""User-facing errors.

A :class:`UserError` is a problem the user can fix (bad config, missing data, wrong checkpoint).
The command-line entry points print it as one line (``error: ...``) and exit with status 2;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(ValueError):
    """An error caused by the user's input, reported as a single line without traceback.

    A ValueError, so library callers can catch bad configuration the usual way.
    """


def exit_on_user_error(fn: F) -> F:
    """Decorate a CLI ``main``: a :class:`UserError` becomes ``error: <msg>`` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # one write call, so that lines of several processes cannot interleave mid-line
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
