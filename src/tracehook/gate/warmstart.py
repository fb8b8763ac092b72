"""The gate's answers kept across a restart, replayed only if nothing they rest on changed.

With ``--cache-dir``, the gate notes what each generation reads
(:mod:`tracehook.stores.readlog`): every trace file, upstream narinfo and realisation it
looked up, with the SHA-256 of its bytes or the fact that it was absent. When the gate
stops, it records the current generation's allowed answers (200) with those notes, in
``gate/`` of the verification cache. At the next start the record is used only when:

- the tracehook code, the policy (its digest), the gate's signing key and the configuration
  that shapes answers (upstreams, store, ``--fail-on-tamper``, priority, ``--nar-urls``)
  are the same (the record is named by their digest);
- every file the generation read has the same bytes or is still absent (read again now);
- the time is on the same side of every ``not-after`` in the policy.

(When only trace files changed, the steps that rest on none of them are given back as
below, with their answers if the binary caches' files are unchanged: :func:`still_standing`.)
Then the answers go into the decision memo of the first generation, as if decided now,
and live as any decision does (``--cache-ttl``, the generation: a changed policy or trace
store ends it); the files they rest on are noted in that generation, so what it records in
turn still names all of them.

The verified build steps of that generation are kept with them, on the same condition (as
plain values: trace keys, accepted claims, rejections; :meth:`TrustedSet.keep`), and given
to the first generation's engine (:meth:`Engine.take_back`): a step asked for after the
restart whose inputs are kept steps (one that changed, above an unchanged closure) is then
decided from them, without walking and deciding the closure below it again. Each kept claim
comes back through :func:`tracehook.verify.trusted.readmit` (its signer must still be a
current key of the policy); a kept step that does not is a fault, never an allow. Steps are
kept only from a generation that saw no fault, no tamper evidence, and under a policy that
trusts no cache key (a cache signature's reliance below a step is part of its answer).

The same holds from one generation to the next while the gate runs (:meth:`WarmStart.follow`):
a generation that ends with the policy unchanged and saw no fault (it ended by age, a
trace store's change, a key's expiry) hands its engine's verified steps to the next one,
which takes them back when every file they rest on is unchanged (read again then, in a
thread of its own: everything the generation read but the files of the binary caches,
which only answers rest on) and no ``not-after`` was crossed. When only trace files
changed (a builder published meanwhile: the post-build hook writes a trace for what Nix
then builds itself), the steps whose own trace keys changed and every step above them are
decided again and the others taken back (:func:`still_standing`). Its allowed answers go
into the next generation's memo, each for what it had left of ``--cache-ttl``, when
nothing it read changed, or, when only trace files changed, those of the steps taken back
(``Answer.step``: the step whose verdict admitted it) if the binary caches' files read the
same. Else the next generation decides afresh.

Nothing else is kept: refusals and faults are decided again;
a generation that read an HTTP or S3 store, scanned a NAR for references, saw a file change
while reading it, or runs under a policy with hardware evidence (certificates have dates of
their own) records nothing. The verification facts (:mod:`tracehook.stores.factcache`) are
used as before either way.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tracehook.errors import ConfigError, TracehookError
from tracehook.gate.memo import DecisionCache
from tracehook.gate.service import Answer
from tracehook.gate.verdicts import GateVerifier, Succession
from tracehook.stores import readlog
from tracehook.stores.eventlog import EventLog
from tracehook.verify import replay
from tracehook.verify.policy import Policy
from tracehook.verify.trustedset import KeptStep

log = logging.getLogger(__name__)

KIND = "gate"
HANDOVER_WAIT = 30.0  # seconds to wait for the last generation's engine to give its steps


class WarmStart:
    """Thread-safe as :class:`~tracehook.stores.readlog.ReadLog` is: generations begin in
    the verifier's lock; saving and restoring happen before serving and after it."""

    def __init__(self, directory: str, shape: Sequence[object],
                 inputs_of: Callable[[str], Iterable[str]]) -> None:
        """``shape``: what else the answers depend on (signing key, upstreams, flags);
        ``inputs_of``: a step's input derivations (the steps above a trace that changed
        are decided again)."""
        self.directory = directory
        self._inputs_of = inputs_of
        self.shape = repr(list(shape))
        self.log = readlog.ReadLog()
        readlog.attach(self.log)
        #: the verified steps the last run kept, set by :meth:`restore` (step -> height and
        #: plain values)
        self.kept: dict[str, tuple[int, KeptStep]] = {}
        self._follow: tuple[GateVerifier, DecisionCache[Answer],
                            Callable[[], tuple[Policy, str]], EventLog,
                            tuple[str, ...]] | None = None

    def key(self, digest: str) -> str:
        text = repr([replay.code_mark(), digest, self.shape])
        return hashlib.sha256(text.encode()).hexdigest()

    def follow(self, verifier: GateVerifier, memo: DecisionCache[Answer],
               policy: Callable[[], tuple[Policy, str]], events: EventLog,
               cache_roots: Sequence[str]) -> None:
        """Note each of ``verifier``'s generations apart, and hand a generation's verified
        steps (and allowed answers in ``memo``) to the next under the same policy when
        nothing they rest on changed; ``cache_roots``: the directories of the file binary
        caches (what only answers rest on)."""
        self._follow = (verifier, memo, policy, events, tuple(cache_roots))
        verifier.on_generation = self.begin_generation

    def begin_generation(self, succession: Succession | None = None) -> bool:
        """A new generation reads afresh: note only its reads from now on; whether the last
        one's steps are being taken over (in a thread: the verifier is told when it is
        done). (In the verifier's lock.)"""
        old, self.log = self.log, readlog.ReadLog()
        readlog.attach(self.log)
        if succession is None or self._follow is None:
            readlog.detach(old)
            return False
        threading.Thread(target=self._hand_over, args=(old, self.log, succession),
                         name="tracehook-handover", daemon=True).start()
        return True

    def _hand_over(self, old: readlog.ReadLog, new: readlog.ReadLog, s: Succession) -> None:
        """(A thread of its own.) Give generation ``s.new`` the steps and answers of
        ``s.old`` if nothing they rest on changed (``old``: what ``s.old`` read); log it;
        and tell the verifier it is done, whatever happened."""
        assert self._follow is not None
        try:
            self._take_over(old, new, s)
        finally:
            self._follow[0].handed(s.new)

    def _take_over(self, old: readlog.ReadLog, new: readlog.ReadLog, s: Succession) -> None:
        assert self._follow is not None
        verifier, memo, current, events, cache_roots = self._follow
        started = time.monotonic()
        try:
            try:  # (nothing to ask for when what it read cannot be checked again)
                kept = {} if old.opaque else s.keep().result(timeout=HANDOVER_WAIT)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                kept = {}
            answers = [(key[0], expires, a) for key, expires, a in memo.fresh_entries()
                       if isinstance(key, tuple) and len(key) == 2 and key[1] == s.old
                       and a.status == 200]
        finally:
            readlog.detach(old)  # (each step kept, each answer taken was read while it noted)
        if not kept and not answers:
            log.debug("generation %d: nothing of generation %d to take over", s.new[1], s.old[1])
            return
        files, stats, opaque = old.snapshot()
        why, bounds = _why_not(current, s, opaque)
        steps, answered, again = 0, 0, 0
        if why is None:
            now = time.time()
            seen = {path: replay.observe_file(path) for path in files}
            seen_stats = {path: readlog.stat_of(path) for path in stats}
            cmp = _compared(files, seen, cache_roots, verifier.trace_dirs())
            standing: dict[str, tuple[int, KeptStep]] | None = None
            if kept and cmp.changed is not None and _holds(
                    s, bounds, cmp.same, stats, cmp.same, seen_stats, now):
                standing = still_standing(kept, cmp.changed, self._inputs_of)
                new.merge(cmp.same, [], stats)  # (what the next record must name in turn)
                if not verifier.take_back(s.new, standing):
                    why = "another generation began meanwhile"
                steps, again = len(standing), len(kept) - len(standing)
            if why is None and answers and _holds(s, bounds, files, stats, seen, seen_stats,
                                                  now):
                taken = answers
            elif why is None and answers and standing is not None and cmp.caches_same:
                # only traces changed: the answers whose step stands (the binary caches'
                # files they rest on read the same)
                taken = [item for item in answers if item[2].step in standing]
            else:
                taken = []
            if taken:
                new.merge(cmp.unchanged, [], stats)
                for key, expires, answer in taken:  # (each for what it had left to live)
                    memo.put((key, s.new), answer, expires)
                answered = len(taken)
            if why is None and not steps and not answered:
                why = "a file they were decided from changed, or a not-after has passed"
        if why is not None:
            events.emit("gate-generation", "ok",
                        f"generation {s.new[1]} decides afresh, without the {len(kept)} "
                        f"verified steps and {len(answers)} answers of generation {s.old[1]}: "
                        f"{why}", reason=why, steps=0, answers=0, steps_again=0,
                        generation=s.new[1])
            return
        checked = len(cmp.unchanged) if answered else len(cmp.same)
        events.emit("gate-generation", "ok",
                    f"generation {s.new[1]} took over {steps} verified steps and {answered} "
                    f"answers of generation {s.old[1]}: the {checked} files they were decided "
                    f"from read the same (checked in {time.monotonic() - started:.2f} s)"
                    + ("" if not again else
                       f"; {again} steps are decided again: a trace they rest on changed")
                    + ("" if answered == len(answers) else
                       f"; {len(answers) - answered} of its {len(answers)} answers are "
                       "decided again: what they rest on changed"),
                    steps=steps, answers=answered, files=checked, steps_again=again,
                    generation=s.new[1])

    def restore(self, memo: DecisionCache[Answer], gen: tuple[str, int], policy: Policy,
                now: float | None = None, cache_roots: Sequence[str] = (),
                trace_dirs: Sequence[str] = ()) -> tuple[int, int]:
        """Put the recorded answers into ``memo`` for the generation ``gen`` if every input
        still holds, and set :attr:`kept` to the recorded steps that hold (all of them then;
        when only trace files changed, those that rest on none of them, as from one
        generation to the next); (how many answers, how many steps the record had)."""
        if policy.evidence:
            return 0, 0
        record = replay.load_record(replay.record_path(self.directory, self.key(gen[0]), KIND),
                                    {"answers": list, "now": float, "bounds": list})
        when = time.time() if now is None else now
        if record is None or record["bounds"] != replay.not_after_bounds(policy):
            return 0, 0
        files, answers, stats = record["files"], record["answers"], record["stats"]
        assert isinstance(files, dict) and isinstance(answers, list) and isinstance(stats, dict)
        good = [a for a in answers if _answer_shaped(a)]
        steps = record.get("steps", {})
        if len(good) != len(answers) or not (
                isinstance(steps, dict) and all(_step_shaped(k, v) for k, v in steps.items())):
            return 0, 0  # written by something else: decide again
        seen = {path: replay.observe_file(path) for path in files}
        seen_stats = {path: readlog.stat_of(path) for path in stats}
        if replay.holds(record, seen, seen_stats, when):
            self.log.merge(files, [], stats)  # what the replayed answers rest on, checked now
            self.kept = steps
            return self._replay(memo, gen, good), len(steps)
        cmp = _compared(files, seen, cache_roots, trace_dirs)
        if cmp.changed is None or not replay.holds({**record, "files": cmp.same}, cmp.same,
                                                   seen_stats, when):
            return 0, 0
        self.kept = still_standing(steps, cmp.changed, self._inputs_of)
        if not cmp.caches_same:
            self.log.merge(cmp.same, [], stats)
            return 0, len(steps)  # a binary cache's file changed: every answer made again
        # only traces changed: the answers of the steps that stand
        self.log.merge(cmp.unchanged, [], stats)
        return self._replay(memo, gen, [a for a in good if a[4] in self.kept]), len(steps)

    def _replay(self, memo: DecisionCache[Answer], gen: tuple[str, int],
                answers: Sequence[tuple[tuple[object, ...], int, bytes, str, str | None]]
                ) -> int:
        for key, status, body, content_type, step in answers:
            memo.put((key, gen), Answer(status, body, content_type, step=step))
        return len(answers)

    def save(self, memo: DecisionCache[Answer], gen: tuple[str, int], policy: Policy,
             now: float | None = None,
             steps: Mapping[str, tuple[int, KeptStep]] | None = None) -> int:
        """Record the allowed answers of generation ``gen`` with what it read, and the
        verified ``steps`` of its engine; how many answers (0: nothing recorded, and why is
        logged)."""
        seen = self.log
        if seen.opaque or policy.evidence:
            log.info("gate answers not kept for a restart: %s",
                     "; ".join(seen.opaque) or "hardware evidence in the policy")
            return 0
        answers = [(key[0], a.status, a.body, a.content_type, a.step)
                   for key, a in memo.fresh_items()
                   if isinstance(key, tuple) and len(key) == 2 and key[1] == gen
                   and a.status == 200]
        if not answers or len(seen.files) + len(seen.stats) > replay.MAX_ENTRIES:
            return 0
        replay.save_record(self.directory, self.key(gen[0]), KIND, {
            "files": dict(seen.files),
            "stats": dict(seen.stats),
            "now": time.time() if now is None else now,
            "bounds": replay.not_after_bounds(policy),
            "answers": answers,
            "steps": dict(steps or {})})
        return len(answers)

    def close(self) -> None:
        readlog.detach(self.log)


