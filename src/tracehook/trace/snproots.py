"""The roots an SEV-SNP certificate chain may end at.

AMD's roots for Milan, Genoa and Turin ship in the package (``amd_roots/``, package data
copied from google/go-sev-guest, provenance in ``amd_roots/PROVENANCE.md``): for each
product the ARK (AMD Root Key, self-signed) and the two keys it certified, the ASK (issues
VCEKs) and the ASVK (issues VLEKs). Each ARK is pinned twice: by that file and by the SHA-256
of its DER encoding below; a file whose ARK differs from the pin is refused, so an edited
installation cannot slip in another root.

A policy may add another root (the tests' software provider has one): :func:`root_from_pem`
reads its ARK (and optionally its ASKs) from PEM. Reading the package's own files is the
only I/O here; they are read once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from tracehook.errors import EnvironmentFault, ParseError
from tracehook.trace.pki import Certificate, issue_problem, load_certificates

# product -> (files in amd_roots/, sha256 of the ARK's DER certificate)
_AMD: dict[str, tuple[tuple[str, ...], str]] = {
    "Milan": (
        ("ask_ark_milan.pem", "ask_ark_milan_vlek.pem"),
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    ),
    "Genoa": (
        ("ask_ark_genoa.pem", "ask_ark_genoa_vlek.pem"),
        "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    ),
    "Turin": (
        ("ask_ark_turin_vcek.pem", "ask_ark_turin_vlek.pem"),
        "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    ),
}
AMD_PRODUCTS = tuple(_AMD)


@dataclass(frozen=True)
class SnpRoot:
    """A trust anchor: an ARK, and the intermediates (ASK, ASVK) it issued, known in advance
    so that evidence need only carry its VCEK or VLEK. Made by :func:`amd_roots` and
    :func:`root_from_pem`, which verify the ARK's self-signature and that it issued each
    intermediate: the chain walk does not check those links again."""

    name: str  # "amd-milan", ..., or the name a policy gives its own root
    product: str  # "Milan", "Genoa", "Turin", or the given root's
    ark: Certificate
    intermediates: tuple[Certificate, ...]
    amd: bool  # one of AMD's pinned roots shipped in the package

    def describe(self) -> str:
        return f"{self.name}: {self.ark.common_name} [{self.ark.sha256[:16]}]"


def _split(certs: tuple[Certificate, ...], what: str
           ) -> tuple[Certificate, tuple[Certificate, ...]]:
    """(the one self-issued certificate whose self-signature verifies, the ones it issued)."""
    arks = [c for c in certs if c.self_issued]
    if len(arks) != 1:
        raise ParseError(what, f"holds {len(arks)} self-issued (root) certificates, expected "
                         "one ARK")
    ark = arks[0]
    problem = issue_problem(ark, ark)
    if problem:
        raise ParseError(what, f"the root {ark.common_name!r} is not self-signed: {problem}")
    issued = tuple(c for c in certs if not c.self_issued)
    for cert in issued:
        problem = issue_problem(cert, ark)
        if problem:
            raise ParseError(what, f"{cert.common_name!r} is not issued by the root "
                             f"{ark.common_name!r}: {problem}")
    return ark, issued


@functools.cache
def amd_roots() -> tuple[SnpRoot, ...]:
    """AMD's pinned roots, Milan, Genoa, Turin, in that order."""
    roots = []
    package = resources.files("tracehook.trace").joinpath("amd_roots")
    for product, (files, pin) in _AMD.items():
        certs: tuple[Certificate, ...] = ()
        for name in files:
            try:
                data = package.joinpath(name).read_bytes()
            except OSError as exc:
                raise EnvironmentFault(f"AMD root file amd_roots/{name} of the installed "
                                       f"package cannot be read: {exc}") from None
            certs += load_certificates(data, f"AMD root file amd_roots/{name}")
        unique = tuple({c.der: c for c in certs}.values())
        ark, issued = _split(unique, f"AMD {product} root files")
        if ark.sha256 != pin:
            raise EnvironmentFault(f"the installed AMD {product} ARK (sha256 {ark.sha256}) is "
                                   f"not the pinned one ({pin}): the package was altered")
        roots.append(SnpRoot(f"amd-{product.lower()}", product, ark, issued, amd=True))
    return tuple(roots)


def amd_root(name: str) -> SnpRoot:
    """A pinned root by name (``amd-milan``) or product (``Milan``, any case)."""
    wanted = name.lower()
    for root in amd_roots():
        if wanted in (root.name, root.product.lower()):
            return root
    known = ", ".join(r.name for r in amd_roots())
    raise ValueError(f"no pinned AMD root {name!r} (known: {known})")


def root_from_pem(name: str, data: bytes, what: str, product: str | None = None) -> SnpRoot:
    """A root a policy names: PEM holding one self-signed ARK and optionally certificates it
    issued (AMD's ``cert_chain`` layout: ASK then ARK). ``product`` defaults to the ARK's
    common name without ``ARK-``. ParseError if the file is not such a chain."""
    ark, issued = _split(load_certificates(data, what), what)
    if product is None:
        product = ark.common_name.removeprefix("ARK-") or name
    pinned = {r.ark.der: r for r in amd_roots()}
    return SnpRoot(name, product, ark, issued, amd=ark.der in pinned)
