"""Log rotation: `mv` the -o file under traffic, SIGHUP, and every event is in exactly one
of the two files, whole; the same signal reloads the pattern files."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT

MAX_REQUESTS = 3000  # the client loop is bounded in count ...
MAX_SECONDS = 90  # ... and in time (longer than the test's three waits together)


def start(out: Path, home: Path, *args: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, DUMPPROXY_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "dumpproxy", "-p", "0", "-q", "-o", str(out),
                             *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not (out.exists() and out.read_text().endswith("\n")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no listening line"
        time.sleep(0.02)
    port = int(json.loads(out.read_text().splitlines()[0])["address"].rsplit(":", 1)[1])
    return proc, port


def lines_of(path: Path) -> list[dict]:
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), f"{path.name} ends mid-line"
    return [json.loads(line) for line in data.splitlines()]


def wait_until(pred, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        state = getattr(pred, "state", lambda: "")
        assert time.monotonic() < deadline, f"timed out waiting for {what} {state()}"
        time.sleep(0.02)


class TrafficInto:
    """A wait_until predicate: `n` responses in `path`. It fails at once, saying why, when
    the client loop has stopped; on a timeout, `state` says where the events went."""

    def __init__(self, path: Path, n: int, traffic: Traffic, other: Path):
        self.path, self.n, self.traffic, self.other = path, n, traffic, other

    def __call__(self) -> bool:
        if count(self.path, "response") >= self.n:
            return True
        t = self.traffic
        assert t.is_alive(), f"the client loop stopped after {t.ok} requests: {t.failure!r}"
        return False

    def state(self) -> str:
        return (f"({self.traffic.ok} requests answered; responses in {self.path.name}: "
                f"{count(self.path, 'response')}, in {self.other.name}: "
                f"{count(self.other, 'response')})")


def count(path: Path, event: str) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b'"event":"%s"' % event.encode())


class Traffic(threading.Thread):
    """Requests through the proxy in a loop, a new client connection every 10."""

    def __init__(self, port: int, url: str):
        super().__init__(daemon=True)
        self.port, self.url = port, url
        self.stop = threading.Event()
        self.ok = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        conn = None
        try:
            for i in range(MAX_REQUESTS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                if i % 10 == 0:
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", self.url)
                r = conn.getresponse()
                body = r.read()
                assert r.status == 200 and body == b"hello\n", (r.status, body)
                self.ok += 1
        except BaseException as e:  # reported by the test
            self.failure = e
        finally:
            if conn is not None:
                conn.close()


def test_rename_and_sighup_under_traffic(tmp_path, home, origin, origin2):
    out, rotated = tmp_path / "traffic.jsonl", tmp_path / "traffic.jsonl.1"
    patterns = tmp_path / "ignore.txt"
    patterns.write_text("# nothing ignored yet\n")
    proc, port = start(out, home, "--ignore-hosts-file", str(patterns))
    traffic = Traffic(port, origin.url("/small"))
    traffic.start()
    try:
        wait_until(TrafficInto(out, 50, traffic, rotated), "traffic before the rename")
        subprocess.run(["mv", str(out), str(rotated)], check=True)
        wait_until(TrafficInto(rotated, 60, traffic, out), "traffic between mv and HUP")
        patterns.write_text(f"^127\\.0\\.0\\.1:{origin2.port}$\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(TrafficInto(out, 50, traffic, rotated), "traffic into the new file")
        # the same signal reloaded the patterns: origin2 is now passed through
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", origin2.url("/small"))
        assert c.getresponse().read() == b"hello\n"
        c.close()
    finally:
        traffic.stop.set()
        traffic.join(MAX_SECONDS)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
    assert traffic.failure is None, repr(traffic.failure)

    old, new = lines_of(rotated), lines_of(out)  # every line whole JSON
    assert old[0]["event"] == "listening" and new[-1]["event"] == "shutdown"
    assert [e["event"] for e in old + new].count("listening") == 1
    assert [e["event"] for e in old + new].count("shutdown") == 1
    assert any(e["event"] == "response" for e in old) and any(
        e["event"] == "response" for e in new)
    # every event exactly once across the two files
    both = old + new
    requests = [e["flow"] for e in both if e["event"] == "request"]
    responses = [e["flow"] for e in both if e["event"] == "response"]
    assert len(requests) == len(set(requests)) == traffic.ok
    assert sorted(requests) == sorted(responses) == list(range(1, traffic.ok + 1))
    connects = [e["conn"] for e in both if e["event"] == "client_connect"]
    disconnects = [e["conn"] for e in both if e["event"] == "client_disconnect"]
    assert len(connects) == len(set(connects)) and sorted(connects) == sorted(disconnects)
    # the old file ends where the new one starts: flows are numbered in emission order
    assert max(e["flow"] for e in old if e["event"] == "request") < min(
        e["flow"] for e in new if e["event"] == "request")
    shutdown = new[-1]
    assert shutdown["requests"] == traffic.ok + 1  # + the passed-through one
    assert shutdown["connections"] == len(connects)
    decision = [e for e in new if e["event"] == "decision"
                and e["address"] == f"127.0.0.1:{origin2.port}"]
    assert decision and decision[0]["action"] == "passthrough"
    assert not [e for e in both if e["event"] == "error"]


def test_failed_reopen_keeps_the_old_file(tmp_path, home, origin):
    out, rotated = tmp_path / "traffic.jsonl", tmp_path / "traffic.jsonl.1"
    proc, port = start(out, home)
    try:
        subprocess.run(["mv", str(out), str(rotated)], check=True)
        out.mkdir()  # the path cannot be opened as a file
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: count(rotated, "error") == 1, "the reopen error")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", origin.url("/small"))
        assert c.getresponse().read() == b"hello\n"
        c.close()
        wait_until(lambda: count(rotated, "response") == 1, "the response in the old file")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
    events = lines_of(rotated)
    (err,) = [e for e in events if e["event"] == "error"]
    assert err["stage"] == "reload"
    assert err["message"] == (f"cannot reopen {out}: Is a directory; writing on to the "
                              "old file")
    assert events[-1]["event"] == "shutdown"


def test_example_logrotate(tmp_path, home, origin):
    """The SIGNALS section's logrotate configuration, run by the real logrotate(8) with its
    paths moved into a temp dir."""
    from test_har import man_examples

    logrotate = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin")
    assert logrotate, "logrotate is not installed (CI installs it)"
    snippet = "\n".join(man_examples("SIGNALS")) + "\n"
    assert "/var/log/dumpproxy/traffic.jsonl {" in snippet and "/run/dumpproxy.pid" in snippet
    logs = tmp_path / "log"
    logs.mkdir()
    pidfile = tmp_path / "dumpproxy.pid"
    conf = tmp_path / "dumpproxy.logrotate"
    conf.write_text(snippet.replace("/var/log/dumpproxy", str(logs))
                    .replace("/run/dumpproxy.pid", str(pidfile)))
    out = logs / "traffic.jsonl"
    proc, port = start(out, home)

    def request(path: str) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", origin.url(path))
        assert c.getresponse().status in (200, 404)
        c.close()

    try:
        pidfile.write_text(f"{proc.pid}\n")
        request("/small")
        wait_until(lambda: count(out, "response") == 1, "the first response")
        r = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rotated = logs / "traffic.jsonl.1"  # delaycompress: the newest stays plain
        wait_until(out.exists, "the reopened file")
        request("/status/404")
        wait_until(lambda: count(out, "response") == 1, "a response in the new file")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
    old, new = lines_of(rotated), lines_of(out)
    assert [e["event"] for e in old][0] == "listening"
    assert [e["status"] for e in old if e["event"] == "response"] == [200]
    assert [e["status"] for e in new if e["event"] == "response"] == [404]
    assert new[-1]["event"] == "shutdown" and new[-1]["requests"] == 2
