"""Fuzzing hast.conf: any text either parses or raises ConfigError, nothing else.

The error must also keep its promise: one line, and a position inside the text.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhast.config import HastConfig, parse_config
from pyhast.errors import ConfigError
from pyhast.node import NodeIdentity
from tests.unit.test_config import EXAMPLE_IPV6, EXAMPLE_LAN, EXAMPLE_MINIMAL, UUID

EXAMPLES = [EXAMPLE_MINIMAL, EXAMPLE_LAN, EXAMPLE_IPV6]
IDENTITIES = [
    NodeIdentity("nodea"),
    NodeIdentity("nodeb.example.com"),
    NodeIdentity("drsite"),
    NodeIdentity("host", hostuuid=UUID, hostid=7),
    NodeIdentity("host", node=UUID),
]
KEYWORDS = [
    "control",
    "pidfile",
    "listen",
    "replication",
    "checksum",
    "compression",
    "timeout",
    "exec",
    "metaflush",
    "resource",
    "name",
    "local",
    "remote",
    "source",
    "on",
    "off",
    "fullsync",
    "memsync",
    "async",
    "none",
    "crc32",
    "sha256",
    "hole",
    "lzf",
]
WORDS = [
    *KEYWORDS,
    "{",
    "}",
    "#",
    "# comment\n",
    "0",
    "7",
    "30",
    "99999999999999999999",
    "nodea",
    "nodeb",
    "drsite",
    UUID,
    "db",
    "/dev/x",
    "192.0.2.1",
    "192.0.2.1:70000",
    "tcp4://[::1]",
    "tcp6://[2001:db8::1]:8457",
    "[::1",
    "uds:///s",
    "unix://",
    "@",
    '"',
    "\u00e9",
    "\x00",
]
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

words = st.lists(st.sampled_from(WORDS), max_size=40)
separators = st.sampled_from([" ", "\n", "\t", "  ", "\r\n", ""])


def check(text: str, who: NodeIdentity) -> None:
    """The fuzz invariant."""
    try:
        result = parse_config(text, "fuzz.conf", who)
    except ConfigError as exc:
        rendered = str(exc)
        assert len(rendered.splitlines()) == 1, rendered
        assert rendered.startswith("fuzz.conf:"), rendered
        if exc.line:
            assert 1 <= exc.line <= text.count("\n") + 1, rendered
            assert exc.column >= 1, rendered
            assert rendered.startswith(f"fuzz.conf:{exc.line}:{exc.column}: "), rendered
            assert exc.token is not None, rendered
        return
    assert isinstance(result, HastConfig)
    for resource in result.resources.values():
        assert resource.timeout > 0
        assert resource.localpath
        assert resource.remoteaddr


@settings(SETTINGS, max_examples=400)
@given(st.text(max_size=300), st.sampled_from(IDENTITIES))
def test_arbitrary_text(text: str, who: NodeIdentity) -> None:
    check(text, who)


@settings(SETTINGS, max_examples=300)
@given(st.text(alphabet="abcnoe0179./:[]-_{}# \t\n", max_size=200), st.sampled_from(IDENTITIES))
def test_text_from_the_lexer_alphabet(text: str, who: NodeIdentity) -> None:
    check(text, who)


@settings(SETTINGS, max_examples=300)
@given(words, separators, st.sampled_from(IDENTITIES))
def test_token_soup(tokens: list[str], sep: str, who: NodeIdentity) -> None:
    check(sep.join(tokens) if sep else " ".join(tokens), who)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    """One of the spec's examples with a few random edits."""
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        size = len(text)
        start = draw(st.integers(0, size))
        end = draw(st.integers(start, min(size, start + 40)))
        edit = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "swap"]))
        if edit == "delete":
            text = text[:start] + text[end:]
        elif edit in ("insert", "replace"):
            piece = draw(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)))
            piece = draw(st.sampled_from([piece, f" {piece} ", f"\n{piece}\n"]))
            keep = start if edit == "insert" else end
            text = text[:start] + piece + text[keep:]
        elif edit == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@settings(SETTINGS, max_examples=1000)
@given(mutated_example(), st.sampled_from(IDENTITIES))
def test_mutated_examples(text: str, who: NodeIdentity) -> None:
    check(text, who)


def test_examples_themselves_pass() -> None:
    for text in EXAMPLES:
        for who in IDENTITIES:
            check(text, who)
