"""Proxy authentication, bad peers affecting only themselves, and no descriptor leaks."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

from conftest import curl


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_proxyauth_required_and_never_forwarded(dumpproxy, origin):
    p = dumpproxy("--proxyauth", "alice:s3cret")
    r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}", origin.url("/echo"))
    assert r.stdout == b"407"
    err = p.wait_for(lambda e: e["event"] == "error" and e["stage"] == "auth")
    assert err["message"] == "proxy authentication required: no credentials sent"

    # a wrong password: the error names the user (as SOCKS5 does), never the password
    r = curl("-x", p.url, "-U", "alice:wr0ng", "-o", "/dev/null", "-w", "%{http_code}",
             origin.url("/echo"))
    assert r.stdout == b"407"
    err = p.wait_for(lambda e: e["event"] == "error" and e["stage"] == "auth", count=2)
    assert err["message"] == "proxy authentication failed for user 'alice'"
    # credentials that are not Basic, or not user:pass, are not echoed (may be a token)
    for header in ("Bearer SECRET-TOKEN", "Basic " + base64.b64encode(b"SECRET").decode()):
        r = curl("-x", p.url, "-H", f"Proxy-Authorization: {header}", "-o", "/dev/null",
                 "-w", "%{http_code}", origin.url("/echo"))
        assert r.stdout == b"407"
    p.wait_for(lambda e: e["event"] == "error" and e["stage"] == "auth", count=4)
    errs = p.of("error", stage="auth")
    assert [e["message"] for e in errs[2:]] == [
        "proxy authentication failed: credentials are not HTTP Basic",
        "proxy authentication failed: malformed Basic credentials"]

    r = curl("-x", p.url, "-U", "alice:s3cret", origin.url("/echo"))
    seen = json.loads(r.stdout)
    assert seen["path"] == "/echo"
    assert not any(k.lower() == "proxy-authorization" for k in seen["headers"])
    # every request is in the record: the refused ones with their 407
    reqs = p.wait_for(lambda e: e["event"] == "request", count=5) and p.of("request")
    assert "proxy-authorization" not in reqs[0]["headers"]
    assert [r["headers"]["proxy-authorization"] for r in reqs[1:]] == [
        "Basic <redacted>", "Bearer <redacted>", "Basic <redacted>", "Basic <redacted>"]
    statuses = p.wait_for(lambda e: e["event"] == "response", count=5) and p.of("response")
    assert [e["status"] for e in statuses] == [407, 407, 407, 407, 200]
    assert not any("wr0ng" in line or "SECRET" in line for line in p.lines)


def test_proxyauth_on_connect(dumpproxy, tls_origin, pki):
    p = dumpproxy("--proxyauth", "bob:pw", "--upstream-ca", str(pki.ca_path))
    ca = str(p.home / "ca-cert.pem")
    r = curl("-x", p.url, "--cacert", ca, tls_origin.url("/small", "localhost"))
    assert r.returncode != 0  # CONNECT refused with 407
    assert b"407" in r.stderr
    r = curl("-x", p.url, "-U", "bob:wrong-pw", "--cacert", ca,
             tls_origin.url("/small", "localhost"))
    assert r.returncode != 0 and b"407" in r.stderr
    r = curl("-x", p.url, "-U", "bob:pw", "--cacert", ca, tls_origin.url("/small", "localhost"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    p.wait_for(lambda e: e["event"] == "response")
    assert [e["message"] for e in p.of("error", stage="auth")] == [
        "proxy authentication required: no credentials sent",
        "proxy authentication failed for user 'bob'"]
    assert not any("wrong-pw" in line for line in p.lines)


def test_bad_peers_leave_no_descriptors_behind(dumpproxy, origin):
    p = dumpproxy()
    pid = p.proc.pid
    # warm up: one good exchange, so lazily opened files (CA, leaf dir) exist
    assert curl("-x", p.url, origin.url("/small")).stdout == b"hello\n"
    time.sleep(0.2)
    before = _fd_count(pid)
    for shape in (
        b"GARBAGE\r\n\r\n",
        b"GET http://127.0.0.1:%d/small HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % origin.port,
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n\x16\x03\x01\x00\x05\x00\x00\x00\x00\x00"
        % origin.port,
        b"CONNECT nowhere HTTP/1.1\r\n\r\n",
        b"GET http://127.0.0.1:%d/slow?n=30 HTTP/1.1\r\nHost: x\r\n\r\n" % origin.port,
    ):
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", p.port))
            s.sendall(shape)
            s.settimeout(2)
            try:
                s.recv(100)
            except OSError:
                pass
            s.close()  # mid-exchange for the slow one
    # an abrupt reset (RST) mid-request
    s = socket.create_connection(("127.0.0.1", p.port))
    s.sendall(b"GET http://127.0.0.1:%d/small HTTP/1.1\r\n" % origin.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    # the proxy still serves, and every descriptor came back
    assert curl("-x", p.url, origin.url("/small")).stdout == b"hello\n"
    deadline = time.monotonic() + 10
    while _fd_count(pid) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fd_count(pid) <= before
    p.stop()
    assert p.events[-1]["event"] == "shutdown"
    assert b"Traceback" not in p.stderr


def _rss_now_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _tls_connections(proxy_port: int, origin_port: int, ca: str, n: int) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", proxy_port))
        s.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % origin_port)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1000)
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while t.recv(65536):
                pass


def test_intercepted_tls_connections_do_not_grow_memory(dumpproxy, tls_origin, pki):
    """Each intercepted connection must give all its memory back (a per-connection leak of
    a few KiB, e.g. from reading SSLObject.session, shows as megabytes here)."""
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = str(p.home / "ca-cert.pem")
    _tls_connections(p.port, tls_origin.port, ca, 150)  # warm-up: caches, allocator pools
    before = _rss_now_kb(p.proc.pid)
    _tls_connections(p.port, tls_origin.port, ca, 600)
    grown = _rss_now_kb(p.proc.pid) - before
    assert grown < 2048, f"RSS grew by {grown} KiB over 600 intercepted TLS connections"
    p.wait_for(lambda e: e["event"] == "response", count=750)  # every exchange recorded


def test_malformed_credential_line_is_not_echoed_into_events(dumpproxy, origin):
    """h11 quotes the offending line; with redaction on, the event must not carry it."""
    p = dumpproxy()
    s = socket.create_connection(("127.0.0.1", p.port))
    s.sendall(b"GET http://127.0.0.1:%d/small HTTP/1.1\r\nHost: x\r\n"
              b"Authorization : Bearer SECRET-TOKEN\r\n\r\n" % origin.port)
    s.settimeout(5)
    assert s.recv(100).startswith(b"HTTP/1.1 400 Bad Request")
    s.close()
    err = p.wait_for(lambda e: e["event"] == "error" and e["stage"] == "http")
    assert "illegal header line" in err["message"]
    p.stop()
    assert not any("SECRET-TOKEN" in line for line in p.lines)
