"""Reverse mode with real clients: curl over plain HTTP and TLS (HTTP/1.1 and HTTP/2) on one
listener, Host rewritten to the target's, an ignored target relayed raw. Loopback only."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess

import test_http2
from conftest import curl

h2_origin = test_http2.h2_origin  # the same fixture: an HTTPS origin that speaks h2


def reverse(dumpproxy, pki, target: str, *args: str):
    p = dumpproxy("--mode", f"reverse:{target}", "--upstream-ca", str(pki.ca_path), *args)
    assert p.events[0]["mode"] == f"reverse:{target}"
    p.ca = p.events[0]["ca_cert"]
    return p


def test_plain_http_to_http_target(dumpproxy, origin, pki):
    p = reverse(dumpproxy, pki, f"http://127.0.0.1:{origin.port}")
    r = curl(f"http://127.0.0.1:{p.port}/echo?x=1", "-H", "Host: my.service.test")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Host"] == f"127.0.0.1:{origin.port}"
    sc = p.wait_for(lambda e: e["event"] == "server_connect")
    assert sc["address"] == f"127.0.0.1:{origin.port}"
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert d["action"] == "intercept" and d["candidates"] == [f"127.0.0.1:{origin.port}"]
    resp = p.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == f"http://127.0.0.1:{origin.port}/echo?x=1" and resp["status"] == 200
    req = p.of("request")[0]
    assert req["headers"]["host"] == "my.service.test"  # as the client sent it
    assert not p.of("tls")


def test_tls_and_plain_clients_to_https_target_http1(dumpproxy, tls_origin, pki):
    target = f"https://localhost:{tls_origin.port}"
    p = reverse(dumpproxy, pki, target, "--ignore-hosts", "^nothing-matches$")
    r = curl("--cacert", p.ca, "--http1.1", f"https://localhost:{p.port}/echo")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Host"] == f"localhost:{tls_origin.port}"
    r = curl(f"http://127.0.0.1:{p.port}/echo")  # plain client, TLS to the target
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headers"]["Host"] == f"localhost:{tls_origin.port}"
    p.wait_for(lambda e: e["event"] == "response", count=2)
    decisions = p.of("decision")
    assert [d["sni"] for d in decisions] == ["localhost", None]
    port = tls_origin.port
    # the SNI is a candidate with the target's port (here the same as the target)
    assert decisions[0]["candidates"] == [f"127.0.0.1:{port}", f"localhost:{port}"]
    tls = [(e["side"], e["sni"], e["alpn"]) for e in p.of("tls")]
    # (this origin does no ALPN); the plain client's request went on the TLS connection
    # the first client left in the pool (same name, same ALPN offer: http/1.1)
    assert tls == [("server", "localhost", None), ("client", "localhost", "http/1.1")]
    assert [e["url"] for e in p.of("response")] == [f"{target}/echo"] * 2
    assert len({e["server"] for e in p.of("response")}) == 1
    assert not p.of("error")


def test_tls_client_http2_to_h2_target(dumpproxy, h2_origin, pki):
    target = f"https://localhost:{h2_origin.port}"
    p = reverse(dumpproxy, pki, target)
    r = curl("--cacert", p.ca, "--http2", "-H", "Host: front.test",
             f"https://localhost:{p.port}/echo")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["http_version"] == "2"
    headers = dict((k.lower(), v) for k, v in info["headers"])
    assert headers.get("host", headers.get(":authority")) == f"localhost:{h2_origin.port}"
    resp = p.wait_for(lambda e: e["event"] == "response")
    assert resp["http_version"] == "HTTP/2.0" and resp["url"] == f"{target}/echo"
    assert {(e["side"], e["alpn"]) for e in p.of("tls")} == {("client", "h2"),
                                                             ("server", "h2")}
    client_tls = [e for e in p.of("tls") if e["side"] == "client"][0]
    assert client_tls["sni"] == "localhost"


def test_client_without_sni_gets_a_certificate_for_the_target(dumpproxy, tls_origin, pki):
    p = reverse(dumpproxy, pki, f"https://localhost:{tls_origin.port}")
    ctx = ssl.create_default_context(cafile=p.ca)
    ctx.check_hostname = False  # no SNI is sent, and the name is checked below
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            cert = tls.getpeercert()
            tls.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
    assert cert["subjectAltName"] == (("DNS", "localhost"),)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello\n")


def test_ignored_target_is_relayed_raw(dumpproxy, tls_origin, pki):
    port = tls_origin.port
    p = reverse(dumpproxy, pki, f"https://localhost:{port}", "--ignore-hosts",
                rf"^localhost:{port}$")
    # the origin's own certificate reaches the client: trust the origin's CA only
    r = curl("--cacert", str(pki.ca_path), f"https://127.0.0.1:{p.port}/small")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert d["action"] == "passthrough" and d["matched"] == f"localhost:{port}"
    p.wait_for(lambda e: e["event"] == "server_disconnect")
    assert not p.of("tls") and not p.of("request") and not p.of("error")


def test_unreachable_target_gives_502_to_plain_clients(dumpproxy, pki, refused_port):
    dead = refused_port
    p = reverse(dumpproxy, pki, f"http://127.0.0.1:{dead}")
    r = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p.port}/")
    assert r.stdout == b"502"
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "server_connect" and err["address"] == f"127.0.0.1:{dead}"


# --- plaintext clients of a TLS target: spoken to as HTTP, never relayed raw into TLS --------


def test_h2c_client_to_https_target_is_bridged_over_tls(dumpproxy, h2_origin, pki):
    """curl --http2-prior-knowledge in plaintext: HTTP/2 over TLS to the target."""
    target = f"https://localhost:{h2_origin.port}"
    p = reverse(dumpproxy, pki, target)
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/echo?x=1")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["http_version"] == "2" and info["query"] == "x=1"
    resp = p.wait_for(lambda e: e["event"] == "response")
    assert (resp["url"], resp["http_version"], resp["status"]) == (
        f"{target}/echo?x=1", "HTTP/2.0", 200)
    [server_tls] = p.of("tls", side="server")
    assert server_tls["alpn"] == "h2"
    assert not p.of("error")


def test_h2load_in_plaintext_against_a_tls_target(dumpproxy, h2_origin, pki):
    """nghttp2's h2load without TLS (h2c prior knowledge), two connections, many
    streams: every request answered and recorded."""
    p = reverse(dumpproxy, pki, f"https://localhost:{h2_origin.port}")
    r = subprocess.run(["h2load", "-n", "60", "-c", "2", "-m", "10",
                        f"http://127.0.0.1:{p.port}/small"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "60 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 60 2xx" in out, out
    p.wait_for(lambda e: e["event"] == "response", count=60)
    assert {e["status"] for e in p.of("response")} == {200}
    assert not p.of("error")


def test_h2c_client_to_a_target_without_http2_is_refused(dumpproxy, tls_origin, pki):
    """The target speaks HTTP/1 only: an HTTP/2 client cannot be served there; it gets
    GOAWAY HTTP_1_1_REQUIRED and an error says why."""
    p = reverse(dumpproxy, pki, f"https://localhost:{tls_origin.port}")
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/small")
    assert r.returncode != 0
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "http2" and "does not speak HTTP/2" in err["message"]
    # a plain HTTP/1 client on the same listener is served
    r = curl(f"http://127.0.0.1:{p.port}/small")
    assert r.returncode == 0 and r.stdout == b"hello\n"


def test_other_plaintext_to_a_tls_target_is_refused_never_relayed(dumpproxy, tls_origin, pki):
    p = reverse(dumpproxy, pki, f"https://localhost:{tls_origin.port}")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"\x00\x01not http at all\r\n\r\n")
        assert s.recv(4096) == b""  # closed
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "http" and "speaks TLS" in err["message"]
    assert not tls_origin.requests
    assert not p.of("server_connect") or all(  # nothing relayed into the TLS port
        e["bytes_sent"] == 0 for e in p.of("server_disconnect"))
