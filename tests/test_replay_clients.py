"""Replay with real clients (issue 23, SPEC §9.3): recorded through dumpproxy from a real
origin (nginx), the origin stopped, the same client run again against `--replay`.

Every replay run checks that no upstream connection was made (no `server_connect`) and
that each response came from the record (`replayed`, `replay_source`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import curl
from examples import example, run_in_sandbox, shell_commands
from realorigins import Nginx
from test_clients import TIMEOUT, assert_quiet, bundle, settle, start


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


def replay(dumpproxy, pki, *args: str):
    return start(dumpproxy, pki, *(a for f in args for a in (
        ("--replay", f) if not f.startswith("-") else (f,))))


def assert_replayed(p, count: int) -> list[dict]:
    """`count` responses, all from the record, and not one upstream connection."""
    events = settle(p, responses=count)
    assert not [e for e in events if e["event"] in ("server_connect", "server_disconnect")]
    got = p.of("response")
    assert len(got) == count, got
    assert all(e.get("replayed") is True for e in got), got
    assert all(":" in e["replay_source"] for e in got), got
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


def test_miss_forwarded_extends_the_recording(dumpproxy, pki, nginx, tmp_path):
    cap, nxt = tmp_path / "cap.jsonl", tmp_path / "next.jsonl"
    p = record(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    assert curl("-x", p.url, "--cacert", trust, nginx.url("/hello.txt")).returncode == 0
    save(p, cap)

    # replayed where recorded, forwarded (and recorded with its body) where not
    p = start(dumpproxy, pki, "--replay", str(cap), "--replay-miss", "forward",
              "--record-for-replay")
    for version in ("--http1.1", "--http2"):
        for path in ("/hello.txt", "/app.js", "/style.css"):
            r = curl(version, "-x", p.url, "--cacert", trust, nginx.url(path))
            assert r.returncode == 0 and r.stdout, r.stderr
    assert_quiet(p, responses=6, connections=6)
    got = p.of("response")
    assert [("replayed" in e, e["url"].rsplit("/", 1)[1]) for e in got] == [
        (True, "hello.txt"), (False, "app.js"), (False, "style.css")] * 2
    # only the forwarded ones reached the origin (the pool may carry two on one connection)
    assert [("server" in e) for e in got] == [False, True, True] * 2
    assert p.of("server_connect")
    save(p, nxt)
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
