"""Worker processes (the gate's .drv readers and signature checkers) are forked from one
server process that imported their code, not started as fresh interpreters that import it
each."""

from __future__ import annotations

import os
import sys
from multiprocessing.queues import SimpleQueue

from tracehook.stores import workers


def _report(queue: SimpleQueue[tuple[int, list[str]]], preload: list[str]) -> None:
    """In the worker: who started it, and whether the workers' modules were there before
    it ran anything (this module imports none of them)."""
    queue.put((os.getppid(), [m for m in preload if m in sys.modules]))


def test_workers_are_forked_from_a_server_that_imported_their_code() -> None:
    ctx = workers.context()
    assert ctx.get_start_method() == "forkserver"
    queue: SimpleQueue[tuple[int, list[str]]] = ctx.SimpleQueue()
    parents = []
    for _ in range(2):
        proc = ctx.Process(target=_report, args=(queue, workers.PRELOAD))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        parent, loaded = queue.get()
        assert loaded == workers.PRELOAD  # imported by the server, once, before the fork
        parents.append(parent)
    assert parents[0] == parents[1] != os.getpid()  # the one server, not this process
