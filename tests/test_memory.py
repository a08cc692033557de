"""Memory stays flat under long-lived load (issue 26): one HTTP/2 connection carrying
100,000 streams, 100,000 HTTP/1 keep-alive exchanges and 20,000 new connections, each
through a real dumpproxy to nginx (tests/realorigins.py), loopback only. nginx keeps its
default of 1,000 requests per connection, so the long-lived client connections also see
their upstream connection replaced a hundred times (HTTP/2: after its GOAWAY).

What is measured is the proxy process's anonymous resident memory (RssAnon in
/proc/PID/status: its heap, without the shared libraries' pages that come and go), once
after a warm-up and again every quarter of the load, with the load's connections still
open. Counts decide when to measure, never time: the proxy has written the `response` of
every exchange so far (or the `client_disconnect` of every connection), so a slow machine
measures the same thing as a fast one.

The proxy's events are counted by kind as they come (keeping 300,000 of them whole would
fill the test's own memory); anything but the per-exchange and per-connection events is
kept, and no `error` may appear.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import ROOT, DumpProxy, TestPKI, open_tunnel, read_response
from examples import example, shell_commands
from realorigins import Nginx

GROWTH_LIMIT_KB = 2 * 1024  # what the load may add after the warm-up
COUNTED = {"request", "response", "client_connect", "client_disconnect", "server_connect",
           "server_disconnect", "tls", "decision"}
PATH = "/small"  # nginx answers "hello\n"
BODY = b"hello\n"


def rss_anon_kb(pid: int) -> int:
    """The process's anonymous resident memory, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


class CountingProxy(DumpProxy):
    """dumpproxy whose per-exchange and per-connection events are only counted."""

    def __init__(self, home: Path):
        self.counts: Counter[str] = Counter()
        # -k: the tunnels name nginx by its address, which its certificate does not hold;
        # verifying is not what these tests measure
        super().__init__(["-p", "0", "-q", "-k"], home)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            start = raw.find(b'"event":"') + 9
            kind = raw[start:raw.find(b'"', start)].decode()
            with self._cond:
                self.counts[kind] += 1
                if kind not in COUNTED:
                    self.lines.append(raw.decode())
                    self.events.append(json.loads(raw))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_count(self, kind: str, n: int, timeout: float = 60) -> None:
        """Until the proxy has written n events of this kind."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.counts[kind] < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{self.counts[kind]} {kind} events of {n}: {self.counts}"
                self._cond.wait(min(left, 0.1))

    def rss(self, n: int, kind: str = "response") -> int:
        """RssAnon in KiB, once the proxy has written n events of this kind (`response`:
        that many exchanges are over; `client_disconnect`: that many connections)."""
        self.wait_count(kind, n)
        return rss_anon_kb(self.proc.pid)

    def check_record(self, exchanges: int) -> None:
        assert not self.of("error"), self.of("error")[:5]
        assert self.counts["request"] == self.counts["response"] == exchanges, self.counts


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, pki: TestPKI) -> Iterator[Nginx]:
    n = Nginx(tmp_path_factory.mktemp("nginx"), pki)
    yield n
    n.close()


@pytest.fixture
def proxy(home: Path) -> Iterator[CountingProxy]:
    p = CountingProxy(home)
    yield p
    p.stop()


def assert_flat(proxy: CountingProxy, phase: Callable[[int], object], what: str,
                warmup: int, load: int, kind: str = "response") -> None:
    """phase(n) runs n more units of the load; RssAnon after the warm-up, then after each
    quarter of the load, may grow by less than GROWTH_LIMIT_KB."""
    phase(warmup)
    points = [(0, proxy.rss(warmup, kind))]
    step = load // 4
    for done in range(step, load + 1, step):
        phase(step)
        points.append((done, proxy.rss(warmup + done, kind)))
    base = points[0][1]
    report = (f"{what}: RssAnon {base:,} KB after a warm-up of {warmup:,}; then "
              + ", ".join(f"{n:,}: {kb - base:+,} KB" for n, kb in points[1:]))
    print("\n" + report)
    assert points[-1][1] - base < GROWTH_LIMIT_KB, report


# --- HTTP/2: one connection, many streams ------------------------------------------------


class H2Client:
    """An HTTP/2 client through a CONNECT tunnel (intercepted), keeping `window` streams
    open at a time on its one connection."""

    def __init__(self, proxy_port: int, target: str, window: int = 100):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the proxy's CA is not what this test is about
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(open_tunnel(proxy_port, target), server_hostname="app.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        # The proxy's headers are not on trial here: without h2's checks the client takes
        # half the time.
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.request = [(b":method", b"GET"), (b":scheme", b"https"),
                        (b":authority", b"app.test"), (b":path", PATH.encode())]
        self.window = window
        self.outcomes: Counter[str] = Counter()

    def streams(self, n: int) -> None:
        """n streams, each a GET whose response must be 200 with nginx's body."""
        conn, sock = self.conn, self.sock
        left, open_ = n, {}
        while left or open_:
            while left and len(open_) < self.window:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, self.request, end_stream=True)
                open_[sid] = [b"", b""]
                left -= 1
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for ev in conn.receive_data(data):
                t = type(ev)
                if t is h2.events.ResponseReceived:
                    open_[ev.stream_id][0] = dict(ev.headers)[b":status"]
                elif t is h2.events.DataReceived:
                    open_[ev.stream_id][1] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif t is h2.events.StreamEnded:
                    status, body = open_.pop(ev.stream_id)
                    self.outcomes["ok" if (status, body) == (b"200", BODY)
                                  else f"{status!r} {body[:40]!r}"] += 1
                elif t is h2.events.StreamReset:
                    open_.pop(ev.stream_id)
                    self.outcomes[f"reset {ev.error_code!s}"] += 1
                elif t is h2.events.ConnectionTerminated:
                    raise AssertionError(f"GOAWAY from the proxy: {ev}")
        sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self.conn.close_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.sock.close()


