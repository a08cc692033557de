"""Intercept-or-passthrough decisions end to end (SPEC §2 `decision`, §3).

Every test runs a real dumpproxy and real sockets: raw CONNECTs followed by genuine TLS
ClientHellos (Python ssl over MemoryBIO, so that the hello can be split or replaced) or
plaintext heads, curl through the proxy, or plain-HTTP requests on one keep-alive
connection. Names are mapped to loopback for dumpproxy only (`hosts=`), so no query
leaves the machine. Each decision event is compared field by field.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, Origin, curl, parse_events, run_cli

DECISION_KEYS = ["ts", "event", "conn", "client", "address", "action", "reason", "pattern",
                 "source", "matched", "candidates", "sni"]
PASSTHROUGH_KINDS = {"client_connect", "server_connect", "decision", "server_disconnect",
                     "client_disconnect"}
HOSTS = {"example.com": "127.0.0.1", "example.org": "127.0.0.1", "decoy.test": "127.0.0.1",
         "other.test": "127.0.0.1", "binary.example.com": "127.0.0.1", "com": "127.0.0.1"}


# --------------------------------------------------------------------------- helpers


def start(dumpproxy, pki, *args: str, hosts: dict | None = HOSTS, **kw):
    """dumpproxy trusting the test origins' CA, with the test names mapped to loopback."""
    return dumpproxy("--upstream-ca", str(pki.ca_path), *args, hosts=hosts, **kw)


def tunnel(proxy, target: str, timeout: float = 15) -> socket.socket:
    """A raw client socket with a CONNECT tunnel to `target` established."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)  # byte by byte: nothing of the tunnel is consumed here
        assert chunk, f"proxy closed during CONNECT: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200 "), head
    return s


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def split_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    return int(head.split(b" ", 2)[1]), body


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length-framed response from a keep-alive connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before the response head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers["content-length"])
    while len(body) < n:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == n, "more bytes than Content-Length"
    return int(lines[0].split(" ", 2)[1]), headers, body


def plain_get(s: socket.socket, host_line: str | None, path: str = "/small",
              extra: str = "", version: str = "1.1") -> tuple[int, bytes]:
    """A plaintext request inside a tunnel (Connection: close), then the response."""
    host = f"{host_line}\r\n" if host_line else ""
    s.sendall(f"GET {path} HTTP/{version}\r\n{host}{extra}Connection: close\r\n\r\n"
              .encode())
    return split_response(recv_all(s))


class TLSClient:
    """A TLS client over a tunnel socket, built on MemoryBIO so that the ClientHello is
    ours to send (whole, split, or not at all). Counts the bytes each way."""

    def __init__(self, sock: socket.socket, server_hostname: str, cafile: str | Path):
        ctx = ssl.create_default_context(cafile=str(cafile))
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=server_hostname)
        self.sent = 0
        self.received = 0

    def hello(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.out.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.send(data)

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        self.received += len(data)
        return data

    def handshake(self) -> None:
        """Finish the handshake (the hello must have been sent)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self._recv()
                if not data:
                    raise ConnectionError("EOF during the TLS handshake") from None
                self.inc.write(data)
        self._flush()

    def get(self, host: str, path: str = "/small") -> tuple[int, bytes]:
        self.obj.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                       .encode())
        self._flush()
        buf = b""
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                data = self._recv()
                if not data:
                    break
                self.inc.write(data)
                continue
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            buf += chunk
        self._flush()
        return split_response(buf)

    def peer_issuer(self) -> str:
        cert = self.obj.getpeercert()
        return dict(x[0] for x in cert["issuer"])["commonName"]


def decision(proxy, count: int = 1, timeout: float = 15, **match) -> dict:
    ev = proxy.wait_for(
        lambda e: e["event"] == "decision" and all(e.get(k) == v for k, v in match.items()),
        timeout=timeout, count=count)
    assert list(ev) == DECISION_KEYS, list(ev)
    return ev


def fields(ev: dict) -> dict:
    return {k: ev[k] for k in DECISION_KEYS[4:]}


def expect(address, action, reason, pattern, source, matched, cands, sni) -> dict:
    return {"address": address, "action": action, "reason": reason, "pattern": pattern,
            "source": source, "matched": matched, "candidates": cands, "sni": sni}


def closed(proxy, conn: int) -> list[dict]:
    """Wait for the connection's client_disconnect, then return all its events."""
    proxy.wait_for(lambda e: e["event"] == "client_disconnect" and e["conn"] == conn)
    proxy.wait_for(lambda e: e["event"] == "server_disconnect" and e["conn"] == conn)
    time.sleep(0.05)
    return [e for e in proxy.events if e.get("conn") == conn]


