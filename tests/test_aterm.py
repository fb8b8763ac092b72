"""The ATerm parser and serializer: named malformed inputs, escapes, and properties."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracehook.errors import ParseError
from tracehook.nix import nixbase32
from tracehook.nix.aterm import parse
from tracehook.nix.derivation import (
    HASH_SIZES,
    Derivation,
    DerivationOutput,
    decode_drv,
    encode_drv,
    serialize,
    serialize_modulo,
)

# Written by Nix 2.8.0 (nix-instantiate): two outputs, three fixed-output inputs, an env
# value with a quote, a backslash, newline, tab, CR, UTF-8 text and two non-UTF-8 bytes.
SAMPLE = (
    'Derive([("dev","/nix/store/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-dev","",""),("out'
    '","/nix/store/smy3vhp713mgppiximmw27yf0rkm217m-ia1","","")],[("/nix/store/8z23cc'
    '8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv",["out"]),("/nix/store/fklffm4hjd4ml0i9pi'
    '5h25pv5xkgwsvq-fod-flat.drv",["out"]),("/nix/store/hyc7zwli8m04pxj9xzi8fwm4818k0'
    'wr4-fod-sha1.drv",["out"])],["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"'
    'x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c'
    '","echo /nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-flat /nix/store/gzij78s1'
    "grbg6pjv95hvgzd92ksl52wn-fod-rec /nix/store/0wdkj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod"
    '-sha1 > $out; echo dev > $dev"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if'
    '5svcw4lj-bb/busybox"),("dev","/nix/store/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-de'
    'v"),("name","ia1"),("out","/nix/store/smy3vhp713mgppiximmw27yf0rkm217m-ia1"),("o'
    'utputs","out dev"),("system","x86_64-linux"),("weird","quote\\" backslash\\\\ nl'
    '\\n tab\\t cr\\r umlaut \u00fc euro \u20ac raw \udcff\udcfe ")])'
)
SAMPLE_BYTES = encode_drv(SAMPLE)


def test_sample_parses_and_round_trips_byte_for_byte() -> None:
    drv = parse(decode_drv(SAMPLE_BYTES))
    assert drv.env["weird"] == (
        'quote" backslash\\ nl\n tab\t cr\r umlaut \u00fc euro \u20ac raw \udcff\udcfe '
    )
    assert list(drv.outputs) == ["dev", "out"]
    assert drv.input_drvs["/nix/store/8z23cc8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv"] == ("out",)
    assert drv.input_srcs == ("/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb",)
    assert drv.platform == "x86_64-linux"
    assert drv.args[:2] == ("sh", "-c")
    assert drv.name == "ia1"
    assert drv.kind == "input-addressed"
    assert encode_drv(serialize(drv)) == SAMPLE_BYTES


# ------------------------------------------------------------------------ escapes


def _drv(
    outputs: str = '("out","/nix/store/00000000000000000000000000000000-x","","")',
    inputs: str = "",
    srcs: str = "",
    platform: str = '"x86_64-linux"',
    builder: str = '"/bin/sh"',
    args: str = "",
    env: str = '("name","x")',
) -> str:
    return f"Derive([{outputs}],[{inputs}],[{srcs}],{platform},{builder},[{args}],[{env}])"


@pytest.mark.parametrize(
    ("written", "value"),
    [
        pytest.param(r'"a\"b"', 'a"b', id="quote"),
        pytest.param(r'"a\\b"', "a\\b", id="backslash"),
        pytest.param(r'"a\nb\rc\td"', "a\nb\rc\td", id="newline-cr-tab"),
        pytest.param(r'"\a\b\x"', "abx", id="other-escapes-are-literal"),
        pytest.param('"a\nb"', "a\nb", id="raw-newline-is-literal"),
        pytest.param('"\u00fc\u20ac"', "\u00fc\u20ac", id="non-ascii"),
        pytest.param('""', "", id="empty"),
    ],
)
def test_string_escapes(written: str, value: str) -> None:
    drv = parse(_drv(args=written))
    assert drv.args == (value,)
    # ``aterm`` is what Nix would write: the text itself only when that is canonical.
    assert drv.aterm == serialize(drv)
    assert (drv.aterm == _drv(args=written)) == (written not in (r'"\a\b\x"', '"a\nb"'))


def test_serialize_escapes_only_quoted_fields() -> None:
    drv = parse(_drv(args=r'"q\"b\\n\nr\rt\t"', env=r'("name","x"),("v","\"")'))
    text = serialize(drv)
    assert r'["q\"b\\n\nr\rt\t"]' in text
    assert r'("v","\"")' in text


# ------------------------------------------------------------------- malformed inputs

P = "/nix/store/00000000000000000000000000000000"
BAD: list[tuple[str, str, str, int | None]] = [
    ("empty", "", "expected 'Derive('", 0),
    ("wrong-keyword", "Derivation([", "expected 'Derive('", 0),
    ("versioned", 'DrvWithVersion("xp-dyn-drv",[])', "DrvWithVersion", 0),
    ("truncated-after-keyword", "Derive(", "expected '['", 7),
    ("unterminated-string", 'Derive([("out', "unterminated string", 9),
    ("backslash-at-end", 'Derive([("out\\', "unterminated string", 9),
    ("escaped-closing-quote", 'Derive([("out\\"', "unterminated string", 9),
    ("trailing-garbage", _drv() + "x", "trailing data", len(_drv())),
    ("trailing-newline", _drv() + "\n", "trailing data", len(_drv())),
    ("missing-comma", _drv().replace("],[", "][", 1), "expected ','", None),
    ("list-not-closed", _drv().replace(")],[", "),[", 1), "expected", None),
    (
        "dynamic-derivation-input",
        _drv(inputs=f'("{P}-a.drv",(["out"],[]))'),
        "dynamic-derivation inputs",
        None,
    ),
    ("unsorted-env", _drv(env='("z","1"),("a","2")'), "out of order", None),
    ("duplicate-env", _drv(env='("a","1"),("a","2")'), "duplicate environment variable", None),
    (
        "unsorted-outputs",
        _drv(outputs=f'("out","{P}-x","",""),("dev","{P}-x-dev","","")'),
        "out of order",
        None,
    ),
    ("duplicate-src", _drv(srcs=f'"{P}-a","{P}-a"'), "duplicate input source", None),
    ("relative-src", _drv(srcs='"nix/store/a"'), "not absolute", None),
    ("unsorted-input-outputs", _drv(inputs=f'("{P}-a.drv",["out","dev"])'), "out of order", None),
    ("bad-output-name", _drv(outputs=f'("o t","{P}-x","","")'), "invalid output name", 9),
    ("empty-output-name", _drv(outputs=f'("","{P}-x","","")'), "invalid output name", 9),
    ("no-outputs", _drv(outputs=""), "no outputs", 0),
    ("hash-without-algo", _drv(outputs=f'("out","{P}-x","","ab")'), "without a hash algo", 8),
    ("unknown-algo", _drv(outputs='("out","","r:sha257","")'), "unknown hash algorithm", 8),
    (
        "fixed-uppercase-hex",
        _drv(outputs=f'("out","{P}-x","sha1","{"A" * 40}")'),
        "lowercase hex",
        8,
    ),
    ("fixed-short-hash", _drv(outputs=f'("out","{P}-x","sha256","abcd")'), "lowercase hex", 8),
    ("fixed-without-path", _drv(outputs=f'("out","","sha1","{"a" * 40}")'), "not absolute", 8),
    ("floating-with-path", _drv(outputs=f'("out","{P}-x","r:sha256","")'), "must not name", 8),
    ("impure-with-path", _drv(outputs=f'("out","{P}-x","r:sha256","impure")'), "impure", 8),
    (
        "mixed-kinds",
        _drv(outputs=f'("dev","","r:sha256",""),("out","{P}-x","","")'),
        "different kinds",
        0,
    ),
    (
        "fixed-not-named-out",
        _drv(outputs=f'("bin","{P}-x","sha1","{"a" * 40}")'),
        "exactly one output, 'out'",
        0,
    ),
    ("lone-surrogate", _drv(args='"\ud800"'), "not UTF-8", None),
]


@pytest.mark.parametrize(
    ("text", "message", "position"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_malformed(text: str, message: str, position: int | None) -> None:
    with pytest.raises(ParseError) as info:
        parse(text, what="derivation test.drv")
    err = info.value
    assert message in err.message
    assert err.what == "derivation test.drv"
    assert err.position is not None
    assert 0 <= err.position <= len(text)
    if position is not None:
        assert err.position == position


def test_every_truncation_of_a_real_drv_is_a_parse_error() -> None:
    for end in range(len(SAMPLE)):
        with pytest.raises(ParseError) as info:
            parse(SAMPLE[:end])
        assert info.value.position is not None
        assert info.value.position <= end


# ------------------------------------------------------------------------ outputs


@pytest.mark.parametrize(
    ("output", "kind", "method", "algo"),
    [
        pytest.param(DerivationOutput(f"{P}-x", "", ""), "input-addressed", "flat", "", id="ia"),
        pytest.param(DerivationOutput("", "", ""), "deferred", "flat", "", id="deferred"),
        pytest.param(DerivationOutput("", "r:sha256", ""), "floating-ca", "nar", "sha256", id="ca"),
        pytest.param(
            DerivationOutput("", "text:sha256", ""), "floating-ca", "text", "sha256", id="text"
        ),
        pytest.param(
            DerivationOutput(f"{P}-x", "sha1", "a" * 40), "fixed", "flat", "sha1", id="fixed"
        ),
        pytest.param(
            DerivationOutput("", "r:sha256", "impure"), "impure", "nar", "sha256", id="impure"
        ),
        pytest.param(DerivationOutput("", "git:sha1", ""), "floating-ca", "git", "sha1", id="git"),
    ],
)
def test_output_kinds(output: DerivationOutput, kind: str, method: str, algo: str) -> None:
    assert output.kind == kind
    assert output.method == method
    assert output.algo == algo
    assert output.is_fixed == (kind == "fixed")
    assert output.is_floating_ca == (kind == "floating-ca")
    assert output.is_deferred == (kind == "deferred")
    assert output.is_impure == (kind == "impure")


def test_name_from_structured_attrs() -> None:
    drv = parse(_drv(env=r'("__json","{\"name\":\"sa\",\"outputs\":[\"out\"]}")'))
    assert drv.name == "sa"
    with pytest.raises(ParseError):
        _ = parse(_drv(env='("x","y")')).name
    with pytest.raises(ParseError):
        _ = parse(_drv(env='("__json","{")')).name


def test_serialize_modulo_masks_and_replaces_inputs() -> None:
    drv = parse(
        _drv(
            outputs=f'("dev","{P}-x-dev","",""),("out","{P}-x","","")',
            inputs=f'("{P}-a.drv",["out"])',
            env=f'("dev","{P}-x-dev"),("name","x"),("out","{P}-x")',
        )
    )
    text = serialize_modulo(drv, {"ff": ["b", "a"], "00": ["out"]}, mask_outputs=True)
    assert text.startswith(
        'Derive([("dev","","",""),("out","","","")],[("00",["out"]),("ff",["a","b"])]'
    )
    assert text.endswith('[("dev",""),("name","x"),("out","")])')
    assert serialize_modulo(drv, None, mask_outputs=False) == serialize(drv)


def test_serialize_canonicalizes_constructed_derivations() -> None:
    drv = Derivation(
        outputs={"out": DerivationOutput("", "r:sha256", "")},
        input_drvs={f"{P}-b.drv": ("out", "dev"), f"{P}-a.drv": ("out",)},
        input_srcs=(f"{P}-z", f"{P}-a", f"{P}-z"),
        platform="x86_64-linux",
        builder="/bin/sh",
        args=("b", "a"),
        env={"z": "1", "a": "2"},
    )
    again = parse(serialize(drv))
    assert list(again.input_drvs) == [f"{P}-a.drv", f"{P}-b.drv"]
    assert again.input_drvs[f"{P}-b.drv"] == ("dev", "out")
    assert again.input_srcs == (f"{P}-a", f"{P}-z")
    assert again.args == ("b", "a")
    assert list(again.env) == ["a", "z"]


# --------------------------------------------------------------------- properties

NAME_CHARS = string.ascii_letters + string.digits + "+-._?="
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=12)
store_paths = st.builds(
    lambda h, n: f"/nix/store/{h}-{n}",
    st.text(alphabet=nixbase32.ALPHABET, min_size=32, max_size=32),
    names,
)
tricky = st.text(alphabet='"\\\n\r\t ()[],a\u00fc\u20ac\x00\udcff', max_size=16)
free = st.one_of(st.text(max_size=24), st.binary(max_size=24).map(decode_drv), tricky)


def _bkey(s: str) -> bytes:
    return encode_drv(s)


@st.composite
def output_maps(draw: st.DrawFn) -> dict[str, DerivationOutput]:
    kind = draw(st.sampled_from(["input-addressed", "floating-ca", "deferred", "fixed", "impure"]))
    if kind == "fixed":
        algo = draw(st.sampled_from(sorted(HASH_SIZES)))
        prefix = draw(st.sampled_from(["", "r:", "text:", "git:"]))
        digest = draw(st.binary(min_size=HASH_SIZES[algo], max_size=HASH_SIZES[algo]))
        return {"out": DerivationOutput(draw(store_paths), prefix + algo, digest.hex())}
    outs = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    result = {}
    for out in outs:
        if kind == "input-addressed":
            result[out] = DerivationOutput(draw(store_paths), "", "")
        elif kind == "deferred":
            result[out] = DerivationOutput("", "", "")
        else:
            algo = draw(st.sampled_from(["r:sha256", "sha256", "text:sha256", "sha512"]))
            result[out] = DerivationOutput("", algo, "impure" if kind == "impure" else "")
    return result


@st.composite
def derivations(draw: st.DrawFn) -> Derivation:
    drv_paths = draw(st.lists(store_paths.map(lambda p: p + ".drv"), max_size=4, unique=True))
    input_drvs = {
        p: tuple(sorted(draw(st.lists(names, min_size=1, max_size=3, unique=True)), key=_bkey))
        for p in drv_paths
    }
    srcs = draw(st.lists(store_paths, max_size=4, unique=True))
    return Derivation(
        outputs=draw(output_maps()),
        input_drvs=input_drvs,
        input_srcs=tuple(sorted(srcs, key=_bkey)),
        platform=draw(free.filter(lambda s: '"' not in s and "\\" not in s)),
        builder=draw(free),
        args=tuple(draw(st.lists(free, max_size=4))),
        env=draw(st.dictionaries(free, free, max_size=6)),
    )


@given(derivations())
def test_generated_derivations_round_trip(drv: Derivation) -> None:
    text = serialize(drv)
    parsed = parse(text)
    assert parsed == drv
    assert serialize(parsed) == text
    assert parsed.aterm == text
    data = encode_drv(text)
    assert encode_drv(serialize(parse(decode_drv(data)))) == data


def _assert_parse_error_or_stable(text: str) -> None:
    try:
        drv = parse(text)
    except ParseError as e:
        assert e.position is not None
        assert 0 <= e.position <= len(text)
        return
    assert parse(serialize(drv)) == drv
    assert drv.aterm == serialize(drv)  # never a non-canonical text kept as the ATerm


@given(st.text(max_size=200) | st.text(alphabet='Derive([]),"\\/ab', max_size=200))
def test_arbitrary_text_raises_only_parse_error(text: str) -> None:
    _assert_parse_error_or_stable(text)


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=len(SAMPLE)),
    st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]),
    st.text(alphabet='"\\()[],ab\n\u00fc', min_size=1, max_size=3),
)
def test_mutations_of_a_real_drv_raise_only_parse_error(pos: int, op: str, chunk: str) -> None:
    if op == "delete":
        text = SAMPLE[:pos] + SAMPLE[pos + 1 :]
    elif op == "insert":
        text = SAMPLE[:pos] + chunk + SAMPLE[pos:]
    elif op == "replace":
        text = SAMPLE[:pos] + chunk + SAMPLE[pos + len(chunk) :]
    elif op == "truncate":
        text = SAMPLE[:pos]
    else:
        text = SAMPLE[:pos] + SAMPLE[pos : pos + 20] + SAMPLE[pos:]
    _assert_parse_error_or_stable(text)


def test_escape_in_a_field_written_as_is_is_not_kept_as_the_aterm() -> None:
    """Found by the mutation test: the platform (like outputs, inputs and sources) is
    written without escapes, so text with ``\\n`` there is not what Nix writes back."""
    text = SAMPLE.replace('"x86_64-linux"', '"x86_64-l\\nux"', 1)
    drv = parse(text)
    assert drv.aterm == serialize(drv) != text
    assert parse(SAMPLE).aterm == SAMPLE
