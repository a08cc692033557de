"""Peak memory with many connections open at once: N CONNECT tunnels (each carrying one
intercepted request) and N keep-alive connections of the explicit proxy (one request
each), all held open together through one dumpproxy; prints its RSS and peak RSS.

    python3 bench/scale_rss.py            # N = 1000
    python3 bench/scale_rss.py -n 2000

Loopback only: the origin and the clients are asyncio in this process. Needs a
descriptor limit of about 4 N + 1,000 (the proxy raises its own soft limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

from soak import proc_status  # bench/, beside this script

BODY = b"scale ok\n"


async def origin_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
            asyncio.CancelledError):  # the client left, or this script ends
        pass
    finally:
        writer.close()


async def read_head_and_body(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return head.split(b" ", 2)[1]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="tunnels, and keep-alive connections")
    ap.add_argument("--dumpproxy", default=f"{sys.executable} -m dumpproxy",
                    help="the command that starts dumpproxy")
    args = ap.parse_args()
    n = args.n
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(origin_conn, "127.0.0.1", 0, backlog=4096)
    origin = server.sockets[0].getsockname()[1]
    work = tempfile.mkdtemp(prefix="scale-rss-")
    events = os.path.join(work, "events.jsonl")
    proc = subprocess.Popen(
        [*args.dumpproxy.split(), "--listen-host", "127.0.0.1", "--listen-port", "0",
         "--ca-dir", os.path.join(work, "ca"), "-o", events],
        stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "dumpproxy: listening on http://127.0.0.1:PORT"
    port = int(line.rsplit(":", 1)[1])
    base = proc_status(proc.pid, ("VmRSS",))["VmRSS"]
    target = f"127.0.0.1:{origin}"
    opened = 0
    all_open = asyncio.Event()

    async def client(tunnel: bool) -> bool:
        nonlocal opened
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if tunnel:
                writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"GET /t HTTP/1.1\r\nHost: %s\r\n\r\n" % target.encode())
            else:
                writer.write(f"GET http://{target}/k HTTP/1.1\r\nHost: {target}\r\n\r\n"
                             .encode())
            ok = await read_head_and_body(reader) == b"200"
            opened += 1
            if opened == 2 * n:
                all_open.set()
            await all_open.wait()
            await asyncio.sleep(1.0)  # held open while memory is read
            return ok
        finally:
            writer.close()

    started = time.monotonic()
    tasks = [asyncio.ensure_future(client(i % 2 == 0)) for i in range(2 * n)]
    await asyncio.wait_for(all_open.wait(), 120)
    rss = proc_status(proc.pid, ("VmRSS",))["VmRSS"]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    peak = proc_status(proc.pid, ("VmHWM",))["VmHWM"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    server.close()
    ok = sum(1 for r in results if r is True)
    print(f"{n} tunnels + {n} keep-alive connections open at once "
          f"({time.monotonic() - started:.1f} s, {ok} of {2 * n} answered 200)")
    print(f"dumpproxy RSS: {base / 1024:.1f} MB at start, {rss / 1024:.1f} MB with all open, "
          f"peak {peak / 1024:.1f} MB")
    return 0 if ok == 2 * n else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
