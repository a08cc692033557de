"""The egress policy with real clients over loopback: curl through CONNECT, plain HTTP and
SOCKS5, the record and its HAR, audit mode, SIGHUP reload, upstream and reverse modes,
wrap mode's exit status 3; in a network namespace of the test's own, a resolver that logs
every query shows that a blocked name is never looked up, and transparent mode's blocked
destinations never accept; pip against a local index; Chromium with a blocked asset host.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import ROOT, Origin, curl, isolated_resolver, open_tunnel, parse_events, run_cli
from test_clients import chromium, nginx, stop_chromium
from test_clients import start as client_start
from test_decisions import replace_atomically
from test_modes_transparent import as_client, netns, public_dir, readable, redirect

__all__ = ["netns", "public_dir", "nginx"]  # fixtures shared with other test modules

HOSTS = {"allowed.test": "127.0.0.1", "blocked.test": "127.0.0.1"}


def allow_file(tmp_path: Path, *patterns: str, name: str = "egress.txt") -> Path:
    f = tmp_path / name
    f.write_text("# allowed destinations\n" + "".join(p + "\n" for p in patterns))
    return f


def no_connection(p, name: str) -> None:
    """No upstream connection was ever made to this name."""
    assert not [e for e in p.of("server_connect") if e["address"].startswith(name + ":")], \
        p.of("server_connect")


# --------------------------------------------------------------------------- CONNECT, plain HTTP


def test_connect_and_plain_http_get_403_naming_the_source(dumpproxy, origin, tmp_path):
    port = origin.port
    allow = allow_file(tmp_path, rf"^allowed\.test:{port}$")
    p = dumpproxy("--egress-allow-file", str(allow), hosts=HOSTS)
    # allowed: through, its decision names the line that let it out
    r = curl("-x", p.url, f"http://allowed.test:{port}/small")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert (d["action"], d["egress_reason"], d["egress_source"]) == (
        "intercept", "egress_allow", f"{allow}:2")
    # plain HTTP, blocked: 403 naming the file, and the record has the exchange
    r = curl("-x", p.url, "-w", "%{http_code}", f"http://blocked.test:{port}/small")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"403")
    assert f"blocked.test:{port} matches no egress allow pattern ({allow})".encode() \
        in r.stdout
    d = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block")
    resp = p.wait_for(lambda e: e["event"] == "response" and e["status"] == 403)
    req = p.of("request", flow=resp["flow"])[0]
    assert req["url"] == f"http://blocked.test:{port}/small"
    assert (d["flow"], d["reason"], d["pattern"], d["source"], d["candidates"]) == (
        resp["flow"], "egress_allow", None, str(allow), [f"blocked.test:{port}"])
    assert "server" not in resp
    # CONNECT, blocked: 403 with the same body; curl sees the tunnel refused
    r = curl("-x", p.url, "-v", f"https://blocked.test:{port}/small")
    assert r.returncode == 56, r.stderr
    assert b"CONNECT tunnel failed, response 403" in r.stderr
    d = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block", count=2)
    assert (d["address"], "flow" in d) == (f"blocked.test:{port}", False)
    no_connection(p, "blocked.test")
    assert not p.of("error")
    assert p.stop() == 0
    shutdown = p.of("shutdown")[0]
    assert (shutdown["blocked"], shutdown["would_block"]) == (2, 0)
    assert [r[1] for r in origin.requests] == ["/small"]  # only the allowed one got there
    # the HAR: the blocked request as the client saw it, the policy as its comment
    cap = tmp_path / "cap.jsonl"
    cap.write_text("".join(p.lines))
    r = run_cli("har", str(cap))
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)["log"]["entries"]
    assert [(e["response"]["status"], e.get("comment")) for e in entries] == [
        (200, None), (403, f"block: egress_allow ({allow})")]


def test_deny_list_over_socks5_gets_reply_2(dumpproxy, origin):
    p = dumpproxy("--mode", "socks5", "--egress-deny", r"^blocked\.", hosts=HOSTS)
    port = origin.port
    r = curl("--socks5-hostname", f"127.0.0.1:{p.port}", f"http://allowed.test:{port}/small")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    r = curl("--socks5-hostname", f"127.0.0.1:{p.port}", f"http://blocked.test:{port}/small")
    assert r.returncode == 97, r.stderr
    assert b"(2)" in r.stderr or b"not allowed" in r.stderr, r.stderr
    d = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block")
    assert (d["reason"], d["pattern"], d["source"], d["matched"]) == (
        "egress_deny", r"^blocked\.", "--egress-deny", f"blocked.test:{port}")
    allowed = p.of("decision", action="intercept")[0]
    assert (allowed["egress_reason"], allowed["egress_pattern"]) == ("default", None)
    no_connection(p, "blocked.test")


def test_audit_blocks_nothing_and_counts(dumpproxy, origin):
    port = origin.port
    p = dumpproxy("--egress-allow", rf"^allowed\.test:{port}$", "--egress-audit", hosts=HOSTS)
    for name in ("allowed", "blocked"):
        r = curl("-x", p.url, f"http://{name}.test:{port}/small")
        assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    p.wait_for(lambda e: e["event"] == "response", count=2)
    would = p.of("decision", would_block=True)
    assert [(d["address"], d["action"], d["egress_reason"]) for d in would] == [
        (f"blocked.test:{port}", "intercept", "egress_allow")]
    assert p.stop() == 0
    shutdown = p.of("shutdown")[0]
    assert (shutdown["blocked"], shutdown["would_block"]) == (0, 1)


def test_sighup_reloads_the_egress_file(dumpproxy, origin, tmp_path):
    port = origin.port
    allow = allow_file(tmp_path, rf"^allowed\.test:{port}$")
    p = dumpproxy("--egress-allow-file", str(allow), hosts=HOSTS)

    def status(name: str) -> bytes:
        return curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}",
                    f"http://{name}.test:{port}/small").stdout

    assert status("blocked") == b"403"
    replace_atomically(allow, f"^allowed\\.test:{port}$\n^blocked\\.test:{port}$\n")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while status("blocked") != b"200":
        assert time.monotonic() < deadline, "the reload did not take"
        time.sleep(0.1)
    d = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "intercept"
                   and e["address"] == f"blocked.test:{port}")
    assert d["egress_source"] == f"{allow}:2"
    replace_atomically(allow, "foo(\n")  # a bad file: the previous lists stay
    p.proc.send_signal(signal.SIGHUP)
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "reload" and err["message"].startswith(f"{allow}:1: invalid")
    assert status("blocked") == b"200"


def test_upstream_mode_blocks_before_asking_the_upstream_proxy(dumpproxy, origin):
    port = origin.port
    upstream = dumpproxy(hosts=HOSTS)
    p = dumpproxy("--mode", f"upstream:http://127.0.0.1:{upstream.port}",
                  "--egress-allow", rf"^allowed\.test:{port}$")
    r = curl("-x", p.url, f"http://allowed.test:{port}/small")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    upstream.wait_for(lambda e: e["event"] == "response")
    asked = len(upstream.of("client_connect"))
    for url in (f"http://blocked.test:{port}/small", f"https://blocked.test:{port}/"):
        r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}", url)
        assert r.stdout in (b"403", b"000"), r.stderr
    p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block", count=2)
    assert len(upstream.of("client_connect")) == asked  # never asked
    no_connection(p, "blocked.test")


def test_reverse_mode_closes_a_blocked_target(dumpproxy, origin):
    p = dumpproxy("--mode", f"reverse:http://blocked.test:{origin.port}",
                  "--egress-deny", r"^blocked\.test:", hosts=HOSTS)
    r = curl(f"http://127.0.0.1:{p.port}/small")
    assert r.returncode == 52, r.stderr  # empty reply: closed
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert (d["action"], d["reason"]) == ("block", "egress_deny")
    no_connection(p, "blocked.test")
    assert not origin.requests


# --------------------------------------------------------------------------- wrap mode


def wrap(home: Path, *args: str, script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["DUMPPROXY_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "dumpproxy", *args, "--", "sh", "-c", script],
                          capture_output=True, env=env, cwd=ROOT, timeout=60)


def test_wrap_mode_exits_3_naming_each_blocked_destination(home, origin, tmp_path):
    port = origin.port
    cap = tmp_path / "cap.jsonl"
    script = (f"curl -sS http://127.0.0.1:{port}/small; "
              f"curl -sS -o /dev/null http://git.test:{port}/a; "
              f"curl -sS -o /dev/null http://git.test:{port}/b; "
              f"curl -sS -o /dev/null http://cdn.test:{port}/c; true")
    r = wrap(home, "-o", str(cap), "--egress-allow", rf"^127\.0\.0\.1:{port}$", script=script)
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert r.stdout == b"hello\n"
    lines = [x for x in err.splitlines() if x.startswith("dumpproxy: blocked ")]
    assert len(lines) == 2, err
    assert re.fullmatch(rf"dumpproxy: blocked cdn\.test:{port} \(once, first at "
                        r"\d\d:\d\d:\d\d UTC\): cdn\.test:\d+ matches no egress allow "
                        r"pattern \(--egress-allow\)", lines[0]), lines[0]
    assert lines[1].startswith(f"dumpproxy: blocked git.test:{port} (2 times, first at ")
    events = parse_events(cap.read_text())
    assert events[-1]["blocked"] == 3
    # a failing command's own status is kept (the summary still tells)
    r = wrap(home, "--egress-allow", rf"^127\.0\.0\.1:{port}$",
             script=f"curl -sS -o /dev/null http://git.test:{port}/a; exit 5")
    assert r.returncode == 5
    assert f"dumpproxy: blocked git.test:{port} (once".encode() in r.stderr
    # nothing blocked: CMD's 0
    r = wrap(home, "--egress-allow", rf"^127\.0\.0\.1:{port}$",
             script=f"curl -sS -o /dev/null http://127.0.0.1:{port}/small")
    assert r.returncode == 0, r.stderr
    assert b"blocked" not in r.stderr


# --------------------------------------------------------------------------- no DNS, no connection


class LoggingResolver:
    """A DNS server on 127.0.0.1:53 (of the namespace it is made in) that logs every query:
    the names in `answers` get their A record, every other name NXDOMAIN."""

    def __init__(self, answers: dict[str, str]):
        import socket
        import threading

        self.answers = answers
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            self.queries.append(name)
            reply = dns.message.make_response(query)
            if name not in self.answers:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A",
                                                        self.answers[name]))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def test_blocked_names_cause_no_dns_query_and_no_connection(netns, dumpproxy, tmp_path):
    with netns.inside():
        origin = Origin()
        resolver = LoggingResolver({"allowed.test": "127.0.0.1"})
        try:
            port = origin.port
            # hosts={}: dumpproxy's own /etc/hosts (localhost only) and a resolv.conf that
            # points at 127.0.0.1, here the logging resolver of this namespace
            p = dumpproxy("--mode", "regular", "--mode", "socks5@0",
                          "--egress-allow", rf"^allowed\.test:{port}$", hosts={})
            http_port, socks_port = (int(e["address"].rsplit(":", 1)[1])
                                     for e in p.wait_for(lambda e: e["event"] == "listening",
                                                         count=2) and p.of("listening"))
            proxy = f"http://127.0.0.1:{http_port}"
            socks = f"127.0.0.1:{socks_port}"
            # the logger works: an allowed name, in no hosts file, is looked up through it
            r = curl("-x", proxy, f"http://allowed.test:{port}/small")
            assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
            assert "allowed.test" in resolver.queries, resolver.queries
            r = curl("--socks5-hostname", socks, f"http://allowed.test:{port}/small")
            assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
            # blocked names, each way in: the documented answer, no query, no connection
            r = curl("--socks5-hostname", socks, f"http://socks-blocked.test:{port}/small")
            assert r.returncode == 97, r.stderr
            r = curl("-x", proxy, f"https://connect-blocked.test:{port}/small")
            assert r.returncode == 56 and b"403" in r.stderr, r.stderr
            r = curl("-x", proxy, "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://plain-blocked.test:{port}/small")
            assert r.stdout == b"403", r.stderr
            blocks = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block",
                                count=3) and p.of("decision", action="block")
            assert sorted(d["address"].split(":")[0] for d in blocks) == [
                "connect-blocked.test", "plain-blocked.test", "socks-blocked.test"]
            assert not [q for q in resolver.queries if "blocked" in q], resolver.queries
            assert {e["address"] for e in p.of("server_connect")} == {f"allowed.test:{port}"}
            assert len(origin.requests) == 2
        finally:
            resolver.close()
            origin.close()


def test_transparent_blocked_destinations_never_accept(netns, dumpproxy, pki, public_dir):
    import socket

    with netns.inside():
        allowed = Origin(pki.server_context(["allowed.test"]))
        listeners = []
        for _ in range(2):  # blocked destinations: listening, never accepting
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            listeners.append(s)
        plain_port, tls_port = (s.getsockname()[1] for s in listeners)
        try:
            p = dumpproxy("--mode", "transparent@127.0.0.1:0", "--upstream-ca",
                          str(pki.ca_path), "--egress-allow", r"^allowed\.test:")
            redirect([allowed.port, plain_port, tls_port], p.port)
            ca = readable(p.events[0]["ca_cert"], public_dir, "dumpproxy-ca.pem")
            # allowed by its SNI, though transparent mode knows only the address
            r = as_client("--cacert", ca, "--resolve", f"allowed.test:{allowed.port}:127.0.0.1",
                          f"https://allowed.test:{allowed.port}/small")
            assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
            d = p.wait_for(lambda e: e["event"] == "decision")
            assert (d["action"], d["egress_pattern"], d["sni"]) == (
                "intercept", r"^allowed\.test:", "allowed.test")
            # blocked: plain HTTP (its Host a candidate) and TLS (its SNI): closed
            r = as_client("-H", "Host: other.test", f"http://127.0.0.1:{plain_port}/")
            assert r.returncode == 52, r.stderr  # empty reply
            r = as_client("--cacert", ca, "--resolve", f"cdn.test:{tls_port}:127.0.0.1",
                          f"https://cdn.test:{tls_port}/")
            assert r.returncode == 35, r.stderr  # the TLS handshake met a close
            blocks = p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block",
                                count=2) and p.of("decision", action="block")
            assert [d["candidates"] for d in blocks] == [
                [f"127.0.0.1:{plain_port}", f"other.test:{plain_port}"],
                [f"127.0.0.1:{tls_port}", f"cdn.test:{tls_port}"]]
            assert [e["address"] for e in p.of("server_connect")] == [
                f"127.0.0.1:{allowed.port}"]
            for s in listeners:  # nothing ever reached them: their accept queues are empty
                s.setblocking(False)
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conn.close()
                raise AssertionError(f"{s.getsockname()} was connected to")
        finally:
            allowed.close()
            for s in listeners:
                s.close()


# --------------------------------------------------------------------------- pip


def build_wheel(work: Path, name: str) -> Path:
    """A one-module wheel, built here by pip (offline, setuptools from this environment)."""
    module = name.replace("-", "_")
    src = work / f"src-{name}"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\n'
        'build-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\n'
        f'[tool.setuptools]\npy-modules = ["{module}"]\n')
    (src / f"{module}.py").write_text("VALUE = 42\n")
    out = work / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob(f"{module}-1.0-*.whl")
    return wheel


def pep503_index(www: Path, wheel: Path, project: str) -> None:
    """/simple/PROJECT/ listing the wheel under /files/ (PEP 503), on every nginx name."""
    files = www / "files"
    files.mkdir(exist_ok=True)
    (files / wheel.name).write_bytes(wheel.read_bytes())
    page = www / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    (page / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/files/{wheel.name}">{wheel.name}</a>'
        "</body></html>\n")


def pip_wrapped(home: Path, pki, work: Path, nginx, *dumpproxy_args: str,
                target: str) -> subprocess.CompletedProcess:
    """pip install from the main index (app.test) with an extra index (cdn.test), in wrap
    mode; only dumpproxy resolves the names (its private hosts file)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(DUMPPROXY_HOME=str(home), PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "dumpproxy", "--upstream-ca", str(pki.ca_path),
           *dumpproxy_args, "--", sys.executable, "-m", "pip", "install", "-vv", "--no-deps",
           "--target", str(work / target), "--retries", "0", "--timeout", "20",
           "--index-url", f"https://app.test:{nginx.port}/simple/",
           "--extra-index-url", f"https://cdn.test:{nginx.port}/simple/", "egress-demo"]
    cmd = isolated_resolver(cmd, {"app.test": "127.0.0.1", "cdn.test": "127.0.0.1"}, work)
    return subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT, timeout=300)


