"""Node identity and ``on <node>`` matching (spec 1.5)."""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import pytest

from pyhast import node as node_module
from pyhast.node import NodeIdentity, read_hostid, read_hostuuid

MACHINE_ID = "4c4c454400423510 8051b7c04f335a31".replace(" ", "")
DASHED = "4c4c4544-0042-3510-8051-b7c04f335a31"


def test_full_hostname_is_case_sensitive() -> None:
    who = NodeIdentity("nodea.example.com")
    assert who.matches("nodea.example.com")
    assert not who.matches("NodeA.example.com")


def test_short_hostname_only_when_there_is_a_dot() -> None:
    assert NodeIdentity("nodea.example.com").matches("nodea")
    assert not NodeIdentity("nodea.example.com").matches("Nodea")
    assert not NodeIdentity("nodea.example.com").matches("example")
    assert not NodeIdentity("nodea.example.com").matches("nodea.example")
    plain = NodeIdentity("nodea")
    assert plain.short_hostname is None
    assert plain.matches("nodea")
    assert not plain.matches("")


@pytest.mark.parametrize(
    "name", [MACHINE_ID, MACHINE_ID.upper(), DASHED, DASHED.upper(), DASHED.title()]
)
@pytest.mark.parametrize("stored", [MACHINE_ID, DASHED, DASHED.upper()])
def test_hostuuid_is_case_insensitive_dashed_or_not(stored: str, name: str) -> None:
    assert NodeIdentity("h", hostuuid=stored).matches(name)


@pytest.mark.parametrize(
    "name", [MACHINE_ID[:-1], DASHED + "0", "4c4c45440042-3510-8051-b7c04f335a31", "{" + DASHED]
)
def test_hostuuid_other_spellings_do_not_match(name: str) -> None:
    assert not NodeIdentity("h", hostuuid=MACHINE_ID).matches(name)


def test_non_hex_hostuuid_matches_case_insensitively() -> None:
    who = NodeIdentity("h", hostuuid="Some-Odd-UUID")
    assert who.matches("some-odd-uuid")


def test_hostid_decimal() -> None:
    who = NodeIdentity("h", hostid=3735928559)
    assert who.matches("hostid3735928559")
    assert not who.matches("hostid0xdeadbeef")
    assert not who.matches("HOSTID3735928559")
    assert not who.matches("3735928559")
    assert not NodeIdentity("h").matches("hostidNone")


def test_explicit_node_replaces_the_four_forms() -> None:
    who = NodeIdentity("nodea.example.com", hostuuid=MACHINE_ID, hostid=7, node="Alpha")
    assert who.matches("alpha")
    assert who.matches("ALPHA")
    for other in ["nodea.example.com", "nodea", MACHINE_ID, "hostid7"]:
        assert not who.matches(other)
    assert who.acceptable_names() == ["Alpha"]
    assert str(who) == "Alpha"


def test_acceptable_names_in_matching_order() -> None:
    who = NodeIdentity("nodea.example.com", hostuuid=DASHED, hostid=42)
    assert who.acceptable_names() == ["nodea.example.com", "nodea", DASHED, "hostid42"]
    assert NodeIdentity("nodea").acceptable_names() == ["nodea"]
    assert str(NodeIdentity("nodea")) == "nodea"


def test_current_reads_hast_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "read_hostid", lambda hostname=None: 99)
    monkeypatch.setattr(node_module, "read_hostuuid", lambda: MACHINE_ID)
    monkeypatch.setenv("HAST_NODE", "fromenv")
    who = NodeIdentity.current()
    assert who.node == "fromenv"
    assert who.hostname == socket.gethostname()
    assert (who.hostuuid, who.hostid) == (MACHINE_ID, 99)
    assert NodeIdentity.current("fromarg").node == "fromarg"
    monkeypatch.setenv("HAST_NODE", "")
    assert NodeIdentity.current().node is None
    monkeypatch.delenv("HAST_NODE")
    who = NodeIdentity.current()
    assert who.node is None
    assert who.matches(socket.gethostname())
    assert who.matches("hostid99")


def test_read_hostuuid(tmp_path: Path) -> None:
    first, second = tmp_path / "machine-id", tmp_path / "dbus-machine-id"
    second.write_text(MACHINE_ID.upper() + "\n")
    assert read_hostuuid((str(first), str(second))) == MACHINE_ID
    first.write_text("\n")
    assert read_hostuuid((str(first), str(second))) == MACHINE_ID
    first.write_text(DASHED + "\n")
    assert read_hostuuid((str(first), str(second))) == DASHED
    assert read_hostuuid((str(tmp_path / "none"),)) is None


def test_read_hostid_from_file(tmp_path: Path) -> None:
    path = tmp_path / "hostid"
    path.write_bytes(struct.pack("=I", 0xDEADBEEF))
    assert read_hostid("ignored", str(path)) == 3735928559


def test_read_hostid_from_address(tmp_path: Path) -> None:
    missing = str(tmp_path / "hostid")
    value = read_hostid("127.0.0.1", missing)
    # glibc: the address in network order read as a native int, halves swapped;
    # `hostid` prints 007f0100 for 127.0.0.1 on little-endian machines.
    expected = 0x007F0100 if sys.byteorder == "little" else 0x0001_7F00
    assert value == expected


def test_read_hostid_unresolvable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kw: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert read_hostid("nowhere.invalid", str(tmp_path / "hostid")) is None


def test_read_hostid_short_file_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "hostid"
    path.write_bytes(b"\x01\x02")
    assert read_hostid("127.0.0.1", str(path)) == read_hostid("127.0.0.1", str(tmp_path / "x"))
