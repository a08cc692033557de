"""The README's mode examples run: each marked `<!-- test: mode-NAME -->` block is run by
bash verbatim, except that its fixed ports become free ones and `example.com` the
suite's local HTTPS origin (dumpproxy trusts the origin's CA through SSL_CERT_FILE, as in
test_readme's CI recipe). The transparent example runs in a network namespace of the
test's own. Loopback only."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from conftest import Origin, free_port
from test_modes_transparent import CLIENT_UID, as_client, netns  # noqa: F401 (fixture)
from test_modes_upstream import Tinyproxy
from test_readme import (  # noqa: F401 (bin_dir: a fixture)
    bin_dir,
    clean_env,
    marked_blocks,
    run_bash,
    shell_commands,
)

EXPECTED_BLOCKS = {"mode-secure", "mode-upstream", "mode-reverse", "mode-socks5",
                   "mode-several", "mode-transparent"}


def test_every_mode_has_a_tested_example():
    assert {n for n in marked_blocks() if n.startswith("mode-")} == EXPECTED_BLOCKS


def run_block(name: str, tmp_path, bin_dir, tls_origin, pki, ports: dict[int, int]):  # noqa: F811
    block = marked_blocks()[name]
    block = block.replace("https://example.com", f"https://localhost:{tls_origin.port}")
    for fixed, port in ports.items():
        block = re.sub(rf"(?<![\d.]){fixed}(?!\d)", str(port), block)
    (tmp_path / "home").mkdir(exist_ok=True)
    env = clean_env(tmp_path, bin_dir, SSL_CERT_FILE=str(pki.ca_path))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "example.sh").write_text(block)
    r = run_bash(["-eu", "-o", "pipefail", "example.sh"], cwd=work, env=env)
    assert r.returncode == 0, f"{block}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_example_mode_secure(tmp_path, bin_dir, tls_origin, pki):  # noqa: F811
    p = free_port()
    out = run_block("mode-secure", tmp_path, bin_dir, tls_origin, pki, {8080: p})
    t = tls_origin.port
    assert out[0] == ["client", f"127.0.0.1:{p}"]
    assert sorted(out[1:]) == [["client", f"localhost:{t}"], ["server", f"localhost:{t}"]]


def test_example_mode_upstream(tmp_path, bin_dir, tls_origin, pki):  # noqa: F811
    tp = Tinyproxy(tmp_path, user=None)
    try:
        out = run_block("mode-upstream", tmp_path, bin_dir, tls_origin, pki, {3128: tp.port})
    finally:
        tp.stop()
    assert out == [[f"localhost:{tls_origin.port}", f"http://127.0.0.1:{tp.port}"]]


def test_example_mode_reverse(tmp_path, bin_dir, tls_origin, pki):  # noqa: F811
    out = run_block("mode-reverse", tmp_path, bin_dir, tls_origin, pki, {8443: free_port()})
    # through to the origin and back (the suite's origin has no page at /)
    assert out == [[404, f"https://localhost:{tls_origin.port}/"]]


def test_example_mode_socks5(tmp_path, bin_dir, tls_origin, pki):  # noqa: F811
    out = run_block("mode-socks5", tmp_path, bin_dir, tls_origin, pki, {1080: free_port()})
    t = tls_origin.port
    assert out == [[f"localhost:{t}", "intercept", [f"127.0.0.1:{t}", f"localhost:{t}"]]]


def test_example_mode_several(tmp_path, bin_dir, tls_origin, pki):  # noqa: F811
    a, b = free_port(), free_port()
    out = run_block("mode-several", tmp_path, bin_dir, tls_origin, pki, {8080: a, 1080: b})
    assert out == [["regular", f"127.0.0.1:{a}"], ["socks5", f"127.0.0.1:{b}"]]


def test_example_mode_transparent(netns, dumpproxy):  # noqa: F811
    """The example's nft commands and dumpproxy command, run in a namespace of the test's
    own; user 1000 becomes the test's client user, ports 80/443 the origin's."""
    block = marked_blocks()["mode-transparent"]
    *rules, command = shell_commands(block)
    assert all(r.startswith("nft ") for r in rules) and command.startswith("dumpproxy ")
    with netns.inside():
        origin = Origin()
        try:
            port = free_port()
            for rule in rules:
                rule = rule.replace("8080", str(port))
                rule = rule.replace("skuid 1000", f"skuid {CLIENT_UID}")
                rule = rule.replace("{ 80, 443 }", f"{{ {origin.port} }}")
                subprocess.run(["bash", "-c", rule], check=True)
            args = shlex.split(command.replace("8080", str(port)))[1:]
            p = dumpproxy(*args)
            assert p.events[0]["mode"] == "transparent" and p.port == port
            r = as_client(origin.url())
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"hello\n"
            d = p.wait_for(lambda e: e["event"] == "decision")
            assert d["address"] == f"127.0.0.1:{origin.port}" and d["action"] == "intercept"
            assert d["candidates"] == [f"127.0.0.1:{origin.port}"]
            p.wait_for(lambda e: e["event"] == "response")
            assert not p.of("error")
        finally:
            origin.close()
