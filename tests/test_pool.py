"""Upstream connections shared across client connections (SPEC §9.2), over real sockets:
an idle connection serves the next exchange to the same destination from another client,
without a new `server_connect`; never two exchanges at once; never one the origin closed;
bounded; the `server` numbers agree across events and in the HAR."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT, curl, parse_events


def get(p, url: str, *args: str) -> bytes:
    r = curl("-x", p.url, *args, url)
    assert r.returncode == 0, r.stderr
    return r.stdout


def disconnects(p, n: int) -> list[dict]:
    p.wait_for(lambda e: e["event"] == "client_disconnect", count=n)
    return p.of("client_disconnect")


def test_idle_connection_serves_the_next_client(dumpproxy, origin):
    p = dumpproxy()
    assert get(p, origin.url("/small")) == b"hello\n"
    disconnects(p, 1)
    assert get(p, origin.url("/small")) == b"hello\n"
    disconnects(p, 2)
    [sc] = p.of("server_connect")
    r1, r2 = p.of("response")
    assert r1["conn"] != r2["conn"]
    assert r1["server"] == r2["server"] == sc["server"]  # one upstream, two clients
    assert not p.of("server_disconnect")  # still in the pool
    assert p.stop() == 0
    [sd] = p.of("server_disconnect")
    assert (sd["server"], sd["how"], sd["conn"]) == (sc["server"], "shutdown", r2["conn"])
    assert len(origin.requests) == 2


def test_tls_tunnel_takes_the_pooled_connection_without_connecting(dumpproxy, tls_origin,
                                                                     pki):
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = str(p.home / "ca-cert.pem")
    url = tls_origin.url("/small", host="localhost")
    for n in (1, 2):
        assert get(p, url, "--http1.1", "--cacert", ca) == b"hello\n"
        disconnects(p, n)
    [sc] = p.of("server_connect")
    [server_tls] = p.of("tls", side="server")
    d1, d2 = p.of("decision")
    r1, r2 = p.of("response")
    assert r1["server"] == r2["server"] == sc["server"] == server_tls["server"]
    assert d2["conn"] == r2["conn"] != sc["conn"]
    # decided on the same candidates, the pooled connection's address among them
    assert d1["candidates"] == d2["candidates"] and sc["ip"] in d2["candidates"]
    assert not p.of("error")


def test_another_server_name_gets_its_own_connection(dumpproxy, tls_origin, pki):
    """The pool is keyed by the TLS server name: a tunnel to the same address under
    another name connects anew (and decides on the same candidates as ever)."""
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = str(p.home / "ca-cert.pem")
    get(p, tls_origin.url("/small", host="localhost"), "--http1.1", "--cacert", ca)
    disconnects(p, 1)
    get(p, tls_origin.url("/small", host="127.0.0.1"), "--http1.1", "--cacert", ca)
    disconnects(p, 2)
    connects = p.of("server_connect")
    assert len(connects) == 2
    assert [e["server"] for e in p.of("response")] == [c["server"] for c in connects]
    assert [e["sni"] for e in p.of("tls", side="server")] == ["localhost", None]


def test_connection_the_origin_closed_while_idle_is_never_handed_out(dumpproxy):
    """nginx-like: the origin closes a keep-alive connection after 0.2 s idle; the next
    client gets a fresh connection and its answer, no error."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
            time.sleep(0.2)
            conn.close()  # its keep-alive timeout

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        p = dumpproxy()
        url = f"http://127.0.0.1:{port}/"
        assert get(p, url) == b"yes"
        disconnects(p, 1)
        time.sleep(0.6)  # the origin has closed the pooled connection
        assert get(p, url) == b"yes"
        disconnects(p, 2)
    finally:
        server.close()
    c1, c2 = p.of("server_connect")
    r1, r2 = p.of("response")
    assert (r1["server"], r2["server"]) == (c1["server"], c2["server"])
    [gone] = p.of("server_disconnect")
    assert (gone["server"], gone["how"]) == (c1["server"], "peer_closed")
    assert not p.of("error") and len(accepted) == 2


