"""The primary worker: start-up, the guard loop, the handshake, status, reload.

Start-up order (spec 3.4): read metadata and the activemap, export the device
(NBD socket), serve the parent's ctrl channel, connect to the secondary when
configured, then the guard loop: reconnect every ``reconnect_interval``
seconds while disconnected, keepalive every 10 s when idle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Coroutine
from typing import Any

from pyhast.config import ResourceConfig
from pyhast.defaults import HAST_DEVDIR, HAST_KEEPALIVE
from pyhast.disk.stale import StaleRanges
from pyhast.enums import Checksum, Compression, Event, Replication, Role
from pyhast.errors import ExitCode, MetadataError, ProtocolError
from pyhast.frontend.fuse import DeviceError, HastDevice
from pyhast.frontend.nbd.server import NBDServer
from pyhast.transport.aio import FramedConn
from pyhast.transport.base import ConnError
from pyhast.wire.handshake import (
    ERR_SPLITBRAIN,
    HandshakeError,
    PrimaryHello,
    SecondaryReply,
    first_request,
    parse_first_reply,
)
from pyhast.wire.nv import NV
from pyhast.wire.pipeline import pipeline_recv
from pyhast.worker.local import LocalComponent
from pyhast.worker.parent_link import CONTROL_RELOAD, CONTROL_STATUS, ParentLink
from pyhast.worker.primary import PrimaryDevice
from pyhast.worker.remote import RemoteComponent
from pyhast.worker.sync import Synchronizer

#: Upper bound of the bitmap accepted in the handshake (16 TiB / 2 MiB extents = 1 MiB).
MAX_MAPSIZE = 64 * 1024 * 1024


def reconnect_interval() -> float:
    """10 s as in FreeBSD; tests may shorten it with PYHAST_RECONNECT_INTERVAL."""
    try:
        return max(0.1, float(os.environ.get("PYHAST_RECONNECT_INTERVAL", HAST_KEEPALIVE)))
    except ValueError:
        return float(HAST_KEEPALIVE)


class PrimaryWorker:
    def __init__(
        self,
        res: ResourceConfig,
        parent: ParentLink,
        *,
        rundir: str,
        devdir: str = HAST_DEVDIR,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.res = res
        self.parent = parent
        self.rundir = rundir
        self.devdir = devdir
        self.device: HastDevice | None = None
        self.started = False
        self.log = log
        self.local: LocalComponent | None = None
        self.dev: PrimaryDevice | None = None
        self.nbd: NBDServer | None = None
        self.sync: Synchronizer | None = None
        self.sync_task: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()
        self.exit_code = ExitCode.OK
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set when the worker stops on purpose: its own disconnection and the
        #: end of a synchronisation are not events then (FreeBSD's worker
        #: exits on SIGTERM without any), so hooks never depend on a race.
        self.exiting = False

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.rundir, f"{self.res.provname}.nbd")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life cycle --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        res = self.res
        self.local = local = LocalComponent.open(
            res.localpath, res.name, metaflush=res.metaflush, log=self.log
        )
        md = local.md
        local.load_bitmap()
        if md.resuid == 0:
            md.localcnt = md.remotecnt = 0
        md.prevrole = Role.PRIMARY
        local.metadata_write()
        self.dev = dev = PrimaryDevice(local, replication=res.replication, log=self.log)
        dev.on_need_sync = self._sync_needed
        if md.localstale:
            # A local write failed before the last exit: only the peer has those
            # ranges right; they are copied from it at the next connection.
            try:
                stale = StaleRanges.from_array(md.localstale)
            except ValueError as exc:
                raise MetadataError(f"Invalid stale ranges in the metadata: {exc}.") from exc
            for off, n in stale:
                if off + n > md.datasize:
                    raise MetadataError(f"Stale range {off}+{n} in the metadata is past the end.")
                dev.am.need_sync(off, n)
            dev.local_stale = stale
            self.log.warning(
                "%d bytes in %d ranges have a stale local copy; they will be synchronized "
                "from the peer.",
                stale.nbytes,
                len(stale),
            )
        # Until a handshake tells us, the peer's counters are the mirror of
        # ours (what the last completed synchronisation left): so the first
        # write without the peer bumps localcnt even if this worker never
        # saw the peer, and a later split-brain is detected as one.
        dev.secondary_localcnt = md.remotecnt
        dev.secondary_remotecnt = md.localcnt
        self.parent.serve_ctrl(self._ctrl, self._ctrl_lost)
        os.makedirs(self.rundir, mode=0o755, exist_ok=True)
        self.nbd = NBDServer({res.provname: dev}, unix_path=self.nbd_socket)
        await self.nbd.start()
        self.log.info(
            "Serving %s (%d bytes) at %s.", res.provname, local.datasize, self.nbd.uri(res.provname)
        )
        await self._create_device()
        self.started = True
        if res.remoteaddr != "none":
            await self._connect()
        guard = loop.create_task(self._guard())
        try:
            await self.stop.wait()
            self.log.info("Termination signal received, exiting.")
        finally:
            guard.cancel()
            await self._shutdown()
        return int(self.exit_code)

    async def _create_device(self) -> None:
        """Make <devdir>/<provname> appear; the NBD export works without it."""
        assert self.dev is not None
        device = HastDevice(self.dev, self.res.provname, devdir=self.devdir, log=self.log)
        try:
            await device.start()
        except (DeviceError, OSError) as exc:
            self.log.error("Unable to create device %s: %s", device.path, exc)
            return
        self.device = device
        self.log.info("Device %s created.", device.path)

    async def _shutdown(self) -> None:
        self.exiting = True
        if self.device is not None:
            # The parent refused the role change if the device was in use
            # (unless forced): whoever still holds it gets I/O errors.
            try:
                await self.device.stop(force=True)
            except (DeviceError, OSError) as exc:
                self.log.error("Unable to destroy device %s: %s", self.device.path, exc)
        if self.nbd is not None:
            await self.nbd.close()
        if self.sync_task is not None:
            self.sync_task.cancel()
        dev = self.dev
        if dev is not None and dev.remote is not None:
            dev.remote.disconnect("Worker exiting.")
        if self.local is not None:
            try:
                await self.local.flush()
                await self.local.bitmap_flush()
            except OSError:
                pass
            self.local.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            os.unlink(self.nbd_socket)
        except FileNotFoundError:
            pass

    def _ctrl_lost(self, exc: BaseException | None) -> None:
        self.log.warning("The control channel to the parent is gone; exiting.")
        self.stop.set()

    # -- guard: reconnect and keepalive -------------------------------------------

    async def _guard(self) -> None:
        interval = reconnect_interval()
        last_attempt = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._wake.clear()
            dev = self.dev
            assert dev is not None
            now = time.monotonic()
            remote = dev.remote
            if remote is not None and remote.connected:
                # A stalled link or a secondary that stopped answering: the
                # oldest request waits longer than `timeout` -> degraded.
                age = remote.oldest_age()
                if age > self.res.timeout:
                    remote.disconnect(f"No reply from the secondary for {age:.0f} seconds.")
                    continue
                if now - remote.last_send >= HAST_KEEPALIVE:
                    remote.keepalive()
                continue
            if self.res.remoteaddr == "none":
                continue
            if now - last_attempt >= interval:
                last_attempt = now
                await self._connect()

    # -- the handshake (spec 6.1, primary side) ------------------------------------

    async def _connect(self) -> bool:
        try:
            await self._handshake()
        except HandshakeError as exc:
            self.log.warning("%s", exc)
            if exc.errmsg == ERR_SPLITBRAIN:
                await self.parent.send_event(Event.SPLITBRAIN)
            return False
        except (OSError, ConnError, ProtocolError, TimeoutError) as exc:
            self.log.debug("Unable to connect to %s: %s", self.res.remoteaddr, exc)
            return False
        return True

    async def _handshake(self) -> None:
        res = self.res
        dev = self.dev
        local = self.local
        assert dev is not None and local is not None
        md = local.md
        timeout = float(res.timeout)
        out = await FramedConn.open(await self.parent.request_connection())
        inc = None
        try:
            out.send_frame(first_request(res.name), version=1)
            version, token = parse_first_reply((await out.recv_frame(timeout)).nv)
            inc = await FramedConn.open(await self.parent.request_connection())
            virgin = False
            if md.resuid == 0:
                md.resuid = secrets.randbits(64) or 1
                local.metadata_write()
                virgin = True
            hello = PrimaryHello(res.name, token, md.resuid, md.localcnt, md.remotecnt, virgin)
            inc.send_frame(hello.to_nv(), version=version)
            out.set_max_payload(MAX_MAPSIZE)
            frame = await out.recv_frame(timeout)
            reply = SecondaryReply.from_nv(frame.nv)
            if reply.datasize != md.datasize:
                raise HandshakeError(
                    f"Data size differs between nodes (local={md.datasize}, "
                    f"remote={reply.datasize})."
                )
            if reply.extentsize != md.extentsize:
                raise HandshakeError(
                    f"Extent size differs between nodes (local={md.extentsize}, "
                    f"remote={reply.extentsize})."
                )
            dev.secondary_localcnt = reply.localcnt
            dev.secondary_remotecnt = reply.remotecnt
            dev.syncsrc = reply.syncsrc
            if reply.virgin and md.localcnt == 0:
                md.localcnt = 1
                local.metadata_write()
            if reply.mapsize > 0:
                bitmap = pipeline_recv(frame.nv, frame.payload or b"", max_size=reply.mapsize)
                dev.am.merge(bitmap)
                await local.bitmap_flush()
            out.set_max_payload(None)
        except BaseException:
            out.abort()
            if inc is not None:
                inc.abort()
            raise
        mode = res.replication
        if version < 2 and mode is Replication.MEMSYNC:
            self.log.warning("Remote node speaks protocol version 1; using fullsync.")
            dev.replication = Replication.FULLSYNC
        dev.remote = RemoteComponent(
            out,
            inc,
            version=version,
            checksum=res.checksum,
            compression=res.compression,
            on_disconnect=self._disconnected,
            log=self.log,
        )
        self.log.info("Connected to %s.", res.remoteaddr)
        await self.parent.send_event(Event.CONNECT)
        self._start_sync()

    def _disconnected(self, reason: str) -> None:
        self.log.warning("Disconnected from %s: %s", self.res.remoteaddr, reason)
        if self.sync_task is not None and not self.sync_task.done():
            self.sync_task.cancel()
        self._spawn(self._event(Event.DISCONNECT))

    async def _event(self, event: Event) -> None:
        if not self.exiting:
            await self.parent.send_event(event)

    def _sync_needed(self) -> None:
        """Extents were marked while connected: run a synchronisation pass now."""
        if self.sync_task is None or self.sync_task.done():
            self._start_sync()

    def _start_sync(self) -> None:
        dev = self.dev
        assert dev is not None
        if self.sync is None:
            self.sync = Synchronizer(dev, send_event=self._event, log=self.log)
        self.sync_task = asyncio.get_running_loop().create_task(self.sync.run())

    # -- ctrl: status and reload -----------------------------------------------------

    def _ctrl(self, req: NV) -> NV:
        cmd = req.get_uint8("cmd", default=0)
        if cmd == CONTROL_STATUS:
            return self._status()
        if cmd == CONTROL_RELOAD:
            return self._reload(req)
        reply = NV()
        reply.add_int16("error", 22)
        return reply

    def _status(self) -> NV:
        dev = self.dev
        local = self.local
        assert dev is not None and local is not None
        am = dev.am
        nv = NV()
        nv.add_string("status", "complete" if dev.connected else "degraded")
        nv.add_uint64("dirty", am.ndirty * am.extentsize)
        nv.add_uint32("extentsize", am.extentsize)
        nv.add_uint32("keepdirty", am.keepdirty)
        s = dev.stats
        nv.add_uint64("stat_read", s.read)
        nv.add_uint64("stat_write", s.write)
        nv.add_uint64("stat_delete", s.delete)
        nv.add_uint64("stat_flush", s.flush)
        nv.add_uint64("stat_activemap_update", local.stat_activemap_update)
        nv.add_uint64("stat_read_error", s.read_error)
        nv.add_uint64("stat_write_error", s.write_error + local.stat_write_error)
        nv.add_uint64("stat_delete_error", s.delete_error)
        nv.add_uint64("stat_flush_error", s.flush_error + local.stat_flush_error)
        for name, value in dev.queue_sizes().items():
            nv.add_uint64(name, value)
        if self.nbd is not None and self.started:
            # Only once start-up is over: hastctl role primary waits for it.
            nv.add_string("nbd_uri", self.nbd.uri(self.res.provname))
        if self.device is not None and self.device.running:
            nv.add_string("devpath", self.device.path)
        nv.add_string("syncsrc", dev.syncsrc.name.lower())
        sync = self.sync
        syncing = sync is not None and sync.active
        nv.add_uint64("sync_left", sync.bytes_left if syncing and sync else 0)
        nv.add_uint64("sync_rate", sync.update_rate() if syncing and sync else 0)
        nv.add_uint64("localcnt", local.md.localcnt)
        nv.add_uint64("remotecnt", local.md.remotecnt)
        nv.add_int16("error", 0)
        return nv

    def _reload(self, req: NV) -> NV:
        """Apply a CONTROL_RELOAD (spec 3.5): new requests use the new settings."""
        self.log.info("Reloading configuration...")
        old = self.res
        new = dataclasses.replace(
            old,
            remoteaddr=req.get_string("remoteaddr", default=old.remoteaddr),
            sourceaddr=req.get_string("sourceaddr", default=old.sourceaddr or "") or None,
            replication=Replication(req.get_int32("replication", default=int(old.replication))),
            checksum=Checksum(req.get_int32("checksum", default=int(old.checksum))),
            compression=Compression(req.get_int32("compression", default=int(old.compression))),
            timeout=req.get_int32("timeout", default=old.timeout),
            metaflush=bool(req.get_int32("metaflush", default=int(old.metaflush))),
        )
        self.res = new
        dev = self.dev
        assert dev is not None and self.local is not None
        dev.replication = new.replication
        self.local.metaflush = new.metaflush
        remote = dev.remote
        if remote is not None:
            remote.checksum = new.checksum
            remote.compression = new.compression
            if (new.remoteaddr, new.sourceaddr) != (old.remoteaddr, old.sourceaddr):
                remote.disconnect("The remote address changed.")
        self.log.info("Configuration reloaded successfully.")
        reply = NV()
        reply.add_int16("error", 0)
        return reply
