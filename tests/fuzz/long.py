"""The long fuzz target (issue 5, item 5): at least 10^6 inputs through every decoder.

::

    python -m tests.fuzz.long --inputs 1000000 [--engine auto|atheris|random]
        [--seed S] [--out fuzz-long.json] [--crashes DIR] [--time-limit SECONDS]

Targets (one input goes to one target, in turn):

==================  ===========================================================
``nv``              ``NV.decode`` (strict and with duplicates); what decodes
                    must re-encode to the same list
``frame_pipeline``  ``FrameDecoder`` fed whole and in chunks (same frames, same
                    end), every frame through ``pipeline_recv``
``handshake``       nv, then the replication handshake parsers and the decision
                    table (:func:`tests.fuzz.test_protocol_fuzz.all_handshake_parsers`)
``requests``        nv, then ``parse_request`` (three geometries) and ``parse_reply``
``control``         nv, then ``ControlRequest.from_nv``, hastd's replies and the
                    parent <-> worker messages
``nbd_handshake``   the NBD server handshake, fed whole and byte-wise chunks
``nbd_requests``    the NBD request decoder, then ``validate_request``
``config``          ``parse_config`` of the bytes as UTF-8 (errors replaced)
==================  ===========================================================

The invariant: a target returns or raises the project's own error
(:class:`~pyhast.errors.ProtocolError` / :class:`~pyhast.errors.ConfigError`),
nothing else, and no input takes longer than :data:`HANG_LIMIT` seconds.

Engines: ``atheris`` (coverage-guided libFuzzer, when ``import atheris``
works; the first byte of an input picks the target, the seed corpus is
written to a temporary directory) or ``random`` (a seeded
``random.Random``: 8% random bytes, the rest valid seeds with one to six
mutations: bit flips, interesting bytes and integers, insertions, deletions,
duplications, splices, truncation).  ``auto`` takes atheris if it imports.

An unexpected exception or a hang is recorded (target, exception, the
input's hex, the last traceback lines), the input saved under ``--crashes``,
and the run goes on.  The results file has the counts: inputs, per target
inputs / accepted / refused with the project's error, failures; it is
rewritten every 10,000 inputs and at the end.  Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import hashlib
import importlib
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

#: Seconds one input may take.
HANG_LIMIT = 10.0
#: Inputs between two rewrites of the results file.
WRITE_EVERY = 10_000
#: Distinct failures kept (then only counted).
MAX_FAILURES = 50
MAX_LEN = 4096


class Hang(Exception):
    """An input ran past HANG_LIMIT."""


@dataclass
class Target:
    name: str
    run: Callable[[bytes], bool]  # True: accepted, False: refused with the project's error
    seeds: list[bytes]
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    failures: int = 0


@dataclass
class Stats:
    engine: str
    seed: int
    goal: int
    out: Path
    crashes: Path
    targets: list[Target]
    started: float = field(default_factory=time.monotonic)
    stamp: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    inputs: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    failure_keys: set[str] = field(default_factory=set)
    slowest: float = 0.0

    def record_failure(self, target: Target, data: bytes, exc: BaseException) -> None:
        target.failures += 1
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        key = f"{target.name}:{type(exc).__name__}:{where}"
        if key in self.failure_keys or len(self.failures) >= MAX_FAILURES:
            return
        self.failure_keys.add(key)
        digest = hashlib.sha1(data).hexdigest()[:16]
        self.crashes.mkdir(parents=True, exist_ok=True)
        path = self.crashes / f"{target.name}-{digest}.bin"
        path.write_bytes(data)
        self.failures.append(
            {
                "target": target.name,
                "exception": f"{type(exc).__name__}: {exc}"[:500],
                "where": where,
                "input_hex": data[:512].hex(),
                "input_file": str(path),
                "traceback": "".join(traceback.format_exception(exc))[-2000:],
            }
        )
        print(f"FAILURE in {target.name}: {type(exc).__name__}: {exc} ({path})", flush=True)

    def document(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {
            "command": " ".join(["python -m tests.fuzz.long", *sys.argv[1:]]),
            "engine": self.engine,
            "seed": self.seed,
            "started_at": self.stamp,
            "inputs_requested": self.goal,
            "inputs": self.inputs,
            "duration_s": round(elapsed, 1),
            "inputs_per_s": round(self.inputs / elapsed) if elapsed else 0,
            "slowest_input_s": round(self.slowest, 3),
            "failures": sum(t.failures for t in self.targets),
            "by_target": {
                t.name: {
                    "inputs": t.inputs,
                    "accepted": t.accepted,
                    "refused": t.refused,
                    "failures": t.failures,
                }
                for t in self.targets
            },
            "failure_details": self.failures,
        }

    def write(self) -> dict[str, Any]:
        doc = self.document()
        self.out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc

    def one(self, target: Target, data: bytes) -> None:
        target.inputs += 1
        self.inputs += 1
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, HANG_LIMIT)
        try:
            if target.run(data):
                target.accepted += 1
            else:
                target.refused += 1
        except Exception as exc:
            self.record_failure(target, data, exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.slowest = max(self.slowest, time.monotonic() - start)
        if self.inputs % WRITE_EVERY == 0:
            self.write()


def _alarm(signo: int, frame: FrameType | None) -> None:
    raise Hang(f"an input took more than {HANG_LIMIT} s")


# --------------------------------------------------------------------------
# Targets (imported lazily, so that atheris can instrument pyhast)


def load_targets() -> list[Target]:
    import struct

    from pyhast.config import parse_config
    from pyhast.defaults import MAXPHYS
    from pyhast.enums import Checksum, Compression, HioCmd
    from pyhast.errors import ConfigError, NVError, ProtocolError
    from pyhast.frontend.nbd import protocol as nbdp
    from pyhast.node import NodeIdentity
    from pyhast.wire.frame import NEED_DATA, Frame, FrameDecoder, encode_frame
    from pyhast.wire.nv import NV
    from pyhast.wire.pipeline import pipeline_recv, pipeline_send
    from tests.fuzz import test_protocol_fuzz as proto
    from tests.unit.test_config import EXAMPLE_IPV6, EXAMPLE_LAN, EXAMPLE_MINIMAL

    # -- nv ------------------------------------------------------------------
    def nv_target(data: bytes) -> bool:
        ok = False
        for dup in (False, True):
            try:
                nv = NV.decode(data, allow_duplicates=dup)
            except NVError:
                continue
            ok = True
            again = NV.decode(nv.encode(), allow_duplicates=dup)
            assert again == nv, "nv did not survive re-encoding"
        return ok

    # -- frames and the pipeline ------------------------------------------------
    def frames(chunks: Iterator[bytes]) -> tuple[list[tuple[int, bytes, bytes | None]], str]:
        dec = FrameDecoder(max_nv_size=64 * 1024, max_payload=MAXPHYS + 64)
        out: list[tuple[int, bytes, bytes | None]] = []
        try:
            for chunk in chunks:
                dec.feed(chunk)
                for _ in range(len(chunk) + 1):
                    item = dec.next_frame()
                    if item is NEED_DATA:
                        break
                    assert isinstance(item, Frame)
                    payload = None if item.payload is None else bytes(item.payload)
                    out.append((item.version, item.nv.encode(), payload))
                else:
                    raise AssertionError("the frame decoder made frames out of nothing")
        except ProtocolError as exc:
            return out, type(exc).__name__
        return out, "need-data"

    def frame_target(data: bytes) -> bool:
        whole = frames(iter([data]))
        step = 1 + data[0] % 7 if data else 1
        chunked = frames(data[i : i + step] for i in range(0, len(data), step))
        assert whole == chunked, "whole and chunked decoding differ"
        for _, nvbytes, payload in whole[0]:
            with contextlib.suppress(ProtocolError):
                pipeline_recv(NV.decode(nvbytes), payload or b"", max_size=MAXPHYS)
        return bool(whole[0])

    # -- messages above the nv ---------------------------------------------------
    def nv_then(check: Callable[[Any], None]) -> Callable[[bytes], bool]:
        def target(data: bytes) -> bool:
            try:
                nv = NV.decode(data)
            except NVError:
                return False
            check(nv)
            return True

        return target

    # -- NBD ---------------------------------------------------------------------
    exports = {
        "disk": nbdp.ExportInfo("disk", 1 << 30, can_multi_conn=True, description="d"),
        "ro": nbdp.ExportInfo("ro", 4096, read_only=True, block_size=(512, 4096, 1 << 20)),
    }

    def handshake(chunks: list[bytes]) -> list[object]:
        hs = nbdp.ServerHandshake(exports, "disk")
        hs.data_to_send()
        events: list[object] = []
        try:
            for chunk in chunks:
                hs.receive_data(chunk)
                for _ in range(len(chunk) + 1):
                    event = hs.next_event()
                    hs.data_to_send()
                    if event is nbdp.NEED_DATA:
                        break
                    if isinstance(event, nbdp.HandshakeComplete | nbdp.HandshakeAborted):
                        events.append(type(event).__name__)
                        return events
                    events.append(event)
                else:
                    raise AssertionError("the handshake made events out of nothing")
        except ProtocolError:
            events.append("ProtocolError")
        return events

    def nbd_handshake_target(data: bytes) -> bool:
        whole = handshake([data])
        step = 1 + data[-1] % 5 if data else 1
        chunked = handshake([data[i : i + step] for i in range(0, len(data), step)])
        assert whole == chunked, "whole and chunked handshakes differ"
        return "ProtocolError" not in whole

    def nbd_requests_target(data: bytes) -> bool:
        dec = nbdp.RequestDecoder()
        try:
            dec.feed(data)
            reqs = dec.read_requests()
        except ProtocolError:
            return False
        for r in reqs:
            for export in exports.values():
                assert isinstance(nbdp.validate_request(r, export), int)
        return True

    # -- config ------------------------------------------------------------------
    identities = [NodeIdentity("nodea"), NodeIdentity("nodeb.example.com"), NodeIdentity("x")]

    def config_target(data: bytes) -> bool:
        text = data.decode("utf-8", "replace")
        who = identities[len(data) % len(identities)]
        try:
            parse_config(text, "fuzz.conf", who)
        except ConfigError as exc:
            assert len(str(exc).splitlines()) == 1, "a multi-line ConfigError"
            return False
        return True

    # -- seeds ---------------------------------------------------------------------
    nv_seeds = list(proto.VALID)
    frame_seeds = [b"".join(encode_frame(NV.decode(v))) for v in proto.VALID[:6]]
    for comp in (Compression.NONE, Compression.HOLE, Compression.LZF):
        for csum in (Checksum.NONE, Checksum.CRC32, Checksum.SHA256):
            for payload in (bytes(4096), b"abc" * 1000, bytes(range(256)) * 4):
                nv = NV()
                nv.add_uint8("cmd", int(HioCmd.WRITE))
                nv.add_uint64("seq", 1)
                body = pipeline_send(nv, payload, comp, csum)
                frame_seeds.append(b"".join(encode_frame(nv, body, version=2)))
    opt = struct.Struct(">QII")
    iho = nbdp.IHAVEOPT
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3)
    nbd_hs_seeds = [
        struct.pack(">I", 3) + opt.pack(iho, 7, len(go)) + go,
        struct.pack(">I", 1) + opt.pack(iho, 3, 0) + opt.pack(iho, 1, 2) + b"ro",
        struct.pack(">I", 3) + opt.pack(iho, 6, 6) + struct.pack(">I", 2) + b"ro"
        + opt.pack(iho, 2, 0),
    ]  # fmt: skip
    nbd_req_seeds = [
        nbdp.encode_requests(
            [
                nbdp.Request(1, 0, 7, 4096, 512, bytes(512)),
                nbdp.Request(0, 0, 8, 0, 4096),
                nbdp.Request(3, 0, 9, 0, 0),
                nbdp.Request(4, 1, 10, 0, 1 << 20),
                nbdp.Request(2, 0, 11, 0, 0),
            ]
        ),
        nbdp.encode_requests([nbdp.Request(6, 2, 1, 512, 4096)]),
    ]
    config_seeds = [t.encode() for t in (EXAMPLE_MINIMAL, EXAMPLE_LAN, EXAMPLE_IPV6)]

    return [
        Target("nv", nv_target, nv_seeds),
        Target("frame_pipeline", frame_target, frame_seeds),
        Target("handshake", nv_then(proto.all_handshake_parsers), nv_seeds),
        Target("requests", nv_then(proto.all_request_parsers), nv_seeds),
        Target("control", nv_then(proto.all_control_parsers), nv_seeds),
        Target("nbd_handshake", nbd_handshake_target, nbd_hs_seeds),
        Target("nbd_requests", nbd_requests_target, nbd_req_seeds),
        Target("config", config_target, config_seeds),
    ]


# --------------------------------------------------------------------------
# The random engine

_INTERESTING_BYTES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x11, 0x20, 0x0A, 0x7B, 0x7D)
_INTERESTING_INTS = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                     0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 1 << 20, (1 << 20) + 1)  # fmt: skip


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(9)
        n = len(buf)
        i = rng.randrange(n) if n else 0
        if op == 0 and n:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[i] = rng.choice(_INTERESTING_BYTES)
        elif op == 2 and n >= 4:
            size = rng.choice((1, 2, 4, 8))
            i = rng.randrange(max(1, n - size + 1))
            value = rng.choice(_INTERESTING_INTS) % (1 << (8 * size))
            order = rng.choice(("little", "big"))
            buf[i : i + size] = value.to_bytes(size, order)  # type: ignore[arg-type]
        elif op == 3:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and n:
            del buf[i : i + rng.randint(1, 16)]
        elif op == 5 and n:
            j = rng.randint(i, min(n, i + 64))
            buf[j:j] = buf[i:j]
        elif op == 6:
            other = rng.choice(seeds)
            a = rng.randrange(len(other) + 1)
            buf[i:i] = other[a : a + rng.randint(1, 64)]
        elif op == 7 and n:
            del buf[i:]
        elif n:
            j = rng.randrange(n)
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf[:MAX_LEN])


def run_random(stats: Stats, time_limit: float | None) -> None:
    rng = random.Random(stats.seed)
    targets = stats.targets
    deadline = None if time_limit is None else time.monotonic() + time_limit
    for i in range(stats.goal):
        target = targets[i % len(targets)]
        if rng.random() < 0.08:
            data = rng.randbytes(rng.randint(0, 512))
        else:
            data = mutate(rng, rng.choice(target.seeds), target.seeds)
        stats.one(target, data)
        if deadline is not None and i % 1000 == 0 and time.monotonic() > deadline:
            print(f"time limit reached after {stats.inputs} inputs", flush=True)
            return


# --------------------------------------------------------------------------
# The atheris engine


def run_atheris(stats: Stats, atheris: Any, time_limit: float | None) -> None:
    targets = stats.targets
    corpus = Path(tempfile.mkdtemp(prefix="pyhast-fuzz-corpus-"))
    for i, target in enumerate(targets):
        for j, seed in enumerate(target.seeds):
            (corpus / f"{target.name}-{j}").write_bytes(bytes([i]) + seed)

    def test_one_input(data: bytes) -> None:
        if not data or stats.inputs >= stats.goal:
            return
        stats.one(targets[data[0] % len(targets)], data[1:])
        if stats.inputs == stats.goal:
            report(stats)

    argv = [
        sys.argv[0],
        # a little more than the goal: libFuzzer's count includes its own
        # probes (the empty input); the goal itself is counted above
        f"-runs={stats.goal + 1000}",
        f"-max_len={MAX_LEN}",
        f"-seed={stats.seed or 1}",
        "-timeout=30",
        "-print_final_stats=1",
        str(corpus),
    ]
    if time_limit is not None:
        argv.insert(2, f"-max_total_time={int(time_limit)}")
    atexit.register(lambda: stats.inputs < stats.goal and report(stats))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()  # libFuzzer exits the process when done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.fuzz.long",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("fuzz-long.json"))
    p.add_argument("--crashes", type=Path, default=Path(tempfile.gettempdir()) / "pyhast-fuzz")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    engine, atheris = args.engine, None
    if engine in ("auto", "atheris"):
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            if engine == "atheris":
                print("atheris does not import", file=sys.stderr)
                return 2
            engine = "random"
        else:
            engine = "atheris"
    if atheris is not None:
        with atheris.instrument_imports(include=["pyhast"]):
            targets = load_targets()
    else:
        targets = load_targets()
    stats = Stats(engine, seed, args.inputs, args.out, args.crashes, targets)
    signal.signal(signal.SIGALRM, _alarm)
    print(
        f"fuzzing {len(targets)} targets with {engine}, {args.inputs} inputs, seed {seed}",
        flush=True,
    )
    if atheris is not None:
        run_atheris(stats, atheris, args.time_limit)  # does not return
    run_random(stats, args.time_limit)
    return report(stats)


def report(stats: Stats) -> int:
    doc = stats.write()
    print(
        f"{doc['inputs']} inputs in {doc['duration_s']} s ({doc['inputs_per_s']}/s), "
        f"{doc['failures']} failures; "
        + ", ".join(f"{k} {v['inputs']}" for k, v in doc["by_target"].items())
        + f"; results in {stats.out}",
        flush=True,
    )
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