def test_pip_with_the_allow_file_made_from_a_recorded_run(home, pki, nginx, tmp_path):
    work = tmp_path / "pip"
    work.mkdir()
    pep503_index(nginx.dir / "www", build_wheel(work, "egress-demo"), "egress-demo")
    # 1. recorded: both index hosts reached
    run = work / "run.jsonl"
    r = pip_wrapped(home, pki, work, nginx, "-o", str(run), target="t1")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:]
    assert (work / "t1" / "egress_demo.py").read_text() == "VALUE = 42\n"
    # 2. the allow file from the capture: the enforced run passes, nothing blocked
    r = run_cli("egress", str(run))
    assert r.returncode == 0, r.stderr
    patterns = [x for x in r.stdout.decode().splitlines() if not x.startswith("#")]
    assert patterns == [rf"^app\.test:{nginx.port}$", rf"^cdn\.test:{nginx.port}$"]
    allow = work / "egress.txt"
    allow.write_bytes(r.stdout)
    enforced = work / "enforced.jsonl"
    r = pip_wrapped(home, pki, work, nginx, "--egress-allow-file", str(allow),
                    "-o", str(enforced), target="t2")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    events = parse_events(enforced.read_text())
    assert events[-1]["blocked"] == 0
    assert {d["egress_source"] for d in events if d["event"] == "decision"} == {
        f"{allow}:4", f"{allow}:6"}
    # 3. the extra index host removed: pip installs from the main index and sees the 403;
    # dumpproxy exits 3 and names the host
    lines = allow.read_text().splitlines()
    allow.write_text("\n".join(x for x in lines if "cdn" not in x) + "\n")
    r = pip_wrapped(home, pki, work, nginx, "--egress-allow-file", str(allow), target="t3")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 3, out[-3000:] + err[-3000:]
    assert (work / "t3" / "egress_demo.py").exists()
    assert "Tunnel connection failed: 403" in out + err
    assert f"dumpproxy: blocked cdn.test:{nginx.port} (" in err
    # 4. the only index host removed: pip fails, and its status is the one kept
    allow.write_text("# nothing allowed\n")
    r = pip_wrapped(home, pki, work, nginx, "--egress-allow-file", str(allow), target="t4")
    err = r.stderr.decode()
    assert r.returncode == 1, err[-3000:]
    assert f"dumpproxy: blocked app.test:{nginx.port} (" in err
    assert not (work / "t4" / "egress_demo.py").exists()