def assert_passthrough_only(proxy, conn: int) -> dict:
    """A passed-through tunnel is recorded only by decision and server/client events;
    returns its server_disconnect."""
    evs = closed(proxy, conn)
    kinds = [e["event"] for e in evs]
    assert set(kinds) <= PASSTHROUGH_KINDS, kinds
    (sd,) = [e for e in evs if e["event"] == "server_disconnect"]
    return sd


def ca_of(proxy) -> str:
    return proxy.events[0]["ca_cert"]


# --------------------------------------------------------------------------- CONNECT + TLS


def test_ignore_host_passthrough_curl_sees_origin_certificate(dumpproxy, pki, tls_origin):
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com")
    port = tls_origin.port
    r = curl("--cacert", str(pki.ca_path), "-x", p.url, f"https://example.com:{port}/small")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    d = decision(p)
    assert fields(d) == expect(
        f"example.com:{port}", "passthrough", "ignore_hosts", "example.com", "--ignore-hosts",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], "example.com")
    sd = assert_passthrough_only(p, d["conn"])
    assert sd["address"] == f"example.com:{port}" and sd["ip"] == f"127.0.0.1:{port}"
    assert sd["bytes_sent"] > 200 and sd["bytes_received"] > 200
    assert not p.of("tls") and not p.of("request") and not p.of("response")
    # and a client trusting only dumpproxy's CA is refused: the certificate is the origin's
    r = curl("--cacert", ca_of(p), "-x", p.url, f"https://example.com:{port}/small")
    assert r.returncode != 0


def test_passthrough_relays_bytes_verbatim_and_counts_them(dumpproxy, pki, tls_origin):
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com")
    port = tls_origin.port
    s = tunnel(p, f"example.com:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    c.send(c.hello())
    c.handshake()  # verified against the origin's CA: untouched TLS
    assert c.peer_issuer() == "dumpproxy test origin CA"
    status, body = c.get(f"example.com:{port}", "/bytes/300000")
    assert (status, len(body), set(body)) == (200, 300000, {0})
    s.close()
    d = decision(p)
    assert (d["action"], d["sni"]) == ("passthrough", "example.com")
    sd = assert_passthrough_only(p, d["conn"])
    # every byte each way, and nothing else
    assert (sd["bytes_sent"], sd["bytes_received"]) == (c.sent, c.received)


def test_ignore_host_with_port_passthrough(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", f"example.com:{port}")
    s = tunnel(p, f"example.com:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    c.send(c.hello())
    c.handshake()
    assert c.get("example.com")[0] == 200
    s.close()
    assert fields(decision(p)) == expect(
        f"example.com:{port}", "passthrough", "ignore_hosts", f"example.com:{port}",
        "--ignore-hosts", f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"],
        "example.com")


def test_ignore_host_with_other_port_intercepts(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com:123")
    s = tunnel(p, f"example.com:{port}")
    c = TLSClient(s, "example.com", ca_of(p))  # dumpproxy's certificate this time
    c.send(c.hello())
    c.handshake()
    assert c.peer_issuer() != "dumpproxy test origin CA"
    assert c.get(f"example.com:{port}") == (200, b"hello\n")
    s.close()
    d = decision(p)
    assert fields(d) == expect(
        f"example.com:{port}", "intercept", "default", None, None, None,
        [f"127.0.0.1:{port}", f"example.com:{port}"], "example.com")
    p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])


def test_ignore_host_does_not_match_its_parent_domain(dumpproxy, pki, origin, tmp_path):
    # ignore `example.com`, target `com:PORT` (the name `com` mapped to loopback)
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com")
    s = tunnel(p, f"com:{port}")
    assert plain_get(s, "Host: com") == (200, b"hello\n")
    d = decision(p)
    assert fields(d) == expect(f"com:{port}", "intercept", "default", None, None, None,
                               [f"127.0.0.1:{port}", f"com:{port}"], None)
    r = run_cli("--ignore-hosts", "example.com", "--check", "com:443", "example.com:443",
                home=tmp_path / "cli-home")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["address"], x["action"]) for x in rows] == [
        ("com:443", "intercept"), ("example.com:443", "passthrough")]


