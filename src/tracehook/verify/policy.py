"""The trust policy: which keys sign, which combinations of them are enough (docs/POLICY.md).

One TOML file, loaded once into frozen dataclasses::

    traces = ["file:///var/lib/tracehook", "https://cache.example.org"]

    [keys]
    builderA = "builderA:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI="
    builderB = { key = "builderB:Dwxy...", not-after = 2027-06-01T00:00:00Z }
    retired  = { key = "retired:...", revoked = true }

    [trust]
    require = { threshold = 2, of = ["builderA", "builderB", "builderC"] }

The trust model is ``Key(name)`` or ``Threshold(t, [models])`` (``all-of`` is a threshold of
all, ``any-of`` of one), evaluated as a monotone predicate over the set of distinct signers.
A key may appear in several branches only below a threshold of one: otherwise one signer
could count twice. Every mistake is a ConfigError whose one line says what to fix.

The adoption path (docs/POLICY.md, "Cache signatures"): a ``{ narinfo-key = "name:base64" }``
element trusts a binary cache's narinfo (and realisation) signatures. A cache signature
takes responsibility for everything below the path it signs, so the element is allowed only
as the whole requirement or as a direct alternative of a top-level ``any-of`` (threshold 1);
it is kept apart from the trace model: :attr:`Policy.require` is the trace requirement
(:data:`NO_TRACES` when there is none) and :attr:`Policy.narinfo_keys` the cache keys.

Hardware evidence (docs/POLICY.md, "Hardware evidence"): an ``[evidence.NAME]`` element
(:mod:`tracehook.verify.evidencepolicy`) says what an attestation report must show; its NAME
counts in ``require`` exactly as a key's does, so keys and evidence mix in quorums. A name
is either a key or an evidence element, never both.
"""

from __future__ import annotations

import datetime as dt
import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracehook.errors import ConfigError, ParseError
from tracehook.trace import crypto
from tracehook.verify.evidencepolicy import EvidenceElement, parse_evidence
from tracehook.verify.policyfields import KeyStatus, parse_date, parse_revoked, status

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

_TOP_LEVEL = {"traces", "keys", "evidence", "trust", "weak-fixed-output-hashes"}
_WEAK = "weak-fixed-output-hashes"
MAX_DEPTH = 32  # levels of nested thresholds in [trust] require
_KEY_FIELDS = {"key", "not-after", "revoked"}


@dataclass(frozen=True)
class PolicyKey:
    """A key the policy names. ``name`` is the policy's name for it (used in ``[trust]``);
    ``public.name`` is the key's own name, which signers put in a trace's ``kid``."""

    name: str
    public: crypto.PublicKey
    not_after: dt.datetime | None = None
    revoked: bool = False

    @property
    def thumbprint(self) -> str:
        return crypto.thumbprint16(self.public)

    @property
    def kid(self) -> str:
        return f"{self.public.name}:{self.thumbprint}"

    def status(self, now: dt.datetime) -> KeyStatus:
        return status(self.revoked, self.not_after, now)


@dataclass(frozen=True)
class Key:
    """The trust model 'this key signed'."""

    name: str

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Threshold:
    """The trust model 'at least ``threshold`` of these models are satisfied'."""

    threshold: int
    of: tuple[TrustModel, ...]

    def describe(self) -> str:
        if not self.of:
            return "no trace (cache signatures only)"
        inner = ", ".join(m.describe() for m in self.of)
        if self.threshold == len(self.of) and len(self.of) > 1:
            return f"all of ({inner})"
        if self.threshold == 1 and len(self.of) > 1:
            return f"any of ({inner})"
        return f"{self.threshold} of ({inner})"


TrustModel = Key | Threshold

#: The trace requirement of a policy that trusts cache signatures only: no set of trace
#: signers meets it (one of no entries).
NO_TRACES = Threshold(1, ())


def model_keys(model: TrustModel) -> frozenset[str]:
    if isinstance(model, Key):
        return frozenset((model.name,))
    return frozenset().union(*(model_keys(m) for m in model.of))