def _why_not(current: Callable[[], tuple[Policy, str]], s: Succession,
             opaque: Sequence[str]) -> tuple[str | None, list[float]]:
    """Why nothing of ``s.old`` may be taken over, whatever the files (None: it may), and
    the policy's ``not-after`` bounds."""
    try:
        policy, digest = current()
    except ConfigError as exc:
        return f"the policy cannot be read: {exc.diagnostics()}", []
    if digest != s.new[0]:
        return "the policy changed meanwhile", []
    if opaque:
        return f"{opaque[0]} (cannot be checked again)", []
    if policy.evidence:
        return "hardware evidence in the policy (certificates have dates of their own)", []
    return None, replay.not_after_bounds(policy)


def _holds(s: Succession, bounds: list[float], files: dict[str, str | None],
           stats: dict[str, readlog.Stat | None], seen: dict[str, str | None],
           seen_stats: dict[str, readlog.Stat | None], now: float) -> bool:
    """Whether what was read as ``files`` and ``stats`` is as it was (``seen`` now) and no
    ``not-after`` in ``bounds`` was crossed since the generation ``s.old`` began."""
    return replay.holds({"files": files, "stats": stats, "now": s.started,
                         "bounds": bounds}, seen, seen_stats, now)


def resting_on(files: Mapping[str, str | None], cache_roots: Sequence[str],
               trace_dirs: Sequence[str]) -> dict[str, str | None]:
    """Pure: of the files a generation read, those its verified steps rest on: all but
    the ones in a file binary cache's directory (its narinfos and realisations, which only
    answers rest on), unless they are in a trace store's ``traces/`` too."""
    caches = tuple(os.path.join(os.path.abspath(r), "") for r in cache_roots)
    traces = tuple(os.path.join(os.path.abspath(d), "") for d in trace_dirs)
    return {path: digest for path, digest in files.items()
            if not path.startswith(caches) or path.startswith(traces)}


