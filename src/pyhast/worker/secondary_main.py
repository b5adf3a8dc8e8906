"""The secondary worker's life: handshake decision, reply, serve, exit code."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from pyhast.config import ResourceConfig
from pyhast.enums import Event, Role
from pyhast.errors import ExitCode, ProtocolError
from pyhast.transport.aio import FramedConn
from pyhast.wire.handshake import HandshakeError, PrimaryHello
from pyhast.wire.nv import NV
from pyhast.worker.local import LocalComponent
from pyhast.worker.parent_link import CONTROL_STATUS, ParentLink
from pyhast.worker.secondary import Secondary, splitbrain_event


async def run_secondary(
    res: ResourceConfig,
    parent: ParentLink,
    *,
    in_fd: int,
    out_fd: int,
    handshake: bytes,
    version: int,
    log: logging.LoggerAdapter[logging.Logger],
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    inc = await FramedConn.open(socket.socket(fileno=in_fd))
    out = await FramedConn.open(socket.socket(fileno=out_fd))
    try:
        hello = PrimaryHello.from_nv(NV.decode(handshake))
    except (HandshakeError, ProtocolError) as exc:
        log.error("Invalid handshake from the primary: %s", exc)
        return int(ExitCode.PROTOCOL)
    local = LocalComponent.open(res.localpath, res.name, metaflush=res.metaflush, log=log)
    try:
        if local.md.prevrole is not Role.SECONDARY:
            local.md.prevrole = Role.SECONDARY
            local.metadata_write()
        sec = Secondary(
            local,
            inc,
            out,
            version=version,
            checksum=res.checksum,
            compression=res.compression,
            log=log,
        )
        decision = sec.decide(hello)
        log.debug("Handshake decision: %s.", decision.note)
        sec.handshake_reply(decision)
        if decision.errmsg is not None:
            log.error("%s", decision.errmsg)
            event = splitbrain_event(decision)
            await out.drain(5.0)
            await inc.drain(5.0)
            if event is not None:
                await parent.send_event(event)
            return int(decision.exit_code)
        await parent.send_event(Event.CONNECT)

        def status(req: NV) -> NV:
            nv = NV()
            if req.get_uint8("cmd", default=0) != CONTROL_STATUS:
                nv.add_int16("error", 22)
                return nv
            nv.add_string("status", "complete")
            nv.add_uint64("dirty", 0)
            nv.add_uint32("extentsize", local.md.extentsize)
            nv.add_uint32("keepdirty", 0)
            for key in ("read", "write", "delete", "flush"):
                nv.add_uint64(f"stat_{key}", sec.stat[key])
                nv.add_uint64(f"stat_{key}_error", sec.stat_err[key])
            nv.add_uint64("stat_activemap_update", 0)
            nv.add_uint64("localcnt", local.md.localcnt)
            nv.add_uint64("remotecnt", local.md.remotecnt)
            nv.add_int16("error", 0)
            return nv

        parent.serve_ctrl(status, lambda exc: stop.set())
        serve = loop.create_task(sec.serve())
        stopper = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({serve, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            serve.cancel()
            log.info("Termination signal received, exiting.")
            inc.abort()
            out.abort()
            return int(ExitCode.OK)
        stopper.cancel()
        end = serve.result()
        log.warning("%s", end)
        inc.abort()
        out.abort()
        await parent.send_event(Event.DISCONNECT)
        return int(end.exit_code)
    finally:
        try:
            await local.flush()
        except OSError:
            pass
        local.close()
