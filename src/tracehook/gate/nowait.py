"""Answering without waiting: what lets the HTTP front answer in its own thread.

The front (:mod:`tracehook.gate.front`) reads and writes every connection in one thread.
It routes a request itself, inside :func:`no_waiting`, when every upstream is a local
``file://`` cache: most answers then need nothing that is not at hand (a verdict already
decided, a file read). Whatever would have to wait for someone else (a verification still
in progress, another request's computation of the same answer, an index rescan, a NAR
scan) calls :func:`check` first, which raises :class:`WouldWait` in that thread; the front
then hands the request to a worker thread, which routes it again from the start, allowed
to wait. So nothing the front's thread does can hold up another connection, and an answer
computed either way is the same.

Code that may raise WouldWait must not have done anything visible before (no log line, no
cached answer): it is asked again from the start.
"""

from __future__ import annotations

import threading


class WouldWait(BaseException):
    """Raised inside :func:`no_waiting` where the answer would have to wait. A
    BaseException, so that no handler meant for errors turns it into an answer."""


_state = threading.local()


class _NoWaiting:
    """The block of :func:`no_waiting` (a class: it is entered for every request the front
    answers itself, and a generator's context manager costs several times as much)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _state.on = True

    def __exit__(self, *exc: object) -> None:
        _state.on = False


_NO_WAITING = _NoWaiting()


def no_waiting() -> _NoWaiting:
    """In this thread, until the block ends, :func:`check` raises instead of waiting."""
    return _NO_WAITING


def waiting_allowed() -> bool:
    return not getattr(_state, "on", False)


def check() -> None:
    """Call before anything that may wait for another thread or a slow read."""
    if getattr(_state, "on", False):
        raise WouldWait
