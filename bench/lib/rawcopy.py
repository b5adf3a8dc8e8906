"""The resync baseline: the same bytes file -> TCP loopback -> file, in plain Python.

Run as a script (standard library only), one process per side, each pinned
like the hastd it stands for::

    rawcopy.py recv --ip 127.0.0.2 --out DST --size N     (prints "PORT <n>")
    rawcopy.py send --ip 127.0.0.2 --port P --src SRC --size N --source-ip 127.0.0.1

The sender reads 1 MiB chunks (MAXPHYS, the resync's chunk size) with
``readinto`` and ``sendall``s them; the receiver fills a 1 MiB buffer with
``recv_into`` and ``pwrite``s it, then acknowledges with one byte once the
last byte is written.  The sender times connect -> acknowledgement and
prints ``{"bytes": N, "seconds": S}``.  Only 127.0.0.0/8 is accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

CHUNK = 1024 * 1024
TIMEOUT = 300.0


def _loopback(ip: str) -> str:
    if not ip.startswith("127."):
        raise SystemExit(f"rawcopy: {ip} is not a loopback address")
    return ip


def recv(ip: str, out: str, size: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((_loopback(ip), 0))
        srv.listen(1)
        srv.settimeout(TIMEOUT)
        print(f"PORT {srv.getsockname()[1]}", flush=True)
        conn, _ = srv.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(out, os.O_WRONLY)
    t0 = time.monotonic()
    done = 0
    try:
        with conn:
            conn.settimeout(TIMEOUT)
            while done < size:
                want = min(CHUNK, size - done)
                got = 0
                while got < want:
                    n = conn.recv_into(view[got:want])
                    if n == 0:
                        raise SystemExit(f"rawcopy: sender closed at {done + got} bytes")
                    got += n
                os.pwrite(fd, view[:want], done)
                done += want
            conn.sendall(b"k")
    finally:
        os.close(fd)
    print(json.dumps({"bytes": done, "seconds": time.monotonic() - t0}), flush=True)
    return 0


def send(ip: str, port: int, src: str, size: int, source_ip: str) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f:
        t0 = time.monotonic()
        with socket.create_connection(
            (_loopback(ip), port), timeout=TIMEOUT, source_address=(_loopback(source_ip), 0)
        ) as conn:
            done = 0
            while done < size:
                want = min(CHUNK, size - done)
                n = f.readinto(view[:want])
                if not n:
                    raise SystemExit(f"rawcopy: {src} ends at {done} bytes")
                conn.sendall(view[:n])
                done += n
            if conn.recv(1) != b"k":
                raise SystemExit("rawcopy: no acknowledgement from the receiver")
        seconds = time.monotonic() - t0
    print(json.dumps({"bytes": done, "seconds": seconds}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rawcopy")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--ip", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--size", type=int, required=True)
    s = sub.add_parser("send")
    s.add_argument("--ip", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--src", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--source-ip", default="127.0.0.1")
    args = p.parse_args(argv)
    if args.cmd == "recv":
        return recv(args.ip, args.out, args.size)
    return send(args.ip, args.port, args.src, args.size, args.source_ip)


if __name__ == "__main__":
    sys.exit(main())