def satisfied(model: TrustModel, signers: frozenset[str]) -> bool:
    if isinstance(model, Key):
        return model.name in signers
    return sum(1 for m in model.of if satisfied(m, signers)) >= model.threshold


@dataclass(frozen=True)
class TrustResult:
    """Like python-tuf's verification result: the requirement, who counted, who is missing."""

    satisfied: bool
    requirement: str  # the model, described
    signed: frozenset[str]  # policy keys that signed and appear in the model
    missing: frozenset[str]  # keys of the model that did not sign

    def __bool__(self) -> bool:
        return self.satisfied

    def explain(self) -> str:
        signed = ", ".join(sorted(self.signed)) or "no key of the policy"
        missing = ", ".join(sorted(self.missing)) or "none"
        verdict = "met" if self.satisfied else "not met"
        return f"needs {self.requirement}: {verdict}; signed by {signed}; missing {missing}"


def evaluate(model: TrustModel, signers: frozenset[str]) -> TrustResult:
    keys = model_keys(model)
    return TrustResult(
        satisfied(model, signers), model.describe(), signers & keys, keys - signers
    )


@dataclass(frozen=True)
class Policy:
    source: str
    traces: tuple[str, ...]
    keys: tuple[PolicyKey, ...]
    require: TrustModel  # the trace requirement; NO_TRACES when only caches are trusted
    narinfo_keys: tuple[PolicyKey, ...] = ()  # alternatives: a cache signature by any one
    weak_fixed_output_hashes: bool = False  # md5/sha1-pinned fixed outputs as anchors
    evidence: tuple[EvidenceElement, ...] = ()  # hardware evidence, named like keys

    def key(self, name: str) -> PolicyKey:
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(name)

    def element(self, name: str) -> EvidenceElement:
        for e in self.evidence:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def evidence_names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.evidence)

    @property
    def traces_can_verify(self) -> bool:
        """Whether any set of trace signers can meet the requirement."""
        return self.require != NO_TRACES

    def describe(self) -> str:
        """The whole requirement: the trace model, or a cache signature by one of the keys."""
        parts: list[str] = []
        if self.traces_can_verify:
            model = self.require
            if isinstance(model, Threshold) and model.threshold == 1 and self.narinfo_keys:
                parts += [m.describe() for m in model.of]
            else:
                parts.append(model.describe())
        parts += [f"cache signature by {k.name}" for k in self.narinfo_keys]
        return parts[0] if len(parts) == 1 else f"any of ({', '.join(parts)})"


# ------------------------------------------------------------------------------- loading


def load_policy(path: str | Path, seen: Callable[[Path, bytes], None] | None = None
                ) -> Policy:
    """The policy in the file at ``path``; ``seen(path, bytes)`` is told what was read."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"policy file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy file {p}: {exc}") from None
    if seen is not None:
        seen(p, text.encode())
    return parse_policy(text, str(p), base_dir=p.parent)


def parse_policy(text: str, source: str = "policy", *, base_dir: Path | None = None) -> Policy:
    """``base_dir``: where relative paths in the policy (evidence ``root-files``) are."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested more than Python can read; a trust requirement "
                          f"may be nested at most {MAX_DEPTH} levels deep") from None
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level entry {unknown[0]!r}; allowed: traces, "
            f"{_WEAK}, [keys], [evidence.NAME], [trust]"
        )
    weak = doc.get(_WEAK, "refuse")
    if weak not in ("allow", "refuse"):
        raise ConfigError(f"{source}: {_WEAK} must be \"allow\" or \"refuse\" (default), "
                          f"not {weak!r}")
    traces = _traces(doc.get("traces", []), source)
    trust = doc.get("trust")
    extra = sorted(set(trust) - {"require"}) if isinstance(trust, dict) else []
    if extra:
        hint = " (did you mean 'require'?)" if difflib.get_close_matches(
            extra[0], ["require"], cutoff=0.6) else ""
        raise ConfigError(f"{source}: [trust] has unknown entry {extra[0]!r}{hint}; "
                          "only 'require'")
    if not isinstance(trust, dict) or "require" not in trust:
        raise ConfigError(f"{source}: add a [trust] table with 'require = ...' (e.g. a key name)")
    trace_items, cache_items = _split_top(trust["require"], source)
    raw_keys, raw_evidence = doc.get("keys"), doc.get("evidence")
    evidence = parse_evidence(raw_evidence, source, base_dir) if raw_evidence is not None else ()
    keys = (_keys(raw_keys, source) if raw_keys is not None or (trace_items and not evidence)
            else ())
    names = {k.name for k in keys}
    for element in evidence:
        if element.name in names:
            raise ConfigError(f"{source}: '{element.name}' is both a [keys] entry and an "
                              "[evidence] element; a name in [trust] must mean one thing, "
                              "rename one")
    names |= {e.name for e in evidence}
    of = tuple(_model(raw, names, source, where) for where, raw in trace_items)
    require = NO_TRACES if not of else of[0] if len(of) == 1 else Threshold(1, of)
    _check_no_double_count(require, source)
    return Policy(source, traces, keys, require, _narinfo_keys(cache_items, source),
                  weak == "allow", evidence)


