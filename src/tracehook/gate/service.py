"""The gate's decisions, without HTTP: what to answer for a realisation, a narinfo, a NAR.

- A realisation (``realisations/<id>.doi``, or ``build-trace-v2/<drv>/<output>.doi``) names a
  derivation output. The id is mapped to a local .drv (:mod:`tracehook.gate.index`); the
  build step's chain is verified (:mod:`tracehook.gate.verdicts`); the answer is a
  realisation for the verified output, signed with the gate's key, and only if an upstream
  serves that path with the NAR hash the traces attest and no upstream realisation for the
  same id points elsewhere. Resolved derivations (which Nix writes after resolving locally)
  are mapped back to the step the gate verified, or verified on their own.
- A narinfo is answered only for the verified output of a verified step whose ``NarHash``
  equals the attested NAR hash, or for a fixed-output derivation's output whose ``CA`` field
  pins the content the .drv names; re-signed with the gate's key when it has one.
- A NAR is streamed from the upstream that served its narinfo.

Every refusal is logged once per decision with the verifier's reason and the step; every
allowed answer gets one summary line. Faults (an upstream or trace store that cannot be
read) answer 502 and are never cached, never allowed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from tracehook.errors import EnvironmentFault, ParseError, Refusal, TracehookError, UpstreamFault
from tracehook.gate.index import DrvIndex
from tracehook.gate.memo import DecisionCache
from tracehook.gate.upstreams import check_upstream_realisation, find_fixed, find_narinfo
from tracehook.gate.verdicts import ChainVerifier, StepValues, Verdict
from tracehook.nix import narinfo, realisation
from tracehook.nix.derivation import Derivation
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import basename, hash_part, path_name
from tracehook.stores.binarycache import Body, Upstream
from tracehook.stores.eventlog import EventLog
from tracehook.trace import crypto
from tracehook.trace.claim import OutputClaim

log = logging.getLogger(__name__)

NAR_URL = re.compile(r"nar/[0-9a-z]{1,128}\.nar(\.(xz|bz2|zst|zstd|lz4|lzip|br|gz))?")
HINTS_MAX = 200_000


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    reason: str | None = None  # for refusals: why (also in the log)

    @property
    def cacheable(self) -> bool:
        return self.status != 502


@dataclass(frozen=True)
class NarAnswer:
    body: Body


NOT_FOUND = Answer(404, b"not found\n")


class _Lru:
    """A small bounded map for hints (they only point at what to re-verify)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, value: str) -> None:
        with self._lock:
            old = self._d.pop(key, ())
            self._d[key] = tuple(dict.fromkeys((value, *old)))[:8]
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def get(self, key: str) -> tuple[str, ...]:
        with self._lock:
            return self._d.get(key, ())