def test_ignore_ip_pattern_matches_resolved_peer(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", r"^127\.0\.0\.1:")
    s = tunnel(p, f"example.com:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    c.send(c.hello())
    c.handshake()
    assert c.get("example.com")[0] == 200
    s.close()
    assert fields(decision(p)) == expect(
        f"example.com:{port}", "passthrough", "ignore_hosts", r"^127\.0\.0\.1:",
        "--ignore-hosts", f"127.0.0.1:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"],
        "example.com")


def test_ip_target_sni_decides_passthrough(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    c.send(c.hello())
    c.handshake()
    assert c.get("example.com") == (200, b"hello\n")
    s.close()
    d = decision(p)
    assert fields(d) == expect(
        f"127.0.0.1:{port}", "passthrough", "ignore_hosts", "example.com", "--ignore-hosts",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], "example.com")
    assert_passthrough_only(p, d["conn"])


def test_split_client_hello_waits_then_passthrough(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    hello = c.hello()
    c.send(hello[: len(hello) // 2])
    time.sleep(0.6)
    assert not p.of("decision"), "decided on half a ClientHello"
    sent_rest = time.time()
    c.send(hello[len(hello) // 2 :])
    d = decision(p)
    assert d["ts"] >= sent_rest - 0.05
    assert fields(d) == expect(
        f"127.0.0.1:{port}", "passthrough", "ignore_hosts", "example.com", "--ignore-hosts",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], "example.com")
    c.handshake()
    assert c.get("example.com") == (200, b"hello\n")
    s.close()
    assert_passthrough_only(p, d["conn"])


def test_tls_record_header_then_zeros_has_no_sni_and_intercepts(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    sent = time.time()
    s.sendall(b"\x16\x03\x01\x00\x40" + b"\x00" * 0x40)
    d = decision(p)
    assert d["ts"] - sent < 3, "waited for more bytes instead of deciding"
    assert fields(d) == expect(f"127.0.0.1:{port}", "intercept", "default", None, None, None,
                               [f"127.0.0.1:{port}"], None)
    s.close()


def test_decoy_connect_target_real_sni_passthrough(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com")
    s = tunnel(p, f"decoy.test:{port}")
    c = TLSClient(s, "example.com", pki.ca_path)
    c.send(c.hello())
    c.handshake()
    assert c.get("example.com") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"decoy.test:{port}", "passthrough", "ignore_hosts", "example.com", "--ignore-hosts",
        f"example.com:{port}",
        [f"127.0.0.1:{port}", f"decoy.test:{port}", f"example.com:{port}"], "example.com")


# --------------------------------------------------------------------------- plaintext tunnels


def test_plaintext_tunnel_host_header_passthrough_verbatim(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    # headers an HTTP bridge would drop or rewrite reach the origin untouched
    status, body = plain_get(s, "Host: example.com", "/echo",
                             "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
                             "Keep-Alive: timeout=5\r\nX-Odd:   spaced   \r\n")
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert seen["proxy-authorization"] == "Basic Zm9vOmJhcg=="
    assert seen["keep-alive"] == "timeout=5"
    assert seen["host"] == "example.com"
    s.close()
    d = decision(p)
    assert fields(d) == expect(
        f"127.0.0.1:{port}", "passthrough", "ignore_hosts", "example.com", "--ignore-hosts",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], None)
    assert_passthrough_only(p, d["conn"])


def test_plaintext_tunnel_without_host_header_intercepts_as_http(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    # HTTP/1.0: no Host header needed, so the bridge can forward it
    assert plain_get(s, "X-Host: example.com", version="1.0") == (200, b"hello\n")
    s.close()
    d = decision(p)
    assert fields(d) == expect(f"127.0.0.1:{port}", "intercept", "default", None, None, None,
                               [f"127.0.0.1:{port}"], None)
    req = p.wait_for(lambda e: e["event"] == "request" and e["conn"] == d["conn"])
    assert (req["method"], req["scheme"], req["path"]) == ("GET", "http", "/small")
    assert req["headers"]["x-host"] == "example.com"
    resp = p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])
    assert resp["status"] == 200


def test_plaintext_tunnel_http11_x_host_only_intercepts(dumpproxy, pki, origin):
    # HTTP/1.1 without Host: decided on the tunnel alone (intercept), then the bridge
    # answers 400 as HTTP/1.1 requires (RFC 9112 3.2) with an error event
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, "X-Host: example.com")[0] == 400
    s.close()
    d = decision(p)
    assert fields(d) == expect(f"127.0.0.1:{port}", "intercept", "default", None, None, None,
                               [f"127.0.0.1:{port}"], None)
    err = p.wait_for(lambda e: e["event"] == "error" and e["conn"] == d["conn"])
    assert err["stage"] == "http"
    assert not origin.requests


def test_plaintext_tunnel_host_without_port_gets_destination_port(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", rf"^other\.test:{port}$", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, "Host: other.test") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"127.0.0.1:{port}", "passthrough", "ignore_hosts", rf"^other\.test:{port}$",
        "--ignore-hosts", f"other.test:{port}", [f"127.0.0.1:{port}", f"other.test:{port}"],
        None)


PORT_80_SCRIPT = """
import fcntl, json, socket, struct, sys, threading
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, sys.argv[1])
# a fresh network namespace: bring loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP)
sk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(sk, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
fcntl.ioctl(sk, 0x8914, struct.pack("16sh", b"lo", flags | 1))

from conftest import DumpProxy, OriginHandler
from test_decisions import plain_get, tunnel

server = ThreadingHTTPServer(("127.0.0.1", 80), OriginHandler)
server.daemon_threads = True
server.requests = []
threading.Thread(target=server.serve_forever, daemon=True).start()
p = DumpProxy(["-p", "0", "-q", "--ignore-hosts", sys.argv[3]], Path(sys.argv[2]))
s = tunnel(p, "127.0.0.1:80")
status, body = plain_get(s, "Host: other.test")
s.close()
d = p.wait_for(lambda e: e["event"] == "decision")
p.stop()
print(json.dumps({"status": status, "body": body.decode(), "decision": d}))
"""


def test_plaintext_tunnel_host_without_port_on_port_80(tmp_path):
    # Port 80 is bound in a network namespace of its own (free there, whatever the host
    # has on it): origin, dumpproxy and client all run inside it.
    pattern = r"other\.test:80$"
    script = tmp_path / "port80.py"
    script.write_text(PORT_80_SCRIPT)
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(["unshare", "-n", sys.executable, str(script), str(ROOT / "tests"),
                        str(home), pattern], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout.decode().splitlines()[-1])
    assert (out["status"], out["body"]) == (200, "hello\n")
    assert fields(out["decision"]) == expect(
        "127.0.0.1:80", "passthrough", "ignore_hosts", pattern, "--ignore-hosts",
        "other.test:80", ["127.0.0.1:80", "other.test:80"], None)


def test_plaintext_tunnel_host_header_keeps_its_port(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", r"^other\.test:8080$", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, "Host: other.test:8080") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"127.0.0.1:{port}", "passthrough", "ignore_hosts", r"^other\.test:8080$",
        "--ignore-hosts", "other.test:8080", [f"127.0.0.1:{port}", "other.test:8080"], None)
    s = tunnel(p, f"127.0.0.1:{port}")  # without the port it is other.test:PORT: no match
    assert plain_get(s, "Host: other.test") == (200, b"hello\n")
    s.close()
    assert fields(decision(p, count=2)) == expect(
        f"127.0.0.1:{port}", "intercept", "default", None, None, None,
        [f"127.0.0.1:{port}", f"other.test:{port}"], None)


def test_plaintext_tunnel_host_without_space_is_a_host_header(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", "example.com", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, "Host:example.com") == (200, b"hello\n")
    s.close()
    assert decision(p)["matched"] == f"example.com:{port}"


# --------------------------------------------------------------------------- allow lists


def test_allow_list(dumpproxy, pki, tls_origin, origin):
    tport, port = tls_origin.port, origin.port
    p = start(dumpproxy, pki, "--allow-hosts", "example.com")
    # allowed: intercepted, reason allow_hosts with the pattern
    s = tunnel(p, f"example.com:{tport}")
    c = TLSClient(s, "example.com", ca_of(p))
    c.send(c.hello())
    c.handshake()
    assert c.get(f"example.com:{tport}") == (200, b"hello\n")
    s.close()
    d = decision(p)
    assert fields(d) == expect(
        f"example.com:{tport}", "intercept", "allow_hosts", "example.com", "--allow-hosts",
        f"example.com:{tport}", [f"127.0.0.1:{tport}", f"example.com:{tport}"], "example.com")
    p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])
    # not allowed: passthrough, reason allow_hosts, no pattern, nothing matched
    s = tunnel(p, f"example.org:{port}")
    assert plain_get(s, "Host: example.org") == (200, b"hello\n")
    s.close()
    d = decision(p, count=2)
    assert fields(d) == expect(
        f"example.org:{port}", "passthrough", "allow_hosts", None, None, None,
        [f"127.0.0.1:{port}", f"example.org:{port}"], None)
    assert_passthrough_only(p, d["conn"])
    # an IP target whose SNI is allowed: intercepted
    s = tunnel(p, f"127.0.0.1:{tport}")
    c = TLSClient(s, "example.com", ca_of(p))
    c.send(c.hello())
    c.handshake()
    assert c.get(f"example.com:{tport}") == (200, b"hello\n")
    s.close()
    d = decision(p, count=3)
    assert fields(d) == expect(
        f"127.0.0.1:{tport}", "intercept", "allow_hosts", "example.com", "--allow-hosts",
        f"example.com:{tport}", [f"127.0.0.1:{tport}", f"example.com:{tport}"], "example.com")
    p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])


def test_allow_list_with_ignore_exception(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--allow-hosts", "example.com",
              "--ignore-hosts", "binary.example.com")
    s = tunnel(p, f"example.com:{port}")
    assert plain_get(s, "Host: example.com") == (200, b"hello\n")
    s.close()
    d = decision(p)
    assert fields(d) == expect(
        f"example.com:{port}", "intercept", "allow_hosts", "example.com", "--allow-hosts",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], None)
    p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])
    s = tunnel(p, f"binary.example.com:{port}")
    assert plain_get(s, "Host: binary.example.com") == (200, b"hello\n")
    s.close()
    d = decision(p, count=2)
    assert fields(d) == expect(
        f"binary.example.com:{port}", "passthrough", "ignore_hosts", "binary.example.com",
        "--ignore-hosts", f"binary.example.com:{port}",
        [f"127.0.0.1:{port}", f"binary.example.com:{port}"], None)
    assert_passthrough_only(p, d["conn"])


