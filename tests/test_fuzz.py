"""Property-based fuzz tests (Hypothesis) for the wire parsers and the proxy's surfaces.

Two kinds:

- pure parsers, in-process, many examples: `clienthello.classify` (arbitrary bytes, real
  ClientHellos from Python's ssl re-recorded, split and mutated), `addresses`
  (`split_host_port` / `join_host_port`), `hostfilter` (pattern lines and files, the
  indexed matcher against a plain scan, `candidates`);
- the running proxy over real loopback sockets, one dumpproxy for the whole module (one
  per HTTP/1 parser for the HTTP/1 surfaces, llhttp and h11): HTTP/1 request heads,
  CONNECT targets, ClientHellos inside a CONNECT tunnel, HTTP/2 frame sequences inside an
  intercepted TLS tunnel. For every input: an answer or a close
  within BOUND seconds (after the client's half-close), no `error` event with stage
  `internal`; after each surface the proxy serves a normal request and its descriptor
  count is back at the baseline.

Every connection the proxy makes stays on loopback: its names resolve through a private
hosts file (`hosts=`), and an input that could make it connect anywhere but our own
listeners (an IP literal elsewhere, a port we do not own) is rejected before it is sent
(`_stays_home`).

The normal run is bounded (the whole module in about 30 s) and reproducible
(`derandomize=True`, no example database). DUMPPROXY_FUZZ_EXAMPLES=N sets max_examples
of every surface to N and randomizes the run (e.g. 100000 for a long run; the number of
inputs each surface tried is printed, and every 5,000 along the way, visible with
`pytest -s`).

A case the fuzzing finds is reduced into a plain test below (`--- found cases ---`),
marked xfail(strict=True) while the product has the bug. While a bug is open, the fuzz
properties may tolerate what it does (an `internal` error: KNOWN_INTERNAL; an event
outside the schema: KNOWN_SCHEMA), each naming its test, so that the run keeps looking
for new ones; the tolerance goes with the marker. (All found so far are fixed.)
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import ssl
import string
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hpack
import pytest
from conftest import SCHEMA_CHECK, DumpProxy, Origin, TestPKI, open_tunnel
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from dumpproxy import hostfilter
from dumpproxy.addresses import join_host_port, split_host_port, strip_brackets
from dumpproxy.clienthello import _CAP, classify
from dumpproxy.hostfilter import PatternError, candidates, parse_pattern_lines, read_pattern_file

LONG = int(os.environ.get("DUMPPROXY_FUZZ_EXAMPLES", "0") or 0)
BOUND = 5.0  # seconds: every fuzzed connection is answered or closed within this
FD_SETTLE = 10.0  # seconds for the proxy's descriptors to come back after a surface
TRIED: dict[str, int] = {}  # inputs tried per surface (printed in long runs)
KNOWN_SEEN: dict[str, int] = {}  # known bugs met (printed in long runs)

# Known bugs whose `internal` error the fuzz properties tolerate while they are open:
# (regex on the error message, the regular test that pins the bug down).
KNOWN_INTERNAL: list[tuple[str, str]] = []
# Likewise for event lines that break the schema: (regex on the failure, the test).
KNOWN_SCHEMA: list[tuple[str, str]] = []


def fuzz(default: int, **kw) -> settings:
    """Hypothesis settings for one surface: `default` examples, or DUMPPROXY_FUZZ_EXAMPLES."""
    return settings(
        max_examples=LONG or default, deadline=None, derandomize=not LONG, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large, HealthCheck.large_base_example],
        **kw)


# A long run may take hours: no per-test timeout then.
pytestmark = [pytest.mark.timeout(0)] if LONG else []


STARTED = time.monotonic()


def _count(surface: str) -> None:
    n = TRIED[surface] = TRIED.get(surface, 0) + 1
    if LONG and n % 5000 == 0:  # progress of a long run (pytest -s shows it)
        print(f"\nfuzz {surface}: {n} inputs after {time.monotonic() - STARTED:.0f} s",
              file=sys.stderr, flush=True)


def _report(surface: str) -> None:
    if LONG:
        print(f"\nfuzz {surface}: {TRIED.get(surface, 0)} inputs; known bugs met so far: "
              f"{KNOWN_SEEN}", file=sys.stderr)


# --- mutations ---------------------------------------------------------------------------

SPECIAL = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\x00", b" ", b"\t", b":", b"\xff", b"\x80",
           b"%", b"@", b"[", b"]", b"..", b"a" * 64, b"\x16\x03\x01", b"0", b"-1",
           b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"HTTP/9.9",
           b"\x00\x00\x00", b"\xff\xff\xff\xff"]


@st.composite
def mutated(draw, base: bytes, max_ops: int = 4) -> bytes:
    """`base` with a few byte-level edits: flips, overwrites, inserts, deletes, repeats."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "insert", "special", "delete", "dup",
                                   "truncate"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "special":
            data[i:i] = draw(st.sampled_from(SPECIAL))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 32))] * draw(st.integers(1, 4))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """data in pieces, cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a] or [data]


# --- ClientHellos: real ones from Python's ssl, rebuilt with any SNI, re-recorded --------

PLACEHOLDER = "placeholder.test"


@functools.lru_cache(maxsize=64)
def real_hello(alpn: tuple[str, ...], tls13: bool, sni: bool) -> bytes:
    """A ClientHello handshake message (no record header) from Python's ssl.

    Cached: the same arguments give the same bytes within a run (its random fields
    differ between runs, nothing the properties look at)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                       server_hostname=PLACEHOLDER if sni else None)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    records = out.read()
    hs = b""
    while records:  # strip the record headers
        length = int.from_bytes(records[3:5], "big")
        hs += records[5:5 + length]
        records = records[5 + length:]
    return hs


