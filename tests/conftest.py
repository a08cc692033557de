"""Test harness: a real dumpproxy process, real origin servers, a test PKI. Loopback only."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent


# --- every event line any test sees is checked against `dumpproxy --schema` -----------------


class EventSchemaCheck:
    """Validates event lines with a real validator (jsonschema) and checks their key order
    against the typed definitions; failures are collected and fail the test that saw them."""

    def __init__(self) -> None:
        from jsonschema import Draft202012Validator

        from dumpproxy.schema import event_fields, json_schema

        schema = json_schema()
        Draft202012Validator.check_schema(schema)
        self.whole = Draft202012Validator(schema)
        # One validator per event (the oneOf of the whole schema, without trying all eleven)
        self.by_event = {
            name: Draft202012Validator({**sub, "$defs": schema["$defs"]})
            for name, sub in schema["$defs"].items()
        }
        self.order = {name: event_fields(name) for name in schema["$defs"]}
        self.validated = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def check(self, ev: dict, line: str = "") -> dict:
        problems = []
        validator = self.by_event.get(ev.get("event"))  # type: ignore[arg-type]
        if validator is None:
            problems.append(f"unknown event {ev.get('event')!r}")
        else:
            problems += [e.message for e in validator.iter_errors(ev)]
            order = [k for k in self.order[ev["event"]] if k in ev]
            if list(ev) != order:
                problems.append(f"keys out of order: {list(ev)} (defined: {order})")
        with self._lock:
            self.validated += 1
            if problems:
                self.failures.append(f"{line or ev}: {'; '.join(problems)}")
        return ev

    def line(self, line: str) -> dict:
        return self.check(json.loads(line), line.rstrip("\n"))


SCHEMA_CHECK = EventSchemaCheck()


class FlowCheck:
    """SPEC §9.1 over a capture: by the time `shutdown` is written, every `request` has
    exactly one `response` with its flow (and no response is without its request). Fed
    one event at a time, in output order; a run starts at its first `listening`."""

    def __init__(self) -> None:
        self.pid: object = None
        self.requests: dict[int, int] = {}  # flow -> request events seen
        self.responses: dict[int, int] = {}

    def feed(self, ev: dict, totals: FlowTotals) -> None:
        kind = ev.get("event")
        if kind == "listening" and ev.get("pid") != self.pid:
            self.__init__()  # a new run (-o appends)
            self.pid = ev.get("pid")
        elif kind in ("request", "response"):
            table = self.requests if kind == "request" else self.responses
            table[ev["flow"]] = table.get(ev["flow"], 0) + 1
        elif kind == "shutdown":
            totals.judge(self)
            self.__init__()


class FlowTotals:
    def __init__(self) -> None:
        self.checked = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def judge(self, run: FlowCheck) -> None:
        problems = []
        for flow in sorted(set(run.requests) | set(run.responses)):
            got = (run.requests.get(flow, 0), run.responses.get(flow, 0))
            if got != (1, 1):
                problems.append(f"flow {flow}: {got[0]} request(s), {got[1]} response(s)")
        with self._lock:
            self.checked += len(run.requests)
            self.failures += problems


FLOW_CHECK = FlowTotals()


def parse_events(text: str | bytes) -> list[dict]:
    """Event lines (JSON Lines output of dumpproxy) parsed and checked against the schema
    (and, for each run that ends in `shutdown`, that every request has its response)."""
    if isinstance(text, bytes):
        text = text.decode()
    events = [SCHEMA_CHECK.line(line) for line in text.splitlines()]
    flows = FlowCheck()
    for ev in events:
        flows.feed(ev, FLOW_CHECK)
    return events


@pytest.fixture(autouse=True)
def _events_match_schema():
    """A test fails when any event line it made dumpproxy write breaks the schema, or when
    a capture it made ends with a request without exactly one response."""
    before, flows_before = len(SCHEMA_CHECK.failures), len(FLOW_CHECK.failures)
    yield
    new = SCHEMA_CHECK.failures[before:]
    assert not new, "events that do not match the schema:\n" + "\n".join(new[:20])
    lost = FLOW_CHECK.failures[flows_before:]
    assert not lost, "requests without exactly one response:\n" + "\n".join(lost[:20])


def _check_counts() -> dict[str, int]:
    return {"validated": SCHEMA_CHECK.validated, "invalid": len(SCHEMA_CHECK.failures),
            "flows": FLOW_CHECK.checked, "lost": len(FLOW_CHECK.failures)}


WORKER_COUNTS: list[dict[str, int]] = []  # what each pytest-xdist worker checked


def pytest_sessionfinish(session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: its counts go to the controller's summary
        output["check_counts"] = _check_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    WORKER_COUNTS.append(getattr(node, "workeroutput", {}).get("check_counts", {}))


def pytest_terminal_summary(terminalreporter) -> None:
    total = _check_counts()
    for counts in WORKER_COUNTS:
        for key, n in counts.items():
            total[key] += n
    terminalreporter.write_line(
        f"event schema: {total['validated']} event lines validated, {total['invalid']} failed")
    terminalreporter.write_line(
        f"record invariant: {total['flows']} flows checked at shutdown, "
        f"{total['lost']} without exactly one response")


# --- dumpproxy under test --------------------------------------------------------------


class DumpProxy:
    """A running `python -m dumpproxy` whose stdout events are collected by a thread."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None,
                 stdin: bytes | None = None, wait_listening: bool = True,
                 hosts: dict[str, str] | None = None):
        """hosts: names resolved (for dumpproxy only) to loopback addresses, through a
        private mount namespace with its own /etc/hosts and a resolv.conf pointing at
        127.0.0.1 (so any other name fails at once and no DNS query leaves the machine)."""
        self.home = home
        full_env = dict(os.environ, DUMPPROXY_HOME=str(home), PYTHONUNBUFFERED="1")
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                  "all_proxy", "NO_PROXY", "no_proxy"):
            full_env.pop(k, None)
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "dumpproxy", *args]
        if hosts is not None:
            cmd = isolated_resolver(cmd, hosts, home)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=ROOT,
        )
        if stdin is not None:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.lines: list[str] = []
        self._arrivals: list[float] = []  # when each line was read (time.time())
        self.events: list[dict] = []
        self._flows = FlowCheck()
        self._q: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = b""
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        self.port = 0
        if wait_listening:
            ev = self.wait_for(lambda e: e["event"] == "listening", timeout=15)
            self.address = ev["address"]
            self.port = int(ev["address"].rsplit(":", 1)[1])
            self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for raw in self.proc.stdout:
            arrived = time.time()
            line = raw.decode()
            with self._cond:
                self.lines.append(line)
                self._arrivals.append(arrived)
                try:
                    ev = json.loads(line)
                except ValueError:
                    pass  # --format text, or a test that checks non-JSON output
                else:
                    self.events.append(SCHEMA_CHECK.check(ev, line.rstrip("\n")))
                    self._flows.feed(ev, FLOW_CHECK)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            self.stderr += raw

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 10.0,
                 count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [e for e in self.events if pred(e)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"event not seen within {timeout}s; events so far:\n"
                        + "".join(self.lines[-40:]) + "\nstderr: " + self._stderr_now()
                    )
                self._cond.wait(min(left, 0.1))

    def arrival(self, ev: dict) -> float:
        """When the line of this event (one of self.events) was read from the pipe."""
        with self._cond:
            for line, t in zip(self.lines, self._arrivals, strict=True):
                if line.startswith("{") and json.loads(line) == ev:
                    return t
        raise AssertionError(f"no line for {ev}")

    def _stderr_now(self) -> str:
        return "(running)" if self.proc.poll() is None else self.stderr.decode(errors="replace")

    def of(self, kind: str, **match) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e["event"] == kind
                    and all(e.get(k) == v for k, v in match.items())]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("dumpproxy did not exit after the signal") from None
        self._reader.join(5)
        self._err_reader.join(5)
        return self.proc.returncode

    @property
    def proxies(self) -> dict:
        return {"http://": self.url, "https://": self.url}


