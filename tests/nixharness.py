"""Real Nix for tests: the installed tiers, and throwaway stores with their own nix.conf.

Tiers are installed by ``scripts/install-nix.sh`` (the README's test command runs it):
Nix 2.26.3 (main tier) and Nix 2.8.0 (old tier). A missing tier fails the test that asks
for it, with the command to run: tests are never skipped for lack of Nix.

Each :class:`NixEnv` is an isolated chroot-style store (``store = ROOT`` in its nix.conf,
so Nix passes it to hooks in ``NIX_CONFIG``), its own ``NIX_CONF_DIR``, ``HOME`` and
caches, no substituters unless a test sets them, and the sandbox on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tracehook.stores import proc

REPO = Path(__file__).resolve().parents[1]
EXPRS = Path(__file__).resolve().parent / "nix"
DEFAULT_CACHE = Path(os.environ.get("TRACEHOOK_NIX_CACHE", "/var/cache/tracehook-nix"))


@dataclass(frozen=True)
class NixTier:
    name: str
    bindir: Path

    @property
    def version(self) -> str:
        out = proc.run([str(self.bindir / "nix"), "--version"], timeout=60).stdout
        return out.strip().rsplit(" ", 1)[-1]

    def has(self, prog: str) -> bool:
        return (self.bindir / prog).exists()


def tier_bindir(name: str) -> Path:
    if name == "2.26":
        env = os.environ.get("TRACEHOOK_NIX_2_26_BIN")
        return Path(env) if env else DEFAULT_CACHE / "nix-2.26" / "bin"
    if name == "2.8":
        return Path(os.environ.get("TRACEHOOK_NIX_2_8_BIN", "/usr/bin"))
    raise ValueError(f"unknown Nix tier {name!r}")


def get_tier(name: str) -> NixTier:
    bindir = tier_bindir(name)
    if not (bindir / "nix").exists():
        raise RuntimeError(
            f"Nix {name} is not installed at {bindir}: run scripts/install-nix.sh "
            "(the README's test command does)"
        )
    return NixTier(name, bindir)


TIERS = ("2.26", "2.8")

_RESOLVED_RE = re.compile(r"resolved derivation: '([^']+)' -> '([^']+)'")


@dataclass(frozen=True)
class BuildResult:
    out_paths: tuple[str, ...]
    stderr: str

    @property
    def resolved(self) -> dict[str, str]:
        """Unresolved .drv -> resolved .drv, as Nix printed them."""
        return dict(_RESOLVED_RE.findall(self.stderr))


@dataclass
class NixEnv:
    tier: NixTier
    base: Path
    settings: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.conf_dir = self.base / "conf"
        self.home = self.base / "home"
        self.exprs = self.base / "exprs"
        for d in (self.root, self.conf_dir, self.home, self.exprs / "bb"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(EXPRS / "derivations.nix", self.exprs / "derivations.nix")
        busybox = self.exprs / "bb" / "busybox"
        if not busybox.exists():
            shutil.copy2("/bin/busybox", busybox)
        self.write_conf()

    # configuration ------------------------------------------------------------------

    def base_settings(self) -> dict[str, str]:
        return {
            "experimental-features": "nix-command ca-derivations",
            "store": str(self.root),
            "substituters": "",
            "build-users-group": "",
            "sandbox": "true",
            "sandbox-paths": "",
            "narinfo-cache-positive-ttl": "0",
            "narinfo-cache-negative-ttl": "0",
        }

    def write_conf(self) -> None:
        merged = self.base_settings() | self.settings
        text = "".join(f"{k} = {v}\n" for k, v in merged.items())
        (self.conf_dir / "nix.conf").write_text(text)

    def configure(self, **settings: str) -> None:
        """Set nix.conf settings (underscores become dashes) and rewrite the file."""
        self.settings.update({k.replace("_", "-"): v for k, v in settings.items()})
        self.write_conf()

    def env(self) -> dict[str, str]:
        env = {
            "PATH": f"{self.tier.bindir}:/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_STATE_HOME": str(self.home / ".local/state"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "NIX_CONF_DIR": str(self.conf_dir),
            "NIX_USER_CONF_FILES": str(self.conf_dir / "nix.conf"),
            "TMPDIR": str(self.base),
            "LANG": "C.UTF-8",
        }
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "TRACEHOOK_NIX_CACHE"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(self.extra_env)
        return env

    # running Nix --------------------------------------------------------------------

    def run(
        self,
        prog: str,
        *args: str,
        check: bool = True,
        timeout: float = 300,
        extra_env: Mapping[str, str] | None = None,
    ) -> proc.Result:
        return proc.run(
            [str(self.tier.bindir / prog), *args],
            env=self.env(),
            extra_env=extra_env,
            cwd=str(self.base),
            timeout=timeout,
            check=check,
        )

    def instantiate(self, attr: str, salt: str = "") -> str:
        out = self.run(
            "nix-instantiate", str(self.exprs / "derivations.nix"), "-A", attr,
            "--argstr", "salt", salt,
        ).stdout
        return out.strip().splitlines()[-1]

    def build(self, attr: str, *args: str, salt: str = "", check: bool = True) -> BuildResult:
        res = self.run(
            "nix-build", "--no-out-link", str(self.exprs / "derivations.nix"), "-A", attr,
            "--argstr", "salt", salt, *args, check=check,
        )
        outs = tuple(line for line in res.stdout.split() if line.startswith("/"))
        return BuildResult(outs, res.stderr)

    def recorded_realisations(self, drv_paths: list[str]) -> dict[str, str]:
        """What Nix recorded for the outputs of ``drv_paths``: realisation id -> output path.

        Nix 2.26 answers ``nix realisation info --json DRV^*``. Nix 2.8's CLI cannot name
        the outputs of a derivation in a chroot store (it stats the path on the host), so
        for that tier every record is read from the store's own database instead.
        """
        if self.tier.name == "2.8":
            return self.database_realisations()
        out = self.run(
            "nix", "realisation", "info", "--json", *(f"{d}^*" for d in drv_paths)
        ).stdout
        return {str(r["id"]): "/nix/store/" + str(r["outPath"]) for r in json.loads(out)}

    def database_realisations(self) -> dict[str, str]:
        """Every realisation in the store's database: id -> output path."""
        return {rid: path for rid, (path, _) in self.database_realisation_records().items()}

    def database_realisation_records(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Every realisation in the store's database: id -> (output path, signatures)."""
        db = self.root / "nix/var/nix/db/db.sqlite"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT r.drvPath, r.outputName, v.path, r.signatures FROM Realisations r "
                "JOIN ValidPaths v ON v.id = r.outputPath"
            ).fetchall()
        finally:
            conn.close()
        return {
            f"{drv}!{out}": (str(path), tuple(str(sigs or "").split()))
            for drv, out, path, sigs in rows
        }

    def query_hash(self, path: str) -> str:
        return self.run("nix-store", "--query", "--hash", path).stdout.strip()

    def real(self, store_path: str) -> Path:
        """Where a /nix/store path lives on disk for this store."""
        return Path(str(self.root) + store_path)