def _vec(b: bytes, off: int, width: int) -> tuple[bytes, int]:
    n = int.from_bytes(b[off:off + width], "big")
    return b[off + width:off + width + n], off + width + n


def with_sni(hs: bytes, name: bytes | None) -> bytes:
    """The ClientHello `hs` with its server_name extension set to `name` (None: removed);
    every length field rewritten."""
    body = hs[4:]
    off = 2 + 32
    _, off = _vec(body, off, 1)
    _, off = _vec(body, off, 2)
    _, off = _vec(body, off, 1)
    fixed = body[:off]
    exts, _ = _vec(body, off, 2)
    out = b""
    pos = 0
    while pos < len(exts):
        etype = exts[pos:pos + 2]
        data, pos = _vec(exts, pos + 2, 2)
        if etype == b"\x00\x00":
            if name is None:
                continue
            entry = b"\x00" + len(name).to_bytes(2, "big") + name
            data = len(entry).to_bytes(2, "big") + entry
        out += etype + len(data).to_bytes(2, "big") + data
    body = fixed + len(out).to_bytes(2, "big") + out
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(hs: bytes, sizes: list[int]) -> bytes:
    """The handshake message in TLS records of the given sizes (the rest in one record)."""
    out = b""
    pos = 0
    for size in sizes:
        if pos >= len(hs):
            break
        piece = hs[pos:pos + max(size, 1)]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
        pos += len(piece)
    if pos < len(hs):
        out += b"\x16\x03\x01" + (len(hs) - pos).to_bytes(2, "big") + hs[pos:]
    return out


ALPN_OFFERS = [(), ("h2",), ("http/1.1",), ("h2", "http/1.1"), ("spdy/3.1", "x" * 200)]
LABEL = st.text(string.ascii_letters + string.digits + "-_", min_size=0, max_size=70)
NAMES = st.one_of(
    st.lists(LABEL, min_size=1, max_size=5).map(".".join),
    st.sampled_from(["localhost", "origin.test", "a" * 64 + ".test", "a..test", ".test",
                     "test.", "xn--ls8h.test", "LOCALHOST", "-a.test", "*.test"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40),
)
SNI_BYTES = st.one_of(st.none(), NAMES.map(str.encode), st.binary(max_size=80))


@st.composite
def hellos(draw) -> tuple[bytes, bytes | None, tuple[str, ...]]:
    """(record bytes, the SNI put in, the ALPN offered): a real ClientHello, its SNI
    replaced, cut into records of drawn sizes."""
    alpn = draw(st.sampled_from(ALPN_OFFERS))
    sni = draw(SNI_BYTES)
    hs = with_sni(real_hello(alpn, draw(st.booleans()), True), sni)
    sizes = draw(st.lists(st.integers(1, 600), max_size=6))
    return records(hs, sizes), sni, alpn


# --- pure parsers: clienthello ---------------------------------------------------------

KINDS = {"tls", "http", "h2c", "other"}


def _check_peek(data: bytes) -> None:
    peek = classify(data)
    assert peek.kind in KINDS
    if peek.sni is not None:
        assert peek.kind == "tls" and re.fullmatch(r"[!-~]+", peek.sni), peek
        assert peek.sni == peek.sni.lower()
    if peek.kind != "tls":
        assert peek.sni is None and peek.alpn == ()
    if peek.complete and len(data) <= _CAP:  # decided: more bytes change nothing
        assert classify(data + b"\x16\x03\x01\x00\x10" + b"x" * 40) == peek


@fuzz(800)
@given(st.binary(max_size=600))
def test_classify_arbitrary_bytes(data: bytes) -> None:
    _check_peek(data)


@fuzz(400)
@given(st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03\x00\x05\x01", b"GET ", b"PRI * HTTP/2",
                        b"CONNECT ", b"\x16"]), st.binary(max_size=300))
def test_classify_prefixed_bytes(prefix: bytes, rest: bytes) -> None:
    _check_peek(prefix + rest)


def _meant_name(sni: bytes) -> str:
    """The name a client means by its SNI: lower-cased, without the `:port` some send
    (hey through a proxy)."""
    text = sni.decode().lower()
    m = re.fullmatch(r"([^:]+):([0-9]+)", text)
    return m.group(1) if m else text


@fuzz(150)
@given(hellos())
def test_classify_real_hellos_any_sni_any_records(hello) -> None:
    """A real ClientHello, any SNI, any record split: every proper prefix waits for more;
    the whole gives the SNI (the name meant; None when it is not printable ASCII) and
    ALPN."""
    data, sni, alpn = hello
    peek = classify(data)
    if sni is not None and re.fullmatch(rb"[!-~]+", sni):
        assert peek == classify(data) and peek.complete and peek.kind == "tls"
        assert peek.sni == _meant_name(sni) and peek.alpn == alpn, peek
    else:  # no SNI; or one that is empty / not ASCII: a broken hello, decided without it
        assert peek.complete and peek.sni is None
        if sni is None:
            assert peek.alpn == alpn
    step = max(1, len(data) // 97)  # a sample of the proper prefixes
    for n in range(0, len(data), step):
        part = classify(data[:n])
        assert not part.complete or part.sni is None and n > 0 and part.kind == "tls", (n, part)
        if sni is not None and re.fullmatch(rb"[!-~]+", sni):
            assert not part.complete, (n, part)


@fuzz(400)
@given(st.data())
def test_classify_mutated_hellos(data) -> None:
    hello, _, _ = data.draw(hellos())
    _check_peek(data.draw(mutated(hello, max_ops=6)))


# --- pure parsers: addresses -----------------------------------------------------------

HOST_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="[]")


