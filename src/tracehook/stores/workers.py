"""How the worker processes start: forked from one server process that imported their code.

The gate and the verifier hand work to processes of their own: reading .drv files
(:mod:`tracehook.stores.drvpool`) and checking signatures
(:mod:`tracehook.verify._checkpool`). Forking the caller is not safe (it runs threads), so
they used to be fresh interpreters (``spawn``), each importing the verifier anew: 0.18 s of
CPU a process, 0.7 s for the four a cold gate starts on 2 cores, while its first requests
wait. :func:`context` gives multiprocessing's ``forkserver`` instead: the first process
started starts a single-threaded server process, which imports the workers' modules once
(:data:`PRELOAD`); each worker is then forked from it, with those imports done. A worker
gets everything else as before (its arguments, pickled), and the server lives as long as
the process that started it.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext, SpawnContext

PRELOAD = ["tracehook.stores.drvpool", "tracehook.verify._checkpool"]


Context = ForkServerContext | SpawnContext


def context() -> Context:
    """The multiprocessing context worker processes are started with."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # (not POSIX)
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # (the server reads it when it starts)
    return ctx
