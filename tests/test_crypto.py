"""Keys in Nix's file format, Ed25519 signatures, Nix-style detached signatures."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from testkeys import KEYS
from tracehook.errors import BadSignature, ConfigError, ParseError
from tracehook.trace import crypto

# OpenSSL (`openssl pkeyutl -sign -rawin`) made this signature with builderA's secret key
# over GOLDEN_MESSAGE: an independent implementation, so this is a true known answer.
GOLDEN_MESSAGE = b"tracehook golden vector 1"
GOLDEN_SIG_A = bytes.fromhex(
    "b6dd9ac7ec6618b7c30bee3f8c6f6619419b6e010ed01c284db07b8bddf3b644"
    "469018715689b727bd8da62c9551c5ea5d3d3b446e5c096f313ee58304867801"
)

# Nix 2.8 (`nix copy --to file://...?secret-key=builderA`) wrote this narinfo signature for
# /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt (a file holding "hello\n").
NIX_FINGERPRINT = (
    "1;/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt;"
    "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;"
)
NIX_SIG = (
    "builderA:KroDmK5fFy24FclF8QCGfNA412bSgYs73LqWOfuLPml9Q7s7JpmQP9kgDMu40iHKGMeT50USDQQaa++vQyX6Dw=="
)


def named(*rows: tuple[object, ...]) -> list[Any]:
    """Table rows whose first element is the case name, used as the test id."""
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def key_a() -> crypto.SecretKey:
    return crypto.read_secret_key_file(KEYS / "builderA_key.private")


def pub(name: str) -> crypto.PublicKey:
    return crypto.read_public_key_file(KEYS / f"{name}_key.public")


# --- the conformance keys -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["builderA", "builderB"])
def test_secret_key_files_match_public_files(name: str) -> None:
    sk = crypto.read_secret_key_file(KEYS / f"{name}_key.private")
    assert sk.name == name
    assert sk.public == pub(name)


@pytest.mark.parametrize(
    ("name", "thumb"), [("builderA", "bcda8d54470fea3b"), ("builderB", "d9780179d7239d51")]
)
def test_thumbprints(name: str, thumb: str) -> None:
    pk = pub(name)
    der = crypto.spki_der(pk)
    assert der.hex().startswith("302a300506032b6570032100")
    assert len(der) == 44 and der.endswith(pk.key)
    assert crypto.thumbprint16(pk) == thumb


@pytest.mark.parametrize("name", ["builderA", "builderB"])
def test_format_round_trips_the_files(name: str) -> None:
    secret_text = (KEYS / f"{name}_key.private").read_text().strip()
    public_text = (KEYS / f"{name}_key.public").read_text().strip()
    assert crypto.format_secret_key(crypto.parse_secret_key(secret_text)) == secret_text
    assert crypto.format_public_key(crypto.parse_public_key(public_text)) == public_text


def test_golden_signature() -> None:
    assert crypto.sign(key_a(), GOLDEN_MESSAGE) == GOLDEN_SIG_A
    crypto.verify(pub("builderA"), GOLDEN_MESSAGE, GOLDEN_SIG_A)


def test_nix_sign_matches_nix() -> None:
    assert crypto.nix_sign(key_a(), NIX_FINGERPRINT) == NIX_SIG
    keys = {"builderA": pub("builderA")}
    assert crypto.nix_verify(keys, NIX_FINGERPRINT, NIX_SIG) == pub("builderA")


def test_secret_key_repr_hides_seed() -> None:
    sk = key_a()
    assert sk.seed.hex() not in repr(sk)
    assert "seed" not in repr(sk)


# --- verification failures ------------------------------------------------------------------


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


@pytest.mark.parametrize(
    ("case", "key", "message", "sig"),
    named(
        ("tampered_message", "builderA", b"tracehook golden vector 2", GOLDEN_SIG_A),
        ("flipped_signature_bit", "builderA", GOLDEN_MESSAGE, _flip(GOLDEN_SIG_A, 10)),
        ("wrong_key", "builderB", GOLDEN_MESSAGE, GOLDEN_SIG_A),
        ("truncated_signature", "builderA", GOLDEN_MESSAGE, GOLDEN_SIG_A[:63]),
        ("extended_signature", "builderA", GOLDEN_MESSAGE, GOLDEN_SIG_A + b"\0"),
        ("empty_signature", "builderA", GOLDEN_MESSAGE, b""),
        ("zero_signature", "builderA", GOLDEN_MESSAGE, bytes(64)),
    ),
)
def test_bad_signatures(case: str, key: str, message: bytes, sig: bytes) -> None:
    with pytest.raises(BadSignature):
        crypto.verify(pub(key), message, sig)


def test_nix_verify_unknown_key_is_not_bad_signature() -> None:
    keys = {"builderB": pub("builderB")}
    assert crypto.nix_verify(keys, NIX_FINGERPRINT, NIX_SIG) is None


@pytest.mark.parametrize(
    ("case", "sig_line", "error"),
    named(
        ("other_fingerprint", NIX_SIG, BadSignature),
        ("bad_base64", "builderA:!!!!", BadSignature),
        ("short_signature", "builderA:" + base64.b64encode(b"x" * 63).decode(), BadSignature),
        ("no_colon", "builderA", ParseError),
        ("empty_name", ":" + NIX_SIG.split(":", 1)[1], ParseError),
    ),
)
def test_nix_verify_failures(case: str, sig_line: str, error: type[Exception]) -> None:
    keys = {"builderA": pub("builderA")}
    with pytest.raises(error):
        crypto.nix_verify(keys, NIX_FINGERPRINT + "x", sig_line)


# --- malformed key text -----------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


_SK = key_a()
_SK_RAW = _SK.seed + _SK.public.key
_OTHER_PUBLIC = pub("builderB").key


@pytest.mark.parametrize(
    ("case", "text", "needle"),
    named(
        ("empty", "", "empty"),
        ("whitespace_only", " \n", "empty"),
        ("no_colon", _b64(_SK_RAW), "':'"),
        ("empty_name", ":" + _b64(_SK_RAW), "empty"),
        ("bad_base64", "k:not base64!", "base64"),
        ("truncated", "k:" + _b64(_SK_RAW)[:-7], "base64"),
        ("truncated_bytes", "k:" + _b64(_SK_RAW[:63]), "64 bytes"),
        ("public_key_given", "k:" + _b64(_SK.public.key), "public key file"),
        ("mismatched_halves", "k:" + _b64(_SK.seed + _OTHER_PUBLIC), "does not match"),
        ("name_with_colon", "a:b:" + _b64(_SK_RAW), "base64"),
    ),
)
def test_parse_secret_key_errors(case: str, text: str, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        crypto.parse_secret_key(text)
    assert needle in err.value.message


@pytest.mark.parametrize(
    ("case", "text", "needle"),
    named(
        ("empty", "", "empty"),
        ("no_colon", _b64(_OTHER_PUBLIC), "':'"),
        ("empty_name", ":" + _b64(_OTHER_PUBLIC), "empty"),
        ("bad_base64", "k:@@@@", "base64"),
        ("wrong_length", "k:" + _b64(_OTHER_PUBLIC[:31]), "32 bytes"),
        ("secret_key_given", "k:" + _b64(_SK_RAW), "secret key file"),
    ),
)
def test_parse_public_key_errors(case: str, text: str, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        crypto.parse_public_key(text)
    assert needle in err.value.message


def test_parse_strips_newline_and_spaces() -> None:
    text = "  " + crypto.format_public_key(pub("builderA")) + "\n"
    assert crypto.parse_public_key(text) == pub("builderA")


def test_parse_error_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "k.public"
    p.write_text("k:short")
    with pytest.raises(ParseError) as err:
        crypto.read_public_key_file(p)
    assert str(p) in str(err.value)


@pytest.mark.parametrize(
    ("case", "name", "payload_len"),
    [("empty_name", "", 32), ("colon_name", "a:b", 32), ("short_key", "k", 31)],
)
def test_dataclasses_refuse_bad_values(case: str, name: str, payload_len: int) -> None:
    with pytest.raises(ValueError):
        crypto.PublicKey(name, bytes(payload_len))
    with pytest.raises(ValueError):
        crypto.SecretKey(name, bytes(payload_len))


# --- generation and files -------------------------------------------------------------------


def test_generate_sign_verify() -> None:
    sk = crypto.generate_secret_key("test-1")
    assert sk.name == "test-1"
    assert sk != crypto.generate_secret_key("test-1")
    sig = crypto.sign(sk, b"m")
    crypto.verify(sk.public, b"m", sig)
    with pytest.raises(BadSignature):
        crypto.verify(sk.public, b"n", sig)


def test_write_and_read_key_files(tmp_path: Path) -> None:
    sk = crypto.generate_secret_key("cache.example.org-1")
    sp, pp = tmp_path / "key.sec", tmp_path / "key.pub"
    crypto.write_key_files(sk, sp, pp)
    assert stat.S_IMODE(sp.stat().st_mode) == 0o600
    assert stat.S_IMODE(pp.stat().st_mode) == 0o644
    assert sp.read_text() == crypto.format_secret_key(sk) + "\n"
    assert crypto.read_secret_key_file(sp) == sk
    assert crypto.read_public_key_file(pp) == sk.public
    assert sorted(os.listdir(tmp_path)) == ["key.pub", "key.sec"]  # no temp files left


@pytest.mark.parametrize("existing", ["secret", "public"])
def test_write_key_files_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    sp, pp = tmp_path / "key.sec", tmp_path / "key.pub"
    victim = sp if existing == "secret" else pp
    victim.write_text("precious")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        crypto.write_key_files(crypto.generate_secret_key("k"), sp, pp)
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == [victim.name]


def test_write_key_files_refuses_dangling_symlink(tmp_path: Path) -> None:
    sp = tmp_path / "key.sec"
    sp.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        crypto.write_key_files(crypto.generate_secret_key("k"), sp, tmp_path / "key.pub")
    assert not (tmp_path / "elsewhere").exists()


def test_missing_key_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sec"
    with pytest.raises(ConfigError) as err:
        crypto.read_secret_key_file(missing)
    assert str(missing) in str(err.value)
