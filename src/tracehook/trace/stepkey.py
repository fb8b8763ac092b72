"""A build step's resolution and trace key, from chosen input outputs. No I/O.

Signer and verifier both call :func:`step_key`; they differ only in where the input outputs
come from (the local store's records when signing; verified claims when verifying).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tracehook.errors import MissingPin
from tracehook.nix.derivation import Derivation, encode_drv
from tracehook.nix.resolve import resolve, resolved_aterm
from tracehook.nix.storepath import STORE_DIR, derivation_path, make_text_path
from tracehook.trace.claim import TraceKey, trace_key


@dataclass(frozen=True)
class InputOutput:
    """The output an input derivation produced, as fixed for this resolution."""

    path: str
    content_addressed: bool  # its producer is fixed-output or floating-CA
    nar_hash: bytes | None = None  # required when not content_addressed


def producer_is_content_addressed(drv: Derivation) -> bool:
    """Whether ``drv``'s outputs are content-addressed (their path fixes their content)."""
    return drv.kind in ("fixed", "floating-ca")


@dataclass(frozen=True)
class Resolution:
    """A step resolved: the resolved derivation's path and the trace key. The resolved
    derivation itself is built only when asked for (most steps never need it)."""

    rdrv_path: str
    key: TraceKey
    make_rdrv: Callable[[], Derivation] = field(repr=False, compare=False)

    @functools.cached_property
    def rdrv(self) -> Derivation:
        return self.make_rdrv()


def step_key(
    drv: Derivation,
    inputs: Mapping[tuple[str, str], InputOutput],
    store_dir: str = STORE_DIR,
) -> Resolution:
    """Resolve ``drv`` with ``inputs`` ((input drv path, output) -> what it produced).

    The key is laut's for a floating-CA step whose inputs are all content-addressed, and
    the tracehook-ia-v1 key (pinning input-addressed inputs by NAR hash) otherwise.
    """
    pins: dict[str, bytes] = {}
    for (drv_path, output), io in inputs.items():
        if io.content_addressed:
            continue
        if io.nar_hash is None:
            raise MissingPin(drv_path, output, io.path)
        pins[io.path] = io.nar_hash
    chosen = {k: v.path for k, v in inputs.items()}
    fast = resolved_aterm(drv, chosen, store_dir)
    if fast is None:
        rdrv = resolve(drv, chosen, store_dir)
        rdrv_path = derivation_path(rdrv, store_dir)
        make_rdrv: Callable[[], Derivation] = lambda: rdrv  # noqa: E731
    else:
        text, refs = fast
        rdrv_path = make_text_path(drv.name + ".drv", encode_drv(text), refs, store_dir)
        make_rdrv = functools.partial(resolve, drv, chosen, store_dir)
    return Resolution(rdrv_path, trace_key(rdrv_path, drv.kind == "floating-ca", pins),
                      make_rdrv)