# --------------------------------------------------------------------------- matching details


def test_matching_is_case_insensitive(dumpproxy, pki, tls_origin, origin):
    tport, port = tls_origin.port, origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", r"^example\.com:", "--ignore-hosts",
              r"^OTHER\.TEST:")
    s = tunnel(p, f"EXAMPLE.COM:{port}")
    assert plain_get(s, "Host: EXAMPLE.COM") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"EXAMPLE.COM:{port}", "passthrough", "ignore_hosts", r"^example\.com:",
        "--ignore-hosts", f"EXAMPLE.COM:{port}", [f"127.0.0.1:{port}", f"EXAMPLE.COM:{port}"],
        None)
    s = tunnel(p, f"other.test:{port}")
    assert plain_get(s, "Host: other.test") == (200, b"hello\n")
    s.close()
    assert decision(p, count=2)["pattern"] == r"^OTHER\.TEST:"
    # an upper-case SNI is reported (and matched) lower-cased
    s = tunnel(p, f"127.0.0.1:{tport}")
    c = TLSClient(s, "EXAMPLE.COM", pki.ca_path)
    c.send(c.hello())
    c.handshake()
    s.close()
    assert fields(decision(p, count=3)) == expect(
        f"127.0.0.1:{tport}", "passthrough", "ignore_hosts", r"^example\.com:",
        "--ignore-hosts", f"example.com:{tport}", [f"127.0.0.1:{tport}", f"example.com:{tport}"],
        "example.com")


