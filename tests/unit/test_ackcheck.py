"""tests.helpers.ackcheck: the checker on synthetic data, the client against the real NBDServer."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhast.frontend.nbd.backend import FileBackend
from pyhast.frontend.nbd.server import NBDServer
from tests.helpers.ackcheck import (
    CORRUPT,
    ZERO,
    BlockState,
    Journal,
    NBDClient,
    NBDDisconnected,
    NBDError,
    Workload,
    check,
    decode_block,
    make_block,
    parse_uri,
    read_image,
)

pytestmark = pytest.mark.timeout(120)

BS = 4096
SIZE = 4 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# blocks and the checker on synthetic data


def test_block_round_trip_and_damage() -> None:
    b = make_block(7, 3, 2, BS)
    assert len(b) == BS and decode_block(b, 7, 3) == 2
    assert decode_block(bytes(BS), 7, 3) == ZERO
    assert decode_block(b, 8, 3) == CORRUPT  # another run
    assert decode_block(b, 7, 4) == CORRUPT  # another block
    torn = make_block(7, 3, 2, BS)[:2048] + make_block(7, 3, 3, BS)[2048:]
    assert decode_block(torn, 7, 3) == CORRUPT
    flipped = bytearray(b)
    flipped[100] ^= 1
    assert decode_block(flipped, 7, 3) == CORRUPT
    with pytest.raises(ValueError):
        make_block(1, 1, 1, 16)


def journal_of(states: dict[int, BlockState], nblocks: int = 8) -> Journal:
    j = Journal(run=42, bs=BS, base=BS, nblocks=nblocks)
    j.blocks = states
    j.ended_at = 100.0
    return j


def image_of(j: Journal, content: dict[int, int | bytes], total: int | None = None) -> bytearray:
    img = bytearray(total or (j.base + j.nblocks * j.bs))
    for i, v in content.items():
        off = j.offset(i)
        img[off : off + j.bs] = make_block(j.run, i, v, j.bs) if isinstance(v, int) else v
    return img


def test_check_classifies_every_block() -> None:
    j = journal_of(
        {
            0: BlockState(acks=[(1, 90.0), (2, 91.0)], issued=2),  # ok
            1: BlockState(acks=[(1, 90.0)], unresolved={2}, issued=2),  # newer unacked
            2: BlockState(acks=[(1, 90.0)], unresolved={2}, issued=2),  # acked one, holds it
            3: BlockState(acks=[(1, 90.0), (2, 99.5)], issued=2),  # lost: holds v1
            4: BlockState(acks=[(1, 98.0)], issued=1),  # lost: zeros
            5: BlockState(unresolved={1}, issued=1),  # never acked, never landed: ok
            6: BlockState(acks=[(1, 90.0)], issued=1),  # holds v5: impossible -> corrupt
            # 7: never touched, holds zeros: ok
        }
    )
    img = image_of(j, {0: 2, 1: 2, 2: 1, 3: 1, 6: 5})
    rep = check(j, img)
    assert rep.acked_writes == 8 and rep.acked_blocks == 6
    assert rep.ok == 5 and rep.newer_unacked == 1 and rep.zero == 2
    assert [f.block for f in rep.lost] == [3, 4]
    assert rep.lost_acks == 2
    assert [f.block for f in rep.corrupt] == [6]
    assert rep.lost[0].age == pytest.approx(0.5) and rep.lost[1].age == pytest.approx(2.0)
    assert rep.window_needed == pytest.approx(2.0)
    assert not rep.clean
    assert "2 acknowledged writes lost in 2 blocks, 1 corrupt" in rep.summary()
    assert "block 3 (offset 16384) holds 1, latest acked v2" in rep.details()


def test_window_tolerates_recent_losses_only() -> None:
    j = journal_of(
        {
            0: BlockState(acks=[(1, 90.0), (2, 99.9)], issued=2),
            1: BlockState(acks=[(1, 97.0)], issued=1),
        }
    )
    img = image_of(j, {0: 1})
    rep = check(j, img, window=1.0)
    assert [f.block for f in rep.in_window] == [0] and rep.lost_acks_in_window == 1
    assert [f.block for f in rep.lost] == [1]
    rep = check(j, img, window=5.0, reference=101.0)
    assert not rep.lost and rep.lost_acks_in_window == 2 and rep.clean
    assert rep.window_needed == pytest.approx(4.0)


def test_torn_and_outside_bytes() -> None:
    j = journal_of({0: BlockState(acks=[(1, 1.0)], unresolved={2}, issued=2)}, nblocks=2)
    torn = make_block(j.run, 0, 1, BS)[:512] + make_block(j.run, 0, 2, BS)[512:]
    img = image_of(j, {0: torn}, total=j.base + 3 * BS)
    img[0] = 1  # before the area
    img[-1] = 1  # after it
    rep = check(j, img, outside_zero=True)
    assert [f.block for f in rep.corrupt] == [0]
    assert rep.outside_nonzero == 2
    with pytest.raises(ValueError):
        check(j, img[: j.base + BS])  # too short


def test_torn_unacked_only_when_allowed_and_only_after_an_unacknowledged_write() -> None:
    j = journal_of(
        {
            0: BlockState(acks=[(1, 1.0)], unresolved={2}, issued=2),  # v2 failed
            1: BlockState(acks=[(1, 1.0), (2, 2.0)], issued=2),  # v2 acknowledged
        },
        nblocks=2,
    )
    torn = {
        i: make_block(j.run, i, 1, BS)[:2048] + make_block(j.run, i, 2, BS)[2048:] for i in (0, 1)
    }
    img = image_of(j, torn)
    strict = check(j, img)
    assert [f.block for f in strict.corrupt] == [0, 1] and not strict.torn_unacked
    lenient = check(j, img, allow_torn_unacked=True)
    assert [f.block for f in lenient.torn_unacked] == [0]
    assert [f.block for f in lenient.corrupt] == [1]  # torn after an ack: always corrupt
    assert "torn by a write that was never acknowledged" in lenient.summary()


def test_journal_json_round_trip() -> None:
    j = journal_of({3: BlockState(acks=[(1, 5.0)], unresolved={2}, issued=2)})
    j.issued, j.acked, j.failed, j.errors = 2, 1, 1, {errno.EIO: 1}
    again = Journal.from_json(json.loads(json.dumps(j.to_json())))
    assert again == j


def test_parse_uri() -> None:
    assert parse_uri("nbd+unix:///r0?socket=/run/x/r0.nbd") == ("r0", "/run/x/r0.nbd")
    assert parse_uri("nbd://127.0.0.1:10809/exp") == ("exp", ("127.0.0.1", 10809))
    assert parse_uri("/tmp/sock") == ("", "/tmp/sock")
    with pytest.raises(ValueError):
        parse_uri("http://x/")


# --------------------------------------------------------------------------
# the client and the workload against the real NBDServer over a FileBackend


class ServerThread:
    """An NBDServer over a FileBackend, on its own loop in a thread."""

    def __init__(self, path: Path, sock: Path) -> None:
        self.path = path
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.server: NBDServer | None = None
        self.backend: FileBackend | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.backend = FileBackend(self.path)
            self.server = NBDServer({"disk": self.backend}, unix_path=self.sock)
            await self.server.start()

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    @property
    def uri(self) -> str:
        assert self.server is not None
        return self.server.uri("disk")

    def close(self) -> None:
        if not self.thread.is_alive():
            return

        async def stop() -> None:
            assert self.server is not None and self.backend is not None
            await self.server.close()
            self.backend.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    srv = ServerThread(path, tmp_path / "nbd.sock")
    yield srv
    srv.close()


def test_client_io_many_in_flight(served: ServerThread) -> None:
    async def main() -> None:
        c = await NBDClient.connect(served.uri)
        assert c.size == SIZE and c.can_flush and c.block_size is not None
        blocks = [bytes([i % 251 + 1]) * BS for i in range(256)]
        writes = [c.write(i * BS, b) for i, b in enumerate(blocks)]
        await asyncio.gather(*writes)
        await c.flush()
        reads = await asyncio.gather(*(c.read(i * BS, BS) for i in range(256)))
        assert reads == blocks
        with pytest.raises(NBDError) as exc:
            await c.read(SIZE - 512, 1024)  # past the end
        assert exc.value.errno in (errno.EINVAL, errno.ENOSPC)
        await c.write(0, b"z" * 512, fua=True)
        assert await c.read(0, 512) == b"z" * 512
        await c.close()

    asyncio.run(main())
    with served.path.open("rb") as f:
        assert os.pread(f.fileno(), 512, BS) == bytes([2]) * 512


def test_workload_and_check_clean(served: ServerThread) -> None:
    async def main() -> tuple[Journal, bytes]:
        c = await NBDClient.connect(served.uri)
        wl = Workload(c, nblocks=256, bs=BS, base=BS, depth=16, flush_interval=0.05, seed=1)
        j = await wl.run(max_writes=3000)
        image = await read_image(c)
        await c.close()
        return j, image

    j, image = asyncio.run(main())
    assert j.issued == j.acked == 3000 and j.failed == 0 and j.unresolved == 0
    assert j.end == "stopped" and j.flushes_ok >= 1
    rep = check(j, image, outside_zero=True)
    assert rep.clean, rep.details()
    assert rep.acked_writes == 3000 and rep.ok == 256
    # Roll one block back to an older version behind the server's back: a loss.
    victim = max(j.blocks, key=lambda i: j.blocks[i].acked)
    old = j.blocks[victim].acks[0][0]
    assert old < j.blocks[victim].acked
    with served.path.open("r+b") as rw:
        os.pwrite(rw.fileno(), make_block(j.run, victim, old, BS), j.offset(victim))
    image = served.path.read_bytes()
    rep = check(j, image)
    assert [f.block for f in rep.lost] == [victim]
    assert rep.lost_acks == j.blocks[victim].acked - old


def test_workload_survives_a_vanishing_server(served: ServerThread) -> None:
    async def main() -> Journal:
        c = await NBDClient.connect(served.uri)
        wl = Workload(c, nblocks=512, bs=BS, depth=32, flush_interval=0.02)
        task = asyncio.create_task(wl.run(duration=30))
        while wl.journal.acked < 500:
            await asyncio.sleep(0.01)
        c.writer.transport.abort()  # the server "dies" from the client's view
        j = await asyncio.wait_for(task, 10)
        with pytest.raises(NBDDisconnected):
            await c.read(0, BS)
        return j

    j = asyncio.run(main())
    assert j.end == "connection lost"
    assert j.acked >= 500 and j.acked + j.unresolved == j.issued
    with served.path.open("rb") as f:
        image = f.read()
    rep = check(j, image)
    assert rep.clean, rep.details()


def test_cli_write_then_check(served: ServerThread, tmp_path: Path) -> None:
    journal = tmp_path / "j.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    argv = [sys.executable, "-m", "tests.helpers.ackcheck"]
    start = time.monotonic()
    w = subprocess.run(
        [*argv, "write", served.uri, "--journal", str(journal), "--blocks", "128",
         "--max-writes", "500", "--depth", "8"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert w.returncode == 0, w.stderr
    assert "500 writes issued, 500 acknowledged" in w.stdout
    c = subprocess.run(
        [*argv, "check", served.uri, "--journal", str(journal)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert c.returncode == 0, c.stdout + c.stderr
    assert "500 acknowledged writes" in c.stdout and "0 acknowledged writes lost" in c.stdout
    assert time.monotonic() - start < 60
