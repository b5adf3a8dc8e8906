"""The project's exception hierarchy and exit codes.

Rules:

* Codecs (``wire``, ``disk.activemap``) never log: they raise one of the errors
  below and the caller decides.
* Anything a remote peer or a hostile client can cause while decoding raises a
  :class:`ProtocolError` (and nothing else), so a connection can be dropped
  without harming the daemon.
* Configuration problems raise :class:`ConfigError`, whose text names the file,
  line, column and token.
* Every error that ends a process maps to a sysexits code (:class:`ExitCode`).
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class ExitCode(enum.IntEnum):
    """sysexits(3) codes used by hastd and hastctl."""

    OK = 0
    USAGE = 64
    DATAERR = 65
    NOINPUT = 66
    NOUSER = 67
    NOHOST = 68
    UNAVAILABLE = 69
    SOFTWARE = 70
    OSERR = 71
    OSFILE = 72
    CANTCREAT = 73
    IOERR = 74
    TEMPFAIL = 75
    PROTOCOL = 76
    NOPERM = 77
    CONFIG = 78


class HastError(Exception):
    """Base class of every error pyhast raises on purpose."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class ProtocolError(HastError):
    """Malformed or hostile data on a wire (nv list, frame, payload, NBD, control).

    ``errno`` is the error to report to the peer where the protocol has a
    place for one (EINVAL unless said otherwise).
    """

    exit_code = ExitCode.PROTOCOL

    def __init__(self, message: str, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


class NVError(ProtocolError):
    """An nv list could not be decoded, or a lookup failed."""


class NVMissingError(NVError, KeyError):
    """A required nv field is absent (FreeBSD's getter would record ENOENT)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Field {name!r} is missing.", _errno.ENOENT)
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0] if self.args else ""


class NVTypeError(NVError):
    """An nv field exists but has another type than the one asked for."""


class FrameError(ProtocolError):
    """A frame header or payload violates the protocol or its limits."""


class ChecksumError(FrameError):
    """A payload's checksum does not match, or its algorithm is unknown."""


class CompressionError(FrameError):
    """A payload cannot be decompressed, or its algorithm is unknown."""


class ConfigError(HastError):
    """hast.conf is malformed or incomplete.

    ``str()`` gives one line: ``file:line:column: message (near 'token')``.
    """

    exit_code = ExitCode.CONFIG

    def __init__(
        self,
        message: str,
        path: str = "",
        line: int = 0,
        column: int = 0,
        token: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.token = token
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.path or "<config>"
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        text = f"{where}: {self.message}"
        if self.token is not None:
            text += f" (near '{self.token}')"
        return text


class MetadataError(HastError):
    """The on-disk metadata of a provider is unreadable or inconsistent."""

    exit_code = ExitCode.NOINPUT


class ProviderError(HastError):
    """The local component (file or block device) cannot be used."""

    exit_code = ExitCode.NOINPUT

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is not None:
            message = f"{message}: {os.strerror(errno)}."
        super().__init__(message)
        self.errno = errno