def test_pattern_anchored_without_port_never_matches(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki, "--ignore-hosts", r"^example\.com$")
    s = tunnel(p, f"example.com:{port}")
    c = TLSClient(s, "example.com", ca_of(p))
    c.send(c.hello())
    c.handshake()
    assert c.get(f"example.com:{port}") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"example.com:{port}", "intercept", "default", None, None, None,
        [f"127.0.0.1:{port}", f"example.com:{port}"], "example.com")


def test_ipv6_target_matched_bare_and_bracketed(dumpproxy, pki):
    o = Origin(host="::1")
    try:
        port = o.port
        for pattern, matched in ((rf"^::1:{port}$", f"::1:{port}"),
                                 (rf"^\[::1\]:{port}$", f"[::1]:{port}")):
            p = start(dumpproxy, pki, "--ignore-hosts", pattern, hosts=None)
            s = tunnel(p, f"[::1]:{port}")
            assert plain_get(s, f"Host: [::1]:{port}") == (200, b"hello\n")
            s.close()
            d = decision(p)
            assert fields(d) == expect(
                f"[::1]:{port}", "passthrough", "ignore_hosts", pattern, "--ignore-hosts",
                matched, [f"[::1]:{port}", f"::1:{port}"], None)
            sd = assert_passthrough_only(p, d["conn"])
            assert (sd["address"], sd["ip"]) == (f"[::1]:{port}", f"[::1]:{port}")
            p.stop()
    finally:
        o.close()


def test_no_patterns_decision_names_what_the_client_sent(dumpproxy, pki, origin):
    """Without patterns the decision still names the Host (and SNI) the client sent: it
    waits only for the head, which the exchange needs anyway (a peek timeout of 30 s would
    outlast the client's socket timeout of 15 s)."""
    port = origin.port
    p = start(dumpproxy, pki, "--peek-timeout", "30", hosts=None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, f"Host: localhost:{port}") == (200, b"hello\n")
    s.close()
    d = decision(p, timeout=5)
    assert fields(d) == expect(f"127.0.0.1:{port}", "intercept", "default", None, None, None,
                               [f"127.0.0.1:{port}", f"localhost:{port}"], None)
    req = p.wait_for(lambda e: e["event"] == "request" and e["conn"] == d["conn"])
    # a destination known by its address only is named by the Host header (as by an SNI)
    assert req["url"] == f"http://localhost:{port}/small"
    resp = p.wait_for(lambda e: e["event"] == "response" and e["conn"] == d["conn"])
    assert (resp["status"], resp["flow"]) == (200, req["flow"])


