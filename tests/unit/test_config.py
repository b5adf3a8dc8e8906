"""hast.conf parsing and resolution (spec 1.2-1.4, 1.7)."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from pyhast import config as config_module
from pyhast.config import (
    ConfigReadError,
    HastConfig,
    ResourceConfig,
    load_config,
    parse_config,
)
from pyhast.enums import Checksum, Compression, Replication
from pyhast.errors import ConfigError, ExitCode
from pyhast.node import NodeIdentity

# ---------------------------------------------------------------------------
# The three example configurations of spec 1.7, verbatim.

EXAMPLE_MINIMAL = """\
resource vol0 {
        on nodea {
                local /dev/ada1
                remote 192.0.2.12
        }
        on nodeb {
                local /dev/ada1
                remote 192.0.2.11
        }
}
"""

EXAMPLE_LAN = """\
# global
replication memsync
checksum crc32
compression lzf
timeout 30
exec /usr/local/libexec/hast-event
listen tcp4://198.51.100.1:8457

on nodea {
        listen tcp4://198.51.100.1:8457
        pidfile /var/run/hastd-a.pid
}
on nodeb {
        listen tcp4://198.51.100.2:8457
}

resource db {
        local /dev/gpt/db
        metaflush off
        on nodea {
                source tcp4://198.51.100.1
                remote tcp4://198.51.100.2
        }
        on nodeb {
                source tcp4://198.51.100.2
                remote tcp4://198.51.100.1
        }
}
resource logs {
        name applogs             # -> /dev/hast/applogs
        replication fullsync
        on nodea { local /dev/gpt/logs-a
                   remote 198.51.100.2 }
        on nodeb { local /dev/gpt/logs-b
                   remote 198.51.100.1 }
}
"""

EXAMPLE_IPV6 = """\
listen tcp6://[2001:db8:10::1]:8457
resource archive {
        replication async
        compression lzf
        on 4c4c4544-0042-3510-8051-b7c04f335a31 {
                local /var/hast/archive.img    # a regular file works (512-byte sectors)
                remote none                    # no peer yet; primary runs degraded
        }
        on drsite {
                local /dev/da4
                remote tcp6://[2001:db8:10::1]:8457
        }
}
"""

UUID = "4c4c4544-0042-3510-8051-b7c04f335a31"
DEFAULT_LISTEN = ("tcp4://0.0.0.0:8457", "tcp6://[::]:8457")
HOOK = "/usr/local/libexec/hast-event"


def ident(hostname: str = "nodea", **kw: object) -> NodeIdentity:
    """A fixed identity: no uuid, no hostid unless given."""
    return NodeIdentity(hostname=hostname, **kw)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the default listen list independent of the test host's kernel."""
    monkeypatch.setattr(config_module, "_family_supported", lambda family: True)


def res(
    name: str,
    localpath: str,
    remoteaddr: str,
    *,
    provname: str | None = None,
    sourceaddr: str | None = None,
    replication: Replication = Replication.MEMSYNC,
    checksum: Checksum = Checksum.NONE,
    compression: Compression = Compression.HOLE,
    timeout: int = 20,
    exec: str = "",
    metaflush: bool = True,
) -> ResourceConfig:
    """A ResourceConfig with the spec 1.3 defaults."""
    return ResourceConfig(
        name=name,
        provname=provname or name,
        localpath=localpath,
        remoteaddr=remoteaddr,
        sourceaddr=sourceaddr,
        replication=replication,
        checksum=checksum,
        compression=compression,
        timeout=timeout,
        exec=exec,
        metaflush=metaflush,
    )


def assert_config(
    cfg: HastConfig,
    *,
    control: str = "uds:///var/run/hastctl",
    pidfile: str = "/var/run/hastd.pid",
    listen: tuple[str, ...] = DEFAULT_LISTEN,
    resources: list[ResourceConfig],
) -> None:
    assert cfg.control == control
    assert cfg.pidfile == pidfile
    assert cfg.listen == listen
    assert list(cfg.resources) == [r.name for r in resources]
    for expected in resources:
        assert cfg.resources[expected.name] == expected
    assert cfg.warnings == ()


# ---------------------------------------------------------------------------
# Example 1: minimal pair


