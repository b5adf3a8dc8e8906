"""hast.conf: parse, validate and resolve the configuration for this node.

The work is done in three separate steps:

1. **Syntax** (``hast.lark``, lark LALR with a basic lexer). Keywords are
   reserved, a purely numeric word is a number, and each nesting level has its
   own rule, so a statement at a level where it is not legal (spec 1.2) is a
   syntax error. Lark's exceptions are turned into a one-line
   :class:`ConfigError` that says, in plain words, what was expected.
2. **Sections** (:class:`_SectionBuilder`). The tree becomes nested
   :class:`_Section` objects that keep every value token, so later errors
   still point at a line and column. Values are checked here, in file order
   and in *every* section (also the sections of other nodes): addresses
   (syntax only, no resolution; ``remote`` and ``source`` must be TCP),
   ``timeout`` (an integer in 1..2**31-1) and provider names (one file name:
   no '/', not '.' or '..', since it becomes ``/dev/hast/<name>``).
3. **Resolution** (:func:`_resolve`), spec 1.3 and 1.4, for one
   :class:`NodeIdentity`:

   * Global statements apply wherever they are written in the file.
   * ``replication checksum compression timeout exec``: resource value, else
     global value, else default.
   * ``metaflush``: node section in the resource > resource > global > on.
   * ``name`` and ``local``: node section in the resource > resource;
     ``name`` falls back to the resource name; ``local`` must end up set.
   * ``remote`` must be set in the matching node section (``none`` is kept as
     the string "none"); ``source`` is optional.
   * ``control`` and ``pidfile``: a matching global ``on`` section overrides
     the global value, wherever it is written.
   * ``listen``: the lines of matching global ``on`` sections, then the global
     lines (FreeBSD's order), exact duplicates dropped (the same address
     spelled two ways is kept, with a warning); the defaults
     (``tcp4://0.0.0.0:8457``, ``tcp6://[::]:8457``, each only if the kernel
     supports that family) only when the list is empty.
   * Every resource needs an ``on`` section matching this node. When several
     match, they are applied in file order, so each setting of the later one
     wins (as in FreeBSD); this is reported as a warning.
   * Duplicate resource names are an error, and so (unlike FreeBSD, where
     they are latent defects) are two resources on this node with the same
     provider name (the same ``/dev/hast/<name>``) or the same local path
     (compared after ``os.path.normpath``; symlinks are not followed).
   * A file without resources is valid.

A statement repeated in one section keeps its last value (as in FreeBSD) and
produces a warning. Warnings are returned in :attr:`HastConfig.warnings` as
``file:line:column: message`` strings, for the caller to log.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources as _resources
from types import MappingProxyType
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from pyhast import defaults
from pyhast.address import parse_address
from pyhast.enums import Checksum, Compression, Replication
from pyhast.errors import ConfigError, ExitCode
from pyhast.node import NodeIdentity

__all__ = [
    "ConfigReadError",
    "HastConfig",
    "ResourceConfig",
    "load_config",
    "parse_config",
]

#: Largest ``timeout`` accepted (FreeBSD keeps it in an int).
TIMEOUT_MAX = 2**31 - 1


# --------------------------------------------------------------------------
# Public model


@dataclass(frozen=True)
class ResourceConfig:
    """One resource as this node runs it (FreeBSD's ``struct hast_resource``).

    ``remoteaddr`` is an address string or "none"; ``sourceaddr`` is None when
    not configured; ``exec`` is the hook path, "" for none. Addresses are kept
    as written in the file (they have been validated).
    """

    name: str
    provname: str
    localpath: str
    remoteaddr: str
    sourceaddr: str | None
    replication: Replication
    checksum: Checksum
    compression: Compression
    timeout: int
    exec: str
    metaflush: bool

    @property
    def exec_path(self) -> str:
        """Alias of :attr:`exec` (the hook program, "" for none)."""
        return self.exec


@dataclass(frozen=True)
class HastConfig:
    """The whole configuration as seen by one node.

    ``resources`` is a read-only mapping in file order. ``warnings`` holds
    ``file:line:column: message`` strings about suspicious but legal input; it
    is not part of equality.
    """

    path: str
    node: NodeIdentity
    control: str
    pidfile: str
    listen: tuple[str, ...]
    resources: Mapping[str, ResourceConfig] = field(hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "listen", tuple(self.listen))
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))
        object.__setattr__(self, "warnings", tuple(self.warnings))


class ConfigReadError(ConfigError):
    """The configuration file cannot be read (exit code OSFILE, 72)."""

    exit_code = ExitCode.OSFILE


# --------------------------------------------------------------------------
# Entry points


def load_config(path: str, identity: NodeIdentity | None = None) -> HastConfig:
    """Read and resolve the configuration file ``path`` for ``identity``.

    ``identity`` defaults to :meth:`NodeIdentity.current`. Raises
    :class:`ConfigReadError` if the file cannot be read, :class:`ConfigError`
    if it is invalid. Bytes that are not UTF-8 are reported as invalid
    characters at their position.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigReadError(
            f"Unable to read the configuration file: {reason}.", path=_printable(path)
        ) from exc
    return parse_config(data.decode("utf-8", errors="replace"), path, identity)


def parse_config(
    text: str, path: str = "<string>", identity: NodeIdentity | None = None
) -> HastConfig:
    """Parse ``text`` (named ``path`` in messages) and resolve it for ``identity``.

    ``identity`` defaults to :meth:`NodeIdentity.current`. Raises
    :class:`ConfigError` (one line: ``file:line:column: message (near
    'token')``) on the first problem found.
    """
    shown = _printable(path)
    parser = _parser()
    try:
        tree = parser.parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, shown, parser) from None
    warnings: list[str] = []
    builder = _SectionBuilder(shown, warnings)
    try:
        root: _Section = builder.transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ConfigError):
            raise exc.orig_exc from None
        raise
    if identity is None:
        identity = NodeIdentity.current()
    return _resolve(root, identity, path, shown, warnings)