def test_no_patterns_decision_names_the_sni(dumpproxy, pki, tls_origin):
    port = tls_origin.port
    p = start(dumpproxy, pki)
    ca = str(p.home / "ca-cert.pem")
    r = curl("-x", p.url, "--cacert", ca, f"https://example.com:{port}/small")
    assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr
    d = decision(p, timeout=5)
    assert (d["sni"], d["reason"], d["action"]) == ("example.com", "default", "intercept")
    assert d["candidates"] == [f"127.0.0.1:{port}", f"example.com:{port}"]


# --------------------------------------------------------------------------- plain HTTP


def test_plain_http_decided_per_request_on_one_connection(dumpproxy, pki, origin, origin2):
    p1, p2 = origin.port, origin2.port
    p = start(dumpproxy, pki, "--ignore-hosts", r"^example\.com:")
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    # 1: ignored -> forwarded in origin form, Proxy-Authorization removed, not recorded
    s.sendall(f"GET http://example.com:{p1}/echo HTTP/1.1\r\nHost: example.com:{p1}\r\n"
              "Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Keep: kept\r\n\r\n".encode())
    status, _, body = read_response(s)
    assert status == 200
    info = json.loads(body)
    assert info["path"] == "/echo"
    seen = {k.lower(): v for k, v in info["headers"].items()}
    assert seen["x-keep"] == "kept" and "proxy-authorization" not in seen
    # 2: another host on the same connection -> intercepted and recorded
    s.sendall(f"GET http://other.test:{p2}/small HTTP/1.1\r\nHost: other.test:{p2}\r\n\r\n"
              .encode())
    assert read_response(s)[::2] == (200, b"hello\n")
    # 3: the first host again, on its reused upstream connection: decided again
    s.sendall(f"GET http://example.com:{p1}/small HTTP/1.1\r\nHost: example.com:{p1}\r\n"
              "Connection: close\r\n\r\n".encode())
    assert read_response(s)[::2] == (200, b"hello\n")
    s.close()
    d1, d2, d3 = (decision(p, count=i) for i in (1, 2, 3))
    assert d1["conn"] == d2["conn"] == d3["conn"]
    ignored = expect(f"example.com:{p1}", "passthrough", "ignore_hosts", r"^example\.com:",
                     "--ignore-hosts", f"example.com:{p1}",
                     [f"127.0.0.1:{p1}", f"example.com:{p1}"], None)
    assert fields(d1) == ignored
    assert fields(d2) == expect(f"other.test:{p2}", "intercept", "default", None, None, None,
                                [f"127.0.0.1:{p2}", f"other.test:{p2}"], None)
    assert fields(d3) == ignored
    # the upstream connections stay open in the pool for other clients (no disconnect yet)
    p.wait_for(lambda e: e["event"] == "client_disconnect" and e["conn"] == d1["conn"])
    assert len(p.of("client_connect")) == 1
    reqs, resps = p.of("request"), p.of("response")
    assert [r["url"] for r in reqs] == [f"http://other.test:{p2}/small"]
    assert [(r["url"], r["status"]) for r in resps] == [(f"http://other.test:{p2}/small", 200)]
    assert [r[1] for r in origin.requests] == ["/echo", "/small"]


# --------------------------------------------------------------------------- pattern files


def test_pattern_file_comments_blank_lines_and_physical_line_numbers(dumpproxy, pki, origin,
                                                                    tmp_path):
    port = origin.port
    f = tmp_path / "ignore.txt"
    f.write_text("# pass these through\n"  # 1
                 "\n"  # 2
                 "   \t\n"  # 3
                 r"  ^nothing\.test:  " "\n"  # 4
                 "# another comment\n"  # 5
                 "\t" r"^example\.com:" "  \n"  # 6
                 r"\#literal-hash" "\n")  # 7
    given = os.path.relpath(f, ROOT)  # the path exactly as given (dumpproxy runs in ROOT)
    p = start(dumpproxy, pki, "--ignore-hosts-file", given)
    s = tunnel(p, f"example.com:{port}")
    assert plain_get(s, "Host: example.com") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"example.com:{port}", "passthrough", "ignore_hosts", r"^example\.com:", f"{given}:6",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], None)
    s = tunnel(p, f"127.0.0.1:{port}")
    assert plain_get(s, "Host: #literal-hash") == (200, b"hello\n")
    s.close()
    d = decision(p, count=2)
    assert (d["action"], d["pattern"], d["source"], d["matched"]) == (
        "passthrough", r"\#literal-hash", f"{given}:7", f"#literal-hash:{port}")


def test_pattern_file_from_stdin(dumpproxy, pki, origin):
    port = origin.port
    p = start(dumpproxy, pki, "--allow-hosts-file", "-",
              stdin=b"# allowed\n\nnothing\\.test\n^example\\.com:\n")
    s = tunnel(p, f"example.com:{port}")
    assert plain_get(s, "Host: example.com") == (200, b"hello\n")
    s.close()
    assert fields(decision(p)) == expect(
        f"example.com:{port}", "intercept", "allow_hosts", r"^example\.com:", "-:4",
        f"example.com:{port}", [f"127.0.0.1:{port}", f"example.com:{port}"], None)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert r.stdout == b""
    return lines[0]


