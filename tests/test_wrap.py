"""Wrap mode (SPEC §6, §1 exit status): `dumpproxy [OPTIONS] -- CMD [ARG...]` with real
children — curl, Python (requests, urllib.request), node — through intercepted and
passed-through HTTPS; the environment and CA bundle the child gets; where the child's
stdout goes; exit status and signal forwarding; commands that cannot run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, DumpProxy, Origin, curl, parse_events

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
           "GIT_SSL_CAINFO")
TIMEOUT = 60


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without proxy or CA settings, so that everything the child
    trusts or proxies through comes from dumpproxy."""
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and k not in CA_VARS and k != "SSL_CERT_DIR"}
    env["DUMPPROXY_HOME"] = str(home)
    env.update(extra)
    return env


def wrap(home: Path, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dumpproxy", *args], capture_output=True,
                          env=env or clean_env(home), cwd=ROOT, timeout=TIMEOUT)


def events_of(data: bytes | str) -> list[dict]:
    text = data.decode() if isinstance(data, bytes) else data
    return parse_events(text)


def check_stream(events: list[dict]) -> None:
    kinds = [e["event"] for e in events]
    assert kinds[0] == "listening", kinds
    assert kinds[-1] == "shutdown" and kinds.count("shutdown") == 1, kinds


PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


def pem_certs(data: bytes) -> set[bytes]:
    """The certificates (DER) in a PEM bundle; every one must decode."""
    blocks = PEM_CERT.findall(data)
    assert blocks and data.count(b"-----BEGIN CERTIFICATE-----") == len(blocks)
    return {ssl.PEM_cert_to_DER_cert(b.decode()) for b in blocks}


def system_ca_file() -> Path:
    """OpenSSL's default CA file (SSL_CERT_FILE unset), as SPEC §6 defines "system CAs"."""
    default = ssl.get_default_verify_paths().openssl_cafile
    path = Path(default) if default and os.path.isfile(default) else Path(
        "/etc/ssl/certs/ca-certificates.crt")
    assert path.is_file(), "no system CA file (install ca-certificates)"
    return path


# --- curl, no other flags ----------------------------------------------------------------


def test_curl_with_no_other_flags(home, tls_origin, pki):
    url = tls_origin.url("/small", host="localhost")
    r = wrap(home, "--upstream-ca", str(pki.ca_path), "--", "curl", "-s", url)
    assert r.returncode == 0, r.stderr
    # curl's output (its stdout) is on dumpproxy's stderr; stdout holds only events
    assert b"hello\n" in r.stderr
    events = events_of(r.stdout)
    check_stream(events)
    assert events[0]["address"].startswith("127.0.0.1:")
    assert events[0]["address"] != "127.0.0.1:8080"  # a free port, not the default
    [req] = [e for e in events if e["event"] == "request"]
    [resp] = [e for e in events if e["event"] == "response"]
    assert req["url"] == resp["url"] == url
    assert resp["status"] == 200 and resp["response_bytes"] == 6
    [dec] = [e for e in events if e["event"] == "decision"]
    assert dec["action"] == "intercept" and dec["address"] == f"localhost:{tls_origin.port}"
    shutdown = events[-1]
    assert shutdown["reason"] == "command exited"
    assert shutdown["requests"] == 1 and shutdown["errors"] == 0


