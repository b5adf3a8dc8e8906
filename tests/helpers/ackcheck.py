"""Acknowledged-write checker: a versioned-block workload over NBD and its verdict.

Three parts:

* :class:`NBDClient` — an asyncio NBD client: fixed newstyle handshake,
  ``NBD_OPT_GO``, simple replies, any number of requests in flight (replies
  are matched by cookie, in any order).  A lost connection fails every
  pending request with :class:`NBDDisconnected`; an error reply raises
  :class:`NBDError` (``errno`` = the NBD error, which equals the Linux errno).
* :class:`Workload` — writes *versioned blocks* with ``depth`` writes in
  flight and records every acknowledgement, every failure and every flush
  in a :class:`Journal`.  A block of ``bs`` bytes carries its own identity::

      0  magic "ACKBLK01"   8  run id u64   16  block u64   24  version u64
      32 filler derived from (run, block, version) ...  bs-16  BLAKE2b-128 of bytes [0, bs-16)

  Writes to one block never overlap in time (a block gets version v+1 only
  once version v was answered), so "the latest acknowledged version" of a
  block is well defined.  :class:`BackgroundWorkload` runs one in a thread
  for synchronous tests.
* :func:`check` — reads an image of the device (:func:`read_image` over
  NBD, or a provider's data area) and judges every block: it must hold the
  latest acknowledged version, or a newer one that was never acknowledged
  (in flight or failed when things broke), or zeros if nothing was ever
  acknowledged.  Anything older is a *lost acknowledged write*; a block
  that does not verify (torn, foreign, impossible version) is *corrupt*.
  For async replication a loss window can be allowed: acknowledgements
  younger than ``window`` seconds before ``reference`` (the failure) may be
  lost; the report says how large a window the losses actually needed.

CLI (``python -m tests.helpers.ackcheck``)::

    write URI --journal J [--blocks N] [--bs B] [--depth D] [--seconds S] [--max-writes W]
    check URI --journal J [--window S] [--reference T]

``URI`` is ``nbd+unix:///export?socket=PATH``, ``nbd://host:port/export``
or a unix socket path.  ``write`` stops at the time limit, on SIGINT/SIGTERM
or when the connection goes away, and saves the journal; ``check`` prints
the report and exits 1 on any lost or corrupt block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from pyhast.frontend.nbd.protocol import (
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    InfoType,
    Opt,
    Rep,
    TransmissionFlag,
)

__all__ = [
    "BackgroundWorkload",
    "BlockState",
    "CheckReport",
    "Journal",
    "NBDClient",
    "NBDDisconnected",
    "NBDError",
    "Workload",
    "check",
    "decode_block",
    "make_block",
    "read_image",
]

MAGIC = b"ACKBLK01"
_HEAD = struct.Struct("<8sQQQ")
_SUM = 16
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


# --------------------------------------------------------------------------
# Blocks


def make_block(run: int, block: int, version: int, bs: int) -> bytes:
    """Version ``version`` (>= 1) of block ``block`` of run ``run``: ``bs`` bytes."""
    if bs < _HEAD.size + _SUM + 8:
        raise ValueError(f"block size {bs} is too small")
    head = _HEAD.pack(MAGIC, run, block, version)
    seed = hashlib.blake2b(head, digest_size=32).digest()
    body_len = bs - _HEAD.size - _SUM
    body = (seed * (body_len // 32 + 1))[:body_len]
    data = head + body
    return data + hashlib.blake2b(data, digest_size=_SUM).digest()


ZERO = "zero"
CORRUPT = "corrupt"


def decode_block(data: bytes | bytearray | memoryview, run: int, block: int) -> int | str:
    """The version ``data`` holds for (run, block), :data:`ZERO` or :data:`CORRUPT`."""
    data = bytes(data)
    if data.count(0) == len(data):
        return ZERO
    if len(data) < _HEAD.size + _SUM:
        return CORRUPT
    magic, r, b, v = _HEAD.unpack_from(data)
    if magic != MAGIC or r != run or b != block or v < 1:
        return CORRUPT
    if hashlib.blake2b(data[:-_SUM], digest_size=_SUM).digest() != data[-_SUM:]:
        return CORRUPT
    if make_block(run, block, v, len(data)) != data:
        return CORRUPT
    return int(v)


# --------------------------------------------------------------------------
# NBD client


class NBDError(OSError):
    """The server answered a request (or an option) with an error."""


class NBDDisconnected(ConnectionError):
    """The connection went away before the request was answered."""


def parse_uri(uri: str) -> tuple[str, str | tuple[str, int]]:
    """(export, unix path or (host, port)) of an NBD URI or a bare socket path."""
    if "://" not in uri:
        return "", uri
    u = urlparse(uri)
    export = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket")
        if not sock:
            raise ValueError(f"{uri}: nbd+unix needs ?socket=")
        return export, sock[0]
    if u.scheme == "nbd":
        return export, (u.hostname or "localhost", u.port or 10809)
    raise ValueError(f"{uri}: unsupported scheme {u.scheme!r}")


@dataclass
class _Pending:
    cmd: int
    length: int
    fut: asyncio.Future[bytes]


class NBDClient:
    """One NBD connection in transmission phase (create with :meth:`connect`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.flags = 0
        self.block_size: tuple[int, int, int] | None = None
        self._cookies = 0
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = False
        self.lost: BaseException | None = None

    @classmethod
    async def connect(
        cls, uri: str, *, export: str | None = None, timeout: float = 10.0
    ) -> NBDClient:
        name, where = parse_uri(uri)
        if export is not None:
            name = export
        if isinstance(where, str):
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(where), timeout)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*where), timeout)
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._handshake(name), timeout)
        except BaseException:
            writer.transport.abort()
            raise
        client._reader_task = asyncio.get_running_loop().create_task(client._read_replies())
        return client

    async def _handshake(self, name: str) -> None:
        r, w = self.reader, self.writer
        magic, opt, hflags = struct.unpack(">QQH", await r.readexactly(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NBDError(errno.EPROTO, "not a fixed newstyle NBD server")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NBDError(errno.EPROTO, "the server does not speak fixed newstyle")
        cflags = ClientFlag.FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.NO_ZEROES
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, InfoType.BLOCK_SIZE)
        w.write(struct.pack(">I", cflags) + _OPT.pack(IHAVEOPT, Opt.GO, len(data)) + data)
        await w.drain()
        while True:
            rmagic, ropt, rtype, rlen = _OPT_REPLY.unpack(await r.readexactly(_OPT_REPLY.size))
            payload = await r.readexactly(rlen) if rlen else b""
            if rmagic != REPLY_MAGIC or ropt != Opt.GO:
                raise NBDError(errno.EPROTO, "bad option reply")
            if rtype == Rep.ACK:
                break
            if rtype & (1 << 31):
                raise NBDError(
                    errno.ENOENT if rtype == Rep.ERR_UNKNOWN else errno.EPROTO,
                    f"NBD_OPT_GO refused ({rtype:#x}): {payload.decode(errors='replace')}",
                )
            if rtype == Rep.INFO and len(payload) >= 2:
                (itype,) = struct.unpack_from(">H", payload)
                if itype == InfoType.EXPORT:
                    _, self.size, self.flags = struct.unpack(">HQH", payload[:12])
                elif itype == InfoType.BLOCK_SIZE:
                    _, mn, pref, mx = struct.unpack(">HIII", payload[:14])
                    self.block_size = (mn, pref, mx)

    @property
    def inflight(self) -> int:
        return len(self._pending)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    async def _read_replies(self) -> None:
        r = self.reader
        try:
            while True:
                magic, error, cookie = _REPLY.unpack(await r.readexactly(_REPLY.size))
                if magic != SIMPLE_REPLY_MAGIC:
                    raise NBDError(errno.EPROTO, f"bad reply magic {magic:#x}")
                p = self._pending.pop(cookie, None)
                if p is None:
                    raise NBDError(errno.EPROTO, f"reply to unknown cookie {cookie}")
                data = b""
                if p.cmd == Cmd.READ and not error:
                    data = await r.readexactly(p.length)
                if p.fut.done():
                    continue
                if error:
                    p.fut.set_exception(NBDError(error, os.strerror(error)))
                else:
                    p.fut.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._lose(exc)
        except asyncio.CancelledError:
            self._lose(NBDDisconnected("client closed"))
            raise

    def _lose(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(NBDDisconnected(f"connection lost: {exc!r}"))
        self.writer.transport.abort()

    def _submit(
        self, cmd: int, offset: int, length: int, payload: bytes | None = None, flags: int = 0
    ) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self.lost is None and self.writer.transport.is_closing():
            self._lose(NBDDisconnected("the transport is closing"))
        if self.lost is not None or self.closed:
            fut.set_exception(NBDDisconnected("not connected"))
            return fut
        self._cookies += 1
        cookie = self._cookies
        self._pending[cookie] = _Pending(cmd, length, fut)
        header = _REQ.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if payload is None:
            self.writer.write(header)
        else:
            self.writer.writelines([header, payload])
        return fut

    async def _call(self, fut: asyncio.Future[bytes]) -> bytes:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self._lose(exc)
        return await fut

    async def read(self, offset: int, length: int) -> bytes:
        return await self._call(self._submit(Cmd.READ, offset, length))

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = int(CmdFlag.FUA) if fua else 0
        await self._call(self._submit(Cmd.WRITE, offset, len(data), data, flags))

    async def flush(self) -> None:
        await self._call(self._submit(Cmd.FLUSH, 0, 0))

    async def trim(self, offset: int, length: int) -> None:
        await self._call(self._submit(Cmd.TRIM, offset, length))

    async def close(self, timeout: float = 10.0) -> None:
        """Wait for pending replies, send NBD_CMD_DISC, close."""
        if self.closed:
            return
        pending = [p.fut for p in self._pending.values()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self.closed = True
        if self.lost is None:
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.write(_REQ.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
                await asyncio.wait_for(self.writer.drain(), timeout)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), timeout)

    def abort(self) -> None:
        """Drop the connection at once (pending requests fail)."""
        self.closed = True
        self._lose(NBDDisconnected("aborted"))
        if self._reader_task is not None:
            self._reader_task.cancel()


async def read_image(
    client: NBDClient, offset: int = 0, length: int | None = None, *, chunk: int = 1 << 20
) -> bytes:
    """``length`` bytes (default: to the end) from ``offset``, 8 reads in flight."""
    if length is None:
        length = client.size - offset
    if client.block_size is not None:
        chunk = min(chunk, client.block_size[2])
    pieces = [(o, min(chunk, offset + length - o)) for o in range(offset, offset + length, chunk)]
    out = bytearray(length)
    sem = asyncio.Semaphore(8)

    async def one(o: int, n: int) -> None:
        async with sem:
            out[o - offset : o - offset + n] = await client.read(o, n)

    await asyncio.gather(*(one(o, n) for o, n in pieces))
    return bytes(out)


# --------------------------------------------------------------------------
# The journal


@dataclass
class BlockState:
    """What happened to one block."""

    #: Versions acknowledged, with the time (monotonic) of the acknowledgement.
    acks: list[tuple[int, float]] = field(default_factory=list)
    #: Versions issued and never acknowledged (failed, cut off, or in flight).
    unresolved: set[int] = field(default_factory=set)
    #: The highest version issued.
    issued: int = 0

    @property
    def acked(self) -> int:
        return self.acks[-1][0] if self.acks else 0


@dataclass
class FlushRecord:
    issued_at: float
    answered_at: float | None
    ok: bool
    #: acknowledged writes when the flush was issued (those it covers)
    acked_before: int


@dataclass
class Journal:
    """Every write and flush of one workload run."""

    run: int
    bs: int
    base: int
    nblocks: int
    blocks: dict[int, BlockState] = field(default_factory=dict)
    flushes: list[FlushRecord] = field(default_factory=list)
    issued: int = 0
    acked: int = 0
    failed: int = 0
    #: errnos of failed writes
    errors: dict[int, int] = field(default_factory=dict)
    started_at: float = 0.0
    ended_at: float = 0.0
    #: why the run ended
    end: str = ""

    def block(self, i: int) -> BlockState:
        st = self.blocks.get(i)
        if st is None:
            st = self.blocks[i] = BlockState()
        return st

    def offset(self, i: int) -> int:
        return self.base + i * self.bs

    @property
    def unresolved(self) -> int:
        return sum(len(b.unresolved) for b in self.blocks.values())

    @property
    def flushes_ok(self) -> int:
        return sum(f.ok for f in self.flushes)

    def summary(self) -> str:
        return (
            f"{self.issued} writes issued, {self.acked} acknowledged, {self.failed} failed, "
            f"{self.unresolved} unresolved, {self.flushes_ok}/{len(self.flushes)} flushes ok "
            f"over {max(self.ended_at - self.started_at, 0):.1f} s ({self.end or 'running'})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "bs": self.bs,
            "base": self.base,
            "nblocks": self.nblocks,
            "issued": self.issued,
            "acked": self.acked,
            "failed": self.failed,
            "errors": {str(k): v for k, v in self.errors.items()},
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "end": self.end,
            "blocks": {
                str(i): {"acks": b.acks, "unresolved": sorted(b.unresolved), "issued": b.issued}
                for i, b in self.blocks.items()
            },
            "flushes": [asdict(f) for f in self.flushes],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Journal:
        j = cls(run=doc["run"], bs=doc["bs"], base=doc["base"], nblocks=doc["nblocks"])
        j.issued, j.acked, j.failed = doc["issued"], doc["acked"], doc["failed"]
        j.errors = {int(k): v for k, v in doc.get("errors", {}).items()}
        j.started_at, j.ended_at, j.end = doc["started_at"], doc["ended_at"], doc["end"]
        for i, b in doc["blocks"].items():
            j.blocks[int(i)] = BlockState(
                acks=[(int(v), float(t)) for v, t in b["acks"]],
                unresolved=set(b["unresolved"]),
                issued=b["issued"],
            )
        j.flushes = [FlushRecord(**f) for f in doc["flushes"]]
        return j


# --------------------------------------------------------------------------
# The workload


class Workload:
    """Versioned writes to ``nblocks`` blocks of ``bs`` bytes from ``base``."""

    def __init__(
        self,
        client: NBDClient,
        *,
        nblocks: int,
        bs: int = 4096,
        base: int = 0,
        depth: int = 32,
        flush_interval: float = 0.25,
        seed: int | None = None,
        run: int | None = None,
    ) -> None:
        if base + nblocks * bs > client.size:
            raise ValueError(
                f"{nblocks} blocks of {bs} bytes from {base} do not fit in {client.size} bytes"
            )
        if nblocks < 2 * depth:
            raise ValueError("use at least twice as many blocks as writes in flight")
        self.client = client
        self.depth = depth
        self.flush_interval = flush_interval
        self.rng = random.Random(seed)
        run_id = run if run is not None else random.getrandbits(63) or 1
        self.journal = Journal(run=run_id, bs=bs, base=base, nblocks=nblocks)
        self._busy: set[int] = set()
        self._stop = asyncio.Event()
        self._lost = False

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, duration: float | None = None, max_writes: int | None = None) -> Journal:
        """Write until ``duration``, ``max_writes``, :meth:`stop` or a lost connection."""
        j = self.journal
        j.started_at = time.monotonic()
        deadline = None if duration is None else j.started_at + duration
        limit = max_writes

        async def writer() -> None:
            while not self._stop.is_set() and not self._lost:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if limit is not None and j.issued >= limit:
                    return
                await self._one_write()

        async def flusher() -> None:
            while not self._stop.is_set() and not self._lost:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.flush_interval)
                if self._lost or not self.client.can_flush:
                    return
                await self._one_flush()

        tasks = [asyncio.create_task(writer()) for _ in range(self.depth)]
        flush_task = asyncio.create_task(flusher()) if self.flush_interval > 0 else None
        try:
            await asyncio.gather(*tasks)
        finally:
            self._stop.set()
            if flush_task is not None:
                with contextlib.suppress(Exception):
                    await flush_task
            j.ended_at = time.monotonic()
        if not j.end:
            j.end = "connection lost" if self._lost else "stopped"
        if not self._lost and self.client.can_flush:
            await self._one_flush()
        return j

    def _pick(self) -> int:
        n = self.journal.nblocks
        while True:
            i = self.rng.randrange(n)
            if i not in self._busy:
                return i

    async def _one_write(self) -> None:
        j = self.journal
        i = self._pick()
        self._busy.add(i)
        st = j.block(i)
        st.issued += 1
        v = st.issued
        st.unresolved.add(v)
        j.issued += 1
        try:
            await self.client.write(j.offset(i), make_block(j.run, i, v, j.bs))
        except NBDDisconnected:
            self._lost = True
            j.end = "connection lost"
            return  # stays unresolved: the outcome is unknown
        except NBDError as exc:
            j.failed += 1
            code = exc.errno or 0
            j.errors[code] = j.errors.get(code, 0) + 1
            return  # stays unresolved: the block may hold it or not
        finally:
            self._busy.discard(i)
        st.unresolved.discard(v)
        st.acks.append((v, time.monotonic()))
        j.acked += 1

    async def _one_flush(self) -> None:
        j = self.journal
        rec = FlushRecord(time.monotonic(), None, False, j.acked)
        j.flushes.append(rec)
        try:
            await self.client.flush()
        except NBDDisconnected:
            self._lost = True
            return
        except NBDError:
            rec.answered_at = time.monotonic()
            return
        rec.answered_at = time.monotonic()
        rec.ok = True


class BackgroundWorkload:
    """A :class:`Workload` on its own connection and event loop, in a thread.

    ``start()`` returns once connected; :attr:`acked` and friends can be
    polled from the test thread; ``stop()`` ends it and returns the journal.
    """

    def __init__(self, uri: str, **workload: Any) -> None:
        self.uri = uri
        self.kwargs = workload
        self.journal: Journal | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workload: Workload | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 20.0, **run: Any) -> BackgroundWorkload:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(run)), name="ackcheck", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"ackcheck workload did not connect within {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    async def _main(self, run: dict[str, Any]) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            client = await NBDClient.connect(self.uri)
            self._workload = Workload(client, **self.kwargs)
            self.journal = self._workload.journal
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._workload.run(**run)
        except BaseException as exc:
            self.error = exc
        finally:
            if client.lost is None:
                await client.close()
            else:
                client.abort()

    @property
    def acked(self) -> int:
        return self.journal.acked if self.journal else 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_acked(self, count: int, timeout: float = 30.0) -> int:
        """Poll until ``count`` writes in all were acknowledged; how many were."""
        deadline = time.monotonic() + timeout
        while self.acked < count:
            if not self.running:
                raise AssertionError(
                    f"the workload ended after {self.acked} acknowledged writes "
                    f"(waiting for {count}): {self.error or (self.journal and self.journal.end)}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"only {self.acked} acknowledged writes after {timeout} s (waiting for {count})"
                )
            time.sleep(0.02)
        return self.acked

    def wait_ended(self, timeout: float = 30.0) -> Journal:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the workload did not end within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.journal is not None
        return self.journal

    def stop(self, timeout: float = 30.0) -> Journal:
        """Stop writing, wait for every answer, return the journal."""
        loop, wl = self._loop, self._workload
        if loop is not None and wl is not None and self.running:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wl.stop)
        return self.wait_ended(timeout)


