"""Real clients through dumpproxy against real origins (issue 12): curl (HTTP/1.1, HTTP/2),
wget, git, Python requests and httpx (HTTP/2), Node (https-proxy-agent from npm, the http2
module), a WebSocket client, and headless Chromium loading a page with subresources from
two host names and a WebSocket, intercepted and passed through.

The origin is nginx (HTTP/1.1 and HTTP/2 over TLS, default keepalive_requests) with a
WebSocket echo behind it (tests/realorigins.py); names resolve to 127.0.0.1 for dumpproxy
only. Every case checks the client's result and the events, and that dumpproxy wrote no
`error` event: an orderly end is recorded on client_disconnect / server_disconnect (`how`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import hyperframe.frame
import pytest
from conftest import ROOT, DumpProxy, curl, open_tunnel
from realorigins import HOSTS, Nginx

CLIENTS_DIR = ROOT / "tests" / "clients"
RESOLVE = {name: "127.0.0.1" for name in HOSTS}
TIMEOUT = 60
ENDINGS = {"peer_closed", "peer_reset", "proxy_closed", "idle_timeout", "shutdown"}


# --- origins, proxy, trust ------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, pki) -> Nginx:
    """nginx with its defaults (keepalive_requests 1000)."""
    n = Nginx(tmp_path_factory.mktemp("nginx"), pki)
    yield n
    n.close()


@pytest.fixture(scope="module")
def nginx_goaway(tmp_path_factory, pki) -> Nginx:
    """nginx that sends GOAWAY after every 10 requests on a connection."""
    n = Nginx(tmp_path_factory.mktemp("nginx-goaway"), pki, keepalive_requests=10)
    yield n
    n.close()


def start(dumpproxy, pki, *args: str) -> DumpProxy:
    p = dumpproxy("--upstream-ca", str(pki.ca_path), *args, hosts=RESOLVE)
    p.ca = str(p.home / "ca-cert.pem")
    return p


def bundle(proxy: DumpProxy, pki, tmp_path: Path) -> Path:
    """What a client must trust: dumpproxy's CA (intercepted) and the origin's (passed
    through), as wrap mode's bundle holds the system CAs."""
    path = tmp_path / "trust.pem"
    path.write_bytes(Path(proxy.ca).read_bytes() + pki.ca_path.read_bytes())
    return path


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and k not in (
               "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
               "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "WGETRC")}
    env.update(extra)
    return env


def settle(proxy: DumpProxy, responses: int = 0, connections: int = 1,
           timeout: float = 20) -> list[dict]:
    """Wait for what the client did to show (at least this many responses and client
    connections), then until every client connection has ended; the events then."""
    proxy.wait_for(lambda e: e["event"] == "client_connect", timeout=timeout, count=connections)
    if responses:
        proxy.wait_for(lambda e: e["event"] == "response", timeout=timeout, count=responses)
    deadline = time.monotonic() + timeout
    while True:
        connects = len(proxy.of("client_connect"))
        if len(proxy.of("client_disconnect")) == connects:
            break
        assert time.monotonic() < deadline, "client connections still open:\n" + "".join(
            proxy.lines[-30:])
        time.sleep(0.05)
    with proxy._cond:
        return list(proxy.events)


def assert_quiet(proxy: DumpProxy, responses: int = 0, connections: int = 1) -> list[dict]:
    """No `error` event; every disconnect says how it ended."""
    events = settle(proxy, responses, connections)
    errors = [e for e in events if e["event"] == "error"]
    assert not errors, [(e["stage"], e["message"], e.get("address")) for e in errors]
    for e in events:
        if e["event"] in ("client_disconnect", "server_disconnect"):
            assert e["how"] in ENDINGS, e
    return events


def responses(proxy: DumpProxy, **match) -> list[dict]:
    return proxy.of("response", **match)


def which(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/run installs it)"
    return path


# --- curl -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "2"])
def test_curl(dumpproxy, pki, nginx, tmp_path, version):
    p = start(dumpproxy, pki)
    trust = bundle(p, pki, tmp_path)
    for _ in range(3):
        r = curl(f"--http{version}", "-x", p.url, "--cacert", str(trust), "-w", " %{http_version}",
                 nginx.url("/hello.txt"))
        assert r.returncode == 0 and r.stdout == f"hello\n {version}".encode(), r.stderr
    assert_quiet(p, responses=3, connections=3)
    got = responses(p)
    assert len(got) == 3, "".join(p.lines)
    assert {e["http_version"] for e in got} == {f"HTTP/{version}".replace(
        "HTTP/2", "HTTP/2.0")}
    assert all(e["status"] == 200 for e in got)


# --- wget (GnuTLS) ----------------------------------------------------------------------


def wrapped(dumpproxy, pki, *cmd: str, env: dict | None = None) -> tuple[DumpProxy, int]:
    """dumpproxy -- CMD; its bundle's system part is the origin CA (SSL_CERT_FILE for
    dumpproxy only stands in for a system root)."""
    p = dumpproxy("--upstream-ca", str(pki.ca_path), "--", *cmd, hosts=RESOLVE,
                  env={"SSL_CERT_FILE": str(pki.ca_path), **(env or {})})
    code = p.proc.wait(TIMEOUT)
    p._reader.join(10)
    return p, code


def test_wget_in_wrap_mode(dumpproxy, pki, nginx, tmp_path):
    home = tmp_path / "user"
    home.mkdir()
    (home / ".wgetrc").write_text("user_agent = from-the-users-wgetrc\n")
    out = tmp_path / "out.txt"
    p, code = wrapped(dumpproxy, pki, which("wget"), "-q", "-O", str(out),
                      nginx.url("/hello.txt"), env={"HOME": str(home)})
    assert code == 0, p.stderr
    assert out.read_text() == "hello\n"
    assert_quiet(p, responses=1)
    [resp] = responses(p)
    assert resp["status"] == 200 and resp["url"] == nginx.url("/hello.txt")
    # the user's own wgetrc was included
    assert p.of("request")[0]["headers"]["user-agent"] == "from-the-users-wgetrc"


def test_wrap_mode_environment_for_wget_and_node(dumpproxy, pki, tmp_path):
    """The generated wgetrc holds the user's own first, then the bundle and the proxies
    (later settings win); Node 24 gets NODE_USE_ENV_PROXY. Both are gone afterwards."""
    own = tmp_path / "own-wgetrc"
    own.write_text("tries = 3\n")
    script = ("import os, sys; print(os.environ['NODE_USE_ENV_PROXY']); "
              "print(os.environ['WGETRC']); sys.stdout.write(open(os.environ['WGETRC']).read())")
    p, code = wrapped(dumpproxy, pki, sys.executable, "-c", script,
                      env={"WGETRC": str(own)})
    assert code == 0, p.stderr
    flag, path, *rc = p.stderr.decode().splitlines()
    assert flag == "1"
    proxy = f"http://{p.address}"
    assert rc[0] == "tries = 3" and "ca_certificate = " in rc[-4], rc
    assert rc[-3:] == ["use_proxy = on", f"http_proxy = {proxy}", f"https_proxy = {proxy}"]
    assert not os.path.exists(path)


def test_wget_rejecting_the_ca_gets_the_hint(dumpproxy, pki, nginx, tmp_path):
    """GnuTLS completes the handshake, then checks the certificate and closes without an
    alert: still a client_tls error with the CA hint."""
    p = start(dumpproxy, pki)
    r = subprocess.run([which("wget"), "-q", "-O", "-", f"--ca-certificate={pki.ca_path}",
                        nginx.url("/hello.txt")], capture_output=True, timeout=TIMEOUT,
                       env=client_env(https_proxy=p.url, HOME=str(tmp_path)))
    assert r.returncode == 5, r.stderr  # SSL verification failure
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls" and "--print-ca" in err["message"], err
    assert "right after the TLS handshake" in err["message"] and "wget" in err["message"]
    settle(p)
    assert len(p.of("error")) == 1 and not p.of("request")


def test_wget_rejecting_the_ca_in_wrap_mode_gets_the_hint(dumpproxy, pki, nginx, tmp_path):
    """The silent close is judged after the wait for a sibling, while wget has exited and
    the run is ending: the error is still recorded, before `shutdown`."""
    p, code = wrapped(dumpproxy, pki, which("wget"), "-q", "-O", "-",
                      f"--ca-certificate={pki.ca_path}", nginx.url("/hello.txt"),
                      env={"HOME": str(tmp_path)})
    assert code == 5, p.stderr  # wget's SSL verification failure
    [err] = p.of("error")
    assert err["stage"] == "client_tls" and "right after the TLS handshake" in err["message"]
    assert p.events[-1]["event"] == "shutdown" and p.events[-1]["errors"] == 1


# --- git (GnuTLS, HTTP/2) --------------------------------------------------------------------


def test_git_in_wrap_mode(dumpproxy, pki, nginx, tmp_path):
    env = {"HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    url = nginx.url("/repo.git", host="git.test")
    p, code = wrapped(dumpproxy, pki, which("git"), "ls-remote", url, env=env)
    assert code == 0, p.stderr
    assert b"refs/heads/main" in p.stderr  # the command's stdout goes to stderr
    assert_quiet(p)
    assert responses(p) and all(e["status"] == 200 for e in responses(p))
    clone = tmp_path / "clone"
    p, code = wrapped(dumpproxy, pki, "git", "clone", "-q", url, str(clone), env=env)
    assert code == 0, p.stderr
    assert (clone / "README").read_text() == "a repository served by nginx\n"
    assert_quiet(p)


def test_git_rejecting_the_ca_gets_the_hint(dumpproxy, pki, nginx, tmp_path):
    p = start(dumpproxy, pki)
    r = subprocess.run(["git", "ls-remote", nginx.url("/repo.git", host="git.test")],
                       capture_output=True, timeout=TIMEOUT,
                       env=client_env(https_proxy=p.url, GIT_SSL_CAINFO=str(pki.ca_path),
                                      HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1"))
    assert r.returncode != 0 and b"certificate" in r.stderr, r.stderr
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls" and "--print-ca" in err["message"], err
    settle(p)
    assert len(p.of("error")) == 1 and not p.of("request")


# --- Python: requests, httpx over HTTP/2 --------------------------------------------------------


REQUESTS_CLIENT = """\
import sys, requests
proxy, trust, *urls = sys.argv[1:]
with requests.Session() as s:
    s.trust_env = False  # no proxy or CA bundle from the environment
    for url in urls:
        r = s.get(url, proxies={"https": proxy}, verify=trust, timeout=60)
        print(r.status_code, len(r.content))
"""


def test_requests(dumpproxy, pki, nginx, tmp_path):
    p = start(dumpproxy, pki)
    trust = str(bundle(p, pki, tmp_path))
    urls = [nginx.url(path) for path in ("/hello.txt", "/big.bin", "/hello.txt")]
    r = subprocess.run([sys.executable, "-c", REQUESTS_CLIENT, p.url, trust, *urls],
                       capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.split(b"\n")[:3] == [
        b"200 6", b"200 262144", b"200 6"], r.stderr
    assert_quiet(p, responses=3)
    assert [e["status"] for e in responses(p)] == [200] * 3
    assert responses(p)[1]["response_bytes"] == 256 * 1024


def h2_client(proxy: DumpProxy, trust: Path, **kw) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(trust))
    return httpx.AsyncClient(http2=True, proxy=proxy.url, verify=ctx, timeout=TIMEOUT, **kw)


def fetch_many(proxy: DumpProxy, trust: Path, url: str, count: int,
               concurrency: int = 8) -> list[tuple[int, str]]:
    async def main() -> list[tuple[int, str]]:
        sem = asyncio.Semaphore(concurrency)
        async with h2_client(proxy, trust) as client:
            await client.get(url)  # one connection, then many streams on it

            async def one() -> tuple[int, str]:
                async with sem:
                    r = await client.get(url)
                    return r.status_code, r.http_version
            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(main())


def test_httpx_http2(dumpproxy, pki, nginx, tmp_path):
    p = start(dumpproxy, pki)
    got = fetch_many(p, bundle(p, pki, tmp_path), nginx.url("/hello.txt"), 20)
    assert got == [(200, "HTTP/2")] * 20
    events = assert_quiet(p, responses=21)
    assert len(responses(p)) == 21  # and the warm-up
    assert {e["http_version"] for e in responses(p)} == {"HTTP/2.0"}
    assert {e["alpn"] for e in events if e["event"] == "tls"} == {"h2"}


def test_3000_http2_requests_across_nginx_goaways(dumpproxy, pki, nginx, tmp_path):
    """nginx (default keepalive_requests 1000) ends each connection with a graceful GOAWAY;
    the client's one connection carries all 3,000 requests without a failure."""
    p = start(dumpproxy, pki)
    got = fetch_many(p, bundle(p, pki, tmp_path), nginx.url("/hello.txt"), 3000)
    assert got == [(200, "HTTP/2")] * 3000
    events = assert_quiet(p, responses=3001)
    assert len(responses(p)) == 3001  # and the warm-up
    assert len(p.of("client_connect")) == 1
    assert len(p.of("server_connect")) >= 3  # a fresh upstream after each GOAWAY
    assert [e for e in events if e["event"] == "server_disconnect"][0]["how"] in (
        "peer_closed", "proxy_closed")


def test_origin_goaway_often(dumpproxy, pki, nginx_goaway, tmp_path):
    """GOAWAY after every 10 requests, 8 streams in flight: streams above the last-stream-id
    are replayed on a fresh connection, the client's connection survives."""
    p = start(dumpproxy, pki)
    got = fetch_many(p, bundle(p, pki, tmp_path), nginx_goaway.url("/hello.txt"), 300)
    assert got == [(200, "HTTP/2")] * 300
    assert_quiet(p, responses=301)
    assert len(responses(p)) == 301 and len(p.of("client_connect")) == 1
    assert len(p.of("server_connect")) >= 30


def test_origin_goaway_with_request_bodies(dumpproxy, pki, nginx_goaway, tmp_path):
    """POSTs with bodies racing a GOAWAY: each one is answered (nginx: 405 for a static
    file) or refused for the client to retry; no error either way."""
    p = start(dumpproxy, pki)
    trust = bundle(p, pki, tmp_path)

    async def main() -> list[int]:
        sem = asyncio.Semaphore(8)
        transport = httpx.AsyncHTTPTransport(http2=True, retries=0, proxy=p.url,
                                             verify=ssl.create_default_context(cafile=str(trust)))
        async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
            async def one(i: int) -> int:
                async with sem:
                    for _ in range(5):  # REFUSED_STREAM is safe to retry
                        try:
                            r = await client.post(nginx_goaway.url("/hello.txt"),
                                                  content=b"x" * (1000 + i))
                            return r.status_code
                        except (httpx.RemoteProtocolError, httpx.LocalProtocolError):
                            continue
                    return 0
            return await asyncio.gather(*(one(i) for i in range(60)))

    assert asyncio.run(main()) == [405] * 60
    assert_quiet(p, responses=60)


# --- Node ------------------------------------------------------------------------------------


def node_modules() -> Path:
    path = CLIENTS_DIR / "node_modules" / "https-proxy-agent"
    assert path.is_dir(), ("npm packages missing: run `npm install --prefix tests/clients` "
                           "(.ci/run does)")
    return path


def test_node_https_proxy_agent(dumpproxy, pki, nginx, tmp_path):
    node_modules()
    p = start(dumpproxy, pki)
    for path in ("/hello.txt", "/hello.txt"):
        r = subprocess.run([which("node"), str(CLIENTS_DIR / "agent.js"), nginx.url(path)],
                           capture_output=True, timeout=TIMEOUT,
                           env=client_env(HTTPS_PROXY=p.url, NODE_EXTRA_CA_CERTS=p.ca))
        assert r.returncode == 0 and r.stdout == b"200 hello\n", r.stderr
    assert_quiet(p, responses=2, connections=2)
    assert [e["status"] for e in responses(p)] == [200, 200]


def test_node_http2_closes_cleanly(dumpproxy, pki, nginx):
    """Node's http2 client ends with GOAWAY, close_notify and FIN: dumpproxy answers with
    its own close_notify and FIN, never a reset (Node would report ECONNRESET)."""
    p = start(dumpproxy, pki)
    for _ in range(5):
        r = subprocess.run([which("node"), str(CLIENTS_DIR / "h2.js"), p.url, "app.test",
                            str(nginx.port), "/hello.txt", "3"], capture_output=True,
                           timeout=TIMEOUT, env=client_env(NODE_EXTRA_CA_CERTS=p.ca))
        assert r.returncode == 0 and r.stdout == b"200 200 200\n", r.stderr
    events = assert_quiet(p, responses=15, connections=5)
    assert len(responses(p)) == 15
    assert {e["how"] for e in events if e["event"] == "client_disconnect"} == {"peer_closed"}


# --- WebSocket --------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["intercept", "passthrough"])
def test_websocket_client(dumpproxy, pki, nginx, tmp_path, action):
    from websockets.sync.client import connect

    p = start(dumpproxy, pki, *(["--ignore-hosts", "app"] if action == "passthrough" else []))
    ctx = ssl.create_default_context(cafile=str(bundle(p, pki, tmp_path)))
    for i in range(3):
        with connect(nginx.url("/ws").replace("https", "wss"), proxy=p.url, ssl=ctx,
                     open_timeout=TIMEOUT) as ws:
            for j in range(3):
                ws.send(f"message {i}.{j}")
                assert ws.recv(timeout=TIMEOUT) == f"message {i}.{j}"
    assert_quiet(p, connections=3)
    assert {e["action"] for e in p.of("decision")} == {action}
    if action == "intercept":
        assert [e["status"] for e in responses(p)] == [101] * 3


# --- headless Chromium ---------------------------------------------------------------------------

# The pin of a CA for --ignore-certificate-errors-spki-list, as the man page gives it.
SPKI_PIN = ("openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der"
            " | openssl dgst -sha256 -binary | base64")


def test_example_spki_pin(tmp_path, pki):
    """The man page's pin pipeline is the one these tests give Chromium, and it computes
    the base64 SHA-256 of the CA's SubjectPublicKeyInfo."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from examples import example as doc_example
    from examples import shell_commands

    [line] = shell_commands(doc_example("spki-pin").text)
    assert " ".join(line.replace("dumpproxy-ca.pem", '"$1"').split()) == SPKI_PIN
    (tmp_path / "dumpproxy-ca.pem").write_bytes(Path(pki.ca_path).read_bytes())
    r = subprocess.run(["sh", "-c", line], cwd=tmp_path, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    spki = x509.load_pem_x509_certificate(Path(pki.ca_path).read_bytes()).public_key(
        ).public_bytes(serialization.Encoding.DER,
                       serialization.PublicFormat.SubjectPublicKeyInfo)
    assert r.stdout.decode().strip() == base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_example_chromium_pin():
    """The README's recipe: the man page's pipeline for the pin, and the flags the
    Chromium tests here run with."""
    from examples import example as doc_example
    from examples import shell_commands

    pin, browser = shell_commands(doc_example("chromium-pin").text)
    pipeline = shell_commands(doc_example("spki-pin").text)[0]
    assert " ".join(pin.split()) == " ".join(f"pin=$({pipeline})".split())
    assert browser.startswith("chromium --proxy-server=http://127.0.0.1:8080 ")
    for flag in ("--user-data-dir=", '--ignore-certificate-errors-spki-list="$pin"'):
        assert flag in browser


def spki_pin(cert: str | Path) -> str:
    r = subprocess.run(["sh", "-c", SPKI_PIN, "sh", str(cert)], capture_output=True,
                       check=True, timeout=30)
    return r.stdout.decode().strip()


def nss_db(home: Path, *cas: tuple[str, str | Path]) -> None:
    """Chromium's certificate store for HOME, trusting these CAs (certutil, as the README
    shows)."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    certutil = which("certutil")
    subprocess.run([certutil, "-d", f"sql:{db}", "-N", "--empty-password"], check=True,
                   capture_output=True, timeout=30)
    for name, path in cas:
        subprocess.run([certutil, "-d", f"sql:{db}", "-A", "-t", "C,,", "-n", name, "-i",
                        str(path)], check=True, capture_output=True, timeout=30)


def chromium(proxy: DumpProxy, pki, profile: Path, url: str,
             trust: str = "pin", extra: tuple[str, ...] = (),
             stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """extra: more switches (e.g. --dump-dom, whose DOM comes on stdout=PIPE)."""
    # Only *.test goes through the proxy; nothing else resolves (no query leaves the host).
    pac = ("function FindProxyForURL(url, host) { return dnsDomainIs(host, '.test') ? "
           f"'PROXY 127.0.0.1:{proxy.port}' : 'DIRECT'; }}")
    env = dict(os.environ)
    if trust == "pin":
        pins = ",".join((spki_pin(proxy.ca), spki_pin(pki.ca_path)))
        trust_args = [f"--ignore-certificate-errors-spki-list={pins}"]
    else:
        home = profile.parent / "home"
        nss_db(home, ("dumpproxy", proxy.ca), ("origin", pki.ca_path))
        env["HOME"] = str(home)
        trust_args = []
    return subprocess.Popen(
        [which("chromium"), "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-default-apps",
         f"--user-data-dir={profile}",
         "--proxy-pac-url=data:application/x-ns-proxy-autoconfig;base64,"
         + base64.b64encode(pac.encode()).decode(),
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *trust_args, *extra, url],
        stdout=stdout, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def stop_chromium(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("action,trust", [("intercept", "pin"), ("passthrough", "pin"),
                                          ("intercept", "nssdb")])
def test_chromium_five_page_loads(dumpproxy, pki, nginx, tmp_path, action, trust):
    """A page with a script, a stylesheet and images from app.test and cdn.test and a
    WebSocket to app.test, loaded five times (each load navigates to the next); cdn.test
    passed through in the second run. Chromium trusts the CAs by their SPKI pins, or by
    its NSS store. It drops spare connections as it goes, and everything when it is
    stopped: none of it is an error."""
    args = ["--ignore-hosts", r"^cdn\.test:"] if action == "passthrough" else []
    p = start(dumpproxy, pki, *args)
    run = uuid.uuid4().hex[:12]
    proc = chromium(p, pki, tmp_path / "profile", nginx.url(f"/?run={run}&n=1&last=5"), trust)
    try:
        deadline = time.monotonic() + 90
        while not [line for line in nginx.access() if f"/done?run={run}&n=5&" in line]:
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "five page loads not done:\n" + "\n".join(
                nginx.access()[-20:])
            time.sleep(0.1)
    finally:
        stop_chromium(proc)
    done = [line.split()[3] for line in nginx.access() if f"/done?run={run}&" in line]
    assert sorted({d.split("&")[1] for d in done}) == [f"n={i}" for i in range(1, 6)], done
    for d in done:  # subresources from both hosts and the WebSocket echo, every time
        assert d.endswith("&ws=true&lib=true&app=true&imgs=true&css=true"), d
    events = assert_quiet(p, responses=10)
    decisions = {(e["address"].split(":")[0], e["action"]) for e in events
                 if e["event"] == "decision"}
    cdn = "passthrough" if action == "passthrough" else "intercept"
    assert decisions == {("app.test", "intercept"), ("cdn.test", cdn)}, decisions
    urls = [e["url"] for e in responses(p) if e["status"] in (200, 101)]
    for i in range(1, 6):
        assert nginx.url(f"/?run={run}&n={i}&last=5") in urls
    assert urls.count(nginx.url("/ws")) == 5
    if action == "intercept":
        assert nginx.url("/style.css", host="cdn.test") in urls
    else:
        assert not [u for u in urls if "cdn.test" in u]
    assert {e["alpn"] for e in events if e["event"] == "tls" and e["side"] == "client"} == {
        "h2", "http/1.1"}  # pages over HTTP/2, the WebSocket over HTTP/1.1


# --- HTTP/2: a client's GOAWAY ------------------------------------------------------------------


def h2_tunnel(proxy: DumpProxy, host: str, port: int) -> ssl.SSLSocket:
    sock = open_tunnel(proxy.port, f"{host}:{port}", TIMEOUT)
    ctx = ssl.create_default_context(cafile=proxy.ca)
    ctx.set_alpn_protocols(["h2"])
    return ctx.wrap_socket(sock, server_hostname=host)


def test_client_goaway_lets_open_streams_finish(dumpproxy, pki, nginx):
    p = start(dumpproxy, pki)
    tls = h2_tunnel(p, "app.test", nginx.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/big.bin"),
                            (":authority", f"app.test:{nginx.port}")], end_stream=True)
    goaway = hyperframe.frame.GoAwayFrame(0)  # NO_ERROR, right after the request (sent
    goaway.last_stream_id = 0  # by hand: h2 would stop reading after its own GOAWAY)
    tls.sendall(conn.data_to_send() + goaway.serialize())
    body, ended, eof = 0, False, False
    while not eof:
        data = tls.recv(65536)
        if not data:
            eof = True
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                body += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        out = conn.data_to_send()
        if out:
            tls.sendall(out)
    tls.close()
    assert ended and body == 256 * 1024
    assert_quiet(p, responses=1)
    [resp] = responses(p)
    assert resp["status"] == 200 and resp["response_bytes"] == 256 * 1024


# --- TLS with the client: spare connections and silent rejections ------------------------------


def good_request(proxy: DumpProxy, nginx: Nginx) -> None:
    r = curl("-x", proxy.url, "--cacert", proxy.ca, nginx.url("/hello.txt"))
    assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr


def tunnel(proxy: DumpProxy, nginx: Nginx) -> socket.socket:
    return open_tunnel(proxy.port, f"app.test:{nginx.port}", TIMEOUT)


def drop_mid_handshake(proxy: DumpProxy, nginx: Nginx) -> None:
    """ClientHello, read the server's flight, close without an alert (Chromium's spare
    connection, and Node's way of rejecting a certificate)."""
    sock = tunnel(proxy, nginx)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="app.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    sock.sendall(outgoing.read())
    assert sock.recv(65536)  # the server's flight, with its certificate
    sock.close()


def handshake_then_close(proxy: DumpProxy, nginx: Nginx) -> None:
    """A complete handshake, then close without a request (GnuTLS rejecting, or a browser
    dropping an unused connection); returns once the proxy has closed its side too (then
    it has seen the close, and judges it)."""
    ctx = ssl.create_default_context(cafile=proxy.ca)
    tls = ctx.wrap_socket(tunnel(proxy, nginx), server_hostname="app.test")
    tls.shutdown(socket.SHUT_WR)  # FIN without close_notify; the socket reads raw from here
    while tls.recv(65536):  # session tickets, the proxy's close_notify, then its FIN
        pass
    tls.close()


def test_lone_client_dropping_mid_handshake_gets_the_hint(dumpproxy, pki, nginx):
    p = start(dumpproxy, pki)
    drop_mid_handshake(p, nginx)
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls" and "--print-ca" in err["message"], err


def test_spare_connection_dropped_mid_handshake_is_no_error(dumpproxy, pki, nginx):
    p = start(dumpproxy, pki)
    good_request(p, nginx)  # a sibling that trusted the CA
    for _ in range(3):
        drop_mid_handshake(p, nginx)
    events = assert_quiet(p, connections=4)
    assert len(events_of_kind(events, "client_disconnect")) == 4


def test_lone_silent_close_after_handshake_gets_the_hint(dumpproxy, pki, nginx):
    p = start(dumpproxy, pki)
    handshake_then_close(p, nginx)
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "client_tls" and "right after the TLS handshake" in err["message"]


def test_unused_connection_of_a_trusting_client_is_no_error(dumpproxy, pki, nginx):
    p = start(dumpproxy, pki)
    good_request(p, nginx)
    handshake_then_close(p, nginx)
    assert_quiet(p, connections=2)


def test_spare_dropped_after_its_handshake_before_its_sibling_came_is_no_error(
        dumpproxy, pki, nginx):
    """Chromium's race: its first connection completes the handshake and is dropped unused
    before the connection it uses is even opened. The drop waits for that sibling's
    request instead of blaming the CA."""
    p = start(dumpproxy, pki)
    handshake_then_close(p, nginx)  # the proxy has seen the close
    good_request(p, nginx)
    assert_quiet(p, responses=1, connections=2)


def test_spare_dropped_mid_handshake_before_its_sibling_came_is_no_error(
        dumpproxy, pki, nginx):
    """The same race with the spare dropped during its handshake: the drop waits for the
    sibling's handshake."""
    p = start(dumpproxy, pki)
    drop_mid_handshake(p, nginx)
    time.sleep(0.2)  # the proxy has seen the drop
    good_request(p, nginx)
    assert_quiet(p, responses=1, connections=2)


def test_client_closing_every_connection_unused_gets_the_hint_for_each(dumpproxy, pki, nginx):
    """A sibling that came after the close shows trust only by carrying a request: a
    client that rejects the CA on every connection still gets its error."""
    p = start(dumpproxy, pki)
    handshake_then_close(p, nginx)
    handshake_then_close(p, nginx)
    settle(p, connections=2)
    errors = p.of("error")
    assert len(errors) == 2, errors
    assert all("right after the TLS handshake" in e["message"] for e in errors), errors


class SteppedHandshake:
    """A client handshake driven step by step over a tunnel (a browser's sibling
    connection, caught in the middle)."""

    def __init__(self, proxy: DumpProxy, nginx: Nginx):
        self.sock = tunnel(proxy, nginx)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=proxy.ca)
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="app.test")
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.sock.sendall(self.outgoing.read())  # ClientHello

    def finish(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "proxy closed mid-handshake"
                self.incoming.write(data)
        self.sock.sendall(self.outgoing.read())  # the client's Finished

    def request(self) -> bytes:
        self.tls.write(b"GET /hello.txt HTTP/1.1\r\nHost: app.test\r\n"
                       b"Connection: close\r\n\r\n")
        self.sock.sendall(self.outgoing.read())
        got = b""
        while not got.endswith(b"hello\n"):
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                assert data, got
                self.incoming.write(data)
        self.sock.close()
        return got


def test_spare_dropped_while_its_sibling_is_mid_handshake_is_no_error(dumpproxy, pki, nginx):
    """Chromium's race: two connections to one name, one dropped before the other's
    handshake is done. The drop waits for the sibling instead of blaming the CA."""
    p = start(dumpproxy, pki)
    sibling = SteppedHandshake(p, nginx)
    time.sleep(0.2)  # the proxy is in the sibling's handshake
    drop_mid_handshake(p, nginx)
    sibling.finish()
    assert sibling.request().startswith(b"HTTP/1.1 200 ")
    assert_quiet(p, responses=1, connections=2)


def test_unused_connection_beside_a_sibling_about_to_send_is_no_error(dumpproxy, pki, nginx):
    """A handshake completed and closed unused while a sibling is up but has not sent its
    request yet: it waits for the sibling's request instead of blaming the CA."""
    p = start(dumpproxy, pki)
    sibling = SteppedHandshake(p, nginx)
    sibling.finish()
    handshake_then_close(p, nginx)  # the proxy has seen the unused connection close
    assert sibling.request().startswith(b"HTTP/1.1 200 ")
    assert_quiet(p, responses=1, connections=2)


def events_of_kind(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


# --- passed-through tunnels: an origin resetting after the client closed ---------------------


def passed_through_tunnel(dumpproxy) -> tuple[DumpProxy, socket.socket, socket.socket,
                                                socket.socket]:
    """A proxy passing 127.0.0.1 through, and a tunnel across it to a raw TCP server:
    (proxy, the server's listening socket, the client's end, the server's end)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    p = dumpproxy("--ignore-hosts", "127.0.0.1")
    c = open_tunnel(p.port, f"127.0.0.1:{port}", TIMEOUT)
    conn, _ = server.accept()
    return p, server, c, conn


def test_origin_reset_after_client_closed_is_no_error(dumpproxy):
    p, server, c, conn = passed_through_tunnel(dumpproxy)
    conn.settimeout(TIMEOUT)
    c.sendall(b"\x16\x03\x01 not really TLS")
    c.shutdown(socket.SHUT_WR)  # the client is done
    while conn.recv(4096):  # until the client's FIN, passed on
        pass
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # the origin resets
    p.wait_for(lambda e: e["event"] == "server_disconnect")
    c.close()
    server.close()
    events = assert_quiet(p)
    [sd] = events_of_kind(events, "server_disconnect")
    assert sd["how"] in ("peer_reset", "peer_closed")


def test_origin_reset_mid_tunnel_is_an_error(dumpproxy):
    """The other side: an origin that resets while both directions are open broke the
    tunnel."""
    p, server, c, conn = passed_through_tunnel(dumpproxy)
    c.sendall(b"\x16\x03\x01 not really TLS")
    assert conn.recv(4096)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    err = p.wait_for(lambda e: e["event"] == "error")
    assert err["stage"] == "relay" and "reset" in err["message"], err
    c.close()
    server.close()


def test_websocket_client_reset_is_no_error(dumpproxy, pki, nginx, tmp_path):
    """A WebSocket client that resets its connection (a browser closing the page) ends it:
    recorded on client_disconnect, not as an error."""
    from websockets.sync.client import connect

    p = start(dumpproxy, pki)
    ctx = ssl.create_default_context(cafile=str(bundle(p, pki, tmp_path)))
    ws = connect(nginx.url("/ws").replace("https", "wss"), proxy=p.url, ssl=ctx,
                 open_timeout=TIMEOUT, legacy=True)
    ws.send("hello")
    assert ws.recv(timeout=TIMEOUT) == "hello"
    raw = ws.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    events = assert_quiet(p, responses=1)
    [cd] = events_of_kind(events, "client_disconnect")
    assert cd["how"] == "peer_reset"


# --- the event reader going away ------------------------------------------------------------


def test_idle_proxy_exits_when_the_reader_goes_away(home):
    """`dumpproxy -p 0 | head -n 1` returns while the proxy is idle (no event after
    `listening` would reveal the broken pipe); dumpproxy exits 0."""
    env = dict(os.environ, DUMPPROXY_HOME=str(home))
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m dumpproxy -p 0 -q | head -n 1;"
                        " echo \"status ${PIPESTATUS[0]}\""], capture_output=True, env=env,
                       cwd=ROOT, timeout=10)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 2 and '"event":"listening"' in lines[0], r
    assert lines[1] == "status 0", r
