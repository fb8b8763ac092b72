"""Helpers for tests of hardware evidence in verification: entries made with the software
provider (tests/snp_provider.py, a STAND-IN FOR HARDWARE), policies with evidence elements,
and the ways an attacker (or a broken builder) changes the evidence in a trace store.

A :class:`Provider` is a fresh software chain (ARK -> ASK -> VCEK, made per test module)
whose root a test policy allows through ``root-files``. It also keeps a second VCEK under
the same ASK that certifies an older TCB (:meth:`Provider.old`), and a chain under another
root altogether (:meth:`Provider.foreign`).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from snp_provider import (
    DEFAULT_MEASUREMENT,
    FIXED_CHIP_ID,
    POLICY_NO_DEBUG,
    SoftwareChain,
    make_chain,
    vcek_extensions,
)
from tracehook.trace.claim import KeyKind, OutputClaim
from tracehook.trace.evidence import EVIDENCE_FORMAT, BoundClaim, BoundOutput
from tracehook.trace.sevsnp import Tcb

TCB = Tcb(bootloader=9, tee=0, snp=23, microcode=72)
OLD_TCB = Tcb(bootloader=9, tee=0, snp=8, microcode=72)
MIN_TCB = "{ bootloader = 9, tee = 0, snp = 20, microcode = 72 }"
OTHER_MEASUREMENT = hashlib.sha384(b"tracehook software guest image 2 (not accepted)").digest()


def bound(kind: KeyKind, key: str, outputs: Mapping[str, OutputClaim]) -> BoundClaim:
    """The claim evidence binds: a signature's claim, with references (none: empty)."""
    return BoundClaim.of(kind, key, {n: BoundOutput(o.path, o.nar_hash, tuple(o.references or ()))
                                     for n, o in outputs.items()})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclasses.dataclass
class Provider:
    chain: SoftwareChain
    root_pem: Path  # the file a policy's root-files names

    def entry(self, claim: BoundClaim, *, report_for: BoundClaim | None = None,
              measurement: bytes = DEFAULT_MEASUREMENT, policy: int = POLICY_NO_DEBUG,
              chain: SoftwareChain | None = None) -> dict[str, Any]:
        """An ``evidence`` entry carrying ``claim``, its report bound to ``report_for``
        (default: the claim itself), signed by ``chain``'s VCEK (default: this one)."""
        chain = chain or self.chain
        report = chain.report((report_for or claim).digest(), measurement=measurement,
                              policy=policy)
        return {"format": EVIDENCE_FORMAT, "kind": "sev-snp", "claim": claim.to_json(),
                "report": _b64(report), "vcek": _b64(chain.der("vcek")),
                "chain": [_b64(chain.der("ask")), _b64(chain.der("ark"))]}

    @functools.cached_property
    def old(self) -> SoftwareChain:
        """A VCEK under the same ASK, for the same chip, certifying :data:`OLD_TCB`."""
        key = ec.generate_private_key(ec.SECP384R1())
        leaf = self.chain.issue_leaf(vcek_extensions(OLD_TCB, FIXED_CHIP_ID), key=key)
        return dataclasses.replace(self.chain, vcek=leaf, vcek_key=key, tcb=OLD_TCB)

    @functools.cached_property
    def foreign(self) -> SoftwareChain:
        """A chain of the same shape under another root (never allowed by the policies)."""
        return make_chain(tcb=TCB, product="Other")


def make_provider(directory: Path) -> Provider:
    chain = make_chain(tcb=TCB)
    directory.mkdir(parents=True, exist_ok=True)
    root = directory / "software-root.pem"
    root.write_bytes(chain.root_pem())
    return Provider(chain, root)


def element(name: str, provider: Provider, *, measurements: Sequence[bytes] = (
        DEFAULT_MEASUREMENT,), extra: str = "", min_tcb: str | None = MIN_TCB) -> str:
    """An ``[evidence.NAME]`` table allowing the provider's root (and AMD's)."""
    lines = [f"[evidence.{name}]", 'kind = "sev-snp"',
             f"measurements = {json.dumps([m.hex() for m in measurements])}",
             f"root-files = {json.dumps([str(provider.root_pem)])}"]
    if min_tcb:
        lines.append(f"min-tcb = {min_tcb}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def write_policy(path: Path, require: str, elements: Sequence[str],
                 keys: Mapping[str, str] = {}, traces: Sequence[str] = ()) -> Path:
    """A policy: ``keys`` name -> public key text; ``elements`` from :func:`element`."""
    lines = [f"traces = {json.dumps(list(traces))}", ""]
    if keys:
        lines += ["[keys]", *(f'{n} = "{k}"' for n, k in keys.items()), ""]
    lines += [*elements, "[trust]", f"require = {require}", ""]
    path.write_text("\n".join(lines))
    return path


# --- trace files --------------------------------------------------------------------------


def read_file(store: Path, key: str) -> dict[str, Any]:
    obj = json.loads((store / "traces" / key).read_bytes())
    assert isinstance(obj, dict)
    return obj


def write_file(store: Path, key: str, obj: Mapping[str, Any]) -> None:
    (store / "traces" / key).write_text(json.dumps(obj, indent=2) + "\n")


def set_evidence(store: Path, key: str, entries: Sequence[Mapping[str, Any]]) -> None:
    """Replace the evidence of one trace file (its signatures kept)."""
    obj = read_file(store, key)
    obj["evidence"] = list(entries)
    if not entries:
        del obj["evidence"]
    write_file(store, key, obj)


def drop_signatures(store: Path, key: str) -> None:
    obj = read_file(store, key)
    obj["signatures"] = []
    write_file(store, key, obj)
