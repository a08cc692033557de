"""`dumpproxy har` read by another program: mitmproxy's HAR reader (mitmproxy.io.har, the
code behind `mitmdump -nr file.har`), entry by entry: method, URL, status, HTTP version
and the exact bytes of both bodies, binary ones included.

mitmproxy is not a dependency of dumpproxy or of its tests: it lives in a venv of its own,
made on first use under ~/.cache (from the package registry) or named by
DUMPPROXY_TEST_MITMPROXY_PYTHON (its python). mitmproxy 11 runs on Python 3.11.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_http2
from conftest import curl, run_cli

h2_origin = test_http2.h2_origin  # an HTTPS origin that speaks h2

MITMPROXY = "mitmproxy==11.0.2"
READER = r"""
import hashlib, json, sys
from mitmproxy.io.har import request_to_flow
doc = json.load(open(sys.argv[1]))
for entry in doc["log"]["entries"]:
    f = request_to_flow(entry)
    print(json.dumps([f.request.method, f.request.url, f.response.status_code,
                      f.request.http_version, f.response.http_version,
                      hashlib.sha256(f.request.content or b"").hexdigest(),
                      hashlib.sha256(f.response.content or b"").hexdigest()]))
"""


@pytest.fixture(scope="session")
def mitmproxy_python() -> str:
    given = os.environ.get("DUMPPROXY_TEST_MITMPROXY_PYTHON")
    if given:
        return given
    venv = Path.home() / ".cache" / "dumpproxy-tests" / MITMPROXY.replace("==", "-")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", MITMPROXY],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"installing {MITMPROXY} for this test failed:\n{r.stderr}"
    return str(python)


def _body(ev: dict, prefix: str) -> bytes:
    text = ev.get(prefix, "")
    return base64.b64decode(text) if ev.get(f"{prefix}_encoding") == "base64" else \
        text.encode()


def test_mitmproxy_reads_our_har_entry_by_entry(dumpproxy, origin, h2_origin, pki, tmp_path,
                                                mitmproxy_python):
    p = dumpproxy("--bodies", "--upstream-ca", str(pki.ca_path))
    ca = str(p.home / "ca-cert.pem")
    binary = bytes(range(256)) * 16  # 4,096 bytes, not UTF-8
    (tmp_path / "bin.dat").write_bytes(binary)
    for args in (
        [origin.url("/small")],
        ["--data", "a=1&b=two", origin.url("/echo")],
        ["-H", "Content-Type: application/octet-stream", "--data-binary",
         f"@{tmp_path / 'bin.dat'}", origin.url("/echo")],
        [origin.url("/binary/4096")],
        [origin.url("/status/404")],
        ["--http2", "--cacert", ca, h2_origin.url("/small")],
        ["--http2", "--cacert", ca, "-H", "Content-Type: application/octet-stream",
         "--data-binary", f"@{tmp_path / 'bin.dat'}", h2_origin.url("/echo")],
    ):
        r = curl("-x", p.url, "-o", "/dev/null", *args)
        assert r.returncode == 0, (args, r.stderr)
    p.wait_for(lambda e: e["event"] == "response", count=7)
    assert p.stop() == 0
    capture = tmp_path / "cap.jsonl"
    capture.write_text("".join(p.lines))
    r = run_cli("har", str(capture))
    assert r.returncode == 0, r.stderr
    har_file = tmp_path / "cap.har"
    har_file.write_bytes(r.stdout)

    got = subprocess.run([mitmproxy_python, "-c", READER, str(har_file)],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    read = [json.loads(line) for line in got.stdout.splitlines()]
    responses = [e for e in p.events if e["event"] == "response"]
    versions = {"HTTP/1.1": "HTTP/1.1", "HTTP/2.0": "HTTP/2"}
    expected = [[e["method"], e["url"], e["status"], versions[e["http_version"]],
                 versions[e["http_version"]],
                 hashlib.sha256(_body(e, "request_body")).hexdigest(),
                 hashlib.sha256(_body(e, "response_body")).hexdigest()] for e in responses]
    assert read == expected
    # the binary bodies are among them, whole
    digest = hashlib.sha256(binary).hexdigest()
    assert sum(row[5] == digest for row in read) == 2  # two binary uploads
    assert sum(row[6] == digest for row in read) == 1  # one binary download
