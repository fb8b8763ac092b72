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
too.

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
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from tracehook.errors import TracehookError
from tracehook.nix.aterm import from_plain, to_plain
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
    """In a worker: every path of the batch that reads, parses and checks, within the
    limits in bytes (:data:`LARGE`, :data:`ANSWER_BYTES`)."""
    assert _reader is not None, "worker not initialised"
    large, answer_bytes = _limits
    out: list[Read] = []
    sent = 0
    for path in paths:
        try:
            if os.stat(_reader.real_path(path)).st_size > large:
                continue  # the caller reads it, bounded by its own memory
            drv, size = _reader.load(path)
        except (OSError, TracehookError):
            continue  # the caller reads it again and says why
        plain = marshal.dumps(to_plain(drv))
        if sent + len(plain) > answer_bytes:
            continue
        sent += len(plain)
        out.append((path, plain, size))
    if _reader.facts is not None:
        _reader.facts.flush()  # the parses, for the next start
    return out


def _read_here(reader: StoreReader, paths: Sequence[str]) -> int:
    done = 0
    for path in paths:
        try:
            reader.read_derivation(path)
            done += 1
        except TracehookError:
            pass  # the caller reads it again and says why
    return done


def read_all(reader: StoreReader, paths: Sequence[str], workers: int | None = None) -> int:
    """Read, parse and check the .drv files at ``paths`` into ``reader``'s memory, in
    ``workers`` processes (default: one per core) when there are at least
    :data:`MIN_PATHS` of them and more than one core, else not at all (the caller's own
    reads do it). Returns how many were read here; the others are left to the caller."""
    workers = workers or cores()
    if len(paths) < MIN_PATHS or workers < 2:
        return 0
    if reader.capacity is not None:
        paths = paths[:reader.capacity // 2]  # (more would push out what was just read)
    try:
        pool = _start(reader, workers)
    except Exception as exc:  # e.g. no semaphore for its queues in a sandbox
        log.warning("cannot start processes to read .drv files (%s): reading them here", exc)
        return 0
    todo = collections.deque(paths[i:i + BATCH] for i in range(0, len(paths), BATCH))
    pending: collections.deque[Future[list[Read]]] = collections.deque()
    answered = False
    done = 0
    try:
        while todo or pending:
            while todo and len(pending) < 2 * workers:
                try:  # (a process is started here, as it is needed)
                    pending.append(pool.submit(_read_batch, todo[0]))
                except Exception as exc:  # e.g. no process can be started (EAGAIN)
                    log.warning("cannot start processes to read .drv files (%s): reading "
                                "the rest here", exc)
                    return done
                todo.popleft()
            if not answered and todo and not pending[0].done():
                done += _read_here(reader, todo.pop())  # the workers are still starting
                continue
            try:
                batch = pending.popleft().result()
            except Exception as exc:  # a worker died (BrokenProcessPool), or a bug in one
                log.warning("reading .drv files in processes failed (%s): reading the rest "
                            "here", exc)
                break
            answered = True
            for path, plain, size in batch:
                reader.remember(path, from_plain(marshal.loads(plain)), size)
            done += len(batch)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def _start(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init,
                               initargs=(reader.root, reader.store_dir, reader.verify_paths,
                                         reader.facts, (LARGE, ANSWER_BYTES)))
