"""HTTP/1 through the explicit proxy: events field by field, keep-alive, bodies, framing,
hop-by-hop headers, upgrades, redaction, upstream and client failures, memory, signals,
and the output side (pipes, files, text format, latency, back-pressure).

Real processes and sockets on loopback only: `python -m dumpproxy`, curl, raw sockets
where the wire matters, the threaded origin of conftest.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    DumpProxy,
    Origin,
    close_listener,
    curl,
    free_port,
    parse_events,
    rss_kb,
    run_cli,
)

import dumpproxy as package

COMMON = ["ts", "event", "conn", "client"]
KEYS = {
    "client_connect": COMMON,
    "server_connect": [*COMMON, "server", "address", "ip", "connect_ms"],
    "decision": [*COMMON, "address", "action", "reason", "pattern", "source", "matched",
                 "candidates", "sni"],
    "request": [*COMMON, "flow", "method", "url", "scheme", "host", "port", "path",
                "http_version", "headers"],
    "response": [*COMMON, "flow", "method", "url", "http_version", "status", "reason",
                 "headers", "request_bytes", "response_bytes", "duration_ms", "server"],
    "server_disconnect": [*COMMON, "server", "address", "ip", "bytes_sent", "bytes_received",
                          "how"],
    "client_disconnect": [*COMMON, "duration_ms", "how"],
}
BIG = 200 * 1024 * 1024
RSS_LIMIT_KB = 100 * 1024


# --- helpers ----------------------------------------------------------------------------


class Response:
    def __init__(self, version: str, status: int, reason: str, headers: list[tuple[str, str]],
                 body: bytes, trailers: list[tuple[str, str]], raw_head: bytes):
        self.version = version
        self.status = status
        self.reason = reason
        self.header_list = headers
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body
        self.trailers = {k.lower(): v for k, v in trailers}
        self.raw_head = raw_head


class Raw:
    """A raw client socket to the proxy, with a minimal HTTP/1 response parser."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        line = self.f.readline(70000)
        if not line:
            raise EOFError("connection closed by the proxy")
        return line

    def response(self, method: str = "GET") -> Response:
        raw = self._line()
        while True:
            version, status, reason = raw.decode("latin-1").rstrip("\r\n").split(" ", 2)
            head = raw
            headers = self._headers()
            head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
            code = int(status)
            if code == 100:  # interim: the final response follows
                raw = self._line()
                continue
            break
        hmap = {k.lower(): v for k, v in headers}
        body, trailers = b"", []
        if method == "HEAD" or code in (101, 204, 304):
            pass
        elif hmap.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    trailers = self._headers()
                    break
                parts.append(self.f.read(size))
                assert self._line() == b"\r\n"
            body = b"".join(parts)
        elif "content-length" in hmap:
            n = int(hmap["content-length"])
            body = self.f.read(n)
            assert len(body) == n, "body cut short"
        else:
            body = self.f.read()
        return Response(version, code, reason, headers, body, trailers, head)

    def _headers(self) -> list[tuple[str, str]]:
        out = []
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return out
            k, _, v = line.decode("latin-1").partition(":")
            out.append((k.strip(), v.strip()))

    def read_exact(self, n: int) -> bytes:
        data = self.f.read(n)
        assert len(data) == n, f"wanted {n} bytes, got {len(data)}"
        return data

    def at_eof(self, timeout: float = 5) -> bool:
        """True when the proxy closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def get(url: str, version: str = "1.1", extra: str = "", method: str = "GET") -> bytes:
    host = url.split("/")[2]
    return (f"{method} {url} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n").encode()


def proxied(p: DumpProxy, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return curl("-x", p.url, *args, timeout=timeout)


def conn_events(p: DumpProxy, conn: int) -> list[dict]:
    with p._cond:
        return [e for e in p.events if e.get("conn") == conn]


def wait_lines(p: DumpProxy, pred, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with p._cond:
            hits = [line for line in p.lines if pred(line)]
        if hits:
            return hits
        time.sleep(0.02)
    raise AssertionError("line not seen; lines so far:\n" + "".join(p.lines[-30:]))


def proxy_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["DUMPPROXY_HOME"] = str(home)
    return env


class RawOrigin:
    """An origin that answers one connection with fixed bytes, then closes (FIN or RST)."""

    def __init__(self, payload: bytes, reset: bool):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.payload = payload
        self.reset = reset
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(self.payload)
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
            else:
                time.sleep(0.05)

    def close(self) -> None:
        close_listener(self.srv, self.thread)


@pytest.fixture
def raw_origin() -> Iterator:
    made: list[RawOrigin] = []

    def make(payload: bytes, reset: bool = False) -> RawOrigin:
        o = RawOrigin(payload, reset)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


# --- startup ----------------------------------------------------------------------------


def test_listening_is_the_first_line(dumpproxy, home):
    before = time.time()
    p = dumpproxy()
    first = json.loads(p.lines[0])
    assert list(first) == ["ts", "event", "address", "mode", "version", "pid", "ca_cert",
                           "schema"]
    assert first["event"] == "listening"
    assert isinstance(first["ts"], float) and before - 1 < first["ts"] < time.time() + 1
    assert re.fullmatch(r"127\.0\.0\.1:\d+", first["address"])
    assert p.port > 0
    with socket.create_connection(("127.0.0.1", p.port), timeout=5):
        pass
    assert first["mode"] == "regular"
    assert first["version"] == package.__version__
    assert first["pid"] == p.proc.pid
    assert first["schema"] == 1
    ca = Path(first["ca_cert"])
    assert ca.is_absolute() and ca.is_file() and ca.parent == home
    assert ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_version_and_help_exit_0(home):
    r = run_cli("--version", home=home)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"dumpproxy {re.escape(package.__version__)} \(HTTP/1 parser: "
                        r"(httptools [\d.]+ \(llhttp\)|h11 [\d.]+)\)",
                        r.stdout.decode().strip()), r.stdout
    r = run_cli("--help", home=home)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith("usage: dumpproxy")
    for opt in ("--listen-port", "--bodies", "--no-redact", "--format", "--max-body-bytes"):
        assert opt in out
    assert r.stderr == b""


# --- one exchange, field by field --------------------------------------------------------


def test_one_exchange_every_field(dumpproxy, origin):
    p = dumpproxy()
    t0 = time.time()
    r = proxied(p, "-H", "X-Test: one", "-w", "|%{local_port}", origin.url("/small"))
    assert r.returncode == 0, r.stderr
    body, _, local_port = r.stdout.decode().rpartition("|")
    assert body == "hello\n"
    done = p.wait_for(lambda e: e["event"] == "client_disconnect")
    t1 = time.time()
    # the upstream connection waits in the pool for another client; shutdown closes it
    assert not p.of("server_disconnect")
    assert p.stop() == 0
    conn = done["conn"]
    evs = conn_events(p, conn)
    kinds = [e["event"] for e in evs]
    assert kinds == ["client_connect", "server_connect", "decision", "request", "response",
                     "client_disconnect", "server_disconnect"]
    target = f"127.0.0.1:{origin.port}"
    client = f"127.0.0.1:{local_port}"
    last_ts = 0.0
    for e in evs:
        assert list(e) == KEYS[e["event"]], e
        assert isinstance(e["ts"], float) and t0 - 0.5 < e["ts"] < time.time()
        assert e["ts"] >= last_ts
        last_ts = e["ts"]
        assert type(e["conn"]) is int and e["conn"] == conn >= 1
        assert e["client"] == client
    cc, sc, dec, req, resp, cd, sd = evs

    assert sc["address"] == target and sc["ip"] == target
    assert type(sc["server"]) is int and sc["server"] == resp["server"] == sd["server"] == 1
    assert sd["how"] == "shutdown"
    assert isinstance(sc["connect_ms"], float) and 0 <= sc["connect_ms"] < 5000

    assert dec["address"] == target
    assert dec["action"] == "intercept" and dec["reason"] == "default"
    assert dec["pattern"] is None and dec["source"] is None and dec["matched"] is None
    assert target in dec["candidates"] and all(isinstance(c, str) for c in dec["candidates"])
    assert dec["sni"] is None

    assert type(req["flow"]) is int and req["flow"] >= 1
    assert req["method"] == "GET"
    assert req["url"] == f"http://{target}/small"
    assert req["scheme"] == "http" and req["host"] == "127.0.0.1"
    assert type(req["port"]) is int and req["port"] == origin.port
    assert req["path"] == "/small" and req["http_version"] == "HTTP/1.1"
    h = req["headers"]
    assert h["host"] == target and h["accept"] == "*/*" and h["x-test"] == "one"
    assert h["user-agent"].startswith("curl/")
    assert all(k == k.lower() and isinstance(v, str) for k, v in h.items())

    assert resp["flow"] == req["flow"] and resp["method"] == "GET"
    assert resp["url"] == req["url"] and resp["http_version"] == "HTTP/1.1"
    assert type(resp["status"]) is int and resp["status"] == 200 and resp["reason"] == "OK"
    rh = resp["headers"]
    assert rh["content-length"] == "6" and rh["content-type"] == "text/plain"
    assert rh["server"].startswith("origin/1")
    assert type(resp["request_bytes"]) is int and resp["request_bytes"] == 0
    assert type(resp["response_bytes"]) is int and resp["response_bytes"] == 6
    assert isinstance(resp["duration_ms"], float) and 0 <= resp["duration_ms"] < 5000

    # exact wire counts: what the origin received, what it sent
    seen = origin.requests[-1][2]
    sent = len("GET /small HTTP/1.1\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in seen.items()) + 2
    received = len("HTTP/1.1 200 OK\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in rh.items()) + 2 + 6
    assert sd["address"] == target and sd["ip"] == target
    assert type(sd["bytes_sent"]) is int and sd["bytes_sent"] == sent > 0
    assert type(sd["bytes_received"]) is int and sd["bytes_received"] == received > 0

    assert isinstance(cd["duration_ms"], float)
    assert resp["duration_ms"] <= cd["duration_ms"] < (t1 - t0) * 1000 + 500
    # origin got the request in origin form, with the client's headers
    assert origin.requests[-1][:2] == ("GET", "/small")
    assert seen["X-Test"] == "one" and seen["Host"] == target


def test_ipv6_origin(dumpproxy):
    o = Origin(host="::1")
    try:
        p = dumpproxy()
        r = proxied(p, f"http://[::1]:{o.port}/small")
        assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr
        target = f"[::1]:{o.port}"
        resp = p.wait_for(lambda e: e["event"] == "response")
        req = p.of("request")[0]
        assert req["url"] == resp["url"] == f"http://{target}/small"
        assert req["host"] == "::1" and req["port"] == o.port
        sc = p.of("server_connect")[0]
        assert sc["address"] == sc["ip"] == target
    finally:
        o.close()


# --- keep-alive ---------------------------------------------------------------------------


def test_keep_alive_both_sides(dumpproxy, origin):
    p = dumpproxy()
    r = proxied(p, origin.url("/small"), origin.url("/echo"), origin.url("/small"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"hello\n{") and r.stdout.endswith(b"}hello\n")
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    assert len(p.of("client_connect")) == 1
    assert len(p.of("server_connect")) == 1
    assert {e["server"] for e in p.of("response")} == {1}  # one upstream carried all three
    flows = [e["flow"] for e in p.of("response")]
    assert flows == [1, 2, 3]
    assert [e["flow"] for e in p.of("request")] == flows
    assert len(origin.requests) == 3


def test_two_origins_on_one_client_connection(dumpproxy, origin, origin2):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        for o, path in ((origin, "/small"), (origin2, "/echo"), (origin, "/small")):
            c.send(get(o.url(path)))
            resp = c.response()
            assert resp.status == 200
            if path == "/small":
                assert resp.body == b"hello\n"
            else:
                assert json.loads(resp.body)["path"] == "/echo"
    finally:
        c.close()
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    assert len(p.of("client_connect")) == 1
    addrs = sorted(e["address"] for e in p.of("server_connect"))
    assert addrs == sorted([f"127.0.0.1:{origin.port}", f"127.0.0.1:{origin2.port}"])
    assert [e["server"] for e in p.of("response")] == [1, 2, 1]
    assert [e["url"] for e in p.of("response")] == [
        origin.url("/small"), origin2.url("/echo"), origin.url("/small")]
    assert len(origin.requests) == 2 and len(origin2.requests) == 1


# --- framing ------------------------------------------------------------------------------


def test_http10_client(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(f"GET {origin.url('/small')} HTTP/1.0\r\n\r\n".encode())
        resp = c.response()
        assert resp.status == 200 and resp.body == b"hello\n"
        assert c.at_eof(), "an HTTP/1.0 exchange without keep-alive ends with a close"
    finally:
        c.close()
    resp_ev = p.wait_for(lambda e: e["event"] == "response")
    assert resp_ev["http_version"] == "HTTP/1.0"
    assert p.of("request")[0]["http_version"] == "HTTP/1.0"
    assert origin.requests[0][2]["Host"] == f"127.0.0.1:{origin.port}"


def test_http10_client_chunked_response_with_trailers(dumpproxy, origin):
    """An HTTP/1.0 client cannot get chunks or trailers: body ends with a clean close."""
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(f"GET {origin.url('/chunked')} HTTP/1.0\r\n\r\n".encode())
        resp = c.response()
        assert resp.status == 200
        assert "transfer-encoding" not in resp.headers
        assert resp.body == b"one,two,three"
    finally:
        c.close()
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["status"] == 200 and ev["response_bytes"] == 13
    assert not p.of("error")


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_upload_body_arrives_intact(dumpproxy, origin, tmp_path, framing):
    data = bytes(range(256)) * 1200 + b"end"
    f = tmp_path / "body"
    f.write_bytes(data)
    p = dumpproxy()
    extra = ["-H", "Transfer-Encoding: chunked"] if framing == "chunked" else []
    r = proxied(p, *extra, "-H", "Content-Type: application/octet-stream",
                "--data-binary", f"@{f}", origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["method"] == "POST"
    assert info["body_len"] == len(data)
    assert info["body"].encode("latin-1") == data
    seen = {k.lower(): v for k, v in info["headers"].items()}
    if framing == "chunked":
        assert seen["transfer-encoding"] == "chunked" and "content-length" not in seen
    else:
        assert seen["content-length"] == str(len(data)) and "transfer-encoding" not in seen
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["request_bytes"] == len(data)
    assert ev["response_bytes"] == len(r.stdout)


def test_chunked_response_with_trailers(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(origin.url("/chunked")))
        resp = c.response()
        assert resp.status == 200
        assert resp.headers["transfer-encoding"] == "chunked"
        assert resp.body == b"one,two,three"
        assert resp.trailers == {"x-checksum": "abc"}
        # the connection is still usable
        c.send(get(origin.url("/small")))
        assert c.response().body == b"hello\n"
    finally:
        c.close()
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["response_bytes"] == 13
    assert ev["headers"]["transfer-encoding"] == "chunked"
    assert len(p.of("server_connect")) == 1


def test_pipelined_requests(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(origin.url("/small")) + get(origin.url("/echo"), method="POST",
               extra="Content-Length: 3\r\n") + b"abc" + get(origin.url("/status/204")))
        assert c.response().body == b"hello\n"
        assert json.loads(c.response().body)["body"] == "abc"
        assert c.response().status == 204
    finally:
        c.close()
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    assert [e["status"] for e in p.of("response")] == [200, 200, 204]
    assert len(p.of("server_connect")) == 1


def test_close_delimited_upstream_response(dumpproxy, raw_origin, origin):
    """An HTTP/1.0-style response without length ends at EOF; the client still gets it
    whole, framed so that its own connection stays usable."""
    o = raw_origin(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 5000)
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(f"http://127.0.0.1:{o.port}/"))
        r = c.response()
        assert r.status == 200 and r.body == b"z" * 5000
        c.send(get(origin.url("/small")))
        assert c.response().body == b"hello\n"
    finally:
        c.close()
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["response_bytes"] == 5000 and ev["status"] == 200
    p.wait_for(lambda e: e["event"] == "response", count=2)
    assert not p.of("error")


def test_hop_by_hop_headers_not_forwarded(dumpproxy, origin):
    p = dumpproxy()
    r = proxied(p, "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: 1",
                "-H", "Keep-Alive: timeout=5", "-H", "TE: trailers", "-H", "Trailer: X-T",
                "-H", "Proxy-Authorization: Basic Zm9vOmJhcg==", "-H", "X-Keep: yes",
                "-H", "Authorization: Bearer tok", origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    seen = {k.lower(): v for k, v in json.loads(r.stdout)["headers"].items()}
    for name in ("connection", "x-hop", "keep-alive", "proxy-connection", "te", "trailer",
                 "proxy-authorization"):
        assert name not in seen, f"{name} was forwarded"
    assert seen["x-keep"] == "yes"
    assert seen["authorization"] == "Bearer tok"
    assert seen["user-agent"].startswith("curl/") and seen["accept"] == "*/*"
    assert seen["host"] == f"127.0.0.1:{origin.port}"
    # the event shows what the client sent
    req = p.wait_for(lambda e: e["event"] == "request")
    assert req["headers"]["x-hop"] == "1" and req["headers"]["te"] == "trailers"
    assert req["headers"]["proxy-connection"] == "Keep-Alive"
    assert req["headers"]["proxy-authorization"] == "Basic <redacted>"


def test_hop_by_hop_response_headers_not_forwarded(dumpproxy, raw_origin):
    body = b"ok\n"
    o = raw_origin(b"HTTP/1.1 200 OK\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
                   b"Keep-Alive: timeout=5\r\nX-End: yes\r\nContent-Length: 3\r\n\r\n" + body)
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(f"http://127.0.0.1:{o.port}/"))
        resp = c.response()
    finally:
        c.close()
    assert resp.status == 200 and resp.body == body
    assert resp.headers["x-end"] == "yes"
    assert "x-secret-hop" not in resp.headers and "keep-alive" not in resp.headers
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["headers"]["x-secret-hop"] == "1"


def test_expect_100_continue(dumpproxy, origin, tmp_path):
    data = os.urandom(300 * 1024)
    f = tmp_path / "body"
    f.write_bytes(data)
    p = dumpproxy()
    # curl waits 1 s for "100 Continue" before sending anyway: we must be faster
    r = proxied(p, "-v", "-H", "Expect: 100-continue", "--expect100-timeout", "3",
                "-w", "|%{time_total}", "--data-binary", f"@{f}", origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    body, _, total = r.stdout.rpartition(b"|")
    assert float(total) < 1.5, f"took {total} s: 100 Continue was not relayed"
    assert b"< HTTP/1.1 100 Continue" in r.stderr
    info = json.loads(body)
    assert info["body_len"] == len(data) and info["body"].encode("latin-1") == data
    assert {k.lower() for k in info["headers"]} >= {"expect"}
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["status"] == 200 and ev["request_bytes"] == len(data)
    assert len(p.of("response")) == 1


def test_head_204_304_have_no_body_and_keep_alive(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(origin.url("/small"), method="HEAD"))
        r = c.response("HEAD")
        assert r.status == 200 and r.headers["content-length"] == "6" and r.body == b""
        c.send(get(origin.url("/status/204")))
        r = c.response()
        assert r.status == 204 and r.body == b""
        c.send(get(origin.url("/status/304")))
        r = c.response()
        assert r.status == 304 and r.body == b""
        c.send(get(origin.url("/small")))
        r = c.response()
        # a stray body byte from an earlier answer would break this parse
        assert r.version == "HTTP/1.1" and r.status == 200 and r.body == b"hello\n"
    finally:
        c.close()
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    evs = p.of("response")
    assert [(e["method"], e["status"], e["response_bytes"]) for e in evs] == [
        ("HEAD", 200, 0), ("GET", 204, 0), ("GET", 304, 0), ("GET", 200, 6)]
    assert len(p.of("server_connect")) == 1 and len(p.of("client_connect")) == 1
    assert not p.of("error")


def test_websocket_upgrade_relays_bytes(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(get(origin.url("/ws"), extra="Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n"))
        r = c.response()
        assert r.status == 101
        assert r.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in r.headers["connection"].lower()
        c.send(b"ping 1")
        assert c.read_exact(6) == b"ping 1"
        blob = os.urandom(256 * 1024)
        sender = threading.Thread(target=c.send, args=(blob,))
        sender.start()
        assert c.read_exact(len(blob)) == blob
        sender.join()
        c.sock.shutdown(socket.SHUT_WR)
        assert c.at_eof(), "the origin's close after our half-close did not reach us"
    finally:
        c.close()
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["status"] == 101 and ev["reason"] == "Switching Protocols"
    assert ev["headers"]["upgrade"].lower() == "websocket"
    req = p.of("request")[0]
    assert req["headers"]["upgrade"] == "websocket"
    # the origin saw the upgrade request
    seen = {k.lower(): v for k, v in origin.requests[0][2].items()}
    assert seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
    p.wait_for(lambda e: e["event"] == "client_disconnect")


# --- bodies in events -----------------------------------------------------------------------


def test_no_bodies_by_default(dumpproxy, origin):
    p = dumpproxy()
    assert proxied(p, "--data-binary", "abc", origin.url("/echo")).returncode == 0
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert not any(k.startswith(("request_body", "response_body")) for k in ev)


def test_bodies_text_and_binary(dumpproxy, origin, tmp_path):
    p = dumpproxy("--bodies")
    text = "héllo wörld ✓"
    r = proxied(p, "--data-binary", text, origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["request_body"] == text
    assert json.loads(ev["response_body"]) == json.loads(r.stdout)
    for k in ("request_body_encoding", "response_body_encoding", "request_body_truncated",
              "response_body_truncated"):
        assert k not in ev
    assert list(ev)[-2:] == ["request_body", "response_body"]

    blob = bytes(range(256)) * 4
    f = tmp_path / "blob"
    f.write_bytes(blob)
    r = proxied(p, "--data-binary", f"@{f}", origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    ev = p.wait_for(lambda e: e["event"] == "response", count=2)
    assert ev["request_body_encoding"] == "base64"
    assert base64.b64decode(ev["request_body"]) == blob
    assert "response_body_encoding" not in ev

    r = proxied(p, origin.url("/binary/1000"))
    expected = (bytes(range(256)) * 4)[:1000]
    assert r.stdout == expected
    ev = p.wait_for(lambda e: e["event"] == "response", count=3)
    assert ev["response_body_encoding"] == "base64"
    assert base64.b64decode(ev["response_body"]) == expected
    assert ev["request_body"] == "" and "request_body_encoding" not in ev


def test_max_body_bytes_truncates_event_not_traffic(dumpproxy, origin):
    p = dumpproxy("--bodies", "--max-body-bytes", "200")
    data = "a" * 5000
    r = proxied(p, "--data-binary", data, origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)  # the whole response reached the client
    assert info["body_len"] == 5000 and info["body"] == data  # the whole request reached it
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["request_body"] == "a" * 200 and ev["request_body_truncated"] is True
    assert ev["response_body"] == r.stdout[:200].decode()
    assert ev["response_body_truncated"] is True
    assert ev["request_bytes"] == 5000 and ev["response_bytes"] == len(r.stdout)

    r = proxied(p, origin.url("/binary/1000"))
    assert r.stdout == (bytes(range(256)) * 4)[:1000]
    ev = p.wait_for(lambda e: e["event"] == "response", count=2)
    assert base64.b64decode(ev["response_body"]) == bytes(range(200))
    assert ev["response_body_truncated"] is True and ev["response_body_encoding"] == "base64"
    assert "request_body_truncated" not in ev


# --- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize("redact", [True, False])
def test_credentials_redaction_and_joining(dumpproxy, origin, redact):
    p = dumpproxy() if redact else dumpproxy("--no-redact")
    r = proxied(p, "-H", "Authorization: Bearer s3cret-token", "-H", "Cookie: sid=s3cret-cookie",
                "-H", "Proxy-Authorization: Basic czNjcmV0OnB3", "-H", "X-Dup: 1",
                "-H", "X-Dup: 2", origin.url("/cookies"))
    assert r.returncode == 0, r.stderr
    resp = p.wait_for(lambda e: e["event"] == "response")
    req = p.of("request")[0]
    h, rh = req["headers"], resp["headers"]
    assert h["x-dup"] == "1, 2"
    assert rh["x-multi"] == "x, y"
    if redact:
        assert h["authorization"] == "Bearer <redacted>"
        assert h["cookie"] == "<redacted>"
        assert h["proxy-authorization"] == "Basic <redacted>"
        assert rh["set-cookie"] == "<redacted>\n<redacted>"
        assert "s3cret" not in "".join(p.lines)
    else:
        assert h["authorization"] == "Bearer s3cret-token"
        assert h["cookie"] == "sid=s3cret-cookie"
        assert h["proxy-authorization"] == "Basic czNjcmV0OnB3"
        assert rh["set-cookie"] == "a=1\nb=2"
    seen = {k.lower(): v for k, v in origin.requests[0][2].items()}
    assert seen["authorization"] == "Bearer s3cret-token"
    assert seen["cookie"] == "sid=s3cret-cookie"
    assert "proxy-authorization" not in seen


# --- upstream failures ----------------------------------------------------------------------


def test_connection_refused_gives_502(dumpproxy, origin, refused_port):
    p = dumpproxy()
    port = refused_port
    r = proxied(p, "-w", "|%{http_code}", "-D", "/dev/stderr", f"http://127.0.0.1:{port}/x")
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.decode().rpartition("|")
    assert status == "502"
    assert b"content-type: text/plain" in r.stderr.lower()
    assert f"127.0.0.1:{port}" in body and "refused" in body.lower()
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "server_connect"
    assert err["address"] == f"127.0.0.1:{port}"
    assert "refused" in err["message"].lower()
    assert list(err)[:6] == ["ts", "event", "conn", "client", "stage", "message"]
    # the proxy goes on serving
    assert proxied(p, origin.url("/small")).stdout == b"hello\n"


def test_dns_failure_gives_502(dumpproxy):
    p = dumpproxy(hosts={})
    t0 = time.monotonic()
    r = proxied(p, "-w", "|%{http_code}", "http://nonexistent.invalid/x")
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.decode().rpartition("|")
    assert status == "502"
    assert "nonexistent.invalid" in body
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "server_connect"
    assert err["address"] == "nonexistent.invalid:80"
    assert "nonexistent.invalid" in err["message"]
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_upstream_dies_mid_response(dumpproxy, raw_origin, reset):
    o = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
                   reset=reset)
    p = dumpproxy()
    r = proxied(p, "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                f"http://127.0.0.1:{o.port}/")
    assert r.returncode != 0, "the client must see that the body was cut"
    status, size = r.stdout.decode().split()
    assert status == "200" and int(size) <= 1000
    err = p.wait_for(lambda e: e["event"] == "error")
    req = p.of("request")[0]
    assert err["stage"] == "upstream"
    assert err["flow"] == req["flow"]
    assert err["address"] == f"127.0.0.1:{o.port}"
    p.wait_for(lambda e: e["event"] == "client_disconnect")


def test_upstream_closes_before_answering_gives_502(dumpproxy, raw_origin):
    o = raw_origin(b"", reset=False)
    p = dumpproxy()
    r = proxied(p, "-w", "|%{http_code}", f"http://127.0.0.1:{o.port}/")
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.decode().rpartition("|")
    assert status == "502" and body.strip()
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "upstream" and err["flow"] == p.of("request")[0]["flow"]


def test_upstream_malformed_response_gives_502(dumpproxy, raw_origin):
    o = raw_origin(b"NOT HTTP AT ALL\r\n\r\n", reset=False)
    p = dumpproxy()
    r = proxied(p, "-w", "|%{http_code}", f"http://127.0.0.1:{o.port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().rpartition("|")[2] == "502"
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "upstream"


def test_client_goes_away_mid_download(dumpproxy, origin):
    p = dumpproxy()
    c = Raw(p.port)
    c.send(get(origin.url("/bytes/104857600")))
    r = c.f.readline()
    assert r.startswith(b"HTTP/1.1 200")
    c.f.read(1024 * 1024)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                      (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    c.close()
    # the client's own doing: no error; the exchange is cut by the client, with the bytes
    # that reached it so far
    resp = p.wait_for(lambda e: e["event"] == "response")
    assert (resp["flow"], resp["status"], resp["aborted"]) == (
        p.of("request")[0]["flow"], 200, "client")
    assert 1024 * 1024 <= resp["response_bytes"] < 104857600
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    sd = p.wait_for(lambda e: e["event"] == "server_disconnect")
    assert sd["bytes_received"] < 104857600
    assert not p.of("error")
    assert proxied(p, origin.url("/small")).stdout == b"hello\n"


# --- malformed client requests --------------------------------------------------------------


def test_empty_lines_before_the_request_line_are_ignored(dumpproxy, origin):
    """RFC 9112 2.2: a client that sends an empty line before its request (or after a
    body) is served, not refused."""
    p = dumpproxy()
    c = Raw(p.port)
    try:
        c.send(b"\r\n" + get(origin.url("/small")))
        assert c.response().body == b"hello\n"
        body = b"abc"
        c.send(get(origin.url("/echo"), method="POST",
                   extra=f"Content-Length: {len(body)}\r\n") + body + b"\r\n")
        assert c.response().status == 200
        c.send(get(origin.url("/small")))
        assert c.response().body == b"hello\n"
    finally:
        c.close()
    p.wait_for(lambda e: e["event"] == "response", count=3)
    assert [e["status"] for e in p.of("response")] == [200, 200, 200]
    assert not p.of("error")


@pytest.mark.parametrize("kind", ["garbage", "cl_and_te", "origin_form"])
def test_malformed_request_gets_4xx_and_proxy_keeps_serving(dumpproxy, origin, kind):
    p = dumpproxy()
    url = origin.url("/echo")
    data = {
        "garbage": b"GARBAGE\r\n\r\n",
        "cl_and_te": get(url, method="POST", extra="Content-Length: 5\r\n"
                         "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
        "origin_form": b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    }[kind]
    c = Raw(p.port)
    try:
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.response()
        assert r.status == 400
        assert r.body.strip()
        assert r.headers["content-type"].startswith("text/plain")
        assert c.at_eof()
    finally:
        c.close()
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "http" and err["message"]
    assert not origin.requests, "a bad request must not reach the origin"
    if kind == "cl_and_te":  # a request that can be named: in the record, with its 400
        [req] = p.of("request")
        resp = p.wait_for(lambda e: e["event"] == "response")
        assert req["flow"] == err["flow"] == resp["flow"] and resp["status"] == 400
    else:  # nothing names it: the error alone
        assert not p.of("request") and "flow" not in err
    r = proxied(p, origin.url("/small"))
    assert r.returncode == 0 and r.stdout == b"hello\n"


# --- memory ---------------------------------------------------------------------------------


def test_200mb_download_memory_flat(dumpproxy, origin):
    p = dumpproxy()
    r = proxied(p, "-o", "/dev/null", "-w", "%{size_download}", origin.url(f"/bytes/{BIG}"),
                timeout=90)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == BIG
    peak = rss_kb(p.proc.pid)
    assert peak < RSS_LIMIT_KB, f"peak RSS {peak} KiB"
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["response_bytes"] == BIG


def test_200mb_download_to_a_paused_client_memory_flat(dumpproxy, origin):
    """The client reads nothing for 1.5 s: the proxy must stop reading from the origin."""
    p = dumpproxy()
    c = Raw(p.port, timeout=30)
    try:
        c.send(get(origin.url(f"/bytes/{BIG}")))
        time.sleep(1.5)
        r = c.response("HEAD")  # the head only; the body is counted below
        assert r.status == 200 and r.headers["content-length"] == str(BIG)
        got = 0
        while got < BIG:
            chunk = c.f.read1(1024 * 1024)
            assert chunk, f"body cut at {got}"
            got += len(chunk)
        assert got == BIG
    finally:
        c.close()
    peak = rss_kb(p.proc.pid)
    assert peak < RSS_LIMIT_KB, f"peak RSS {peak} KiB"
    assert p.wait_for(lambda e: e["event"] == "response")["response_bytes"] == BIG


def test_200mb_upload_memory_flat(dumpproxy, origin, tmp_path):
    f = tmp_path / "big"
    with open(f, "wb") as fh:
        fh.truncate(BIG)  # sparse: fast to make, still BIG bytes to send
    p = dumpproxy()
    # the origin reads nothing for 1.5 s: the proxy must stop reading from curl meanwhile
    r = proxied(p, "-T", str(f), origin.url("/sink?delay=1.5"), timeout=90)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body_len"] == BIG
    peak = rss_kb(p.proc.pid)
    assert peak < RSS_LIMIT_KB, f"peak RSS {peak} KiB"
    ev = p.wait_for(lambda e: e["event"] == "response")
    assert ev["request_bytes"] == BIG and ev["method"] == "PUT"


# --- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_response_past_the_grace_is_cut_then_shutdown(dumpproxy, origin, sig):
    """A response still streaming when the grace period runs out is cut: its `response`
    says so (aborted: shutdown, the bytes so far), then `shutdown` is the last line."""
    p = dumpproxy("--shutdown-grace", "0.5")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    client = subprocess.Popen(["curl", "-sS", "-x", p.url, "-o", "/dev/null",
                               origin.url("/slow?n=100")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        req = p.wait_for(lambda e: e["event"] == "request")
        time.sleep(0.3)  # a few body bytes are through
        assert p.stop(sig) == 0
        assert client.wait(timeout=10) != 0  # the body was cut
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    events = parse_events("".join(p.lines))  # every line is JSON
    assert events[-1]["event"] == "shutdown"
    assert [e["event"] for e in events].count("shutdown") == 1
    last = events[-1]
    assert list(last) == ["ts", "event", "reason", "connections", "requests", "passthrough",
                          "errors", "uptime_s"]
    assert last["reason"] == sig.name
    assert last["connections"] == 1 and last["requests"] == 1 and last["passthrough"] == 0
    assert last["errors"] == 0 and isinstance(last["uptime_s"], float)
    [resp] = [e for e in events if e["event"] == "response"]
    assert (resp["flow"], resp["status"], resp["aborted"]) == (req["flow"], 200, "shutdown")
    assert 0 < resp["response_bytes"] < 100
    kinds_after = [e["event"] for e in events[events.index(resp) + 1:-1]]
    assert set(kinds_after) <= {"server_disconnect", "client_disconnect"}
    assert not p.of("error")
    assert b"Traceback" not in p.stderr


def test_signal_lets_the_exchange_in_flight_finish(dumpproxy, origin):
    """SIGTERM with a response streaming: no new connection is accepted, the exchange
    finishes whole within the grace period, then `shutdown`; an idle keep-alive client is
    let go at once."""
    p = dumpproxy()
    idle = Raw(p.port)  # a keep-alive connection between requests
    idle.send(get(origin.url("/small")))
    assert idle.response().status == 200
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    client = subprocess.Popen(["curl", "-sS", "-x", p.url, origin.url("/slow?n=10")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.wait_for(lambda e: e["event"] == "request", count=2)
        p.proc.send_signal(signal.SIGTERM)
        assert idle.at_eof()  # closed at once: it had nothing in flight
        with pytest.raises(OSError):  # the listener is closed
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
        out, _ = client.communicate(timeout=10)
        assert client.returncode == 0 and out == b"x" * 10  # the whole body (2 s of it)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        idle.close()
    assert p.proc.wait(timeout=10) == 0  # on its own, once the exchange is done
    p.stop()
    events = parse_events("".join(p.lines))
    responses = [e for e in events if e["event"] == "response"]
    assert [(e["status"], e["response_bytes"], e.get("aborted")) for e in responses] == [
        (200, 6, None), (200, 10, None)]
    assert events[-1]["event"] == "shutdown" and events[-1]["reason"] == "SIGTERM"
    assert not p.of("error")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_ends_at_once(dumpproxy, origin, sig):
    """A second signal during the grace period cuts what is in flight at once: the cut
    exchange's response and `shutdown` are still written whole; exit 128+N."""
    p = dumpproxy("--shutdown-grace", "60")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    client = subprocess.Popen(["curl", "-sS", "-x", p.url, "-o", "/dev/null",
                               origin.url("/slow?n=100")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait_for(lambda e: e["event"] == "request")
        p.proc.send_signal(sig)
        time.sleep(0.5)  # in the grace period
        assert p.proc.poll() is None
        assert p.stop(sig) == 128 + sig
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    events = parse_events("".join(p.lines))
    [resp] = [e for e in events if e["event"] == "response"]
    assert resp["aborted"] == "shutdown"
    assert events[-1]["event"] == "shutdown" and events[-1]["reason"] == sig.name


# --- output side ----------------------------------------------------------------------------


def test_reader_goes_away_head_n_3(home, origin):
    port = free_port()
    err = home / "stderr"
    out = home / "stdout"
    cmd = (f"set -o pipefail; {sys.executable} -m dumpproxy -p {port} -q 2>{err} "
           f"| head -n 3 >{out}")
    sh = subprocess.Popen(["bash", "-c", cmd], env=proxy_env(home), cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sh.poll() is None:
            r = curl("-x", f"http://127.0.0.1:{port}", "-o", "/dev/null", origin.url("/small"))
            if r.returncode != 0:
                time.sleep(0.05)  # not listening yet, or it just went away
        assert sh.poll() is not None, "dumpproxy kept running after its reader went away"
        assert sh.returncode == 0, err.read_text()
    finally:
        if sh.poll() is None:
            sh.kill()
            sh.wait()
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["event"] == "listening"
    text = err.read_text()
    assert "Traceback" not in text and "Exception ignored" not in text, text


def test_reader_closes_pipe_exits_0_promptly(home, origin):
    proc = subprocess.Popen([sys.executable, "-m", "dumpproxy", "-p", "0", "-q"],
                            env=proxy_env(home), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = json.loads(proc.stdout.readline())
        url = f"http://{first['address']}"
        assert curl("-x", url, origin.url("/small")).stdout == b"hello\n"
        proc.stdout.readline()
        proc.stdout.readline()
        proc.stdout.close()
        t0 = time.monotonic()
        for _ in range(50):
            curl("-x", url, "-o", "/dev/null", origin.url("/small"), timeout=5)
            if proc.poll() is not None:
                break
        rc = proc.wait(timeout=5)
        assert rc == 0
        assert time.monotonic() - t0 < 5
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "Exception ignored" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_output_file_appends(home, origin):
    out = home / "events.jsonl"
    out.write_text('{"event":"previous"}\n')
    for run in (1, 2):
        p = DumpProxy(["-p", "0", "-q", "-o", str(out)], home, wait_listening=False)
        try:
            deadline = time.monotonic() + 15
            while out.read_text().count('"listening"') < run and time.monotonic() < deadline:
                time.sleep(0.02)
            listening = [json.loads(x) for x in out.read_text().splitlines()
                         if '"listening"' in x][run - 1]
            url = f"http://{listening['address']}"
            assert curl("-x", url, origin.url("/small")).stdout == b"hello\n"
        finally:
            assert p.stop() == 0
        assert p.lines == [], "events went to stdout despite -o"
        lines = out.read_text().splitlines()
        assert json.loads(lines[0]) == {"event": "previous"}
        events = [{"event": "previous"}, *parse_events("\n".join(lines[1:]))]
        kinds = [e["event"] for e in events[1:]]
        assert kinds.count("listening") == run and kinds.count("shutdown") == run
        assert kinds.count("response") == run
        assert kinds[-1] == "shutdown" and kinds[0] == "listening"


def test_text_format(home, origin):
    p = DumpProxy(["-p", "0", "-q", "--format", "text"], home, wait_listening=False)
    try:
        first = wait_lines(p, lambda line: "listening" in line)[0]
        assert p.lines[0] == first
        m = re.fullmatch(r"Proxy server listening at http://127\.0\.0\.1:(\d+) \(mode regular\)\n",
                         first)
        assert m, first
        r = curl("-x", f"http://127.0.0.1:{m[1]}", "-w", "|%{local_port}", origin.url("/small"))
        assert r.returncode == 0, r.stderr
        client = f"127.0.0.1:{r.stdout.decode().rpartition('|')[2]}"
        wait_lines(p, lambda line: line.endswith("client disconnect\n"))
    finally:
        assert p.stop() == 0
    target = f"127.0.0.1:{origin.port}"
    text = "".join(p.lines)
    assert not any(line.startswith("{") for line in p.lines)
    expected = [
        f"{client}: client connect\n",
        f"{client}: server connect {target}\n",
        f"{client}: GET http://{target}/small HTTP/1.1\n",
        "     << HTTP/1.1 200 OK 6b\n",
        f"{client}: client disconnect\n",  # as SPEC §2 shows it: the upstream connection
        f"{client}: server disconnect {target}\n",  # waited in the pool until shutdown
    ]
    pos = 0
    for line in expected:
        i = text.find(line, pos)
        assert i >= 0, f"missing or out of order: {line!r} in\n{text}"
        pos = i + len(line)
    assert p.lines[-1].startswith("shutdown (SIGTERM)")


def test_events_reach_the_reader_within_100_ms_while_the_proxy_is_idle(dumpproxy, origin):
    """SPEC §2: each event reaches the reader within 100 ms of happening, also when nothing
    follows it (the batch is flushed by a timer, not by the next event or by exit)."""
    p = dumpproxy()
    for n in range(1, 6):
        r = proxied(p, origin.url("/small"))
        assert r.returncode == 0
        ev = p.wait_for(lambda e: e["event"] == "response", count=n, timeout=5)
        # the event's own time (written by the proxy) against the time its line was read
        delay = p.arrival(ev) - ev["ts"]
        assert delay <= 0.1, f"response event reached the reader after {delay * 1000:.0f} ms"


def test_slow_reader_loses_nothing(home, origin):
    n = 300
    proc = subprocess.Popen([sys.executable, "-m", "dumpproxy", "-p", "0", "-q"],
                            env=proxy_env(home), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = json.loads(proc.stdout.readline())
        url = f"http://{first['address']}"
        result: list = []
        urls = [origin.url(f"/small?i={i}") for i in range(n)]
        traffic = threading.Thread(
            target=lambda: result.append(curl("-x", url, *urls, timeout=60)), daemon=True)
        traffic.start()
        # Nobody reads: once the pipe is full the proxy must wait in write(2) on it (its
        # one thread blocked: back-pressure), not buffer events or drop them.
        syscall = Path(f"/proc/{proc.pid}/syscall")
        deadline = time.monotonic() + 30
        while not syscall.read_text().startswith("1 0x1 "):  # write(1, ...)
            assert traffic.is_alive(), "all exchanges done while nobody read the events"
            assert time.monotonic() < deadline, "the proxy never blocked on its full output"
            time.sleep(0.01)
        assert traffic.is_alive()
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        traffic.join(60)
        assert result and result[0].returncode == 0
        assert result[0].stdout == b"hello\n" * n
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = b"".join(chunks)
    assert data.endswith(b"\n")
    events = parse_events(data)
    kinds = [e["event"] for e in events]
    assert kinds.count("request") == n and kinds.count("response") == n
    assert kinds.count("decision") == n
    assert [e["flow"] for e in events if e["event"] == "response"] == list(range(1, n + 1))
    assert [e["url"] for e in events if e["event"] == "response"] == urls
    assert kinds[-1] == "shutdown" and kinds.count("client_disconnect") == 1


# --- the request target (pure) --------------------------------------------------------------

@pytest.mark.parametrize(("raw", "parts"), [
    ("http://example.com/a?b=c", ("http", "example.com", 80, "/a?b=c")),
    ("HTTPS://example.com:8443", ("https", "example.com", 8443, "/")),
    ("http://[::1]:8080/x", ("http", "::1", 8080, "/x")),
    ("http://127.0.0.1/" + "p" * 2000, ("http", "127.0.0.1", 80, "/" + "p" * 2000)),
])
def test_absolute_targets_parse_the_same_each_time(raw: str, parts: tuple) -> None:
    """Absolute-form targets (short ones remembered, long ones not) give the same parts on
    every request of a keep-alive connection."""
    from dumpproxy.http1_server import parse_target

    assert parse_target(raw, None, True) == parts
    assert parse_target(raw, None, True) == parts


@pytest.mark.parametrize(("raw", "message"), [
    ("http://example.com:99999/", "bad request target"),
    ("ftp://example.com/", "unsupported request target"),
    ("http://exa mple.com/", "invalid host name"),
    ("/relative", "send absolute-form requests"),
])
def test_bad_targets_are_refused_every_time(raw: str, message: str) -> None:
    """A refusal is never remembered as an answer: the second request is refused too."""
    from dumpproxy.http1_server import BadRequest, parse_target

    for _ in range(2):
        with pytest.raises(BadRequest, match=message):
            parse_target(raw, None, True)


def test_absolute_target_inside_a_tunnel_goes_to_the_tunnel() -> None:
    """Inside a tunnel the tunnel's destination wins and the URL's host is not checked;
    the same URL then asked of the explicit proxy is checked (the cache keeps them apart)."""
    from dumpproxy.http1_server import BadRequest, Target, parse_target

    tunnel = Target("https", "app.test", 443, None)
    assert parse_target("http://a..b/p?q", tunnel, True) == (
        "https", "app.test", 443, "/p?q")
    with pytest.raises(BadRequest, match="invalid host name"):
        parse_target("http://a..b/p?q", None, True)


# --- forwarded fields (pure) ----------------------------------------------------------------

def test_forwarded_fields_keep_names_as_received_and_drop_hop_by_hop() -> None:
    """Fields travel as (name as received, lower-case name, value): what is dropped is
    decided on the lower-case name, what is sent keeps the client's spelling, and the pair
    form gives the same answer."""
    from dumpproxy import headers as hdr

    pairs = [(b"Host", b"h"), (b"X-Keep", b"1"), (b"Keep-Alive", b"timeout=5"),
             (b"Connection", b"keep-alive, X-Private"), (b"x-private", b"2"),
             (b"Content-Length", b"3"), (b"Proxy-Authorization", b"Basic eA==")]
    head = hdr.fields(pairs)
    assert head[1] == (b"X-Keep", b"x-keep", b"1")
    facts = hdr.Facts(head)
    assert facts.connection == {b"keep-alive", b"x-private"} and facts.host
    out = hdr.forwardable_fields(head, tokens=facts.connection)
    assert out == [(b"Host", b"host", b"h"), (b"X-Keep", b"x-keep", b"1"),
                   (b"Content-Length", b"content-length", b"3")]
    assert hdr.forwardable(pairs) == [(n, v) for n, _, v in out]
    assert head == hdr.fields(pairs)  # the received fields are left as they were
    upgrade = hdr.fields([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")])
    assert hdr.forwardable_fields(upgrade, keep_upgrade=True) == [
        (b"Upgrade", b"upgrade", b"websocket"), (b"Connection", b"connection", b"upgrade")]
    # Connection cannot make a framing field hop-by-hop
    framing = hdr.fields([(b"Connection", b"content-length"), (b"Content-Length", b"0")])
    assert hdr.forwardable_fields(framing) == [(b"Content-Length", b"content-length", b"0")]
