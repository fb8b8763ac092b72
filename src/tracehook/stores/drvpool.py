"""Reading many .drv files at once in worker processes.

A gate starting on a store of 10,000 derivations reads, parses and checks each .drv
before it can answer the first request (the index: :mod:`tracehook.gate.index`); in the
gate's own process that is 1.7 s of one core under the interpreter's lock, which the HTTP
front and the engine then wait for. :func:`read_all` hands batches of paths to worker
processes (``spawn``: fresh interpreters, safe beside the gate's threads), each running
the same :meth:`~tracehook.stores.nixstore.StoreReader.load` (the path checked against the
bytes; the parse written to the verification cache by the worker itself) and sending the
parse back as plain values, which cost the caller a fifth of parsing. Until the first
worker answers (starting an interpreter takes a while) the calling thread reads batches
too. The caller takes the parses inputs first (:func:`in_dependency_order`), each just
before it hashes it, so that it never needs an input it let go of.

What a worker could not read or parse is not sent back: the caller reads it again itself
and reports it as it always does, so a broken, missing or half-written .drv is handled in
one place. A worker that dies, or a pool that cannot start, leaves the rest to the caller
in the same way: never an error of its own, only slower.
"""

from __future__ import annotations

import collections
import logging
import marshal
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from tracehook.errors import TracehookError
from tracehook.nix.aterm import from_plain, to_plain
from tracehook.nix.derivation import Derivation
from tracehook.stores.factcache import FactCache
from tracehook.stores.nixstore import StoreReader

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)

BATCH = 128  # paths a worker reads per message
MIN_PATHS = 2000  # fewer are read in the calling thread: starting processes costs more
# What a worker sends back is bounded in bytes, not only in files (a local user can add
# .drv files of up to 32 MiB to the store): a .drv file larger than LARGE is left to the
# caller unread, and an answer holds parses of at most ANSWER_BYTES (the rest: the
# caller). At most two answers per worker are in flight.
LARGE = 1024 * 1024
ANSWER_BYTES = 8 * 1024 * 1024
TOTAL_BYTES = 64 * 1024 * 1024  # parses held for the caller at once (the rest: the caller's)

Read = tuple[str, bytes, int]  # (drv path, marshalled plain derivation, size)

_reader: StoreReader | None = None


def cores() -> int:
    """The cores this process may run on, at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_limits = (LARGE, ANSWER_BYTES)


def _init(root: str | None, store_dir: str, verify_paths: bool,
          facts: FactCache | None, limits: tuple[int, int]) -> None:
    global _reader, _limits
    _reader = StoreReader(root, store_dir, verify_paths=verify_paths, facts=facts)
    _limits = limits


def _read_batch(paths: Sequence[str]) -> list[Read]:
    """In a worker: :func:`_parses` of the batch, written to the verification cache."""
    assert _reader is not None, "worker not initialised"
    out = _parses(_reader, paths, _limits)
    if _reader.facts is not None:
        _reader.facts.flush()  # the parses, for the next start
    return out


def _parses(reader: StoreReader, paths: Sequence[str], limits: tuple[int, int]
            ) -> list[Read]:
    """Every path that reads, parses and checks, within ``limits`` in bytes
    (:data:`LARGE`, :data:`ANSWER_BYTES`); what is not among them the caller reads again
    and says why."""
    large, answer_bytes = limits
    out: list[Read] = []
    sent = 0
    for path in paths:
        try:
            if os.stat(reader.real_path(path)).st_size > large:
                continue  # the caller reads it, bounded by its own memory
            drv, size = reader.load(path)
        except (OSError, TracehookError):
            continue
        plain = marshal.dumps(to_plain(drv))
        if sent + len(plain) > answer_bytes:
            continue
        sent += len(plain)
        out.append((path, plain, size))
    return out


def read_all(reader: StoreReader, paths: Sequence[str], workers: int | None = None
             ) -> list[Read]:
    """Read, parse and check the .drv files at ``paths`` in ``workers`` processes (default:
    one per core) when there are at least :data:`MIN_PATHS` of them and more than one
    core, else not at all (the caller's own reads do it): the parses, as plain values
    (:func:`in_dependency_order` gives them back as derivations), of at most
    :data:`TOTAL_BYTES`. What is not among them is left to the caller."""
    workers = workers or cores()
    if len(paths) < MIN_PATHS or workers < 2:
        return []
    try:
        pool = _start(reader, workers)
    except Exception as exc:  # e.g. no semaphore for its queues in a sandbox
        log.warning("cannot start processes to read .drv files (%s): reading them here", exc)
        return []
    todo = collections.deque(paths[i:i + BATCH] for i in range(0, len(paths), BATCH))
    pending: collections.deque[Future[list[Read]]] = collections.deque()
    answered = False
    done: list[Read] = []
    held = 0
    try:
        while todo or pending:
            while todo and len(pending) < 2 * workers and held < TOTAL_BYTES:
                try:  # (a process is started here, as it is needed)
                    pending.append(pool.submit(_read_batch, todo[0]))
                except Exception as exc:  # e.g. no process can be started (EAGAIN)
                    log.warning("cannot start processes to read .drv files (%s): reading "
                                "the rest here", exc)
                    return done
                todo.popleft()
            if not pending:
                break  # TOTAL_BYTES held: the rest is the caller's
            if not answered and todo and not pending[0].done():
                # the workers are still starting: this thread reads a batch meanwhile
                batch = _parses(reader, todo.pop(), (LARGE, ANSWER_BYTES))
            else:
                try:
                    batch = pending.popleft().result()
                except Exception as exc:  # a worker died (BrokenProcessPool), or a bug
                    log.warning("reading .drv files in processes failed (%s): reading the "
                                "rest here", exc)
                    break
                answered = True
            done += batch
            held += sum(len(plain) for _, plain, _ in batch)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def in_dependency_order(read: list[Read]) -> Iterator[tuple[str, Derivation, int]]:
    """The parses :func:`read_all` gave, as (drv path, derivation, size), each after those
    of its inputs that are among them: so the caller that hashes them in this order never
    needs an input it has not hashed yet (it would read it again, and on a store larger
    than its memory of parses, again and again). Each is decoded once, and let go of as
    it is given."""
    plains = {path: (marshal.loads(plain), size) for path, plain, size in read}
    read.clear()
    order: list[str] = []
    state: dict[str, int] = {}  # 1: being walked, 2: placed
    for root in plains:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(plains[root][0][1]))]
        while stack:
            path, inputs = stack[-1]
            for inp, _ in inputs:
                if inp in plains and inp not in state:
                    state[inp] = 1
                    stack.append((inp, iter(plains[inp][0][1])))
                    break
            else:  # (an input being walked is a cycle: the caller's read reports it)
                stack.pop()
                state[path] = 2
                order.append(path)
    for path in order:
        plain, size = plains.pop(path)
        yield path, from_plain(plain), size


def _start(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init,
                               initargs=(reader.root, reader.store_dir, reader.verify_paths,
                                         reader.facts, (LARGE, ANSWER_BYTES)))