def isolated_resolver(cmd: list[str], hosts: dict[str, str], workdir: Path) -> list[str]:
    """Wrap cmd in `unshare -m` with its own /etc/hosts and resolv.conf (needs root)."""
    hosts_file = workdir / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + "".join(
        f"{ip} {name}\n" for name, ip in hosts.items()))
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = (f"mount --bind {hosts_file} /etc/hosts && "
              f"mount --bind {resolv} /etc/resolv.conf && exec \"$@\"")
    return ["unshare", "-m", "sh", "-c", script, "sh", *cmd]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    d = tmp_path / "home"
    d.mkdir()
    return d


@pytest.fixture
def dumpproxy(home: Path) -> Iterator[Callable[..., DumpProxy]]:
    """Factory: dumpproxy(*args) starts a proxy on a free port; all are stopped after."""
    started: list[DumpProxy] = []

    def start(*args: str, env: dict | None = None, stdin: bytes | None = None,
              hosts: dict[str, str] | None = None) -> DumpProxy:
        p = DumpProxy(["-p", "0", "-q", *args], home, env=env, stdin=stdin, hosts=hosts)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.stop()


def run_cli(*args: str, home: Path | None = None, stdin: bytes | None = None,
            timeout: float = 30, env: dict[str, str | None] | None = None
            ) -> subprocess.CompletedProcess:
    """env: extra variables for the child; a None value removes that variable."""
    extra = env
    env = dict(os.environ)
    if home is not None:
        env["DUMPPROXY_HOME"] = str(home)
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [sys.executable, "-m", "dumpproxy", *args], input=stdin, capture_output=True,
        env=env, cwd=ROOT, timeout=timeout,
    )


