"""Resolving a derivation: Nix's ``Derivation::tryResolve`` (Nix 2.4 to 2.34).

Resolution fixes each input derivation's output to one store path: inputDrvs become empty,
the chosen paths join inputSrcs, every upstream placeholder of an input output is replaced
by its path in builder, args and env, and deferred (input-addressed) outputs get the paths
their now-fixed inputs determine. The store-path hash part of the resolved derivation is
the key laut signs (``in.rdrv_aterm_ca``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from tracehook.errors import TracehookError, UnresolvedInput
from tracehook.nix.aterm import aterm_parts
from tracehook.nix.derivation import Derivation, DerivationOutput, bytes_key, quote_list
from tracehook.nix.derivation_hash import hash_derivation_modulo
from tracehook.nix.storepath import (
    STORE_DIR,
    derivation_path,
    hash_part,
    is_store_path,
    make_output_path,
    parse_store_path,
    upstream_placeholder,
)

Chosen = Mapping[tuple[str, str], str]


def _sorted_keys(keys: list[str]) -> list[str]:
    """Sorted by bytes (code point order is byte order for ASCII)."""
    return sorted(keys) if "".join(keys).isascii() else sorted(keys, key=bytes_key)


def _rewrite(s: str, rewrites: Sequence[tuple[str, str]]) -> str:
    """Nix's ``rewriteStrings``: each rewrite (given in key order), searching on from each
    match."""
    if "/" not in s:  # every placeholder starts with "/"
        return s
    for old, new in rewrites:
        if old == new or old not in s:
            continue
        if old in new:  # Nix would loop forever; a placeholder is never part of a path
            raise TracehookError(f"rewrite of {old!r} to {new!r} does not terminate")
        j = s.find(old)
        while j != -1:
            s = s[:j] + new + s[j + len(old) :]
            j = s.find(old, j)
    return s


def resolve(
    drv: Derivation,
    chosen: Chosen,
    store_dir: str = STORE_DIR,
    name: str | None = None,
) -> Derivation:
    """The resolved derivation, given the path chosen for each ``(input drv, output)``.

    Raises UnresolvedInput when an input output has no chosen path, ParseError when a
    chosen path is not a store path. ``name`` defaults to ``drv.name``.
    """
    placeholders: dict[str, str] = {}
    srcs = set(drv.input_srcs)
    for placeholder, path in _chosen_inputs(drv, chosen, store_dir):
        placeholders.setdefault(placeholder, path)
        srcs.add(path)
    rewrites = [(old, placeholders[old]) for old in _sorted_keys(list(placeholders))]

    env: dict[str, str] = {}
    for key in _sorted_keys(list(drv.env)):
        env.setdefault(_rewrite(key, rewrites), _rewrite(drv.env[key], rewrites))
    resolved = Derivation(
        outputs=dict(drv.outputs),
        input_drvs={},
        input_srcs=tuple(_sorted_keys(list(srcs))),
        platform=drv.platform,
        builder=_rewrite(drv.builder, rewrites),
        args=tuple(_rewrite(a, rewrites) for a in drv.args),
        env={key: env[key] for key in _sorted_keys(list(env))},
    )

    deferred = [out for out, o in resolved.outputs.items() if o.is_deferred]
    if not deferred:
        return resolved
    drv_name = resolved.name if name is None else name
    masked = hash_derivation_modulo(resolved, mask_outputs=True, store_dir=store_dir)
    outputs = dict(resolved.outputs)
    env = dict(resolved.env)
    for out in deferred:
        path = make_output_path(out, masked.hashes[out], drv_name, store_dir)
        outputs[out] = DerivationOutput(path, "", "")
        env[out] = path
    env = {key: env[key] for key in _sorted_keys(list(env))}
    return replace(resolved, outputs=outputs, env=env)


def resolved_path(
    drv: Derivation, chosen: Chosen, store_dir: str = STORE_DIR, name: str | None = None
) -> str:
    """The store path of the resolved derivation."""
    return derivation_path(resolve(drv, chosen, store_dir, name), store_dir, name)


def resolved_key(
    drv: Derivation, chosen: Chosen, store_dir: str = STORE_DIR, name: str | None = None
) -> str:
    """laut's ``in.rdrv_aterm_ca``: the hash part of the resolved derivation's path."""
    return hash_part(resolved_path(drv, chosen, store_dir, name))


def resolved_aterm(
    drv: Derivation, chosen: Chosen, store_dir: str = STORE_DIR
) -> tuple[str, list[str]] | None:
    """The ATerm of ``resolve(drv, chosen)`` and its references, written by substitution
    in ``drv``'s own ATerm; None where that would not be exactly what resolving and
    serializing give (deferred outputs, which resolution fills in, and env names holding
    a placeholder, which can change the order of env), so the caller does it the long way.

    Substitution is exact otherwise: a placeholder is ``/`` and nix-base32 characters, so it
    never meets a quote, an escape or another string, and no store path holds one.
    """
    if drv.kind not in ("floating-ca", "input-addressed"):
        return None
    parts = aterm_parts(drv)
    if parts is None:
        return None
    head, platform, tail = parts
    srcs = set(drv.input_srcs)
    for placeholder, path in _chosen_inputs(drv, chosen, store_dir):
        srcs.add(path)
        if placeholder in tail:
            if any(placeholder in key for key in drv.env):
                return None
            tail = tail.replace(placeholder, path)
    refs = _sorted_keys(list(srcs))
    return f"{head},[],[{quote_list(refs)}],{platform}{tail}", refs


def _chosen_inputs(
    drv: Derivation, chosen: Chosen, store_dir: str
) -> list[tuple[str, str]]:
    """``(placeholder, chosen path)`` for every input output ``drv`` references; raises
    UnresolvedInput when one has no chosen path, ParseError when a path is not a store
    path."""
    found = []
    for drv_path, names in drv.input_drvs.items():
        for output in names:
            path = chosen.get((drv_path, output))
            if path is None:
                raise UnresolvedInput(drv_path, output)
            if not is_store_path(path, store_dir):
                parse_store_path(path, store_dir)  # raises, saying what is wrong
            found.append((upstream_placeholder(drv_path, output), path))
    return found
