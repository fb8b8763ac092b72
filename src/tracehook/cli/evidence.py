"""``tracehook evidence verify REPORT --vcek CERT [--ask-ark PEM] [--root PEM] [--json] ...``.

Checks one AMD SEV-SNP attestation report offline: its signature by the VCEK (or VLEK)
certificate, that certificate's chain to AMD's pinned root for its product (Milan, Genoa,
Turin; shipped in the package) or to the roots given with ``--root``, the certificate's TCB
and chip id against the report's, and the guest policy (a guest that allows debugging is
refused unless ``--allow-debug``). ``--report-data``, ``--measurement`` and ``--min-tcb``
add the checks a policy makes. Prints the measurement, report data, TCB versions, chip id
and product, and the one reason for a refusal.

Exit: 0 verified; 1 refused (bad signature, broken chain, unknown root, expired
certificate, TCB or chip mismatch, debug policy, report data, measurement, TCB too old);
2 malformed input (truncated report, unreadable certificate, bad flag). The
``cryptography`` library is loaded only when this command runs (tracehook.trace.pki).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from tracehook.errors import EXIT_OK, EXIT_REFUSED, ConfigError, EnvironmentFault
from tracehook.trace.pki import load_certificate, load_certificates
from tracehook.trace.sevsnp import Tcb, parse_report
from tracehook.trace.snproots import amd_roots, root_from_pem
from tracehook.trace.snpverify import SnpRequirements, SnpVerdict, examine_report


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "evidence",
        help="check hardware evidence (AMD SEV-SNP attestation reports)",
        description="Check hardware evidence offline.",
    )
    sub = p.add_subparsers(dest="evidence_command", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify",
        help="verify one SEV-SNP report and its certificate chain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("report", metavar="REPORT", help="the 1184-byte attestation report")
    v.add_argument("--vcek", required=True, metavar="CERT",
                   help="the VCEK or VLEK certificate (PEM or DER)")
    v.add_argument("--ask-ark", action="append", default=[], metavar="PEM",
                   help="intermediate/root certificates to link through, e.g. AMD's "
                   "cert_chain (repeatable; AMD's own are built in)")
    v.add_argument("--root", action="append", default=[], metavar="PEM",
                   help="allow this root (an ARK, optionally with its ASKs) instead of AMD's "
                   "pinned ones (repeatable)")
    v.add_argument("--report-data", metavar="HEX", help="required REPORT_DATA (128 hex digits)")
    v.add_argument("--measurement", action="append", default=[], metavar="HEX",
                   help="an accepted launch measurement (96 hex digits; repeatable)")
    v.add_argument("--min-tcb", metavar="SPEC",
                   help="minimum reported TCB, e.g. bootloader=2,tee=0,snp=5,microcode=68")
    v.add_argument("--allow-debug", action="store_true",
                   help="UNSAFE: accept a guest whose policy allows debugging")
    v.add_argument("--at", metavar="TIME", help="reference time for certificate validity "
                   "(ISO 8601 with a time zone; default: now)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=main)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise EnvironmentFault(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _hex(value: str, length: int, flag: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != length:
        raise ConfigError(f"{flag} {value!r}: give {2 * length} hex digits ({length} bytes)")
    return raw


def _tcb_spec(spec: str) -> dict[str, object]:
    fields: dict[str, object] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"--min-tcb {spec!r}: expected name=number,... e.g. "
                              "bootloader=2,tee=0,snp=5,microcode=68")
        fields[name.strip()] = int(value)
    return fields


def _reference_time(at: str | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.timezone.utc)
    try:
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {at!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        raise ConfigError(f"--at {at!r} needs a time zone, e.g. {at}Z")
    return when


def main(args: argparse.Namespace) -> int:
    now = _reference_time(args.at)
    report = parse_report(_read(args.report, "report"), f"SEV-SNP report {args.report}")
    signer = load_certificate(_read(args.vcek, "certificate"), f"certificate {args.vcek}")
    given = [c for path in args.ask_ark
             for c in load_certificates(_read(path, "certificates"), f"certificates {path}")]
    roots = tuple(root_from_pem(Path(p).stem, _read(p, "root"), f"root {p}")
                  for p in args.root) or amd_roots()
    report_data = _hex(args.report_data, 64, "--report-data") if args.report_data else None
    try:
        requirements = SnpRequirements(
            roots=roots,
            measurements=frozenset(_hex(m, 48, "--measurement") for m in args.measurement)
            or None,
            minimum_tcb=Tcb.from_mapping(_tcb_spec(args.min_tcb), "--min-tcb")
            if args.min_tcb else None,
            allow_debug=args.allow_debug,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    verdict = examine_report(report, signer, given, requirements, now, report_data)
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2))
    else:
        print(_render(verdict))
    return EXIT_OK if verdict.verified else EXIT_REFUSED


def _render(verdict: SnpVerdict) -> str:
    r = verdict.report
    if verdict.refusal is None:
        head = (f"verified: SEV-SNP report signed by a {verdict.product} "
                f"{verdict.signer_kind.upper()}")
    else:
        head = f"refused ({verdict.refusal.reason}): {verdict.refusal.message}"
    product = (f"{verdict.product} (root {verdict.root.describe()})" if verdict.root
               else "unknown (the chain did not reach an allowed root)")
    chain = " -> ".join(f"{c.common_name} [{c.sha256[:16]}]" for c in verdict.chain)
    rows = [
        ("product", product),
        ("signed by", f"{verdict.signer.common_name} [{verdict.signer.sha256[:16]}]"
         f" (report: {r.signing_key})"),
        ("chain", chain or "not linked"),
        ("measurement", r.measurement.hex()),
        ("report data", r.report_data.hex()),
        ("chip id", r.chip_id.hex()),
        ("reported TCB", str(r.reported_tcb)),
        ("current TCB", str(r.current_tcb)),
        ("committed TCB", str(r.committed_tcb)),
        ("launch TCB", str(r.launch_tcb)),
        ("guest policy", r.policy_text()),
        ("report", f"version {r.version}, VMPL {r.vmpl}, guest SVN {r.guest_svn}"),
        ("checks", "; ".join(f"{k}: {v}" for k, v in verdict.checks) or "none reached"),
    ]
    return "\n".join([head, *(f"  {k:<14}{v}" for k, v in rows)])