@fuzz(300)
@given(st.one_of(st.text(HOST_CHARS, min_size=1, max_size=30),
                 st.ip_addresses().map(str), NAMES),
       st.integers(1, 65535))
def test_join_then_split_round_trip(host: str, port: int) -> None:
    assume(host and host == host.strip() and "[" not in host and "]" not in host)
    joined = join_host_port(host, port)
    assert split_host_port(joined) == (host, port)
    assert split_host_port(joined, default_port=1) == (host, port)
    if ":" in host:
        assert joined.startswith("[")


@fuzz(600)
@given(st.one_of(st.text(max_size=40),
                 st.text(alphabet="[]:0123456789abcdef.% ", max_size=30)),
       st.one_of(st.none(), st.integers(1, 65535)))
def test_split_host_port_any_text(text: str, default: int | None) -> None:
    """Only ValueError comes out; a result is a non-empty host and a port in range, and
    joined back it splits to the same."""
    try:
        host, port = split_host_port(text, default)
    except ValueError:
        return
    assert host and 0 < port < 65536
    if "[" not in host and "]" not in host and host == host.strip():
        assert split_host_port(join_host_port(host, port)) == (host, port)


# --- pure parsers: hostfilter -----------------------------------------------------------

@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for the pattern files of every example (each overwrites its file)."""
    with tempfile.TemporaryDirectory(prefix="dumpproxy-fuzz-") as d:
        yield Path(d)


PATTERN_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="()[]{}|*+?.^$\\-:,0123456789aAbB#PN<>=!", max_size=25),
    st.sampled_from(["a{4294967296}", "(" * 2000 + ")" * 2000, "(?i)a(?m)", "\\N{FOO}",
                     "[[a]", "(?P<x>a)(?P=x)", "(a)(?(1)b|c)", "\\1", "x{,5}"]),
)


def _parse_only_pattern_errors(lines: list[str], where: str) -> list:
    try:
        return parse_pattern_lines(lines, where)
    except PatternError as e:
        assert str(e).startswith(f"{where}:"), e
        return []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # re: "possible nested set"
@fuzz(400)
@given(st.lists(PATTERN_TEXT, max_size=8))
def test_pattern_lines_raise_only_pattern_error(lines: list[str]) -> None:
    _parse_only_pattern_errors(lines, "fuzz.txt")


@pytest.mark.filterwarnings("ignore::FutureWarning")
@fuzz(200)
@given(st.binary(max_size=200))
def test_pattern_file_any_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "any.txt"
    path.write_bytes(raw)
    try:
        read_pattern_file(str(path))
    except PatternError as e:
        assert str(e).startswith(str(path)), e


VALID_PATTERN = st.one_of(
    NAMES.map(re.escape),
    st.sampled_from(["", "^example\\.com:443$", "\\.test:\\d+$", "(a|b)+c", "[0-9]{1,3}",
                     "(?i)CASE", "^\\[::1\\]:", "(?P<n>x)(?P=n)", "\\bword\\b"]),
    st.text(string.ascii_lowercase + ".:", min_size=1, max_size=12).map(re.escape),
)


@fuzz(150)
@given(st.lists(VALID_PATTERN, max_size=10),
       st.lists(st.sampled_from(["", "   ", "# a comment", "\t"]), max_size=4),
       st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
def test_pattern_file_with_valid_patterns_loads(scratch: Path, patterns, extras, newline,
                                                bom) -> None:
    """Valid patterns with blank and comment lines, any newline convention, BOM or not:
    every pattern loads, in order, with its physical line number."""
    assume(all(p == p.strip() and not p.startswith("#") for p in patterns))
    lines = []
    expected = []
    for i, p in enumerate(patterns):
        if i < len(extras):
            lines.append(extras[i])
        lines.append(f"  {p}  ")
        if p:
            expected.append((p, len(lines)))
    path = scratch / "ok.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode())
    got = read_pattern_file(str(path))
    assert [(p.text, p.source) for p in got] == [(t, f"{path}:{n}") for t, n in expected]


@fuzz(200)
@given(st.lists(VALID_PATTERN, min_size=1, max_size=12),
       st.lists(st.one_of(NAMES, st.text(max_size=12)), min_size=1, max_size=5),
       st.integers(1, 65535))
def test_indexed_matcher_agrees_with_a_plain_scan(monkeypatch_chunk, patterns, hosts,
                                                  port) -> None:
    """PatternList (trigram index, combined regexes, cache) finds the same first pattern as
    trying each pattern in order."""
    pats = [hostfilter.compile_pattern(p, f"--ignore-hosts#{i}") for i, p in enumerate(patterns)]
    plist = hostfilter.PatternList(pats)
    for h in hosts:
        for cand in candidates(h, port):
            naive = next((p for p in pats if p.regex.search(cand)), None)
            assert plist.first_match(cand) is naive, (cand, naive)
            assert plist.first_match(cand) is naive  # cached


@pytest.fixture(scope="module")
def monkeypatch_chunk():
    """Small chunks, so that a few patterns already take every path of PatternList."""
    saved = hostfilter.CHUNK
    hostfilter.CHUNK = 3
    yield
    hostfilter.CHUNK = saved


@fuzz(300)
@given(st.one_of(NAMES, st.ip_addresses().map(str), st.text(max_size=20)),
       st.integers(1, 65535), st.one_of(st.none(), st.ip_addresses().map(str)),
       st.one_of(st.none(), NAMES), st.one_of(st.none(), st.text(max_size=30)))
def test_candidates(host, port, ip, sni, host_header) -> None:
    out = candidates(host, port, ip=ip, sni=sni, host_header=host_header)
    assert len(out) == len(set(out)) and out
    first = _forms(ip, port) if ip is not None else _forms(host, port)
    assert out[:len(first)] == first
    for c in out:
        assert re.search(r":\d+$", c), c
    assert set(_forms(host, port)) <= set(out)
    if sni:
        assert set(_forms(sni, port)) <= set(out)


def _forms(host: str, port: int) -> list[str]:
    host = strip_brackets(host)
    return [f"[{host}]:{port}", f"{host}:{port}"] if ":" in host else [f"{host}:{port}"]


# --- the running proxy ------------------------------------------------------------------


class _H2Origin:
    """hypercorn serving tests/h2origin.py over TLS (h2 and http/1.1 via ALPN)."""

    def __init__(self, pki: TestPKI):
        from test_http2 import Hypercorn

        cert, key = pki.leaf(["localhost", "127.0.0.1", "origin.test"])
        self.server = Hypercorn(cert, key)
        self.port = self.server.port

    def close(self) -> None:
        self.server.close()


@dataclass
class Env:
    proxy: DumpProxy
    origin: Origin
    tls_origin: Origin
    h2_origin: _H2Origin
    closed_port: int  # bound, never listening: a connection is refused
    cursor: int = 0  # events before this index belong to earlier inputs
    schema_failures: int = 0  # SCHEMA_CHECK.failures when the module started

    @property
    def ports(self) -> set[int]:
        return {self.origin.port, self.tls_origin.port, self.h2_origin.port, self.closed_port}


HOSTS = {"origin.test": "127.0.0.1"}  # the proxy's private resolver (besides localhost)


# The HTTP/1 surfaces run against each HTTP/1 parser of the proxy (llhttp and h11, chosen
# by DUMPPROXY_HTTP1_PARSER); the others against the one the run would use.
PARSERS = ["httptools", "h11"]
BOTH_PARSERS = pytest.mark.parametrize("env", PARSERS, indirect=True)


@pytest.fixture(scope="module")
def env(request, tmp_path_factory, pki: TestPKI) -> Iterator[Env]:
    parser = getattr(request, "param", None)
    origin = Origin()
    tls_origin = Origin(pki.server_context(["localhost", "127.0.0.1", "origin.test"]))
    h2o = _H2Origin(pki)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    home = tmp_path_factory.mktemp("fuzzhome")
    # no upstream connections kept for other clients: each surface's descriptors must come
    # back to where they were (the pool's bounds are tested in test_pool.py)
    proxy = DumpProxy(["-p", "0", "-q", "--upstream-ca", str(pki.ca_path),
                       "--pool-idle-timeout", "0"], home,
                      hosts=HOSTS, env={"DUMPPROXY_HTTP1_PARSER": parser} if parser else None)
    e = Env(proxy, origin, tls_origin, h2o, closed.getsockname()[1],
            schema_failures=len(SCHEMA_CHECK.failures))
    try:
        _warm_up(e)
        yield e
    finally:
        proxy.stop()
        closed.close()
        h2o.close()
        tls_origin.close()
        origin.close()
        assert b"Traceback" not in proxy.stderr, proxy.stderr.decode(errors="replace")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _normal_request(e: Env) -> None:
    """The proxy serves an ordinary plain-HTTP request."""
    with socket.create_connection(("127.0.0.1", e.proxy.port), timeout=BOUND) as s:
        s.sendall(b"GET http://127.0.0.1:%d/small HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n" % e.origin.port)
        got = _read_all(s, time.monotonic() + BOUND)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nhello\n"), got


def _warm_up(e: Env) -> None:
    """Lazily made things (CA files, the leaf directory, h2's import) exist before any
    descriptor count is taken."""
    _normal_request(e)
    for port, alpn in ((e.tls_origin.port, ["http/1.1"]), (e.h2_origin.port, ["h2"])):
        s = open_tunnel(e.proxy.port, f"localhost:{port}", BOUND)
        ctx = _insecure_client(alpn)
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            if alpn == ["h2"]:
                assert t.selected_alpn_protocol() == "h2"
            else:
                t.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert _read_all(t, time.monotonic() + BOUND).endswith(b"hello\n")


def _insecure_client(alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


class Hang(AssertionError):
    pass


def _read_all(s: socket.socket, deadline: float) -> bytes:
    """Everything until the peer closes (EOF or reset); Hang past the deadline."""
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hang(f"no close within {BOUND} s; received {got[:300]!r}")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise Hang(f"no close within {BOUND} s; received {got[:300]!r}") from None
        except ssl.SSLError:
            return got  # a TLS peer ending without close_notify: closed
        except OSError:
            return got  # reset: closed
        if not chunk:
            return got
        got += chunk


def _conn_events(e: Env, lport: int) -> list[dict]:
    """The events of the proxy's connection from our local port, up to its
    client_disconnect (waited for: at most BOUND seconds)."""
    p = e.proxy
    client = f"127.0.0.1:{lport}"
    deadline = time.monotonic() + BOUND
    with p._cond:
        while True:
            evs = p.events[e.cursor:]
            conn = next((x["conn"] for x in evs if x["event"] == "client_connect"
                         and x["client"] == client), None)
            mine = [x for x in evs if conn is not None and x.get("conn") == conn]
            if mine and mine[-1]["event"] == "client_disconnect":
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"no client_disconnect for {client} within {BOUND} s: {mine}")
            p._cond.wait(min(left, 0.05))
        if len(p.events) > 20000:  # long runs: keep the harness's lists bounded
            for lst in (p.events, p.lines, p._arrivals):
                del lst[:len(lst) - 1000]
        e.cursor = len(p.events)
    return mine


def _note(text: str) -> None:
    """Hypothesis's note() inside a property (shown with a failing example), else nothing."""
    try:
        note(text)
    except InvalidArgument:  # a plain test
        pass


def _check_conn(e: Env, lport: int) -> list[dict]:
    evs = _conn_events(e, lport)
    with SCHEMA_CHECK._lock:  # checked here, so that Hypothesis can shrink what breaks it
        failures = SCHEMA_CHECK.failures[e.schema_failures:]
        del SCHEMA_CHECK.failures[e.schema_failures:]
    for f in failures:
        known = [t for pat, t in KNOWN_SCHEMA if re.search(pat, f)]
        _note(f"event breaks the schema (known: {known}): {f}")
        assert known, f"event breaks the schema: {f}"
        KNOWN_SEEN[known[0]] = KNOWN_SEEN.get(known[0], 0) + 1
    for x in evs:
        if x["event"] == "error" and x["stage"] == "internal":
            known = [t for pat, t in KNOWN_INTERNAL if re.search(pat, x["message"])]
            _note(f"internal error (known: {known}): {x['message']}")
            assert known, f"internal error: {x['message']}"
            KNOWN_SEEN[known[0]] = KNOWN_SEEN.get(known[0], 0) + 1
    return evs


def _send_and_close(e: Env, pieces: list[bytes], tls: str | None = None,
                    connect: str | None = None) -> tuple[bytes, list[dict]]:
    """One client connection: (CONNECT first, TLS on top when asked,) the pieces sent,
    then a half-close; everything until the proxy closes, and the connection's events."""
    if connect is not None:
        s = open_tunnel(e.proxy.port, connect, BOUND)
    else:
        s = socket.create_connection(("127.0.0.1", e.proxy.port), timeout=BOUND)
    lport = s.getsockname()[1]
    raw = s
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            s = _insecure_client([tls]).wrap_socket(raw, server_hostname="localhost")
            assert s.selected_alpn_protocol() == tls
        try:
            for piece in pieces:
                s.sendall(piece)
        except OSError:
            pass  # the proxy may answer and close before all was sent
        try:  # TCP half-close (under TLS too: the socket's own shutdown, no close_notify)
            socket.socket.shutdown(s, socket.SHUT_WR)
        except OSError:
            pass
        got = _read_all(s, time.monotonic() + BOUND)
    finally:
        s.close()
        raw.close()
    return got, _check_conn(e, lport)


@dataclass
class Surface:
    e: Env
    name: str

    def __enter__(self) -> Surface:
        self.pid = self.e.proxy.proc.pid
        self.before = _fds(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        _report(self.name)
        assert self.e.proxy.proc.poll() is None, "dumpproxy exited"
        _normal_request(self.e)
        deadline = time.monotonic() + FD_SETTLE
        while _fds(self.pid) > self.before and time.monotonic() < deadline:
            time.sleep(0.05)
        fd_dir = f"/proc/{self.pid}/fd"
        assert _fds(self.pid) <= self.before, (
            f"{self.name}: {_fds(self.pid)} descriptors open, {self.before} before: "
            f"{sorted(os.readlink(f'{fd_dir}/{n}') for n in os.listdir(fd_dir))}")
        internal = self.e.proxy.of("error", stage="internal")
        unknown = [x for x in internal
                   if not any(re.search(p, x["message"]) for p, _ in KNOWN_INTERNAL)]
        assert not unknown, unknown


# -- the proxy never connects anywhere but to our listeners --


NUMERIC = re.compile(r"[0-9a-fx.:%]*[0-9:][0-9a-fx.:%]*", re.IGNORECASE)


def _safe_address(e: Env, host: str, port: int | None) -> bool:
    """Could a connection to host:port reach anything but our own loopback listeners?"""
    h = strip_brackets(host)
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            return True  # fails before any connection
    h = h.lower()
    ours = port in e.ports
    try:
        ip = ipaddress.ip_address(h.split("%")[0])
    except ValueError:
        ip = None
    if ip is None:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))  # 127.1, 0x7f000001, ...
        except OSError:
            pass
    if ip is not None:
        return ip.is_loopback and ours
    if NUMERIC.fullmatch(h):
        return False  # numeric-looking, not understood: do not try
    name = h.rstrip(".")
    if name in HOSTS or name in ("localhost", "ip6-localhost"):
        return ours
    return not name.endswith(".local")  # mDNS would leave the machine; the rest fails


