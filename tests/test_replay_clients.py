"""Replay with real clients (issue 23, SPEC §9.3): recorded through dumpproxy from a real
origin (nginx), the origin stopped, the same client run again against `--replay`.

Every replay run checks that no upstream connection was made (no `server_connect`) and
that each response came from the record (`replayed`, `replay_source`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import SCHEMA_CHECK, DumpProxy, curl, open_tunnel
from examples import example, run_in_sandbox, shell_commands
from realorigins import Nginx
from test_clients import (
    RESOLVE,
    TIMEOUT,
    assert_quiet,
    bundle,
    chromium,
    client_env,
    settle,
    start,
    stop_chromium,
    which,
)
from test_replay import chromium_har


@pytest.fixture
def nginx(tmp_path, pki) -> Nginx:
    """An origin of the test's own: the test stops it between recording and replaying."""
    n = Nginx(tmp_path / "nginx", pki)
    yield n
    n.close()


def record(dumpproxy, pki, *args: str):
    """A recording run; `save` writes its events as the capture (what
    `dumpproxy --record-for-replay > cap.jsonl` writes)."""
    return start(dumpproxy, pki, "--record-for-replay", *args)


def save(p, cap: Path) -> None:
    p.stop()
    cap.write_text("".join(p.lines))


def replay(dumpproxy, pki, source: str, *args: str):
    return start(dumpproxy, pki, "--replay", source, *args)


def assert_replayed(p, count: int) -> list[dict]:
    """`count` responses, all from the record, and not one upstream connection."""
    events = settle(p, responses=count)
    assert not [e for e in events if e["event"] in ("server_connect", "server_disconnect")]
    got = p.of("response")
    assert len(got) == count, got
    assert all(e.get("replayed") is True for e in got), got
    assert all(re.fullmatch(r".+(:\d+|#entry \d+)", e["replay_source"]) for e in got), got
    return got


# --- curl and httpx over HTTPS, HTTP/1.1 and HTTP/2 ---------------------------------------


H2_GET = """\
import asyncio, ssl, sys, hashlib, httpx
proxy, trust, *urls = sys.argv[1:]
async def main():
    ctx = ssl.create_default_context(cafile=trust)
    async with httpx.AsyncClient(http2=True, proxy=proxy, verify=ctx, timeout=60) as c:
        for url in urls:
            r = await c.get(url)
            print(r.status_code, r.http_version, hashlib.sha256(r.content).hexdigest())
asyncio.run(main())
"""


