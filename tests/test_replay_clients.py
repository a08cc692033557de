"""Replay with real clients (issue 23, SPEC §9.3): recorded through dumpproxy from a real
origin (nginx), the origin stopped, the same client run again against `--replay`.

Every replay run checks that no upstream connection was made (no `server_connect`) and
that each response came from the record (`replayed`, `replay_source`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import curl
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