# --------------------------------------------------------------------------
# The checker


@dataclass
class Finding:
    block: int
    offset: int
    found: int | str
    acked: int
    unresolved: list[int]
    #: acknowledged versions newer than what was found
    lost_acks: int = 0
    #: seconds between the oldest lost acknowledgement and the reference time
    age: float | None = None

    def __str__(self) -> str:
        age = "" if self.age is None else f", oldest lost ack {self.age * 1000:.0f} ms old"
        return (
            f"block {self.block} (offset {self.offset}) holds {self.found}, latest acked "
            f"v{self.acked}, unacknowledged {self.unresolved}{age}"
        )


@dataclass
class CheckReport:
    blocks: int
    acked_writes: int
    acked_blocks: int
    ok: int = 0
    zero: int = 0
    #: blocks holding an unacknowledged version newer than the latest ack
    newer_unacked: int = 0
    lost: list[Finding] = field(default_factory=list)
    #: losses tolerated by the allowed window (async)
    in_window: list[Finding] = field(default_factory=list)
    corrupt: list[Finding] = field(default_factory=list)
    #: torn blocks whose latest write was never acknowledged (allowed only
    #: with ``allow_torn_unacked``: a disk that tears writes was simulated)
    torn_unacked: list[Finding] = field(default_factory=list)
    #: acknowledged writes lost (outside the window / inside it)
    lost_acks: int = 0
    lost_acks_in_window: int = 0
    #: smallest window that would have covered every loss (seconds), 0 if none
    window_needed: float = 0.0
    #: non-zero bytes outside the workload's area (when checked)
    outside_nonzero: int = 0

    @property
    def clean(self) -> bool:
        return not self.lost and not self.corrupt and not self.outside_nonzero

    def summary(self) -> str:
        text = (
            f"{self.blocks} blocks checked: {self.acked_writes} acknowledged writes to "
            f"{self.acked_blocks} blocks; {self.ok} ok ({self.newer_unacked} newer "
            f"unacknowledged, {self.zero} never written), {self.lost_acks} acknowledged writes "
            f"lost in {len(self.lost)} blocks, {len(self.corrupt)} corrupt blocks"
        )
        if self.torn_unacked:
            text += (
                f"; {len(self.torn_unacked)} blocks torn by a write that was never "
                "acknowledged (allowed: torn writes were simulated)"
            )
        if self.in_window or self.window_needed:
            text += (
                f"; {self.lost_acks_in_window} acknowledged writes in {len(self.in_window)} "
                f"blocks lost within the allowed window (needed {self.window_needed * 1000:.0f} ms)"
            )
        if self.outside_nonzero:
            text += f"; {self.outside_nonzero} non-zero bytes outside the workload area"
        return text

    def details(self, limit: int = 10) -> str:
        lines = [self.summary()]
        for kind, items in (("LOST", self.lost), ("CORRUPT", self.corrupt)):
            lines += [f"  {kind}: {f}" for f in items[:limit]]
        return "\n".join(lines)


