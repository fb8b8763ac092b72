"""The gate's configuration (one frozen dataclass) and its assembly into a server.

Everything is read once at start-up: the policy file, the signing key, the upstream and
trace-store URLs. A mistake is a ConfigError (exit 2) naming what to fix; nothing is
contacted until the first request, so a cache that is down at start does not stop the gate
(its requests answer 502 until it is back).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracehook.errors import ConfigError, TracehookError
from tracehook.gate.front import GateHTTPServer, HttpLimits
from tracehook.gate.index import DrvIndex
from tracehook.gate.memo import CacheConfig, DecisionCache
from tracehook.gate.policywatch import PolicyWatch
from tracehook.gate.service import Answer, GateService
from tracehook.gate.verdicts import GateVerifier
from tracehook.gate.warmstart import WarmStart
from tracehook.stores.binarycache import FileUpstream, open_upstream
from tracehook.stores.eventlog import EventLog
from tracehook.stores.factcache import FactCache
from tracehook.stores.http import DEFAULT_TIMEOUT
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import open_store
from tracehook.trace import crypto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    policy: Path
    upstreams: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests)
    signing_key: Path | None = None
    store_root: str | None = None  # chroot-style store (--store ROOT); None: /nix/store
    log_file: Path | None = None
    priority: int = 30
    upstream_timeout: float = DEFAULT_TIMEOUT
    cache: CacheConfig = field(default_factory=CacheConfig)
    http: HttpLimits = field(default_factory=HttpLimits)
    generation_max_age: float = 60.0  # seconds before key expiry is re-checked
    drv_cache_size: int = 20_000  # parsed .drv files kept in memory (least recently used out)
    drv_cache_bytes: int = 256 * 1024 * 1024  # ... and at most this many .drv bytes
    verify_deadline: float = 30.0  # seconds a verification may take before it is a fault
    policy_interval: float = 2.0  # seconds between checks of the policy file
    cache_dir: Path | None = None  # the persistent verification cache
    fail_on_tamper: bool = False  # tamper evidence in a chain refuses the path
    direct_nars: bool = True  # a file:// upstream's narinfo names its NAR file (file:// URL)
    index_interval: float = 1.0  # seconds between background looks at the store (0: none)
    handover: bool = True  # a generation's steps and answers pass to the next if unchanged
    verify_ahead: float = 600.0  # .drv files written this many seconds before they are
    # indexed: their closures are decided before Nix asks (0: off)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:37515")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("listening on %s, not a loopback address: anyone who can reach it can "
                    "use the gate's signing key through it", host)
    return host, int(port)


def build_server(cfg: GateConfig, events: EventLog) -> GateHTTPServer:
    if not cfg.upstreams:
        raise ConfigError("give at least one --upstream binary cache (file:///DIR or http(s)://)")
    policies = PolicyWatch(cfg.policy, events, cfg.policy_interval)
    policy, _ = policies.current()
    if not policy.traces and policy.traces_can_verify:
        raise ConfigError(f"{cfg.policy}: 'traces' names no trace store; the gate would "
                          "refuse everything")
    upstreams = [open_upstream(url, cfg.upstream_timeout) for url in cfg.upstreams]
    key = crypto.read_secret_key_file(cfg.signing_key) if cfg.signing_key else None
    facts = FactCache(cfg.cache_dir, background=True) if cfg.cache_dir is not None else None
    reader = StoreReader(cfg.store_root, max_cached=cfg.drv_cache_size,
                         max_bytes=cfg.drv_cache_bytes, facts=facts)
    index = DrvIndex(reader)
    index.check_readable()  # a gate does not start on a store it cannot read (exit 3)
    verifier = GateVerifier(policies.current, reader, max_age=cfg.generation_max_age,
                            caches=upstreams, deadline=cfg.verify_deadline, facts=facts,
                            stores=lambda p: [open_store(u, cfg.upstream_timeout)
                                              for u in p.traces])
    if cfg.verify_ahead > 0:
        index.ahead, index.ahead_window = verifier.ahead, cfg.verify_ahead
    service = GateService(
        index, verifier, upstreams, key, events, DecisionCache[Answer](cfg.cache),
        cfg.priority, weak_hashes=lambda: policies.current()[0].weak_fixed_output_hashes,
        fail_on_tamper=cfg.fail_on_tamper, direct_nars=cfg.direct_nars)
    try:
        server = GateHTTPServer((cfg.host, cfg.port), service, cfg.http)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    server.policies = policies
    if cfg.cache_dir is not None:
        server.warm = _warm_start(cfg, key, policies, service, events)
    index.start_watch(cfg.index_interval)  # stopped by server_close()
    return server


def _warm_start(cfg: GateConfig, key: crypto.SecretKey | None, policies: PolicyWatch,
                service: GateService, events: EventLog) -> WarmStart:
    """Answers kept by the last gate on this cache directory, replayed if nothing they
    rest on changed (:mod:`tracehook.gate.warmstart`)."""
    assert cfg.cache_dir is not None
    shape = [None if key is None else crypto.format_public_key(key.public), cfg.upstreams,
             cfg.store_root, cfg.fail_on_tamper, cfg.priority, cfg.direct_nars]
    reader = service.index.reader
    warm = WarmStart(str(cfg.cache_dir), shape,
                     lambda step: reader.read_derivation(step).input_drvs)
    cache_roots = [str(u.root) for u in service.upstreams if isinstance(u, FileUpstream)]
    if cfg.handover:
        warm.follow(service.verifier, service.memo, policies.current, events, cache_roots)
    else:
        service.verifier.on_generation = warm.begin_generation
    policy, _ = policies.current()
    started = time.monotonic()
    gen = service.verifier.generation()
    count, recorded = warm.restore(service.memo, gen, policy, cache_roots=cache_roots,
                                   trace_dirs=service.verifier.trace_dirs())
    if count or recorded:
        kept, warm.kept = warm.kept, {}  # (the engine holds them from now on)
        service.verifier.take_back(gen, kept)
        took = time.monotonic() - started
        if count and recorded == len(kept):
            said = (f"{count} answers and {len(kept)} verified steps of the last run kept: "
                    f"every file they were decided from is unchanged (checked in {took:.2f} s)")
        else:
            said = (f"{count} answers and {len(kept)} verified steps of the last run kept, "
                    f"{recorded - len(kept)} steps and the other answers decided again: what "
                    f"they rest on changed since (checked in {took:.2f} s)")
        events.emit("gate-warm-start", "ok", said, answers=count, steps=len(kept),
                    steps_again=recorded - len(kept))
    return warm


def save_warm_start(server: GateHTTPServer, events: EventLog) -> None:
    """At shutdown: keep the current generation's allowed answers and verified steps for
    the next start."""
    warm = server.warm
    if warm is None or server.policies is None:
        return
    try:
        policy, _ = server.policies.current()
        gen = server.service.verifier.generation()
        steps = server.service.verifier.keep(gen)
        count = warm.save(server.service.memo, gen, policy, steps=steps)
    except (TracehookError, OSError) as exc:
        events.emit("gate-stop", "warning", f"answers not kept for the next start: {exc}",
                    reason=str(exc))
        return
    finally:
        warm.close()
    verifier = server.service.verifier
    if count:
        events.emit("gate-stop", "ok", f"{count} answers and {len(steps)} verified steps kept "
                    f"for the next start ({verifier.steps_planned} steps decided, "
                    f"{verifier.steps_taken_back} taken back from the last run)",
                    answers=count, steps=len(steps), planned=verifier.steps_planned,
                    taken_back=verifier.steps_taken_back)
