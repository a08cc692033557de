"""Wrap mode per runtime (issue 25): a small client in each runtime, run as
`dumpproxy -- CMD`, makes one HTTPS request that is intercepted (app.test) and one that is
passed through (cdn.test, --ignore-hosts); each shows its events and no `error`.

The origin is nginx (tests/realorigins.py); app.test and cdn.test resolve to 127.0.0.1
through dumpproxy's private /etc/hosts, which the wrapped command shares. The bundle's
"system CAs" are the origin's CA (SSL_CERT_FILE for dumpproxy only stands in for a system
root, as in tests/test_wrap.py), so a passed-through request verifies only through what
wrap mode gave the runtime. The runtimes come from Debian (Java, Go, Ruby, PHP, Chromium,
Node), npm (Deno, Bun: tests/clients/package.json) and PyPI (aiohttp); .ci/run installs
them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, DumpProxy
from realorigins import HOSTS, Nginx
from test_cli_docs import macro_text, man_section
from test_clients import assert_quiet, spki_pin, which

from dumpproxy.wrapenv import browser_command, is_browser, java_non_proxy_hosts

CLIENTS = ROOT / "tests" / "clients"
WRAP_CLIENTS = CLIENTS / "wrap"
RESOLVE = {name: "127.0.0.1" for name in HOSTS}
TIMEOUT = 120
PASS = r"^cdn\.test:"

# Every runtime of the man page's "Runtimes" table, and where its wrap-mode test is. The
# runtimes of this module each run `client_command(name)`.
HERE = "tests/test_wrap_runtimes.py"
RUNTIME_TESTS = {
    "curl": "tests/test_wrap.py",
    "wget": "tests/test_clients.py",
    "git": "tests/test_clients.py",
    "Python requests, httpx, urllib": "tests/test_wrap.py",
    "Python aiohttp": HERE,
    "Node.js fetch": HERE,
    "Node.js http, https": HERE,
    "Deno": HERE,
    "Bun": HERE,
    "Java": HERE,
    "Go": HERE,
    "Ruby": HERE,
    "PHP": HERE,
    "Chromium, Chrome": HERE,
}


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, pki) -> Nginx:
    n = Nginx(tmp_path_factory.mktemp("nginx"), pki)
    yield n
    n.close()


@pytest.fixture(scope="module")
def go_client(tmp_path_factory) -> Path:
    """The Go client, built once (go run would build it per test)."""
    out = tmp_path_factory.mktemp("go") / "client"
    r = subprocess.run([which("go"), "build", "-o", str(out), str(WRAP_CLIENTS / "client.go")],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def npm_bin(name: str) -> str:
    path = CLIENTS / "node_modules" / ".bin" / name
    assert path.exists(), (f"{name} is missing: run `npm install --prefix tests/clients` "
                           "(.ci/run does)")
    return str(path)


def no_hosts_view(tmp_path: Path, *cmd: str) -> list[str]:
    """CMD with an /etc/hosts of its own that knows neither test name. Ruby's Net::HTTP
    sends a name that resolves to loopback past the proxy; a name it cannot resolve
    stands in for one that resolves elsewhere (the proxy resolves it)."""
    hosts = tmp_path / "client-hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    return ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && exec \"$@\"",
            "sh", *cmd]


def client_command(runtime: str, tmp_path: Path, go: Path) -> list[str]:
    c = WRAP_CLIENTS
    if runtime == "Java":
        return [which("java"), str(c / "Client.java")]
    if runtime == "Go":
        return [str(go)]
    if runtime == "Ruby":
        return no_hosts_view(tmp_path, which("ruby"), str(c / "client.rb"))
    if runtime == "PHP":
        return [which("php"), str(c / "client.php")]
    if runtime == "Node.js fetch":
        return [which("node"), str(c / "fetch.mjs")]
    if runtime == "Node.js http, https":
        return [which("node"), str(c / "https.js")]
    if runtime == "Deno":
        return [npm_bin("deno"), "run", "--allow-net", str(c / "client.ts")]
    if runtime == "Bun":
        return [npm_bin("bun"), str(c / "fetch.mjs")]
    if runtime == "Python aiohttp":
        return [sys.executable, str(c / "aiohttp_client.py")]
    raise AssertionError(runtime)


CLIENT_RUNTIMES = [r for r, where in RUNTIME_TESTS.items()
                   if where == HERE and not r.startswith("Chromium")]


def wrap(dumpproxy, pki, *args: str, env: dict | None = None) -> DumpProxy:
    """dumpproxy [ARGS] -- CMD; the bundle's system part is the origin's CA."""
    return dumpproxy("--upstream-ca", str(pki.ca_path), *args, hosts=RESOLVE,
                     env={"SSL_CERT_FILE": str(pki.ca_path), "DENO_NO_UPDATE_CHECK": "1",
                          **(env or {})})


def finished(p: DumpProxy) -> int:
    code = p.proc.wait(TIMEOUT)
    p._reader.join(10)
    p._err_reader.join(10)
    return code


@pytest.mark.parametrize("runtime", CLIENT_RUNTIMES)
def test_runtime_in_wrap_mode(runtime, dumpproxy, pki, nginx, tmp_path, go_client):
    cmd = client_command(runtime, tmp_path, go_client)
    intercepted = nginx.url("/hello.txt")
    passed = nginx.url("/hello.txt", host="cdn.test")
    p = wrap(dumpproxy, pki, "--ignore-hosts", PASS, "--", *cmd, intercepted, passed,
             env={"HOME": str(tmp_path)})
    code = finished(p)
    out = p.stderr.decode(errors="replace")  # the command's stdout is on our stderr
    assert code == 0, out
    assert out.endswith("200 hello\n200 hello\n"), out
    assert_quiet(p, responses=1, connections=2)
    decisions = [(e["address"].split(":")[0], e["action"]) for e in p.of("decision")]
    assert decisions == [("app.test", "intercept"), ("cdn.test", "passthrough")], decisions
    [req] = p.of("request")
    [resp] = p.of("response")
    assert req["url"] == resp["url"] == intercepted
    assert resp["status"] == 200
    [tunnel] = [e for e in p.of("server_disconnect") if e["address"].startswith("cdn.test")]
    assert tunnel["bytes_received"] > 0 and tunnel["bytes_sent"] > 0
    assert p.events[-1]["event"] == "shutdown" and p.events[-1]["errors"] == 0


def test_node_without_the_preload_goes_direct(dumpproxy, pki, nginx, tmp_path):
    """Control: Node 20's fetch with the proxy variables alone goes past the proxy (no
    event), so the preload is what brings it in."""
    node = which("node")
    version = subprocess.run([node, "-p", "process.versions.node"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if int(version.split(".")[0]) >= 24:
        pytest.skip(f"Node {version} reads the proxy variables itself (NODE_USE_ENV_PROXY)")
    p = wrap(dumpproxy, pki, "--", "sh", "-c",
             'NODE_OPTIONS= exec "$0" "$@"', node, str(WRAP_CLIENTS / "fetch.mjs"),
             nginx.url("/hello.txt"))
    code = finished(p)
    assert code == 0, p.stderr  # reached nginx directly (the bundle trusts the origin CA)
    assert not p.of("client_connect"), p.lines


def test_node_preload_keeps_no_proxy(dumpproxy, pki, nginx, tmp_path):
    """NO_PROXY hosts go direct with the preload too, for fetch and https alike."""
    for client in ("fetch.mjs", "https.js"):
        p = wrap(dumpproxy, pki, "--", which("node"), str(WRAP_CLIENTS / client),
                 nginx.url("/hello.txt"), nginx.url("/hello.txt", host="cdn.test"),
                 env={"NO_PROXY": "cdn.test"})
        assert finished(p) == 0, p.stderr
        assert p.stderr.decode().endswith("200 hello\n200 hello\n"), p.stderr
        assert [e["address"].split(":")[0] for e in p.of("decision")] == ["app.test"]


def test_java_non_proxy_hosts():
    assert java_non_proxy_hosts([]) == ""
    assert java_non_proxy_hosts(["example.com", ".internal", "*.corp", "10.0.0.1:8080",
                                 "[::1]:80", "*"]) == (
        "example.com|*.internal|*.corp|10.0.0.1|[::1]|*")


def test_browser_command_keeps_the_users_choices():
    cmd = ["/opt/google/chrome/google-chrome", "--proxy-server=socks5://127.0.0.1:1080",
           "--ignore-certificate-errors-spki-list=AAA", "https://example.com/"]
    assert is_browser(cmd) and not is_browser(["chromium-ish"])
    assert browser_command(cmd, "http://127.0.0.1:1", "PIN", ["x.test"]) == [
        cmd[0], cmd[1], "--ignore-certificate-errors-spki-list=AAA,PIN", cmd[3]]
    cmd = ["chromium", "--proxy-bypass-list=*.test", "about:blank"]
    assert browser_command(cmd, "http://127.0.0.1:1", "PIN", ["x.test"]) == [
        "chromium", "--proxy-server=http://127.0.0.1:1",
        "--ignore-certificate-errors-spki-list=PIN", *cmd[1:]]
    assert browser_command(["chromium"], "http://127.0.0.1:1", "PIN", ["a.test", ".b"]) == [
        "chromium", "--proxy-server=http://127.0.0.1:1",
        "--proxy-bypass-list=<-loopback>;a.test;.b", "--ignore-certificate-errors-spki-list=PIN"]
    # --proxyauth: Chromium's --proxy-server takes no credentials
    assert browser_command(["chromium"], "http://u:p%40ss@127.0.0.1:1", "PIN", [])[1] == (
        "--proxy-server=http://127.0.0.1:1")
    # --isolate: no proxy to name, the pin only
    assert browser_command(["chromium"], None, "PIN", []) == [
        "chromium", "--ignore-certificate-errors-spki-list=PIN"]


# --- Chromium ------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-default-apps"]


def test_chromium_in_wrap_mode(dumpproxy, pki, nginx, tmp_path):
    """Headless Chromium given no proxy and no trust of dumpproxy's CA: wrap mode adds the
    proxy and the CA's pin, next to the user's own pin (the origin's, for the passed-through
    cdn.test). The page, its script, stylesheet and images from both names, its WebSocket
    and a fetch all load. Chromium's own requests to Google (updates, accounts) would fail
    in the proxy (no name but the test's resolves here): the user's bypass list sends them
    past it, where they fail in Chromium without a query leaving the machine."""
    run = uuid.uuid4().hex[:12]
    page = nginx.url(f"/?run={run}&n=1&last=1")
    p = wrap(dumpproxy, pki, "--ignore-hosts", PASS, "--", which("chromium"),
             *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             f"--ignore-certificate-errors-spki-list={spki_pin(pki.ca_path)}",
             "--proxy-bypass-list=*.google.com;*.googleapis.com", page,
             env={"HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 90
        while not [line for line in nginx.access() if f"/done?run={run}&n=1&" in line]:
            assert p.proc.poll() is None, p.stderr.decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "page not loaded:\n" + "\n".join(
                nginx.access()[-20:])
            time.sleep(0.1)
    finally:
        code = p.stop()
    assert code in (0, 128 + 15), p.stderr  # Chromium ends on the forwarded SIGTERM
    [done] = [line.split()[3] for line in nginx.access() if f"/done?run={run}&" in line]
    assert done.endswith("&ws=true&lib=true&app=true&imgs=true&css=true"), done
    assert_quiet(p, responses=3)
    decisions = {(e["address"].split(":")[0], e["action"]) for e in p.of("decision")}
    assert decisions == {("app.test", "intercept"), ("cdn.test", "passthrough")}, decisions
    urls = {e["url"] for e in p.of("response") if e["status"] in (200, 101)}
    assert {page, nginx.url("/app.js"), nginx.url("/local.svg"), nginx.url("/ws")} <= urls
    assert not [u for u in urls if "cdn.test" in u]


def test_chromium_flags_can_be_switched_off(dumpproxy, pki, tmp_path):
    """--no-browser-flags: the command runs as given (a stand-in named chromium shows its
    arguments)."""
    fake = tmp_path / "chromium"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    p = wrap(dumpproxy, pki, "--", str(fake), "--headless", "about:blank")
    assert finished(p) == 0
    args = p.stderr.decode().splitlines()
    proxy = f"http://{p.address}"
    pin = spki_pin(p.home / "ca-cert.pem")
    assert args == [f"--proxy-server={proxy}", "--proxy-bypass-list=<-loopback>",
                    f"--ignore-certificate-errors-spki-list={pin}", "--headless",
                    "about:blank"]
    p = wrap(dumpproxy, pki, "--no-browser-flags", "--", str(fake), "--headless",
             "about:blank")
    assert finished(p) == 0
    assert p.stderr.decode().splitlines() == ["--headless", "about:blank"]


# --- the man page's table --------------------------------------------------------------------


def man_runtimes() -> list[str]:
    """The runtimes (the tag line of each .TP) of the man page's Runtimes table."""
    lines = man_section("WRAP MODE")
    start = lines.index(".SS Runtimes")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(".SS")),
               len(lines))
    table = lines[start:end]
    return [macro_text(table[i + 1]) for i, line in enumerate(table[:-1]) if line == ".TP"]


def test_man_page_runtime_table_matches_the_tests():
    """Each runtime in the table has its test: here (a client of its own, or Chromium's
    test), or the module that tests it already."""
    assert man_runtimes() == list(RUNTIME_TESTS)
    for runtime, where in RUNTIME_TESTS.items():
        if where == HERE:
            assert runtime in CLIENT_RUNTIMES or runtime.startswith("Chromium"), runtime
        else:
            name = runtime.removeprefix("Python ").split(",")[0]
            assert re.search(rf"\b{name}\b", (ROOT / where).read_text()), (runtime, where)
