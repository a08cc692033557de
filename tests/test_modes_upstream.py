"""Upstream mode with real clients: curl → dumpproxy → dumpproxy (secure web proxy) →
tinyproxy → origin, a failing upstream proxy, credentials. Loopback only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import curl, free_port, stop_process

TP_USER, TP_PASS = "tpuser", "tp-secret"


class Tinyproxy:
    def __init__(self, workdir: Path, user: str | None = TP_USER, password: str = TP_PASS):
        self.port = free_port()
        conf = workdir / f"tinyproxy-{self.port}.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "MaxClients 20",
                 "Allow 127.0.0.1", "DisableViaHeader Yes", "LogLevel Info"]
        if user:
            lines.append(f"BasicAuth {user} {password}")
        conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / f"tinyproxy-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "tinyproxy did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def tinyproxy(tmp_path) -> Iterator[Tinyproxy]:
    if shutil.which("tinyproxy") is None:
        pytest.fail("tinyproxy is not installed (.ci/run installs it)")
    t = Tinyproxy(tmp_path)
    yield t
    t.stop()


def bundle(tmp_path: Path, *paths) -> str:
    out = tmp_path / "upstream-bundle.pem"
    out.write_bytes(b"".join(Path(p).read_bytes() for p in paths))
    return str(out)


def test_chain_dumpproxy_dumpproxy_tinyproxy(dumpproxy, tinyproxy, origin, tls_origin, pki,
                                             tmp_path):
    """A intercepts and sends everything through B (over TLS: B is a secure web proxy),
    B passes everything through to tinyproxy (with credentials from its URL)."""
    b = dumpproxy("--mode", f"upstream:http://{TP_USER}:{TP_PASS}@127.0.0.1:{tinyproxy.port}",
                  "--ignore-hosts", "^")
    ca = b.events[0]["ca_cert"]  # both share one CA dir (one home per test)
    assert b.events[0]["mode"] == f"upstream:http://<redacted>@127.0.0.1:{tinyproxy.port}"
    a = dumpproxy("--mode", f"upstream:https://127.0.0.1:{b.port}",
                  "--upstream-ca", bundle(tmp_path, ca, pki.ca_path), "--proxyauth", "cli:pw")
    assert a.events[0]["mode"] == f"upstream:https://127.0.0.1:{b.port}"

    # HTTPS: CONNECT through B and tinyproxy, intercepted by A
    url = tls_origin.url("/echo", host="localhost")
    r = curl("-x", f"http://cli:pw@127.0.0.1:{a.port}", "--cacert", ca, url)
    assert r.returncode == 0, r.stderr + tinyproxy.log.read_bytes()
    assert b'"path": "/echo"' in r.stdout
    # plain HTTP: absolute form to B, then to tinyproxy
    r = curl("-x", f"http://cli:pw@127.0.0.1:{a.port}", origin.url("/echo"))
    assert r.returncode == 0, r.stderr
    assert b'"path": "/echo"' in r.stdout

    tport, pport = tls_origin.port, origin.port
    a.wait_for(lambda e: e["event"] == "response", count=2)
    a_sc = a.of("server_connect")
    assert [(e["address"], e["ip"], e["via"]) for e in a_sc] == [
        (f"localhost:{tport}", f"127.0.0.1:{b.port}", f"https://127.0.0.1:{b.port}"),
        (f"127.0.0.1:{pport}", f"127.0.0.1:{b.port}", f"https://127.0.0.1:{b.port}")]
    decisions = a.of("decision")
    assert [d["candidates"] for d in decisions] == [
        [f"localhost:{tport}"], [f"127.0.0.1:{pport}"]]  # no resolved-IP candidate
    assert [d["action"] for d in decisions] == ["intercept", "intercept"]
    assert [e["url"] for e in a.of("response")] == [url, origin.url("/echo")]

    b.wait_for(lambda e: e["event"] == "decision", count=2)
    assert [(d["address"], d["action"]) for d in b.of("decision")] == [
        (f"localhost:{tport}", "passthrough"), (f"127.0.0.1:{pport}", "passthrough")]
    assert [e["via"] for e in b.of("server_connect")] == [
        f"http://127.0.0.1:{tinyproxy.port}"] * 2
    assert [e["side"] for e in b.of("tls")] == ["client", "client"]  # TLS to B itself
    assert not a.of("error") and not b.of("error")
    a.stop()
    b.stop()
    everything = "".join(a.lines + b.lines)
    assert TP_PASS not in everything and "cli:pw" not in everything
    # neither the client's nor B's proxy credentials reached the origin
    for _, _, headers in origin.requests + tls_origin.requests:
        assert not any(k.lower() == "proxy-authorization" for k in headers), headers


def test_failing_upstream_proxy_gives_502_naming_it(dumpproxy, tls_origin, origin, refused_port):
    dead = refused_port
    a = dumpproxy("--mode", f"upstream:http://127.0.0.1:{dead}")
    r = curl("-x", f"http://127.0.0.1:{a.port}", "-o", "/dev/null", "-w", "%{http_code}",
             origin.url())
    assert r.stdout == b"502"
    r = curl("-x", f"http://127.0.0.1:{a.port}", tls_origin.url("/small", host="localhost"))
    assert r.returncode != 0 and b"502" in r.stderr
    a.wait_for(lambda e: e["event"] == "error", count=2)
    for e in a.of("error"):
        assert e["stage"] == "server_connect"
        assert f"upstream proxy http://127.0.0.1:{dead}" in e["message"]
        assert "Connection refused" in e["message"]
    assert not origin.requests


def test_upstream_proxy_refusing_credentials(dumpproxy, tinyproxy, origin, tls_origin):
    a = dumpproxy("--mode", f"upstream:http://{TP_USER}:wrong-pass@127.0.0.1:{tinyproxy.port}")
    r = curl("-x", f"http://127.0.0.1:{a.port}", tls_origin.url("/small", host="localhost"))
    assert r.returncode != 0 and b"502" in r.stderr
    err = a.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "server_connect"
    assert f"upstream proxy http://127.0.0.1:{tinyproxy.port}" in err["message"]
    assert "401" in err["message"] and "wrong credentials" in err["message"]
    # plain HTTP: tinyproxy's own refusal (401 for wrong credentials) is relayed as is
    r = curl("-x", f"http://127.0.0.1:{a.port}", "-o", "/dev/null", "-w", "%{http_code}",
             origin.url())
    assert r.stdout in (b"401", b"407")
    a.stop()
    assert "wrong-pass" not in "".join(a.lines)


def test_text_format_names_the_upstream_proxy():
    from dumpproxy.textformat import format_text

    ev = {"event": "server_connect", "client": "127.0.0.1:5", "address": "example.com:443",
          "ip": "127.0.0.1:3128", "connect_ms": 1.0, "via": "http://127.0.0.1:3128"}
    assert format_text(ev) == ("127.0.0.1:5: server connect example.com:443 (127.0.0.1:3128)"
                               " via http://127.0.0.1:3128\n")