def test_bad_pattern_in_file_exits_2_naming_file_and_line(tmp_path):
    f = tmp_path / "ignore.txt"
    f.write_text("# one\nok\\.test\nfoo(\n")
    home = tmp_path / "home"
    for flag in ("--ignore-hosts-file", "--allow-hosts-file"):
        r = run_cli(flag, str(f), home=home)
        assert r.returncode == 2
        assert one_error_line(r) == (f"dumpproxy: error: {f}:3: invalid pattern 'foo(': "
                                     "missing ), unterminated subpattern at position 3")
    r = run_cli("--ignore-hosts-file", "-", home=home, stdin=b"\n\nfoo(\n")
    assert r.returncode == 2
    assert one_error_line(r).startswith("dumpproxy: error: -:3: invalid pattern 'foo('")
    assert not home.exists()


def test_bad_pattern_flag_exits_2_naming_the_flag(tmp_path):
    for flag in ("--ignore-hosts", "--allow-hosts"):
        r = run_cli(flag, "ok", flag, "foo(", home=tmp_path / "home")
        assert r.returncode == 2
        assert one_error_line(r) == (f"dumpproxy: error: {flag}: invalid pattern 'foo(': "
                                     "missing ), unterminated subpattern at position 3")


def test_unreadable_pattern_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "missing.txt"
    r = run_cli("--ignore-hosts-file", str(missing), home=tmp_path / "home")
    assert r.returncode == 2
    assert one_error_line(r) == (
        f"dumpproxy: error: {missing}: cannot read: No such file or directory")
    r = run_cli("--allow-hosts-file", str(tmp_path), home=tmp_path / "home")
    assert r.returncode == 2
    assert one_error_line(r) == f"dumpproxy: error: {tmp_path}: cannot read: Is a directory"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\n")
    r = run_cli("--ignore-hosts-file", str(binary), home=tmp_path / "home")
    assert r.returncode == 2
    assert str(binary) in one_error_line(r)


# --------------------------------------------------------------------------- SIGHUP


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def decide_until(p, origin_port: int, host: str, want: str, deadline: float = 5) -> dict:
    """Open tunnels to host until its decision's action is `want` (a reload is async)."""
    end = time.monotonic() + deadline
    while True:
        n = len(p.of("decision")) + 1
        s = tunnel(p, f"{host}:{origin_port}")
        assert plain_get(s, f"Host: {host}") == (200, b"hello\n")
        s.close()
        d = decision(p, count=n)
        if d["action"] == want or time.monotonic() > end:
            return d
        time.sleep(0.1)


def test_sighup_reloads_pattern_files(dumpproxy, pki, origin, tmp_path):
    port = origin.port
    f = tmp_path / "ignore.txt"
    f.write_text("# v1\n^example\\.com:\n")
    p = start(dumpproxy, pki, "--ignore-hosts-file", str(f), "--ignore-hosts", "^flag\\.test:")
    d = decide_until(p, port, "example.com", "passthrough", deadline=0)
    assert (d["action"], d["source"]) == ("passthrough", f"{f}:2")
    replace_atomically(f, "# v2\n\n^other\\.test:\n")
    p.proc.send_signal(signal.SIGHUP)
    d = decide_until(p, port, "example.com", "intercept")
    assert (d["action"], d["reason"], d["pattern"]) == ("intercept", "default", None)
    d = decide_until(p, port, "other.test", "passthrough", deadline=0)
    assert (d["action"], d["pattern"], d["source"]) == ("passthrough", r"^other\.test:",
                                                        f"{f}:3")
    # a bad file: an error event, the previous set stays in force
    replace_atomically(f, "ok\nfoo(\n")
    p.proc.send_signal(signal.SIGHUP)
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "reload"
    assert err["message"].startswith(f"{f}:2: invalid pattern 'foo('"), err["message"]
    assert "conn" not in err
    d = decide_until(p, port, "other.test", "passthrough", deadline=0)
    assert (d["action"], d["source"]) == ("passthrough", f"{f}:3")
    d = decide_until(p, port, "example.com", "intercept", deadline=0)
    assert d["action"] == "intercept"
    # an unreadable file: likewise
    f.unlink()
    p.proc.send_signal(signal.SIGHUP)
    err = p.wait_for(lambda e: e["event"] == "error", count=2)
    assert (err["stage"], f"{f}: cannot read" in err["message"]) == ("reload", True)
    assert decide_until(p, port, "other.test", "passthrough", deadline=0)["action"] == \
        "passthrough"
    assert p.proc.poll() is None
    assert p.stop() == 0


