"""The verified set, directly: bytes in, an accepted claim or a named rejection out.

Each row is an attack (or the honest case) on one trace key; the KeyRing must accept
exactly the honest signatures of current policy keys, and say why every other one does not
count. Then the TrustedSet's counting rules, and the rule that only verify/trusted.py
mints trust.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Callable

import pytest

from tracehook.errors import Failure
from tracehook.nix.derivation import Derivation, DerivationOutput
from tracehook.trace import jws
from tracehook.trace.claim import BuilderInfo, Claim, OutputClaim, TraceKey, sign_trace
from tracehook.trace.stepkey import Resolution
from tracehook.verify.policy import Policy, parse_policy
from tracehook.verify.trusted import Accepted, Checked, KeyRing, readmit, to_plain
from tracehook.verify.trustedset import TrustedSet
from verifyhelp import public_text, secret

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
BUILDER = BuilderInfo(1, "/nix/store", "nix", "2.26.3")
KEY = TraceKey("ca", "0" * 31 + "1", "/nix/store/" + "0" * 31 + "1-step.drv")
OTHER = TraceKey("ca", "0" * 31 + "2", "/nix/store/" + "0" * 31 + "2-step.drv")
OUT = {"out": OutputClaim("/nix/store/" + "a" * 32 + "-step", hashlib.sha256(b"x").digest())}
ALT = {"out": OutputClaim("/nix/store/" + "b" * 32 + "-step", hashlib.sha256(b"y").digest())}


def policy(extra: str = "", require: str = '"builderA"') -> Policy:
    keys = "".join(f'{n} = "{public_text(n)}"\n' for n in ("builderA", "builderB"))
    return parse_policy(f"[keys]\n{keys}{extra}[trust]\nrequire = {require}\n")


def token(signer: str = "builderA", key: TraceKey = KEY,
          outputs: dict[str, OutputClaim] = OUT) -> str:
    return sign_trace(secret(signer), key, outputs, BUILDER, "step")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tampered() -> str:
    header, payload, sig = token().split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["out"]["nix"]["out"]["path"] = ALT["out"].path
    return f"{header}.{_b64(json.dumps(body).encode())}.{sig}"


def alg_none() -> str:
    _, payload, _ = token().split(".")
    header = {"alg": "none", "kid": jws.kid_of(jws.parse_compact(token()))}
    return f"{_b64(json.dumps(header).encode())}.{payload}."


def truncated_signature() -> str:
    header, payload, sig = token().split(".")
    return f"{header}.{payload}.{sig[:-8]}"


REVOKED = '[keys.retired]\nkey = "{}"\nrevoked = true\n'
EXPIRED = '[keys.old]\nkey = "{}"\nnot-after = 2026-01-01T00:00:00Z\n'

# (attack, policy, tokens, accepted signers, rejection kinds)
CASES: list[tuple[str, Callable[[], Policy], Callable[[], list[str]], list[str], list[str]]] = [
    ("honest-signature", policy, lambda: [token()], ["builderA"], []),
    ("two-signers-one-untrusted", policy, lambda: [token(), token("builderC")],
     ["builderA"], ["unknown-key"]),
    ("same-token-twice-counts-once", policy, lambda: [token(), token()], ["builderA"], []),
    ("tampered-payload", policy, lambda: [tampered()], [], ["bad-signature"]),
    ("alg-none-with-a-trusted-kid", policy, lambda: [alg_none()], [], ["bad-signature"]),
    ("truncated-signature", policy, lambda: [truncated_signature()], [], ["malformed"]),
    ("not-a-jws", policy, lambda: ["not.a.jws"], [], ["malformed"]),
    ("claim-filed-under-another-step", policy, lambda: [token(key=OTHER)], [],
     ["other-step"]),
    ("revoked-key", lambda: policy(REVOKED.format(public_text("retired"))),
     lambda: [token("retired")], [], ["revoked-key"]),
    ("expired-key", lambda: policy(EXPIRED.format(public_text("old"))),
     lambda: [token("old")], [], ["expired-key"]),
]


@pytest.mark.parametrize(("attack", "make_policy", "tokens", "signers", "rejections"), CASES,
                         ids=[c[0] for c in CASES])
def test_key_ring(attack: str, make_policy: Callable[[], Policy],
                  tokens: Callable[[], list[str]], signers: list[str],
                  rejections: list[str]) -> None:
    ring = KeyRing(make_policy(), NOW)
    checked = ring.check(tokens(), KEY)
    assert [a.signer for a in checked.accepted] == signers
    assert [r.kind for r in checked.rejected] == rejections
    for acc in checked.accepted:
        assert acc.claim.outputs == OUT and (acc.claim.kind, acc.claim.key) == ("ca", KEY.key)
    for rej in checked.rejected:
        assert rej.detail and "\n" not in rej.detail


def test_only_the_trusted_set_mints() -> None:
    claim = Claim("ca", KEY.key, OUT, "builderA:0", token())
    with pytest.raises(TypeError, match=r"minted only by tracehook\.verify\.trusted"):
        Accepted("builderA", claim)
    with pytest.raises(TypeError, match="minted only"):
        Checked((), (), 0)


@pytest.mark.parametrize("forgery", ["signer-not-in-policy", "signer-renamed", "other-step"])
def test_readmit_rechecks_what_it_can(forgery: str) -> None:
    """A checker process's answer re-enters only through readmit, which checks that the
    signer is a current key of this policy and that the claim is for the key asked."""
    ring = KeyRing(policy(), NOW)
    claims, rejected, seen, evidence_seen = to_plain(ring.check([token()], KEY))
    [(signer, compact, (kind, key, kid, outputs), evidence)] = claims
    if forgery == "signer-not-in-policy":
        claims = ((signer, compact, (kind, key, "mallory:0123456789abcdef", outputs), evidence),)
    elif forgery == "signer-renamed":
        claims = (("builderB", compact, (kind, key, kid, outputs), evidence),)
    else:
        claims = ((signer, compact, (kind, OTHER.key, kid, outputs), evidence),)
    with pytest.raises(ValueError, match="checker answered"):
        readmit((claims, rejected, seen, evidence_seen), KEY, ring)
    assert readmit(to_plain(ring.check([token()], KEY)), KEY, ring).accepted[0].signer == \
        "builderA"


def _drv() -> Derivation:
    out = DerivationOutput("", "r:sha256", "")
    return Derivation({"out": out}, {}, (), "x86_64-linux", "/bin/sh", (), {"name": "step"})


def _record(trusted: TrustedSet, ring: KeyRing, tokens: list[str]) -> None:
    res = Resolution(KEY.rdrv_path, KEY, _drv)
    trusted.add_step("/nix/store/" + "c" * 32 + "-step.drv", _drv(),
                     [(res, ring.check(tokens, KEY))])


STEP = "/nix/store/" + "c" * 32 + "-step.drv"
OUTS = frozenset({"out"})


@pytest.mark.parametrize(("case", "require", "tokens", "verified", "failure"), [
    ("one-of-one", '"builderA"', lambda: [token()], [OUT], None),
    ("two-of-two-met", '{ all-of = ["builderA", "builderB"] }',
     lambda: [token(), token("builderB")], [OUT], None),
    ("two-of-two-one-signer", '{ all-of = ["builderA", "builderB"] }',
     lambda: [token()], [], "threshold"),
    ("two-of-two-disagree", '{ all-of = ["builderA", "builderB"] }',
     lambda: [token(), token("builderB", outputs=ALT)], [], "disagree"),
    ("any-of-disagree-both-verified", '{ any-of = ["builderA", "builderB"] }',
     lambda: [token(), token("builderB", outputs=ALT)], [OUT, ALT], None),
    ("no-trace", '"builderA"', lambda: [], [], "no-trace"),
    ("only-untrusted", '"builderA"', lambda: [token("builderC")], [], "no-trusted-claim"),
])
def test_trusted_set_counts_signers_per_value(
    case: str, require: str, tokens: Callable[[], list[str]],
    verified: list[dict[str, OutputClaim]], failure: str | None,
) -> None:
    p = policy(require=require)
    trusted = TrustedSet(p.require)
    _record(trusted, KeyRing(p, NOW), tokens())
    values = trusted.values(STEP, OUTS)
    assert [dict(c.value) for c in values] == verified
    if failure is None:
        assert values
    else:
        why = trusted.explain(STEP, OUTS)
        assert isinstance(why, Failure) and why.kind == failure, why


def test_a_resolution_is_answered_only_with_a_value_attested_for_it() -> None:
    """Builders diverged on an input: A attests R1 -> Y1, B attests R2 -> Y2 (any-of).
    A question about R1 gets Y1 only, never Y2."""
    p = policy(require='{ any-of = ["builderA", "builderB"] }')
    ring, trusted = KeyRing(p, NOW), TrustedSet(p.require)
    r1 = Resolution(KEY.rdrv_path, KEY, _drv)
    r2 = Resolution(OTHER.rdrv_path, OTHER, _drv)
    trusted.add_step(STEP, _drv(), [(r1, ring.check([token()], KEY)),
                                    (r2, ring.check([token("builderB", OTHER, ALT)], OTHER))])
    assert len(trusted.values(STEP, OUTS)) == 2
    assert [dict(c.value) for c in trusted.values_for_resolution(STEP, OUTS, KEY.rdrv_path)] \
        == [OUT]
    assert [dict(c.value) for c in trusted.values_for_resolution(STEP, OUTS,
                                                                 OTHER.rdrv_path)] == [ALT]


@pytest.mark.parametrize(("case", "outputs", "problem"), [
    ("an-output-the-derivation-lacks",
     {**OUT, "dev": OutputClaim("/nix/store/" + "d" * 32 + "-step-dev", OUT["out"].nar_hash)},
     "claims output 'dev', which the derivation does not have"),
    ("a-path-named-after-another-step",
     {"out": OutputClaim("/nix/store/" + "a" * 32 + "-other", OUT["out"].nar_hash)},
     "which is not named after this derivation"),
])
def test_a_claim_whose_outputs_cannot_be_the_steps_is_tamper_evidence(
        case: str, outputs: dict[str, OutputClaim], problem: str) -> None:
    """A validly signed claim that names outputs the step cannot have is rejected as
    wrong-output (tamper evidence), and counts for nothing."""
    p = policy()
    trusted = TrustedSet(p.require)
    _record(trusted, KeyRing(p, NOW), [token(outputs=outputs)])
    assert trusted.values(STEP, OUTS) == []
    [rejected] = trusted.rejected(STEP)
    assert rejected.kind == "wrong-output" and problem in rejected.detail, rejected
    assert any(problem in seen for seen in trusted.sightings(STEP))


REF_A = ("/nix/store/" + "g" * 32 + "-dep",)
REF_B = ("/nix/store/" + "f" * 32 + "-dep",)


def _with_refs(refs: tuple[str, ...] | None, base: dict[str, OutputClaim] = OUT
               ) -> dict[str, OutputClaim]:
    return {"out": OutputClaim(base["out"].path, base["out"].nar_hash, refs)}


@pytest.mark.parametrize(("case", "tokens", "attested"), [
    ("one-signer", lambda: [token(outputs=_with_refs(REF_A))], (REF_A, False)),
    ("two-agree", lambda: [token(outputs=_with_refs(REF_A)),
                           token("builderB", outputs=_with_refs(REF_A))], (REF_A, False)),
    ("two-differ", lambda: [token(outputs=_with_refs(REF_B)),
                            token("builderB", outputs=_with_refs(REF_A))], (REF_B, True)),
    ("one-says-none", lambda: [token(outputs=_with_refs(None)),
                               token("builderB", outputs=_with_refs(REF_B))], (REF_B, False)),
    ("none-say", lambda: [token(), token("builderB")], (None, False)),
    ("another-value's-references-do-not-count",
     lambda: [token(outputs=_with_refs(REF_A)),
              token("builderB", outputs=_with_refs(REF_B, ALT))], (REF_A, False)),
])
def test_the_references_attested_for_a_value(
        case: str, tokens: Callable[[], list[str]],
        attested: tuple[tuple[str, ...] | None, bool]) -> None:
    """What the gate checks a narinfo's References against: the references the accepted
    claims of that value (same path and NAR hash) attest, and whether two disagree."""
    p = policy(require='{ any-of = ["builderA", "builderB"] }')
    trusted = TrustedSet(p.require)
    _record(trusted, KeyRing(p, NOW), tokens())
    assert trusted.attested_references(STEP, "out", OUT["out"]) == attested
