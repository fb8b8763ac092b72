"""What a verified step rests on, read from the verified set: pure functions, no I/O.

- :func:`reliance`: the steps accepted on a cache signature (policy ``narinfo-key``) that a
  step relies on, and how many build steps below them no trace verified: what a report and a
  gate log line must say out loud;
- :func:`failed_below`: the deepest step that failed for a reason of its own below a step
  that did not verify (what a refusal names).
"""

from __future__ import annotations

from tracehook.verify.trustedset import TrustedSet
from tracehook.verify.walk import Graph


def _requested_by(graph: Graph, step: str) -> set[frozenset[str]]:
    return graph.requests.get(step) or {frozenset(graph.drvs[step].outputs)}


def cache_signed(graph: Graph, trusted: TrustedSet, step: str) -> bool:
    """Whether a value of the step that consumers use rests on a cache signature."""
    return step in trusted and any(
        any(c.basis == "cache" for c in trusted.values(step, w))
        for w in _requested_by(graph, step))


def traced(graph: Graph, trusted: TrustedSet, step: str) -> bool:
    """Whether traces verified every set of outputs consumers use."""
    return all(any(c.basis == "traces" for c in trusted.values(step, w))
               for w in _requested_by(graph, step))


def reliance(graph: Graph, trusted: TrustedSet, path: str) -> tuple[frozenset[str], int]:
    """The steps accepted on a cache signature that ``path`` relies on (itself, or the
    nearest ones below it on every chain), and how many build steps below those (that
    ``path`` does not also reach another way) no trace verified."""
    boundary: set[str] = set()
    seen: set[str] = set()
    todo = [path]
    while todo:
        step = todo.pop()
        if step in seen or step not in graph.drvs:
            continue
        seen.add(step)
        if cache_signed(graph, trusted, step):
            boundary.add(step)
        else:
            todo.extend(graph.drvs[step].input_drvs)
    covered: set[str] = set()
    todo = [i for b in boundary for i in graph.drvs[b].input_drvs]
    while todo:
        step = todo.pop()
        if step in covered or step in seen or step not in graph.drvs:
            continue
        covered.add(step)
        todo.extend(graph.drvs[step].input_drvs)
    count = sum(1 for s in covered if s in trusted and not trusted.is_fixed(s)
                and not traced(graph, trusted, s))
    return frozenset(boundary), count


def failed_below(trusted: TrustedSet, path: str) -> str:
    """The deepest step that failed for a reason of its own below a step that is not
    verified (following 'input is not verified' down), or the step itself."""
    seen: set[str] = set()
    step = path
    while step not in seen:
        seen.add(step)
        failure = trusted.failure_of(step)
        if failure is None or failure.kind != "input" or failure.cause is None:
            return step
        step = failure.cause
    return step


def sightings_below(graph: Graph, trusted: TrustedSet, tampered: set[str],
                    path: str) -> tuple[tuple[str, str], ...]:
    """Tamper evidence seen at ``path`` or below it: (step, what), lowest first. Steps only
    below fixed-output steps are left out: a fixed output is pinned by its hash, so how its
    inputs came to be does not matter (and the reports call them not needed)."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    todo = [path]
    while todo:
        step = todo.pop()
        if step in seen or step not in graph.drvs:
            continue
        seen.add(step)
        if step in tampered:
            found += [(step, what) for what in trusted.sightings(step)]
        if graph.drvs[step].kind != "fixed":
            todo.extend(graph.drvs[step].input_drvs)
    return tuple(sorted(found, key=lambda s: (graph.heights.get(s[0], 0), s)))


class Reading:
    """The readings above for one engine's state, each memoized per step (a step's
    evidence never changes once it is done)."""

    def __init__(self, graph: Graph, trusted: TrustedSet, caches: bool,
                 tampered: set[str]) -> None:
        self.graph = graph
        self.trusted = trusted
        self.caches = caches  # whether the policy trusts cache keys at all
        self.tampered = tampered  # the engine's steps with tamper evidence, as it grows
        self._reliance: dict[str, tuple[frozenset[str], int]] = {}
        self._sightings: dict[str, tuple[tuple[str, str], ...]] = {}

    def reliance(self, path: str) -> tuple[frozenset[str], int]:
        if not self.caches:
            return frozenset(), 0
        memo = self._reliance.get(path)
        if memo is None:
            memo = self._reliance[path] = reliance(self.graph, self.trusted, path)
        return memo

    def sightings_below(self, path: str) -> tuple[tuple[str, str], ...]:
        if not self.tampered:
            return ()
        memo = self._sightings.get(path)
        if memo is None:
            memo = self._sightings[path] = sightings_below(self.graph, self.trusted,
                                                           self.tampered, path)
        return memo

    def failed_below(self, path: str) -> str:
        return failed_below(self.trusted, path)
