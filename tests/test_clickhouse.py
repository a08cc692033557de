"""The ClickHouse fan-in recipe (contrib/clickhouse, README "Many proxies, one ClickHouse"):
a real clickhouse-server (Debian's package) on loopback ports in a temp dir, two dumpproxy
instances with traffic through each, both streams loaded by the README's block, and the
three example queries checked against the events."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, curl, free_port, stop_process
from test_readme import bin_dir, clean_env, marked_blocks, run_bash  # noqa: F401 (fixture)

CONTRIB = ROOT / "contrib" / "clickhouse"
INSTALL_HINT = ("apt-get install -y clickhouse-server clickhouse-client (Debian's packages; "
                ".ci/run installs them)")

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{dir}/server.log</log>
        <errorlog>{dir}/server.err.log</errorlog>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>16777216</mark_cache_size>
    <uncompressed_cache_size>16777216</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""

USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        if os.environ.get("CI"):  # CI installs the package: missing there is a failure
            raise AssertionError(f"{name} is not installed; {INSTALL_HINT}")
        pytest.skip(f"{name} is not installed; {INSTALL_HINT}")
    return path


class ClickHouse:
    """clickhouse-server with its own config, data and ports, in a temp dir."""

    def __init__(self, directory: Path):
        server = find_tool("clickhouse-server")
        self.client_path = find_tool("clickhouse-client")
        self.dir = directory
        self.tcp_port, self.http_port = free_port(), free_port()
        (directory / "config.xml").write_text(CONFIG.format(
            dir=directory, tcp_port=self.tcp_port, http_port=self.http_port))
        (directory / "users.xml").write_text(USERS)
        self.proc = subprocess.Popen(
            [server, f"--config-file={directory / 'config.xml'}"], cwd=directory,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"http://127.0.0.1:{self.http_port}/ping"
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.read().strip() == b"Ok.":
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = directory / "server.err.log"
                self.close()
                raise AssertionError("clickhouse-server did not start: " + (
                    log.read_text()[-2000:] if log.exists() else "no log"))
            time.sleep(0.1)

    @property
    def client_args(self) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(self.tcp_port)]

    def query(self, sql: str) -> list[dict]:
        r = subprocess.run([self.client_path, *self.client_args, "--query",
                            sql + " FORMAT JSONEachRow"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"{sql}\n{r.stderr}"
        return [json.loads(line) for line in r.stdout.splitlines()]

    def close(self) -> None:
        stop_process(self.proc, 30)


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ClickHouse]:
    d = tmp_path / "clickhouse"
    d.mkdir()
    ch = ClickHouse(d)
    yield ch
    ch.close()


def queries() -> list[str]:
    """The statements of contrib/clickhouse/queries.sql, comments dropped."""
    text = "\n".join(line for line in (CONTRIB / "queries.sql").read_text().splitlines()
                     if not line.lstrip().startswith("--"))
    return [q.strip() for q in text.split(";") if q.strip()]


def capture(p, path: Path) -> list[dict]:
    assert p.stop() == 0
    path.write_text("".join(p.lines))
    return [json.loads(line) for line in p.lines]


def test_example_clickhouse(tmp_path, dumpproxy, clickhouse, origin, origin2,
                                      bin_dir):  # noqa: F811
    # traffic through two dumpproxy instances
    alpha, beta = dumpproxy(), dumpproxy()
    for p, o, paths in ((alpha, origin, ["/small", "/small", "/status/404", "/echo"]),
                        (beta, origin2, ["/small", "/status/500", "/status/500"])):
        for path in paths:
            assert curl("-x", p.url, "-o", "/dev/null", o.url(path)).returncode == 0
    beta_origin = origin.url("/status/201")  # beta also talks to alpha's origin
    assert curl("-x", beta.url, "-o", "/dev/null", beta_origin).returncode == 0
    work = tmp_path / "fleet"
    (work / "captures").mkdir(parents=True)
    (work / "contrib").symlink_to(ROOT / "contrib")
    events = {"alpha": capture(alpha, work / "captures" / "alpha.jsonl"),
              "beta": capture(beta, work / "captures" / "beta.jsonl")}

    # the README's block, verbatim; clickhouse-client finds this test's server
    shim = bin_dir / "clickhouse-client"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(clickhouse.client_path)} "
                    f"{' '.join(clickhouse.client_args)} \"$@\"\n")
    shim.chmod(0o755)
    script = work / "recipe.sh"
    script.write_text(marked_blocks()["clickhouse"])
    # twice, as a re-run CI job would: loading again must not count anything twice
    for _ in range(2):
        r = run_bash(["-eu", "-o", "pipefail", str(script)], cwd=work,
                     env=clean_env(tmp_path, bin_dir))
        assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        assert r.stderr == ""

    every = [e for evs in events.values() for e in evs]
    rows = clickhouse.query("SELECT instance, count() AS n FROM dumpproxy.events FINAL "
                            "GROUP BY instance ORDER BY instance")
    assert rows == [{"instance": k, "n": str(len(v))} for k, v in events.items()] or rows == [
        {"instance": k, "n": len(v)} for k, v in events.items()]

    hosts_q, status_q, slow_q = queries()
    # hosts contacted per instance
    expected = Counter((name, e["address"], e["ip"]) for name, evs in events.items()
                       for e in evs if e["event"] == "server_connect")
    got = {(row["instance"], row["address"], row["ip"]): int(row["connections"])
           for row in clickhouse.query(hosts_q)}
    assert got == dict(expected)
    assert {k[1] for k in got if k[0] == "beta"} == {
        f"127.0.0.1:{origin2.port}", f"127.0.0.1:{origin.port}"}
    # status counts
    expected = Counter(e["status"] for e in every if e["event"] == "response")
    got = {int(row["status"]): int(row["responses"]) for row in clickhouse.query(status_q)}
    assert got == dict(expected) == {200: 4, 201: 1, 404: 1, 500: 2}
    # slowest URLs
    slowest: dict[str, float] = {}
    for e in every:
        if e["event"] == "response":
            slowest[e["url"]] = max(slowest.get(e["url"], 0.0), e["duration_ms"])
    rows = clickhouse.query(slow_q)
    assert {row["url"]: pytest.approx(row["slowest_ms"]) for row in rows} == slowest
    ms = [row["slowest_ms"] for row in rows]
    assert ms == sorted(ms, reverse=True)
    owner = {e["url"]: name for name, evs in events.items() for e in evs
             if e["event"] == "response"}
    assert all(row["instance"] == owner[row["url"]] for row in rows)

    # the block's own output is the three result sets (of the second run: no doubles)
    out = r.stdout
    assert f"alpha\t127.0.0.1:{origin.port}\t127.0.0.1:{origin.port}\t" in out
    assert "500\t2\n" in out and beta_origin in out
    # every line once (by its line number), and once merged, also without FINAL
    loaded = clickhouse.query("SELECT instance, line, event FROM dumpproxy.events FINAL "
                              "ORDER BY instance, line")
    assert [(x["instance"], int(x["line"]), x["event"]) for x in loaded] == [
        (name, n, e["event"]) for name, evs in events.items() for n, e in enumerate(evs, 1)]
    clickhouse.query("OPTIMIZE TABLE dumpproxy.events FINAL")
    rows = clickhouse.query("SELECT count() AS n FROM dumpproxy.events")
    assert int(rows[0]["n"]) == len(every)


def test_example_clickhouse_loader():
    """The README quotes load.sh's pipeline: the quote is the script's own line."""
    block = marked_blocks()["clickhouse-loader"].strip()
    script = (ROOT / "contrib" / "clickhouse" / "load.sh").read_text()
    assert block in [line.strip() for line in script.splitlines()]
