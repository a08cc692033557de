"""TLS to the proxy itself (secure web proxy, curl -x https://), several listeners at once,
proxy authentication on each. Loopback only."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from conftest import curl
from test_cli_docs import CHECKOUT, MODES, SHELLS, complete, names


def listening(p, count: int) -> list[dict]:
    p.wait_for(lambda e: e["event"] == "listening", count=count)
    return p.of("listening")


def test_secure_web_proxy_https_and_plain(dumpproxy, tls_origin, origin, pki):
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = p.events[0]["ca_cert"]
    url = tls_origin.url("/small", host="localhost")
    r = curl("-x", f"https://127.0.0.1:{p.port}", "--proxy-cacert", ca, "--cacert", ca, url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    # by name: the certificate is for the name the client asked for (SNI)
    r = curl("-x", f"https://localhost:{p.port}", "--proxy-cacert", ca, origin.url())
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    p.wait_for(lambda e: e["event"] == "response", count=2)
    tls = p.of("tls")
    proxy_tls = [e for e in tls if e["address"] == f"127.0.0.1:{p.port}"]
    assert [(e["side"], e["sni"]) for e in proxy_tls] == [("client", None),
                                                          ("client", "localhost")]
    assert {(e["side"], e["address"]) for e in tls if e not in proxy_tls} == {
        ("client", f"localhost:{tls_origin.port}"), ("server", f"localhost:{tls_origin.port}")}
    d = p.of("decision")
    assert [x["address"] for x in d] == [f"localhost:{tls_origin.port}",
                                         f"127.0.0.1:{origin.port}"]
    assert [e["url"] for e in p.of("response")] == [url, origin.url()]
    assert not p.of("error")


def test_secure_web_proxy_client_distrusting_the_ca(dumpproxy, origin):
    p = dumpproxy()
    r = curl("-x", f"https://127.0.0.1:{p.port}", origin.url())  # no --proxy-cacert
    assert r.returncode != 0
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls"
    assert "secure web proxy" in err["message"] and "--print-ca" in err["message"]
    assert not origin.requests


# --- spare connections to the secure web proxy (browsers open them, then drop them) ------


def proxy_tls_drop_mid_handshake(port: int) -> None:
    """TLS to the proxy itself: ClientHello, read the proxy's flight, close without an
    alert (a browser's spare connection; also how Node rejects a certificate)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing,
                                                server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    sock.sendall(outgoing.read())
    assert sock.recv(65536)  # the proxy's flight, with its certificate
    sock.close()


def proxy_tls_unused(port: int, ca: str) -> None:
    """A complete handshake with the proxy, then close without a request."""
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=15),
                         server_hostname="127.0.0.1"):
        pass


def settled(p, connections: int) -> list[dict]:
    p.wait_for(lambda e: e["event"] == "client_disconnect", count=connections, timeout=20)
    time.sleep(1.5)  # past the sibling wait: an error would be written by now
    return p.events


def through_secure_proxy(p, ca: str, url: str) -> None:
    r = curl("-x", f"https://127.0.0.1:{p.port}", "--proxy-cacert", ca, url)
    assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr


def test_secure_web_proxy_spare_dropped_beside_a_working_connection_is_no_error(
        dumpproxy, origin):
    p = dumpproxy()
    ca = p.events[0]["ca_cert"]
    through_secure_proxy(p, ca, origin.url())  # a sibling that trusted the CA
    for _ in range(3):
        proxy_tls_drop_mid_handshake(p.port)
    proxy_tls_unused(p.port, ca)  # and one never used
    events = settled(p, connections=5)
    assert not [e for e in events if e["event"] == "error"]
    assert [e["status"] for e in events if e["event"] == "response"] == [200]


def test_secure_web_proxy_lone_drop_mid_handshake_gets_the_hint(dumpproxy):
    p = dumpproxy()
    proxy_tls_drop_mid_handshake(p.port)
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls" and err["address"] == f"127.0.0.1:{p.port}"
    assert err["message"].startswith("secure web proxy: ") and "--print-ca" in err["message"]


def test_secure_web_proxy_lone_unused_connection_gets_the_hint(dumpproxy):
    p = dumpproxy()
    proxy_tls_unused(p.port, p.events[0]["ca_cert"])
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls"
    assert err["message"].startswith("secure web proxy: the client closed the connection "
                                     "right after the TLS handshake"), err


def test_basic_auth_on_secure_web_proxy(dumpproxy, origin):
    p = dumpproxy("--proxyauth", "bob:pa55word")
    ca = p.events[0]["ca_cert"]
    ok = curl("-x", f"https://bob:pa55word@127.0.0.1:{p.port}", "--proxy-cacert", ca,
              origin.url("/echo"))
    assert ok.returncode == 0, ok.stderr
    assert b"proxy-authorization" not in ok.stdout.lower()  # never forwarded
    bad = curl("-x", f"https://bob:guessed@127.0.0.1:{p.port}", "--proxy-cacert", ca,
               "-o", "/dev/null", "-w", "%{http_code}", origin.url())
    assert bad.stdout == b"407"
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "auth"
    p.stop()
    assert "guessed" not in "".join(p.lines) and "pa55word" not in "".join(p.lines)
    assert len(origin.requests) == 1


def test_several_modes_share_ca_filter_and_output(dumpproxy, origin, origin2):
    ignore = rf"^127\.0\.0\.1:{origin2.port}$"
    p = dumpproxy("--mode", "regular@0", "--mode", "socks5@127.0.0.1:0",
                  "--ignore-hosts", ignore)
    lst = listening(p, 2)
    assert [e["mode"] for e in lst] == ["regular", "socks5"]
    assert len({e["address"] for e in lst}) == 2 and len({e["ca_cert"] for e in lst}) == 1
    regular, socks = (e["address"] for e in lst)
    for args in (["-x", f"http://{regular}"], ["--proxy", f"socks5h://{socks}"]):
        for o in (origin, origin2):
            r = curl(*args, o.url())
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"hello\n"
    p.wait_for(lambda e: e["event"] == "decision", count=4)
    assert [(d["address"], d["action"]) for d in p.of("decision")] == [
        (f"127.0.0.1:{origin.port}", "intercept"), (f"127.0.0.1:{origin2.port}", "passthrough")
    ] * 2
    assert len(p.of("response")) == 2
    assert p.stop() == 0
    assert p.events[-1]["event"] == "shutdown" and p.events[-1]["connections"] == 4


def test_listen_port_in_use_names_the_mode(dumpproxy, home):
    p = dumpproxy("--mode", "socks5@0")
    busy = p.port
    from conftest import run_cli

    r = run_cli("--mode", "regular@0", "--mode", f"socks5@{busy}", "-q", home=home)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"cannot listen on 127.0.0.1:{busy} (--mode socks5)" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- completions: --mode is repeatable and takes a listen suffix ---------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_completion_offers_modes_again(shell, tmp_path):
    again = names(complete(CHECKOUT, shell, "dumpproxy --mode socks5@1080 --mode ", tmp_path))
    assert MODES <= again, again