def test_no_two_exchanges_share_a_connection_at_once(dumpproxy, origin):
    p = dumpproxy()
    slow = [subprocess.Popen(["curl", "-sS", "-x", p.url, origin.url("/slow?n=3")],
                             stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
            for _ in range(2)]
    assert [c.communicate(timeout=20)[0] for c in slow] == [b"xxx", b"xxx"]
    disconnects(p, 2)
    assert get(p, origin.url("/small")) == b"hello\n"  # either idle one serves it
    disconnects(p, 3)
    connects = {e["server"] for e in p.of("server_connect")}
    r1, r2, r3 = sorted(p.of("response"), key=lambda e: e["flow"])
    assert len(connects) == 2 and {r1["server"], r2["server"]} == connects
    assert r3["server"] in connects


def test_idle_connections_are_bounded_per_destination(dumpproxy, origin):
    """Ten exchanges at once to one destination: ten connections; once idle, eight are
    kept (the pool's limit per destination), the other two closed at once."""
    p = dumpproxy()
    slow = [subprocess.Popen(["curl", "-sS", "-x", p.url, origin.url("/slow?n=3")],
                             stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
            for _ in range(10)]
    assert [c.communicate(timeout=30)[0] for c in slow] == [b"xxx"] * 10
    disconnects(p, 10)
    p.wait_for(lambda e: e["event"] == "server_disconnect", count=2)
    time.sleep(0.3)
    assert len(p.of("server_connect")) == 10
    assert [e["how"] for e in p.of("server_disconnect")] == ["proxy_closed"] * 2
    assert p.stop() == 0
    assert [e["how"] for e in p.of("server_disconnect")][2:] == ["shutdown"] * 8


def test_server_numbers_agree_across_events_and_har(dumpproxy, origin, origin2, tmp_path):
    out = tmp_path / "cap.jsonl"
    p = dumpproxy()
    for url in (origin.url("/small"), origin2.url("/small"), origin.url("/echo")):
        assert get(p, url)
    disconnects(p, 3)
    assert p.stop() == 0
    out.write_text("".join(p.lines))
    events = parse_events(out.read_text())
    connects = {e["server"]: e["address"] for e in events if e["event"] == "server_connect"}
    ends = {e["server"]: e["address"] for e in events if e["event"] == "server_disconnect"}
    assert connects == ends and sorted(connects) == [1, 2]
    responses = [e for e in events if e["event"] == "response"]
    assert [connects[e["server"]] for e in responses] == [
        f"127.0.0.1:{origin.port}", f"127.0.0.1:{origin2.port}", f"127.0.0.1:{origin.port}"]
    har = subprocess.run([sys.executable, "-m", "dumpproxy", "har", str(out)], cwd=ROOT,
                         capture_output=True, timeout=30)
    assert har.returncode == 0, har.stderr
    entries = json.loads(har.stdout)["log"]["entries"]
    assert [e["connection"] for e in entries] == [str(e["server"]) for e in responses]


def test_pool_idle_timeout_zero_keeps_none(dumpproxy, origin):
    p = dumpproxy("--pool-idle-timeout", "0")
    for n in (1, 2):
        assert get(p, origin.url("/small")) == b"hello\n"
        disconnects(p, n)
    c1, c2 = p.of("server_connect")
    assert [e["server"] for e in p.of("response")] == [c1["server"], c2["server"]]
    assert [e["server"] for e in p.of("server_disconnect")] == [1, 2]  # closed with each


def test_idle_connection_closes_after_the_pool_idle_timeout(dumpproxy, origin):
    p = dumpproxy("--pool-idle-timeout", "0.5")
    assert get(p, origin.url("/small")) == b"hello\n"
    disconnects(p, 1)
    sd = p.wait_for(lambda e: e["event"] == "server_disconnect", timeout=5)
    assert sd["how"] == "idle_timeout"


def test_a_tunnel_never_takes_a_pooled_connection_before_it_knows_the_protocol(
        dumpproxy, origin):
    """Plain HTTP inside a tunnel leaves its connection idle in the pool; a tunnel to the
    same destination whose bytes are passed through gets a connection of its own (raw
    bytes on a pooled HTTP connection would land mid-stream)."""
    p = dumpproxy("--ignore-hosts", r"^ignored\.test:")
    target = f"127.0.0.1:{origin.port}"
    for n, host in ((1, "recorded.test"), (2, "ignored.test")):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                  .encode())
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        s.close()
        assert got.endswith(b"hello\n")
        disconnects(p, n)
    recorded, ignored = p.of("decision")
    assert (recorded["action"], ignored["action"]) == ("intercept", "passthrough")
    first, second = p.of("server_connect")  # the passed-through tunnel's own connection
    assert (first["conn"], second["conn"]) == (recorded["conn"], ignored["conn"])


def test_a_lazy_tunnel_left_before_its_first_byte_makes_no_connection(dumpproxy, origin):
    """A CONNECT answered without connecting (the pool holds a connection to it) whose
    client leaves before sending a byte (a dial its HTTP client no longer needed) costs no
    connection to the destination; one that stays silent is still relayed at the head
    timeout (a server-first protocol may speak first)."""
    p = dumpproxy("--head-timeout", "1")
    assert get(p, origin.url("/small")) == b"hello\n"  # leaves a connection in the pool
    disconnects(p, 1)
    target = f"127.0.0.1:{origin.port}"
    for n in (2, 3, 4):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert s.recv(4096) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        s.close()
        disconnects(p, n)
    assert len(p.of("server_connect")) == 1  # the first request's, nothing since
    assert len(p.of("decision")) == 4  # each tunnel still has its decision
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    p.wait_for(lambda e: e["event"] == "server_connect", count=2)  # silent: relayed
    s.close()
    disconnects(p, 5)
    assert not p.of("error", stage="http")
