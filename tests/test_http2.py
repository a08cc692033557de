"""HTTP/2 through dumpproxy: real clients (curl, httpx, a raw h2 client), real h2 origins
(hypercorn running tests/h2origin.py), loopback only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import hyperframe.frame
import pytest
from conftest import curl, free_port, rss_kb, stop_process

TESTS = Path(__file__).resolve().parent
MB = 1024 * 1024


# --- origins: hypercorn serving h2origin:app ----------------------------------------------


class Hypercorn:
    """hypercorn with h2origin:app: TLS (h2 + http/1.1 via ALPN) or plaintext (h2c too)."""

    def __init__(self, cert: Path | None = None, key: Path | None = None,
                 *extra: str):
        self.port = free_port()
        self.scheme = "https" if cert else "http"
        cmd = [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{self.port}"]
        if cert:
            cmd += ["--certfile", str(cert), "--keyfile", str(key)]
        cmd += [*extra, "h2origin:app"]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("hypercorn exited: " + self.proc.stderr.read().decode())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise AssertionError("hypercorn did not start listening") from None
                time.sleep(0.05)

    def url(self, path: str = "/small", host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def h2_origin(pki) -> Iterator[Hypercorn]:
    """HTTPS origin that negotiates h2 (hypercorn offers h2 and http/1.1)."""
    cert, key = pki.leaf(["localhost", "127.0.0.1"])
    o = Hypercorn(cert, key)
    yield o
    o.close()


@pytest.fixture(scope="module")
def h2c_origin() -> Iterator[Hypercorn]:
    """Plaintext origin that also speaks h2c with prior knowledge. It closes idle
    connections after 1 s, so that tunnels end (and are reported) quickly."""
    o = Hypercorn(None, None, "--keep-alive", "1")
    yield o
    o.close()


def start_proxy(dumpproxy, pki, *args: str):
    p = dumpproxy("--upstream-ca", str(pki.ca_path), *args)
    p.ca = p.of("listening")[0]["ca_cert"]
    return p


def client_ssl(proxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=proxy.ca)


# --- a raw HTTP/2 client through a CONNECT tunnel ---------------------------------------------


class RawH2:
    """h2 over TLS over a CONNECT tunnel through dumpproxy, driven by hand."""

    def __init__(self, proxy, host: str, port: int, auto_ack: bool = True,
                 timeout: float = 10, tls: bool = True):
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, f"proxy closed during CONNECT: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        self.scheme = b"https" if tls else b"http"
        self.sock = raw
        if tls:
            ctx = client_ssl(proxy)
            ctx.set_alpn_protocols(["h2"])
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
            assert self.sock.selected_alpn_protocol() == "h2"
        self.authority = f"{host}:{port}".encode()
        self.auto_ack = auto_ack
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, dict] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.eof = False

    def start(self) -> RawH2:
        self.h2.initiate_connection()
        self.flush()
        return self

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", body: bytes = b"",
                headers: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        hs = [(b":method", method.encode()), (b":scheme", self.scheme),
              (b":authority", self.authority), (b":path", path.encode()),
              (b"user-agent", b"raw-h2-test"), *(headers or [])]
        self.h2.send_headers(sid, hs, end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)
        self.streams[sid] = {"status": None, "headers": [], "data": 0, "body": bytearray(),
                             "trailers": None, "ended": False, "reset": None}
        self.flush()
        return sid

    def pump(self, timeout: float = 10, quiet: bool = False) -> None:
        """Read once and process what arrived (quiet: nothing within timeout is fine)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            if quiet:
                return
            raise
        if not data:
            self.eof = True
            return
        for ev in self.h2.receive_data(data):
            st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                st["headers"] = list(ev.headers)
                st["status"] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                if st is not None:
                    st["data"] += len(ev.data)
                    if len(st["body"]) < 65536:
                        st["body"] += ev.data[:65536]
                if self.auto_ack and ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and st is not None:
                st["trailers"] = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                st["ended"] = True
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                st["reset"] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = ev
        self.flush()

    def wait(self, pred, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting on the h2 connection"
            assert not self.eof, "connection closed"
            self.pump(left)

    def get(self, path: str, **kw) -> dict:
        sid = self.request(path, **kw)
        self.wait(lambda: self.streams[sid]["ended"] or self.streams[sid]["reset"] is not None)
        return self.streams[sid]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def frame_types(data: bytes) -> list[str]:
    """Names of the HTTP/2 frames in a byte string (as far as it holds whole frames)."""
    out = []
    while len(data) >= 9:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
        out.append(type(frame).__name__)
        data = data[9 + length:]
    return out


# --- tests ----------------------------------------------------------------------------------


def test_curl_http2_end_to_end(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, "-w", "\n%{http_version}",
             h2_origin.url("/small"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n\n2", r.stdout
    resp = proxy.wait_for(lambda e: e["event"] == "response")
    tls = {e["side"]: e for e in proxy.of("tls")}
    assert tls["client"]["alpn"] == "h2" and tls["server"]["alpn"] == "h2", tls
    assert tls["client"]["sni"] == "localhost"
    [req] = proxy.of("request")
    assert req["http_version"] == "HTTP/2.0"
    assert (req["method"], req["scheme"], req["host"], req["port"], req["path"]) == (
        "GET", "https", "localhost", h2_origin.port, "/small")
    assert req["url"] == h2_origin.url("/small")
    assert req["headers"]["user-agent"].startswith("curl/")
    assert not [k for k in req["headers"] if k.startswith(":")], req["headers"]
    assert resp["flow"] == req["flow"] and resp["conn"] == req["conn"]
    assert resp["http_version"] == "HTTP/2.0" and resp["method"] == "GET"
    assert (resp["status"], resp["reason"]) == (200, "OK")
    assert resp["headers"]["server"] == "hypercorn-h2"
    assert not [k for k in resp["headers"] if k.startswith(":")], resp["headers"]
    assert (resp["request_bytes"], resp["response_bytes"]) == (0, 6)
    assert not proxy.of("error")


def test_request_headers_reach_origin_and_events(dumpproxy, pki, h2_origin) -> None:
    """Regular headers reach the origin unchanged; events show them (redacted), the path
    with its query."""
    proxy = start_proxy(dumpproxy, pki)
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, "-H", "X-Test: one",
             "-H", "Authorization: Bearer secret", h2_origin.url("/echo?q=1"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["http_version"] == "2" and info["path"] == "/echo" and info["query"] == "q=1"
    got = dict(info["headers"])
    assert got["x-test"] == "one" and got["authorization"] == "Bearer secret"
    resp = proxy.wait_for(lambda e: e["event"] == "response")
    [req] = proxy.of("request")
    assert req["path"] == "/echo?q=1" and resp["status"] == 200
    assert req["headers"]["x-test"] == "one"
    assert req["headers"]["authorization"] == "Bearer <redacted>"


def test_httpx_50_parallel_streams_on_one_connection(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(http2=True, proxy=proxy.url, verify=client_ssl(proxy),
                                     trust_env=False, timeout=30) as client:
            # httpx opens one tunnel per request while no h2 connection is up yet, so one
            # request first; then 50 at once, multiplexed on that connection.
            assert (await client.get(h2_origin.url("/small"))).http_version == "HTTP/2"
            return await asyncio.gather(*[
                client.get(h2_origin.url(f"/echo?i={i}")) for i in range(50)])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert [r.json()["query"] for r in responses] == [f"i={i}" for i in range(50)]
    proxy.wait_for(lambda e: e["event"] == "response", count=51)
    time.sleep(0.2)  # nothing more should come
    reqs = [e for e in proxy.of("request") if e["path"].startswith("/echo?i=")]
    resps = [e for e in proxy.of("response") if "/echo?i=" in e["url"]]
    assert len(proxy.of("request")) == 51 and len(proxy.of("response")) == 51
    assert len(reqs) == 50 and len(resps) == 50
    assert sorted(e["path"] for e in reqs) == sorted(f"/echo?i={i}" for i in range(50))
    assert sorted(e["flow"] for e in reqs) == sorted(e["flow"] for e in resps)
    assert len({e["flow"] for e in reqs}) == 50
    by_flow = {e["flow"]: e for e in reqs}
    for resp in resps:
        assert by_flow[resp["flow"]]["url"] == resp["url"]
        assert resp["http_version"] == "HTTP/2.0" and resp["status"] == 200
        assert resp["response_bytes"] > 0
    assert len(proxy.of("client_connect")) == 1
    assert len({e["conn"] for e in reqs + resps}) == 1
    assert len(proxy.of("tls", side="server")) == 1
    assert not proxy.of("error")


def test_post_bodies_arrive_intact(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    sizes = [0, 1, 100_000, 5 * MB]
    with httpx.Client(http2=True, proxy=proxy.url, verify=client_ssl(proxy), trust_env=False,
                      timeout=30) as client:
        for size in sizes:
            body = os.urandom(size)
            r = client.post(h2_origin.url("/echo"), content=body)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            info = r.json()
            assert info["method"] == "POST"
            assert info["body_len"] == size
            assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    proxy.wait_for(lambda e: e["event"] == "response", count=len(sizes))
    resps = proxy.of("response")
    assert [e["request_bytes"] for e in resps] == sizes
    assert {e["method"] for e in resps} == {"POST"}
    assert not proxy.of("error")


def test_200mb_download_memory_stays_flat(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    size = 200 * MB
    got = 0
    with httpx.Client(http2=True, proxy=proxy.url, verify=client_ssl(proxy), trust_env=False,
                      timeout=30) as client:
        with client.stream("GET", h2_origin.url(f"/bytes/{size}")) as r:
            assert r.http_version == "HTTP/2"
            for chunk in r.iter_raw():
                got += len(chunk)
    assert got == size
    resp = proxy.wait_for(lambda e: e["event"] == "response")
    assert resp["response_bytes"] == size and resp["status"] == 200
    peak = rss_kb(proxy.proc.pid)
    assert peak < 100 * 1024, f"dumpproxy peak RSS {peak} KiB"
    assert not proxy.of("error")


def test_slow_reader_keeps_proxy_memory_bounded(dumpproxy, pki, h2_origin) -> None:
    """The origin could send 200 MB at once; the client reads slowly. Flow control must
    make the proxy stop reading from the origin instead of buffering."""
    proxy = start_proxy(dumpproxy, pki)
    c = RawH2(proxy, "localhost", h2_origin.port, auto_ack=False).start()
    try:
        sid = c.request(f"/bytes/{200 * MB}")
        st = c.streams[sid]
        acked = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:  # read ~1.6 MB/s: 16 KiB every 10 ms
            c.pump(0.01, quiet=True)
            if st["data"] > acked:
                n = min(st["data"] - acked, 16384)
                c.h2.acknowledge_received_data(n, sid)
                acked += n
                c.flush()
            time.sleep(0.01)
        assert 0 < st["data"] < 20 * MB, st["data"]
        peak = rss_kb(proxy.proc.pid)
        assert peak < 100 * 1024, f"dumpproxy peak RSS {peak} KiB"
        # the proxy keeps serving this connection meanwhile
        c.auto_ack = True
        if st["data"] > acked:
            c.h2.acknowledge_received_data(st["data"] - acked, sid)
        assert c.get("/small")["status"] == 200
    finally:
        c.close()
    assert proxy.proc.poll() is None


def test_200mb_upload_memory_stays_flat(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    size = 200 * MB
    block = b"u" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    with httpx.Client(http2=True, proxy=proxy.url, verify=client_ssl(proxy), trust_env=False,
                      timeout=60) as client:
        r = client.post(h2_origin.url("/echo"), content=body())
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert r.json()["body_len"] == size
    resp = proxy.wait_for(lambda e: e["event"] == "response")
    assert resp["request_bytes"] == size
    peak = rss_kb(proxy.proc.pid)
    assert peak < 100 * 1024, f"dumpproxy peak RSS {peak} KiB"


def test_client_reset_stream_leaves_connection_usable(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    c = RawH2(proxy, "localhost", h2_origin.port).start()
    try:
        sid = c.request(f"/bytes/{100 * MB}")
        c.wait(lambda: c.streams[sid]["data"] >= 256 * 1024)
        c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        # a client's cancel is orderly: the exchange is cut by the client, no error
        cut = proxy.wait_for(lambda e: e["event"] == "response")
        [req] = proxy.of("request")
        assert (cut["flow"], cut["status"], cut["aborted"]) == (req["flow"], 200, "client")
        assert 256 * 1024 <= cut["response_bytes"] < 100 * MB
        # the same connection serves other streams
        for _ in range(3):
            st = c.get("/small")
            assert st["status"] == 200 and bytes(st["body"]) == b"hello\n"
        assert not c.eof and c.terminated is None
    finally:
        c.close()
    proxy.wait_for(lambda e: e["event"] == "response", count=4)
    assert len([e for e in proxy.of("response") if e["flow"] == req["flow"]]) == 1
    assert not proxy.of("error")
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, h2_origin.url("/small"))
    assert r.returncode == 0 and r.stdout == b"hello\n"


GARBAGE = {
    # text: its first bytes read as a frame header announcing a 7 MB frame
    "text": b"this is not an HTTP/2 frame at all\r\n" * 20,
    # a well-formed header, a broken frame: WINDOW_UPDATE of the connection by 0
    "bad-frame": b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_after_preface_closes_that_connection_only(dumpproxy, pki, h2_origin,
                                                           garbage) -> None:
    proxy = start_proxy(dumpproxy, pki)
    other = RawH2(proxy, "localhost", h2_origin.port).start()  # a bystander connection
    assert other.get("/small")["status"] == 200
    c = RawH2(proxy, "localhost", h2_origin.port)
    received = b""
    try:
        empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        c.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + empty_settings + garbage)
        c.sock.settimeout(10)
        while True:
            chunk = c.sock.recv(65536)  # GOAWAY, maybe settings, then EOF; never a hang
            if not chunk:
                break
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    finally:
        c.close()
    assert "GoAwayFrame" in frame_types(received), frame_types(received)
    err = proxy.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "http2" and "protocol error" in err["message"], err
    proxy.wait_for(lambda e: e["event"] == "client_disconnect" and e["conn"] == err["conn"])
    proxy.wait_for(lambda e: e["event"] == "server_disconnect" and e["conn"] == err["conn"])
    assert len(proxy.of("error")) == 1, [e["message"] for e in proxy.of("error")]
    try:  # the bystander keeps working
        for _ in range(2):
            assert bytes(other.get("/small")["body"]) == b"hello\n"
    finally:
        other.close()
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, "-w", "%{http_version}",
             h2_origin.url("/small"))
    assert r.returncode == 0 and r.stdout == b"hello\n2", (r.stdout, r.stderr)
    assert proxy.proc.poll() is None


def test_trailers_are_forwarded(dumpproxy, pki, h2_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    c = RawH2(proxy, "localhost", h2_origin.port).start()
    try:
        st = c.get("/trailers", headers=[(b"te", b"trailers")])
    finally:
        c.close()
    assert st["status"] == 200 and bytes(st["body"]) == b"one,two,three"
    assert st["trailers"] is not None and (b"x-checksum", b"abc") in st["trailers"]
    resp = proxy.wait_for(lambda e: e["event"] == "response")
    assert resp["response_bytes"] == 13 and resp["status"] == 200
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, "-H", "TE: trailers", "-v",
             h2_origin.url("/trailers"))
    assert r.returncode == 0 and r.stdout == b"one,two,three"
    assert b"x-checksum: abc" in r.stderr


def test_http11_origin_fallback(dumpproxy, pki, tls_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    url = tls_origin.url("/small", host="localhost")
    r = curl("--http2", "-x", proxy.url, "--cacert", proxy.ca, "-w", "%{http_version}", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n1.1"
    with httpx.Client(http2=True, proxy=proxy.url, verify=client_ssl(proxy), trust_env=False,
                      timeout=30) as client:
        rs = [client.get(url), client.post(tls_origin.url("/echo", host="localhost"),
                                           content=b"x" * 100_000)]
    assert [x.status_code for x in rs] == [200, 200]
    assert {x.http_version for x in rs} == {"HTTP/1.1"}
    assert rs[1].json()["body_len"] == 100_000
    proxy.wait_for(lambda e: e["event"] == "response", count=3)
    # the origin does no ALPN; the clients offered h2 and get http/1.1
    assert [e["alpn"] for e in proxy.of("tls", side="client")] == ["http/1.1"] * 2
    assert [e["alpn"] for e in proxy.of("tls", side="server")] == [None] * 2
    assert {e["http_version"] for e in proxy.of("request")} == {"HTTP/1.1"}
    assert [e["request_bytes"] for e in proxy.of("response")] == [0, 0, 100_000]
    assert not proxy.of("error")


def test_h2c_prior_knowledge_inside_connect_tunnel(dumpproxy, pki, h2c_origin) -> None:
    proxy = start_proxy(dumpproxy, pki)
    url = h2c_origin.url("/small", host="127.0.0.1")
    r = curl("--http2-prior-knowledge", "-p", "-x", proxy.url, "-w", "%{http_version}", url,
             timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n2"
    d = proxy.wait_for(lambda e: e["event"] == "decision")
    assert d["address"] == f"127.0.0.1:{h2c_origin.port}"
    proxy.wait_for(lambda e: e["event"] == "server_disconnect")
    sd = proxy.of("server_disconnect")[0]
    assert sd["bytes_sent"] > 24 and sd["bytes_received"] > 6
    # curl often ends an h2c connection with a TCP reset (unread frames in its buffer), which
    # a passthrough tunnel reports faithfully; nothing else may go wrong
    assert not [e for e in proxy.of("error")
                if e["stage"] != "relay" or "reset" not in e["message"]], proxy.of("error")
    # several streams at once over one tunnel (raw h2c client; curl 7.88 fails a second
    # request on a reused h2c connection even without a proxy)
    c = RawH2(proxy, "127.0.0.1", h2c_origin.port, tls=False).start()
    try:
        sids = [c.request(p) for p in ("/small", "/bytes/300000", "/echo?x=1")]
        c.wait(lambda: all(c.streams[s]["ended"] for s in sids))
        small, big, echo = (c.streams[s] for s in sids)
        assert bytes(small["body"]) == b"hello\n" and big["data"] == 300000
        assert json.loads(bytes(echo["body"]))["query"] == "x=1"
    finally:
        c.close()
    proxy.wait_for(lambda e: e["event"] == "server_disconnect", count=2)
    assert not [e for e in proxy.of("error") if e["stage"] != "relay"], proxy.of("error")
    for e in proxy.of("request"):  # passed through today; if ever intercepted, as HTTP/2
        assert e["http_version"] == "HTTP/2.0"