# --- test PKI ---------------------------------------------------------------------------


class TestPKI:
    """A CA for the test origins (what `--upstream-ca` points at) and its leaves."""

    __test__ = False

    def __init__(self, directory: Path):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dumpproxy test origin CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = directory / "origin-ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, names: list[str]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )
        tag = names[0].replace("*", "star").replace(":", "_")
        cert_path = self.dir / f"leaf-{tag}.pem"
        key_path = self.dir / f"leaf-{tag}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def server_context(self, names: list[str], alpn: list[str] | None = None) -> ssl.SSLContext:
        cert, key = self.leaf(names)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


# --- origin servers -----------------------------------------------------------------------

CHUNK = 64 * 1024


class OriginHandler(BaseHTTPRequestHandler):
    """Endpoints the tests use. HTTP/1.1 with keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "origin/1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain",
              extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra or []:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        return b"".join(self._body_pieces())

    def _body_pieces(self, size: int = CHUNK) -> Iterator[bytes]:
        """The request body in pieces of at most `size` bytes (never held whole)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                left = int(self.rfile.readline().split(b";")[0], 16)
                if left == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while left > 0:
                    piece = self.rfile.read(min(left, size))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read(min(left, size))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def do_GET(self) -> None:  # noqa: C901 - a small router
        path, _, query = self.path.partition("?")
        self.server.requests.append((self.command, self.path, dict(self.headers)))  # type: ignore
        if path == "/small":
            self._send(200, b"hello\n")
        elif path == "/echo":
            body = self._read_body()
            info = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                    "body_len": len(body), "body": body.decode("latin-1")}
            self._send(200, json.dumps(info).encode(), "application/json")
        elif path == "/sink":
            # streams the body in (after ?delay=SECONDS), reports its length and SHA-256
            time.sleep(float(query.partition("delay=")[2] or 0))
            n, digest = 0, hashlib.sha256()
            for piece in self._body_pieces():
                n += len(piece)
                digest.update(piece)
            self._send(200, json.dumps({"body_len": n, "sha256": digest.hexdigest()}).encode(),
                       "application/json")
        elif path.startswith("/binary/"):
            # N bytes of 00 01 .. ff 00 01 ..: not UTF-8
            n = int(path.split("/")[2])
            self._send(200, (bytes(range(256)) * (n // 256 + 1))[:n], "application/octet-stream")
        elif path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"\0" * CHUNK
            left = n
            while left > 0:
                k = min(left, CHUNK)
                self.wfile.write(block[:k])
                left -= k
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Checksum: abc\r\n\r\n")
        elif path == "/slow":
            # a head, then one byte per 0.2 s for `n` bytes
            n = int(query.partition("=")[2] or 50)
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            try:
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path.startswith("/status/"):
            code = int(path.split("/")[2])
            self._send(code, b"" if code in (204, 304) else b"status\n")
        elif path == "/cookies":
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1")
            self.send_header("Set-Cookie", "b=2")
            self.send_header("X-Multi", "x")
            self.send_header("X-Multi", "y")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/ws":
            if self.headers.get("Upgrade", "").lower() != "websocket":
                self._send(400, b"need upgrade\n")
                return
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            # echo raw bytes until EOF
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
        else:
            self._send(404, b"not found\n")

    do_POST = do_PUT = do_HEAD = do_DELETE = do_GET


def close_listener(sock: socket.socket, thread: threading.Thread | None = None,
                   timeout: float = 15) -> None:
    """Close a listening socket whose accept loop runs in `thread`, ending the loop first.

    Closing the descriptor under a thread blocked in accept() leaves that thread blocked on
    the old socket; when the kernel restarts the call (a signal handled with SA_RESTART,
    ptrace, a cgroup freeze and thaw), it runs on whatever socket has taken the number
    since, such as a later test's origin, and steals one of its connections: the origin's
    client gets a reset (a 502 from the proxy) and the origin's own accept loop, woken for
    that connection, blocks. shutdown() wakes accept() (EINVAL) while the number is ours."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not listening (any more), or not connected
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)
    sock.close()


class Origin:
    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
        server_cls = ThreadingHTTPServer
        if ":" in host:
            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6
            server_cls = V6
        self.server = server_cls((host, 0), OriginHandler)
        self.server.daemon_threads = True
        self.server.requests = []  # type: ignore[attr-defined]
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        # A connection reset between select() and accept() would block a blocking accept
        # for good (and close() with it): accept times out instead, serve_forever goes on.
        self.server.socket.settimeout(2)
        self.port = self.server.server_address[1]
        self.scheme = "https" if ssl_context else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.server.requests  # type: ignore[attr-defined]

    def url(self, path: str = "/small", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def origin2() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def tls_origin(pki: TestPKI) -> Iterator[Origin]:
    o = Origin(pki.server_context(["localhost", "127.0.0.1", "example.com", "decoy.test"]))
    yield o
    o.close()


def open_tunnel(port: int, target: str, timeout: float = 15) -> socket.socket:
    """A raw CONNECT tunnel to `target` through the proxy on `port`, positioned right after
    its 200 head (nothing of the tunnel consumed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, f"proxy closed during CONNECT; got {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rest == b""
    return s


async def read_response(reader: asyncio.StreamReader) -> tuple[int | str, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length (or none: no body);
    ("empty", b"") when the connection closed before a status line."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        return ("empty" if not e.partial else f"partial head {e.partial[:60]!r}"), b""
    except ConnectionError as e:
        return f"reset ({e})", b""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        return f"bad status line {status_line!r}", b""
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return f"cut body after {parts[1]}", b""
    return int(parts[1]), body


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout, env=env)


def _port_block() -> range:
    """Where free_port() picks: below the kernel's ephemeral range, which bind(0) and
    outgoing connections draw from, so no other process is handed the port between the
    pick and the server's own bind; a block of its own for each pytest-xdist worker."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    n = int(worker) % 8 if worker.isdigit() else 0
    first = low - 8 * 1000 + n * 1000
    return range(first, first + 1000) if first >= 1024 else range(0)


_PORTS = iter(_port_block())  # each port handed out once by this process


def free_port() -> int:
    """A loopback port for a server that cannot bind port 0 and report it (nginx, the
    README's blocks): one bindable now, not handed out before by this process."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use (a service, a connection in TIME_WAIT): the next
                continue
            return port
    with socket.socket() as s:  # the block used up (or none): any port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound and never
    listening. A port merely closed again (free_port) can be taken meanwhile by any
    process binding port 0, the proxy under test included (it then connects to itself),
    and more often with tests in two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Peak resident set (VmHWM) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