_NARINFO = "narinfo-key"
_NARINFO_FIELDS = {_NARINFO, "not-after", "revoked"}
_PLACEMENT = (
    "a narinfo-key is allowed only as the whole [trust] require or as a direct alternative "
    "of its top-level any-of (or threshold = 1): a cache signature takes responsibility for "
    "everything below it, so it can only be an alternative to the whole trace requirement, "
    "not a part of a quorum"
)

_Items = list[tuple[str, Any]]  # (where, raw entry)


def _split_top(raw: Any, source: str) -> tuple[_Items, _Items]:
    """The top-level requirement as (trace alternatives, cache-key alternatives)."""
    top = "[trust] require"
    if isinstance(raw, dict) and _NARINFO in raw:
        return [], [(top, raw)]
    if not isinstance(raw, dict):
        return [(top, raw)], []
    form = "any-of" if "any-of" in raw else "of" if raw.get("threshold") == 1 else None
    items = raw.get(form) if form else None
    if form is None or not isinstance(items, list) or set(raw) - {"any-of", "of", "threshold"} \
            or ("any-of" in raw and ("of" in raw or "threshold" in raw)):
        return [(top, raw)], []  # not an alternative at the top: _model checks it whole
    cache = [(f"{top}.{form}[{i}]", m) for i, m in enumerate(items)
             if isinstance(m, dict) and _NARINFO in m]
    if not cache:
        return [(top, raw)], []
    traces = [(f"{top}.{form}[{i}]", m) for i, m in enumerate(items)
              if not (isinstance(m, dict) and _NARINFO in m)]
    return traces, cache


def _narinfo_keys(items: _Items, source: str) -> tuple[PolicyKey, ...]:
    keys: list[PolicyKey] = []
    for where, raw in items:
        at = f"{source}: {where}"
        unknown = sorted(set(raw) - _NARINFO_FIELDS)
        if unknown:
            raise ConfigError(f"{at}: unknown field {unknown[0]!r} next to narinfo-key; "
                              "allowed: narinfo-key, not-after, revoked")
        entry = dict(raw)
        entry["key"] = entry.pop(_NARINFO)
        key = _key("", entry, at)
        key = PolicyKey(key.public.name, key.public, key.not_after, key.revoked)
        for other in keys:
            if other.public.name == key.public.name or other.public.key == key.public.key:
                raise ConfigError(f"{at}: cache key '{key.name}' is listed twice; list each "
                                  "narinfo-key once")
        keys.append(key)
    return tuple(keys)


def _traces(raw: Any, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(u, str) and u for u in raw):
        raise ConfigError(f"{source}: 'traces' must be a list of trace store URLs")
    return tuple(raw)


