"""Address syntax (spec 1.6)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhast.address import Address, parse_address

VALID = [
    # (text, default port, scheme, host, port, path, canonical)
    # UNIX-domain sockets
    ("uds:///var/run/hastctl", 8457, "uds", "", 0, "/var/run/hastctl", "uds:///var/run/hastctl"),
    ("UDS:///tmp/s", 8457, "uds", "", 0, "/tmp/s", "uds:///tmp/s"),
    ("unix:///tmp/s", 8457, "uds", "", 0, "/tmp/s", "uds:///tmp/s"),
    ("Unix://relative/s", 8457, "uds", "", 0, "relative/s", "uds://relative/s"),
    ("/var/run/hastctl", 8457, "uds", "", 0, "/var/run/hastctl", "uds:///var/run/hastctl"),
    # TCP, no prefix
    ("192.0.2.1", 8457, "tcp4", "192.0.2.1", 8457, "", "tcp4://192.0.2.1:8457"),
    ("192.0.2.1:9000", 8457, "tcp4", "192.0.2.1", 9000, "", "tcp4://192.0.2.1:9000"),
    ("peer", 8457, "tcp", "peer", 8457, "", "tcp://peer:8457"),
    ("peer.example.com:1", 8457, "tcp", "peer.example.com", 1, "", "tcp://peer.example.com:1"),
    ("peer_1.example.com.", 8457, "tcp", "peer_1.example.com.", 8457, "", None),
    ("::1", 8457, "tcp6", "::1", 8457, "", "tcp6://[::1]:8457"),
    # A bare IPv6 address never has a port: the last group is part of the address.
    ("::1:8458", 8457, "tcp6", "::1:8458", 8457, "", "tcp6://[::1:8458]:8457"),
    ("2001:DB8::1", 8457, "tcp6", "2001:db8::1", 8457, "", "tcp6://[2001:db8::1]:8457"),
    ("[2001:db8::1]:65535", 8457, "tcp6", "2001:db8::1", 65535, "", None),
    # Bracketed IPv6 without a port (FreeBSD rejects it; we accept it).
    ("[::1]", 8457, "tcp6", "::1", 8457, "", "tcp6://[::1]:8457"),
    # Prefixes, case-insensitive
    ("tcp://192.0.2.1", 8457, "tcp4", "192.0.2.1", 8457, "", "tcp4://192.0.2.1:8457"),
    ("tcp://peer:80", 8457, "tcp", "peer", 80, "", "tcp://peer:80"),
    ("tcp://[::]:80", 8457, "tcp6", "::", 80, "", "tcp6://[::]:80"),
    ("TCP4://198.51.100.1", 8457, "tcp4", "198.51.100.1", 8457, "", None),
    ("tcp4://0.0.0.0:8457", 8457, "tcp4", "0.0.0.0", 8457, "", "tcp4://0.0.0.0:8457"),
    ("tcp4://peer", 8457, "tcp4", "peer", 8457, "", "tcp4://peer:8457"),
    ("Tcp6://[::]:8457", 8457, "tcp6", "::", 8457, "", "tcp6://[::]:8457"),
    ("tcp6://2001:db8:10::1", 8457, "tcp6", "2001:db8:10::1", 8457, "", None),
    ("tcp6://[2001:db8:10::1]:8457", 8457, "tcp6", "2001:db8:10::1", 8457, "", None),
    ("tcp6://peer:7", 8457, "tcp6", "peer", 7, "", "tcp6://peer:7"),
    # Source addresses: default port 0 ("any"), left out of the canonical form.
    ("tcp4://198.51.100.1", 0, "tcp4", "198.51.100.1", 0, "", "tcp4://198.51.100.1"),
    ("[::1]", 0, "tcp6", "::1", 0, "", "tcp6://[::1]"),
    ("10.0.0.1:4000", 0, "tcp4", "10.0.0.1", 4000, "", "tcp4://10.0.0.1:4000"),
]


@pytest.mark.parametrize(
    ("text", "default", "scheme", "host", "port", "path", "canonical"),
    VALID,
    ids=[f"{case[0]}-{case[1]}" for case in VALID],
)
def test_valid(
    text: str,
    default: int,
    scheme: str,
    host: str,
    port: int,
    path: str,
    canonical: str | None,
) -> None:
    address = parse_address(text, default)
    assert address == Address(scheme, host, port, path)  # type: ignore[arg-type]
    if canonical is not None:
        assert str(address) == canonical
    assert parse_address(str(address), default) == address


def test_default_port_is_8457() -> None:
    assert parse_address("peer").port == 8457


@pytest.mark.parametrize(
    ("text", "family"),
    [
        ("uds:///s", socket.AF_UNIX),
        ("/s", socket.AF_UNIX),
        ("1.2.3.4", socket.AF_INET),
        ("tcp://1.2.3.4", socket.AF_INET),
        ("tcp4://peer", socket.AF_INET),
        ("::1", socket.AF_INET6),
        ("tcp6://peer", socket.AF_INET6),
        ("tcp://peer", socket.AF_UNSPEC),
        ("peer", socket.AF_UNSPEC),
    ],
)
def test_family(text: str, family: socket.AddressFamily) -> None:
    assert parse_address(text).family == family
    assert parse_address(text).is_unix == (family == socket.AF_UNIX)


def test_spellings_of_one_address_compare_equal() -> None:
    spellings = ["127.0.0.1", "tcp://127.0.0.1:8457", "TCP4://127.0.0.1", "127.0.0.1:8457"]
    assert len({parse_address(s) for s in spellings}) == 1


INVALID = [
    ("", "The address is empty."),
    ("uds://", "has no path"),
    ("unix://", "has no path"),
    ("uds://" + "x" * 108, "too long (108 bytes; at most 107)"),
    ("uds://a\0b", "NUL"),
    ("http://peer", "Unknown address scheme 'http://'"),
    ("/a://b", "Unknown address scheme '/a://'"),
    ("tcp://", "has no host"),
    (":8457", "has no host"),
    ("tcp4://:80", "has no host"),
    ("peer:", "port number after ':' is missing"),
    ("peer:0", "Port 0 is out of range (1-65535)."),
    ("peer:65536", "Port 65536 is out of range (1-65535)."),
    ("1.2.3.4:70000", "Port 70000 is out of range (1-65535)."),
    ("peer:0000000000080", "out of range"),
    ("peer:http", "Port 'http' is not a decimal number."),
    ("peer:-1", "Port '-1' is not a decimal number."),
    ("[::1]:", "port number after ':' is missing"),
    ("[::1]:0", "out of range"),
    ("[::1]8457", "Unexpected text '8457' after the IPv6 address"),
    ("[::1", "no closing ']'"),
    ("[]:80", "between '[' and ']' is empty"),
    ("[1.2.3.4]:80", "'1.2.3.4' is not a valid IPv6 address."),
    ("[peer]", "'peer' is not a valid IPv6 address."),
    ("1::2::3", "'1::2::3' is not a valid IPv6 address."),
    ("::g", "is not a valid IPv6 address"),
    ("tcp4://[::1]", "tcp4:// cannot be used with the IPv6 address '::1'."),
    ("tcp4://::1", "tcp4:// cannot be used with the IPv6 address '::1'."),
    ("tcp6://127.0.0.1", "tcp6:// cannot be used with the IPv4 address '127.0.0.1'."),
    ("tcp6://127.0.0.1:80", "tcp6:// cannot be used with the IPv4 address"),
    ("256.0.0.1", "'256.0.0.1' is not a valid IPv4 address."),
    ("1.2.3", "'1.2.3' is not a valid IPv4 address."),
    ("01.2.3.4", "not a valid IPv4 address"),
    ("peer..example", "not a valid host name"),
    ("-peer", "not a valid host name"),
    ("peer-", "not a valid host name"),
    ("pe er", "not a valid host name"),
    ("peer]", "not a valid host name"),
    ("a" * 64, "not a valid host name"),
    (".", "not a valid host name"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID, ids=[c[0][:30] for c in INVALID])
def test_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    message = str(info.value)
    assert fragment in message
    assert message.endswith(".")
    assert "\n" not in message


def test_explicit_port_zero_is_rejected_even_for_source() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_address("10.0.0.1:0", 0)


def test_bad_default_port() -> None:
    with pytest.raises(ValueError, match="Default port"):
        parse_address("peer", 70000)


@given(st.ip_addresses(), st.integers(1, 65535), st.sampled_from(["", "tcp://"]))
def test_ip_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, prefix: str
) -> None:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    address = parse_address(f"{prefix}{host}:{port}")
    assert address.host == str(ip)
    assert address.port == port
    assert address.family == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)
    assert parse_address(str(address)) == address


@given(st.text(max_size=40))
def test_arbitrary_text_only_raises_value_error(text: str) -> None:
    try:
        address = parse_address(text)
    except ValueError:
        return
    assert parse_address(str(address)) == address