def _stays_home(e: Env, data: bytes) -> bool:
    """Every connection these bytes could make the proxy open goes to our listeners.

    A request target is a run of visible ASCII (h11's grammar), so every possible target is
    one of the runs: absolute URLs (plain requests) and the run after `CONNECT `."""
    for m in re.finditer(rb"CONNECT ([\x21-\x7e]+)", data):
        try:
            host, port = split_host_port(m.group(1).decode("latin-1"))
        except ValueError:
            continue
        if not _safe_address(e, host, port):
            return False
    for run in re.findall(rb"[\x21-\x7e]+", data):
        if b"//" not in run:
            continue
        try:
            parts = urllib.parse.urlsplit(run.decode("latin-1"))
            port = parts.port
        except ValueError:
            continue
        scheme = parts.scheme.lower()
        if parts.hostname and scheme in ("http", "https", "ws", "wss"):
            port = port or {"http": 80, "https": 443, "ws": 80, "wss": 443}[scheme]
            if not _safe_address(e, parts.hostname, port):
                return False
    # endpoints of the test origin that stream long or slowly: not what is fuzzed here
    return not re.search(rb"/slow|/bytes/|/binary/|delay=|/sink", data)


# -- HTTP/1 request heads --


def _target_hosts(e: Env) -> list[str]:
    o, t, c = e.origin.port, e.tls_origin.port, e.closed_port
    return [f"127.0.0.1:{o}", f"localhost:{o}", f"origin.test:{o}", f"127.0.0.1:{t}",
            f"127.0.0.1:{c}", "nowhere.test", "nowhere.test:8080", f"[::1]:{c}",
            "a" * 64 + ".test", "a..test", f"user:pw@127.0.0.1:{o}", f"127.0.0.1:{o}:1"]


