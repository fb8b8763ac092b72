"""Shared fixtures: real Nix tiers and isolated stores (see tests/nixharness.py)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nixharness import TIERS, NixEnv, NixTier, get_tier
from testkeys import CONFORMANCE

_counter = itertools.count()

# Every tracehook run of the suite (in process or not) shares one persistent verification
# cache, fresh for the session: the suite runs cold and warm against it, never against the
# user's ~/.cache/tracehook.
# The directory is removed when the session ends (one given from outside is left alone).
_SESSION_CACHE: str | None = None
if "TRACEHOOK_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="tracehook-facts-")
    os.environ["TRACEHOOK_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", params=TIERS, ids=[f"nix-{t}" for t in TIERS])
def nix_tier(request: pytest.FixtureRequest) -> NixTier:
    """Each real-Nix test runs once per tier (2.26, the main tier; 2.8, the old one)."""
    name = str(request.param)
    return get_tier(name)


@pytest.fixture(scope="session")
def nix226() -> NixTier:
    return get_tier("2.26")


@pytest.fixture(scope="session")
def nix28() -> NixTier:
    return get_tier("2.8")


MakeNixEnv = Callable[..., NixEnv]


@pytest.fixture
def make_nixenv(tmp_path: Path) -> Iterator[MakeNixEnv]:
    """Factory: ``make_nixenv(tier, **nix_conf_settings)`` gives a fresh isolated store."""

    def make(tier: NixTier, **settings: str) -> NixEnv:
        base = tmp_path / f"nix{next(_counter)}"
        env = NixEnv(tier, base)
        if settings:
            env.configure(**settings)
        return env

    yield make


@pytest.fixture
def nixenv(nix_tier: NixTier, make_nixenv: MakeNixEnv) -> NixEnv:
    """One isolated store on the parametrized tier."""
    return make_nixenv(nix_tier)


@pytest.fixture(scope="session")
def conformance() -> Path:
    if not CONFORMANCE.is_dir():
        raise RuntimeError(f"laut's conformance data is missing from {CONFORMANCE}")
    return CONFORMANCE


from seaweed import anonymous_env, seaweed  # noqa: E402, F401  (fixtures: SeaweedFS, S3)

# ---------------------------------------------------------------- real NixOS evaluations
# tests/nixoseval.py; session-wide, so that the batch evaluation runs once for
# tests/test_nixos_eval.py and tests/test_nixos_whole.py.


@pytest.fixture(scope="session")
def nixos_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$NIXPKGS_TREE``; without it, the vendored subset of the NixOS 24.05 tree, extracted
    once for the session (and removed afterwards)."""
    import nixoseval

    scratch = tmp_path_factory.mktemp("nixpkgs")
    yield nixoseval.nixpkgs_tree(scratch)
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def nixos_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NixEnv]:
    """A throwaway Nix 2.26 store for the NixOS evaluations (removed afterwards: the
    evaluations write hundreds of MB of derivations)."""
    env = NixEnv(get_tier("2.26"), tmp_path_factory.mktemp("nixos"))
    yield env
    shutil.rmtree(env.base, ignore_errors=True)


@pytest.fixture(scope="session")
def nixos_facts(nixos_tree: Path, nixos_env: NixEnv) -> dict[str, Any]:
    import nixoseval

    return nixoseval.evaluate_all(nixos_tree, nixos_env)


@pytest.fixture(scope="session")
def nixos_type_errors(nixos_tree: Path, nixos_env: NixEnv) -> dict[str, str]:
    import nixoseval

    return nixoseval.evaluate_type_errors(nixos_tree, nixos_env)