def test_sighup_right_after_listening_does_not_kill(dumpproxy, pki, tmp_path):
    f = tmp_path / "ignore.txt"
    f.write_text("a\n")
    p = start(dumpproxy, pki, "--ignore-hosts-file", str(f), hosts=None)
    p.proc.send_signal(signal.SIGHUP)  # as soon as the listening line is out
    time.sleep(0.3)
    assert p.proc.poll() is None, p.stderr
    assert p.stop() == 0


# --------------------------------------------------------------------------- --check


def check_rows(r: subprocess.CompletedProcess) -> list[dict]:
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    rows = parse_events(r.stdout)  # decision events, valid against the schema ...
    for row in rows:
        assert list(row) == ["ts", "event", *DECISION_KEYS[4:]]  # ... with no connection
        assert row["event"] == "decision" and abs(row["ts"] - time.time()) < 60
    return rows


def test_check_lines_validate_against_the_printed_schema(tmp_path):
    """The newcomer's reproduction: `dumpproxy --check a.b:443` through jsonschema with the
    schema `dumpproxy --schema` prints (not only the test suite's copy)."""
    import jsonschema

    schema = json.loads(run_cli("--schema").stdout)
    r = run_cli("--ignore-hosts", "^a", "--check", "a.b:443", "c.d:80", home=tmp_path / "h")
    for row in check_rows(r):
        jsonschema.validate(row, schema)
    # a decision of real traffic still carries its connection: only conn and client
    # together may be left out
    decision = schema["$defs"]["decision"]
    assert {"conn", "client"} <= set(decision["properties"])
    assert "ts" in decision["required"] and "conn" not in decision["required"]


def test_check_prints_decisions_without_network_or_ca(tmp_path):
    home = tmp_path / "home"
    f = tmp_path / "ignore.txt"
    f.write_text("# c\n^a\\.test:1$\n")
    # in a network namespace of its own: no network at all
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "dumpproxy", "--ignore-hosts-file", str(f),
         "--allow-hosts", r"\.test:", "--check", "a.test:1", "b.test:2", "c.example:3"],
        capture_output=True, cwd=ROOT, timeout=30, env=dict(os.environ, DUMPPROXY_HOME=str(home)))
    rows = check_rows(r)
    assert [{k: v for k, v in row.items() if k not in ("ts", "event")} for row in rows] == [
        expect("a.test:1", "passthrough", "ignore_hosts", r"^a\.test:1$", f"{f}:2", "a.test:1",
               ["a.test:1"], None),
        expect("b.test:2", "intercept", "allow_hosts", r"\.test:", "--allow-hosts", "b.test:2",
               ["b.test:2"], None),
        expect("c.example:3", "passthrough", "allow_hosts", None, None, None,
               ["c.example:3"], None),
    ]
    assert not home.exists()


def test_check_reads_targets_from_stdin(tmp_path):
    home = tmp_path / "home"
    r = run_cli("--ignore-hosts", "^a\\.", "--check", "-", home=home,
                stdin=b"a.test:1\n\n  b.test:2  \n")
    assert [(x["address"], x["action"]) for x in check_rows(r)] == [
        ("a.test:1", "passthrough"), ("b.test:2", "intercept")]
    assert not home.exists()


def test_check_ipv6_target_matches_both_forms(tmp_path):
    for pattern in (r"^2001:db8::1:443$", r"^\[2001:db8::1\]:443$"):
        r = run_cli("--ignore-hosts", pattern, "--check", "[2001:db8::1]:443",
                    home=tmp_path / "home")
        (row,) = check_rows(r)
        assert (row["action"], row["pattern"]) == ("passthrough", pattern), row


def test_check_rejects_a_target_without_port(tmp_path):
    r = run_cli("--check", "example.com", home=tmp_path / "home")
    assert r.returncode == 2
    assert "example.com" in one_error_line(r)


def test_pattern_for_prints_the_exact_pattern(tmp_path):
    home = tmp_path / "home"
    r = run_cli("--pattern-for", "my-host.example.com:443", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "^" + re.escape("my-host.example.com:443") + "$\n"
    pattern = r.stdout.decode().rstrip("\n")
    assert pattern == r"^my\-host\.example\.com:443$"
    assert re.search(pattern, "my-host.example.com:443", re.IGNORECASE)
    for other in ("myXhost.example.com:443", "my-hostXexample.com:443",
                  "www.my-host.example.com:443", "my-host.example.com:4430"):
        assert not re.search(pattern, other, re.IGNORECASE), other
    # and it works as a pattern
    r = run_cli("--ignore-hosts", pattern, "--check", "my-host.example.com:443",
                "myXhost.example.com:443", home=home)
    assert [x["action"] for x in check_rows(r)] == ["passthrough", "intercept"]
    assert not home.exists()
