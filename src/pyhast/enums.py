"""HAST's enumerations, with the numbers FreeBSD's hast.h gives them.

These numbers appear on the wire (control and parent/worker messages) and in
the exec hook vocabulary, so they must not change.
"""

from __future__ import annotations

import enum
from typing import Self


class Role(enum.IntEnum):
    """Role of a resource on this node (HAST_ROLE_*)."""

    UNDEF = 0
    INIT = 1
    PRIMARY = 2
    SECONDARY = 3

    @property
    def label(self) -> str:
        """The lower-case word hastctl and the metadata use ("init", ...)."""
        return self.name.lower()

    @classmethod
    def from_label(cls, text: str) -> Role:
        """Parse "init", "primary" or "secondary" (ValueError otherwise)."""
        try:
            role = cls[text.upper()]
        except KeyError:
            raise ValueError(f"Unknown role {text!r}.") from None
        if role is cls.UNDEF:
            raise ValueError(f"Unknown role {text!r}.")
        return role


class _Labelled(enum.IntEnum):
    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, text: str) -> Self:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"Unknown {cls.__name__.lower()} {text!r}.") from None


class Replication(_Labelled):
    """Replication mode (HAST_REPLICATION_*)."""

    FULLSYNC = 0
    MEMSYNC = 1
    ASYNC = 2


class Checksum(_Labelled):
    """Checksum algorithm on the wire (HAST_CHECKSUM_*)."""

    NONE = 0
    CRC32 = 1
    SHA256 = 2


class Compression(_Labelled):
    """Compression algorithm on the wire (HAST_COMPRESSION_*)."""

    NONE = 0
    HOLE = 1
    LZF = 2


class SyncSrc(enum.IntEnum):
    """Direction of synchronisation (HAST_SYNCSRC_*)."""

    UNDEF = 0
    PRIMARY = 1
    SECONDARY = 2


class HioCmd(enum.IntEnum):
    """Replication request commands (HIO_*), field ``cmd`` on connection A."""

    UNDEF = 0
    READ = 1
    WRITE = 2
    DELETE = 3
    FLUSH = 4
    KEEPALIVE = 5


class Event(enum.IntEnum):
    """Worker events delivered to the parent (EVENT_*), and their hook names."""

    NONE = 0
    CONNECT = 1
    DISCONNECT = 2
    SYNCSTART = 3
    SYNCDONE = 4
    SYNCINTR = 5
    SPLITBRAIN = 6

    @property
    def hook_name(self) -> str:
        """The first argument given to the exec hook."""
        return "split-brain" if self is Event.SPLITBRAIN else self.name.lower()


class ControlCmd(enum.IntEnum):
    """hastctl -> hastd commands (HASTCTL_CMD_*)."""

    UNKNOWN = 0
    SETROLE = 1
    STATUS = 2


class ControlError(enum.IntEnum):
    """Top-level and per-resource error numbers of the control protocol."""

    OK = 0
    NO_RESOURCE = 1
    INVALID_REQUEST = 2
    UNIMPLEMENTED = 4