@dataclass(frozen=True)
class _Compared:
    """The files a generation read against what they read now."""

    same: dict[str, str | None]  # the files the steps rest on that read the same
    changed: frozenset[str] | None  # the trace keys of the others (None: not all traces)
    unchanged: dict[str, str | None]  # every file that reads the same
    caches_same: bool  # every file only answers rest on (the binary caches') reads the same


def _compared(files: Mapping[str, str | None], seen: Mapping[str, str | None],
              cache_roots: Sequence[str], trace_dirs: Sequence[str]) -> _Compared:
    """Pure: ``files`` (what a generation read) against ``seen`` (the same read now)."""
    resting = resting_on(files, cache_roots, trace_dirs)
    unchanged = {path: digest for path, digest in files.items() if seen[path] == digest}
    same = {path: digest for path, digest in resting.items() if path in unchanged}
    return _Compared(
        same, trace_keys([path for path in resting if path not in same], trace_dirs),
        unchanged, all(path in unchanged for path in files if path not in resting))


def trace_keys(paths: Iterable[str], trace_dirs: Sequence[str]) -> frozenset[str] | None:
    """Pure: the trace keys whose files in a file trace store's ``traces/`` ``paths`` are;
    None if one of them is not such a file."""
    prefixes = tuple(os.path.join(os.path.abspath(d), "") for d in trace_dirs)
    keys = set()
    for path in paths:
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        if prefix is None:
            return None
        keys.add(path[len(prefix):])
    return frozenset(keys)