def _keys(raw: Any, source: str) -> tuple[PolicyKey, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: add a [keys] table naming at least one public key (or "
                          "an [evidence.NAME] element)")
    keys: list[PolicyKey] = []
    by_material: dict[bytes, str] = {}
    by_key_name: dict[str, str] = {}
    for name, entry in raw.items():
        where = f"{source}: [keys] {name}"
        key = _key(name, entry, where)
        if key.public.key in by_material:
            raise ConfigError(
                f"{where}: the same public key is already listed as "
                f"'{by_material[key.public.key]}'; list each key once"
            )
        if key.public.name in by_key_name:
            raise ConfigError(
                f"{where}: key name '{key.public.name}' is already used by "
                f"'{by_key_name[key.public.name]}'; traces name their key by it, so it must "
                "be unique"
            )
        by_material[key.public.key] = name
        by_key_name[key.public.name] = name
        keys.append(key)
    return tuple(keys)


def _key(name: str, entry: Any, where: str) -> PolicyKey:
    not_after: dt.datetime | None = None
    revoked = False
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - _KEY_FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: key, "
                              "not-after, revoked")
        text = entry.get("key")
        not_after = parse_date(entry.get("not-after"), where)
        revoked = parse_revoked(entry.get("revoked", False), where)
    else:
        text = entry
    if not isinstance(text, str):
        raise ConfigError(f"{where}: give the public key as \"name:base64\" (a Nix .public file)")
    try:
        public = crypto.parse_public_key(text, what="public key")
    except ParseError as exc:
        raise ConfigError(f"{where}: {exc.diagnostics()}") from None
    return PolicyKey(name, public, not_after, revoked)


_FORMS = "a key name, {threshold = N, of = [...]}, {all-of = [...]} or {any-of = [...]}"


def _model(raw: Any, names: set[str], source: str, where: str, depth: int = 1) -> TrustModel:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: {where.split('.', 1)[0]} is nested more than "
                          f"{MAX_DEPTH} levels deep")
    if isinstance(raw, str):
        if raw not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: {where} names key '{raw}', which [keys] does not "
                              f"define, nor [evidence] (defined: {known})")
        return Key(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be {_FORMS}")
    if _NARINFO in raw:
        raise ConfigError(f"{source}: {where}: {_PLACEMENT}")
    forms = [f for f in ("of", "all-of", "any-of") if f in raw]
    if len(forms) != 1 or set(raw) - {"threshold", "of", "all-of", "any-of"}:
        raise ConfigError(f"{source}: {where} must be {_FORMS}, exactly one of them")
    form = forms[0]
    items = raw[form]
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"{source}: {where}: '{form}' must be a non-empty list (an empty list would "
            "trust nothing, or everything)"
        )
    of = tuple(_model(m, names, source, f"{where}.{form}[{i}]", depth + 1)
               for i, m in enumerate(items))
    if form == "of":
        t = raw.get("threshold")
        if not isinstance(t, int) or isinstance(t, bool):
            raise ConfigError(f"{source}: {where}: 'of' needs an integer 'threshold = N'")
        if not 1 <= t <= len(of):
            raise ConfigError(
                f"{source}: {where}: threshold {t} is out of range; with {len(of)} entries "
                f"in 'of' it must be 1 to {len(of)}"
            )
    else:
        if "threshold" in raw:
            raise ConfigError(f"{source}: {where}: '{form}' takes no 'threshold'; use 'of'")
        t = len(of) if form == "all-of" else 1
    return Threshold(t, of)


def _check_no_double_count(model: TrustModel, source: str) -> None:
    """Below a threshold of two or more, sibling branches must not share a key."""
    if isinstance(model, Key):
        return
    for child in model.of:
        _check_no_double_count(child, source)
    if model.threshold < 2:
        return
    seen: set[str] = set()
    for child in model.of:
        shared = seen & model_keys(child)
        if shared:
            raise ConfigError(
                f"{source}: [trust] require: key '{sorted(shared)[0]}' appears twice in "
                f"'{model.describe()}', so one signer would count twice; name it once"
            )
        seen |= model_keys(child)

