"""The post-build hook: sign a trace for the step Nix just built, spool it, return.

Nix runs the hook (``post-build-hook`` in nix.conf) after every local build with
``DRV_PATH``, ``OUT_PATHS`` and ``NIX_CONFIG`` in its environment, and **waits** for it: the
whole build loop stops while it runs, and a non-zero exit stops every further build (even
with ``--keep-going``). So the hook

* reads the derivation and the store database directly (no Nix process, no network);
* writes the signed trace into the local spool (``tracehook publish`` delivers it), with
  hardware evidence for the claim when sign.toml sets ``evidence-command`` (asked once per
  claim, before the claim is spooled, with this environment minus ``NIX_CONFIG``;
  docs/FORMAT.md 9.4): a provider that fails is logged (``evidence`` ``failed``) and the
  signature is spooled without it; strict mode then fails the build;
* logs one human line on stderr (Nix shows it as ``post-build-hook: tracehook: ...``) and
  one JSON line in the log file: derivation, outputs, key id, trace key, spool file,
  duration, outcome;
* runs the executables of ``chain-hooks`` afterwards, from its entry point
  (:mod:`tracehook.signer.agent_client`, which has Nix's environment for them);
* exits 0, also when it fails, unless ``strict = true`` (or ``TRACEHOOK_STRICT=1``): then a
  failure exits with the error's code (1 refused, 2 configuration, 3 environment), which
  makes Nix stop building. Use strict mode only where an unsigned build must not go on.

Entry points: ``hooks/post-build`` and the console script ``tracehook-post-build`` run
:mod:`tracehook.signer.agent_client`, which hands the call to the signing agent of a running
``tracehook publish --daemon`` (the same :func:`main`, in a warm process) and falls back to
this module in process; ``python -m tracehook.signer.hook`` always signs in process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TextIO

from tracehook.errors import EXIT_OK, EXIT_REFUSED, ConfigError, ParseError, TracehookError
from tracehook.nix.nar import format_nar_hash
from tracehook.signer import config, examine, nixversion
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpoolEntry
from tracehook.trace import crypto

EVENT = "sign"


def load_key(cfg: config.SignConfig, settings: Mapping[str, str]) -> crypto.SecretKey:
    """The configured secret key, else the first of nix.conf's ``secret-key-files``."""
    if cfg.secret_key_file is not None:
        return crypto.read_secret_key_file(cfg.secret_key_file)
    files = examine.secret_key_files(settings)
    if files:
        return crypto.read_secret_key_file(files[0])
    where = cfg.source or "the signer configuration"
    raise ConfigError(
        f"no signing key: set secret-key-file in {where} or secret-key-files in nix.conf"
    )