TOKEN = st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1,
                max_size=12)
VISIBLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20)
HEADER_NAMES = ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade",
                "Proxy-Authorization", "Expect", "TE", "Trailer", "Keep-Alive", "Cookie",
                "Authorization", "Transfer_Encoding", "Proxy-Connection"]
HEADER_VALUES = ["chunked", "close", "keep-alive", "0", "5", "-1", "100-continue",
                 "Basic dXNlcjpwdw==", "websocket", "Upgrade", "content-length",
                 "gzip, chunked", "99999999999999999999", ""]


@st.composite
def request_heads(draw, e: Env) -> bytes:
    method = draw(st.one_of(st.sampled_from(
        ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
         "get"]), TOKEN))
    hostport = draw(st.sampled_from(_target_hosts(e)))
    if method == "CONNECT":
        target = draw(st.one_of(st.just(hostport), VISIBLE))
    else:
        path = draw(st.one_of(st.sampled_from(["/small", "/echo", "/status/204", "/chunked",
                                               "/cookies", "/ws", "/nope", "/", ""]),
                              VISIBLE.map(lambda p: "/" + p)))
        scheme = draw(st.sampled_from(["http", "https", "HTTP", "ftp", "ws"]))
        target = draw(st.one_of(st.just(f"{scheme}://{hostport}{path}"),
                                st.sampled_from([path or "/", "*"]), VISIBLE))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0",
                                    "HTTP/9.9", "HTTP/1.1 ", "http/1.1", ""]))
    headers = draw(st.lists(st.tuples(st.one_of(st.sampled_from(HEADER_NAMES), TOKEN),
                                      st.one_of(st.sampled_from(HEADER_VALUES), VISIBLE)),
                            max_size=6))
    body = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    head = f"{method} {target} {version}{eol}" + "".join(
        f"{n}: {v}{eol}" for n, v in headers) + eol
    return draw(mutated(head.encode("latin-1") + body))


