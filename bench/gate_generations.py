"""Benchmark of a gate that runs longer than a generation: the whole closure asked for
again after the generation it was decided in ended by age.

    .venv/bin/python bench/gate_generations.py [--sizes 10000] [--runs 3] [--clients 8]
                                               [--age 30] [--changed-trace]

A generation of the gate's decisions ends after ``--generation-max-age`` seconds (60 by
default: HTTP and S3 trace stores are read again after it), and a `nixos-rebuild` that
substitutes for longer than that asks the next generation for paths the last one decided.
For each size, a synthetic closure shaped like a package set (bench/synth.py) and in each
run, in turn (which goes first alternates from run to run):

- **handover**: ``tracehook gate --cache-dir DIR --generation-max-age AGE`` (a fresh DIR)
  asked for every path as Nix asks (``gate_scale.ask_all``: realisation then narinfo,
  random order, ``--clients`` client processes): **cold**; then, once ``AGE`` seconds have
  passed since it started, one request that begins the next generation and every path
  again: **next**, on the clock from that request, the next generation's taking over the
  last one's steps and answers (every file they rest on read again: the ``gate-generation``
  line in its log) included;
- **afresh**: the same gate with ``--no-handover``: the next generation decides every step
  again (from the verification cache's facts) and answers again.

With ``--changed-trace``, one step's trace file (a step in the middle of the closure, the
same in every run) is written again between the generations, its signatures in the other
order (the same claims: a builder published it again): the next generation takes over the
steps that do not rest on it and decides it and every step above it again (the line's
``steps_again``), and makes every answer again (a file changed); the afresh gate decides
everything again as before.

Prints, per run, cold and next of each and their ratios, and the peak RSS of each gate
with its processes over the whole run (``gate_scale.RssWatch``: across the generation's
end, when the last generation's engine is still held while the next decides); then the
median (min to max) of next / cold for each and of next (handover) / next (afresh). Every
answer must be 200.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from gate_scale import RssWatch, ask_all, gate_process  # noqa: E402
from synth import Closure, with_policy  # noqa: E402

NO_STEP = "/" + "0" * 32 + ".narinfo"  # a path no step makes: begins a generation, decides nothing


@contextlib.contextmanager
def gate(policy: Path, closure: Closure, tmp: Path, age: float, *extra: str
         ) -> Iterator[tuple[int, Path, int]]:
    """A gate process on a fresh --cache-dir: (its port, its log file, its pid)."""
    run = time.monotonic_ns()
    log = tmp / f"gate-{run}.log"
    with gate_process(policy, closure, tmp / f"cache-{run}", extra=(
            "--log-file", str(log), "--generation-max-age", f"{age:g}", *extra)) as (port, proc):
        yield port, log, proc.pid


def handed_over(log: Path) -> dict[str, object] | None:
    """The ``gate-generation`` record in the gate's log, once there."""
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "gate-generation":
                return dict(record)
    return None


def middle_trace(closure: Closure) -> Path:
    """The trace file of the build step in the middle of the closure's list of steps."""
    drv, out = closure.steps[len(closure.steps) // 2]
    for path in sorted((closure.traces / "traces").iterdir()):
        if path.name.startswith("."):
            continue
        doc = json.loads(path.read_text())
        if any(out.encode() in base64.urlsafe_b64decode(sig.split(".")[1] + "==")
               for sig in doc["signatures"]):
            return path
    raise SystemExit(f"no trace names {out}, the output of {drv}")


def republish(trace: Path) -> None:
    """Write ``trace`` again with its signatures in the other order (the same claims)."""
    doc = json.loads(trace.read_text())
    doc["signatures"].reverse()
    tmp = trace.with_name(f".{trace.name}.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(trace)


def one(policy: Path, closure: Closure, tmp: Path, age: float, clients: int, seed: int,
        handover: bool, changed: Path | None) -> tuple[float, float, float, int]:
    """(cold, next) seconds for one gate, its peak RSS in MiB, and how many steps the next
    generation decided again of those it was handed (-1: nothing handed on)."""
    import http.client

    extra = () if handover else ("--no-handover",)
    again = -1
    with gate(policy, closure, tmp, age, *extra) as (port, log, pid):
        watch = RssWatch(pid)
        started = time.monotonic()
        cold = ask_all(port, closure, clients, seed)
        if time.monotonic() - started > age - 1:
            raise SystemExit(f"the cold run took {cold:.1f} s: give a larger --age than {age:g}")
        if changed is not None:
            original = changed.read_bytes()
            republish(changed)
        time.sleep(age + 0.5 - (time.monotonic() - started))
        begin = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", NO_STEP)
        conn.getresponse().read()
        conn.close()
        if handover:
            while (record := handed_over(log)) is None:
                if time.perf_counter() - begin > 60:
                    raise SystemExit("no gate-generation line within 60 s")
                time.sleep(0.01)
            if record.get("steps" if changed else "answers") == 0:
                raise SystemExit(f"nothing handed over: {record.get('reason')}")
            again = int(str(record.get("steps_again", 0)))
        ask_all(port, closure, clients, seed + 1)
        took = time.perf_counter() - begin
        if changed is not None:
            changed.write_bytes(original)  # (for the next gate)
        return cold, took, watch.stop(), again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--age", type=float, default=30.0,
                    help="--generation-max-age of the gates (longer than a cold run)")
    ap.add_argument("--changed-trace", action="store_true",
                    help="write one step's trace again between the generations")
    args = ap.parse_args()
    print(f"{'steps':>7} {'cold s':>7} {'next s':>7} {'next/cold':>9} {'RSS MiB':>8} "
          f"{'afresh cold s':>13} {'afresh next s':>13} {'next/cold':>9} {'RSS MiB':>8} "
          f"{'next / afresh next':>18}")
    for n in args.sizes:
        mine, theirs, versus = [], [], []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="tracehook-gate-generations-") as d:
                tmp = Path(d)
                closure, policy = with_policy(tmp, n)
                order = [True, False] if run % 2 == 0 else [False, True]
                changed = middle_trace(closure) if args.changed_trace else None
                got = {h: one(policy, closure, tmp, args.age, args.clients, run, h, changed)
                       for h in order}
            (cold, nxt, rss, again), (a_cold, a_next, a_rss, _) = got[True], got[False]
            mine.append(nxt / cold)
            theirs.append(a_next / a_cold)
            versus.append(nxt / a_next)
            print(f"{len(closure.steps):>7} {cold:>7.2f} {nxt:>7.2f} {nxt / cold:>9.2f} "
                  f"{rss:>8.0f} {a_cold:>13.2f} {a_next:>13.2f} {a_next / a_cold:>9.2f} "
                  f"{a_rss:>8.0f} {nxt / a_next:>18.2f}"
                  + (f"  (steps decided again: {again})" if args.changed_trace else ""),
                  flush=True)
        for name, ratios in (("next / cold, handover", mine), ("next / cold, afresh", theirs),
                             ("next: handover / afresh", versus)):
            print(f"{name} at {n} steps: median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} runs")


if __name__ == "__main__":
    main()
