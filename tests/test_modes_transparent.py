"""Transparent mode for real: a network namespace of the test's own, an nftables REDIRECT rule
for the traffic of one user (uid 65534, curl runs as it), dumpproxy and the origins inside.

The test's main thread enters the namespace (setns) while it starts the origins (their
sockets stay in it), dumpproxy, nft and curl (children inherit it), and leaves it after.
Addresses: the namespace's own loopback (127.0.0.1, ::1) only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Origin

from dumpproxy.modes import parse_sockaddr

CLONE_NEWNET = 0x40000000
CLIENT_UID = 65534  # the redirected user; dumpproxy runs as root and is not redirected
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class NetNS:
    """A fresh network namespace, entered and left by the calling thread."""

    def __init__(self) -> None:
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        finally:
            _check(_libc.setns(self.home, CLONE_NEWNET), "setns back")

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        _check(_libc.setns(self.fd, CLONE_NEWNET), "setns")
        try:
            yield
        finally:
            _check(_libc.setns(self.home, CLONE_NEWNET), "setns back")

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.home)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    for tool in ("nft", "ip", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (.ci/run installs nftables, iproute2)")
    try:
        ns = NetNS()
    except OSError as e:
        pytest.skip(f"cannot create a network namespace here (kernel/privilege): {e}")
    yield ns
    ns.close()


def redirect(ports: list[int], to4: int, to6: int | None = None, root_too: list[int] = ()):
    """REDIRECT the client user's connections to these ports to dumpproxy's listeners;
    root_too: ports whose connections are redirected whoever makes them (a loop).
    One table per family (`ip`, `ip6`): NAT in an `inet` table does not take IPv6
    everywhere."""
    plist = ", ".join(map(str, ports))
    tables = {"ip": [f"meta skuid {CLIENT_UID} tcp dport {{ {plist} }} redirect to :{to4}"]}
    if to6 is not None:
        tables["ip6"] = [f"meta skuid {CLIENT_UID} tcp dport {{ {plist} }} "
                         f"redirect to :{to6}"]
    if root_too:
        tables["ip"].append(f"tcp dport {{ {', '.join(map(str, root_too))} }} "
                            f"redirect to :{to4}")
    ruleset = "".join(
        f"table {family} dumpproxy_test {{\n chain out {{\n"
        "  type nat hook output priority -100; policy accept;\n"
        + "".join(f"  {r}\n" for r in rules) + " }\n}\n"
        for family, rules in tables.items())
    r = subprocess.run(["nft", "-f", "-"], input=ruleset.encode(), capture_output=True)
    if r.returncode != 0 and b"Could not process rule" in r.stderr:
        pytest.skip(f"the kernel has no nftables NAT: {r.stderr.decode().strip()}")
    assert r.returncode == 0, r.stderr


def as_client(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["setpriv", f"--reuid={CLIENT_UID}", f"--regid={CLIENT_UID}",
                           "--clear-groups", "curl", "-sS", *args],
                          capture_output=True, timeout=timeout, env=env)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """CA files the unprivileged client can read."""
    d = Path(tempfile.mkdtemp(prefix="dumpproxy-transparent-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def readable(src, public: Path, name: str) -> str:
    dst = public / name
    dst.write_bytes(Path(src).read_bytes())
    dst.chmod(0o644)
    return str(dst)


def test_parse_sockaddr():
    raw4 = (socket.AF_INET).to_bytes(2, "little") + (8080).to_bytes(2, "big") + bytes(
        [10, 1, 2, 3]) + bytes(8)
    assert parse_sockaddr(raw4) == ("10.1.2.3", 8080)
    raw6 = ((socket.AF_INET6).to_bytes(2, "little") + (443).to_bytes(2, "big") + bytes(4)
            + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + bytes(4))
    assert parse_sockaddr(raw6) == ("2001:db8::1", 443)


def test_transparent_in_a_network_namespace(netns, dumpproxy, pki, public_dir):
    with netns.inside():
        tls_origin = Origin(pki.server_context(["localhost", "127.0.0.1", "decoy.test"]))
        passed = Origin(pki.server_context(["localhost", "127.0.0.1"]))
        plain = Origin()
        plain6 = Origin(host="::1")
        try:
            p = dumpproxy("--mode", "transparent@127.0.0.1:0", "--mode", "transparent@[::1]:0",
                          "--upstream-ca", str(pki.ca_path),
                          "--ignore-hosts", rf"^127\.0\.0\.1:{passed.port}$",  # by IP
                          "--ignore-hosts", r"^decoy\.test:")  # by SNI
            p.wait_for(lambda e: e["event"] == "listening", count=2)
            v4, v6 = (int(e["address"].rsplit(":", 1)[1]) for e in p.of("listening"))
            assert [e["mode"] for e in p.of("listening")] == ["transparent"] * 2
            redirect([tls_origin.port, passed.port, plain.port, plain6.port], v4, v6)
            ca = readable(p.events[0]["ca_cert"], public_dir, "dumpproxy-ca.pem")
            origin_ca = readable(pki.ca_path, public_dir, "origin-ca.pem")
            t = tls_origin.port

            # 1. HTTPS by name: intercepted; the name comes only from the SNI
            r = as_client("--cacert", ca, f"https://localhost:{t}/small")
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"hello\n"
            d = p.wait_for(lambda e: e["event"] == "decision")
            assert d["address"] == f"127.0.0.1:{t}" and d["action"] == "intercept"
            assert d["candidates"] == [f"127.0.0.1:{t}", f"localhost:{t}"]
            assert d["sni"] == "localhost"
            sc = p.of("server_connect")[0]
            assert (sc["address"], sc["ip"]) == (f"127.0.0.1:{t}", f"127.0.0.1:{t}")
            resp = p.wait_for(lambda e: e["event"] == "response")
            assert resp["url"] == f"https://localhost:{t}/small"

            # 2. an IP pattern decides by the original destination: passthrough, the
            # origin's own certificate reaches the client
            r = as_client("--cacert", origin_ca, f"https://localhost:{passed.port}/small")
            assert r.returncode == 0, r.stderr
            d = p.wait_for(lambda e: e["event"] == "decision", count=2)
            assert (d["action"], d["matched"]) == ("passthrough", f"127.0.0.1:{passed.port}")

            # 3. an SNI pattern: passthrough although the IP and port are those of case 1
            r = as_client("--cacert", origin_ca, "--resolve", f"decoy.test:{t}:127.0.0.1",
                          f"https://decoy.test:{t}/small")
            assert r.returncode == 0, r.stderr
            d = p.wait_for(lambda e: e["event"] == "decision", count=3)
            assert (d["action"], d["matched"], d["sni"]) == (
                "passthrough", f"decoy.test:{t}", "decoy.test")
            assert d["candidates"] == [f"127.0.0.1:{t}", f"decoy.test:{t}"]

            # 4. plain HTTP, IPv4 and IPv6: the Host header is a candidate
            r = as_client(f"http://127.0.0.1:{plain.port}/small", "-H", "Host: svc.test")
            assert r.returncode == 0, r.stderr
            d = p.wait_for(lambda e: e["event"] == "decision", count=4)
            assert d["candidates"] == [f"127.0.0.1:{plain.port}", f"svc.test:{plain.port}"]
            r = as_client(f"http://[::1]:{plain6.port}/small")
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"hello\n"
            d = p.wait_for(lambda e: e["event"] == "decision", count=5)
            assert d["address"] == f"[::1]:{plain6.port}" and d["action"] == "intercept"
            conns = {e["conn"] for e in p.of("decision")}
            assert len(conns) == 5
            assert not p.of("error")
            assert len(p.of("response")) == 3  # 1 and both plain requests
        finally:
            for o in (tls_origin, passed, plain, plain6):
                o.close()


def test_transparent_refuses_loops(netns, dumpproxy, public_dir):
    with netns.inside():
        looped = Origin()
        try:
            p = dumpproxy("--mode", "transparent")
            port = p.port
            # root's connections to this origin are redirected too: dumpproxy's own
            # upstream connection comes back to it
            redirect([looped.port], port, root_too=[looped.port])

            # a client that connects to the listener itself (not redirected)
            direct = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{port}/"],
                                    capture_output=True, timeout=30)
            assert direct.returncode != 0
            err = p.wait_for(lambda e: e["event"] == "error")
            assert err["stage"] == "transparent"
            assert f"dumpproxy's own listener 127.0.0.1:{port}" in err["message"]

            r = as_client("-m", "20", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://127.0.0.1:{looped.port}/small")
            assert r.stdout == b"502", r
            loop = p.wait_for(lambda e: e["event"] == "error" and "loop" in e["message"])
            assert loop["stage"] == "transparent"
            assert loop["address"] == f"127.0.0.1:{looped.port}"
            assert not looped.requests
        finally:
            looped.close()