def test_child_environment_and_ca_bundle(home, tmp_path, tls_origin, pki):
    """Every proxy and CA variable, one bundle (system CAs + dumpproxy's CA), removed after."""
    dump = tmp_path / "dump.py"
    dump.write_text(
        "import json, os, shutil, sys\n"
        "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"
        "shutil.copy(os.environ['SSL_CERT_FILE'], sys.argv[2])\n"
    )
    env_out, bundle_copy = tmp_path / "env.json", tmp_path / "bundle.pem"
    url = tls_origin.url("/small", host="localhost")
    script = f'"$0" {dump} {env_out} {bundle_copy} && curl -s {url}'
    r = wrap(home, "--upstream-ca", str(pki.ca_path), "--", "sh", "-c", script,
             sys.executable, env=clean_env(home, WRAP_TEST_MARKER="kept"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.endswith(b"hello\n"), r.stderr
    events = events_of(r.stdout)
    check_stream(events)
    assert [e["status"] for e in events if e["event"] == "response"] == [200]

    child = json.loads(env_out.read_text())
    proxy_url = f"http://{events[0]['address']}"
    for name in PROXY_VARS:
        assert child.get(name) == proxy_url, name
    bundle = child["SSL_CERT_FILE"]
    for name in CA_VARS:
        assert child.get(name) == bundle, name
    assert child["WRAP_TEST_MARKER"] == "kept"  # the rest of the environment is passed on
    assert not Path(bundle).exists(), "the CA bundle was left behind"

    data = bundle_copy.read_bytes()
    system = pem_certs(system_ca_file().read_bytes())
    ours = pem_certs((home / "ca-cert.pem").read_bytes())
    assert len(system) > 10 and len(ours) == 1
    assert pem_certs(data) == system | ours
    # the system file's text is there whole, and dumpproxy's CA after it
    assert system_ca_file().read_bytes().strip() in data
    assert data.rstrip().endswith((home / "ca-cert.pem").read_bytes().strip())


def test_output_file_keeps_child_stdout_on_stdout(home, tmp_path, tls_origin, pki):
    out = tmp_path / "events.jsonl"
    url = tls_origin.url("/small", host="localhost")
    r = wrap(home, "--upstream-ca", str(pki.ca_path), "-o", str(out), "--",
             "sh", "-c", f"echo child-stdout; curl -s {url}; echo child-stderr >&2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"child-stdout\nhello\n"
    assert r.stderr == b"child-stderr\n"
    events = events_of(out.read_text())
    check_stream(events)
    assert [e["url"] for e in events if e["event"] == "response"] == [url]


def test_in_flight_exchange_finishes_after_the_command_exits(home, tls_origin, pki):
    """SPEC §6: when CMD exits, in-flight exchanges finish before `shutdown`."""
    url = tls_origin.url("/slow?n=5", host="localhost")  # 5 bytes, one per 0.2 s
    got = home / "got"
    # CMD exits as soon as the first body byte has arrived: the exchange is mid-body
    script = (f"curl -s -N -o {got} {url} & "
              f"while [ ! -s {got} ]; do sleep 0.01; done; exit 5")
    r = wrap(home, "--upstream-ca", str(pki.ca_path), "--", "sh", "-c", script)
    assert r.returncode == 5, r.stderr
    events = events_of(r.stdout)
    check_stream(events)
    [resp] = [e for e in events if e["event"] == "response"]
    assert resp["status"] == 200 and resp["response_bytes"] == 5
    assert events[-1]["requests"] == 1 and events[-1]["errors"] == 0


# --- exit status and signals --------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_status_propagates(home, code):
    r = wrap(home, "--", "sh", "-c", f"exit {code}")
    assert r.returncode == code, r.stderr
    check_stream(events_of(r.stdout))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1],
                         ids=lambda s: s.name)
def test_killed_by_signal_is_128_plus_n(home, sig):
    r = wrap(home, "--", sys.executable, "-c",
             f"import os; os.kill(os.getpid(), {int(sig)}); import time; time.sleep(10)")
    assert r.returncode == 128 + sig, r.stderr
    check_stream(events_of(r.stdout))


def start_wrapped(home: Path, tmp_path: Path, *cmd: str) -> tuple[DumpProxy, Path]:
    marker = tmp_path / "child-ready"
    p = DumpProxy(["--", *cmd], home, env={"WRAP_READY": str(marker)})
    try:
        deadline = time.monotonic() + 15
        while not marker.exists():
            assert time.monotonic() < deadline, "the child never started"
            assert p.proc.poll() is None, p.stderr
            time.sleep(0.02)
    except BaseException:
        p.proc.kill()
        p.proc.wait()
        raise
    time.sleep(0.1)
    return p, marker


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 42), (signal.SIGINT, 43)],
                         ids=["SIGTERM", "SIGINT"])
