"""The trust policy file: evaluation, and every configuration mistake named (one line)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tracehook.errors import ConfigError
from tracehook.verify.policy import (
    NO_TRACES,
    Key,
    Threshold,
    evaluate,
    load_policy,
    model_keys,
    parse_policy,
)
from verifyhelp import public_text

A, B, C = public_text("builderA"), public_text("builderB"), public_text("builderC")
KEYS = f'[keys]\nbuilderA = "{A}"\nbuilderB = "{B}"\nbuilderC = "{C}"\n'
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CK = public_text("cache-1")
NK = f'{{ narinfo-key = "{CK}" }}'


def policy(require: str, keys: str = KEYS) -> str:
    return f"{keys}[trust]\nrequire = {require}\n"


# name, require, signers, satisfied, missing
EVALUATION = [
    ("single-key", '"builderA"', {"builderA"}, True, set()),
    ("single-key-other-signer", '"builderA"', {"builderB"}, False, {"builderA"}),
    ("2-of-3", '{ threshold = 2, of = ["builderA", "builderB", "builderC"] }',
     {"builderA", "builderC"}, True, {"builderB"}),
    ("2-of-3-one-signer", '{ threshold = 2, of = ["builderA", "builderB", "builderC"] }',
     {"builderC"}, False, {"builderA", "builderB"}),
    ("me-and-one-cache", '{ all-of = ["builderA", { any-of = ["builderB", "builderC"] }] }',
     {"builderA", "builderC"}, True, {"builderB"}),
    ("me-and-one-cache-without-me",
     '{ all-of = ["builderA", { any-of = ["builderB", "builderC"] }] }',
     {"builderB", "builderC"}, False, {"builderA"}),
    ("shared-key-under-any-of-is-fine",
     '{ any-of = [{ all-of = ["builderA", "builderB"] }, '
     '{ all-of = ["builderA", "builderC"] }] }',
     {"builderA", "builderC"}, True, {"builderB"}),
]


@pytest.mark.parametrize(("name", "require", "signers", "ok", "missing"), EVALUATION,
                         ids=[e[0] for e in EVALUATION])
def test_evaluation(name: str, require: str, signers: set[str], ok: bool,
                    missing: set[str]) -> None:
    p = parse_policy(policy(require))
    result = evaluate(p.require, frozenset(signers))
    assert result.satisfied is ok
    assert result.missing == missing
    assert result.signed == frozenset(signers) & model_keys(p.require)
    assert bool(result) is ok
    assert ("not met" in result.explain()) is not ok


def test_forms_become_thresholds() -> None:
    p = parse_policy(policy('{ all-of = ["builderA", { any-of = ["builderB", "builderC"] }] }'))
    assert p.require == Threshold(2, (Key("builderA"), Threshold(1, (Key("builderB"),
                                                                       Key("builderC")))))
    assert p.require.describe() == "all of (builderA, any of (builderB, builderC))"


# name, policy text, text in the error
MISTAKES = [
    ("empty-of", policy('{ threshold = 1, of = [] }'), "non-empty list"),
    ("empty-all-of", policy("{ all-of = [] }"), "non-empty list"),
    ("empty-any-of", policy("{ any-of = [] }"), "non-empty list"),
    ("unknown-key-name", policy('"builderZ"'), "names key 'builderZ', which [keys] does not"),
    ("threshold-zero", policy('{ threshold = 0, of = ["builderA"] }'), "must be 1 to 1"),
    ("threshold-too-high", policy('{ threshold = 3, of = ["builderA", "builderB"] }'),
     "threshold 3 is out of range"),
    ("threshold-not-int", policy('{ threshold = "2", of = ["builderA", "builderB"] }'),
     "integer 'threshold = N'"),
    ("same-key-under-two-names",
     policy('"builderA"', f'[keys]\nbuilderA = "{A}"\nalias = "{A}"\n'),
     "already listed as 'builderA'"),
    ("key-twice-in-threshold", policy('{ threshold = 2, of = ["builderA", "builderA"] }'),
     "appears twice"),
    ("key-in-two-branches-of-all-of",
     policy('{ all-of = ["builderA", { any-of = ["builderA", "builderB"] }] }'),
     "one signer would count twice"),
    ("name-twice-in-toml", policy('"builderA"', f'[keys]\nbuilderA = "{A}"\nbuilderA = "{B}"\n'),
     "not valid TOML"),
    ("same-key-name-two-keys",
     policy('"x"', f'[keys]\nx = "{A}"\ny = "builderA:{B.split(":")[1]}"\n'),
     "key name 'builderA' is already used"),
    ("malformed-key-no-colon", policy('"builderA"', '[keys]\nbuilderA = "abc"\n'), "no ':'"),
    ("malformed-key-base64", policy('"builderA"', '[keys]\nbuilderA = "builderA:!!"\n'),
     "not valid base64"),
    ("secret-key-given", policy('"builderA"', f'[keys]\nbuilderA = "{A}{A.split(":")[1]}"\n'),
     "public key"),
    ("date-without-zone",
     policy('"builderA"',
            f'[keys]\nbuilderA = {{ key = "{A}", not-after = 2027-06-01T00:00:00 }}\n'),
     "has no time zone"),
    ("date-as-string",
     policy('"builderA"', f'[keys]\nbuilderA = {{ key = "{A}", not-after = "2027-06-01" }}\n'),
     "must be a TOML date"),
    ("revoked-not-bool",
     policy('"builderA"', f'[keys]\nbuilderA = {{ key = "{A}", revoked = "yes" }}\n'),
     "true or false"),
    ("unknown-key-field",
     policy('"builderA"', f'[keys]\nbuilderA = {{ key = "{A}", expires = 1 }}\n'),
     "unknown field 'expires'"),
    ("no-trust", KEYS, "[trust] table"),
    ("no-keys", '[trust]\nrequire = "builderA"\n', "[keys] table"),
    ("two-forms", policy('{ all-of = ["builderA"], any-of = ["builderB"] }'), "exactly one"),
    ("threshold-with-all-of", policy('{ threshold = 1, all-of = ["builderA"] }'),
     "takes no 'threshold'"),
    ("unknown-top-level", "trust_me = true\n" + policy('"builderA"'), "unknown top-level"),
    ("traces-not-list", 'traces = "file:///x"\n' + policy('"builderA"'), "list of trace"),
    # a cache signature is only ever an alternative to the whole trace requirement
    ("narinfo-key-under-all-of", policy(f'{{ all-of = ["builderA", {NK}] }}'),
     "can only be an alternative to the whole trace requirement, not a part of a quorum"),
    ("narinfo-key-under-threshold-2",
     policy(f'{{ threshold = 2, of = ["builderA", "builderB", {NK}] }}'),
     "not a part of a quorum"),
    ("narinfo-key-nested-under-any-of",
     policy(f'{{ any-of = ["builderA", {{ any-of = ["builderB", {NK}] }}] }}'),
     "require.any-of[1].any-of[1]: a narinfo-key is allowed only"),
    ("narinfo-key-under-all-of-alone", policy(f"{{ all-of = [{NK}] }}"), "not a part of a quorum"),
    ("narinfo-key-twice", policy(f"{{ any-of = [{NK}, {NK}] }}"), "listed twice"),
    ("narinfo-key-malformed", policy('{ narinfo-key = "cache-1" }'), "no ':'"),
    ("narinfo-key-unknown-field", policy(f'{{ narinfo-key = "{CK}", trust = "all" }}'),
     "unknown field 'trust' next to narinfo-key"),
]


@pytest.mark.parametrize(("name", "text", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_configuration_mistakes(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "policy.toml")
    line = info.value.diagnostics()
    assert message in line
    assert "\n" not in line
    assert line.startswith("policy.toml")


def test_expiry_and_revocation_against_one_reference_time() -> None:
    text = policy(
        '{ threshold = 1, of = ["builderA", "builderB", "builderC"] }',
        f'[keys]\nbuilderA = {{ key = "{A}", not-after = 2027-06-01T00:00:00Z }}\n'
        f'builderB = {{ key = "{B}", not-after = 2027-06-01 }}\n'
        f'builderC = {{ key = "{C}", revoked = true }}\n')
    p = parse_policy(text)
    before = dt.datetime(2027, 5, 31, 23, 59, tzinfo=dt.timezone.utc)
    after = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)
    assert [k.status(before) for k in p.keys] == ["trusted", "trusted", "revoked"]
    assert [k.status(after) for k in p.keys] == ["expired", "expired", "revoked"]
    assert p.key("builderA").kid == "builderA:bcda8d54470fea3b"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("policy-*.toml")),
                         ids=lambda p: p.name)
def test_examples_load(example: Path) -> None:
    load_policy(example)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy("/nonexistent/policy.toml")


# name, require, trace requirement, cache keys, whole requirement described
CACHE_FORMS = [
    ("alternative-in-any-of", f'{{ any-of = ["builderA", {NK}] }}', "builderA", ["cache-1"],
     "any of (builderA, cache signature by cache-1)"),
    ("alternative-in-threshold-1", f'{{ threshold = 1, of = ["builderA", "builderB", {NK}] }}',
     "any of (builderA, builderB)", ["cache-1"],
     "any of (builderA, builderB, cache signature by cache-1)"),
    ("alternative-to-a-quorum",
     f'{{ any-of = [{{ threshold = 2, of = ["builderA", "builderB", "builderC"] }}, {NK}] }}',
     "2 of (builderA, builderB, builderC)", ["cache-1"],
     "any of (2 of (builderA, builderB, builderC), cache signature by cache-1)"),
    ("the-whole-requirement", NK, None, ["cache-1"], "cache signature by cache-1"),
    ("only-cache-keys", f"{{ any-of = [{NK}, {{ narinfo-key = \"{C}\" }}] }}", None,
     ["cache-1", "builderC"], "any of (cache signature by cache-1, cache signature by builderC)"),
]


@pytest.mark.parametrize(("name", "require", "traces", "caches", "described"), CACHE_FORMS,
                         ids=[c[0] for c in CACHE_FORMS])
def test_cache_signature_alternatives(name: str, require: str, traces: str | None,
                                      caches: list[str], described: str) -> None:
    p = parse_policy(policy(require))
    assert p.traces_can_verify is (traces is not None)
    if traces is not None:
        assert p.require.describe() == traces
    else:
        assert p.require == NO_TRACES
        assert not evaluate(p.require, frozenset({"builderA", "builderB", "builderC"}))
    assert [k.name for k in p.narinfo_keys] == caches
    assert p.describe() == described


def test_cache_only_policy_needs_no_keys_table() -> None:
    p = parse_policy(f"[trust]\nrequire = {NK}\n")
    assert p.keys == () and p.narinfo_keys[0].public.name == "cache-1"
    with_dates = parse_policy(
        f'[trust]\nrequire = {{ narinfo-key = "{CK}", not-after = 2027-06-01 }}\n')
    at = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)
    assert with_dates.narinfo_keys[0].status(at) == "expired"