# A TLS record: an alert or a handshake message, TLS 1.0 to 1.3 on the wire.
TLS_RECORD = rb"[\x15\x16]\x03[\x01-\x04]"


@BOTH_PARSERS
def test_fuzz_request_heads(env: Env) -> None:
    """Any request head, to the explicit proxy or inside a CONNECT tunnel to the origin
    (intercepted plain HTTP): an answer (an HTTP status line; a TLS record when the bytes
    begin like TLS, which the proxy's own port also speaks) or a close within BOUND; never
    an internal error."""

    @fuzz(150)
    @given(st.one_of(request_heads(env), st.binary(max_size=200)),
           st.lists(st.integers(0, 400), max_size=3), st.integers(0, 3))
    def run(data: bytes, cuts: list[int], where: int) -> None:
        assume(_stays_home(env, data))
        _count("request heads")
        tunnel = f"127.0.0.1:{env.origin.port}" if where == 0 else None
        got, _ = _send_and_close(env, split_at(data, cuts), connect=tunnel)
        if got and tunnel is None:  # (what is not HTTP goes through a tunnel verbatim)
            answer = TLS_RECORD if data[:1] == b"\x16" else rb"HTTP/1\.[01] \d{3} "
            assert re.match(answer, got), got[:200]

    with Surface(env, "request heads"):
        run()


# -- CONNECT targets --