def test_signals_are_forwarded_to_the_child(home, tmp_path, sig, code):
    """The signal goes to dumpproxy only; the child sees it (its trap exits with `code`),
    then dumpproxy exits with the child's status and writes `shutdown` last."""
    # the child gives up after ~10 s (exit 99), so it never outlives a failing test
    script = ('trap "echo got-TERM >&2; exit 42" TERM; trap "echo got-INT >&2; exit 43" INT; '
              'touch "$WRAP_READY"; i=0; while [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; '
              'exit 99')
    p, _ = start_wrapped(home, tmp_path, "sh", "-c", script)
    t0 = time.monotonic()
    assert p.stop(sig) == code, p.stderr
    assert time.monotonic() - t0 < 5
    assert f"got-{signal.Signals(sig).name[3:]}".encode() in p.stderr
    check_stream(p.events)


def test_untrapped_forwarded_signal_gives_128_plus_n(home, tmp_path):
    script = 'touch "$WRAP_READY"; exec sleep 10'
    p, _ = start_wrapped(home, tmp_path, "sh", "-c", script)
    t0 = time.monotonic()
    assert p.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 5
    check_stream(p.events)


def test_signal_as_soon_as_listening_is_seen(home, tmp_path):
    """A script that signals dumpproxy the moment it reads `listening` (before CMD may be
    running): the signal still reaches CMD, `shutdown` is written, the bundle is removed."""
    for attempt in range(3):
        tmp = tmp_path / f"tmp{attempt}"
        tmp.mkdir()
        p = DumpProxy(["--", "sleep", "10"], home, env={"TMPDIR": str(tmp)})
        t0 = time.monotonic()
        assert p.stop(signal.SIGTERM) == 128 + signal.SIGTERM, p.stderr
        assert time.monotonic() - t0 < 5
        check_stream(p.events)
        assert list(tmp.iterdir()) == [], "the CA bundle was left behind"


# --- Python and node children, intercepted and passed through ------------------------------

PY_CLIENT = """\
import json, sys, urllib.request
kind, url = sys.argv[1], sys.argv[2]
if kind == "requests":
    import requests
    r = requests.get(url, timeout=20)
    out = [r.status_code, r.text]
else:
    with urllib.request.urlopen(url, timeout=20) as r:
        out = [r.status, r.read().decode()]
print(json.dumps(out))
"""

NODE_CLIENT = """\
// CONNECT through $HTTPS_PROXY by hand, then TLS over the tunnel (trust: node's roots +
// NODE_EXTRA_CA_CERTS, read at startup), then one GET.
const http = require('http');
const tls = require('tls');
const target = new URL(process.argv[2]);
const proxy = new URL(process.env.HTTPS_PROXY);
const authority = `${target.hostname}:${target.port || 443}`;
const req = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT',
                          path: authority, headers: {host: authority}});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.error('CONNECT ' + res.statusCode); process.exit(2); }
  const s = tls.connect({socket, servername: target.hostname}, () => {
    s.write(`GET ${target.pathname} HTTP/1.1\\r\\nHost: ${target.host}\\r\\n` +
            'Connection: close\\r\\n\\r\\n');
  });
  let data = '';
  s.setEncoding('utf8');
  s.on('data', (d) => { data += d; });
  s.on('end', () => {
    process.stdout.write(JSON.stringify({authorized: s.authorized, response: data}));
  });
  s.on('error', (e) => { console.error('TLS: ' + e.message); process.exit(3); });
});
req.on('error', (e) => { console.error('proxy: ' + e.message); process.exit(4); });
req.end();
"""

CLIENTS = ["curl", "requests", "urllib", "node"]


def client_command(kind: str, tmp_path: Path, url: str) -> list[str]:
    if kind == "curl":
        return ["curl", "-sS", url]
    if kind == "node":
        node = shutil.which("node")
        assert node, "node is not installed (CI installs nodejs)"
        script = tmp_path / "client.js"
        script.write_text(NODE_CLIENT)
        return [node, str(script), url]
    script = tmp_path / "client.py"
    script.write_text(PY_CLIENT)
    return [sys.executable, str(script), kind, url]