def test_curl_and_httpx_replay_over_https_with_the_origin_stopped(dumpproxy, pki, nginx,
                                                                  tmp_path):
    cap = tmp_path / "cap.jsonl"
    urls = [nginx.url("/hello.txt"), nginx.url("/big.bin"), nginx.url("/app.js", "cdn.test")]
    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))

    def clients(proxy) -> list[bytes]:
        out = []
        for version in ("--http1.1", "--http2"):
            for url in urls:
                r = curl(version, "-x", proxy.url, "--cacert", trust, "-w", "%{http_version}",
                         "-o", str(tmp_path / "body"), url)
                assert r.returncode == 0, r.stderr
                out.append(r.stdout + b" " + hashlib.sha256(
                    (tmp_path / "body").read_bytes()).hexdigest().encode())
        r = subprocess.run([sys.executable, "-c", H2_GET, proxy.url, trust, *urls],
                           capture_output=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        return out + r.stdout.splitlines()

    recorded = clients(p)
    assert_quiet(p, responses=9, connections=7)
    save(p, cap)
    nginx.close()  # the origin is gone

    p = replay(dumpproxy, pki, str(cap))
    assert clients(p) == recorded
    assert recorded[1].startswith(b"1.1 ") and recorded[4].startswith(b"2 ")
    assert recorded[-1].startswith(b"200 HTTP/2 ")
    got = assert_replayed(p, 9)
    assert {e["http_version"] for e in got} == {"HTTP/1.1", "HTTP/2.0"}
    assert not p.of("error")
    assert got[1]["response_bytes"] == 256 * 1024
    tls = [e for e in p.of("tls") if e["side"] == "client"]
    assert {e["alpn"] for e in tls} == {"http/1.1", "h2"}


# --- misses ---------------------------------------------------------------------------------


def test_miss_is_refused_naming_the_closest_recorded_requests(dumpproxy, pki, nginx,
                                                              tmp_path):
    cap = tmp_path / "cap.jsonl"
    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    paths = ["/hello.txt", "/app.js", "/style.css", "/local.svg"]
    for path in paths:
        assert curl("-x", p.url, "--cacert", trust, nginx.url(path)).returncode == 0
    assert curl("-x", p.url, "--cacert", trust, nginx.url("/lib.js", "cdn.test")).returncode == 0
    save(p, cap)
    nginx.close()

    p = replay(dumpproxy, pki, str(cap))
    for version in ("--http1.1", "--http2"):
        r = curl(version, "-x", p.url, "--cacert", trust, "-w", "\n%{http_code}",
                 nginx.url("/hello.txt?x=1"))
        body, status = r.stdout.decode().rsplit("\n", 1)
        assert status == "502", r
        assert f"not in the replay files: GET {nginx.url('/hello.txt?x=1')}" in body, body
    events = settle(p, responses=2, connections=2)
    errors = p.of("error")
    assert [e["stage"] for e in errors] == ["replay", "replay"]
    for err in errors:
        closest = err["message"].split("closest recorded: ")[1].split("; ")
        assert len(closest) == 3, err  # at most three
        assert closest[0].startswith(f"GET {nginx.url('/hello.txt')} ({cap}:"), closest
        assert "cdn.test" not in err["message"]  # only the host's own
    assert not [e for e in events if e["event"] == "server_connect"]
    got = p.of("response")
    assert [e["status"] for e in got] == [502, 502] and not [e for e in got if "replayed" in e]
    assert {e["flow"] for e in errors} == {e["flow"] for e in got}


def test_miss_forwarded_extends_the_recording(dumpproxy, pki, nginx, home, tmp_path):
    cap, nxt = tmp_path / "cap.jsonl", tmp_path / "next.jsonl"
    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    assert curl("-x", p.url, "--cacert", trust, nginx.url("/hello.txt")).returncode == 0
    save(p, cap)

    # replayed where recorded, forwarded (and recorded with its body) where not; -o FILE
    # writes the next recording
    p = DumpProxy(["-p", "0", "-q", "--upstream-ca", str(pki.ca_path), "--replay", str(cap),
                   "--replay-miss", "forward", "--record-for-replay", "-o", str(nxt)],
                  home, hosts=RESOLVE, wait_listening=False)
    try:
        deadline = time.monotonic() + 15
        while not (nxt.exists() and '"listening"' in nxt.read_text()):
            assert p.proc.poll() is None and time.monotonic() < deadline, p.stderr
            time.sleep(0.05)
        listening = json.loads(nxt.read_text().splitlines()[0])
        url = "http://" + listening["address"]
        for version in ("--http1.1", "--http2"):
            for path in ("/hello.txt", "/app.js", "/style.css"):
                r = curl(version, "-x", url, "--cacert", trust, nginx.url(path))
                assert r.returncode == 0 and r.stdout, r.stderr
    finally:
        assert p.stop() == 0
    events = [SCHEMA_CHECK.check(json.loads(line), line) for line in nxt.read_text().splitlines()]
    got = [e for e in events if e["event"] == "response"]
    assert [("replayed" in e, e["url"].rsplit("/", 1)[1]) for e in got] == [
        (True, "hello.txt"), (False, "app.js"), (False, "style.css")] * 2
    # only the forwarded ones reached the origin (the pool may carry two on one connection)
    assert [("server" in e) for e in got] == [False, True, True] * 2
    assert all("response_body" in e for e in got)
    assert [e for e in events if e["event"] == "server_connect"]
    assert not [e for e in events if e["event"] == "error"]
    nginx.close()

    p = replay(dumpproxy, pki, str(nxt))
    for path in ("/hello.txt", "/app.js", "/style.css"):
        r = curl("--http2", "-x", p.url, "--cacert", trust, nginx.url(path))
        assert r.returncode == 0 and r.stdout, r.stderr
    got = assert_replayed(p, 3)
    assert [e["replay_source"].split(":")[0] for e in got] == [str(nxt)] * 3


# --- the documented example ---------------------------------------------------------------


def test_example_replay_ci(tmp_path, pki):
    """README/man: record a job in wrap mode, list the record, stop the origin, run the
    job again from the record."""
    record_cmd, list_cmd, replay_cmd = shell_commands(example("replay-ci").text)
    run_tests = ("#!/bin/sh\nset -e\ncurl -sS https://example.com/\ncurl -sS http://example.com/\n"
                 "curl -sS -d 'q=1' https://example.com/\n")
    driver = f"""
{record_cmd}
{list_cmd} > list.txt
kill "$(pgrep -P "$PPID" -x python3)"  # the sandbox's origin (started by its setup)
origin_gone() {{ ! listening 443; }}
wait_until 20 origin_gone
{replay_cmd}
"""
    r, work = run_in_sandbox(tmp_path, pki, driver, files={"run-tests": run_tests})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.count("hello") == 6  # both runs' curl output
    listed = (work / "list.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in listed] == [
        "GET https://example.com:443/ 200 replayable",
        "GET http://example.com:80/ 200 replayable",
        "POST https://example.com:443/ 200 replayable"]
    events = [json.loads(x) for x in (work / "replayed.jsonl").read_text().splitlines()]
    got = [e for e in events if e["event"] == "response"]
    assert [(e["url"], e.get("replayed")) for e in got] == [
        ("https://example.com/", True), ("http://example.com/", True),
        ("https://example.com/", True)]
    assert [e["replay_source"] for e in got] == [line.split(" ")[0] for line in listed]
    assert not [e for e in events if e["event"] in ("server_connect", "error")]


# --- pip from a local simple index --------------------------------------------------------------


def build_wheel(directory: Path, name: str, version: str) -> Path:
    """A pure-Python wheel, built here (zip, dist-info, RECORD with hashes)."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\nSALT = {os.urandom(8).hex()!r}\n",
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record_path = f"{name}-{version}.dist-info/RECORD"
    files[record_path] = "\n".join(record + [f"{record_path},,"]) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def pip_install(proxy, trust: str, index: str, target: Path) -> subprocess.CompletedProcess:
    env = client_env(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", HOME=str(target.parent))
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
         "--index-url", index, "--proxy", proxy.url, "--cert", trust, "--target", str(target),
         "replaydemo"], capture_output=True, timeout=TIMEOUT, env=env)


def test_pip_install_from_a_local_index_recorded_then_replayed(dumpproxy, pki, nginx,
                                                               tmp_path):
    www = nginx.dir / "www"
    (www / "packages").mkdir()
    wheel = build_wheel(www / "packages", "replaydemo", "1.0")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (www / "simple" / "replaydemo").mkdir(parents=True)
    (www / "simple" / "replaydemo" / "index.html").write_text(
        f'<!doctype html><html><body><a href="../../packages/{wheel.name}#sha256={digest}">'
        f"{wheel.name}</a></body></html>\n")
    index = nginx.url("/simple/")
    cap = tmp_path / "cap.jsonl"

    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    r = pip_install(p, trust, index, tmp_path / "first")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_quiet(p, responses=2)
    save(p, cap)
    nginx.close()

    p = replay(dumpproxy, pki, str(cap))
    r = pip_install(p, trust, index, tmp_path / "second")
    assert r.returncode == 0, r.stdout + r.stderr  # pip checked the wheel's sha256
    got = assert_replayed(p, 2)
    assert got[-1]["url"] == nginx.url(f"/packages/{wheel.name}")
    installed = [(d / "replaydemo" / "__init__.py").read_text()
                 for d in (tmp_path / "first", tmp_path / "second")]
    assert installed[0] == installed[1] and "SALT" in installed[0]


# --- git clone over HTTP ------------------------------------------------------------------------


def test_git_clone_over_http_recorded_then_replayed(dumpproxy, pki, nginx, tmp_path):
    url = f"http://git.test:{nginx.http_port}/repo.git"
    cap = tmp_path / "cap.jsonl"

    def clone(proxy, to: Path) -> None:
        env = client_env(http_proxy=proxy.url, HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1",
                         GIT_TERMINAL_PROMPT="0")
        r = subprocess.run([which("git"), "clone", "-q", url, str(to)], capture_output=True,
                           timeout=TIMEOUT, env=env)
        assert r.returncode == 0, r.stderr
        assert (to / "README").read_text() == "a repository served by nginx\n"

    p = record(dumpproxy, pki)
    clone(p, tmp_path / "first")
    count = len(assert_quiet(p) and p.of("response"))
    assert count >= 3  # info/refs, HEAD, objects
    save(p, cap)
    nginx.close()

    p = replay(dumpproxy, pki, str(cap))
    clone(p, tmp_path / "second")
    assert_replayed(p, count)


# --- a browser's HAR export ---------------------------------------------------------------------


def test_chromium_shaped_har_replays(dumpproxy, pki, tmp_path):
    """A HAR in Chromium DevTools' export shape (test_replay.chromium_har): no origin ever
    existed for it; curl gets its page, its base64 image byte for byte, and its POST."""
    har = tmp_path / "chromium.har"
    har.write_bytes(chromium_har())
    p = replay(dumpproxy, pki, str(har))
    ca = str(p.home / "ca-cert.pem")
    for version in ("--http1.1", "--http2"):
        r = curl(version, "-x", p.url, "--cacert", ca, "https://app.test/")
        assert r.returncode == 0 and r.stdout == b"<p>replay</p>\n", r.stderr
        r = curl(version, "-x", p.url, "--cacert", ca, "https://app.test/logo.png")
        assert r.stdout.startswith(b"\x89PNG\r\n\x1a\n") and r.stdout[8:] == bytes(range(256))
        r = curl(version, "-x", p.url, "--cacert", ca, "-w", " %{http_code}",
                 "-H", "content-type: application/json", "-d", '{"a":1}',
                 "https://app.test/api?x=1")
        assert r.stdout == b'{"ok":true} 201', r
    got = assert_replayed(p, 6)
    assert [e["replay_source"] for e in got] == [
        f"{har}#entry {i}" for i in (1, 2, 3)] * 2
    assert got[0]["headers"]["content-type"] == "text/html"
    assert not [h for e in got for h in e["headers"] if h.startswith(":")]


# --- headless Chromium: a page with scripts, styles and images over HTTPS and HTTP/2 ----------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>replayed page</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="https://cdn.test:{port}/style.css">
<script src="https://cdn.test:{port}/lib.js"></script>
<script src="/app.js"></script>
</head>
<body><img id="a" src="/local.svg"><img id="b" src="https://cdn.test:{port}/logo.svg">
<p id="out">not loaded</p>
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images].every(i => i.complete && i.naturalWidth > 0);
  const css = getComputedStyle(document.body).marginLeft === "7px";
  document.getElementById("out").textContent =
    `lib=${{window.LIB === 1}} app=${{window.APP === 1}} imgs=${{imgs}} css=${{css}}`;
}});
</script>
</body></html>
"""


def test_chromium_page_load_recorded_then_replayed(dumpproxy, pki, nginx, tmp_path):
    """Headless Chromium loads a page whose script, stylesheet and images come from two
    host names over HTTPS (HTTP/2); the origin is stopped and the same load from the
    record renders the same DOM and makes the same requests."""
    (nginx.dir / "www" / "page.html").write_text(PAGE.format(port=nginx.port))
    url = nginx.url("/page.html")
    cap = tmp_path / "cap.jsonl"

    def load(proxy, profile: str) -> tuple[str, list[tuple]]:
        proc = chromium(proxy, pki, tmp_path / profile, url, extra=(
            "--dump-dom", "--virtual-time-budget=10000"), stdout=subprocess.PIPE)
        try:
            dom, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            stop_chromium(proc)
        settle(proxy, responses=6, connections=1)
        requests = sorted((e["method"], e["url"], e["status"], e["http_version"])
                          for e in proxy.of("response"))
        return dom.decode(), requests

    p = record(dumpproxy, pki)
    dom, requests = load(p, "first")
    assert "lib=true app=true imgs=true css=true" in dom, dom
    assert {r[3] for r in requests} == {"HTTP/2.0"} and len(requests) == 6, requests
    assert not p.of("error")
    save(p, cap)
    nginx.close()

    p = replay(dumpproxy, pki, str(cap))
    replayed_dom, replayed_requests = load(p, "second")
    assert replayed_dom == dom
    assert replayed_requests == requests
    assert_replayed(p, 6)
    assert [(e["stage"], e["message"]) for e in p.of("error")] == []


# --- matching options, bodies, passed-through destinations ---------------------------------------


def test_ignored_parameter_and_body_options(dumpproxy, pki, origin, tmp_path):
    """Plain HTTP through the explicit proxy, against the Python test origin's /echo (its
    answer names the request it got)."""
    cap = tmp_path / "cap.jsonl"
    p = record(dumpproxy, pki)
    first = curl("-x", p.url, "-d", "one", origin.url("/echo?q=a&t=100")).stdout
    assert b'"body": "one"' in first
    assert curl("-x", p.url, "-d", "two", origin.url("/echo?q=a&t=100")).returncode == 0
    save(p, cap)
    origin.close()

    p = replay(dumpproxy, pki, str(cap))  # body and every parameter count
    assert curl("-x", p.url, "-d", "one", origin.url("/echo?q=a&t=100")).stdout == first
    r = curl("-x", p.url, "-d", "one", "-w", " %{http_code}", origin.url("/echo?q=a&t=999"))
    assert r.stdout.endswith(b" 502")
    r = curl("-x", p.url, "-d", "three", "-w", " %{http_code}", origin.url("/echo?q=a&t=100"))
    assert r.stdout.endswith(b" 502")
    settle(p, responses=3, connections=3)
    assert [e["stage"] for e in p.of("error")] == ["replay", "replay"]

    p = replay(dumpproxy, pki, str(cap), "--replay-ignore-param", "t")
    assert curl("-x", p.url, "-d", "one", origin.url("/echo?q=a&t=999")).stdout == first
    assert curl("-x", p.url, "-d", "one", origin.url("/echo?q=a")).stdout == first
    p = replay(dumpproxy, pki, str(cap), "--replay-ignore-body")
    got = [curl("-x", p.url, "-d", "x", origin.url("/echo?q=a&t=100")).stdout
           for _ in range(3)]  # recorded order, then the last again
    assert got[0] == first and b'"body": "two"' in got[1] and got[2] == got[1]
    assert_replayed(p, 3)


def test_http2_request_body_forwarded_after_a_miss(dumpproxy, pki, tmp_path):
    """An HTTP/2 request is read whole to be matched; on a forwarded miss its body goes on
    to the destination (hypercorn, HTTP/2) whole, past HTTP/2's initial 64 KiB window."""
    from test_http2 import Hypercorn

    cert, key = pki.leaf(["localhost", "127.0.0.1"])
    origin = Hypercorn(cert, key)
    try:
        cap = tmp_path / "cap.jsonl"
        p = record(dumpproxy, pki)
        ca = str(p.home / "ca-cert.pem")
        assert curl("--http2", "-x", p.url, "--cacert", ca, origin.url("/small")).stdout
        save(p, cap)
        body = tmp_path / "body.bin"
        body.write_bytes(os.urandom(300 * 1024))
        p = start(dumpproxy, pki, "--replay", str(cap), "--replay-miss", "forward")
        r = curl("--http2", "-x", p.url, "--cacert", ca, "--data-binary", f"@{body}",
                 origin.url("/echo"))
        assert r.returncode == 0, r.stderr
        echo = json.loads(r.stdout)
        assert echo["http_version"] == "2" and echo["body_len"] == 300 * 1024
        assert echo["body_sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()
        assert curl("--http2", "-x", p.url, "--cacert", ca, origin.url("/small")).stdout
        settle(p, responses=2, connections=2)
        got = p.of("response")
        assert [("replayed" in e, "server" in e) for e in got] == [(False, True), (True, False)]
        assert got[0]["request_bytes"] == 300 * 1024 and not p.of("error")
    finally:
        origin.close()


def test_passed_through_destinations_are_not_replayed(dumpproxy, pki, nginx, tmp_path):
    cap = tmp_path / "cap.jsonl"
    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    assert curl("-x", p.url, "--cacert", trust, nginx.url("/hello.txt")).stdout == b"hello\n"
    save(p, cap)
    p = replay(dumpproxy, pki, str(cap), "--ignore-hosts", r"^app\.test:")
    assert curl("-x", p.url, "--cacert", trust, nginx.url("/hello.txt")).stdout == b"hello\n"
    events = settle(p)
    assert [e["action"] for e in events if e["event"] == "decision"] == ["passthrough"]
    assert p.of("server_connect") and not p.of("response")  # the origin answered, unrecorded


def test_reverse_mode_replays(dumpproxy, pki, tls_origin, tmp_path):
    """Reverse mode to an https target, a plaintext client: the record answers it too."""
    cap = tmp_path / "cap.jsonl"
    target = f"reverse:https://localhost:{tls_origin.port}"
    p = record(dumpproxy, pki, "--mode", target)
    assert curl(f"{p.url}/small").stdout == b"hello\n"
    save(p, cap)
    tls_origin.close()
    p = replay(dumpproxy, pki, str(cap), "--mode", target)
    assert curl(f"{p.url}/small").stdout == b"hello\n"
    [resp] = assert_replayed(p, 1)
    assert resp["url"] == f"https://localhost:{tls_origin.port}/small"


def test_silent_tunnel_to_a_recorded_destination_never_connects(dumpproxy, pki, tmp_path):
    """A browser's spare connection: CONNECT, then nothing until it closes."""
    har = tmp_path / "chromium.har"
    har.write_bytes(chromium_har())
    p = replay(dumpproxy, pki, str(har), "--peek-timeout", "0.2")
    sock = open_tunnel(p.port, "app.test:443")
    p.wait_for(lambda e: e["event"] == "client_connect")
    time.sleep(0.5)  # past the peek timeout: still silent
    sock.close()
    events = settle(p)
    assert not [e for e in events if e["event"] in ("server_connect", "error", "decision")]


def test_a_body_that_cannot_be_read_again_is_a_502(dumpproxy, pki, tls_origin, tmp_path):
    """Bodies are read from the capture when served: one changed since start-up gets 502
    and an error naming the recorded exchange (HTTP/1 and HTTP/2 alike)."""
    cap = tmp_path / "cap.jsonl"
    url = tls_origin.url("/small", host="localhost")
    p = record(dumpproxy, pki)
    ca = str(p.home / "ca-cert.pem")
    assert curl("-x", p.url, "--cacert", ca, url).stdout == b"hello\n"
    save(p, cap)
    p = replay(dumpproxy, pki, str(cap))
    assert curl("--http2", "-x", p.url, "--cacert", ca, url).stdout == b"hello\n"
    cap.write_text("")  # the capture is gone since start-up
    for version in ("--http1.1", "--http2"):
        r = curl(version, "-x", p.url, "--cacert", ca, "-w", " %{http_code}", url)
        assert r.stdout.endswith(b" 502") and b"cannot read the recorded body" in r.stdout
    settle(p, responses=3, connections=3)
    errors = p.of("error")
    assert [e["stage"] for e in errors] == ["replay", "replay"]
    assert all(e["message"].startswith(f"{cap}:") for e in errors), errors
    assert [e["status"] for e in p.of("response")] == [200, 502, 502]
