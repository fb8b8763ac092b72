"""Cost of verifying one AMD SEV-SNP report, against one Ed25519 trace signature check.

    .venv/bin/python bench/evidence.py [--runs 9] [--iterations 200]

Verifying one report = what a verifier does per evidence entry: read the VCEK certificate
(DER), read the report, check its ECDSA P-384 signature, link VCEK -> ASK -> ARK to AMD's
pinned Milan root (one RSA-4096 RSASSA-PSS check, VCEK by ASK: the pinned ASK -> ARK and
ARK -> ARK links were checked when the roots were read), the validity dates, the VCEK's TCB
and hwID extensions, the debug policy, REPORT_DATA, the measurement and a minimum TCB; and
the same with the entry carrying AMD's ASK and ARK too (two more certificates to read). The
input is the real Milan sample (tests/data/sev-snp; a debug guest, so debug is allowed
here). The pinned roots are read once per process, before timing, as a verifier does.

In the same run: the parts alone (certificate read, P-384 signature, chain link) and one
Ed25519 check of a trace's signing input (``tracehook.trace.crypto.verify``, libsodium), so
the ratio holds on this machine at this moment. Each figure is the median per operation over
``--runs`` runs of ``--iterations`` operations each; the spread is min to max over the runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tracehook.trace import crypto, pki, snproots
from tracehook.trace.sevsnp import Tcb, parse_report
from tracehook.trace.snproots import amd_roots
from tracehook.trace.snpverify import SnpRequirements, examine_report

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sev-snp"
AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)


def per_op(fn: Callable[[], object], runs: int, iterations: int) -> list[float]:
    """Seconds per operation, one figure per run."""
    fn()  # warm up (imports, caches)
    figures = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        figures.append((time.perf_counter() - start) / iterations)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()

    report_bytes = (DATA / "attestation.bin").read_bytes()
    vcek_der = (DATA / "vcek.testcer").read_bytes()
    roots = amd_roots()
    report = parse_report(report_bytes)
    vcek = pki.load_certificate(vcek_der, "VCEK")
    req = SnpRequirements(roots, measurements=frozenset({report.measurement}),
                          minimum_tcb=Tcb(2, 0, 5, 68), allow_debug=True)

    chain_pem = (Path(snproots.__file__).parent / "amd_roots" / "ask_ark_milan.pem").read_bytes()

    def verify_one(with_chain: bool = False) -> None:
        signer = pki.load_certificate(vcek_der, "VCEK")
        given = pki.load_certificates(chain_pem, "chain") if with_chain else ()
        verdict = examine_report(parse_report(report_bytes), signer, given, req, AT,
                                 report.report_data)
        assert verdict.verified, verdict.refusal

    milan = roots[0]
    ask = next(c for c in milan.intermediates if c.common_name == "SEV-Milan")

    def rsa_pss_only() -> None:
        assert pki.issue_problem(vcek, ask) is None

    def signature_only() -> None:
        pki.verify_ecdsa_p384(vcek, report.signed_bytes, *report.signature_rs)

    sk = crypto.SecretKey("bench", bytes(range(32)))
    signing_input = b"e" * 620  # about a trace's b64url(header) "." b64url(payload)
    sig = crypto.sign(sk, signing_input)

    def ed25519() -> None:
        crypto.verify(sk.public, signing_input, sig)

    logging.disable(logging.WARNING)  # allow-debug warns on every accepted debug report
    rows = [
        ("verify one report (all checks)", per_op(verify_one, args.runs, args.iterations)),
        ("  ... with its ASK and ARK given", per_op(lambda: verify_one(True), args.runs,
                                                    args.iterations)),
        ("  read the VCEK certificate", per_op(lambda: pki.load_certificate(vcek_der, "VCEK"),
                                               args.runs, args.iterations)),
        ("  ECDSA P-384 report signature", per_op(signature_only, args.runs, args.iterations)),
        ("  RSA-4096 PSS check (VCEK by ASK)", per_op(rsa_pss_only, args.runs,
                                                      args.iterations)),
        ("Ed25519 trace signature check", per_op(ed25519, args.runs, args.iterations * 10)),
    ]
    ed = statistics.median(rows[-1][1])
    print(f"{args.runs} runs x {args.iterations} operations (Ed25519: x{args.iterations * 10})")
    print(f"{'operation':<36} {'median us':>10} {'min-max us':>16} {'x Ed25519':>10}")
    for name, figures in rows:
        med = statistics.median(figures)
        spread = f"{min(figures) * 1e6:.0f}-{max(figures) * 1e6:.0f}"
        print(f"{name:<36} {med * 1e6:>10.1f} {spread:>16} {med / ed:>10.1f}")


if __name__ == "__main__":
    main()
