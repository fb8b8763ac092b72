"""Fields that keys and evidence elements of a policy share: ``not-after`` and ``revoked``.

A ``not-after`` is a TOML date-time with a zone, or a date (00:00 UTC that day): from then
on the entry counts for nothing. ``revoked = true``: it never counts. Pure.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from tracehook.errors import ConfigError

KeyStatus = Literal["trusted", "expired", "revoked"]


def status(revoked: bool, not_after: dt.datetime | None, now: dt.datetime) -> KeyStatus:
    if revoked:
        return "revoked"
    if not_after is not None and now >= not_after:
        return "expired"
    return "trusted"


def parse_revoked(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"{where}: 'revoked' must be true or false")
    return raw


def parse_date(raw: Any, where: str) -> dt.datetime | None:
    if raw is None:
        return None
    if isinstance(raw, dt.datetime):
        if raw.tzinfo is None:
            raise ConfigError(
                f"{where}: not-after {raw.isoformat()} has no time zone; add one, e.g. "
                f"{raw.isoformat()}Z"
            )
        return raw
    if isinstance(raw, dt.date):
        return dt.datetime(raw.year, raw.month, raw.day, tzinfo=dt.timezone.utc)
    raise ConfigError(
        f"{where}: not-after must be a TOML date or date-time, e.g. 2027-06-01T00:00:00Z "
        "(unquoted)"
    )