@pytest.mark.parametrize("hostname", ["nodea", "nodea.example.com"])
def test_minimal_nodea(hostname: str) -> None:
    cfg = parse_config(EXAMPLE_MINIMAL, "hast.conf", ident(hostname))
    assert cfg.path == "hast.conf"
    assert cfg.node == ident(hostname)
    assert_config(cfg, resources=[res("vol0", "/dev/ada1", "192.0.2.12")])


def test_minimal_nodeb() -> None:
    cfg = parse_config(EXAMPLE_MINIMAL, "hast.conf", ident("nodeb"))
    assert_config(cfg, resources=[res("vol0", "/dev/ada1", "192.0.2.11")])


def test_minimal_nodeb_by_explicit_name() -> None:
    cfg = parse_config(EXAMPLE_MINIMAL, "hast.conf", ident("nodea", node="NodeB"))
    assert_config(cfg, resources=[res("vol0", "/dev/ada1", "192.0.2.11")])


def test_minimal_other_node_lists_acceptable_names() -> None:
    who = NodeIdentity("nodec.example.com", hostuuid="0" * 32, hostid=42)
    with pytest.raises(ConfigError) as info:
        parse_config(EXAMPLE_MINIMAL, "hast.conf", who)
    assert str(info.value) == (
        "hast.conf:1:10: No resource vol0 configuration for this node (acceptable node "
        f"names: nodec.example.com, nodec, {'0' * 32}, hostid42). (near 'vol0')"
    )


# ---------------------------------------------------------------------------
# Example 2: dedicated replication LAN


LAN_COMMON = {
    "checksum": Checksum.CRC32,
    "compression": Compression.LZF,
    "timeout": 30,
    "exec": HOOK,
}


def test_lan_nodea() -> None:
    cfg = parse_config(EXAMPLE_LAN, "hast.conf", ident("nodea"))
    assert_config(
        cfg,
        pidfile="/var/run/hastd-a.pid",
        # Node and global lines accumulate; the exact duplicate is dropped.
        listen=("tcp4://198.51.100.1:8457",),
        resources=[
            res(
                "db",
                "/dev/gpt/db",
                "tcp4://198.51.100.2",
                sourceaddr="tcp4://198.51.100.1",
                replication=Replication.MEMSYNC,
                metaflush=False,
                **LAN_COMMON,  # type: ignore[arg-type]
            ),
            res(
                "logs",
                "/dev/gpt/logs-a",
                "198.51.100.2",
                provname="applogs",
                replication=Replication.FULLSYNC,
                **LAN_COMMON,  # type: ignore[arg-type]
            ),
        ],
    )


def test_lan_nodeb() -> None:
    cfg = parse_config(EXAMPLE_LAN, "hast.conf", ident("nodeb.lan"))
    assert_config(
        cfg,
        # FreeBSD order: matching-node lines first, then the global ones.
        listen=("tcp4://198.51.100.2:8457", "tcp4://198.51.100.1:8457"),
        resources=[
            res(
                "db",
                "/dev/gpt/db",
                "tcp4://198.51.100.1",
                sourceaddr="tcp4://198.51.100.2",
                metaflush=False,
                **LAN_COMMON,  # type: ignore[arg-type]
            ),
            res(
                "logs",
                "/dev/gpt/logs-b",
                "198.51.100.1",
                provname="applogs",
                replication=Replication.FULLSYNC,
                **LAN_COMMON,  # type: ignore[arg-type]
            ),
        ],
    )


# ---------------------------------------------------------------------------
# Example 3: IPv6, node identified by host UUID


ARCHIVE_UUID = res(
    "archive",
    "/var/hast/archive.img",
    "none",
    replication=Replication.ASYNC,
    compression=Compression.LZF,
)


@pytest.mark.parametrize(
    "who",
    [
        pytest.param(ident("somehost", node=UUID), id="explicit-node"),
        pytest.param(ident("somehost", node=UUID.upper()), id="explicit-node-upper"),
        pytest.param(ident("somehost", hostuuid=UUID), id="hostuuid"),
        pytest.param(ident("somehost", hostuuid=UUID.upper()), id="hostuuid-upper"),
        pytest.param(ident("somehost", hostuuid=UUID.replace("-", "")), id="machine-id"),
    ],
)
def test_ipv6_uuid_node(who: NodeIdentity) -> None:
    cfg = parse_config(EXAMPLE_IPV6, "hast.conf", who)
    assert_config(cfg, listen=("tcp6://[2001:db8:10::1]:8457",), resources=[ARCHIVE_UUID])


