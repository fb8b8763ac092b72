"""The gate's service, without HTTP: orchestrates each answer; decides nothing itself.

For each request it finds the step (:mod:`tracehook.gate.index`, hints from verified steps),
asks for a verdict (:mod:`tracehook.gate.verdicts`), fetches what the upstreams say
(:mod:`tracehook.gate.upstreams`), calls the pure decision (:mod:`tracehook.gate.decide`),
then signs, logs and answers:

- a realisation (``realisations/<id>.doi``, or ``build-trace-v2/<drv>/<output>.doi``) names a
  derivation output; the answer is a realisation for the verified output, signed with the
  gate's key, only if an upstream serves that path with the attested NAR hash (and
  references) and no upstream realisation for the same id points elsewhere. A resolved
  derivation (which Nix writes after resolving locally) is answered only with a value
  attested for that resolution;
- a narinfo is answered for a verified output, a fixed output whose ``CA`` matches its pin,
  or a path accepted on a cache signature: exactly the upstream narinfo that was checked,
  re-signed with the gate's key, with a ``URL`` that names the NAR: for a ``file://``
  upstream (with ``direct_nars``, the default) the NAR file itself as a ``file://`` URL, so
  Nix reads it without a round trip through the gate; else a relative ``nar/<file>`` the
  gate serves. Either way Nix checks the NAR it gets against the ``NarHash`` the gate
  signed, and refuses one that differs;
- a NAR is streamed from the upstream whose narinfo named it.

Every refusal is logged once per decision with the verifier's reason and the step; every
allowed answer gets one line saying what admitted it (:mod:`tracehook.gate.gatelog`).
Faults (an upstream, a trace store or the policy file that cannot be read) answer 502 (503
for the policy) and are never cached, never allowed. A refusal that rests on what the
binary caches hold now (a path none has, a NAR missing, a narinfo that contradicts the
traces) is never cached either: it is decided, and logged, again at every request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

from tracehook.errors import ConfigError, EnvironmentFault, ParseError, Refusal, TracehookError
from tracehook.gate import nowait
from tracehook.gate.decide import (
    NAR_URL,
    Expected,
    Fault,
    Serve,
    check_realisations,
    choose_narinfo,
    scanned_problem,
)
from tracehook.gate.gatelog import GateLog
from tracehook.gate.index import DrvIndex
from tracehook.gate.memo import DecisionCache
from tracehook.gate.upstreams import fetch_narinfos, fetch_realisations, scan_nar
from tracehook.gate.verdicts import GateVerifier, Value, Verdict
from tracehook.lru import Lru
from tracehook.nix import narinfo, realisation
from tracehook.nix.derivation import Derivation
from tracehook.nix.storepath import basename, hash_part
from tracehook.stores.binarycache import Body, FileUpstream, Upstream
from tracehook.stores.eventlog import EventLog
from tracehook.text import printable
from tracehook.trace import crypto
from tracehook.verify.decide import WEAK_HASHES

log = logging.getLogger(__name__)

ROUTES_MAX = 200_000
CHOICES_MAX = 4096


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    reason: str | None = None  # for refusals: why (also in the log)
    transient: bool = False  # rests on what the binary caches hold now: never reused
    # for an allowed path: the build step whose verdict admitted it (it rests on that
    # step's closure and on the binary caches' files it was made from)
    step: str | None = field(default=None, compare=False)

    @property
    def cacheable(self) -> bool:
        return self.status not in (502, 503) and not self.transient


@dataclass(frozen=True)
class NarAnswer:
    body: Body


NOT_FOUND = Answer(404, b"not found\n")


class GateService:
    def __init__(
        self,
        index: DrvIndex,
        verifier: GateVerifier,
        upstreams: Sequence[Upstream],
        signing_key: crypto.SecretKey | None,
        events: EventLog,
        memo: DecisionCache[Answer],
        priority: int = 30,
        weak_hashes: Callable[[], bool] = lambda: False,
        fail_on_tamper: bool = False,
        direct_nars: bool = True,
    ) -> None:
        """``fail_on_tamper``: refuse a path when tamper evidence is seen in its chain,
        even when it verifies another way (it is always logged as ``tampered``);
        ``direct_nars``: a file upstream's narinfo names its NAR by a ``file://`` URL."""
        self.index = index
        self.verifier = verifier
        self.upstreams = list(upstreams)
        self.urls = [u.url for u in self.upstreams]
        self.signing_key = signing_key
        self.events = events
        self.log = GateLog(events)
        self.memo = memo
        self.priority = priority
        self.weak_hashes = weak_hashes
        self.fail_on_tamper = fail_on_tamper
        self.direct_nars = direct_nars
        self.store_dir = index.store_dir
        self._nar_routes: Lru[str, int] = Lru(ROUTES_MAX)  # NAR URL -> upstream index
        # (generation, what the path must be) -> the upstream narinfo chosen for it: a
        # realisation's answer checks the narinfo Nix asks for next; only within the
        # generation, only a narinfo that was served (refusals and faults are decided again)
        self._choices: Lru[tuple[object, ...], Serve] = Lru(CHOICES_MAX)

    # --------------------------------------------------------------- nix-cache-info

    def cache_info(self) -> Answer:
        text = f"StoreDir: {self.store_dir}\nWantMassQuery: 1\nPriority: {self.priority}\n"
        return Answer(200, text.encode(), "text/x-nix-cache-info")

    def _cached(self, key: Hashable, compute: Callable[[], Answer]) -> Answer:
        try:
            gen = self.verifier.generation()
        except ConfigError as exc:  # the policy file does not parse: fail closed
            return self._policy_broken(exc)
        answer, _ = self.memo.get(
            (key, gen), compute, ttl=lambda a: self.memo.config.ttl if a.cacheable else 0.0)
        return answer

    def _policy_broken(self, exc: ConfigError) -> Answer:
        message = exc.diagnostics()
        return Answer(503, f"policy unusable, refusing everything: {message}\n".encode(),
                      reason=message)

    # ------------------------------------------------------------------ realisations

    def realisation_v1(self, rid: str) -> Answer:
        """``realisations/<id>.doi``; ``rid`` already validated by the HTTP layer."""
        found = self.index.by_realisation_id(rid)
        if found is None:
            return self._refuse_unknown(
                "realisation", rid, "no derivation in the local store has this realisation id "
                "(instantiate it first)")
        drv_path, output = found
        return self._cached(("v1", rid), lambda: self._realisation(drv_path, output, rid))

    def realisation_v2(self, drv_base: str, output: str) -> Answer:
        drv_path = f"{self.store_dir}/{drv_base}"
        if not self.index.has_drv(drv_path):
            return self._refuse_unknown(
                "realisation", f"{drv_base}^{output}",
                "this derivation is not in the local store (instantiate it first)")
        return self._cached(("v2", drv_path, output),
                            lambda: self._realisation(drv_path, output, None))

    def _step_verdict(self, drv_path: str, output: str) -> Verdict:
        """The verdict for ``drv_path``: the step a resolved derivation was looked up
        under (only values attested for it), else ``drv_path`` as a step of its own."""
        for step in self.verifier.rdrv_hints.get(drv_path) or ():
            verdict = self.verifier.verdict(step, output, rdrv_path=drv_path)
            if verdict.verified or verdict.fault:
                return verdict
        return self.verifier.verdict(drv_path, output)

    def _realisation(self, drv_path: str, output: str, rid: str | None) -> Answer:
        request = rid or realisation.build_trace_id(basename(drv_path), output)
        try:
            verdict = self._step_verdict(drv_path, output)
            if verdict.fault:
                return self._fault("realisation", request, drv_path, verdict.fault)
            if not verdict.values:
                raise _refusal(verdict, output)
            self._tamper_check("realisation", request, verdict)
            chosen = self._serve_for(verdict, verdict.values)
            if isinstance(chosen, Fault):
                return self._fault("realisation", request, drv_path, chosen.message)
            if isinstance(chosen, Refusal):
                raise chosen
            value, _ = chosen
            refusal = check_realisations(
                value.path, output,
                fetch_realisations(self.upstreams, drv_path, output, rid), verdict.drv_path,
                self.store_dir)
            if refusal is not None:
                raise refusal
        except Refusal as exc:
            return self._refuse("realisation", request, drv_path, exc)
        except EnvironmentFault as exc:  # an upstream, trace store or the local store
            return self._fault("realisation", request, drv_path, exc.diagnostics())
        except TracehookError as exc:  # e.g. a local .drv that does not parse
            return self._refuse("realisation", request, drv_path, Refusal(exc.diagnostics()))
        body = self._render_realisation(drv_path, output, rid, value.path)
        self.log.allowed_realisation(request, drv_path, output, value, verdict)
        return Answer(200, body, "application/json", step=verdict.drv_path)

    def _serve_for(self, verdict: Verdict, values: Sequence[Value]
                   ) -> tuple[Value, Serve] | Refusal | Fault:
        """The first verified value an upstream serves as attested."""
        refusal: Refusal | None = None
        fault: Fault | None = None
        pinned: Expected | None = None  # a fixed output: what its .drv pins, whatever the value
        if verdict.basis == "fixed":  # (as the narinfo path checks it)
            fixed = self._fixed(verdict.drv_path,
                                self.index.reader.read_derivation(verdict.drv_path))
            if isinstance(fixed, Refusal):
                return Refusal(fixed.reason, verdict.drv_path, cause=fixed.cause)
            pinned = fixed[0]
        for value in values:
            expected = pinned if pinned is not None else _expected(verdict, value)
            if value.conflict:
                refusal = refusal or Refusal(
                    f"{value.path}: the trusted claims attest different references",
                    verdict.drv_path)
                continue
            decision = self._choose(expected, verdict)
            if isinstance(decision, Serve):
                return value, decision
            if isinstance(decision, Fault):
                fault = fault or decision
            else:
                refusal = refusal or decision
        if refusal is not None:
            return Refusal(refusal.reason, verdict.drv_path, cause=refusal.cause)
        assert fault is not None
        return fault

    def _choose(self, expected: Expected, verdict: Verdict | None) -> Serve | Refusal | Fault:
        """The upstream narinfo to serve for ``expected``; for a path whose claims attest no
        references, its NAR is scanned (once per NAR hash) and its References checked."""
        key = None
        if verdict is not None and expected.kind != "fixed":
            key = (verdict.generation, expected.kind, expected.step, expected.path,
                   expected.nar_hash, expected.references, expected.source)
            chosen = self._choices.get(key)
            if chosen is not None:
                return chosen
        decision = self._choose_now(expected, verdict)
        if key is not None and isinstance(decision, Serve):
            self._choices.put(key, decision)
        return decision

    def _choose_now(self, expected: Expected, verdict: Verdict | None
                    ) -> Serve | Refusal | Fault:
        decision = choose_narinfo(expected, fetch_narinfos(self.upstreams, expected.path),
                                  self.urls, self.store_dir)
        if (not isinstance(decision, Serve) or expected.kind != "verified"
                or expected.references is not None or verdict is None):
            return decision
        ni = decision.narinfo
        listed = frozenset(f"{self.store_dir}/{r}" for r in ni.references)
        direct = verdict.inputs | {v.path for v in verdict.values}
        assert expected.nar_hash is not None and ni.url is not None
        url = self.urls[decision.upstream]
        try:
            scanned = scan_nar(self.upstreams[decision.upstream], ni.url, ni.compression,
                               listed | direct, expected.nar_hash, self.verifier.facts)
        except ParseError as exc:
            return Refusal(f"{expected.path}: {url}: {exc.diagnostics()}", expected.step,
                           cause="upstream")
        if scanned is None:
            return Refusal(f"{expected.path} is not available upstream: binary cache {url} "
                           f"has no {ni.url}, the NAR its narinfo names", expected.step,
                           cause="absent")
        problem = scanned_problem(url, listed, scanned, expected.nar_hash, direct)
        return decision if problem is None else Refusal(f"{expected.path}: {problem}",
                                                        expected.step, cause="upstream")

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
            found = self._expected_for(hp)
            if found is None:
                return self._refuse_quiet(
                    "no verified step or fixed-output derivation in the local store produces "
                    "this path")
            if isinstance(found, Refusal):
                raise found
            expected, verdict = found
            subject = expected.step
            if verdict is not None:
                self._tamper_check("narinfo", request, verdict)
            decision = self._choose(expected, verdict)
            if isinstance(decision, Fault):
                return self._fault("narinfo", request, subject, decision.message)
            if isinstance(decision, Refusal):
                raise decision
        except Refusal as exc:
            return self._refuse("narinfo", request, exc.step or subject, exc)
        except EnvironmentFault as exc:
            return self._fault("narinfo", request, subject, exc.diagnostics())
        except TracehookError as exc:
            return self._refuse("narinfo", request, subject, Refusal(exc.diagnostics()))
        ni = decision.narinfo
        direct = self._direct_url(decision.upstream, ni.url)
        if direct is None and ni.url is not None and NAR_URL.fullmatch(ni.url):
            self._nar_routes.put(ni.url, decision.upstream)
        sigs: tuple[str, ...] | None = None  # (None: the upstream narinfo's own)
        if self.signing_key is not None:
            try:
                sigs = (crypto.nix_sign(self.signing_key,
                                        narinfo.fingerprint(ni, self.store_dir)),)
            except ParseError as exc:
                return self._refuse("narinfo", request, subject, Refusal(
                    f"cannot sign the narinfo of {ni.store_path}: {exc.diagnostics()}"))
        if verdict is not None:
            self.log.allowed_path(request, expected.step, ni, verdict,
                                  self.urls[decision.upstream])
        return Answer(200, narinfo.render(ni, url=direct, sigs=sigs).encode(),
                      "text/x-nix-narinfo", step=expected.step)

    def _expected_for(self, hp: str) -> tuple[Expected, Verdict | None] | Refusal | None:
        """What the path with hash part ``hp`` must be, from the first step that says
        (hints from verified steps, the local .drv files, the upstream's Deriver hint); a
        Refusal when the steps that would produce it do not verify; None when no local
        step produces it."""
        refusal: Refusal | None = None
        for step, output in self.verifier.path_hints.get(hp) or ():
            got = self._from_step(step, output, hp)
            if not isinstance(got, Refusal) and got is not None:
                return got
            refusal = refusal or got
        for drv_path, output in self.index.by_output_hash(hp):
            drv = self.index.reader.read_derivation(drv_path)
            if drv.kind == "fixed":
                return self._fixed(drv_path, drv)
            got = self._from_step(drv_path, output, hp, refuse=True)
            if not isinstance(got, Refusal) and got is not None:
                return got
            refusal = refusal or got
        if refusal is not None:
            return refusal
        return self._from_deriver(hp)

    def _fixed(self, drv_path: str, drv: Derivation) -> tuple[Expected, None] | Refusal:
        algo = drv.outputs["out"].algo
        if algo in WEAK_HASHES and not self.weak_hashes():
            return Refusal(f"fixed-output derivation pinned by {algo}, a weak hash: not a "
                           "trust anchor (policy weak-fixed-output-hashes = \"allow\")",
                           drv_path)
        return Expected("fixed", drv_path, drv.outputs["out"].path, fixed=drv), None

    def _from_step(self, step: str, output: str, hp: str, refuse: bool = False
                   ) -> tuple[Expected, Verdict] | Refusal | None:
        verdict = self.verifier.verdict(step, output)
        if verdict.fault:
            raise EnvironmentFault(verdict.fault)
        for value in verdict.values:
            if hash_part(value.path) == hp:
                if value.conflict:
                    return Refusal(f"{value.path}: the trusted claims attest different "
                                   "references", step)
                return _expected(verdict, value), verdict
        return _refusal(verdict, output) if refuse and not verdict.values else None

    def _from_deriver(self, hp: str) -> tuple[Expected, Verdict] | Refusal | None:
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
                drv = self.index.reader.read_derivation(drv_path)
            except TracehookError:
                continue
            for output in drv.outputs:
                got = self._from_step(drv_path, output, hp)
                if got is not None:
                    return got
        return None

    # -------------------------------------------------------------------------- NARs

    def _direct_url(self, upstream: int, rel: str | None) -> str | None:
        """With ``direct_nars``, a file upstream's NAR as a ``file://`` URL Nix reads itself
        (the gate checked ``rel`` against :data:`NAR_URL`); None: the gate serves it."""
        up = self.upstreams[upstream]
        if not self.direct_nars or rel is None or not isinstance(up, FileUpstream):
            return None
        return up.file_url(rel)

    def nar(self, rel: str) -> NarAnswer | Answer:
        """``nar/<file>``: from the upstream whose narinfo named it, else the first
        upstream that has it (Nix checks every NAR against the narinfo's NarHash)."""
        route = self._nar_routes.get(rel)
        order = list(range(len(self.upstreams)))
        if route is not None:
            order = [route] + [i for i in order if i != route]
        fault: EnvironmentFault | None = None
        for i in order:
            try:
                body = self.upstreams[i].open(rel)
            except EnvironmentFault as exc:
                fault = exc
                continue
            if body is not None:
                return NarAnswer(body)
        if fault is not None:
            return Answer(502, f"upstream fault: {fault.diagnostics()}\n".encode())
        self.log.nar_unavailable(rel, self.urls)
        return NOT_FOUND

    # ----------------------------------------------------------------------- logging

    def _refuse(self, kind: str, request: str, subject: str | None, exc: Refusal) -> Answer:
        self.log.refused(kind, request, subject, exc)
        return Answer(404, f"refused by tracehook gate: {printable(exc.reason)}\n".encode(),
                      reason=exc.reason, transient=exc.cause != "trust")

    def _tamper_check(self, kind: str, request: str, verdict: Verdict) -> None:
        """Tamper evidence in the chain is logged as its own event, even when the path is
        admitted another way; with ``fail_on_tamper`` it is a refusal."""
        if verdict.tampered:
            nowait.check()  # logged once: before anything that may be asked again
        self.log.tampered(kind, request, verdict, self.fail_on_tamper)
        if verdict.tampered and self.fail_on_tamper:
            step, what = verdict.tampered[0]
            raise Refusal(f"tamper evidence at {step} (--fail-on-tamper): {what}",
                          verdict.drv_path, verdict.name)

    def _refuse_unknown(self, kind: str, request: str, reason: str) -> Answer:
        self.log.refused_unknown(kind, request, reason)
        return Answer(404, b"not found\n", reason=reason)

    def _refuse_quiet(self, reason: str) -> Answer:
        """Not a refusal of anything the consumer builds: no log line (Nix probes many
        paths the local store does not know about). Never reused: it rests on what the
        gate has verified so far, and the step that makes the path may be decided next
        (its realisation asked for after this narinfo)."""
        log.debug("404: %s", reason)
        return Answer(404, b"not found\n", reason=reason, transient=True)

    def _fault(self, kind: str, request: str, subject: str | None, message: str) -> Answer:
        self.log.failed(kind, request, subject, message)
        return Answer(502, f"tracehook gate cannot decide: {printable(message)}\n".encode(),
                      reason=message)


def _expected(verdict: Verdict, value: Value) -> Expected:
    if verdict.basis == "cache":
        return Expected("cache", verdict.drv_path, value.path, value.nar_hash,
                        value.references, source=value.source)
    return Expected("verified", verdict.drv_path, value.path, value.nar_hash, value.references)


def _refusal(verdict: Verdict, output: str) -> Refusal:
    if verdict.reason is None:
        return Refusal(f"output {output!r} of {verdict.drv_path} has no verified value",
                       verdict.drv_path)
    return Refusal(verdict.reason, verdict.failed_step or verdict.drv_path, verdict.failed_name)
