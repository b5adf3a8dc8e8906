"""The secondary worker (spec 6.1 step 6, 6.4, 8).

Started by the parent once a primary has completed both handshake steps,
with conn A (requests in) and conn B (replies out).  It decides the sync
direction from the generation counters, answers on conn A, then applies the
primary's requests strictly in arrival order.  Each read of conn A is
parsed and validated in the frame callback, which also sends the memsync
``received`` replies; the requests are then applied in order right after
(local I/O inline, see :meth:`Secondary._apply`), so an early reply never
waits for a disk write.  FLUSH alone runs its fdatasync in a thread (later
writes may proceed; it covers every write applied before it).

Every request is validated; a bad one is answered with EINVAL and the stream
goes on (FreeBSD aborts on an unknown command and loses sync on a rejected
write).  A checksum mismatch or undecodable payload closes the session, as
FreeBSD does.  20 s without any message (two keepalives) ends the session.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from pyhast.defaults import HAST_KEEPALIVE, MAXPHYS, METADATA_SIZE
from pyhast.enums import Checksum, Compression, Event, HioCmd
from pyhast.errors import ExitCode, MetadataError, ProtocolError
from pyhast.transport.aio import FramedConn
from pyhast.transport.base import ConnError
from pyhast.wire.frame import Frame
from pyhast.wire.handshake import (
    ERR_SPLITBRAIN,
    Decision,
    PrimaryHello,
    decide,
    decision_reply,
)
from pyhast.wire.messages import (
    Request,
    RequestError,
    encode_read_reply,
    encode_reply,
    parse_request,
)
from pyhast.wire.pipeline import pipeline_recv, pipeline_send
from pyhast.worker.local import LocalComponent


class SessionEnd(Exception):
    """The session is over; ``exit_code`` is the worker's exit status."""

    def __init__(self, reason: str, exit_code: ExitCode) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class Secondary:
    """One session with a primary."""

    def __init__(
        self,
        local: LocalComponent,
        in_conn: FramedConn,
        out_conn: FramedConn,
        *,
        version: int,
        checksum: Checksum,
        compression: Compression,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.local = local
        self.inc = in_conn
        self.out = out_conn
        self.version = version
        self.checksum = checksum
        self.compression = compression
        self.log = log
        self.first_request = True
        self.last_recv = time.monotonic()
        self.ended: asyncio.Future[SessionEnd] = asyncio.get_running_loop().create_future()
        self.flushes: set[asyncio.Task[None]] = set()
        #: Validated requests waiting for _apply, in arrival order.
        self._queue: list[tuple[Request, bytes | memoryview | None]] = []
        self._apply_scheduled = False
        self.stat = {"read": 0, "write": 0, "delete": 0, "flush": 0}
        self.stat_err = {"read": 0, "write": 0, "delete": 0, "flush": 0}

    # -- handshake --------------------------------------------------------------

    def decide(self, hello: PrimaryHello) -> Decision:
        md = self.local.md
        decision = decide(
            s_resuid=md.resuid, s_localcnt=md.localcnt, s_remotecnt=md.remotecnt, hello=hello
        )
        return decision

    def handshake_reply(self, decision: Decision) -> None:
        """Adopt the resuid if needed, then send message 4 (with the bitmap) on conn A."""
        md = self.local.md
        if decision.adopt_resuid is not None:
            md.resuid = decision.adopt_resuid
            self.local.metadata_write()
            self.log.info("Adopted resource unique ID %d.", md.resuid)
        # The bitmap proper: the area up to localoff may hold alignment padding.
        mapsize = self.local.activemap.mapsize
        if decision.errmsg is not None or decision.bitmap == "none":
            bitmap = b""
        elif decision.bitmap == "full":
            bitmap = b"\xff" * mapsize
        else:
            bitmap = self.local.provider.pread(mapsize, METADATA_SIZE)
        nv = decision_reply(
            decision,
            datasize=md.datasize,
            extentsize=md.extentsize,
            localcnt=md.localcnt,
            remotecnt=md.remotecnt,
            mapsize=len(bitmap),
        )
        payload = None
        if bitmap and decision.errmsg is None:
            payload = pipeline_send(nv, bitmap, self.compression, self.checksum)
        self.inc.send_frame(nv, payload, version=self.version)

    # -- steady state ----------------------------------------------------------

    def start(self) -> None:
        self.out.coalesce = True
        self.inc.set_frame_handler(self._on_request, self._on_lost)
        self.out.set_frame_handler(self._on_unexpected, self._on_lost)

    def _end(self, reason: str, code: ExitCode = ExitCode.TEMPFAIL) -> None:
        if not self.ended.done():
            self.ended.set_result(SessionEnd(reason, code))

    def _on_lost(self, exc: BaseException | None) -> None:
        self._end("Connection closed by the primary." if exc is None else str(exc))

    def _on_unexpected(self, frame: Frame) -> None:
        self._end("Unexpected message from the primary on the reply connection.")

    def _reply(self, seq: int, err: int = 0, *, received: bool = False) -> None:
        try:
            self.out.send_encoded(encode_reply(seq, err, received, version=self.version))
        except (OSError, ConnError, ProtocolError) as exc:
            self._end(f"Unable to send a reply: {exc}")

    def _on_request(self, frame: Frame) -> None:
        self.last_recv = time.monotonic()
        local = self.local
        try:
            req = parse_request(frame.nv, sectorsize=local.sectorsize, datasize=local.datasize)
        except RequestError as exc:
            self.log.warning("Invalid request refused: %s", exc)
            self._reply(exc.seq, errno.EINVAL)
            return
        cmd = req.cmd
        if cmd is HioCmd.KEEPALIVE:
            return
        if self.first_request:
            # The primary has merged and persisted our bitmap: clear ours.
            self.first_request = False
            try:
                local.provider.pwrite(bytes(local.md.mapsize), METADATA_SIZE)
                if local.md.localstale:
                    # Stale extents of a former primary: the new primary syncs them.
                    local.md.localstale = ()
                    local.metadata_write()
            except (OSError, MetadataError) as exc:
                self.log.error("Unable to clear the activemap: %s", exc)
        data: bytes | memoryview | None = None
        if cmd is HioCmd.WRITE:
            try:
                data = pipeline_recv(frame.nv, frame.payload or b"", max_size=MAXPHYS)
            except ProtocolError as exc:
                self._end(f"Unable to receive write data: {exc}")
                return
            if len(data) != req.length:
                self.log.warning(
                    "Write request with %d bytes of data for length %d refused.",
                    len(data),
                    req.length,
                )
                self._reply(req.seq, errno.EINVAL)
                return
            if req.memsync:
                # Sent at the end of this read, before any of its writes.
                self._reply(req.seq, received=True)
        self._queue.append((req, data))
        if not self._apply_scheduled:
            self._apply_scheduled = True
            asyncio.get_running_loop().call_soon(self._apply)

    def _apply(self) -> None:
        """Apply the requests received so far, strictly in arrival order.

        Runs right after the read callback that queued them, so the memsync
        ``received`` replies of that read have already gone out (one write)
        while the disk writes happen here; the final replies of the batch go
        out together (the reply connection coalesces).
        """
        self._apply_scheduled = False
        queue, self._queue = self._queue, []
        local = self.local
        for req, data in queue:
            if self.ended.done():
                return
            cmd = req.cmd
            if cmd is HioCmd.WRITE:
                assert data is not None
                self.stat["write"] += 1
                try:
                    local.write(req.offset, data)
                except OSError as exc:
                    self.stat_err["write"] += 1
                    self._reply(req.seq, exc.errno or errno.EIO)
                    continue
                self._reply(req.seq)
            elif cmd is HioCmd.READ:
                self.stat["read"] += 1
                try:
                    rdata = local.read(req.offset, req.length)
                except OSError as exc:
                    self.stat_err["read"] += 1
                    self._reply(req.seq, exc.errno or errno.EIO)
                    continue
                head, payload = encode_read_reply(
                    req.seq,
                    rdata,
                    compression=self.compression,
                    checksum=self.checksum,
                    version=self.version,
                )
                try:
                    self.out.send_encoded(head, payload)
                except (OSError, ConnError, ProtocolError) as exc:
                    self._end(f"Unable to send a reply: {exc}")
            elif cmd is HioCmd.DELETE:
                self.stat["delete"] += 1
                try:
                    local.delete(req.offset, req.length)
                except OSError as exc:
                    self.stat_err["delete"] += 1
                    self._reply(req.seq, exc.errno or errno.EIO)
                    continue
                self._reply(req.seq)
            elif cmd is HioCmd.FLUSH:
                self.stat["flush"] += 1
                task = asyncio.get_running_loop().create_task(self._flush(req.seq))
                self.flushes.add(task)
                task.add_done_callback(self.flushes.discard)

    async def _flush(self, seq: int) -> None:
        try:
            await self.local.flush()
        except OSError as exc:
            self.stat_err["flush"] += 1
            self._reply(seq, exc.errno or errno.EIO)
            return
        self._reply(seq)

    async def serve(self) -> SessionEnd:
        """Run until the session ends; returns why."""
        self.start()
        timeout = 2 * HAST_KEEPALIVE
        while not self.ended.done():
            idle = time.monotonic() - self.last_recv
            if idle >= timeout:
                self._end(f"No message from the primary for {timeout} seconds.")
                break
            try:
                await asyncio.wait_for(asyncio.shield(self.ended), timeout - idle)
            except TimeoutError:
                continue
        end = self.ended.result()
        if self.flushes:
            await asyncio.gather(*self.flushes, return_exceptions=True)
        return end


def splitbrain_event(decision: Decision) -> Event | None:
    return Event.SPLITBRAIN if decision.errmsg == ERR_SPLITBRAIN else None
