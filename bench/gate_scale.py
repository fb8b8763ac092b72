"""Benchmark of the gate at NixOS scale: a whole closure requested as Nix requests it.

    .venv/bin/python bench/gate_scale.py [--sizes 1000 10000] [--clients 8] [--runs 1]
                                         [--client stdlib|curl|multi|lean]
                                         [--against-src DIR]
                                         [--top-first] [--cpu] [--pattern issue|nix]

For each size, a synthetic closure shaped like a package set (bench/synth.py: floating-CA
steps, two signers, a file trace store and a file binary cache) and, in one run:

- **verify**: ``tracehook verify TARGET`` on the closure (a subprocess, as a user runs it);
- **cold**: ``tracehook gate`` (a subprocess, a fresh ``--cache-dir``) asked for every path
  of the closure as Nix substitutes it: for each build step its realisation, then its
  narinfo (each source: its narinfo), steps in random order, ``--clients`` clients at once,
  each on its own keep-alive connection: by default (``--client multi``) one process
  driving libcurl's multi interface (pycurl) with ``--clients`` connections, one thread for
  all its transfers, as Nix's own file transfer asks (``--client stdlib``: a process a
  client, http.client, the default until the fifteenth session; ``--client curl``: curl,
  the tool over libcurl, one process a client asking for its share of the pairs;
  ``--client lean`` for a diagnostic client: see ``--cpu``); total
  time, cost per step, the peak RSS of the gate and all its processes together (checker
  processes, index workers: the largest sum of their resident sets, looked at every 0.1 s,
  or the sum of their VmHWM at the end if larger), and the ratio to verify;
- **warm**: the same after a gate restart with the same ``--cache-dir`` (the first gate
  kept its answers when it stopped; the second replays them if every file they were
  decided from is unchanged: tracehook.gate.warmstart); the start-up of both gates (from
  the process's start to its first answer) is printed too;
- **leaf**: the same after one build step near the top changed (the last ordinary step: it
  and the aggregates above it are new derivations), restarted with the same ``--cache-dir``:
  ratio to cold, the number of changed steps, and the target (0.1 x cold plus the changed
  steps' share of the cold time);
- **changed only**: the same change, as Nix asks after it when it has everything else
  (a consumer that substituted the closure before: its store holds every unchanged path
  and its realisation): a gate restarted with (a copy of) the same ``--cache-dir`` asked
  only for the changed steps' realisations and narinfos; their time against the cold
  time and the same target as **leaf** (the changed steps are decided on the verified
  steps the first gate kept, which the restarted one takes back: tracehook.gate.warmstart);
- **memo**: the same requests asked again of the cold gate, before it stops: every decision
  is then in its memory (the decision memo), so this is what the gate's own HTTP front and
  answer path cost without deciding anything;
- **floor**: the same requests answered by a plain Python HTTP server (tests/cacheserver.py,
  a subprocess: ``http.server``, threads, keep-alive) serving precomputed answers as static
  files (every narinfo, and a realisation file per step): what serving those requests over
  HTTP costs with no decision at all, in the same language; warm / floor.

With ``--top-first``, each run also asks a cold gate (a fresh ``--cache-dir``) for the
closure's top step alone first (its realisation: the whole closure is then decided at
once, before any other request), then for every path as above, the whole on the clock:
what the random order costs the gate (its engine is handed the steps one by one as they
are asked for, and decisions and answers then alternate in one interpreter).

With ``--pattern nix``, every run asks as Nix 2.26 asks a gate when it substitutes the
closure's top (``nix-build --max-jobs 0``, bench/gate_nix.py; the gate's log of that run):
the top step's realisation alone (on the clock, before the clients start), then every
narinfo, the clients as above; no other realisation (Nix follows the top path's references,
narinfo by narinfo: the gate's realisation names no dependent realisations). The default,
``issue``, is the pattern issue 14 names (each step's realisation, then its narinfo).

With ``--cpu``, each run also prints where the CPU went: ``tracehook verify``'s (with its
checker processes), the cold gate's over the clock (the gate, the processes it has and
those it waited for), the clients', and the machine's busy cores in each (``/proc/stat``):
on these 2 cores the cold run's time is bounded by its CPU (see the README). And each
one's interpreter: the CPU of the gate's own process over the clock (all its threads: the
HTTP loop, the engine, the index; one interpreter lock) and of verify's (looked at every
50 ms while it runs: at most that short), each with its share of the time: the part of the
work that cannot go to the other core (above 1 only where threads run C code, hashing or
signature checks, without the interpreter's lock).

With ``--against-src DIR`` (the ``src`` directory of another checkout: ``git worktree add
/tmp/old REV``), each run also asks a cold gate running that code for the whole closure
(first or second, in turn), and prints the two cold times' ratio: a change measured
against the code before it in the same run, as these noisy machines need.

Every answer must be 200: a refusal or a fault stops the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gate  # noqa: E402
from gate import free_port  # noqa: E402
from synth import Closure, generate, with_policy  # noqa: E402

if TYPE_CHECKING:
    import pycurl

TRACEHOOK = str(Path(sys.executable).parent / "tracehook")


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    gate.wait_ready(port, proc, within=30.0)


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (children of every thread: the gate starts its
    checker processes from its engine's thread, its index workers from the index's)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def _status_mib(pid: int, field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib(pid: int) -> float:
    """The sum of the peak RSS (VmHWM) of the gate and the processes it still has."""
    return sum(_status_mib(p, "VmHWM:") for p in _family(pid))


class RssWatch:
    """The largest sum of the resident sets of the gate and all its processes, looked at
    every 0.1 s while it runs (processes that end before the gate, its index workers,
    are in no VmHWM read at the end)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, sum(_status_mib(p, "VmRSS:") for p in
                                           _family(self.pid)))

    def stop(self) -> float:
        """The peak: the largest sum seen, or the sum of peaks at the end if larger."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, peak_rss_mib(self.pid))


def _cpu_ticks(pid: int) -> tuple[int, int, int, int] | None:
    """(utime, stime, cutime, cstime) of ``pid`` in clock ticks (/proc/PID/stat); None
    once it is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        return utime, stime, cutime, cstime
    return None


