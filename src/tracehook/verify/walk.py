"""The derivation graph below the targets: read once, walked inputs first.

:class:`Graph` reads each derivation once (through the loader it is given: a store reader),
walks the graph below a target bottom-up with an explicit stack, a visited set and a
maximum depth (cycles and over-deep graphs are named), and remembers for every step which
sets of outputs its consumers (and the targets) reference. It decides nothing.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tracehook.errors import GraphError, ParseError
from tracehook.nix.derivation import Derivation
from tracehook.nix.storepath import basename

Loader = Callable[[str], Derivation]


@dataclass(frozen=True)
class Target:
    spec: str  # as the user gave it
    drv_path: str
    outputs: frozenset[str] | None = None  # None: every output of the derivation
    path: str | None = None  # an output path the user asked about


class Graph:
    def __init__(self, load: Loader, max_depth: int,
                 on_request: Callable[[str, frozenset[str]], None] | None = None) -> None:
        """``on_request(step, outputs)``: told whenever a consumer or a target references
        outputs of a step already walked (a long-lived engine may owe it more work)."""
        self.load = load
        self.max_depth = max_depth
        self.on_request = on_request
        self.drvs: dict[str, Derivation] = {}
        self.heights: dict[str, int] = {}  # 1 = no inputs; set once a step is walked
        self.requests: dict[str, set[frozenset[str]]] = {}
        #: steps decided without walking below them (a gate's kept steps,
        #: :meth:`tracehook.verify.engine.Engine.take_back`): path -> height; a walk that
        #: reaches one reads it, emits it and does not go below it
        self.leaves: dict[str, int] = {}

    def read(self, drv_path: str, referrer: str | None = None) -> Derivation:
        drv = self.drvs.get(drv_path)
        if drv is None:
            try:
                drv = self.load(drv_path)
                drv.kind  # noqa: B018  (validates the outputs)
            except ParseError as exc:
                via = f" (input of {basename(referrer)})" if referrer else ""
                text = exc.diagnostics()
                if drv_path not in text:  # the parser names the file; a validation may not
                    text = f"{drv_path}: {text}"
                raise GraphError(drv_path, f"{text}{via}") from None
            self.drvs[drv_path] = drv
        return drv

    def request(self, step: str, outputs: frozenset[str]) -> None:
        wanted = self.requests.setdefault(step, set())
        if outputs not in wanted:
            wanted.add(outputs)
            if self.on_request is not None and step in self.heights:
                self.on_request(step, outputs)

    def walk_target(self, target: Target, emit: Callable[[str], None]) -> frozenset[str]:
        """Walk below ``target``; returns the outputs it wants. GraphError if the graph
        cannot be walked."""
        drv = self.read(target.drv_path)
        want = target.outputs or frozenset(drv.outputs)
        missing = sorted(want - set(drv.outputs))
        if missing:
            raise GraphError(target.drv_path, f"{target.drv_path} has no output "
                             f"'{missing[0]}'")
        self.request(target.drv_path, want)
        self.walk(target.drv_path, emit)
        return want

    def walk(self, root: str, emit: Callable[[str], None]) -> None:
        """Post-order over the inputs of ``root`` with an explicit stack: ``emit`` gets each
        step not seen before, after all of its inputs."""
        if root in self.heights:
            return
        if root in self.leaves:
            self._leaf(root, None, emit, closure=True)
            return
        max_depth = self.max_depth
        stack = [(root, iter(self.read(root).input_drvs.items()))]
        on_stack = {root: 0}
        while stack:
            path, children = stack[-1]
            for child, outputs in children:
                self.request(child, frozenset(outputs))
                if child in self.heights:
                    continue
                if child in self.leaves:
                    self._leaf(child, path, emit, closure=False)
                    continue
                if child in on_stack:
                    cycle = [p for p, _ in stack[on_stack[child]:]] + [child]
                    raise GraphError(child, "cycle in the derivation graph: "
                                     + " -> ".join(basename(p) for p in cycle))
                if len(stack) >= max_depth:
                    raise GraphError(child, f"derivation graph deeper than {max_depth} "
                                     f"steps below {basename(root)} (raise --max-depth)")
                drv = self.read(child, path)
                on_stack[child] = len(stack)
                stack.append((child, iter(drv.input_drvs.items())))
                break
            else:
                stack.pop()
                del on_stack[path]
                inputs = self.drvs[path].input_drvs
                height = 1 + max((self.heights[c] for c in inputs), default=0)
                if height > max_depth:
                    raise GraphError(path, f"derivation graph deeper than {max_depth} steps "
                                     f"at {basename(path)} (raise --max-depth)")
                self.heights[path] = height
                emit(path)

    def _leaf(self, path: str, referrer: str | None, emit: Callable[[str], None],
              closure: bool) -> None:
        """A kept step reached: emitted, and nothing below it walked. With ``closure`` (the
        kept step is itself a walk's root: someone asks for a step that was kept, as when
        the whole closure is asked again), every kept step below it is emitted too, inputs
        first, so that the requests for those find them decided instead of each walking to
        its own; a new step above kept ones (what Nix asks for when it has the rest) takes
        back only the kept steps it builds on."""
        drv = self.read(path, referrer)
        stack = [(path, iter(drv.input_drvs if closure else ()))]
        self.heights[path] = self._leaf_height(path)  # (claimed: reached once)
        while stack:
            top, children = stack[-1]
            for child in children:
                if child not in self.leaves:  # not kept, or reached already
                    continue
                drv = self.read(child, top)
                self.heights[child] = self._leaf_height(child)
                stack.append((child, iter(drv.input_drvs)))
                break
            else:
                stack.pop()
                emit(top)

    def _leaf_height(self, path: str) -> int:
        height = self.leaves.pop(path)
        if height > self.max_depth:
            raise GraphError(path, f"derivation graph deeper than {self.max_depth} steps "
                             f"at {basename(path)} (raise --max-depth)")
        return height

    def closure(self, root: str) -> list[str]:
        """Every walked step below ``root``, itself included, lowest first."""
        if root not in self.heights:
            return []
        seen = {root}
        todo = [root]
        while todo:
            for child in self.drvs[todo.pop()].input_drvs:
                if child not in seen and child in self.heights:
                    seen.add(child)
                    todo.append(child)
        return sorted(seen, key=lambda p: (self.heights[p], p))


#: The young generation's threshold in a long-running service (CPython's default: 700).
SERVICE_YOUNG_THRESHOLD = 20_000


def service_collections() -> None:
    """Tune the cyclic garbage collector for a long-running service (the gate), whose heap
    is mostly long-lived: parsed derivations, the verified set, answers in the memo. With
    CPython's default (a young collection every 700 container allocations, a full one
    after ten middle ones, when the old generation grew by a quarter) a gate deciding a
    10,000-step closure spent about a quarter of its time in the collector, mostly in
    eight full collections of 400,000 objects (180 ms each). A young generation of 20,000
    makes those rare; the collector keeps running (a service cannot pause it as
    :func:`fewer_collections` does for one verification), so cycles are still freed.
    Process-wide: call it once, from the service's entry point."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(SERVICE_YOUNG_THRESHOLD, middle, old)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Pause the cyclic garbage collector while a closure is verified: the verifier
    allocates many small objects that live to the end (derivations, claims) and makes few
    cycles, and the collector would spend about a tenth of the time walking them. Reference
    counting still frees everything else; the collector resumes afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