@functools.cache
def _parser() -> Lark:
    grammar = _resources.files("pyhast").joinpath("hast.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True)


# --------------------------------------------------------------------------
# Step 2: sections with positions


@dataclass
class _Statement:
    """``<keyword> <value>``; both tokens keep their position."""

    keyword: Token
    value: Token

    @property
    def key(self) -> str:
        return str(self.keyword.value)


@dataclass
class _Section:
    """One level of the file: global, ``on`` (global or in a resource), resource.

    ``label`` is the name token of a resource or ``on`` section. ``values``
    maps a keyword to the token of its last value; ``listen`` keeps every
    listen line; ``sections`` are the nested sections in file order.
    """

    kind: str
    label: Token | None = None
    values: dict[str, Token] = field(default_factory=dict)
    listen: list[Token] = field(default_factory=list)
    sections: list[_Section] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "" if self.label is None else str(self.label.value)


class _SectionBuilder(Transformer[Token, Any]):
    """Turn the parse tree into :class:`_Section` objects, checking every value.

    lark calls the statement callbacks in file order, so the first bad value
    in the file is the one reported.
    """

    def __init__(self, path: str, warnings: list[str]) -> None:
        super().__init__()
        self._path = path
        self._warnings = warnings

    # Statements: every rule without its own method below.
    def __default__(self, data: Any, children: list[Any], meta: Any) -> _Statement:
        keyword, value = children
        stmt = _Statement(keyword, value)
        self._check(stmt)
        return stmt

    def start(self, children: list[Any]) -> _Section:
        return self._section("global", None, children)

    def global_on(self, children: list[Any]) -> _Section:
        return self._section("global on", children[1], children[3:-1])

    def resource(self, children: list[Any]) -> _Section:
        return self._section("resource", children[1], children[3:-1])

    def resource_on(self, children: list[Any]) -> _Section:
        return self._section("on", children[1], children[3:-1])

    def _section(self, kind: str, label: Token | None, items: Iterable[Any]) -> _Section:
        section = _Section(kind, label)
        for item in items:
            if isinstance(item, _Section):
                section.sections.append(item)
            elif item.key == "listen":
                section.listen.append(item.value)
            else:
                old = section.values.get(item.key)
                if old is not None:
                    where = {
                        "global": "at global level",
                        "global on": f"in the global 'on {section.name}' section",
                        "resource": f"in resource '{section.name}'",
                    }.get(kind, f"in an 'on {section.name}' section")
                    self._warnings.append(
                        _at(
                            self._path,
                            item.keyword,
                            f"'{item.key}' is set twice {where} (lines {old.line} and "
                            f"{item.keyword.line}); the later value is used.",
                        )
                    )
                section.values[item.key] = item.value
        return section

    def _check(self, stmt: _Statement) -> None:
        key, token = stmt.key, stmt.value
        text = str(token.value)
        if key == "timeout":
            digits = text.lstrip("0")
            if not digits:
                raise _error(self._path, token, "Timeout must be greater than zero.")
            if len(digits) > 10 or int(digits) > TIMEOUT_MAX:
                raise _error(self._path, token, f"Timeout is too large (at most {TIMEOUT_MAX}).")
        elif key in ("control", "listen"):
            _check_address(self._path, key, token, defaults.HASTD_PORT, tcp_only=False)
        elif key == "remote" and token.type != "NONE":
            _check_address(self._path, key, token, defaults.HASTD_PORT, tcp_only=True)
        elif key == "source":
            _check_address(self._path, key, token, 0, tcp_only=True)
        elif key == "name":
            _check_provname(self._path, token, text)


def _check_address(path: str, key: str, token: Token, port: int, *, tcp_only: bool) -> None:
    try:
        address = parse_address(str(token.value), port)
    except ValueError as exc:
        raise _error(path, token, f"Invalid {key} address: {exc}") from None
    if tcp_only and address.is_unix:
        raise _error(
            path, token, f"Invalid {key} address: it must be a TCP address, not a UNIX socket."
        )


def _check_provname(path: str, token: Token, name: str) -> None:
    """A provider name becomes ``/dev/hast/<name>``: it must be one file name."""
    if "/" in name or name in (".", ".."):
        raise _error(
            path,
            token,
            f"Invalid provider name '{name}': it must be a single file name "
            "(it becomes /dev/hast/<name>), without '/'.",
        )


# --------------------------------------------------------------------------
# Step 3: resolution for one node


def _resolve(
    root: _Section, identity: NodeIdentity, path: str, shown: str, warnings: list[str]
) -> HastConfig:
    control = root.values.get("control")
    pidfile = root.values.get("pidfile")
    node_listen: list[Token] = []
    resources: list[_Section] = []
    for section in root.sections:
        if section.kind == "resource":
            resources.append(section)
        elif identity.matches(section.name):
            control = section.values.get("control", control)
            pidfile = section.values.get("pidfile", pidfile)
            node_listen.extend(section.listen)

    resolved: dict[str, ResourceConfig] = {}
    first: dict[str, _Section] = {}
    provnames: dict[str, tuple[str, Token]] = {}
    localpaths: dict[str, tuple[str, Token]] = {}
    for section in resources:
        assert section.label is not None
        other = first.get(section.name)
        if other is not None:
            assert other.label is not None
            raise _error(
                shown,
                section.label,
                f"Resource '{section.name}' is defined twice "
                f"(lines {other.label.line} and {section.label.line}).",
            )
        first[section.name] = section
        config, provname_token, local_token = _resolve_resource(
            section, root, identity, shown, warnings
        )
        _claim(
            provnames,
            config.provname,
            config.name,
            provname_token,
            shown,
            "provider name",
            f" (/dev/hast/{config.provname})",
        )
        _claim(
            localpaths,
            os.path.normpath(config.localpath),
            config.name,
            local_token,
            shown,
            "local path",
            "",
        )
        resolved[config.name] = config

    listen = _listen(node_listen + root.listen, shown, warnings)
    return HastConfig(
        path=path,
        node=identity,
        control=_value(control, defaults.HAST_CONTROL),
        pidfile=_value(pidfile, defaults.HASTD_PIDFILE),
        listen=listen,
        resources=resolved,
        warnings=tuple(warnings),
    )


def _resolve_resource(
    res: _Section, root: _Section, identity: NodeIdentity, path: str, warnings: list[str]
) -> tuple[ResourceConfig, Token, Token]:
    """Resolve one resource; also return the tokens that set provname and local."""
    assert res.label is not None
    nodes = [s for s in res.sections if identity.matches(s.name)]
    if not nodes:
        names = ", ".join(identity.acceptable_names())
        raise _error(
            path,
            res.label,
            f"No resource {res.name} configuration for this node (acceptable node names: {names}).",
        )
    if len(nodes) > 1:
        lines = ", ".join(str(n.label.line) for n in nodes if n.label is not None)
        warnings.append(
            _at(
                path,
                nodes[-1].label,
                f"Resource '{res.name}' has several 'on' sections for this node "
                f"(lines {lines}); where they disagree, the later one wins.",
            )
        )
    node: dict[str, Token] = {}
    for section in nodes:
        node.update(section.values)

    remote = node.get("remote")
    if remote is None:
        raise _error(
            path, nodes[-1].label, f"Remote address not configured for resource {res.name}."
        )
    local = node.get("local", res.values.get("local"))
    if local is None:
        raise _error(
            path, res.label, f"Path to local component not configured for resource {res.name}."
        )
    provname = node.get("name", res.values.get("name", res.label))
    _check_provname(path, provname, str(provname.value))

    def inherited(key: str) -> Token | None:
        return res.values.get(key, root.values.get(key))

    replication = inherited("replication")
    checksum = inherited("checksum")
    compression = inherited("compression")
    timeout = inherited("timeout")
    exec_ = inherited("exec")
    metaflush = node.get("metaflush", inherited("metaflush"))
    source = node.get("source")
    config = ResourceConfig(
        name=res.name,
        provname=str(provname.value),
        localpath=str(local.value),
        remoteaddr=str(remote.value),
        sourceaddr=None if source is None else str(source.value),
        replication=(
            Replication.MEMSYNC if replication is None else Replication.from_label(replication)
        ),
        checksum=Checksum.NONE if checksum is None else Checksum.from_label(checksum),
        compression=(
            Compression.HOLE if compression is None else Compression.from_label(compression)
        ),
        timeout=defaults.HAST_TIMEOUT if timeout is None else int(timeout),
        exec=_value(exec_, ""),
        metaflush=metaflush is None or metaflush.value == "on",
    )
    return config, provname, local


def _claim(
    seen: dict[str, tuple[str, Token]],
    key: str,
    resource: str,
    token: Token,
    path: str,
    what: str,
    extra: str,
) -> None:
    """Record that ``resource`` uses ``key``; error if another resource does."""
    other = seen.get(key)
    if other is not None:
        raise _error(
            path,
            token,
            f"Resource '{resource}' uses the {what} '{key}'{extra} that resource "
            f"'{other[0]}' already uses on this node (line {other[1].line}).",
        )
    seen[key] = (resource, token)


def _listen(tokens: list[Token], path: str, warnings: list[str]) -> tuple[str, ...]:
    """Accumulated listen addresses (exact duplicates dropped), or the defaults."""
    result: list[str] = []
    canonical: dict[str, str] = {}
    for token in tokens:
        text = str(token.value)
        if text in result:
            continue
        key = str(parse_address(text, defaults.HASTD_PORT))
        if key in canonical:
            warnings.append(
                _at(
                    path,
                    token,
                    f"Listen address '{text}' is the same as '{canonical[key]}'; "
                    "binding both will fail.",
                )
            )
        else:
            canonical[key] = text
        result.append(text)
    if not result:
        if _family_supported(socket.AF_INET):
            result.append(defaults.HASTD_LISTEN_TCP4)
        if _family_supported(socket.AF_INET6):
            result.append(defaults.HASTD_LISTEN_TCP6)
        if not result:
            raise ConfigError("No address to listen on.", path=path)
    return tuple(result)


def _family_supported(family: socket.AddressFamily) -> bool:
    """True if the kernel can make a TCP socket of ``family`` (FreeBSD's probe)."""
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    probe.close()
    return True


def _value(token: Token | None, default: str) -> str:
    return default if token is None else str(token.value)


# --------------------------------------------------------------------------
# Errors


def _printable(text: str) -> str:
    """``text`` with anything that is not printable escaped, so it stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _error(path: str, token: Token | None, message: str) -> ConfigError:
    if token is None:
        return ConfigError(message, path=path)
    return ConfigError(
        message,
        path=path,
        line=token.line or 0,
        column=token.column or 0,
        token=_printable(str(token.value)),
    )


def _at(path: str, token: Token | None, message: str) -> str:
    """A warning line, in the same shape as a ConfigError."""
    return str(_error(path, token, message))


# Statements legal at each level (spec 1.2; hast.lark is the authority, and a
# unit test checks that the two agree). Used only to word error messages.
_LEVELS: dict[str, tuple[str, ...]] = {
    "global": (
        "CONTROL",
        "PIDFILE",
        "LISTEN",
        "REPLICATION",
        "CHECKSUM",
        "COMPRESSION",
        "TIMEOUT",
        "EXEC",
        "METAFLUSH",
        "ON",
        "RESOURCE",
    ),
    "global on": ("CONTROL", "PIDFILE", "LISTEN"),
    "resource": (
        "REPLICATION",
        "CHECKSUM",
        "COMPRESSION",
        "TIMEOUT",
        "EXEC",
        "METAFLUSH",
        "NAME",
        "LOCAL",
        "ON",
    ),
    "on": ("NAME", "LOCAL", "REMOTE", "SOURCE", "METAFLUSH"),
}
_LEVEL_NAMES = {
    "global": "at global level",
    "global on": "inside a global 'on' section",
    "resource": "inside a resource section",
    "on": "inside an 'on' section of a resource",
}
# What the value of each statement is, in words.
_VALUE = {
    "CONTROL": "an address",
    "PIDFILE": "a path",
    "LISTEN": "an address",
    "REPLICATION": "'fullsync', 'memsync' or 'async'",
    "CHECKSUM": "'none', 'crc32' or 'sha256'",
    "COMPRESSION": "'none', 'hole' or 'lzf'",
    "TIMEOUT": "a number of seconds",
    "EXEC": "a path",
    "METAFLUSH": "'on' or 'off'",
    "NAME": "a provider name",
    "LOCAL": "a path",
    "REMOTE": "an address or 'none'",
    "SOURCE": "an address",
    "RESOURCE": "a resource name",
    "ON": "a node name",
}
_STATEMENTS = tuple(_VALUE)
_KEYWORDS = frozenset(
    [*_STATEMENTS, "OFF", "FULLSYNC", "MEMSYNC", "ASYNC", "NONE", "CRC32", "SHA256", "HOLE", "LZF"]
)


def _alternatives(items: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _allowed(keyword: str) -> str:
    """Where statement ``keyword`` may be written, in words."""
    return _alternatives([_LEVEL_NAMES[lv] for lv, kws in _LEVELS.items() if keyword in kws])


@dataclass
class _Context:
    """The parser's position when it failed, rebuilt from the tokens before it.

    ``sections`` are the open sections, outermost first, as (level, name,
    line). ``keyword`` is the statement keyword whose value is still to come;
    ``label`` the resource or node name whose '{' is still to come.
    """

    sections: list[tuple[str, str, int]] = field(default_factory=list)
    keyword: Token | None = None
    label: Token | None = None
    last: Token | None = None

    @property
    def level(self) -> str:
        return self.sections[-1][0] if self.sections else "global"

    def where(self) -> str:
        if not self.sections:
            return "at global level"
        level, name, _ = self.sections[-1]
        if level == "global on":
            return f"inside the global 'on {name}' section"
        if level == "resource":
            return f"inside resource '{name}'"
        return f"inside the 'on {name}' section of resource '{self.sections[0][1]}'"

    def feed(self, tok: Token) -> None:
        """Advance over one token of a valid prefix of the file."""
        if self.label is not None:  # tok is the '{' of a resource or on section
            assert self.keyword is not None
            if self.keyword.type == "RESOURCE":
                level = "resource"
            else:
                level = "on" if self.sections else "global on"
            self.sections.append((level, str(self.label.value), self.keyword.line or 0))
            self.keyword = self.label = None
        elif self.keyword is not None:  # tok is the value of a statement
            if self.keyword.type in ("RESOURCE", "ON"):
                self.label = tok
            else:
                self.keyword = None
        elif tok.type == "RBRACE":
            if self.sections:
                self.sections.pop()
        else:  # tok starts a statement
            self.keyword = tok
        self.last = tok


def _context(parser: Lark, text: str, stop: int) -> _Context:
    """Re-lex ``text`` up to offset ``stop`` (where parsing failed)."""
    ctx = _Context()
    try:
        for tok in parser.lex(text):
            if tok.start_pos is not None and tok.start_pos >= stop:
                break
            ctx.feed(tok)
    except UnexpectedInput:  # a bad character after ``stop``
        pass
    return ctx


def _syntax_error(exc: UnexpectedInput, text: str, path: str, parser: Lark) -> ConfigError:
    """Turn a lark exception into a one-line ConfigError saying what was expected."""
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = _printable(text[pos] if pos < len(text) else "")
        return ConfigError(
            f"Invalid character '{char}': names, paths and addresses may only contain "
            "letters, digits and the characters . - _ / : [ ] (there is no quoting).",
            path=path,
            line=exc.line,
            column=exc.column,
            token=char,
        )
    token: Token | None = None
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        token = exc.token
    ctx = _context(parser, text, len(text) if token is None else token.start_pos or 0)
    if token is None:
        # lark's LALR parser reports the end of the input as a "$END" token.
        if ctx.last is None:  # cannot happen: an empty file is valid
            return ConfigError("Unexpected end of file.", path=path)
        return _error(path, ctx.last, _syntax_message(ctx, None))
    return _error(path, token, _syntax_message(ctx, token))


def _syntax_message(ctx: _Context, token: Token | None) -> str:
    """A syntax error message: what was found, where, and what was expected.

    ``token`` is the unexpected token, None at the end of the file.
    """
    kind = "" if token is None else token.type
    value = "" if token is None else _printable(str(token.value))
    head = "Unexpected end of file" if token is None else f"Unexpected '{value}'"
    if ctx.label is not None and ctx.keyword is not None:
        opened = f"{ctx.keyword.value} {ctx.label.value}"
        return f"{head} after '{opened}'; expected '{{' to open the section."
    if ctx.keyword is not None:
        keyword = ctx.keyword.type
        text = f"{head} after '{ctx.keyword.value}'; expected {_VALUE[keyword]}"
        if kind == "NUM" and keyword in ("RESOURCE", "ON"):
            text += " (a word made only of digits is a number and cannot be a name)"
        elif kind == "NUM" and keyword != "TIMEOUT":
            text += " (a word made only of digits is a number)"
        elif kind in _KEYWORDS and _VALUE[keyword].startswith(("a ", "an ")):
            text += f" ('{value}' is a reserved word)"
        return text + "."
    # A statement, or the end of a section, was expected.
    where = ctx.where()
    if token is None:
        if not ctx.sections:  # cannot happen: the end of the file is fine here
            return f"{head}."
        level, name, line = ctx.sections[-1]
        keyword = "resource" if level == "resource" else "on"
        section = f"'{keyword} {name}' section opened at line {line}"
        return f"{head}: the {section} is not closed (missing '}}')."
    if kind in _STATEMENTS and kind not in _LEVELS[ctx.level]:
        return f"{head} {where}; '{value}' is only allowed {_allowed(kind)}."
    if kind == "RBRACE" and not ctx.sections:
        return f"{head} at global level; there is no open section to close."
    names = ", ".join(k.lower() for k in _LEVELS[ctx.level])
    expected = f"a statement ({names})" + (" or '}'" if ctx.sections else "")
    if kind in ("STR", "NUM"):
        return f"Unknown statement '{value}' {where}; expected {expected}."
    return f"{head} {where}; expected {expected}."