def family_cpu(pid: int) -> float:
    """CPU seconds (user and system) of the gate, the processes it still has and those it
    waited for (its index workers once they ended)."""
    total = sum(sum(ticks) for p in _family(pid) if (ticks := _cpu_ticks(p)) is not None)
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu(pid: int) -> float | None:
    """CPU seconds (user and system) of the process ``pid`` alone, all its threads (one
    interpreter), without its children; None once it is gone."""
    ticks = _cpu_ticks(pid)
    return None if ticks is None else (ticks[0] + ticks[1]) / os.sysconf("SC_CLK_TCK")


def rusage_cpu(who: int = resource.RUSAGE_CHILDREN) -> float:
    """CPU seconds (user and system) of this process (``resource.RUSAGE_SELF``) or of its
    children that ended and were waited for (the default)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def busy() -> tuple[int, int]:
    """(all, idle) jiffies of the machine since it started (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    spent, idle = after[0] - before[0], after[1] - before[1]
    return (spent - idle) / spent * (os.cpu_count() or 1) if spent else 0.0


# --cpu: the cold run's CPU (the gate's family over the clock, the clients', the machine's
# busy cores, the gate's own process: its one interpreter), filled in by run_gate
CPU: dict[str, float] = {}


class LeanClient:
    """One keep-alive HTTP/1.1 connection that sends a GET and reads the answer by its
    Content-Length, and nothing else: a diagnostic (``--client lean``), to see how much
    of a run is the clients' own work on the cores the gate runs on. The default is
    http.client, whose cost per request alone is about curl's (``bench/client_cost.py
    --runs 3``: curl 79 to 100 us of CPU a request, http.client 75 to 100, this client 35
    to 49); in a cold run, beside the gate on these 2 cores, it costs more than curl does
    (``--cpu``: 5.8 to 6.6 s of CPU for the 19,940 requests against curl's 3.5 to 3.7 s,
    this client's 1.7 to 1.9 s)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head, rest = self.buf[:end], self.buf[end + 4:]
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            self.buf = rest
            self._more()
            rest = self.buf
        self.buf = rest[length:]
        return status, rest[:length]

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class StdlibClient:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


CLIENTS: dict[str, type[LeanClient] | type[StdlibClient]] = {
    "lean": LeanClient, "stdlib": StdlibClient}
CLIENT = ["stdlib"]  # set from --client
PATTERN = ["issue"]  # set from --pattern
GATE_FLAGS: list[str] = []  # set from --gate-flag: more flags for every gate started


def ask_all(port: int, closure: Closure, clients: int, seed: int,
            only: set[str] | None = None, first: str | None = None) -> float:
    """Every path of the closure (with ``only``, of those steps), as Nix asks for it;
    seconds from first to last answer. Each client is a process of its own (forked, its
    connection open before the clock starts) taking the next pair from a shared counter:
    client threads of one interpreter take turns at its lock, which costs CPU of its own
    (``bench/client_cost.py``), taken from the gate on these 2 cores."""
    work = closure.requests(only)
    if PATTERN[0] == "nix" and first is None:  # (see --pattern)
        first = f"/realisations/{closure.realisation_ids[closure.target]}.doi"
        work = [("", narinfo) for _, narinfo in work]
    random.Random(seed).shuffle(work)
    ctx = multiprocessing.get_context("fork")
    taken = ctx.Value("i", 0)
    ready = ctx.Barrier(clients + 1)
    failures: multiprocessing.queues.SimpleQueue[tuple[int, str]] = ctx.SimpleQueue()
    if CLIENT[0] == "curl":
        return _ask_with_curl(port, work, clients, first, ctx, ready)
    if CLIENT[0] == "multi":
        return _ask_with_multi(port, work, clients, first, ctx, failures)
    kind = CLIENTS[CLIENT[0]]

    def client() -> None:
        conn = kind(port)
        ready.wait()
        failed, first = 0, ""
        while True:
            with taken.get_lock():
                i = taken.value
                taken.value = i + 1
            if i >= len(work):
                break
            for path in work[i]:
                if not path:
                    continue
                status, body = conn.get(path)
                if status != 200:
                    failed, first = failed + 1, first or f"{path}: {status} {body[:200]!r}"
        conn.close()
        if failed:
            failures.put((failed, first))

    elapsed = _clocked([ctx.Process(target=client, daemon=True) for _ in range(clients)],
                       ready, port, first, kind)
    _stop_if_failed(failures)
    return elapsed


def _stop_if_failed(failures: multiprocessing.queues.SimpleQueue[tuple[int, str]]) -> None:
    """SystemExit when a client process said some of its requests failed."""
    if not failures.empty():
        failed, example = failures.get()
        raise SystemExit(f"{failed} request(s) failed, e.g. {example}")


def _clocked(procs: list[multiprocessing.context.ForkProcess],
             ready: multiprocessing.synchronize.Barrier, port: int, first: str | None,
             kind: type[LeanClient] | type[StdlibClient]) -> float:
    """Start the client processes (each waits at ``ready``), ask ``first`` alone (with a
    ``kind`` client) when given, let them go, and wait for them: the seconds from the first
    request (``first``'s, or the clients') to the last client's end."""
    for p in procs:
        p.start()
    start = time.perf_counter()
    if first is not None:  # asked alone before the clients start, on the clock
        conn = kind(port)
        status, body = conn.get(first)
        conn.close()
        if status != 200:
            raise SystemExit(f"{first}: {status} {body[:200]!r}")
    ready.wait(timeout=60)
    if first is None:
        start = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    crashed = [p.exitcode for p in procs if p.exitcode != 0]
    if crashed:
        raise SystemExit(f"{len(crashed)} client process(es) failed (exit {crashed[0]})")
    return elapsed


def _ask_with_curl(port: int, work: list[tuple[str, str]], clients: int, first: str | None,
                   ctx: multiprocessing.context.ForkContext,
                   ready: multiprocessing.synchronize.Barrier) -> float:
    """``ask_all`` with curl (``--client curl``), the command-line tool over libcurl, the
    library Nix fetches with: each client process runs one curl on its share of the pairs
    (every ``clients``-th, in the shuffled order), which asks for them one after another on
    one keep-alive connection, each answer to /dev/null and its status to a pipe. The
    shares are fixed beforehand (a pair is not taken from a shared counter as the Python
    clients take it), so one client may end a little after the others."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("--client curl: curl is not installed (apt-get install curl)")
    with tempfile.TemporaryDirectory(prefix="tracehook-gate-scale-curl-") as d:
        configs = []
        for k in range(clients):
            paths = [p for pair in work[k::clients] for p in pair if p]
            config = Path(d) / f"client-{k}.cfg"
            config.write_text("".join(f'url = "http://127.0.0.1:{port}{p}"\n'
                                      'output = "/dev/null"\n' for p in paths))
            configs.append((config, len(paths)))
        statuses: multiprocessing.queues.SimpleQueue[tuple[int, int, str]] = ctx.SimpleQueue()

        def client(config: Path, count: int) -> None:
            ready.wait()
            if not count:  # (fewer pairs than clients)
                return
            out = subprocess.run([curl, "-s", "-K", str(config), "-w", "%{http_code}\n"],
                                 capture_output=True, check=False)
            codes = out.stdout.decode().split()
            bad = [c for c in codes if c != "200"]
            if out.returncode or bad or len(codes) != count:
                statuses.put((len(bad) + count - len(codes), out.returncode,
                              out.stderr.decode()[-200:] or f"status {bad[:1]}"))

        elapsed = _clocked([ctx.Process(target=client, args=c, daemon=True) for c in configs],
                           ready, port, first, StdlibClient)
    if not statuses.empty():
        failed, code, why = statuses.get()
        raise SystemExit(f"{failed} request(s) failed (curl exit {code}): {why}")
    return elapsed


def _ask_with_multi(port: int, work: list[tuple[str, str]], connections: int,
                    first: str | None, ctx: multiprocessing.context.ForkContext,
                    failures: multiprocessing.queues.SimpleQueue[tuple[int, str]]) -> float:
    """``ask_all`` as Nix's own file transfer asks (``--client multi``): one process, one
    thread driving libcurl's multi interface (pycurl) with at most ``connections``
    connections open at once (Nix: ``CURLMOPT_MAX_TOTAL_CONNECTIONS``, ``http-connections``),
    each transfer an easy handle added to the multi handle and removed when done, answers
    kept in memory; each pair asked in turn (the narinfo after the realisation's answer), up
    to ``connections`` pairs at once, the next pair taken as one ends. The connections are
    opened before the clock starts (each asks for ``/nix-cache-info``), as the other
    clients' are."""
    import pycurl  # (only this client needs it)

    ready = ctx.Barrier(2)  # (one client process)

    def client() -> None:
        multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, connections)
        handles = [pycurl.Curl() for _ in range(connections)]
        _drive(multi, handles, [["/nix-cache-info"]] * connections, port)
        ready.wait()
        failed, example = _drive(multi, handles, [[p for p in pair if p] for pair in work],
                                 port)
        multi.close()
        if failed:
            failures.put((failed, example))

    elapsed = _clocked([ctx.Process(target=client, daemon=True)], ready, port, first,
                       StdlibClient)
    _stop_if_failed(failures)
    return elapsed


def _drive(multi: pycurl.CurlMulti, handles: list[pycurl.Curl], work: list[list[str]],
           port: int) -> tuple[int, str]:
    """Ask for every item of ``work`` (each a list of paths asked one after another) with
    ``handles`` on ``multi``; (requests that failed, the first one's reason)."""
    import pycurl

    base = f"http://127.0.0.1:{port}"
    queue = work[::-1]
    bodies: dict[int, list[bytes]] = {}
    pending: dict[int, list[str]] = {}  # handle -> the rest of its item
    failed, example = 0, ""

    def start(handle: pycurl.Curl, paths: list[str]) -> None:
        chunks: list[bytes] = []
        bodies[id(handle)] = chunks
        pending[id(handle)] = paths[1:]
        handle.setopt(pycurl.URL, base + paths[0])
        handle.setopt(pycurl.WRITEFUNCTION, chunks.append)
        multi.add_handle(handle)

    active = 0
    for handle in handles[:len(queue)]:
        start(handle, queue.pop())
        active += 1
    while active:
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, done, errors = multi.info_read()
        for handle, _code, message in errors:
            url = handle.getinfo(pycurl.EFFECTIVE_URL)
            failed, example = failed + 1, example or f"{url}: {message}"
        for handle in done:
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            if status != 200:
                failed += 1
                example = example or (f"{handle.getinfo(pycurl.EFFECTIVE_URL)}: {status} "
                                      f"{b''.join(bodies[id(handle)])[:200]!r}")
        for handle in [*done, *(e[0] for e in errors)]:
            multi.remove_handle(handle)
            rest = pending.pop(id(handle))
            if rest:
                start(handle, rest)
            elif queue:
                start(handle, queue.pop())
            else:
                active -= 1
        if active and not done and not errors:  # (a handle just added runs at once)
            wait = multi.timeout()  # (ms; -1: none asked for)
            multi.select(0.1 if wait < 0 else min(wait / 1000, 0.1))
    return failed, example


def run_gate(policy: Path, closure: Closure, cache_dir: Path, clients: int,
             seed: int, again: bool = False, only: set[str] | None = None,
             src: str | None = None, first: str | None = None
             ) -> tuple[float, float, float, float]:
    """Seconds to ask for every path, the gate's peak RSS, with ``again`` the seconds to
    ask for every path a second time from the same gate (its decisions memoized), and the
    seconds from the process's start until it answered (start-up: reading the last run's
    answers, with a warm --cache-dir, is part of it). ``src``: the gate's code from this
    directory (another checkout's ``src``) instead of this one."""
    started = time.perf_counter()
    log = cache_dir.parent / "gate.stderr"
    with gate_process(policy, closure, cache_dir, log, src) as (port, proc):
        ready = time.perf_counter() - started
        watch = RssWatch(proc.pid)
        try:
            gate0, clients0, busy0 = family_cpu(proc.pid), rusage_cpu(), busy()
            own0 = own_cpu(proc.pid) or 0.0
            elapsed = ask_all(port, closure, clients, seed, only, first)
            CPU.update(gate=family_cpu(proc.pid) - gate0, clients=rusage_cpu() - clients0,
                       cores=busy_cores(busy0, busy()),
                       own=(own_cpu(proc.pid) or 0.0) - own0, clock=elapsed)
            second = ask_all(port, closure, clients, seed + 7) if again else 0.0
        except SystemExit:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            rss = watch.stop()
    return elapsed, rss, second, ready


@contextlib.contextmanager
def gate_process(policy: Path, closure: Closure, cache_dir: Path, log: Path | None = None,
                 src: str | None = None, extra: Sequence[str] = ()
                 ) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A ``tracehook gate`` subprocess in front of the closure's file cache, ready to answer:
    (its port, the process); stopped on leaving. Its stderr goes to ``log`` (appended).
    ``src``: put first on its PYTHONPATH (another checkout's ``src``: its code runs);
    ``extra``: more of its flags."""
    port = free_port()
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    proc = subprocess.Popen(
        [TRACEHOOK, "gate", "--policy", str(policy), "--upstream", f"file://{closure.cache}",
         "--store", str(closure.root), "--listen", f"127.0.0.1:{port}", "--quiet",
         "--cache-dir", str(cache_dir), *GATE_FLAGS, *extra],
        stdout=subprocess.DEVNULL, env=env,
        stderr=subprocess.DEVNULL if log is None else log.open("ab"))
    try:
        wait_ready(port, proc)
        yield port, proc
    finally:
        family = set(_family(proc.pid)) - {proc.pid}  # (its workers' server, its workers)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        _reap(family)  # (those handed to this process when the gate ended)


def run_floor(closure: Closure, tmp: Path, clients: int, seed: int) -> float:
    """The same requests from a static Python HTTP server: no decisions, only serving."""
    root = tmp / "floor"
    (root / "realisations").mkdir(parents=True)
    for real, narinfo in closure.requests():
        name = narinfo.lstrip("/")
        (root / name).write_bytes((closure.cache / name).read_bytes())
        if real:
            (root / real.lstrip("/")).write_text(
                '{"dependentRealisations":{},"id":"' + real.rsplit("/", 1)[1][:-4]
                + '","outPath":"' + name[:32] + '-x","signatures":[]}')
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cacheserver.py"), str(root),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        return ask_all(port, closure, clients, seed)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run_verify(policy: Path, closure: Closure, cache_dir: Path) -> tuple[float, float]:
    """``tracehook verify`` as a user runs it the first time (a fresh verification cache):
    its seconds, and the CPU seconds of its own process (its interpreter; looked at every
    50 ms while it runs, so at most that short).
    Its worker processes are forked from a server process it starts and does not wait for
    (tracehook.stores.workers): they are handed to this process (:func:`_subreaper`), which
    waits for them after verify ends, so that their CPU is in its RUSAGE_CHILDREN
    (``--cpu``)."""
    start = time.perf_counter()
    own = 0.0
    proc = subprocess.Popen([TRACEHOOK, "verify", closure.target, "--policy", str(policy),
                             "--store", str(closure.root), "--cache-dir", str(cache_dir)],
                            stdout=subprocess.DEVNULL)
    seen: set[int] = set()  # its processes, to wait for when they are left to this one
    done = threading.Event()

    def watch() -> None:
        nonlocal own
        while not done.wait(0.05):
            seen.update(_family(proc.pid))
            own = own_cpu(proc.pid) or own  # (the last look before it ends)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc.wait()
    took = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    _reap(seen - {proc.pid})
    return took, own


def _subreaper() -> None:
    """Make this process the one that orphans below it are handed to (Linux prctl
    PR_SET_CHILD_SUBREAPER), so that it can wait for them and count their CPU; called once,
    at the start."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap(pids: set[int], within: float = 20.0) -> None:
    """Wait for ``pids`` that were handed to this process; one waited for by its own
    parent is gone from /proc. Gives up after ``within`` seconds."""
    deadline = time.monotonic() + within
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pids.discard(pid)
            except ChildProcessError:  # not ours (yet): gone, or still its parent's
                if not Path(f"/proc/{pid}").exists():
                    pids.discard(pid)
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--client", choices=sorted([*CLIENTS, "curl", "multi"]), default="multi",
                    help="the benchmark's HTTP client (default multi: libcurl's multi "
                    "interface in one thread, as Nix fetches; stdlib: http.client processes, "
                    "the default until the fifteenth session; curl: the curl tool, over "
                    "libcurl; lean: a diagnostic, see LeanClient)")
    ap.add_argument("--top-first", action="store_true",
                    help="also a cold gate asked first for the closure's top step alone (its "
                    "realisation: the whole closure decided at once), then for every path")
    ap.add_argument("--pattern", choices=("issue", "nix"), default="issue",
                    help="what is asked: issue (default): each step's realisation, then its "
                    "narinfo; nix: the top step's realisation alone, then every narinfo, as "
                    "Nix 2.26 substituting through the gate asks (see the module's docstring)")
    ap.add_argument("--cpu", action="store_true",
                    help="also the CPU seconds of verify (with its checker processes) and of "
                    "the cold run (the gate with its processes over the clock; the clients), "
                    "the machine's busy cores in each, and the CPU of each one's own process "
                    "(its interpreter) with its share of the time")
    ap.add_argument("--against-src", metavar="DIR",
                    help="also a cold gate run with the code in DIR (the src directory of "
                    "another checkout, e.g. `git worktree add /tmp/old REV`: /tmp/old/src), "
                    "alternated with this one's, and their ratio")
    ap.add_argument("--gate-flag", action="append", default=[], metavar="FLAG",
                    help="a flag for every gate this starts, e.g. --gate-flag=--verify-ahead=0 "
                    "(repeat for more)")
    args = ap.parse_args()
    GATE_FLAGS[:] = args.gate_flag
    _subreaper()
    against = str(Path(args.against_src).resolve()) if args.against_src else None
    if against is not None and not (Path(against) / "tracehook" / "__init__.py").is_file():
        raise SystemExit(f"--against-src {args.against_src}: no tracehook package there")
    CLIENT[0] = args.client
    PATTERN[0] = args.pattern
    print(f"{'steps':>7} {'verify s':>9} {'gate cold s':>12} {'us/step':>8} {'ratio':>6} "
          f"{'RSS MiB':>8} {'warm s':>7} {'warm/cold':>9} {'leaf s':>7} {'changed':>8} "
          f"{'leaf target s':>13} {'floor s':>8} {'warm/floor':>10} {'memo s':>7} "
          f"{'start cold s':>12} {'start warm s':>12} {'changed only s':>13} "
          f"{'changed/cold':>11}" + (f" {'against s':>9} {'cold/against':>12}" if against
                                      else "")
          + (f" {'top first s':>11} {'top/verify':>10}" if args.top_first else ""))
    per_step: dict[int, list[float]] = {}
    versus: dict[int, list[float]] = {}
    for n in args.sizes:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="tracehook-gate-scale-") as d:
                tmp = Path(d)
                closure, policy = with_policy(tmp, n)
                cache_dir = tmp / "cache-dir"
                verify0, verify_busy0 = rusage_cpu(), busy()
                verify_s, verify_own = run_verify(policy, closure, tmp / "verify-cache")
                verify_cpu = rusage_cpu() - verify0
                verify_cores = busy_cores(verify_busy0, busy())
                other = 0.0
                if against is not None and run % 2:  # (the other code first every other run)
                    other = run_gate(policy, closure, tmp / "cache-dir-against", args.clients,
                                     run, src=against)[0]
                cold, rss, memo, ready_cold = run_gate(policy, closure, cache_dir,
                                                       args.clients, run, again=True)
                cold_cpu = dict(CPU)
                if against is not None and not run % 2:
                    other = run_gate(policy, closure, tmp / "cache-dir-against", args.clients,
                                     run, src=against)[0]
                warm, _, _, ready_warm = run_gate(policy, closure, cache_dir, args.clients,
                                                  run + 1)
                top = 0.0
                if args.top_first:
                    top = run_gate(policy, closure, tmp / "cache-dir-top", args.clients, run,
                                   first=f"/realisations/"
                                   f"{closure.realisation_ids[closure.target]}.doi")[0]
                last = f"pkg-{n - max(1, n // 50) - 1}"
                changed = generate(tmp, n, changed=last, store=closure.root)
                count = len(closure.steps)
                new_steps = {d for d, _ in changed.steps} - {d for d, _ in closure.steps}
                # Nix's own pattern: it has every path but the changed steps' and asks for
                # those alone (on a copy of the directory: the runs below start as this one)
                shutil.copytree(cache_dir, tmp / "cache-dir-incremental")
                incremental, _, _, _ = run_gate(policy, changed, tmp / "cache-dir-incremental",
                                                args.clients, run + 3, only=new_steps)
                leaf, _, _, _ = run_gate(policy, changed, cache_dir, args.clients, run + 2)
                floor = run_floor(closure, tmp, args.clients, run)
                new = len(new_steps)
                leaf_target = 0.1 * cold + cold * new / count
                per_step.setdefault(n, []).append(cold / count * 1e6)
                print(f"{count:>7} {verify_s:>9.2f} {cold:>12.2f} {cold / count * 1e6:>8.0f} "
                      f"{cold / verify_s:>6.2f} {rss:>8.0f} {warm:>7.2f} {warm / cold:>9.2f} "
                      f"{leaf:>7.2f} {new:>8} {leaf_target:>13.2f} {floor:>8.2f} "
                      f"{warm / floor:>10.2f} {memo:>7.2f} {ready_cold:>12.2f} "
                      f"{ready_warm:>12.2f} {incremental:>13.2f} "
                      f"{incremental / cold:>11.2f}"
                      + (f" {other:>9.2f} {cold / other:>12.2f}" if other else "")
                      + (f" {top:>11.2f} {top / verify_s:>10.2f}" if top else ""), flush=True)
                if args.cpu:
                    print(f"{'':>7} cpu: verify {verify_cpu:.2f} s on {verify_cores:.2f} busy "
                          f"cores; cold: gate {cold_cpu['gate']:.2f} s, clients "
                          f"{cold_cpu['clients']:.2f} s, on {cold_cpu['cores']:.2f} busy cores; "
                          f"gate / verify {cold_cpu['gate'] / verify_cpu:.2f}, gate and clients "
                          f"/ verify {(cold_cpu['gate'] + cold_cpu['clients']) / verify_cpu:.2f}"
                          f"; interpreter: gate {cold_cpu['own']:.2f} s "
                          f"({cold_cpu['own'] / cold_cpu['clock']:.2f} of the clock), verify "
                          f"{verify_own:.2f} s ({verify_own / verify_s:.2f})",
                          flush=True)
                if other:
                    versus.setdefault(count, []).append(cold / other)
    for count, ratios in versus.items():
        print(f"cold / cold with --against-src at {count} steps: median "
              f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) "
              f"over {len(ratios)} runs")
    if len(per_step) > 1:
        sizes = sorted(per_step)
        small, large = statistics.median(per_step[sizes[0]]), statistics.median(per_step[sizes[-1]])
        print(f"per-step cost at {sizes[-1]} / at {sizes[0]}: {large / small:.2f}")


if __name__ == "__main__":
    main()