def check(
    journal: Journal,
    image: bytes | bytearray | memoryview,
    *,
    image_offset: int = 0,
    window: float = 0.0,
    reference: float | None = None,
    outside_zero: bool = False,
    allow_torn_unacked: bool = False,
) -> CheckReport:
    """Judge ``image`` (device bytes from ``image_offset``) against ``journal``.

    A block may hold its latest acknowledged version or a newer unacknowledged
    one (zeros if nothing was ever acknowledged).  Older content is a loss;
    a loss is tolerated (``in_window``) when every lost acknowledgement is
    at most ``window`` seconds older than ``reference`` (default: the end of
    the run).  ``outside_zero``: the rest of the image must be zeros.
    ``allow_torn_unacked``: a block that does not verify is not corrupt when
    its latest write was never acknowledged (a disk fault that tears writes
    leaves such a block undefined, like a real disk's failed write).
    """
    j = journal
    ref = j.ended_at if reference is None else reference
    view = memoryview(image)
    rep = CheckReport(
        blocks=j.nblocks,
        acked_writes=sum(len(b.acks) for b in j.blocks.values()),
        acked_blocks=sum(1 for b in j.blocks.values() if b.acks),
    )
    for i in range(j.nblocks):
        off = j.offset(i) - image_offset
        if off < 0 or off + j.bs > len(view):
            raise ValueError(f"the image does not cover block {i}")
        found = decode_block(view[off : off + j.bs], j.run, i)
        st = j.blocks.get(i, BlockState())
        acked = st.acked
        finding = Finding(i, j.offset(i), found, acked, sorted(st.unresolved))
        if found == CORRUPT and allow_torn_unacked and st.issued > acked:
            rep.torn_unacked.append(finding)
            continue
        if found == CORRUPT or (isinstance(found, int) and found > st.issued):
            rep.corrupt.append(finding)
            continue
        version = 0 if found == ZERO else int(found)
        if version == acked:
            rep.ok += 1
            rep.zero += version == 0
            continue
        if version > acked and version in st.unresolved:
            rep.ok += 1
            rep.newer_unacked += 1
            continue
        # Older than the latest acknowledgement (or an impossible in-between).
        lost = [(v, t) for v, t in st.acks if v > version]
        finding.lost_acks = len(lost)
        if lost:
            finding.age = max(0.0, ref - min(t for _, t in lost))
            rep.window_needed = max(rep.window_needed, finding.age)
        if lost and finding.age is not None and finding.age <= window:
            rep.in_window.append(finding)
            rep.lost_acks_in_window += len(lost)
        else:
            rep.lost.append(finding)
            rep.lost_acks += len(lost)
    if outside_zero:
        start = j.base - image_offset
        end = j.offset(j.nblocks) - image_offset
        for a, b in ((0, max(start, 0)), (min(end, len(view)), len(view))):
            chunk = bytes(view[a:b])
            rep.outside_nonzero += len(chunk) - chunk.count(0)
    return rep