class GateCore:
    def __init__(
        self,
        index: DrvIndex,
        verifier: ChainVerifier,
        upstreams: Sequence[Upstream],
        signing_key: crypto.SecretKey | None,
        events: EventLog,
        cache: DecisionCache[Answer],
        verdicts: DecisionCache[Verdict],
        priority: int = 30,
    ) -> None:
        self.index = index
        self.verifier = verifier
        self.upstreams = list(upstreams)
        self.signing_key = signing_key
        self.events = events
        self.cache = cache
        self.verdicts = verdicts
        self.priority = priority
        self.store_dir = index.store_dir
        self._path_hints = _Lru(HINTS_MAX)  # output hash part -> drv paths that made it
        self._rdrv_hints = _Lru(HINTS_MAX)  # resolved drv path -> step drv path
        self._nar_routes: OrderedDict[str, int] = OrderedDict()
        self._routes_lock = threading.Lock()

    # --------------------------------------------------------------- nix-cache-info

    def cache_info(self) -> Answer:
        text = f"StoreDir: {self.store_dir}\nWantMassQuery: 1\nPriority: {self.priority}\n"
        return Answer(200, text.encode(), "text/x-nix-cache-info")

    # --------------------------------------------------------------------- verdicts

    def verdict(self, drv_path: str) -> Verdict:
        gen = self.verifier.generation()
        verdict, fresh = self.verdicts.get(
            ("verdict", gen, drv_path),
            lambda: self.verifier.verify(drv_path),
            ttl=lambda v: 0.0 if v.fault else self.verdicts.config.ttl,
        )
        if fresh:
            for step in verdict.steps.values():
                for rdrv in step.rdrv_paths:
                    self._rdrv_hints.add(rdrv, step.drv_path)
                for values in step.outputs.values():
                    for oc in values:
                        self._path_hints.add(hash_part(oc.path), step.drv_path)
        return verdict

    def _step(self, drv_path: str) -> tuple[Verdict, StepValues | None, str]:
        """The verified step for ``drv_path`` (an original or a resolved derivation)."""
        for step_drv in self._rdrv_hints.get(drv_path):
            verdict = self.verdict(step_drv)
            step = verdict.step(step_drv)
            if step is not None and drv_path in step.rdrv_paths:
                return verdict, step, step_drv
        verdict = self.verdict(drv_path)
        return verdict, verdict.step(drv_path), drv_path

    def _cached(self, key: Hashable, compute: Callable[[], Answer]) -> Answer:
        gen = self.verifier.generation()
        answer, _ = self.cache.get(
            (key, gen), compute, ttl=lambda a: self.cache.config.ttl if a.cacheable else 0.0
        )
        return answer

    # ------------------------------------------------------------------ realisations

    def realisation_v1(self, rid: str) -> Answer:
        """``realisations/<id>.doi``; ``rid`` already validated by the HTTP layer."""
        found = self.index.by_realisation_id(rid)
        if found is None:
            return self._refuse_uncached(
                "realisation", rid, "no derivation in the local store has this realisation id "
                "(instantiate it first)")
        drv_path, output = found
        return self._cached(("v1", rid), lambda: self._realisation(drv_path, output, rid))

    def realisation_v2(self, drv_base: str, output: str) -> Answer:
        drv_path = f"{self.store_dir}/{drv_base}"
        if not self.index.has_drv(drv_path):
            return self._refuse_uncached(
                "realisation", f"{drv_base}^{output}",
                "this derivation is not in the local store (instantiate it first)")
        return self._cached(("v2", drv_path, output),
                            lambda: self._realisation(drv_path, output, None))

    def _realisation(self, drv_path: str, output: str, rid: str | None) -> Answer:
        request = rid or realisation.build_trace_id(basename(drv_path), output)
        try:
            verdict, step, step_drv = self._step(drv_path)
            if verdict.fault:
                return self._fault("realisation", request, drv_path, verdict.fault)
            values = step.outputs.get(output) if step else None
            if not values:
                raise self._verdict_refusal(verdict, drv_path, output)
            chosen, ni_reason = None, None
            for oc in values:
                try:
                    find_narinfo(self.upstreams, oc.path, oc.nar_hash)
                except Refusal as exc:
                    ni_reason = ni_reason or exc.reason
                    continue
                chosen = oc
                break
            if chosen is None:
                raise Refusal(f"{output}: the verified output is not available upstream: "
                               f"{ni_reason}", step_drv)
            check_upstream_realisation(self.upstreams, drv_path, output, rid, chosen.path,
                                       step_drv, self.store_dir)
        except Refusal as exc:
            return self._refuse("realisation", request, drv_path, exc)
        except EnvironmentFault as exc:  # an upstream, trace store or the local store
            return self._fault("realisation", request, drv_path, exc.diagnostics())
        except TracehookError as exc:  # e.g. a local .drv that does not parse
            return self._refuse("realisation", request, drv_path, Refusal(exc.diagnostics()))
        assert step is not None
        body = self._render_realisation(drv_path, output, rid, chosen.path)
        self._allow("realisation", request, drv_path, output, chosen, verdict, step)
        return Answer(200, body, "application/json")

    def _render_realisation(
        self, drv_path: str, output: str, rid: str | None, path: str
    ) -> bytes:
        if rid is not None:
            r = realisation.Realisation(rid, basename(path))
            if self.signing_key is not None:
                sig = crypto.nix_sign(self.signing_key, realisation.fingerprint_v1(r))
                r = replace(r, signatures=(sig,))
            return realisation.render_doi_v1(r).encode()
        r = realisation.Realisation(
            realisation.build_trace_id(basename(drv_path), output), basename(path))
        if self.signing_key is not None:
            fp = realisation.fingerprint_v2(basename(drv_path), output, basename(path))
            r = replace(r, signatures=(crypto.nix_sign(self.signing_key, fp),))
        return realisation.render_doi_v2(r).encode()

    # ----------------------------------------------------------------------- narinfos

    def narinfo(self, hp: str) -> Answer:
        return self._cached(("narinfo", hp), lambda: self._narinfo(hp))

    def _narinfo(self, hp: str) -> Answer:
        request = f"{hp}.narinfo"
        subject: str | None = None
        try:
            expected = self._expected_for(hp)
            if expected is None:
                return self._refuse_quiet(
                    "no verified step or fixed-output derivation in the local store produces "
                    "this path")
            kind, subject, path, want = expected
            if isinstance(want, Refusal):
                raise want
            up_index, ni = (find_fixed(self.upstreams, path, want) if isinstance(want, Derivation)
                            else find_narinfo(self.upstreams, path, want))
        except Refusal as exc:
            return self._refuse("narinfo", request, exc.step or subject, exc)
        except EnvironmentFault as exc:
            return self._fault("narinfo", request, subject, exc.diagnostics())
        except TracehookError as exc:
            return self._refuse("narinfo", request, subject, Refusal(exc.diagnostics()))
        if ni.url is not None and NAR_URL.fullmatch(ni.url):
            with self._routes_lock:
                self._nar_routes[ni.url] = up_index
                self._nar_routes.move_to_end(ni.url)
                while len(self._nar_routes) > HINTS_MAX:
                    self._nar_routes.popitem(last=False)
        if self.signing_key is not None:
            try:
                sig = crypto.nix_sign(self.signing_key, narinfo.fingerprint(ni, self.store_dir))
            except ParseError as exc:
                return self._refuse("narinfo", request, subject, Refusal(
                    f"cannot sign the narinfo of {ni.store_path}: {exc.diagnostics()}"))
            ni = replace(ni, sigs=(sig,))
        if kind == "verified":
            self._allow_path(request, subject, ni)
        return Answer(200, narinfo.render(ni).encode(), "text/x-nix-narinfo")

    def _expected_for(
        self, hp: str
    ) -> tuple[str, str, str, bytes | Derivation | Refusal] | None:
        """What the path with hash part ``hp`` must be: ("verified", drv, path, NAR hash),
        ("fixed", drv, path, drv), ("refused", drv, path, why), or None (unknown)."""
        refusal: tuple[str, str, str, bytes | Derivation | Refusal] | None = None
        for drv_path in self._path_hints.get(hp):
            got = self._expect_from_step(drv_path, hp)
            if got is not None and got[0] != "refused":
                return got
            refusal = refusal or got
        for drv_path, output in self.index.by_output_hash(hp):
            drv = self.index.reader.read_derivation(drv_path)
            out = drv.outputs[output]
            if drv.kind == "fixed":
                return ("fixed", drv_path, out.path, drv)
            got = self._expect_from_step(drv_path, hp)
            if got is not None and got[0] != "refused":
                return got
            if got is None:  # the verifier did not verify this step: say why
                verdict = self.verdict(drv_path)
                if verdict.fault:
                    raise UpstreamFault(verdict.fault)
                got = ("refused", drv_path, out.path,
                       self._verdict_refusal(verdict, drv_path, output))
            refusal = refusal or got
        if refusal is not None:
            return refusal
        return self._expect_from_deriver(hp)

    def _expect_from_step(
        self, step_drv: str, hp: str
    ) -> tuple[str, str, str, bytes | Derivation | Refusal] | None:
        verdict, step, _ = self._step(step_drv)
        if verdict.fault:
            raise UpstreamFault(verdict.fault)
        if step is None:
            return None
        for values in step.outputs.values():
            for oc in values:
                if hash_part(oc.path) == hp:
                    return ("verified", step.drv_path, oc.path, oc.nar_hash)
        return None

    def _expect_from_deriver(
        self, hp: str
    ) -> tuple[str, str, str, bytes | Derivation | Refusal] | None:
        """After a restart the gate may not know a content-addressed path yet: the upstream
        narinfo's (unsigned, untrusted) Deriver says which local derivation to verify."""
        for up in self.upstreams:
            data = up.get(f"{hp}.narinfo")
            if data is None:
                continue
            try:
                ni = narinfo.parse(data.decode("utf-8", errors="replace"))
            except ParseError:
                continue
            if not ni.deriver:
                continue
            drv_path = f"{self.store_dir}/{ni.deriver}"
            try:
                if not self.index.has_drv(drv_path):
                    continue
            except TracehookError:
                continue
            got = self._expect_from_step(drv_path, hp)
            if got is not None:
                return got
        return None

    # -------------------------------------------------------------------------- NARs

    def nar(self, rel: str) -> NarAnswer | Answer:
        """``nar/<file>``: from the upstream that served the narinfo naming it, else the
        first upstream that has it (Nix checks every NAR against the narinfo's NarHash)."""
        with self._routes_lock:
            route = self._nar_routes.get(rel)
        order = list(range(len(self.upstreams)))
        if route is not None:
            order = [route] + [i for i in order if i != route]
        fault: UpstreamFault | None = None
        for i in order:
            try:
                body = self.upstreams[i].open(rel)
            except UpstreamFault as exc:
                fault = exc
                continue
            if body is not None:
                return NarAnswer(body)
        if fault is not None:
            return Answer(502, f"upstream fault: {fault.diagnostics()}\n".encode())
        return NOT_FOUND

    # ----------------------------------------------------------------------- logging

    def _verdict_refusal(self, verdict: Verdict, drv_path: str, output: str) -> Refusal:
        if verdict.verified or verdict.reason is None:
            return Refusal(f"output {output!r} of {drv_path} has no verified value", drv_path)
        return Refusal(verdict.reason, verdict.failed_step or drv_path, verdict.failed_name)

    def _refuse(
        self, kind: str, request: str, subject: str | None, exc: Refusal
    ) -> Answer:
        step = exc.step or subject
        name = exc.name or (path_name(step).removesuffix(".drv") if step else None)
        self.events.emit(
            "gate", "refused",
            f"refused {kind} {request}: step {name or '?'}: {exc.reason}",
            reason=exc.reason, request=kind, id=request, drv=step, name=name,
            target=subject,
        )
        return Answer(404, b"refused by tracehook gate\n", reason=exc.reason)

    def _refuse_uncached(self, kind: str, request: str, reason: str) -> Answer:
        self.events.emit("gate", "refused", f"refused {kind} {request}: {reason}",
                         reason=reason, request=kind, id=request, drv=None, name=None)
        return Answer(404, b"not found\n", reason=reason)

    def _refuse_quiet(self, reason: str) -> Answer:
        """Not a refusal of anything the consumer builds: no log line (Nix probes many
        paths the local store does not know about)."""
        log.debug("404: %s", reason)
        return Answer(404, b"not found\n", reason=reason)

    def _fault(self, kind: str, request: str, subject: str | None, message: str) -> Answer:
        self.events.emit(
            "gate", "failed", f"cannot decide {kind} {request}: {message} (answered 502)",
            reason=message, request=kind, id=request, drv=subject,
            name=path_name(subject).removesuffix(".drv") if subject else None,
        )
        return Answer(502, f"upstream fault: {message}\n".encode(), reason=message)

    def _allow_path(self, request: str, drv_path: str, ni: NarInfo) -> None:
        name = path_name(drv_path).removesuffix(".drv")
        verdict = self.verdict(drv_path)
        note = _cache_note(verdict)
        self.events.emit(
            "gate", "allowed", f"allowed {ni.store_path} (output of {name}, verified chain)"
            + (f"; WARNING: {note}" if note else ""),
            reason=None, request="narinfo", id=request, drv=drv_path, name=name,
            path=ni.store_path, nar_hash=ni.nar_hash,
            cache_signed=list(verdict.cache_signed), covered_without_traces=verdict.covered,
            note=note,
        )

    def _allow(
        self, kind: str, request: str, drv_path: str, output: str, oc: OutputClaim,
        verdict: Verdict, step: StepValues,
    ) -> None:
        signers = sorted(set().union(*(s.signers for s in verdict.steps.values())))
        note = _cache_note(verdict)
        self.events.emit(
            "gate", "allowed",
            f"allowed {path_name(drv_path).removesuffix('.drv')}^{output} -> {oc.path}: "
            f"chain of {len(verdict.steps)} verified step(s), signed by {', '.join(signers)}"
            + (f"; WARNING: {note}" if note else ""),
            reason=None, request=kind, id=request, drv=drv_path,
            name=step.name, output=output, path=oc.path, nar_hash=format_nar_hash(oc.nar_hash),
            steps=len(verdict.steps), signers=signers,
            cache_signed=list(verdict.cache_signed), covered_without_traces=verdict.covered,
            note=note,
        )



def _cache_note(verdict: Verdict) -> str | None:
    """What an allowed answer relied on a cache signature for, said loudly; or None."""
    if not verdict.cache_signed:
        return None
    return (f"accepted on a cache signature alone: {', '.join(verdict.cache_signed)}; "
            f"{verdict.covered} build step(s) below them covered without traces")