def still_standing(kept: Mapping[str, tuple[int, KeptStep]], changed: frozenset[str],
                   inputs_of: Callable[[str], Iterable[str]]
                   ) -> dict[str, tuple[int, KeptStep]]:
    """The kept steps that rest on no trace key in ``changed`` (pure but for
    ``inputs_of``, which reads a step's derivation). Lowest first, a step falls when one
    of its own keys changed, when an input fell, or when an input is not kept (what it
    rests on below is then unknown), or its derivation cannot be read; a fixed output is
    pinned by its hash and never falls."""
    if not changed:
        return dict(kept)
    standing: dict[str, tuple[int, KeptStep]] = {}
    for path, (height, step) in sorted(kept.items(), key=lambda item: item[1][0]):
        fixed, keys = step[0], step[1]
        if not fixed:
            if any(key[1] in changed for key in keys):
                continue
            try:
                if not all(inp in standing for inp in inputs_of(path)):
                    continue
            except TracehookError:
                continue
        standing[path] = (height, step)
    return standing


def _step_shaped(path: object, item: object) -> bool:
    return (isinstance(path, str) and isinstance(item, tuple) and len(item) == 2
            and isinstance(item[0], int) and isinstance(item[1], tuple) and len(item[1]) == 6)


def _answer_shaped(item: object) -> bool:
    return (isinstance(item, tuple) and len(item) == 5 and isinstance(item[0], tuple)
            and item[1] == 200 and isinstance(item[2], bytes) and isinstance(item[3], str)
            and (item[4] is None or isinstance(item[4], str)))
