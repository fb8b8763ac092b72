"""Evidence elements of the trust policy (``[evidence.NAME]``): what they hold, how their
names count in ``require`` exactly as keys do, and every mistake named in one line."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from snp_provider import DEFAULT_MEASUREMENT, fixed_chain
from tracehook.errors import ConfigError
from tracehook.trace.sevsnp import Tcb
from tracehook.verify.evidencepolicy import AMD_ROOT_NAMES
from tracehook.verify.policy import Key, Threshold, load_policy, parse_policy
from verifyhelp import public_text

A = public_text("builderA")
M = DEFAULT_MEASUREMENT.hex()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "POLICY.md"


def evidence(fields: str = "", name: str = "snp") -> str:
    return f'[evidence.{name}]\nkind = "sev-snp"\nmeasurements = ["{M}"]\n{fields}\n'


def policy(require: str = '"snp"', elements: str = "", keys: str = "") -> str:
    return f"{keys}{elements or evidence()}[trust]\nrequire = {require}\n"


def test_an_element_with_defaults() -> None:
    p = parse_policy(policy())
    [e] = p.evidence
    assert (e.name, e.kind, e.measurements) == ("snp", "sev-snp", frozenset({DEFAULT_MEASUREMENT}))
    assert e.roots == AMD_ROOT_NAMES == ("amd-milan", "amd-genoa", "amd-turin")
    assert (e.minimum_tcb, e.root_files, e.not_after, e.revoked, e.allow_debug) == (
        None, (), None, False, False)
    assert p.keys == () and p.require == Key("snp") and p.evidence_names == {"snp"}


def test_every_field(tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(fixed_chain().root_pem())
    p = parse_policy(policy(elements=evidence(
        'min-tcb = { bootloader = 9, tee = 0, snp = 23, microcode = 72 }\n'
        'roots = ["amd-genoa"]\nroot-files = ["root.pem"]\nnot-after = 2027-06-01\n'
        'revoked = false\nunsafe-allow-debug = true')), "p.toml", base_dir=tmp_path)
    e = p.element("snp")
    assert e.minimum_tcb == Tcb(bootloader=9, tee=0, snp=23, microcode=72)
    assert e.roots == ("amd-genoa",) and e.root_files == ((str(root), root.read_bytes()),)
    assert e.not_after == dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)
    assert e.status(dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)) == "expired"
    assert e.allow_debug and "UNSAFE" in e.describe()


def test_root_files_are_read_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_bytes(fixed_chain().root_pem())
    (tmp_path / "policy.toml").write_text(policy(elements=evidence(
        'roots = []\nroot-files = ["root.pem"]')))
    [e] = load_policy(tmp_path / "policy.toml").evidence
    assert e.roots == () and len(e.root_files) == 1


# name, require, keys, signers that satisfy it
MIXED = [
    ("2-of-2-evidence-and-key", '{ threshold = 2, of = ["snp", "builderA"] }',
     Threshold(2, (Key("snp"), Key("builderA")))),
    ("any-of", '{ any-of = ["snp", "builderA"] }', Threshold(1, (Key("snp"), Key("builderA")))),
]


@pytest.mark.parametrize(("name", "require", "model"), MIXED, ids=[m[0] for m in MIXED])
def test_an_element_name_counts_as_a_key_does(name: str, require: str,
                                              model: Threshold) -> None:
    p = parse_policy(policy(require, keys=f'[keys]\nbuilderA = "{A}"\n'))
    assert p.require == model
    assert [k.name for k in p.keys] == ["builderA"] and p.evidence_names == {"snp"}


# name, policy text, text in the error
MISTAKES = [
    ("unknown-field", policy(elements=evidence("measurement = 1")), "[evidence.snp]: unknown "
     "field 'measurement'"),
    ("no-kind", policy(elements=f'[evidence.snp]\nmeasurements = ["{M}"]\n'),
     "kind must be one of 'sev-snp', not None"),
    ("unknown-kind", policy(elements=evidence().replace("sev-snp", "tdx")), "not 'tdx'"),
    ("no-measurements", policy(elements='[evidence.snp]\nkind = "sev-snp"\n'),
     "add 'measurements = "),
    ("empty-measurement-list", policy(elements=evidence().replace(f'["{M}"]', "[]")),
     "non-empty list of hex strings (an empty list would accept no image)"),
    ("measurement-bad-hex", policy(elements=evidence().replace(M, "zz" + M[2:])),
     "measurements[0] 'zz"),
    ("measurement-too-short", policy(elements=evidence().replace(M, M[:64])),
     "is not 96 hex digits"),
    ("measurement-not-a-string", policy(elements=evidence().replace(f'["{M}"]', "[1]")),
     "measurements[0] 1 is not 96 hex digits"),
    ("unknown-root", policy(elements=evidence('roots = ["amd-naples"]')),
     "unknown root 'amd-naples'; the pinned AMD roots are amd-milan, amd-genoa, amd-turin"),
    ("no-root-at-all", policy(elements=evidence("roots = []")), "no allowed root"),
    ("root-file-missing", policy(elements=evidence('root-files = ["/nonexistent/r.pem"]')),
     "cannot read root file /nonexistent/r.pem"),
    ("min-tcb-field-missing", policy(elements=evidence("min-tcb = { bootloader = 1 }")),
     "min-tcb: 'tee' must be an integer from 0 to 255"),
    ("min-tcb-unknown-field", policy(elements=evidence(
        "min-tcb = { bootloader = 1, tee = 0, snp = 1, microcode = 1, ucode = 1 }")),
     "unknown TCB field(s) ucode"),
    ("min-tcb-not-a-table", policy(elements=evidence('min-tcb = "new"')),
     "min-tcb must be a table"),
    ("debug-not-bool", policy(elements=evidence('unsafe-allow-debug = "yes"')),
     "'unsafe-allow-debug' must be true or false"),
    ("not-after-without-zone", policy(elements=evidence("not-after = 2027-06-01T00:00:00")),
     "has no time zone"),
    ("revoked-not-bool", policy(elements=evidence('revoked = "yes"')), "true or false"),
    ("element-not-a-table", '[evidence]\nsnp = "sev-snp"\n[trust]\nrequire = "snp"\n',
     "[evidence.snp] must be a table"),
    ("name-both-key-and-evidence", policy(keys=f'[keys]\nsnp = "{A}"\n'),
     "'snp' is both a [keys] entry and an [evidence] element"),
    ("unknown-name-in-require", policy('"snq"'), "names key 'snq', which [keys] does not "
     "define, nor [evidence] (defined: snp)"),
    ("element-twice-in-2-of-2", policy('{ threshold = 2, of = ["snp", "snp"] }'),
     "key 'snp' appears twice"),
]


@pytest.mark.parametrize(("name", "text", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_configuration_mistakes(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "policy.toml")
    line = info.value.diagnostics()
    assert message in line
    assert "\n" not in line and line.startswith("policy.toml")


def test_a_root_file_that_is_not_a_root(tmp_path: Path) -> None:
    chain = fixed_chain()
    for name, data, message in [("junk.pem", b"not a certificate", "root file"),
                                ("leaf.pem", chain.pem("vcek"), "0 self-issued")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=message) as info:
            parse_policy(policy(elements=evidence(f'root-files = ["{name}"]')), "p.toml",
                         base_dir=tmp_path)
        assert "\n" not in info.value.diagnostics()


def _doc_examples() -> list[str]:
    section = DOCS.read_text().split("## Hardware evidence", 1)[1]
    return re.findall(r"```toml\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_the_documented_examples_parse(index: int) -> None:
    """Every TOML example in docs/POLICY.md's "Hardware evidence" section is a whole
    policy that loads (the migration steps among them)."""
    p = parse_policy(_doc_examples()[index], f"docs/POLICY.md example {index}")
    assert p.evidence, "each example names an evidence element"
