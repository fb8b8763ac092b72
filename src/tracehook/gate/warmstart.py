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

Nothing else is kept: refusals and faults are decided again;
a generation that read an HTTP or S3 store, scanned a NAR for references, saw a file change
while reading it, or runs under a policy with hardware evidence (certificates have dates of
their own) records nothing. The verification facts (:mod:`tracehook.stores.factcache`) are
used as before either way.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence

from tracehook.gate.memo import DecisionCache
from tracehook.gate.service import Answer
from tracehook.stores import readlog
from tracehook.verify import replay
from tracehook.verify.policy import Policy
from tracehook.verify.trustedset import KeptStep

log = logging.getLogger(__name__)

KIND = "gate"


class WarmStart:
    """Thread-safe as :class:`~tracehook.stores.readlog.ReadLog` is: generations begin in
    the verifier's lock; saving and restoring happen before serving and after it."""

    def __init__(self, directory: str, shape: Sequence[object]) -> None:
        """``shape``: what else the answers depend on (signing key, upstreams, flags)."""
        self.directory = directory
        self.shape = repr(list(shape))
        self.log = readlog.ReadLog()
        readlog.attach(self.log)
        #: the verified steps the last run kept, set by :meth:`restore` (step -> height and
        #: plain values)
        self.kept: dict[str, tuple[int, KeptStep]] = {}

    def key(self, digest: str) -> str:
        text = repr([replay.code_mark(), digest, self.shape])
        return hashlib.sha256(text.encode()).hexdigest()

    def begin_generation(self) -> None:
        """A new generation reads afresh: note only its reads from now on."""
        old, self.log = self.log, readlog.ReadLog()
        readlog.attach(self.log)
        readlog.detach(old)

    def restore(self, memo: DecisionCache[Answer], gen: tuple[str, int], policy: Policy,
                now: float | None = None) -> int:
        """Put the recorded answers into ``memo`` for the generation ``gen`` if every input
        still holds; how many."""
        if policy.evidence:
            return 0
        record = replay.load_record(replay.record_path(self.directory, self.key(gen[0]), KIND),
                                    {"answers": list, "now": float, "bounds": list})
        when = time.time() if now is None else now
        if record is None or record["bounds"] != replay.not_after_bounds(policy):
            return 0
        if not replay.inputs_hold(record, when):
            return 0
        files, answers = record["files"], record["answers"]
        assert isinstance(files, dict) and isinstance(answers, list)
        good = [a for a in answers if _answer_shaped(a)]
        if len(good) != len(answers):
            return 0  # written by something else: decide again
        self.log.merge(files, [])  # what the replayed answers rest on, checked just now
        for key, status, body, content_type in good:
            memo.put((key, gen), Answer(status, body, content_type))
        steps = record.get("steps", {})
        if isinstance(steps, dict) and all(_step_shaped(k, v) for k, v in steps.items()):
            self.kept = steps
        return len(good)

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
        answers = [(key[0], a.status, a.body, a.content_type) for key, a in memo.fresh_items()
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


def _step_shaped(path: object, item: object) -> bool:
    return (isinstance(path, str) and isinstance(item, tuple) and len(item) == 2
            and isinstance(item[0], int) and isinstance(item[1], tuple) and len(item[1]) == 6)


def _answer_shaped(item: object) -> bool:
    return (isinstance(item, tuple) and len(item) == 4 and isinstance(item[0], tuple)
            and item[1] == 200 and isinstance(item[2], bytes) and isinstance(item[3], str))