@st.composite
def connect_targets(draw, e: Env) -> str:
    o, t = e.origin.port, e.tls_origin.port
    host = draw(st.one_of(
        st.sampled_from(["127.0.0.1", "localhost", "origin.test", "nowhere.test", "[::1]",
                         "::1", "[::1", "::1]", "", "user:pw@127.0.0.1", "127.1",
                         "2130706433", "0x7f.1", "[127.0.0.1]", "127.0.0.1%lo",
                         "[fe80::1%lo]"]),
        st.lists(LABEL, min_size=1, max_size=5).map(".".join),
        st.integers(0, 2 ** 24 - 1).map(lambda n: f"127.{n >> 16}.{n >> 8 & 255}.{n & 255}"),
        VISIBLE,
    ))
    port = draw(st.one_of(st.sampled_from([o, t, e.h2_origin.port, e.closed_port]),
                          st.sampled_from(["0", "65536", "99999", "-1", "", "0080", "80a",
                                           f"{o}:{o}", " 80", "+80"]),
                          st.integers(0, 70000)))
    sep = draw(st.sampled_from([":", ":", "", "::", " "]))
    return f"{host}{sep}{port}"


@BOTH_PARSERS
def test_fuzz_connect_targets(env: Env) -> None:
    """Any CONNECT target: a status line (200 and a working tunnel, or an error status) or
    a close within BOUND; never an internal error."""

    @fuzz(120)
    @given(connect_targets(env), st.sampled_from(
        [b"", b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x16\x03\x01\x00\x01\x01",
         b"garbage"]))
    def run(target: str, after: bytes) -> None:
        data = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + after
        assume(_stays_home(env, data))
        _count("CONNECT targets")
        got, evs = _send_and_close(env, [data])
        if got:
            assert re.match(rb"HTTP/1\.1 \d{3} ", got), got[:200]
        if got.startswith(b"HTTP/1.1 200 "):
            host, port = split_host_port(target)
            assert port in env.ports

    with Surface(env, "CONNECT targets"):
        run()


# -- ClientHellos inside a tunnel --


def test_fuzz_client_hellos_in_tunnel(env: Env) -> None:
    """Real ClientHellos (any SNI, any records, mutated, in any segments) in a CONNECT
    tunnel to a TLS origin: the proxy ends the handshake or the connection within BOUND;
    never an internal error."""

    @fuzz(80)
    @given(st.data())
    def run(data) -> None:
        hello, _, _ = data.draw(hellos())
        if data.draw(st.booleans()):
            hello = data.draw(mutated(hello, max_ops=5))
        cuts = data.draw(st.lists(st.integers(0, 600), max_size=4))
        target = data.draw(st.sampled_from(["localhost", "127.0.0.1", "origin.test"]))
        _count("ClientHellos")
        _send_and_close(env, split_at(hello, cuts),
                        connect=f"{target}:{env.tls_origin.port}")

    with Surface(env, "ClientHellos"):
        run()


# -- HTTP/2 frames inside an intercepted TLS tunnel --

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_TYPES = {"DATA": 0, "HEADERS": 1, "PRIORITY": 2, "RST_STREAM": 3, "SETTINGS": 4,
               "PUSH_PROMISE": 5, "PING": 6, "GOAWAY": 7, "WINDOW_UPDATE": 8,
               "CONTINUATION": 9}


def frame(ftype: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + (sid & 0xFFFFFFFF).to_bytes(
        4, "big") + payload


@st.composite
def h2_frames(draw, e: Env) -> bytes:
    """A client's HTTP/2 byte stream: the preface, SETTINGS, then frames of every type with
    plausible or odd payloads, flags, stream ids and lengths."""
    enc = hpack.Encoder()
    out = PREFACE if draw(st.integers(0, 9)) else draw(mutated(PREFACE, 2))
    if draw(st.integers(0, 9)):
        out += frame(4, 0, 0, b"")
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(list(FRAME_TYPES) + ["unknown"]))
        ftype = FRAME_TYPES.get(name, draw(st.integers(10, 255)))
        sid = draw(st.one_of(st.sampled_from([0, 1, 1, 3, 5, 2, 0x7FFFFFFF, 0x80000001]),
                             st.integers(0, 2 ** 32 - 1)))
        flags = draw(st.one_of(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25]),
                               st.integers(0, 255)))
        if name in ("HEADERS", "CONTINUATION", "PUSH_PROMISE"):
            headers = [(":method", draw(st.sampled_from(["GET", "POST", "HEAD", "CONNECT"]))),
                       (":scheme", "https"),
                       (":authority", f"localhost:{e.h2_origin.port}"),
                       (":path", draw(st.sampled_from(["/small", "/echo", "/trailers", "/x",
                                                      "", "*"])))]
            headers += draw(st.lists(st.tuples(
                st.sampled_from(["te", "content-length", "connection", "x-a", "Upper",
                                 ":path", "host", "cookie", ""]),
                st.sampled_from(["trailers", "5", "0", "close", "v", "", "\x00"])),
                max_size=4))
            headers = draw(st.permutations(headers)) if draw(st.booleans()) else headers
            block = enc.encode(headers)
            if name == "PUSH_PROMISE":
                block = (2).to_bytes(4, "big") + block
            payload = draw(st.one_of(st.just(block), st.binary(max_size=30)))
        elif name == "SETTINGS":
            payload = b"".join(i.to_bytes(2, "big") + v.to_bytes(4, "big") for i, v in draw(
                st.lists(st.tuples(st.integers(0, 8), st.one_of(
                    st.sampled_from([0, 1, 16384, 16777215, 2 ** 31 - 1, 2 ** 32 - 1]),
                    st.integers(0, 2 ** 32 - 1))), max_size=4)))
        elif name == "WINDOW_UPDATE":
            payload = draw(st.one_of(st.sampled_from([0, 1, 2 ** 31 - 1, 2 ** 32 - 1]),
                                     st.integers(0, 2 ** 32 - 1))).to_bytes(4, "big")
        elif name in ("RST_STREAM",):
            payload = draw(st.integers(0, 15)).to_bytes(4, "big")
        elif name == "PRIORITY":
            payload = draw(st.binary(min_size=5, max_size=5))
        elif name == "PING":
            payload = draw(st.binary(min_size=8, max_size=8))
        elif name == "GOAWAY":
            payload = draw(st.binary(min_size=8, max_size=16))
        else:
            payload = draw(st.binary(max_size=64))
        if flags & 8 and draw(st.booleans()):  # padded
            pad = draw(st.integers(0, 20))
            payload = bytes([pad]) + payload + b"\0" * pad
        length = draw(st.one_of(st.none(), st.none(), st.none(),
                                st.integers(0, 2 ** 24 - 1)))
        out += frame(ftype, flags, sid, payload, length)
    return out if draw(st.integers(0, 3)) else draw(mutated(out, 3))