# --------------------------------------------------------------------------- Chromium


def test_chromium_page_loads_its_third_party_asset_host_blocked(dumpproxy, pki, nginx,
                                                               tmp_path):
    """The page and its own assets (script, image, WebSocket) load; cdn.test's stylesheet,
    script and image are refused with a 403 to their CONNECT; the page host's decisions
    name the allow file's line."""
    allow = allow_file(tmp_path, rf"^app\.test:{nginx.port}$")
    p = client_start(dumpproxy, pki, "--egress-allow-file", str(allow))
    seen = len(nginx.access())
    run = uuid.uuid4().hex[:12]
    page = nginx.url(f"/?run={run}&n=1&last=1")
    proc = chromium(p, pki, tmp_path / "profile", page)
    try:
        for url in (nginx.url("/app.js"), nginx.url("/local.svg")):
            p.wait_for(lambda e, u=url: e["event"] == "response" and e["url"] == u
                       and e["status"] == 200, timeout=60)
        p.wait_for(lambda e: e["event"] == "response" and e["url"] == nginx.url("/ws")
                   and e["status"] == 101, timeout=60)
        p.wait_for(lambda e: e["event"] == "decision" and e["action"] == "block",
                   timeout=60)
    finally:
        stop_chromium(proc)
    assert p.stop() == 0
    page_resp = p.of("response", url=page)
    assert [e["status"] for e in page_resp] == [200]
    decisions = p.of("decision")
    hosts = {d["address"] for d in decisions}
    assert hosts == {f"app.test:{nginx.port}", f"cdn.test:{nginx.port}"}, hosts
    for d in decisions:
        if d["address"].startswith("app.test:"):
            assert (d["action"], d["egress_source"]) == ("intercept", f"{allow}:2")
        else:
            assert (d["action"], d["reason"], d["source"]) == ("block", "egress_allow",
                                                               str(allow))
    no_connection(p, "cdn.test")
    assert not [line for line in nginx.access()[seen:] if line.startswith("cdn.test ")]
    assert p.of("shutdown")[0]["blocked"] == len(p.of("decision", action="block"))