def check_client_output(kind: str, stdout: bytes) -> None:
    if kind == "curl":
        assert stdout == b"hello\n"
    elif kind == "node":
        out = json.loads(stdout)
        assert out["authorized"] is True
        head, _, body = out["response"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200") and body == "hello\n", out
    else:
        assert json.loads(stdout) == [200, "hello\n"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_client_through_intercepted_https(kind, home, tmp_path, tls_origin, pki):
    url = tls_origin.url("/small", host="localhost")
    out = tmp_path / "events.jsonl"
    r = wrap(home, "--upstream-ca", str(pki.ca_path), "-o", str(out), "--",
             *client_command(kind, tmp_path, url))
    assert r.returncode == 0, r.stderr
    check_client_output(kind, r.stdout)
    events = events_of(out.read_text())
    check_stream(events)
    assert [e["action"] for e in events if e["event"] == "decision"] == ["intercept"]
    [resp] = [e for e in events if e["event"] == "response"]
    assert resp["url"] == url and resp["status"] == 200
    # the child verified dumpproxy's certificate: the client-side handshake completed
    assert [e["side"] for e in events if e["event"] == "tls"].count("client") == 1
    assert not [e for e in events if e["event"] == "error"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_client_through_passed_through_https(kind, home, tmp_path, tls_origin, pki):
    """SPEC §6: passed-through HTTPS verifies with the bundle because it holds the system
    CAs, i.e. OpenSSL's default CA file. That file is, by OpenSSL's own rule, $SSL_CERT_FILE
    when set; setting it (for dumpproxy only) to the origin's CA stands in for an origin
    whose certificate chains to a system root. The child gets no other trust."""
    url = tls_origin.url("/small", host="localhost")
    out = tmp_path / "events.jsonl"
    env = clean_env(home, SSL_CERT_FILE=str(pki.ca_path))
    r = wrap(home, "--ignore-hosts", "localhost", "-o", str(out), "--",
             *client_command(kind, tmp_path, url), env=env)
    assert r.returncode == 0, r.stderr
    check_client_output(kind, r.stdout)
    events = events_of(out.read_text())
    check_stream(events)
    [dec] = [e for e in events if e["event"] == "decision"]
    assert dec["action"] == "passthrough" and dec["reason"] == "ignore_hosts"
    assert dec["pattern"] == "localhost" and dec["source"] == "--ignore-hosts"
    assert not [e for e in events if e["event"] in ("request", "response", "tls", "error")]
    [sd] = [e for e in events if e["event"] == "server_disconnect"]
    assert sd["bytes_received"] > 0 and sd["bytes_sent"] > 0
    assert events[-1]["passthrough"] == 1


def test_passthrough_with_the_clients_own_trust(home, tmp_path, tls_origin, pki):
    """The plain case: the real system CAs in the bundle, the origin trusted by the client
    itself (curl --cacert); the tunnel is relayed untouched."""
    url = tls_origin.url("/small", host="localhost")
    r = wrap(home, "--ignore-hosts", "localhost", "--",
             "curl", "-sS", "--cacert", str(pki.ca_path), url)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"hello\n"
    events = events_of(r.stdout)
    check_stream(events)
    assert [e["action"] for e in events if e["event"] == "decision"] == ["passthrough"]
    assert not [e for e in events if e["event"] in ("response", "error")]


def test_node_without_the_bundle_rejects_dumpproxy(dumpproxy, tmp_path, tls_origin, pki):
    """Control for the node test: the same client, same proxy, but no NODE_EXTRA_CA_CERTS,
    fails verification (so the wrap test's success is owed to the bundle)."""
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    env = {k: v for k, v in os.environ.items() if k not in CA_VARS and "proxy" not in k.lower()}
    env["HTTPS_PROXY"] = p.url
    cmd = client_command("node", tmp_path, tls_origin.url("/small", host="localhost"))
    r = subprocess.run(cmd, capture_output=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert b"TLS: " in r.stderr
    p.wait_for(lambda e: e["event"] == "error" and e["stage"] == "client_tls")


# --- commands that cannot run --------------------------------------------------------------


def assert_one_line_error(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("dumpproxy: error: "), text
    return lines[0]


def test_missing_command_is_127(home):
    r = wrap(home, "--", "/nonexistent/cmd", "arg")
    assert r.returncode == 127
    line = assert_one_line_error(r.stderr)
    assert "/nonexistent/cmd" in line
    check_stream(events_of(r.stdout))


def test_command_not_executable_is_126(home, tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = wrap(home, "--", str(script))
    assert r.returncode == 126
    assert str(script) in assert_one_line_error(r.stderr)


def test_nothing_after_double_dash_is_usage_error(home):
    r = wrap(home, "--")
    assert r.returncode == 2
    assert "'--'" in assert_one_line_error(r.stderr)
    assert r.stdout == b""


def test_curl_through_wrap_fails_without_dumpproxy_ca_control(home, tls_origin, pki):
    """Control: the same curl outside wrap mode, through the same kind of proxy, with only
    the system CAs fails — the wrap tests pass because of the bundle."""
    p = DumpProxy(["-p", "0", "-q", "--upstream-ca", str(pki.ca_path)], home)
    try:
        r = curl("-x", p.url, "--cacert", str(system_ca_file()),
                 tls_origin.url("/small", host="localhost"))
        assert r.returncode == 60, r.stderr  # CURLE_PEER_FAILED_VERIFICATION
    finally:
        p.stop()


def test_wrapped_origin_is_really_reached(home, tmp_path, pki):
    """Each exchange the child makes reaches the origin once (no hidden retries)."""
    o = Origin(pki.server_context(["localhost"]))
    try:
        url = o.url("/small", host="localhost")
        r = wrap(home, "--upstream-ca", str(pki.ca_path), "--", "curl", "-s", url, url)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b"hello\nhello\n"
        assert [(m, path) for m, path, _ in o.requests] == [("GET", "/small")] * 2
    finally:
        o.close()


# --- --proxyauth: the command's proxy URLs carry the credentials ----------------------------

AUTH_CLIENTS = ["curl", "requests", "urllib", "wget"]


@pytest.mark.parametrize("kind", AUTH_CLIENTS)
def test_proxyauth_credentials_reach_the_command(kind, home, tmp_path, origin, tls_origin,
                                                 pki):
    """With --proxyauth every proxy variable (and the wgetrc) carries USER:PASS, each part
    percent-encoded (a password with '@', ':' and '/' in it), so the command is let in
    over plain HTTP and CONNECT alike; no 407, no auth error."""
    out = tmp_path / "events.jsonl"
    urls = [origin.url("/small"), tls_origin.url("/small", host="localhost")]
    if kind in ("curl", "wget"):
        fetch = ("curl -sS" if kind == "curl" else "wget -q -O -")
        command = ["sh", "-c", " && ".join(f"{fetch} {u}" for u in urls)]
    else:
        script = tmp_path / "client.py"
        script.write_text(PY_CLIENT)
        command = ["sh", "-c", " && ".join(f'"$0" {script} {kind} {u}' for u in urls),
                   sys.executable]
    r = wrap(home, "--proxyauth", "alice:p@ss:w/rd", "--upstream-ca", str(pki.ca_path),
             "-o", str(out), "--", *command)
    assert r.returncode == 0, r.stderr
    if kind in ("curl", "wget"):
        assert r.stdout == b"hello\nhello\n"
    else:
        assert r.stdout.decode().splitlines() == [json.dumps([200, "hello\n"])] * 2
    events = events_of(out.read_text())
    check_stream(events)
    assert [(e["url"], e["status"]) for e in events if e["event"] == "response"] == [
        (u, 200) for u in urls]
    assert not [e for e in events if e["event"] == "error"]
    plain = [e for e in events if e["event"] == "request" and e["scheme"] == "http"]
    assert plain[0]["headers"]["proxy-authorization"] == "Basic <redacted>"


def test_proxyauth_proxy_variables(home, tmp_path):
    env_out = tmp_path / "env.json"
    r = wrap(home, "--proxyauth", "alice:p@ss:w/rd", "--", sys.executable, "-c",
             "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))",
             str(env_out))
    assert r.returncode == 0, r.stderr
    address = events_of(r.stdout)[0]["address"]
    child = json.loads(env_out.read_text())
    for name in PROXY_VARS:
        assert child[name] == f"http://alice:p%40ss%3Aw%2Frd@{address}", name
