"""Who is this node? The identity that ``on <node>`` sections are matched against.

FreeBSD's ``isitme()`` (spec 1.5) accepts a node name when, tested in order, it

1. equals the full ``gethostname()`` (case-sensitive);
2. equals the part of the host name before the first dot (only when the host
   name has a dot);
3. equals ``kern.hostuuid`` (case-insensitive);
4. equals ``hostid`` followed by the decimal ``kern.hostid``
   (``hostid3735928559``).

Linux mapping used here:

* host UUID: ``/etc/machine-id`` (32 hex digits; ``/var/lib/dbus/machine-id``
  as a fallback). A node name matches it written either as the 32 digits or in
  the canonical dashed 8-4-4-4-12 form, in any case. A UUID given already
  dashed (e.g. a DMI product UUID) is matched the same way.
* host id: what glibc's ``gethostid()`` returns, as an unsigned 32-bit number:
  the first 4 bytes of ``/etc/hostid`` in native byte order if that file
  exists, otherwise derived from the IPv4 address the host name resolves to
  (the two 16-bit halves of the address swapped, as glibc does). When neither
  works there is no host id and form 4 is not offered.

pyhast adds one thing FreeBSD lacks: an *explicit node name*
(``NodeIdentity.node``, given by the caller or taken from the ``HAST_NODE``
environment variable). When it is set it replaces all four forms: only that
exact name (case-insensitive) matches. This lets several nodes run on one host
(tests, containers).
"""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NODE_ENV", "NodeIdentity", "read_hostid", "read_hostuuid"]

#: Environment variable that supplies the explicit node name.
NODE_ENV = "HAST_NODE"

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_HOSTID_FILE = "/etc/hostid"
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DASHED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid_forms(uuid: str) -> frozenset[str]:
    """Lower-case spellings under which a host UUID matches a node name."""
    text = uuid.strip().lower()
    if _DASHED.fullmatch(text):
        text = text.replace("-", "")
    if _HEX32.fullmatch(text):
        dashed = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
        return frozenset({text, dashed})
    return frozenset({text})


@dataclass(frozen=True)
class NodeIdentity:
    """The names this host answers to in ``on <node>`` sections.

    ``hostuuid`` and ``hostid`` are None when unknown; ``node`` is the explicit
    node name, which (when set) is the only name that matches.
    """

    hostname: str
    hostuuid: str | None = None
    hostid: int | None = None
    node: str | None = None

    @classmethod
    def current(cls, node: str | None = None) -> NodeIdentity:
        """Describe the running host; ``node`` defaults to ``$HAST_NODE``.

        An empty ``node`` (or empty ``HAST_NODE``) means "no explicit name".
        """
        if node is None:
            node = os.environ.get(NODE_ENV)
        hostname = socket.gethostname()
        return cls(
            hostname=hostname,
            hostuuid=read_hostuuid(),
            hostid=read_hostid(hostname),
            node=node or None,
        )

    @property
    def short_hostname(self) -> str | None:
        """The host name up to its first dot, or None if it has no dot."""
        if "." not in self.hostname:
            return None
        return self.hostname.split(".", 1)[0]

    def matches(self, name: str) -> bool:
        """True if ``on <name>`` designates this node (spec 1.5)."""
        if self.node is not None:
            return name.lower() == self.node.lower()
        if name == self.hostname:
            return True
        short = self.short_hostname
        if short is not None and name == short:
            return True
        if self.hostuuid and name.lower() in _uuid_forms(self.hostuuid):
            return True
        return self.hostid is not None and name == f"hostid{self.hostid}"

    def acceptable_names(self) -> list[str]:
        """The names that would match, in matching order (for error messages)."""
        if self.node is not None:
            return [self.node]
        names = [self.hostname]
        short = self.short_hostname
        if short is not None:
            names.append(short)
        if self.hostuuid:
            names.append(self.hostuuid)
        if self.hostid is not None:
            names.append(f"hostid{self.hostid}")
        return names

    def __str__(self) -> str:
        return self.node if self.node is not None else self.hostname


def read_hostuuid(files: tuple[str, ...] = _MACHINE_ID_FILES) -> str | None:
    """The host UUID (``/etc/machine-id``), or None if no file is readable.

    The value is returned stripped and lower-cased; the file's own spelling
    (normally 32 hex digits) is kept.
    """
    for name in files:
        try:
            text = Path(name).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if text:
            return text.lower()
    return None


def read_hostid(hostname: str | None = None, path: str = _HOSTID_FILE) -> int | None:
    """glibc's ``gethostid()`` as an unsigned 32-bit number, or None.

    Reads the first 4 bytes of ``path`` (native byte order). Without that file
    the id is derived from the IPv4 address ``hostname`` resolves to: glibc
    returns the address (network byte order, read as a native integer) with its
    16-bit halves swapped. Resolution uses the system resolver, as glibc does;
    a name that does not resolve to IPv4 gives None.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(4)
    except OSError:
        raw = b""
    if len(raw) == 4:
        return int(struct.unpack("=I", raw)[0])
    if hostname is None:
        hostname = socket.gethostname()
    try:
        infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    if not infos:
        return None
    packed = socket.inet_aton(str(infos[0][4][0]))
    addr = int(struct.unpack("=I", packed)[0])
    return ((addr << 16) | (addr >> 16)) & 0xFFFFFFFF
