"""Helpers for the verifier's tests: policies, signing with the laut test keys, the CLI.

Keys come from the suite's one key helper (tests/testkeys.py: laut's published test keys
for builderA and builderB, vendored in tests/data/laut-v2; a fixed key for any other name).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testkeys import public_text, secret
from tracehook import cli
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace.claim import BuilderInfo, OutputClaim, TraceKey, sign_trace
from tracehook.trace.tracefile import TraceDocument

__all__ = ["BUILDER", "public_text", "run_verify", "secret", "sign_into", "write_policy"]

BUILDER = BuilderInfo(1, "/nix/store", "nix", "2.26.3")


def write_policy(
    path: Path,
    require: str,
    keys: Mapping[str, str] | Sequence[str] = ("builderA", "builderB"),
    traces: Sequence[str] = (),
) -> Path:
    """``keys``: names (entry = the key), or name -> extra inline fields (``not-after = ...``)."""
    lines = [f"traces = {json.dumps(list(traces))}", "", "[keys]"]
    if isinstance(keys, Mapping):
        for name, extra in keys.items():
            inner = f'key = "{public_text(name)}"' + (f", {extra}" if extra else "")
            lines.append(f"{name} = {{ {inner} }}")
    else:
        lines += [f'{name} = "{public_text(name)}"' for name in keys]
    lines += ["", "[trust]", f"require = {require}", ""]
    path.write_text("\n".join(lines))
    return path


def sign_into(
    store_dir: Path,
    key: TraceKey,
    outputs: Mapping[str, OutputClaim],
    signer: str,
    drv_name: str,
) -> str:
    token = sign_trace(secret(signer), key, outputs, BUILDER, drv_name)
    FileTraceStore(f"file://{store_dir}", store_dir).append(key.key, [token])
    return token


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        obj = json.loads(self.out)
        assert isinstance(obj, dict)
        return obj


def run_verify(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    capsys.readouterr()
    rc = cli.main(["verify", *args])
    captured = capsys.readouterr()
    return CliResult(rc, captured.out, captured.err)


class ChildStore(FileTraceStore):
    """A file trace store that reads differently in any process but the one that made it
    (a checker process): ``in_child`` says what it does there first."""

    def __init__(self, url: str, root: Path) -> None:
        super().__init__(url, root)
        self.parent = os.getpid()

    def in_child(self) -> None:
        raise NotImplementedError

    def read(self, key: str) -> TraceDocument:
        if os.getpid() != self.parent:
            self.in_child()
        return super().read(key)


class DyingStore(ChildStore):
    """Kills the checker process that reads it: one that dies in the middle of a run."""

    def in_child(self) -> None:
        os._exit(3)


class SlowStore(ChildStore):
    """Takes a millisecond per read in a checker process: checkers that fall behind."""

    def in_child(self) -> None:
        time.sleep(0.001)