@pytest.mark.parametrize(
    "who", [ident("drsite"), ident("drsite.example.org"), ident("x", node="drsite")]
)
def test_ipv6_drsite(who: NodeIdentity) -> None:
    cfg = parse_config(EXAMPLE_IPV6, "hast.conf", who)
    assert_config(
        cfg,
        listen=("tcp6://[2001:db8:10::1]:8457",),
        resources=[
            res(
                "archive",
                "/dev/da4",
                "tcp6://[2001:db8:10::1]:8457",
                replication=Replication.ASYNC,
                compression=Compression.LZF,
            )
        ],
    )


def test_ipv6_hostid_node() -> None:
    text = EXAMPLE_IPV6.replace("on drsite", "on hostid3735928559")
    cfg = parse_config(text, "hast.conf", ident("x", hostid=3735928559))
    assert cfg.resources["archive"].localpath == "/dev/da4"


# ---------------------------------------------------------------------------
# Malformed configurations: one line, file:line:column, message, token.

GOOD_RESOURCE = "resource r {\n on nodea {\n  local /l\n  remote none\n }\n}\n"

MALFORMED = [
    # (id, text, line, column, token, message fragment)
    ("unknown-keyword", "foo bar\n", 1, 1, "foo", "Unknown statement 'foo' at global level"),
    (
        "unknown-keyword-in-resource",
        "resource r {\n  fullsync\n}\n",
        2,
        3,
        "fullsync",
        "Unexpected 'fullsync' inside resource 'r'; expected a statement",
    ),
    (
        "remote-at-global",
        "remote 192.0.2.1\n",
        1,
        1,
        "remote",
        "'remote' is only allowed inside an 'on' section of a resource.",
    ),
    (
        "remote-in-resource",
        "resource r {\n remote 192.0.2.1\n}\n",
        2,
        2,
        "remote",
        "Unexpected 'remote' inside resource 'r'; 'remote' is only allowed inside an 'on' "
        "section of a resource.",
    ),
    (
        "source-in-global-on",
        "on nodea {\n source 192.0.2.1\n}\n",
        2,
        2,
        "source",
        "inside the global 'on nodea' section; 'source' is only allowed inside an 'on' "
        "section of a resource.",
    ),
    (
        "name-at-global",
        "name foo\n",
        1,
        1,
        "name",
        "'name' is only allowed inside a resource section or inside an 'on' section of a resource.",
    ),
    (
        "local-in-global-on",
        "on nodea { local /dev/x }\n",
        1,
        12,
        "local",
        "'local' is only allowed inside a resource section",
    ),
    (
        "control-in-resource",
        "resource r {\n control uds:///x\n}\n",
        2,
        2,
        "control",
        "'control' is only allowed at global level or inside a global 'on' section.",
    ),
    (
        "pidfile-in-resource-on",
        "resource r { on nodea { pidfile /x } }\n",
        1,
        25,
        "pidfile",
        "inside the 'on nodea' section of resource 'r'; 'pidfile' is only allowed at global "
        "level or inside a global 'on' section.",
    ),
    (
        "listen-in-resource",
        "resource r { listen 0.0.0.0 }\n",
        1,
        14,
        "listen",
        "'listen' is only allowed at global level or inside a global 'on' section.",
    ),
    (
        "replication-in-global-on",
        "on nodea { replication async }\n",
        1,
        12,
        "replication",
        "'replication' is only allowed at global level or inside a resource section.",
    ),
    (
        "checksum-in-resource-on",
        "resource r { on nodea { checksum crc32 } }\n",
        1,
        25,
        "checksum",
        "'checksum' is only allowed at global level or inside a resource section.",
    ),
    (
        "compression-in-global-on",
        "on nodea { compression lzf }\n",
        1,
        12,
        "compression",
        "'compression' is only allowed",
    ),
    (
        "timeout-in-resource-on",
        "resource r { on nodea { timeout 5 } }\n",
        1,
        25,
        "timeout",
        "'timeout' is only allowed",
    ),
    (
        "exec-in-global-on",
        "on nodea { exec /bin/true }\n",
        1,
        12,
        "exec",
        "'exec' is only allowed",
    ),
    (
        "metaflush-in-global-on",
        "on nodea { metaflush off }\n",
        1,
        12,
        "metaflush",
        "'metaflush' is only allowed at global level, inside a resource section or inside an "
        "'on' section of a resource.",
    ),
    (
        "resource-in-resource",
        "resource r {\n resource s { }\n}\n",
        2,
        2,
        "resource",
        "'resource' is only allowed at global level.",
    ),
    (
        "on-in-on",
        "on nodea {\n on nodeb { }\n}\n",
        2,
        2,
        "on",
        "'on' is only allowed at global level or inside a resource section.",
    ),
    (
        "missing-open-brace",
        "resource r\n  local /dev/x\n",
        2,
        3,
        "local",
        "Unexpected 'local' after 'resource r'; expected '{' to open the section.",
    ),
    (
        "missing-close-brace",
        "resource r {\n on nodea {\n  local /l\n  remote none\n }\n",
        5,
        2,
        "}",
        "Unexpected end of file: the 'resource r' section opened at line 1 is not closed "
        "(missing '}').",
    ),
    (
        "extra-close-brace",
        GOOD_RESOURCE + "}\n",
        7,
        1,
        "}",
        "Unexpected '}' at global level; there is no open section to close.",
    ),
    (
        "numeric-resource-name",
        "resource 7 {\n}\n",
        1,
        10,
        "7",
        "expected a resource name (a word made only of digits is a number",
    ),
    (
        "numeric-node-name",
        "resource r {\n on 12 { }\n}\n",
        2,
        5,
        "12",
        "Unexpected '12' after 'on'; expected a node name",
    ),
    (
        "reserved-word-as-name",
        "resource none { }\n",
        1,
        10,
        "none",
        "expected a resource name ('none' is a reserved word).",
    ),
    ("empty-resource-name", "resource {\n}\n", 1, 10, "{", "expected a resource name."),
    (
        "empty-provider-name",
        "resource r {\n name\n}\n",
        3,
        1,
        "}",
        "Unexpected '}' after 'name'; expected a provider name.",
    ),
    (
        "empty-local-at-eof",
        "resource r { on nodea { remote none local",
        1,
        37,
        "local",
        "Unexpected end of file after 'local'; expected a path.",
    ),
    ("timeout-zero", "timeout 0\n", 1, 9, "0", "Timeout must be greater than zero."),
    ("timeout-zeros", "timeout 000\n", 1, 9, "000", "Timeout must be greater than zero."),
    (
        "timeout-huge",
        "timeout 99999999999999999999\n",
        1,
        9,
        "99999999999999999999",
        "Timeout is too large",
    ),
    (
        "timeout-not-number",
        "timeout ten\n",
        1,
        9,
        "ten",
        "Unexpected 'ten' after 'timeout'; expected a number of seconds.",
    ),
    (
        "timeout-negative",
        "timeout -5\n",
        1,
        9,
        "-5",
        "Unexpected '-5' after 'timeout'; expected a number of seconds.",
    ),
    (
        "bad-replication",
        "replication sometimes\n",
        1,
        13,
        "sometimes",
        "expected 'fullsync', 'memsync' or 'async'.",
    ),
    ("bad-checksum", "checksum md5\n", 1, 10, "md5", "expected 'none', 'crc32' or 'sha256'."),
    ("bad-compression", "compression zstd\n", 1, 13, "zstd", "expected 'none', 'hole' or 'lzf'."),
    ("bad-metaflush", "metaflush yes\n", 1, 11, "yes", "expected 'on' or 'off'."),
    (
        "bad-address-scheme",
        "listen sctp://1.2.3.4\n",
        1,
        8,
        "sctp://1.2.3.4",
        "Invalid listen address: Unknown address scheme 'sctp://'",
    ),
    (
        "bad-port-70000",
        "resource r { on nodea { local /l remote 192.0.2.1:70000 } }\n",
        1,
        41,
        "192.0.2.1:70000",
        "Invalid remote address: Port 70000 is out of range (1-65535).",
    ),
    (
        "bad-ipv4",
        "control tcp://300.1.2.3\n",
        1,
        9,
        "tcp://300.1.2.3",
        "Invalid control address: '300.1.2.3' is not a valid IPv4 address.",
    ),
    (
        "tcp4-with-ipv6",
        "listen tcp4://[::1]:8457\n",
        1,
        8,
        "tcp4://[::1]:8457",
        "tcp4:// cannot be used with the IPv6 address '::1'.",
    ),
    (
        "bad-address-other-node",
        "resource r {\n on nodea { local /l remote none }\n on nodeb { local /l remote ::zz }\n}\n",
        3,
        29,
        "::zz",
        "Invalid remote address: '::zz' is not a valid IPv6 address.",
    ),
    (
        "remote-uds",
        "resource r { on nodea { local /l remote uds:///tmp/s } }\n",
        1,
        41,
        "uds:///tmp/s",
        "Invalid remote address: it must be a TCP address, not a UNIX socket.",
    ),
    (
        "source-port-zero",
        "resource r { on nodea { local /l remote none source 1.2.3.4:0 } }\n",
        1,
        53,
        "1.2.3.4:0",
        "Invalid source address: Port 0 is out of range",
    ),
    (
        "invalid-character",
        "exec /usr/bin/hook@x\n",
        1,
        19,
        "@",
        "Invalid character '@'",
    ),
    (
        "quoting-is-not-supported",
        'local "/dev/x"\n',
        1,
        1,
        "local",
        "'local' is only allowed",
    ),
    (
        "duplicate-resource",
        GOOD_RESOURCE + "resource r {\n on nodea { local /m remote none }\n}\n",
        7,
        10,
        "r",
        "Resource 'r' is defined twice (lines 1 and 7).",
    ),
    (
        "missing-local",
        "resource r {\n on nodea {\n  remote none\n }\n}\n",
        1,
        10,
        "r",
        "Path to local component not configured for resource r.",
    ),
    (
        "missing-remote",
        "resource r {\n local /l\n on nodea {\n }\n on nodeb { remote none }\n}\n",
        3,
        5,
        "nodea",
        "Remote address not configured for resource r.",
    ),
    (
        "no-matching-on",
        "resource r {\n on nodeb { local /l remote none }\n}\n",
        1,
        10,
        "r",
        "No resource r configuration for this node (acceptable node names: nodea.example.com, "
        "nodea, 0123456789abcdef0123456789abcdef, hostid3735928559).",
    ),
    (
        "same-local-path",
        GOOD_RESOURCE + "resource s {\n on nodea { local /l/ remote none }\n}\n",
        8,
        19,
        "/l/",
        "Resource 's' uses the local path '/l' that resource 'r' already uses on this node "
        "(line 3).",
    ),
    (
        "same-provider-name",
        GOOD_RESOURCE + "resource s {\n name r\n on nodea { local /m remote none }\n}\n",
        8,
        7,
        "r",
        "Resource 's' uses the provider name 'r' (/dev/hast/r) that resource 'r' already "
        "uses on this node (line 1).",
    ),
    (
        "provider-name-with-slash",
        "resource r { name a/b on nodea { local /l remote none } }\n",
        1,
        19,
        "a/b",
        "Invalid provider name 'a/b'",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "column", "token", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed(text: str, line: int, column: int, token: str, fragment: str) -> None:
    who = NodeIdentity("nodea.example.com", "0123456789abcdef0123456789abcdef", 3735928559)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "hast.conf", who)
    err = info.value
    rendered = str(err)
    assert len(rendered.splitlines()) == 1
    assert rendered.startswith(f"hast.conf:{line}:{column}: "), rendered
    assert rendered.endswith(f" (near '{token}')"), rendered
    assert fragment in rendered
    assert (err.path, err.line, err.column, err.token) == ("hast.conf", line, column, token)
    assert err.exit_code == ExitCode.CONFIG


def test_error_token_is_kept_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("timeout 5\n\u2028\n", "a\nb.conf", ident())
    rendered = str(info.value)
    assert len(rendered.splitlines()) == 1
    assert rendered.startswith("a\\nb.conf:2:1: Invalid character '\\u2028'")


# ---------------------------------------------------------------------------
# Reading files


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "hast.conf"
    path.write_text(EXAMPLE_MINIMAL)
    cfg = load_config(str(path), ident("nodeb"))
    assert cfg.path == str(path)
    assert cfg.resources["vol0"].remoteaddr == "192.0.2.11"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "hast.conf"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigReadError) as info:
        load_config(str(path), ident())
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.exit_code == ExitCode.OSFILE
    assert int(err.exit_code) == 72
    rendered = str(err)
    assert len(rendered.splitlines()) == 1
    assert rendered.startswith(f"{path}: Unable to read the configuration file: ")


