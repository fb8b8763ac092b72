"""How much one verification may walk and how it checks: :class:`Limits` (apart from the
engine, so that a command line can show the defaults without importing the verifier)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_depth: int = 2000  # longest input chain below a target
    max_resolutions: int = 256  # candidate resolutions of one step
    workers: int = 8  # threads fetching and checking traces
    # Worker processes checking traces instead (libsodium releases the GIL, JSON parsing
    # does not): None starts one per core once the walk has read ``process_wait_from``
    # derivations, or ``process_from`` with ``process_backlog`` trace keys waiting to be
    # checked at once (a closure of that size that is one long chain of steps never has
    # more than a few: processes would not help it, and starting them takes cores from
    # it), if there is more than one core and every trace store is local (file://), and
    # uses them once one has started (threads check meanwhile); 0 never; N > 0 starts N
    # at once and uses only them.
    processes: int | None = None
    process_from: int = 500
    process_backlog: int = 32
    # Until a process has started, keys are checked in threads, unless the walk has read
    # this many derivations: then the closure is large, and they wait for the processes
    # (threads would slow the walk down more than the wait costs).
    process_wait_from: int = 1000
