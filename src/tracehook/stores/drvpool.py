"""Reading many .drv files at once in worker processes.

A gate starting on a store of 10,000 derivations reads, parses and checks each .drv
before it can answer the first request (the index: :mod:`tracehook.gate.index`); in the
gate's own process that is 1.7 s of one core under the interpreter's lock, which the HTTP
front and the engine then wait for. :func:`read_ordered` hands batches of paths to worker
processes (forked from a server process, :mod:`tracehook.stores.workers`), each running
the same :meth:`~tracehook.stores.nixstore.StoreReader.load` (the path checked against the
bytes; the parse written to the verification cache by the worker itself) and sending the
parse back as plain values, which cost the caller a fifth of parsing. Until the first
worker answers (starting an interpreter takes a while) the calling thread reads batches
too. The workers first read each file for the input paths it names, which gives an order,
inputs first, to parse them in; the caller takes each parse as soon as those of its inputs
were taken (:func:`as_inputs_arrive`), and hashes it while the workers parse the next, so
that it never needs an input it let go of or has not had yet. A store larger than the
parses the caller may hold at once (a NixOS store of tens of thousands of .drv files) is
read in rounds in that order (:func:`read_ordered`), no round needing a later one's, the
next parsed while the caller hashes this one.

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
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from tracehook.errors import TracehookError
from tracehook.nix.aterm import PlainDerivation, from_plain, to_plain
from tracehook.nix.derivation import Derivation
from tracehook.stores.factcache import FactCache
from tracehook.stores.files import read_bounded
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

# .drv file bytes a round reads (:func:`read_ordered`): their parses, about twice that, of
# one round in the caller and of the next on their way, well within TOTAL_BYTES each
ROUND_BYTES = TOTAL_BYTES // 6

Read = tuple[str, bytes, int]  # (drv path, marshalled plain derivation, size)
Edges = tuple[str, tuple[str, ...]]  # (drv path, its input .drv paths)
T = TypeVar("T")
_INPUT_DRV = re.compile(rb'\("(/[^"\\]*\.drv)",\[')

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
    if facts is not None:
        facts.mirror = False  # (a worker writes parses; it keeps none of them in memory)
    _reader = StoreReader(root, store_dir, verify_paths=verify_paths, facts=facts)
    _limits = limits


def _read_batch(paths: Sequence[str]) -> list[Read]:
    """In a worker: :func:`_parses` of the batch, written to the verification cache."""
    assert _reader is not None, "worker not initialised"
    out = _parses(_reader, paths, _limits)
    if _reader.facts is not None:
        _reader.facts.flush()  # the parses, for the next start
    return out


def _graph_batch(paths: Sequence[str]) -> list[Edges]:
    """In a worker: :func:`_edges` of the batch."""
    assert _reader is not None, "worker not initialised"
    return _edges(_reader, paths)


def _edges(reader: StoreReader, paths: Sequence[str]) -> list[Edges]:
    """(path, the input .drv paths its text names) for every path that reads (a file
    larger than :data:`LARGE` is passed over: the caller reads it). Not parsed: this
    only orders the reading (:func:`read_ordered`), which parses and checks each file;
    in a .drv's text, ``("<path>.drv",[`` starts an entry of its inputDrvs and nothing
    else (a quote inside a string is escaped)."""
    out: list[Edges] = []
    for path in paths:
        try:
            data = read_bounded(reader.real_path(path), LARGE, "derivation")
        except TracehookError:
            continue
        if data is not None:
            out.append((path, tuple(m.decode("utf-8", "replace")
                                    for m in _INPUT_DRV.findall(data))))
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


def read_ordered(reader: StoreReader, paths: Sequence[str],
                 sizes: Mapping[str, int] | None = None, workers: int | None = None
                 ) -> Iterator[tuple[str, Derivation, int]]:
    """The .drv files at ``paths`` that ``workers`` processes (default: one per core) read,
    parse and check, when there are at least :data:`MIN_PATHS` of them and more than one
    core (else none: the caller's own reads do it), as (drv path, derivation, size), each
    after those of its inputs that are among them (:func:`in_dependency_order`), however
    many there are: the parses the caller holds at once are at most :data:`TOTAL_BYTES`
    (what does not fit is the caller's). The workers first read every file once for the
    inputs it names, which gives an order, inputs first, to read them in: within a round,
    each parse is given as soon as its inputs were (:func:`as_inputs_arrive`), so the
    caller hashes it while the workers read the next. When their files (``sizes``: path ->
    bytes) come to more than :data:`ROUND_BYTES` (a parse holds about twice its file), they
    are read in rounds of at most that many bytes in that order, so that the caller never
    holds more than a round's parses (and the workers read the next meanwhile) and never
    needs an input of a later round. What is not given, the caller reads itself."""
    workers = workers or cores()
    if len(paths) < MIN_PATHS or workers < 2:
        return
    with _Readers(reader, workers) as readers:
        graph = readers.graph(paths)
        if graph is None or sizes is None or sum(sizes.get(p, 0) for p in paths) <= ROUND_BYTES:
            # one round (few enough bytes, or no order could be worked out): in the order
            # worked out, inputs first, so that the caller can hash each parse soon after
            # it comes, while the workers read the next
            order = list(paths) if graph is None else _inputs_first(graph)
            if len(order) < len(paths):  # (what the workers could not read: at the end)
                placed = set(order)
                order += [p for p in paths if p not in placed]
            yield from as_inputs_arrive(readers.stream(order), paths, readers.close)
            return
        assert sizes is not None
        rounds: list[list[str]] = [[]]
        held = 0
        for path in _inputs_first(graph):
            size = sizes.get(path, 0)
            if held + size > ROUND_BYTES and rounds[-1]:
                rounds.append([])
                held = 0
            rounds[-1].append(path)
            held += size
        del graph
        with ThreadPoolExecutor(1, thread_name_prefix="tracehook-drvpool") as ahead:
            coming = ahead.submit(readers.parses, rounds[0])
            for i in range(len(rounds)):
                read = coming.result()
                if i + 1 < len(rounds):
                    coming = ahead.submit(readers.parses, rounds[i + 1])
                else:
                    readers.close()
                yield from in_dependency_order(read)


class _Readers:
    """The worker processes of one scan (started when first needed, stopped on exit)."""

    def __init__(self, reader: StoreReader, workers: int) -> None:
        self.reader = reader
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._failed = False
        self._answered = False  # a worker has answered: the pool is up

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they are started again if asked for more)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def parses(self, paths: Sequence[str]) -> list[Read]:
        """The parses of ``paths`` (at most :data:`TOTAL_BYTES`); what is not among them is
        the caller's."""
        return [read for batch in self.stream(paths) for read in batch]

    def stream(self, paths: Sequence[str]) -> Iterator[list[Read]]:
        """:meth:`parses`, each batch as it is read (the workers go on reading while the
        caller takes it)."""
        yield from self._run(paths, _read_batch,
                             lambda batch: _parses(self.reader, batch, (LARGE, ANSWER_BYTES)),
                             lambda batch: sum(len(plain) for _, plain, _ in batch))

    def graph(self, paths: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
        """Each file's input .drv paths (what does not read is not among them); None when
        the workers could not read them all, or the inputs named would pass
        :data:`TOTAL_BYTES`."""
        found: dict[str, tuple[str, ...]] = {}
        answers = self._run(paths, _graph_batch, lambda batch: _edges(self.reader, batch),
                            lambda batch: sum(len(p) + sum(map(len, inputs))
                                              for p, inputs in batch))
        while True:
            try:
                found.update(next(answers))
            except StopIteration as end:
                return found if end.value else None

    def _run(self, paths: Sequence[str], remote: Callable[[Sequence[str]], list[T]],
             local: Callable[[Sequence[str]], list[T]], size: Callable[[list[T]], int]
             ) -> Generator[list[T], None, bool]:
        """Hand ``paths`` to the workers in batches (``remote`` in a worker; ``local`` in this
        thread while the workers start) and give each answer as it comes (``size``: how
        many bytes it holds). Returns False when it stopped before the end:
        :data:`TOTAL_BYTES` given, or the workers failed (the rest is then the caller's)."""
        pool = self._start()
        if pool is None:
            return False
        todo = collections.deque(paths[i:i + BATCH] for i in range(0, len(paths), BATCH))
        pending: collections.deque[Future[list[T]]] = collections.deque()
        held = 0
        try:
            while todo or pending:
                while todo and len(pending) < 2 * self.workers and held < TOTAL_BYTES:
                    try:  # (a process is started here, as it is needed)
                        pending.append(pool.submit(remote, todo[0]))
                    except Exception as exc:  # e.g. no process can be started (EAGAIN)
                        self._broken(f"cannot start processes to read .drv files ({exc})")
                        return False
                    todo.popleft()
                if not pending:
                    return False  # TOTAL_BYTES held: the rest is the caller's
                if not self._answered and todo and not pending[0].done():
                    # the workers are still starting: this thread reads a batch meanwhile
                    batch = local(todo.pop())
                else:
                    try:
                        batch = pending.popleft().result()
                    except Exception as exc:  # a worker died (BrokenProcessPool), or a bug
                        self._broken(f"reading .drv files in processes failed ({exc})")
                        return False
                    self._answered = True
                held += size(batch)
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
        return True

    def _start(self) -> ProcessPoolExecutor | None:
        if self._pool is None and not self._failed:
            try:
                self._pool = _start(self.reader, self.workers)
            except Exception as exc:  # e.g. no semaphore for its queues in a sandbox
                self._broken(f"cannot start processes to read .drv files ({exc})")
        return self._pool

    def _broken(self, why: str) -> None:
        log.warning("%s: reading the rest here", why)
        self._failed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _inputs_first(graph: dict[str, tuple[str, ...]]) -> list[str]:
    """Every path of ``graph`` (path -> its inputs), each after those of its inputs that
    are in it; an input being walked (a cycle) is passed over: the caller's read
    reports it."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: being walked, 2: placed
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(graph[root]))]
        while stack:
            path, inputs = stack[-1]
            for inp in inputs:
                if inp in graph and inp not in state:
                    state[inp] = 1
                    stack.append((inp, iter(graph[inp])))
                    break
            else:
                stack.pop()
                state[path] = 2
                order.append(path)
    return order


def as_inputs_arrive(batches: Iterable[list[Read]], paths: Sequence[str],
                     done: Callable[[], None]) -> Iterator[tuple[str, Derivation, int]]:
    """The parses of ``batches`` as they come, as (drv path, derivation, size), each once
    those of its inputs that are among ``paths`` were given (the caller hashes each as it
    is given, while the workers read the next batches); ``done`` when the batches end.
    Then what still waits (an input the workers could not read, which the caller reads
    itself; a cycle) is given inputs first, as :func:`in_dependency_order` does."""
    wanted = set(paths)
    given: set[str] = set()
    held: dict[str, tuple[PlainDerivation, int]] = {}
    missing: dict[str, int] = {}  # path -> its inputs among ``paths`` not given yet
    waiting: dict[str, list[str]] = {}  # input -> the paths held for it
    ready: list[str] = []
    for batch in batches:
        for path, data, size in batch:
            plain: PlainDerivation = marshal.loads(data)
            held[path] = (plain, size)
            blocking = [inp for inp, _ in plain[1] if inp in wanted and inp not in given]
            if not blocking:
                ready.append(path)
                continue
            missing[path] = len(blocking)
            for inp in blocking:
                waiting.setdefault(inp, []).append(path)
        while ready:
            path = ready.pop()
            plain, size = held.pop(path)
            given.add(path)
            yield path, from_plain(plain), size
            for user in waiting.pop(path, ()):
                missing[user] -= 1
                if not missing[user]:
                    del missing[user]
                    ready.append(user)
    done()
    yield from _inputs_first_given(held)


def in_dependency_order(read: list[Read]) -> Iterator[tuple[str, Derivation, int]]:
    """The parses :meth:`_Readers.parses` gave, as (drv path, derivation, size), each after those
    of its inputs that are among them: so the caller that hashes them in this order never
    needs an input it has not hashed yet (it would read it again, and on a store larger
    than its memory of parses, again and again). Each is decoded once, and let go of as
    it is given."""
    plains = {path: (marshal.loads(plain), size) for path, plain, size in read}
    read.clear()
    yield from _inputs_first_given(plains)


def _inputs_first_given(plains: dict[str, tuple[PlainDerivation, int]]
                        ) -> Iterator[tuple[str, Derivation, int]]:
    """``plains`` (path -> (plain derivation, size)) given inputs first, each let go of."""
    order = _inputs_first({path: tuple(inp for inp, _ in plain[1])
                           for path, (plain, _) in plains.items()})
    for path in order:
        plain, size = plains.pop(path)
        yield path, from_plain(plain), size


def _start(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
    from concurrent.futures import ProcessPoolExecutor

    from tracehook.stores import workers as worker_processes

    return ProcessPoolExecutor(workers, mp_context=worker_processes.context(),
                               initializer=_init,
                               initargs=(reader.root, reader.store_dir, reader.verify_paths,
                                         reader.facts, (LARGE, ANSWER_BYTES)))
