"""Resolution through the persistent verification cache.

A build step resolved with the same input values always gives the same resolved
derivation and trace key (:func:`tracehook.trace.stepkey.step_key` is a pure function of the
derivation and those values), whoever asks and whatever the policy says: so the key, not
the decision, is remembered (:mod:`tracehook.stores.factcache`, namespace ``resolve``),
keyed by the step's path and the exact input values.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
from collections.abc import Mapping

from tracehook.nix.derivation import Derivation
from tracehook.trace.claim import TraceKey
from tracehook.trace.stepkey import InputOutput, Resolution, step_key
from tracehook.verify.decide import Resolve
from tracehook.verify.trusted import Facts


def remembered(facts: Facts, path: str) -> Resolve:
    """:func:`step_key` for the step at ``path``, remembered in ``facts``."""

    def resolve(drv: Derivation, chosen: Mapping[tuple[str, str], InputOutput]) -> Resolution:
        text = path + "".join(
            f"\n{d}\t{o}\t{io.path}\t{int(io.content_addressed)}\t"
            f"{(io.nar_hash or b'').hex()}" for (d, o), io in sorted(chosen.items()))
        fact = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
        data = facts.get("resolve", fact)
        if data is not None:
            with contextlib.suppress(ValueError, TypeError, EOFError):
                rdrv_path, kind, key, pins = marshal.loads(data)
                return Resolution(rdrv_path, TraceKey(kind, key, rdrv_path, tuple(pins)),
                                  lambda: step_key(drv, chosen).rdrv)
        res = step_key(drv, chosen)
        k = res.key
        facts.put("resolve", fact, marshal.dumps((res.rdrv_path, k.kind, k.key, tuple(k.pins))))
        return res

    return resolve