@pytest.mark.timeout(600)
def test_one_h2_connection_100k_streams_memory_flat(proxy: CountingProxy, nginx: Nginx) -> None:
    warmup, load = 10_000, 100_000
    client = H2Client(proxy.port, nginx.address)
    assert_flat(proxy, client.streams, "HTTP/2, one connection, streams", warmup, load)
    client.close()
    assert client.outcomes == {"ok": warmup + load}, client.outcomes
    proxy.check_record(warmup + load)


# --- HTTP/1: keep-alive exchanges, new connections ----------------------------------------


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class H1Connection:
    """One HTTP/1.1 keep-alive connection through the proxy: plain HTTP in absolute form,
    or HTTPS through an intercepted CONNECT tunnel."""

    def __init__(self, nginx: Nginx, tls: bool):
        self.nginx = nginx
        self.tls = tls
        port = nginx.port if tls else nginx.http_port
        target = "/small" if tls else f"http://127.0.0.1:{port}{PATH}"
        self.request = (f"GET {target} HTTP/1.1\r\nHost: app.test:{port}\r\n\r\n").encode()

    async def open(self, proxy_port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        if self.tls:
            target = f"127.0.0.1:{self.nginx.port}"
            self.writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            status, _ = await read_response(self.reader)
            assert status == 200, status
            await self.writer.start_tls(_client_tls(), server_hostname="app.test")

    async def exchanges(self, n: int, outcomes: Counter[str]) -> None:
        for _ in range(n):
            self.writer.write(self.request)
            status, body = await read_response(self.reader)
            outcomes["ok" if (status, body) == (200, BODY) else f"{status} {body[:40]!r}"] += 1

    def close(self) -> None:
        self.writer.close()


async def _open_all(conns: list[H1Connection], proxy_port: int) -> None:
    await asyncio.gather(*(c.open(proxy_port) for c in conns))


async def _keep_alive(conns: list[H1Connection], n: int, outcomes: Counter[str]) -> None:
    """n exchanges, spread over the connections."""
    share, extra = divmod(n, len(conns))
    await asyncio.gather(*(c.exchanges(share + (i < extra), outcomes)
                           for i, c in enumerate(conns)))


@pytest.mark.timeout(600)
def test_100k_http1_keep_alive_exchanges_memory_flat(proxy: CountingProxy,
                                                      nginx: Nginx) -> None:
    """Four plain connections (the explicit proxy) and four intercepted HTTPS ones."""
    warmup, load = 10_000, 100_000
    outcomes: Counter[str] = Counter()
    conns = [H1Connection(nginx, tls=i % 2 == 1) for i in range(8)]
    with asyncio.Runner() as run:  # one loop for every phase: the connections stay open
        run.run(_open_all(conns, proxy.port))
        assert_flat(proxy, lambda n: run.run(_keep_alive(conns, n, outcomes)),
                    "HTTP/1 keep-alive, exchanges", warmup, load)
        for c in conns:
            c.close()
    assert outcomes == {"ok": warmup + load}, outcomes
    proxy.check_record(warmup + load)


async def _new_connections(nginx: Nginx, proxy_port: int, n: int, outcomes: Counter[str],
                           concurrency: int = 8) -> None:
    """n connections, each an intercepted HTTPS tunnel carrying one exchange."""
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            conn = H1Connection(nginx, tls=True)
            await conn.open(proxy_port)
            await conn.exchanges(1, outcomes)
            conn.close()
            await conn.writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@pytest.mark.timeout(600)
def test_20k_new_connections_memory_flat(proxy: CountingProxy, nginx: Nginx) -> None:
    """One HTTPS connection per exchange: CONNECT, both TLS handshakes, one GET."""
    warmup, load = 1_000, 20_000
    outcomes: Counter[str] = Counter()
    with asyncio.Runner() as run:
        assert_flat(proxy, lambda n: run.run(_new_connections(nginx, proxy.port, n, outcomes)),
                    "new HTTPS connections", warmup, load, kind="client_disconnect")
    assert outcomes == {"ok": warmup + load}, outcomes
    proxy.check_record(warmup + load)
    assert proxy.counts["client_connect"] == warmup + load, proxy.counts


# --- the soak script (bench/soak.py), briefly -------------------------------------------------


@pytest.mark.timeout(180)
def test_example_soak(tmp_path: Path) -> None:
    """The README's soak command, for 6 s instead of an hour: every workload is served
    through its own proxy with nothing lost, and the report says so (the figures
    themselves are the soak's business, not a test's)."""
    [command] = shell_commands(example("soak").text)
    args = shlex.split(command)
    assert args[:2] == ["python3", "bench/soak.py"], args
    samples = tmp_path / "samples.jsonl"
    r = subprocess.run([sys.executable, *args[1:], "--minutes", "0.1", "--warmup", "2",
                        "--interval", "1", "--out", str(samples)], cwd=ROOT,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {m[0]: m for m in re.findall(
        r"^(\w+) +([\d,]+) +([\d,]+) +(\d+) .* (\d+) +\d+ +(\d+)$", r.stdout, re.M)}
    assert set(rows) == {"newconn", "h1", "https", "h2x4", "h2x1"}, r.stdout
    for name, exchanges, conns, errors, fds, after in rows.values():
        n, c = int(exchanges.replace(",", "")), int(conns.replace(",", ""))
        assert n > 0, (name, r.stdout)
        # one connection per exchange, exactly one, or kept alive: Go's client (hey) dials
        # spares while a request waits and closes those its idle pool cannot hold, more
        # of them on a loaded machine (19 for 1,800 exchanges seen in CI), so keep-alive
        # is "many exchanges per connection", not a fixed count
        assert {"newconn": c >= n, "h2x1": c == 1}.get(name, 0 < c <= n / 20), \
            (name, r.stdout)
        assert (errors, after) == ("0", fds), (name, r.stdout)  # descriptors back
    assert r.stdout.count("problems: none") == 5, r.stdout
    assert len(re.findall(r"^\w+: exit 0, requests ([\d,]+), responses \1, errors 0$",
                          r.stdout, re.M)) == 5, r.stdout
    kept = [json.loads(line) for line in samples.read_text().splitlines()]
    assert {s["proxy"] for s in kept} == set(rows)
    assert all(s["VmRSS"] > 0 for s in kept)


# --- the scale memory script (bench/scale_rss.py), briefly -----------------------------------


@pytest.mark.timeout(120)
def test_example_scale_rss() -> None:
    """The README's many-connections memory command, with 100 of each instead of 1,000:
    every client is answered while all are open, and the report gives the proxy's RSS
    (the figures are the script's business, not a test's)."""
    [command] = shell_commands(example("scale-rss").text)
    args = shlex.split(command)
    assert args[:2] == ["python3", "bench/scale_rss.py"], args
    r = subprocess.run([sys.executable, *args[1:], "-n", "100"], cwd=ROOT,
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100 tunnels + 100 keep-alive connections open at once" in r.stdout, r.stdout
    assert "200 of 200 answered 200" in r.stdout, r.stdout
    start, open_, peak = map(float, re.search(
        r"RSS: ([\d.]+) MB at start, ([\d.]+) MB with all open, peak ([\d.]+) MB",
        r.stdout).groups())
    assert 0 < start <= open_ <= peak, r.stdout