def sign_build(
    cfg: config.SignConfig,
    drv_path: str,
    out_paths: list[str],
    settings: Mapping[str, str],
    log: EventLog,
    started: float,
    via: str = "hook",
    identify: Callable[[], tuple[str, str]] = lambda: nixversion.UNKNOWN,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Examine, sign and spool one build step; report it. Raises TracehookError on failure.

    ``identify`` gives the (flavor, version) of the Nix that built, for the trace;
    ``environ``: what an evidence-command runs with (default: ours; never NIX_CONFIG)."""
    sk = load_key(cfg, settings)  # first: a broken key is a configuration error every time
    root = cfg.store_root if cfg.store_root is not None else examine.store_root(settings)
    store = examine.LocalStore(root)
    try:
        step = examine.examine(store, drv_path, out_paths)
    finally:
        store.close()
    if isinstance(step, examine.Skipped):
        log.emit(
            EVENT, "skipped", f"not signing {drv_path}: {step.reason}",
            reason=step.reason, drv=drv_path, outputs=out_paths,
            duration_ms=_ms(started), via=via,
        )
        return EXIT_OK
    token = examine.sign(step, sk, examine.builder_info(*identify()))
    key = step.resolution.key
    kid = f"{sk.name}:{crypto.thumbprint16(sk.public)}"
    outputs = {
        name: {"path": claim.path, "hash": format_nar_hash(claim.nar_hash)}
        for name, claim in step.outputs.items()
    }
    entry = SpoolEntry(
        key.kind, key.key, kid, drv_path, outputs, token, time.time(),
        crypto.format_public_key(sk.public),
    )
    spool = Spool(cfg.spool_dir)
    missing: TracehookError | None = None
    if cfg.evidence_command and not spool.known(entry.name):
        try:
            entry = replace(entry, evidence=(ask_evidence(cfg, step, environ),))
        except TracehookError as exc:
            missing = exc
    spooled = spool.add(entry)
    fields: dict[str, Any] = {
        "drv": drv_path,
        "outputs": {n: o["path"] for n, o in outputs.items()},
        "kid": kid,
        "key_kind": key.kind,
        "trace_key": key.key,
        "rdrv": key.rdrv_path,
        "via": via,
    }
    if spooled is not None:
        with_evidence = " with hardware evidence" if entry.evidence else ""
        log.emit(
            EVENT, "ok",
            f"signed {drv_path} ({key.kind} key {key.key}, {kid}){with_evidence} -> {spooled}",
            spool_file=str(spooled), duration_ms=_ms(started), evidence=len(entry.evidence),
            **fields,
        )
        if missing is not None:
            return _no_evidence(cfg, log, missing, started, fields)
        return EXIT_OK
    first = spool.find(entry.name)
    if first is not None and first.drv_path == key.rdrv_path != drv_path:
        # Nix's second call for a resolved step: the call for the resolved copy signed it.
        log.emit(
            EVENT, "already-signed",
            f"{drv_path}: signed as its resolved derivation {key.rdrv_path} "
            f"({key.kind} key {key.key}, {kid})",
            reason="Nix runs the hook for the resolved derivation, then for the original: "
            "one step, one claim",
            spool_file=None, duration_ms=_ms(started), **fields,
        )
        return EXIT_OK
    log.emit(
        EVENT, "duplicate",
        f"{drv_path}: claim for {key.kind} key {key.key} by {kid} already spooled",
        reason="the same claim (key, signer, outputs) is already pending or published",
        spool_file=None, duration_ms=_ms(started), **fields,
    )
    return EXIT_OK


def ask_evidence(cfg: config.SignConfig, step: examine.BuildStep,
                 environ: Mapping[str, str] | None) -> dict[str, Any]:
    """The evidence-command's entry for the step's claim (docs/FORMAT.md 9.4), as JSON.
    Imported here: a hook without evidence-command never loads the provider's code."""
    from tracehook.stores.provider import request_evidence
    from tracehook.trace.evidence import BoundClaim, BoundOutput

    key = step.resolution.key
    try:
        claim = BoundClaim.of(key.kind, key.key, {
            name: BoundOutput(o.path, o.nar_hash, tuple(o.references or ()))
            for name, o in step.outputs.items()})
    except ValueError as exc:
        raise ParseError("claim", f"cannot be bound to evidence: {exc}") from None
    entry = request_evidence(cfg.evidence_command, claim, cfg.evidence_timeout, environ)
    return entry.to_json()


def _no_evidence(cfg: config.SignConfig, log: EventLog, exc: TracehookError, started: float,
                 fields: Mapping[str, Any]) -> int:
    reason = exc.diagnostics()
    verdict = "failing the build (strict mode)" if cfg.strict else "build continues"
    log.emit(
        "evidence", "failed",
        f"no hardware evidence for {fields['drv']} ({fields['key_kind']} key "
        f"{fields['trace_key']}): {reason}; the signature is spooled without it ({verdict})",
        reason=reason, strict=cfg.strict, duration_ms=_ms(started), **fields)
    return exc.exit_code if cfg.strict else EXIT_OK


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def main(
    environ: Mapping[str, str] | None = None,
    stderr: TextIO | None = None,
    via: str = "hook",
    cfg: config.SignConfig | None = None,
    nix_pid: int | None = None,
    versions: nixversion.VersionCache | None = None,
) -> int:
    """One hook call. Returns the exit code for Nix (0 unless strict and failed).

    ``via`` says who ran it (``hook``: the hook's own process; ``agent``: the signing
    agent) and is logged with every event. ``cfg``: the configuration to use (the agent's,
    loaded once by the publisher), else read from ``$TRACEHOOK_CONFIG`` or the default.
    ``nix_pid``: the process that ran the hook (default: this process's parent);
    ``versions``: where Nix versions are remembered (default: a file in the spool).
    """
    started = time.monotonic()
    env = os.environ if environ is None else environ
    err = sys.stderr if stderr is None else stderr
    log = EventLog(None, stderr=err)
    strict = config.strict_from_env(env)
    drv_path = env.get("DRV_PATH", "")
    out_paths = env.get("OUT_PATHS", "").split()
    try:
        if cfg is None:
            cfg = config.load(None, env)
        strict = cfg.strict
        log = EventLog(cfg.log_file, stderr=err)
        if not drv_path:
            raise ConfigError("DRV_PATH is not set: run by Nix as post-build-hook, not by hand")
        settings = examine.parse_nix_config(env.get("NIX_CONFIG", ""))
        known = cfg
        cache = versions or nixversion.VersionCache(cfg.spool_dir / "nix-version.json")
        pid = os.getppid() if nix_pid is None else nix_pid

        def identify() -> tuple[str, str]:
            return nixversion.detect(known.nix_flavor, known.nix_version, pid, env, cache)

        return sign_build(cfg, drv_path, out_paths, settings, log, started, via, identify,
                          env)
    except TracehookError as exc:
        code = exc.exit_code
        reason = exc.diagnostics()
    except Exception as exc:  # a bug must not stop the user's builds
        code = EXIT_REFUSED
        reason = f"internal error: {type(exc).__name__}: {exc}"
        import traceback  # only here: importing it costs the hot path ~10 ms

        traceback.print_exc(file=err)
    verdict = "failing the build (strict mode)" if strict else "build continues"
    log.emit(
        EVENT, "failed", f"could not sign {drv_path or '(no DRV_PATH)'}: {reason} ({verdict})",
        reason=reason, drv=drv_path, outputs=out_paths, strict=strict,
        duration_ms=_ms(started), via=via,
    )
    return code if strict else EXIT_OK


def run() -> None:
    """Console-script entry point (``tracehook-post-build``)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