# --------------------------------------------------------------------------- CONNECT by address


def tls_get(sock, ca: str, name: str) -> bytes:
    """GET /small over TLS in a tunnel, under this server name; b"" when it was closed."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    try:
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(f"GET /small HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                        .encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data
    except (ssl.SSLError, ConnectionError):
        return b""


def test_connect_by_address_is_judged_on_its_sni(dumpproxy, pki, home):
    origin = Origin(pki.server_context(["allowed.test", "other.test"]))
    try:
        target = f"127.0.0.1:{origin.port}"
        ca = str(home / "ca-cert.pem")
        args = ("--upstream-ca", str(pki.ca_path), "--egress-allow", r"^allowed\.test:")
        p = dumpproxy(*args)
        # answered 200 at once, nothing connected until the SNI names it
        assert tls_get(open_tunnel(p.port, target), ca, "allowed.test").endswith(b"hello\n")
        d = p.wait_for(lambda e: e["event"] == "decision")
        assert (d["action"], d["egress_pattern"], d["sni"]) == (
            "intercept", r"^allowed\.test:", "allowed.test")
        assert tls_get(open_tunnel(p.port, target), ca, "other.test") == b""  # a close
        d = p.wait_for(lambda e: e["event"] == "decision", count=2)
        assert (d["action"], d["candidates"]) == (
            "block", [target, f"other.test:{origin.port}"])
        assert len(p.of("server_connect")) == 1
        assert len(origin.requests) == 1
        # audit mode: connected as usual, the would-be block said
        a = dumpproxy(*args, "--egress-audit")
        assert tls_get(open_tunnel(a.port, target), ca, "other.test").endswith(b"hello\n")
        d = a.wait_for(lambda e: e["event"] == "decision")
        assert (d["action"], d["would_block"]) == ("intercept", True)
        assert a.of("server_connect")
    finally:
        origin.close()


def test_a_slow_egress_pattern_blocks_with_an_error_naming_it(dumpproxy, origin):
    p = dumpproxy("--egress-allow", "(a|aa)+$", hosts={"a" * 40 + "b.test": "127.0.0.1"})
    r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}",
             f"http://{'a' * 40}b.test:{origin.port}/small")
    assert r.stdout == b"403", r.stderr
    d = p.wait_for(lambda e: e["event"] == "decision")
    assert (d["action"], d["reason"], d["pattern"]) == ("block", "timeout", "(a|aa)+$")
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "decision" and "'(a|aa)+$' (--egress-allow)" in err["message"]
    assert "ms to match; blocked: rewrite the pattern" in err["message"]
    assert not origin.requests