def test_fuzz_h2_frames_in_intercepted_tunnel(env: Env) -> None:
    """HTTP/2 frame sequences to an intercepted h2 connection: answered or closed within
    BOUND after the client's half-close; never an internal error."""

    @fuzz(60)
    @given(h2_frames(env), st.lists(st.integers(0, 500), max_size=3))
    def run(data: bytes, cuts: list[int]) -> None:
        _count("HTTP/2 frames")
        _send_and_close(env, split_at(data, cuts), tls="h2",
                        connect=f"localhost:{env.h2_origin.port}")

    with Surface(env, "HTTP/2 frames"):
        run()


# --- found cases: each a plain test (xfail while the product had the bug) ---------------


def _errors(evs: list[dict]) -> list[tuple[str, str]]:
    return [(x["stage"], x["message"]) for x in evs if x["event"] == "error"]


def _refused_with(got: bytes, evs: list[dict], status: int = 400) -> None:
    """Answered `status` with an `error` event that is not an internal one."""
    errors = _errors(evs)
    assert got.startswith(b"HTTP/1.1 %d " % status), (got[:200], errors)
    assert errors and all(stage != "internal" for stage, _ in errors), errors


LONG_LABEL = "a" * 64 + ".test"  # a DNS label is at most 63 characters


@BOTH_PARSERS
def test_connect_target_with_label_over_63_chars_is_a_400(env: Env) -> None:
    _refused_with(*_send_and_close(env, [
        f"CONNECT {LONG_LABEL}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode()]))


@BOTH_PARSERS
def test_connect_target_with_empty_label_is_a_400(env: Env) -> None:
    _refused_with(*_send_and_close(env, [b"CONNECT a..test:443 HTTP/1.1\r\nHost: x\r\n\r\n"]))


@BOTH_PARSERS
def test_absolute_url_with_label_over_63_chars_is_a_400(env: Env) -> None:
    _refused_with(*_send_and_close(env, [
        f"GET http://{LONG_LABEL}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()]))


def test_sni_with_label_over_63_chars_is_no_internal_error(env: Env) -> None:
    """The SNI names the upstream TLS server: a name that cannot be one is the client's
    fault (an `error` event, the connection ends), never an internal error."""
    hello = records(with_sni(real_hello(("http/1.1",), True, True), LONG_LABEL.encode()), [])
    _, evs = _send_and_close(env, [hello], connect=f"localhost:{env.tls_origin.port}")
    errors = _errors(evs)
    assert errors and all(stage != "internal" for stage, _ in errors), errors


@BOTH_PARSERS
def test_connect_target_with_userinfo_is_a_400_without_the_credentials(env: Env) -> None:
    got, evs = _send_and_close(env, [
        b"CONNECT user:s3cret@127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % env.origin.port])
    _refused_with(got, evs)
    assert not [x for x in evs if "s3cret" in str(x)], evs


@BOTH_PARSERS
def test_connect_target_with_two_colons_is_a_400(env: Env) -> None:
    _refused_with(*_send_and_close(env, [
        b"CONNECT 127.0.0.1:%d:%d HTTP/1.1\r\nHost: x\r\n\r\n"
        % (env.origin.port, env.origin.port)]))


@BOTH_PARSERS
@pytest.mark.parametrize("version", ["HTTP/9.9", "HTTP/2.0"])
def test_unknown_http_version_in_request_line_is_refused(env: Env, version: str) -> None:
    """An HTTP/1 request line naming another version is answered 505 (or 400), never
    forwarded."""
    seen = len(env.origin.requests)
    got, evs = _send_and_close(env, [
        b"GET http://127.0.0.1:%d/small?v %s\r\nHost: x\r\n\r\n"
        % (env.origin.port, version.encode())])
    assert re.match(rb"HTTP/1\.1 (400|505) ", got), got[:200]
    assert len(env.origin.requests) == seen
    assert not [x for x in evs if x["event"] in ("request", "response")]


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(" * 1000 + ")" * 1000],
                         ids=["huge-repeat", "deep-nesting"])
def test_pattern_beyond_re_limits_is_a_pattern_error(pattern: str) -> None:
    with pytest.raises(PatternError, match=r"^ignore\.txt:2: invalid pattern"):
        parse_pattern_lines(["ok", pattern], "ignore.txt")
