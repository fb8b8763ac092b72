"""The hook's TOML-free reader of four sign.toml keys, and the loader's check that it agrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracehook.errors import ConfigError
from tracehook.signer import config, fastconf

DEFAULTS = {"agent-socket": "/run/tracehook/agent.sock", "agent-user": "root",
            "agent-timeout": 5.0, "chain-hooks": ()}


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    named(
        ("empty", "", {}),
        ("other keys only", 'spool-dir = "/s"\nstrict = true\npublish-to = [\n  "file:///x",\n]\n',
         {}),
        ("all four", 'agent-socket = "/run/a.sock"\nagent-user = "tracehook"\n'
         'agent-timeout = 2.5\nchain-hooks = ["/a", \'/b c\']\n',
         {"agent-socket": "/run/a.sock", "agent-user": "tracehook", "agent-timeout": 2.5,
          "chain-hooks": ("/a", "/b c")}),
        ("comments and spaces", '  agent-user="990"   # the publisher\n'
         "agent-timeout = 10 # s\n", {"agent-user": "990", "agent-timeout": 10.0}),
        ("multi-line array", 'chain-hooks = [\n  "/a",  # first\n\n  "/b",\n]\n',
         {"chain-hooks": ("/a", "/b")}),
        ("empty array", "chain-hooks = []\n", {"chain-hooks": ()}),
        ("escapes", 'chain-hooks = ["/a \\"q\\" \\\\ b"]\n', {"chain-hooks": ('/a "q" \\ b',)}),
        ("mentioned in a comment", "# agent-user = 'x'\n", {}),
        ("after other tables", 'agent-user = "u"\n[other]\nx = 1\n', {"agent-user": "u"}),
    ),
)
def test_reads(case: str, text: str, expected: dict[str, object]) -> None:
    got = fastconf.parse(text)
    assert got is not None
    assert got.as_dict() == DEFAULTS | expected


@pytest.mark.parametrize(
    ("case", "text"),
    named(
        ("quoted key", '"agent-user" = "x"\n'),
        ("dotted key", 'agent-user.x = "x"\n'),
        ("twice", 'agent-user = "a"\nagent-user = "b"\n'),
        ("in a table", '[t]\nagent-user = "a"\n'),
        ("unicode escape", 'agent-user = "\\u0041"\n'),
        ("multi-line string", 'agent-user = """a"""\n'),
        ("not a string", "agent-user = 5\n"),
        ("timeout with exponent", "agent-timeout = 5e1\n"),
        ("timeout with underscore", "agent-timeout = 5_0\n"),
        ("timeout negative", "agent-timeout = -1\n"),
        ("timeout zero", "agent-timeout = 0\n"),
        ("timeout leading zero", "agent-timeout = 05\n"),
        ("trailing garbage", 'agent-user = "a" b\n'),
        ("unterminated string", 'agent-user = "a\n'),
        ("array unterminated", 'chain-hooks = ["/a"\n'),
        ("array two commas", 'chain-hooks = ["/a",,"/b"]\n'),
        ("array missing comma", 'chain-hooks = ["/a" "/b"]\n'),
        ("array of numbers", "chain-hooks = [1]\n"),
        ("inline table", "chain-hooks = {a = 1}\n"),
        ("control character", 'agent-user = "a\tb"\n'),
        ("no value", "agent-user\n"),
    ),
)
def test_anything_else_is_not_understood(case: str, text: str) -> None:
    assert fastconf.parse(text) is None


def test_read_missing_and_unreadable(tmp_path: Path) -> None:
    got = fastconf.read(str(tmp_path / "missing.toml"))
    assert got is not None and got.as_dict() == DEFAULTS
    (tmp_path / "dir.toml").mkdir()
    assert fastconf.read(str(tmp_path / "dir.toml")) is None
    (tmp_path / "latin1.toml").write_bytes(b'agent-user = "\xe9"\n')
    assert fastconf.read(str(tmp_path / "latin1.toml")) is None


@pytest.mark.parametrize(
    ("case", "text"),
    named(
        ("quoted key", '"agent-user" = "x"\n'),
        ("unicode escape", 'agent-user = "\\u0041"\n'),
        ("underscore number", "agent-timeout = 1_0\n"),
        ("hidden in a multi-line string", 'nix-version = """\nagent-user = "evil"\n"""\n'),
    ),
)
def test_loader_refuses_what_the_fast_reader_reads_otherwise(case: str, text: str,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="plain top-level lines"):
        config.load(path, environ={})


def test_loader_agrees_with_the_fast_reader(tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text('agent-socket = "/run/x/agent.sock"\nagent-user = "990"\n'
                    'agent-timeout = 3\nchain-hooks = [\n "/usr/bin/a",\n "/usr/bin/b",\n]\n')
    cfg = config.load(path, environ={})
    fast = fastconf.read(str(path))
    assert fast is not None
    assert (str(cfg.agent_socket), cfg.agent_user, cfg.agent_timeout, cfg.chain_hooks) == (
        fast.agent_socket, fast.agent_user, fast.agent_timeout, fast.chain_hooks)