# --------------------------------------------------------------------------
# CLI


async def _cli_write(args: argparse.Namespace) -> int:
    client = await NBDClient.connect(args.uri)
    nblocks = args.blocks or (client.size - args.base) // args.bs
    wl = Workload(
        client,
        nblocks=nblocks,
        bs=args.bs,
        base=args.base,
        depth=args.depth,
        flush_interval=args.flush_interval,
        seed=args.seed,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, wl.stop)
    try:
        journal = await wl.run(duration=args.seconds, max_writes=args.max_writes)
    finally:
        if client.lost is None:
            await client.close()
    Path(args.journal).write_text(json.dumps(journal.to_json()))
    print(journal.summary())
    return 0


async def _cli_check(args: argparse.Namespace) -> int:
    journal = Journal.from_json(json.loads(Path(args.journal).read_text()))
    client = await NBDClient.connect(args.uri)
    try:
        image = await read_image(client)
    finally:
        await client.close()
    rep = check(journal, image, window=args.window, reference=args.reference)
    print(journal.summary())
    print(rep.details())
    return 0 if rep.clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.helpers.ackcheck", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="run the versioned-block workload")
    w.add_argument("uri")
    w.add_argument("--journal", required=True)
    w.add_argument("--blocks", type=int, default=0, help="default: the whole device")
    w.add_argument("--bs", type=int, default=4096)
    w.add_argument("--base", type=int, default=0)
    w.add_argument("--depth", type=int, default=32)
    w.add_argument("--flush-interval", type=float, default=0.25)
    w.add_argument("--seconds", type=float, default=None)
    w.add_argument("--max-writes", type=int, default=None)
    w.add_argument("--seed", type=int, default=None)
    c = sub.add_parser("check", help="read the device and judge it against a journal")
    c.add_argument("uri")
    c.add_argument("--journal", required=True)
    c.add_argument("--window", type=float, default=0.0, help="seconds of losses allowed")
    c.add_argument("--reference", type=float, default=None, help="monotonic time of the failure")
    args = p.parse_args(argv)
    if args.command == "write":
        return asyncio.run(_cli_write(args))
    return asyncio.run(_cli_check(args))


if __name__ == "__main__":
    sys.exit(main())
