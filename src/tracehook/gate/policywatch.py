"""The gate's policy file, kept current: a changed file is noticed within seconds.

The file's content digest is checked at most every ``interval`` seconds (and at once after
:meth:`PolicyWatch.reload`, which SIGHUP calls). A file that parses replaces the policy
(and every answer cached under the old digest is never served again: answers are keyed by
it); a file that does not parse makes :meth:`PolicyWatch.current` raise the ConfigError
until a valid file is back, so the gate fails closed (503, nothing allowed, nothing
cached). Every change is logged as a ``policy-reload`` event with the old and new digests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tracehook.errors import ConfigError
from tracehook.stores.eventlog import EventLog
from tracehook.verify.policy import Policy, parse_policy

DEFAULT_INTERVAL = 2.0


def read_policy(path: Path) -> tuple[Policy, str]:
    """The policy in ``path`` and the digest of its bytes; ConfigError if unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"policy file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"policy file {path} is not UTF-8") from None
    return parse_policy(text, str(path)), digest


class PolicyWatch:
    def __init__(self, path: Path, events: EventLog, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Reads the file now: ConfigError if it is unusable at start."""
        self.path = Path(path)
        self.events = events
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._policy, self._digest = read_policy(self.path)
        self._error: ConfigError | None = None
        self._bad_digest: str | None = None
        self._checked = clock()
        self._force = False

    @property
    def digest(self) -> str:
        return self._digest

    def reload(self) -> None:
        """Check the file at the next request (SIGHUP)."""
        self._force = True

    def current(self) -> tuple[Policy, str]:
        """The policy in force and its digest; ConfigError while the file is broken."""
        now = self.clock()
        if self._force or now - self._checked >= self.interval:
            with self._lock:
                if self._force or now - self._checked >= self.interval:
                    self._force = False
                    self._checked = now
                    self._check()
        if self._error is not None:
            raise self._error
        return self._policy, self._digest

    def _check(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._broken(ConfigError(f"cannot read policy file {self.path}: "
                                     f"{exc.strerror or exc}"), None)
            return
        digest = hashlib.sha256(data).hexdigest()[:16]
        if digest == self._digest and self._error is None:
            return
        if digest == self._bad_digest:
            return  # still the same broken file: already logged
        try:
            policy, digest = read_policy(self.path)
        except ConfigError as exc:
            self._broken(exc, digest)
            return
        old = self._digest
        self._policy, self._digest, self._error, self._bad_digest = policy, digest, None, None
        self.events.emit("policy-reload", "ok",
                         f"policy {self.path} reloaded ({old} -> {digest}): needs "
                         f"{policy.describe()}", old=old, new=digest, policy=str(self.path))

    def _broken(self, exc: ConfigError, digest: str | None) -> None:
        self._error, self._bad_digest = exc, digest
        self.events.emit("policy-reload", "failed",
                         f"policy {self.path} is unusable, refusing everything (503) until "
                         f"it is fixed: {exc.diagnostics()}", reason=exc.diagnostics(),
                         old=self._digest, new=digest, policy=str(self.path))
