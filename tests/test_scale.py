"""1,000 concurrent CONNECT tunnels and 1,000 concurrent keep-alive connections through one
dumpproxy, started with a soft descriptor limit of 1,024 and with a high one (SPEC §7: no
client is left without an answer; descriptors come back). Loopback only: the clients and
the origin are asyncio in the test process.

At the soft limit of 1,024 the proxy needs about 2,000 descriptors for either load, so it
must raise its soft limit to the hard one at start; should descriptors still run out, a
client gets an HTTP error status (503) with an `error` event, never an empty reply.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections import Counter
from contextlib import contextmanager

import pytest
from conftest import DumpProxy, read_response

N = 1000  # concurrent clients per load
PHASE = 20.0  # seconds a load may take, all clients together (a hang fails, never waits)
SETTLE = 15.0  # seconds for the proxy's descriptors to come back
BODY = b"scale ok\n"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def _soft_nofile(soft: int):
    """Our soft descriptor limit set to `soft` while a child is started (it inherits it)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture(scope="module")
def hard_limit():
    """The test process itself holds ~2,000 sockets per load: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * N + 1000:
        pytest.skip(f"hard descriptor limit {hard} is too low for {N} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- an asyncio origin and clients ----------------------------------------------------------


async def _origin_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: each request head (no bodies sent here) gets a small 200."""
    try:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):  # the client left; the test ends
        pass
    finally:
        writer.close()


class Load:
    """N clients through the proxy: each one's outcome, all held open together."""

    def __init__(self, proxy_port: int, origin_port: int):
        self.proxy_port = proxy_port
        self.origin_port = origin_port
        self.outcomes: list[str] = []
        self.all_open = asyncio.Event()
        self._open = 0

    def _opened(self, counted: list[bool]) -> None:
        """One client is open (or has failed): when all are, they go on together."""
        counted.append(True)
        self._open += 1
        if self._open == N:
            self.all_open.set()

    async def tunnel(self, counted: list[bool]) -> str:
        """CONNECT, then a request through the tunnel (intercepted plain HTTP)."""
        target = f"127.0.0.1:{self.origin_port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        try:
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            status, _ = await read_response(reader)
            if status != 200:
                return f"CONNECT {status}"
            writer.write(b"GET /t HTTP/1.1\r\nHost: %s\r\n\r\n" % target.encode())
            status, body = await read_response(reader)
            if status != 200 or body != BODY:
                return f"in tunnel {status}"
            self._opened(counted)
            await self.all_open.wait()  # every tunnel open at once
            return "200"
        finally:
            writer.close()

    async def keep_alive(self, counted: list[bool]) -> str:
        """Two requests on one keep-alive connection, the second once all are open."""
        url = f"http://127.0.0.1:{self.origin_port}/k"
        request = f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{self.origin_port}\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        try:
            for first in (True, False):
                writer.write(request)
                status, body = await read_response(reader)
                if status != 200 or body != BODY:
                    return f"{'first' if first else 'second'} {status}"
                if first:
                    self._opened(counted)
                    await self.all_open.wait()
            return "200"
        finally:
            writer.close()

    async def run(self, kind: str) -> Counter:
        async def one() -> str:
            counted: list[bool] = []
            try:
                return await (self.tunnel(counted) if kind == "tunnel"
                              else self.keep_alive(counted))
            except OSError as e:
                return f"connect failed ({e.strerror or e})"
            finally:
                if not counted:
                    self._opened(counted)  # a failed client: the others need not wait for it

        tasks = [asyncio.ensure_future(one()) for _ in range(N)]
        done, pending = await asyncio.wait(tasks, timeout=PHASE)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        outcomes = Counter(t.result() for t in done if not t.cancelled())
        outcomes["no answer or close (hang)"] += len(pending)
        return +outcomes


async def _load(proxy_port: int, kind: str) -> Counter:
    server = await asyncio.start_server(_origin_conn, "127.0.0.1", 0, backlog=4096)
    origin_port = server.sockets[0].getsockname()[1]
    try:
        return await Load(proxy_port, origin_port).run(kind)
    finally:
        server.close()
        await server.wait_closed()


def _normal_request(proxy: DumpProxy) -> bytes:
    async def go() -> bytes:
        server = await asyncio.start_server(_origin_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"GET http://127.0.0.1:{port}/n HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, body = await asyncio.wait_for(read_response(reader), 10)
            writer.close()
            assert status == 200, status
            return body
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


LOW = "soft-1024"
HIGH = "high"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("limit", [
    LOW,
    HIGH,
])
def test_1000_tunnels_and_1000_keep_alive_connections(tmp_path, hard_limit, limit) -> None:
    soft = 1024 if limit == LOW else hard_limit
    home = tmp_path / "home"
    home.mkdir()
    with _soft_nofile(soft):
        proxy = DumpProxy(["-p", "0", "-q"], home)
    try:
        pid = proxy.proc.pid
        assert _normal_request(proxy) == BODY  # warm-up
        before = _fds(pid)
        refused = 0
        for kind in ("tunnel", "keep-alive"):
            outcomes = asyncio.run(_load(proxy.port, kind))
            bad = {k: v for k, v in outcomes.items() if k != "200"}
            if limit == HIGH:
                assert not bad, f"{kind}: {dict(outcomes)}"
            # At the low limit a 503 (descriptors ran out) is an answer too; nothing else is.
            for k, v in bad.items():
                assert k.endswith(" 503"), f"{kind}: {v} clients: {k} ({dict(outcomes)})"
                refused += v
        if refused:  # each 503 with its error event
            proxy.wait_for(lambda e: e["event"] == "error", count=refused)
        # the proxy recovers: it serves, and gives every descriptor back
        assert _normal_request(proxy) == BODY
        deadline = time.monotonic() + SETTLE
        while _fds(pid) > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _fds(pid) <= before, f"{_fds(pid)} descriptors open, {before} before the load"
        assert not proxy.of("error", stage="internal")
    finally:
        proxy.stop()
    assert proxy.events[-1]["event"] == "shutdown"
    assert b"Traceback" not in proxy.stderr, proxy.stderr.decode(errors="replace")[-2000:]

