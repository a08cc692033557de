"""--isolate (issue 25): CMD in a network namespace whose only way out is dumpproxy.

Clients that ignore every proxy variable — curl --noproxy '*', a raw Python socket doing
TLS by itself — are recorded through the namespace's transparent listener; a name the
command cannot resolve from its own /etc/hosts is answered by dumpproxy's DNS; UDP other
than DNS is refused. Origins listen on the host's loopback (dumpproxy connects to them
from its own namespace); names resolve for dumpproxy through its private /etc/hosts
(`hosts=`), and its resolv.conf points at 127.0.0.1, where nothing answers, so no query
leaves the machine. Needs root (CI) or unprivileged user namespaces, ip and nft.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import Origin
from test_wrap import assert_one_line_error, clean_env, wrap

TIMEOUT = 60
NAMES = {"app.test": "127.0.0.1", "dns.test": "127.0.0.1"}

RAW_CLIENT = """\
# Ignores every variable: its own trust (the bundle's file, named on the command line),
# its own connection, its own DNS question for a name its /etc/hosts does not know, and a
# UDP datagram to an address outside (refused: it never leaves the namespace).
import json, socket, ssl, sys
cafile, port = sys.argv[1], int(sys.argv[2])
out = {"ip": socket.gethostbyname("dns.test")}
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection(("dns.test", port), timeout=20) as raw:
    with ctx.wrap_socket(raw, server_hostname="dns.test") as tls:
        tls.sendall(b"GET /small HTTP/1.1\\r\\nHost: dns.test\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
out["response"] = data.decode()
try:
    socket.gethostbyname("nowhere.test")
    out["nowhere"] = "resolved"
except socket.gaierror as e:
    out["nowhere"] = {socket.EAI_NONAME: "no such name",
                      socket.EAI_AGAIN: "try again"}.get(e.errno, str(e))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"ntp?", ("192.0.2.1", 123))
    out["udp"] = "sent"
except OSError as e:
    out["udp"] = e.strerror
print(json.dumps(out))
"""


def need_tools() -> None:
    for tool in ("ip", "nft", "unshare"):
        assert shutil.which(tool), f"{tool} is not installed (.ci/run installs it)"


def hosts_without_names(tmp_path: Path) -> Path:
    hosts = tmp_path / "child-hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    return hosts


def test_isolated_clients_that_ignore_the_proxy_are_recorded(dumpproxy, pki, tmp_path):
    need_tools()
    origin = Origin(pki.server_context(list(NAMES)))
    try:
        client = tmp_path / "raw.py"
        client.write_text(RAW_CLIENT)
        hosts = hosts_without_names(tmp_path)
        url = origin.url("/small", host="app.test")
        # curl resolves app.test from the shared /etc/hosts; the Python client, in a mount
        # namespace of its own without the names, asks DNS
        script = (f"curl -sS --noproxy '*' {url} && unshare -m sh -c "
                  f"'mount --bind {hosts} /etc/hosts && exec \"$0\" {client} "
                  f"\"$SSL_CERT_FILE\" {origin.port}' {sys.executable}")
        # dns.test is passed through, decided by the SNI (transparent mode knows no name
        # otherwise); the bundle's system part is the origin's CA (as in test_wrap.py)
        p = dumpproxy("--isolate", "--upstream-ca", str(pki.ca_path), "--ignore-hosts",
                      r"^dns\.test:", "--", "sh", "-c", script, hosts=NAMES,
                      env={"SSL_CERT_FILE": str(pki.ca_path)})
        code = p.proc.wait(TIMEOUT)
        p._reader.join(10)
        p._err_reader.join(10)
        out = p.stderr.decode().splitlines()
        assert code == 0, p.stderr
        assert out[0] == "hello", out
        got = json.loads(out[1])
        assert got["ip"] == "127.0.0.1"  # answered by dumpproxy, from its /etc/hosts
        assert got["response"].startswith("HTTP/1.1 200 ") and got["response"].endswith(
            "\r\n\r\nhello\n"), got
        # dumpproxy's own resolver has no server to ask: SERVFAIL, passed on as such
        assert got["nowhere"] == "try again"
        assert got["udp"] == "Operation not permitted"  # refused inside the namespace
        modes = [e["mode"] for e in p.of("listening")]
        assert modes[0] == "regular" and "transparent" in modes[1:], modes
        decisions = [(e["address"], e["sni"], e["action"]) for e in p.of("decision")]
        assert decisions == [(f"127.0.0.1:{origin.port}", "app.test", "intercept"),
                             (f"127.0.0.1:{origin.port}", "dns.test", "passthrough")], decisions
        assert [e["url"] for e in p.of("response")] == [url]
        [passed] = [e for e in p.of("server_disconnect") if e["conn"] == 2]
        assert passed["bytes_received"] > 0 and passed["bytes_sent"] > 0
        assert not p.of("error"), p.of("error")
        assert [(m, path) for m, path, _ in origin.requests] == [("GET", "/small")] * 2
    finally:
        origin.close()


def test_isolated_command_runs_as_given(home, tmp_path):
    """Exit status, stdout to stderr, a command that cannot be found (127, one line)."""
    need_tools()
    r = wrap(home, "--isolate", "--", "sh", "-c", "echo inside; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stderr == b"inside\n"
    r = wrap(home, "--isolate", "--", "/nonexistent/cmd")
    assert r.returncode == 127
    assert "/nonexistent/cmd" in assert_one_line_error(r.stderr)


def test_isolate_where_it_cannot_run_says_why(home, tmp_path):
    """Without nft: one line naming what is missing, exit 1, nothing run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "sh"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    marker = tmp_path / "ran"
    env = clean_env(home, PATH=str(bin_dir))
    r = wrap(home, "--isolate", "--", "sh", "-c", f": > {marker}", env=env)
    assert r.returncode == 1
    line = assert_one_line_error(r.stderr)
    assert line == "dumpproxy: error: --isolate needs nft (nftables), not found on PATH"
    assert not marker.exists()
    assert r.stdout == b""


@pytest.mark.parametrize("option", ["--isolate", "--no-browser-flags"])
def test_wrap_mode_options_need_a_command(home, option):
    r = wrap(home, option)
    assert r.returncode == 2
    assert assert_one_line_error(r.stderr) == (
        f"dumpproxy: error: {option} is for wrap mode: dumpproxy {option} [OPTIONS] -- CMD "
        "[ARG...]")
