"""SOCKS5 mode with real clients: curl --proxy socks5h:// and --socks5, a raw socket for the
reply codes. Loopback only."""

from __future__ import annotations

import socket

import pytest
from conftest import Origin, curl

from dumpproxy import socks5


def socks_proxy(dumpproxy, *args, **kw):
    p = dumpproxy("--mode", "socks5", *args, **kw)
    assert p.events[0]["mode"] == "socks5"
    return p


def ca(p) -> str:
    return p.events[0]["ca_cert"]


def test_socks5h_intercepts_https_with_domain_name(dumpproxy, tls_origin, pki):
    p = socks_proxy(dumpproxy, "--upstream-ca", str(pki.ca_path))
    url = tls_origin.url("/small", host="localhost")
    r = curl("--proxy", f"socks5h://127.0.0.1:{p.port}", "--cacert", ca(p), url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    port = tls_origin.port
    sc = p.wait_for(lambda e: e["event"] == "server_connect")
    assert sc["address"] == f"localhost:{port}" and sc["ip"] == f"127.0.0.1:{port}"
    assert "via" not in sc
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert d["action"] == "intercept" and d["address"] == f"localhost:{port}"
    assert d["candidates"] == [f"127.0.0.1:{port}", f"localhost:{port}"]
    assert d["sni"] == "localhost"  # what the client sent, patterns or not
    resp = p.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == url and resp["status"] == 200
    sides = {e["side"] for e in p.of("tls")}
    assert sides == {"client", "server"}
    assert not p.of("error")


def test_socks5_local_resolution_ipv4_passthrough_by_pattern(dumpproxy, tls_origin, pki):
    port = tls_origin.port
    p = socks_proxy(dumpproxy, "--ignore-hosts", rf"^127\.0\.0\.1:{port}$")
    # curl resolves the name itself and sends an IPv4 address; the origin's own
    # certificate reaches curl untouched
    r = curl("--socks5", f"127.0.0.1:{p.port}", "--cacert", str(pki.ca_path),
             tls_origin.url("/small", host="localhost"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert d["action"] == "passthrough" and d["reason"] == "ignore_hosts"
    assert d["address"] == f"127.0.0.1:{port}"
    assert d["matched"] == f"127.0.0.1:{port}" and d["sni"] == "localhost"
    assert d["candidates"] == [f"127.0.0.1:{port}", f"localhost:{port}"]
    sd = p.wait_for(lambda e: e["event"] == "server_disconnect")
    assert sd["bytes_received"] > 0 and sd["bytes_sent"] > 0
    assert not p.of("request") and not p.of("tls") and not p.of("error")


def test_socks5_ipv6_destination_plain_http(dumpproxy):
    try:
        o6 = Origin(host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback on this machine: {e}")
    try:
        p = socks_proxy(dumpproxy)
        r = curl("--socks5", f"127.0.0.1:{p.port}", o6.url("/small", host="[::1]"))
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"hello\n"
        d = p.wait_for(lambda e: e["event"] == "decision")
        assert d["address"] == f"[::1]:{o6.port}"
        assert d["candidates"] == [f"[::1]:{o6.port}", f"::1:{o6.port}"]
        resp = p.wait_for(lambda e: e["event"] == "response")
        assert resp["url"] == f"http://[::1]:{o6.port}/small"
    finally:
        o6.close()


def test_socks5_user_pass(dumpproxy, origin):
    p = socks_proxy(dumpproxy, "--proxyauth", "alice:s3cret")
    good = curl("--proxy", f"socks5h://alice:s3cret@127.0.0.1:{p.port}", origin.url())
    assert good.returncode == 0, good.stderr
    assert good.stdout == b"hello\n"
    bad = curl("--proxy", f"socks5h://alice:wrong-pw@127.0.0.1:{p.port}", origin.url())
    assert bad.returncode != 0
    none = curl("--proxy", f"socks5h://127.0.0.1:{p.port}", origin.url())
    assert none.returncode != 0
    errors = p.wait_for(lambda e: e["event"] == "error", count=2) and p.of("error")
    assert [e["stage"] for e in errors] == ["auth", "auth"]
    assert "alice" in errors[0]["message"] and "authentication failed" in errors[0]["message"]
    assert "offers no username/password" in errors[1]["message"]
    p.stop()
    assert b"wrong-pw" not in "".join(p.lines).encode() and b"s3cret" not in p.stderr
    assert len(p.of("response")) == 1 and len(origin.requests) == 1


def _raw(port: int, *messages: bytes) -> bytes:
    """Send the messages (one after each answer) and return everything the proxy said."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        for m in messages:
            s.sendall(m)
            got += s.recv(4096)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(4096):
            got += chunk
        return got


HELLO = b"\x05\x01\x00"


@pytest.mark.parametrize("command", [socks5.BIND, socks5.UDP_ASSOCIATE])
def test_bind_and_udp_associate_are_command_not_supported(dumpproxy, command):
    p = socks_proxy(dumpproxy)
    got = _raw(p.port, HELLO, socks5.encode_request(command, "127.0.0.1", 9))
    assert got[:2] == b"\x05\x00"
    assert got[2:4] == b"\x05\x07"
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "socks5" and "not supported" in err["message"]
    assert not p.of("server_connect")


def test_reply_codes_for_refused_unknown_name_and_bad_address_type(dumpproxy, refused_port):
    p = socks_proxy(dumpproxy, hosts={})  # a private resolver: unknown names fail at once
    closed = refused_port
    got = _raw(p.port, HELLO, socks5.encode_request(socks5.CONNECT, "127.0.0.1", closed))
    assert got[2:4] == bytes((5, socks5.CONNECTION_REFUSED))
    got = _raw(p.port, HELLO, socks5.encode_request(socks5.CONNECT, "no-such-host.test", 80))
    assert got[2:4] == bytes((5, socks5.HOST_UNREACHABLE))
    got = _raw(p.port, HELLO, b"\x05\x01\x00\x09" + b"\x00" * 6)
    assert got[2:4] == bytes((5, socks5.ADDRESS_TYPE_NOT_SUPPORTED))
    p.wait_for(lambda e: e["event"] == "error", count=3)
    stages = [e["stage"] for e in p.of("error")]
    assert stages == ["server_connect", "server_connect", "socks5"]
    assert p.of("error")[0]["address"] == f"127.0.0.1:{closed}"
    assert "no-such-host.test" in p.of("error")[1]["message"]


def test_not_socks5_is_an_error_and_a_silent_client_is_not(dumpproxy):
    p = socks_proxy(dumpproxy)
    got = _raw(p.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == b""
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "socks5" and "not a SOCKS5 greeting" in err["message"]
    with socket.create_connection(("127.0.0.1", p.port)):
        pass  # connect and leave: a port probe is not an error
    # an error would come before that connection's client_disconnect
    p.wait_for(lambda e: e["event"] == "client_disconnect", count=2)
    assert len(p.of("error")) == 1
