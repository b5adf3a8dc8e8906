"""Disk fault injection for the local component (for tests; off unless asked for).

Switching it on
===============

Put ``PYHAST_FAULTS=/path/to/control.json`` in hastd's environment (its
workers inherit it; so does hastctl if it has the variable).
:meth:`pyhast.disk.provider.Provider.open` then calls :func:`install`, which
replaces the new provider's ``pread``, ``pread_into``, ``preadv``,
``pwrite``, ``pwritev``, ``flush`` and ``delete`` with versions that consult
the rules first.  Without the variable nothing is wrapped: the only cost is
one environment lookup per ``Provider.open``.

The control file
================

JSON, in the spirit of nbdkit's error filter::

    {
      "seed": 1,
      "rules": [
        {"op": "write", "path": "r0-nodeb", "offset": 1060864, "length": 65536,
         "errno": "EIO", "rate": 0.1, "count": 3, "delay_ms": 50, "short": true}
      ]
    }

Every rule field is optional:

``op``
    ``read``, ``write``, ``flush``, ``delete``, ``any`` (default) or a list
    of them.  Reads are ``pread``/``pread_into``/``preadv``, writes
    ``pwrite``/``pwritev`` (data, metadata and activemap alike).
``path``
    Only providers whose path contains this text (one control file can
    then serve both nodes of a test cluster, or one resource of several).
``offset``, ``length``
    The byte range the rule covers, **absolute on the provider** (the user
    data starts at ``localoff``, which ``hastctl dump`` prints); default: the
    whole provider.  A call matches when its range overlaps the rule's.  A
    flush has no range and matches whatever the rule's range.
``errno``
    An errno name (``"EIO"``, ``"ENOSPC"``, ...) or number: the call fails
    with ``OSError(errno)`` without touching the disk.  No ``errno`` and no
    ``short``: the rule only delays.
``rate``
    Probability (0..1) that a matching call is hit (default 1).  Draws come
    from ``random.Random(seed)``, so a given ``seed`` and call sequence give
    the same faults.
``count``
    The rule hits at most this many calls, then is spent.
``delay_ms``
    Sleep this long before the call (slow I/O; the sleep happens in the
    calling thread, which for pyhast's inline local I/O is the worker's event
    loop, as a slow disk would be).
``short``
    Writes only: a torn write.  The part of the request before the rule's
    ``offset`` (or, if the request starts inside the range, its first half,
    rounded down to 512 bytes; or exactly ``short`` bytes if it is a number)
    is written, then the call fails with ``errno`` (default EIO, e.g.
    ``"ENOSPC"`` for a disk that filled up mid-write).

Rules are applied in order; every hit rule adds its delay and the first hit
rule that fails decides the error.

Reloading
=========

The control file is ``stat()``-ed on every call and re-read when its
(inode, mtime, size) changes, so rules can be switched while hastd runs.
Write it atomically (a temporary file renamed over it, as
:func:`write_rules` does): the new inode makes the change visible even
within one mtime tick.  A missing file means no rules.  A file that cannot
be parsed is reported once and the previous rules stay in force.  ``count``
budgets start afresh with every load.

The metadata block is read with a plain ``os.pread`` on the descriptor
(:func:`pyhast.disk.metadata.metadata_read`) and is not subject to faults.
Each rule's first hit after a load is logged once at WARNING level.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pyhast.disk.provider import Provider, ReadBuffer, WriteBuffer

__all__ = [
    "FAULTS_ENV",
    "OPS",
    "FaultInjector",
    "FaultRule",
    "install",
    "parse_rules",
    "write_rules",
]

log = logging.getLogger(__name__)

#: The environment variable naming the control file.
FAULTS_ENV: Final = "PYHAST_FAULTS"
#: Operation names a rule can select.
OPS: Final = frozenset({"read", "write", "flush", "delete"})
_SHORT_ALIGN: Final = 512


@dataclass
class FaultRule:
    """One rule of the control file (see the module docstring)."""

    ops: frozenset[str] = OPS
    path: str | None = None
    offset: int = 0
    length: int | None = None
    errno: int | None = None
    rate: float = 1.0
    count: int | None = None
    delay_ms: float = 0.0
    short: bool | int = False
    #: Calls this rule has hit since it was loaded.
    hits: int = field(default=0, compare=False)

    def covers(self, op: str, path: str, offset: int, length: int) -> bool:
        if op not in self.ops:
            return False
        if self.path is not None and self.path not in path:
            return False
        if op == "flush":
            return True
        end = None if self.length is None else self.offset + self.length
        return offset + max(length, 1) > self.offset and (end is None or offset < end)

    def spent(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def fails(self) -> bool:
        return self.errno is not None or bool(self.short)

    def short_bytes(self, offset: int, length: int) -> int:
        """How much of a torn write of ``length`` bytes at ``offset`` lands."""
        if not isinstance(self.short, bool):
            return max(0, min(self.short, length - 1))
        if offset < self.offset:
            return min(self.offset - offset, length - 1)
        half = (length // 2) // _SHORT_ALIGN * _SHORT_ALIGN
        return min(half, length - 1)


def _parse_errno(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"errno must be a name or a number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        code = getattr(_errno, value.upper(), None)
        if isinstance(code, int):
            return code
    raise ValueError(f"unknown errno {value!r}")


def _parse_ops(value: object) -> frozenset[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ValueError(f"op must be a name or a list of names, not {value!r}")
    out: set[str] = set()
    for name in names:
        if name == "any":
            out |= OPS
        elif name in OPS:
            out.add(str(name))
        else:
            raise ValueError(f"unknown op {name!r}")
    return frozenset(out)


def _int_field(raw: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = raw.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def parse_rules(doc: object) -> tuple[list[FaultRule], int | None]:
    """The rules and seed of a decoded control file; ValueError if malformed."""
    if not isinstance(doc, dict):
        raise ValueError("the control file must hold a JSON object")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError("rules must be a list")
    rules = []
    known = {"op", "path", "offset", "length", "errno", "rate", "count", "delay_ms", "short"}
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            raise ValueError(f"rule {i} is not an object")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"rule {i} has unknown fields {sorted(unknown)}")
        try:
            rate = float(raw.get("rate", 1.0))
            delay = float(raw.get("delay_ms", 0.0))
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate must be between 0 and 1, not {rate}")
            if delay < 0:
                raise ValueError(f"delay_ms must not be negative, not {delay}")
            short = raw.get("short", False)
            if not isinstance(short, bool) and (not isinstance(short, int) or short < 0):
                raise ValueError(f"short must be a boolean or a byte count, not {short!r}")
            path = raw.get("path")
            if path is not None and not isinstance(path, str):
                raise ValueError(f"path must be a string, not {path!r}")
            offset = _int_field(raw, "offset", 0)
            rules.append(
                FaultRule(
                    ops=_parse_ops(raw.get("op", "any")),
                    path=path,
                    offset=offset or 0,
                    length=_int_field(raw, "length", None),
                    errno=None if raw.get("errno") is None else _parse_errno(raw["errno"]),
                    rate=rate,
                    count=_int_field(raw, "count", None),
                    delay_ms=delay,
                    short=short,
                )
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rule {i}: {exc}") from None
    return rules, seed


def write_rules(
    path: str | os.PathLike[str],
    rules: Sequence[Mapping[str, Any]] = (),
    *,
    seed: int | None = None,
) -> None:
    """Write a control file atomically (temporary file + rename), validating it first."""
    doc: dict[str, Any] = {"rules": [dict(r) for r in rules]}
    if seed is not None:
        doc["seed"] = seed
    parse_rules(doc)
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".faults-", dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _Decision:
    __slots__ = ("delay", "errno", "short")

    def __init__(self) -> None:
        self.delay = 0.0
        self.errno: int | None = None
        self.short: int | None = None


class FaultInjector:
    """The rules of one control file, as seen by one provider."""

    def __init__(self, control: str, provider_path: str) -> None:
        self.control = control
        self.provider_path = provider_path
        self.rules: list[FaultRule] = []
        self._key: tuple[int, int, int] | None = None
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._bad_key: tuple[int, int, int] | None = None
        #: Every hit: (op, offset, length, errno or 0) — for tests in-process.
        self.hits: list[tuple[str, int, int, int]] = []

    def _refresh(self) -> None:
        try:
            st = os.stat(self.control)
        except OSError:
            if self._key is not None or self.rules:
                log.info("Fault control file %s is gone; no faults.", self.control)
            self._key = None
            self.rules = []
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key or key == self._bad_key:
            return
        try:
            with open(self.control, "rb") as f:
                rules, seed = parse_rules(json.loads(f.read()))
        except (OSError, ValueError) as exc:
            self._bad_key = key
            log.warning("Fault control file %s ignored: %s.", self.control, exc)
            return
        self._key = key
        self._bad_key = None
        self.rules = [r for r in rules if r.path is None or r.path in self.provider_path]
        self._rng = random.Random(seed)
        log.info(
            "Fault rules for %s loaded from %s: %d apply.",
            self.provider_path,
            self.control,
            len(self.rules),
        )

    def decide(self, op: str, offset: int, length: int) -> _Decision | None:
        """What happens to one call (None: nothing, the fast answer)."""
        with self._lock:
            self._refresh()
            if not self.rules:
                return None
            out: _Decision | None = None
            for i, rule in enumerate(self.rules):
                if rule.spent() or not rule.covers(op, self.provider_path, offset, length):
                    continue
                if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                    continue
                rule.hits += 1
                if out is None:
                    out = _Decision()
                out.delay += rule.delay_ms / 1000.0
                if out.errno is None and rule.fails():
                    out.errno = rule.errno if rule.errno is not None else _errno.EIO
                    if rule.short and op == "write":
                        out.short = rule.short_bytes(offset, length)
                if rule.hits == 1:
                    log.warning(
                        "Fault rule %d hits a %s of %d bytes at offset %d of %s: %s.",
                        i,
                        op,
                        length,
                        offset,
                        self.provider_path,
                        _describe(rule),
                    )
            if out is not None:
                self.hits.append((op, offset, length, out.errno or 0))
            return out

    def apply(self, op: str, offset: int, length: int) -> None:
        """Delay and/or raise for one call that is not a write."""
        d = self.decide(op, offset, length)
        if d is None:
            return
        if d.delay > 0:
            time.sleep(d.delay)
        if d.errno is not None:
            raise OSError(d.errno, f"Injected fault: {os.strerror(d.errno)}")


def _describe(rule: FaultRule) -> str:
    parts = []
    if rule.delay_ms:
        parts.append(f"delay {rule.delay_ms:g} ms")
    if rule.short:
        parts.append("short write")
    if rule.fails():
        code = rule.errno if rule.errno is not None else _errno.EIO
        parts.append(_errno.errorcode.get(code, str(code)))
    return ", ".join(parts) or "no effect"


def _total(buffers: Sequence[ReadBuffer] | Sequence[WriteBuffer]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def install(provider: Provider, control: str) -> FaultInjector:
    """Make ``provider``'s I/O methods consult the rules in ``control``; the injector."""
    inj = FaultInjector(control, provider.path)
    pread = provider.pread
    pread_into = provider.pread_into
    preadv = provider.preadv
    pwrite = provider.pwrite
    pwritev = provider.pwritev
    flush = provider.flush
    delete = provider.delete

    def f_pread(length: int, offset: int) -> bytes:
        inj.apply("read", offset, length)
        return pread(length, offset)

    def f_pread_into(buf: ReadBuffer, offset: int) -> None:
        inj.apply("read", offset, memoryview(buf).nbytes)
        pread_into(buf, offset)

    def f_preadv(buffers: Sequence[ReadBuffer], offset: int) -> None:
        inj.apply("read", offset, _total(buffers))
        preadv(buffers, offset)

    def f_pwrite(data: WriteBuffer, offset: int) -> None:
        d = inj.decide("write", offset, memoryview(data).nbytes)
        _write_faulted(d, lambda n: pwrite(memoryview(data).cast("B")[:n], offset), offset)
        pwrite(data, offset)

    def f_pwritev(buffers: Sequence[WriteBuffer], offset: int) -> None:
        d = inj.decide("write", offset, _total(buffers))

        def part(n: int) -> None:
            pwrite(b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:n], offset)

        _write_faulted(d, part, offset)
        pwritev(buffers, offset)

    def f_flush() -> None:
        inj.apply("flush", 0, 0)
        flush()

    def f_delete(offset: int, length: int) -> None:
        inj.apply("delete", offset, length)
        delete(offset, length)

    wrappers: dict[str, Callable[..., Any]] = {
        "pread": f_pread,
        "pread_into": f_pread_into,
        "preadv": f_preadv,
        "pwrite": f_pwrite,
        "pwritev": f_pwritev,
        "flush": f_flush,
        "delete": f_delete,
    }
    for name, func in wrappers.items():
        setattr(provider, name, func)
    return inj


def _write_faulted(d: _Decision | None, write_part: Callable[[int], None], offset: int) -> None:
    """Apply a write decision: delay, then (torn part and) error; return to write normally."""
    if d is None:
        return
    if d.delay > 0:
        time.sleep(d.delay)
    if d.errno is None:
        return
    if d.short:
        write_part(d.short)
        raise OSError(
            d.errno, f"Injected short write ({d.short} bytes at {offset}): {os.strerror(d.errno)}"
        )
    raise OSError(d.errno, f"Injected fault: {os.strerror(d.errno)}")