def test_unreadable_file_permission(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "hast.conf"
    path.write_text(EXAMPLE_MINIMAL)
    path.chmod(0)
    with pytest.raises(ConfigReadError, match="Permission denied"):
        load_config(str(path), ident())


def test_non_utf8_bytes_are_a_positioned_error(tmp_path: Path) -> None:
    path = tmp_path / "hast.conf"
    path.write_bytes(b"timeout 5\nexec /bin/h\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ident())
    assert (info.value.line, info.value.column) == (2, 12)


# ---------------------------------------------------------------------------
# Lexical rules


def test_empty_and_comment_only_files_are_valid() -> None:
    for text in ["", "\n\n", "# nothing\n   # at all"]:
        cfg = parse_config(text, "hast.conf", ident())
        assert cfg.resources == {}
        assert cfg.listen == DEFAULT_LISTEN


def test_comments_anywhere_and_crlf() -> None:
    text = "resource r{#c\r\n on nodea{local /l#c\r\nremote none}}#end"
    cfg = parse_config(text, "hast.conf", ident())
    assert cfg.resources["r"].localpath == "/l"


def test_keywords_are_reserved_but_longer_words_are_names() -> None:
    text = "resource resources {\n on onion { local /l remote none }\n}\n"
    cfg = parse_config(text, "hast.conf", ident("onion"))
    assert list(cfg.resources) == ["resources"]
    with pytest.raises(ConfigError, match="'on' is a reserved word"):
        parse_config("resource x { on on { } }", "hast.conf", ident())


def test_word_starting_with_digits_is_a_name() -> None:
    cfg = parse_config("resource 7a { on 1x { local /l remote none } }", "f", ident("1x"))
    assert list(cfg.resources) == ["7a"]


def test_timeout_is_decimal_with_leading_zeros() -> None:
    cfg = parse_config("timeout 007\n" + GOOD_RESOURCE, "f", ident())
    assert cfg.resources["r"].timeout == 7


# ---------------------------------------------------------------------------
# Where each statement is legal: the grammar agrees with spec table 1.2.

STATEMENTS = {
    "control": "control uds:///tmp/ctl",
    "pidfile": "pidfile /tmp/pid",
    "listen": "listen 127.0.0.1",
    "replication": "replication async",
    "checksum": "checksum sha256",
    "compression": "compression none",
    "timeout": "timeout 5",
    "exec": "exec /bin/true",
    "metaflush": "metaflush off",
    "name": "name other",
    "local": "local /other",
    "remote": "remote none",
    "source": "source 127.0.0.1",
    "resource": "resource q { on nodea { local /q remote none } }",
    "on": "on nodeb { }",
}
LEVELS = {
    "global": ("{}", {"control", "pidfile", "listen", "replication", "checksum"}
               | {"compression", "timeout", "exec", "metaflush", "resource", "on"}),
    "global on": ("on nodea {{ {} }}", {"control", "pidfile", "listen"}),
    "resource": (
        "resource r {{ {} on nodea {{ local /l remote none }} }}",
        {"replication", "checksum", "compression", "timeout", "exec", "metaflush", "name"}
        | {"local", "on"},
    ),
    "on": (
        "resource r {{ on nodea {{ local /l remote none {} }} }}",
        {"name", "local", "remote", "source", "metaflush"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("keyword", list(STATEMENTS))
def test_statement_legality_matches_spec_table(level: str, keyword: str) -> None:
    template, legal = LEVELS[level]
    text = template.format(STATEMENTS[keyword])
    if keyword in legal:
        parse_config(text, "hast.conf", ident())
    else:
        with pytest.raises(ConfigError, match=f"'{keyword}' is only allowed"):
            parse_config(text, "hast.conf", ident())


# ---------------------------------------------------------------------------
# Resolution rules (spec 1.4)


def test_defaults() -> None:
    cfg = parse_config(GOOD_RESOURCE, "hast.conf", ident())
    assert_config(cfg, resources=[res("r", "/l", "none")])
    r = cfg.resources["r"]
    assert r.exec_path == r.exec == ""
    assert r.sourceaddr is None


def test_global_settings_apply_regardless_of_position() -> None:
    text = GOOD_RESOURCE + (
        "replication fullsync\nchecksum sha256\ncompression none\ntimeout 7\nexec /h\n"
        "metaflush off\ncontrol /tmp/ctl\npidfile /tmp/pid\nlisten 127.0.0.1\n"
    )
    cfg = parse_config(text, "hast.conf", ident())
    assert_config(
        cfg,
        control="/tmp/ctl",
        pidfile="/tmp/pid",
        listen=("127.0.0.1",),
        resources=[
            res(
                "r",
                "/l",
                "none",
                replication=Replication.FULLSYNC,
                checksum=Checksum.SHA256,
                compression=Compression.NONE,
                timeout=7,
                exec="/h",
                metaflush=False,
            )
        ],
    )


def test_resource_values_beat_global_values() -> None:
    text = (
        "replication fullsync\nchecksum sha256\ncompression none\ntimeout 7\nexec /h\n"
        "resource r {\n replication async\n checksum crc32\n compression lzf\n timeout 9\n"
        " exec /g\n on nodea { local /l remote none }\n}\n"
        "resource s {\n on nodea { local /m remote none }\n}\n"
    )
    cfg = parse_config(text, "hast.conf", ident())
    r, s = cfg.resources["r"], cfg.resources["s"]
    assert (r.replication, r.checksum, r.compression, r.timeout, r.exec) == (
        Replication.ASYNC,
        Checksum.CRC32,
        Compression.LZF,
        9,
        "/g",
    )
    assert (s.replication, s.checksum, s.compression, s.timeout, s.exec) == (
        Replication.FULLSYNC,
        Checksum.SHA256,
        Compression.NONE,
        7,
        "/h",
    )


@pytest.mark.parametrize(
    ("glob", "resource", "node", "expected"),
    [
        ("", "", "", True),
        ("metaflush off", "", "", False),
        ("metaflush off", "metaflush on", "", True),
        ("metaflush on", "metaflush off", "", False),
        ("metaflush off", "metaflush off", "metaflush on", True),
        ("", "metaflush on", "metaflush off", False),
        ("metaflush off", "", "metaflush on", True),
    ],
)
def test_metaflush_precedence(glob: str, resource: str, node: str, expected: bool) -> None:
    text = f"{glob}\nresource r {{ {resource} on nodea {{ local /l remote none {node} }} }}"
    cfg = parse_config(text, "hast.conf", ident())
    assert cfg.resources["r"].metaflush is expected


def test_node_metaflush_of_other_node_is_ignored() -> None:
    text = "resource r { on nodeb { metaflush off } on nodea { local /l remote none } }"
    assert parse_config(text, "f", ident()).resources["r"].metaflush is True


@pytest.mark.parametrize(
    ("resource", "node", "provname", "local"),
    [
        ("local /rl", "", "r", "/rl"),
        ("name rp local /rl", "", "rp", "/rl"),
        ("name rp local /rl", "name np local /nl", "np", "/nl"),
        ("", "name np local /nl", "np", "/nl"),
        ("local /rl", "name np", "np", "/rl"),
    ],
)
def test_name_and_local_precedence(resource: str, node: str, provname: str, local: str) -> None:
    text = f"resource r {{ {resource} on nodea {{ remote none {node} }} on nodeb {{ }} }}"
    cfg = parse_config(text, "hast.conf", ident())
    assert (cfg.resources["r"].provname, cfg.resources["r"].localpath) == (provname, local)


def test_control_and_pidfile_matching_node_overrides_regardless_of_order() -> None:
    text = (
        "on nodea { control uds:///a.sock pidfile /a.pid }\n"
        "on nodeb { control uds:///b.sock pidfile /b.pid }\n"
        "control uds:///g.sock\npidfile /g.pid\n"
    )
    a = parse_config(text, "hast.conf", ident("nodea"))
    assert (a.control, a.pidfile) == ("uds:///a.sock", "/a.pid")
    c = parse_config(text, "hast.conf", ident("nodec"))
    assert (c.control, c.pidfile) == ("uds:///g.sock", "/g.pid")


def test_listen_accumulates_node_lines_first_and_drops_exact_duplicates() -> None:
    text = (
        "listen 10.0.0.1\n"
        "on nodea { listen 10.0.0.2 listen 10.0.0.1 }\n"
        "on nodeb { listen 10.0.0.3 }\n"
        "listen uds:///tmp/l\n"
        "on nodea.example.com { listen 10.0.0.4 }\n"
        "listen 10.0.0.2\n"
    )
    cfg = parse_config(text, "hast.conf", ident("nodea.example.com"))
    assert cfg.listen == ("10.0.0.2", "10.0.0.1", "10.0.0.4", "uds:///tmp/l")
    assert cfg.warnings == ()


def test_listen_same_address_spelled_twice_warns() -> None:
    cfg = parse_config("listen 10.0.0.1\nlisten tcp4://10.0.0.1:8457\n", "f", ident())
    assert cfg.listen == ("10.0.0.1", "tcp4://10.0.0.1:8457")
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith("f:2:8: Listen address 'tcp4://10.0.0.1:8457' is the same")


def test_default_listen_depends_on_supported_families(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_family_supported", lambda f: f == socket.AF_INET)
    assert parse_config("", "f", ident()).listen == ("tcp4://0.0.0.0:8457",)
    monkeypatch.setattr(config_module, "_family_supported", lambda f: f == socket.AF_INET6)
    assert parse_config("", "f", ident()).listen == ("tcp6://[::]:8457",)
    # Explicit listen lines need no probe.
    monkeypatch.setattr(config_module, "_family_supported", lambda f: False)
    assert parse_config("listen /tmp/s", "f", ident()).listen == ("/tmp/s",)
    with pytest.raises(ConfigError, match=r"^f: No address to listen on\.$"):
        parse_config("", "f", ident())


def test_family_probe_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    assert config_module._family_supported(socket.AF_INET) is True


def test_two_matching_on_sections_later_wins_per_setting() -> None:
    text = (
        "resource r {\n"
        " on nodea { local /first remote 10.0.0.1 source 10.0.0.9 }\n"
        " on nodea.example.com { local /second remote 10.0.0.2 }\n"
        "}\n"
    )
    cfg = parse_config(text, "hast.conf", ident("nodea.example.com"))
    r = cfg.resources["r"]
    assert (r.localpath, r.remoteaddr, r.sourceaddr) == ("/second", "10.0.0.2", "10.0.0.9")
    assert len(cfg.warnings) == 1
    assert "several 'on' sections for this node (lines 2, 3)" in cfg.warnings[0]
    assert cfg.warnings[0].startswith("hast.conf:3:5: ")


def test_statement_repeated_in_a_section_warns_and_later_wins() -> None:
    text = "timeout 5\ntimeout 6\n" + GOOD_RESOURCE
    cfg = parse_config(text, "hast.conf", ident())
    assert cfg.resources["r"].timeout == 6
    assert cfg.warnings == (
        "hast.conf:2:1: 'timeout' is set twice at global level (lines 1 and 2); "
        "the later value is used. (near 'timeout')",
    )


def test_remote_none_and_hostnames_are_kept_as_written() -> None:
    text = (
        "resource r { on nodea { local /l remote peer.example.com:9000 "
        "source TCP4://10.0.0.1 } }\nresource s { on nodea { local /m remote none } }"
    )
    cfg = parse_config(text, "hast.conf", ident())
    assert cfg.resources["r"].remoteaddr == "peer.example.com:9000"
    assert cfg.resources["r"].sourceaddr == "TCP4://10.0.0.1"
    assert cfg.resources["s"].remoteaddr == "none"


def test_other_node_may_reuse_names_and_paths() -> None:
    # Two resources on the same path on *another* node are not our business.
    text = (
        "resource r { on nodea { local /a remote none } on nodeb { local /x remote none } }\n"
        "resource s { on nodea { local /b remote none } on nodeb { local /x remote none } }\n"
    )
    assert list(parse_config(text, "f", ident()).resources) == ["r", "s"]
    with pytest.raises(ConfigError, match="uses the local path '/x' that resource 'r'"):
        parse_config(text, "f", ident("nodeb"))


def test_identity_defaults_to_current_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAST_NODE", "envnode")
    cfg = parse_config("resource r { on ENVNODE { local /l remote none } }")
    assert cfg.node.node == "envnode"
    assert cfg.path == "<string>"


# ---------------------------------------------------------------------------
# The model


def test_model_is_immutable_and_comparable() -> None:
    a = parse_config(EXAMPLE_LAN, "hast.conf", ident())
    b = parse_config(EXAMPLE_LAN, "hast.conf", ident())
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.control = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.resources["db"].timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.resources["x"] = a.resources["db"]  # type: ignore[index]
    assert isinstance(a.listen, tuple)


def test_reload_comparison_sees_changed_fields() -> None:
    old = parse_config(EXAMPLE_LAN, "hast.conf", ident())
    new = parse_config(EXAMPLE_LAN.replace("timeout 30", "timeout 31"), "hast.conf", ident())
    assert old != new
    changed = {
        f.name
        for f in dataclasses.fields(ResourceConfig)
        if getattr(old.resources["db"], f.name) != getattr(new.resources["db"], f.name)
    }
    assert changed == {"timeout"}
