"""The gate's routes: which request path is which question to the service.

- ``/nix-cache-info``
- ``/<32 nix-base32>.narinfo``
- ``/realisations/sha256:<64 hex>!<output>.doi`` (Nix 2.4 to 2.34)
- ``/build-trace-v2/<drv base name>/<output>.doi`` (Nix 2.35)
- ``/nar/<file>``: streamed from the upstream in chunks, never buffered whole

Every other path is 404; a path that is malformed for its route, or that tries to escape
(``..``, ``//``, backslashes, control characters, percent-encoded slashes), is 400.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

from tracehook.errors import ParseError
from tracehook.gate.decide import NAR_URL
from tracehook.gate.service import NOT_FOUND, Answer, GateService, NarAnswer
from tracehook.nix import realisation

_NARINFO = re.compile(r"/([0-9abcdfghijklmnpqrsvwxyz]{32})\.narinfo")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class Routes:
    def __init__(self, service: GateService) -> None:
        self.service = service
        self._prefixed: tuple[tuple[str, Callable[[str], Answer | NarAnswer]], ...] = (
            ("/realisations/", self._realisation_v1),
            ("/build-trace-v2/", self._realisation_v2),
            ("/nar/", self._nar),
        )

    def route(self, raw_path: str) -> Answer | NarAnswer:
        # (every request comes here: the checks that rarely apply are looked for first)
        path = raw_path
        if "?" in path or "#" in path:
            path = path.split("?", 1)[0].split("#", 1)[0]
        if "%" in path:
            if "%2f" in path.lower() or "%5c" in path.lower():
                return _bad("encoded slash")
            try:
                path = urllib.parse.unquote(path, errors="strict")
            except UnicodeDecodeError:
                return _bad("percent-encoding that is not UTF-8")
        if (not path.startswith("/") or "//" in path or _BAD_CHARS.search(path)
                or ("/." in path and any(part in (".", "..") for part in path.split("/")))):
            return _bad("malformed path")
        service = self.service
        m = _NARINFO.fullmatch(path)
        if m:
            return service.narinfo(m.group(1))
        if path == "/nix-cache-info":
            return service.cache_info()
        if path.endswith(".narinfo"):
            return _bad("a narinfo is /<32 nix-base32 characters>.narinfo")
        for prefix, handler in self._prefixed:
            if path.startswith(prefix):
                return handler(path[len(prefix):])
        return NOT_FOUND

    def _realisation_v1(self, rest: str) -> Answer:
        if not rest.endswith(".doi"):
            return NOT_FOUND
        rid = rest[: -len(".doi")]
        try:
            realisation.parse_realisation_id(rid)
        except ParseError as exc:
            return _bad(exc.diagnostics())
        return self.service.realisation_v1(rid)

    def _realisation_v2(self, rest: str) -> Answer:
        drv_base, sep, file = rest.partition("/")
        if not sep or "/" in file or not file.endswith(".doi"):
            return _bad("expected /build-trace-v2/<drv>/<output>.doi")
        try:
            realisation.parse_build_trace_key(drv_base, file[: -len(".doi")])
        except ParseError as exc:
            return _bad(exc.diagnostics())
        return self.service.realisation_v2(drv_base, file[: -len(".doi")])

    def _nar(self, rest: str) -> Answer | NarAnswer:
        rel = "nar/" + rest
        if not NAR_URL.fullmatch(rel):
            return _bad("expected /nar/<nix-base32>.nar[.<compression>]")
        return self.service.nar(rel)


def _bad(why: str) -> Answer:
    return Answer(400, f"bad request: {why}\n".encode(), reason=why)
