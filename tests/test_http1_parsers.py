"""The two HTTP/1 engines behind `http1_wire.Wire` agree (pure, in-process): llhttp
(`http1_llhttp.LlhttpConnection`, through httptools) against h11 (`H11Connection`, the
reference).

The same bytes, cut into the same random pieces, go to both engines in the same role,
driven as the bridges drive a `Wire` (a server answers each request and starts the next
cycle; a client sends its request first, and the next one after each response). Every
step is recorded: the events (h11's classes; adjacent `Data` joined, since where a body
is cut is the parser's business), the bytes each engine wrote for the same answers, what
`trailing` holds after each head, the state questions, and a refusal as its class and
status hint. The records must be equal.

One difference is allowed, and checked as narrowly as it can be: inside a chunked body,
llhttp refuses chunk-size lines and trailer sections that h11 tolerates (see
`http1_llhttp`); then llhttp's record must be h11's up to that point, ending in a refusal,
and the bytes must hold such a line.

The smuggling shapes SPEC §7 is about have a table of their own below
(`test_smuggling_shape`): what each engine does with each one, asserted for both, in one
piece and a byte at a time. The writer is checked byte for byte against h11 in the
differential runs and by the unit tests at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import h11
import pytest
from conftest import ROOT, curl
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import HEADER_NAMES, HEADER_VALUES, TOKEN, VISIBLE, fuzz, mutated, split_at

from dumpproxy import headers as hdr
from dumpproxy import http1_wire as wire
from dumpproxy.http1_llhttp import LlhttpConnection
from dumpproxy.http1_wire import H11Connection, Wire

ENGINES = {"h11": H11Connection, "llhttp": LlhttpConnection}
MAX_HEAD = 2048  # small, so that the head cap is reached by what the strategies make


# --- the driver ----------------------------------------------------------------------------


def _event(ev) -> tuple:
    kind = type(ev)
    if kind is wire.Request:
        return ("request", ev.method, ev.target, ev.http_version, ev.headers.raw_items())
    if kind in (wire.Response, wire.InformationalResponse):
        return (kind.__name__, ev.status_code, ev.reason, ev.http_version,
                ev.headers.raw_items())
    if kind is wire.Data:
        return ("data", bytes(ev.data))
    if kind is wire.EndOfMessage:
        return ("end", ev.headers.raw_items())
    if kind is wire.ConnectionClosed:
        return ("closed",)
    return ("paused",) if ev is wire.PAUSED else (repr(ev),)


def _response(status: int, pairs: list, reason: bytes) -> wire.Response:
    return wire.response(status, hdr.fields(pairs), reason)


def _request(method: bytes, target: bytes, pairs: list) -> wire.Request:
    return wire.request(method, target, hdr.fields(pairs))


# What a driver sends: a server's answers (one per request, in turn), a client's requests.
ANSWERS = [
    [_response(200, [(b"Content-Length", b"2")], b"OK"), b"ok"],
    [_response(200, [(b"Content-Type", b"text/plain")], b"OK"), b"streamed", b"!"],
    [_response(204, [], b"No Content")],
    [wire.InformationalResponse(status_code=100, headers=[], reason=b"Continue"),
     _response(404, [(b"Connection", b"keep-alive"), (b"Content-Length", b"0")],
                   b"Not Found")],
    [wire.InformationalResponse(status_code=101, headers=[(b"Upgrade", b"x")],
                                reason=b"Switching Protocols")],
    [_response(200, [(b"Transfer-Encoding", b"chunked")], b"OK"), b"abc"],
]
REQUESTS = [
    [_request(b"GET", b"/", [(b"Host", b"x")])],
    [_request(b"HEAD", b"/", [(b"Host", b"x")])],
    [_request(b"POST", b"/", [(b"Host", b"x"), (b"Content-Length", b"3")]), b"abc"],
    [_request(b"CONNECT", b"x:443", [(b"Host", b"x:443")])],
    [_request(b"GET", b"/ws", [(b"Host", b"x"), (b"Upgrade", b"websocket"),
                                   (b"Connection", b"upgrade")])],
    [_request(b"POST", b"/", [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked"),
                                  (b"Connection", b"close")]), b"abc", b"de"],
]


def _send(c, log: list, message: list) -> bool:
    """A head (1xx heads first), then body pieces, then the end: the bytes recorded."""
    try:
        for item in message:
            if isinstance(item, bytes):
                log.append(("wrote", b"".join(c.send_pieces(wire.Data(data=item)))))
            else:
                log.append(("wrote", c.send(item)))
        if type(message[-1]) is not wire.InformationalResponse:
            log.append(("wrote", c.send(wire.EndOfMessage())))
    except wire.LocalProtocolError as e:
        log.append(("local error", str(e)))
        return False
    return True


def drive(engine: str, role: str, pieces: list[bytes], eof: bool,
          script: list[int]) -> list[tuple]:
    """One engine's record of a connection that receives `pieces` (then EOF)."""
    c = ENGINES[engine](role, MAX_HEAD)
    log: list[tuple] = []
    turn = 0
    stopped = False

    def mine() -> list:
        nonlocal turn
        table = ANSWERS if role == "server" else REQUESTS
        message = table[script[turn % len(script)] % len(table)] if script else table[0]
        turn += 1
        return message

    if role == "client":
        _send(c, log, mine())

    def pump() -> None:
        nonlocal stopped
        while not stopped:
            try:
                ev = c.next_event()
            except wire.RemoteProtocolError as e:
                log.append(("refused", e.error_status_hint))
                stopped = True
                return
            if ev is wire.NEED_DATA:
                log.append(("need data", c.head_started, c.can_answer))
                return
            item = _event(ev)
            if item[0] == "data" and log and log[-1][0] == "data":
                log[-1] = ("data", log[-1][1] + item[1])
                continue
            log.append(item)
            if item[0] in ("request", "Response", "InformationalResponse"):
                log.append(("trailing", c.trailing))
            if item[0] in ("closed", "paused"):
                stopped = True
                return
            if item[0] == "end":
                if role == "server" and not _send(c, log, mine()):
                    stopped = True
                    return
                again = c.next_cycle()
                log.append(("next cycle", again))
                if role == "client" and again and not _send(c, log, mine()):
                    stopped = True
                    return

    for piece in pieces:
        c.receive(piece)
        pump()
    if eof:
        c.receive(b"")
        pump()
    # `trailing` is what the bridges read after a head and between messages; inside a body
    # or after a refusal, what is left unparsed depends on where a parser stopped
    last = [item[0] for item in log if item[0] not in ("need data", "trailing", "wrote")]
    trailing = None if last and last[-1] in ("refused", "request", "Response", "data") \
        else c.trailing
    log.append(("end of input", trailing, c.can_answer, c.head_started))
    return _joined(log)


def _joined(log: list[tuple]) -> list[tuple]:
    """Need-data marks between two pieces of one body say only where the input was cut."""
    out: list[tuple] = []
    for item in log:
        if item[0] == "data" and len(out) >= 2 and out[-1][0] == "need data" and \
                out[-2][0] == "data":
            out.pop()
            out[-1] = ("data", out[-1][1] + item[1])
        else:
            out.append(item)
    return out


# Chunk-size lines h11 takes and llhttp refuses: whitespace after the size, an extension
# outside `;token[=token|quoted-string]`, more than 16 hex digits. In trailer sections,
# llhttp also refuses control bytes, obs-fold and the framing fields.
_STRICT_CHUNK_LINE = re.compile(
    rb'[0-9A-Fa-f]{1,16}(?:[ \t]*;[ \t]*[-!#$%&\'*+.^_`|~0-9A-Za-z]+'
    rb'(?:[ \t]*=[ \t]*(?:[-!#$%&\'*+.^_`|~0-9A-Za-z]+|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]'
    rb'|\\[\x09\x20-\x7e\x80-\xff])*"))?)*')
_STRICT_CHUNK_PREFIX = re.compile(rb"[0-9A-Fa-f]{0,16}(?:[ \t]*;.*)?")
_H11_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]{1,20}(?:;.*)?[ \t]*")


def _llhttp_stricter(data: bytes) -> bool:
    """The bytes hold a line (after a head) that h11 reads as a chunk-size line and llhttp
    refuses, or a trailer-ish line llhttp refuses (control bytes, obs-fold)."""
    body = data.partition(b"\r\n\r\n")[2] or data.partition(b"\n\n")[2]
    *_, last = body.split(b"\r\n")
    if last and not _STRICT_CHUNK_PREFIX.fullmatch(last):
        return True  # llhttp refuses a chunk-size line as it comes, h11 once it ends
    for line in re.split(rb"\r\n", body):
        if _H11_CHUNK_LINE.fullmatch(line) and not _STRICT_CHUNK_LINE.fullmatch(line):
            return True
        if line[:1] in (b" ", b"\t") or re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line):
            return True
        if re.match(rb"(?i)(content-length|transfer-encoding)[ \t]*:", line):
            return True  # framing fields in a trailer section
    return False


def _zero_padded_chunk_size(data: bytes) -> bool:
    body = data.partition(b"\r\n\r\n")[2]
    return any(len(m.group(1)) > 20 for m in re.finditer(
        rb"(?:^|\r\n)(0+[0-9A-Fa-f]*)(?=[;\r \t]|$)", body))


def compare(role: str, data: bytes, cuts: list[int], eof: bool, script: list[int]) -> None:
    pieces = split_at(data, cuts) if data else []
    ref = drive("h11", role, pieces, eof, script)
    got = drive("llhttp", role, pieces, eof, script)
    if got == ref:
        return
    # the allowed differences: llhttp refuses inside a chunked body; a chunk size written
    # with more than 20 digits (leading zeros), which h11 refuses and llhttp reads by its
    # value (harmless: a body is framed anew when forwarded)
    if _zero_padded_chunk_size(data):
        return
    refused = [i for i, item in enumerate(got) if item[0] == "refused"]
    i = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b),
             min(len(ref), len(got)))
    assert refused and _llhttp_stricter(data), (
        f"the engines differ on {data!r} in {len(pieces)} pieces, eof={eof}, "
        f"script={script}, from step {i}:\n h11:    {ref[i:i + 4]}\n llhttp: {got[i:i + 4]}")
    at = refused[0]
    heads = [item for item in got[:at] if item[0] in ("request", "Response", "end")]
    assert heads and heads[-1][0] != "end" and any(  # refused inside a chunked body
        n.lower() == b"transfer-encoding" for n, _ in heads[-1][4]), (ref, got)
    for mine, theirs in zip(got[:at], ref, strict=False):
        if mine[0] == theirs[0] == "data":
            assert theirs[1].startswith(mine[1]), (ref, got)
        elif mine[0] != "need data":
            assert mine == theirs, (ref, got)


# --- what is fed ---------------------------------------------------------------------------

EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
FIELD_NAMES = st.one_of(st.sampled_from([n.encode() for n in HEADER_NAMES]),
                        TOKEN.map(str.encode),
                        st.binary(min_size=1, max_size=6))
FIELD_VALUES = st.one_of(st.sampled_from([v.encode() for v in HEADER_VALUES]),
                         VISIBLE.map(str.encode),
                         st.binary(max_size=8),
                         st.sampled_from([b" padded ", b"a\tb", b"\x01", b"\x7f", b"\x80\xff",
                                          b"5, 5", b"chunked, chunked", b"Chunked",
                                          b"gzip, chunked", b"000000000000000000000005",
                                          b"18446744073709551616"]))


GOOD_FIELDS = st.sampled_from([
    (b"Host", b"x"), (b"Accept", b"*/*"), (b"Connection", b"close"),
    (b"Connection", b"keep-alive"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
    (b"Expect", b"100-continue"), (b"X-A", b"1"), (b"Cookie", b"a=b; c=d"),
    (b"Transfer-Encoding", b"Chunked"), (b"Content-Type", b"text/plain; charset=utf-8"),
    (b"X-Empty", b""), (b"X-Obs", b"caf\xc3\xa9"), (b"Proxy-Connection", b"close")])
GOOD_EXT = [b"", b"", b"", b";a=b", b';a="q \\" x"', b";a", b";a=b;c"]
ODD_EXT = [b" ", b"\t", b" ;a=b", b";\x01", b";a=b c", b";a\rb", b";a=", b'";"']


@st.composite
def chunked_body(draw, good: bool) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(max_size=12))
        size = draw(st.sampled_from(["%x", "%X", "%04x", "0000000000000000000%x"])) % len(
            data) if data else "0"
        odd = not good and draw(st.integers(0, 2)) == 0
        ext = draw(st.sampled_from(ODD_EXT if odd else GOOD_EXT))
        end = draw(st.sampled_from([b"", b"\n", b"XX", b"\r\n\r\n"])) if odd else b"\r\n"
        out += size.encode() + ext + b"\r\n" + data + end
    trailers = draw(st.lists(st.one_of(
        st.sampled_from([(b"T", b"v"), (b"X-Checksum", b"abc"), (b"Host", b"y"),
                         (b"Content-Length", b"3"), (b"Transfer-Encoding", b"gzip")]),
        st.tuples(FIELD_NAMES, FIELD_VALUES) if not good else GOOD_FIELDS), max_size=2))
    return out + b"0" + draw(st.sampled_from(GOOD_EXT)) + b"\r\n" + b"".join(
        n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"


@st.composite
def message(draw, response: bool) -> bytes:
    """A message: mostly well formed (so that bodies are reached), else with odd parts."""
    good = draw(st.integers(0, 2)) != 0
    eol = draw(EOL) if not good and draw(st.integers(0, 3)) == 0 else b"\r\n"
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"] if good else [
        b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/9.9", b"HTTP/1.1 ",
        b"http/1.1", b"HTTP/1", b""]))
    if response:
        status = draw(st.sampled_from(
            [b"200", b"200", b"204", b"304", b"100", b"101", b"103", b"404", b"999"])
            if good else st.one_of(st.sampled_from([b"099", b"1000", b"20", b"abc", b"200"]),
                                   st.integers(0, 999).map(lambda n: b"%d" % n)))
        reason = draw(st.sampled_from([b" OK", b"", b" ", b" Not\tFound", b" \x80\xff"])
                      if good else st.one_of(st.sampled_from([b" O\x00K", b" O\x0bK", b"OK"]),
                                             VISIBLE.map(lambda r: b" " + r.encode())))
        start = version + b" " + status + reason
    else:
        method = draw(st.sampled_from(
            [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"M-SEARCH"]) if good
            else st.one_of(st.sampled_from([b"get", b"FOO", b"PRI", b"G@T"]),
                           TOKEN.map(str.encode)))
        target = draw(st.sampled_from(
            [b"/", b"/a?b=c", b"http://h:80/p", b"x:443", b"*", b"/a#f", b"//h",
             b"http://u:p@h/"]) if good else st.one_of(
                st.sampled_from([b"", b"/\x80", b"/a b", b"/\x00"]),
                VISIBLE.map(lambda t: b"/" + t.encode())))
        start = method + b" " + target + (b" " + version if version else b"")
    fields = draw(st.lists(GOOD_FIELDS if good else st.one_of(
        GOOD_FIELDS, st.tuples(FIELD_NAMES, FIELD_VALUES)), max_size=5))
    if not response and (good or draw(st.integers(0, 3))):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"x"))
        fields = [f for i, f in enumerate(fields) if f[0] != b"Host" or i == fields.index(
            (b"Host", b"x"))] if good else fields
    framing = draw(st.sampled_from(["none", "length", "chunked"] if good else
                                   ["none", "length", "chunked", "both"]))
    fields = [f for f in fields if f[0] != b"Transfer-Encoding"] if framing != "chunked" \
        and good else fields
    body = b""
    if framing in ("length", "both"):
        body = draw(st.binary(max_size=16))
        fields.append((b"Content-Length", b"%d" % (len(body) + (0 if good else draw(
            st.sampled_from([0, 1, -1]))))))
    if framing in ("chunked", "both"):
        if not any(f[0] == b"Transfer-Encoding" for f in fields):
            fields.append((b"Transfer-Encoding", b"chunked"))
        body = draw(chunked_body(good))
    if framing == "none" and response:
        body = draw(st.binary(max_size=8))
    fold = not good and draw(st.integers(0, 4)) == 0
    head = start + eol + b"".join(
        n + b":" + draw(st.sampled_from([b" ", b"", b"  ", b"\t"])) + v + eol +
        (b" folded" + eol if fold else b"") for n, v in fields) + eol
    return head + body


@st.composite
def streams(draw, response: bool) -> bytes:
    """One to three messages, maybe mutated, maybe with garbage around them."""
    data = b"".join(draw(st.lists(message(response), min_size=1, max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated(data))
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.sampled_from([b"\r\n", b"\n", b" ", b"\x00"])) + data
    return data


def _cuts(data_max: int = 400):
    return st.one_of(st.lists(st.integers(0, data_max), max_size=6),
                     st.just(list(range(1, data_max))))  # a byte at a time


SCRIPT = st.lists(st.integers(0, 5), max_size=4)


# --- the differential properties -----------------------------------------------------------


@fuzz(1500)
@given(st.one_of(streams(response=False), st.binary(max_size=120)), _cuts(), st.booleans(),
       SCRIPT)
def test_requests_read_alike_by_both_engines(data: bytes, cuts, eof: bool, script) -> None:
    compare("server", data, cuts, eof, script)


@fuzz(1500)
@given(st.one_of(streams(response=True), st.binary(max_size=120)), _cuts(), st.booleans(),
       SCRIPT)
def test_responses_read_alike_by_both_engines(data: bytes, cuts, eof: bool, script) -> None:
    compare("client", data, cuts, eof, script)


@st.composite
def fuzz_corpus_heads(draw) -> bytes:
    """tests/test_fuzz.py's request heads, without a running proxy."""
    method = draw(st.one_of(st.sampled_from(
        ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
         "get"]), TOKEN))
    hostport = draw(st.sampled_from(["127.0.0.1:8080", "localhost:8080", "nowhere.test",
                                     "[::1]:9", "a" * 64 + ".test", "user:pw@h:1", "h:1:1"]))
    if method == "CONNECT":
        target = draw(st.one_of(st.just(hostport), VISIBLE))
    else:
        path = draw(st.one_of(st.sampled_from(["/small", "/echo", "/", ""]),
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


@fuzz(1500)
@given(fuzz_corpus_heads(), _cuts(), st.booleans(), SCRIPT)
def test_fuzz_corpus_heads_read_alike(data: bytes, cuts, eof: bool, script) -> None:
    compare("server", data, cuts, eof, script)


@fuzz(400)
@given(st.binary(min_size=1, max_size=3 * MAX_HEAD), st.integers(1, 4096), st.booleans())
def test_head_cap_alike_whatever_the_segmentation(filler: bytes, step: int, eof) -> None:
    """A head over MAX_HEAD: 431 from both when it trickles in, whatever the pieces."""
    for role, start in (("server", b"GET / HTTP/1.1\r\nHost: x\r\nX: "),
                        ("client", b"HTTP/1.1 200 OK\r\nX: ")):
        data = start + filler.replace(b"\r", b"r").replace(b"\n", b"n") + b"\r\n\r\n"
        compare(role, data, list(range(step, len(data), step)), eof, [])


@pytest.mark.parametrize("step", [1, 7, 100, 1000])
@pytest.mark.parametrize("tail", [
    b"5;a=" + b"b" * (2 * MAX_HEAD) + b"\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n" + b"".join(b"T%d: v\r\n" % i for i in range(MAX_HEAD // 4)) +
    b"\r\n"], ids=["chunk extension", "trailers"])
def test_chunk_line_and_trailers_over_the_cap_alike(tail: bytes, step: int) -> None:
    """A chunk-size line or a trailer section over the head cap: 431 from both when it
    trickles in, read when it comes whole. (llhttp's engine counts what was fed since the
    last body byte, h11 what it holds: the refusal may come one piece apart.)"""
    data = CHUNKED + tail
    for engine in ENGINES:
        trickled = drive(engine, "server", split_at(data, list(range(step, len(data), step))),
                         True, [0])
        assert _outcome(trickled) == "refused 431", (engine, trickled[-3:])
        assert _outcome(drive(engine, "server", [data], True, [0])) == "read"


# --- the smuggling shapes (SPEC §7): a table --------------------------------------------------

POST = b"POST / HTTP/1.1\r\nHost: x\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
# (name, bytes, outcome): "refused N" (RemoteProtocolError, status hint N) or "read"
# (parsed, and the record says how; the proxy refuses some of those above the parser:
# `framing_conflict`, `check_head`).
SHAPES = [
    ("CL+TE (the bridges refuse it: framing_conflict)",
     POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "read"),
    ("TE+CL", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     "read"),
    ("conflicting Content-Length", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
     b"hello", "refused 400"),
    ("Content-Length list of two values", POST + b"Content-Length: 5, 6\r\n\r\nhello",
     "refused 400"),
    ("duplicate equal Content-Length (merged into one)",
     POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "read"),
    ("Content-Length with a sign", POST + b"Content-Length: +5\r\n\r\nhello", "refused 400"),
    ("Content-Length not a number", POST + b"Content-Length: 5x\r\n\r\nhello", "refused 400"),
    ("Content-Length over 20 digits", POST + b"Content-Length: " + b"0" * 20 + b"5\r\n\r\n",
     "refused 400"),
    ("two Transfer-Encoding fields", POST + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "refused 501"),
    ("Transfer-Encoding other than chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n"
     b"\r\n0\r\n\r\n", "refused 501"),
    ("Transfer-Encoding with a trailing comma", POST + b"Transfer-Encoding: chunked,\r\n\r\n"
     b"0\r\n\r\n", "refused 501"),
    ("Transfer-Encoding in a space-separated name", POST + b"Transfer-Encoding : chunked\r\n"
     b"\r\n0\r\n\r\n", "refused 400"),
    ("negative chunk size", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", "refused 400"),
    ("chunk size not hex", CHUNKED + b"5g\r\nhello\r\n0\r\n\r\n", "refused 400"),
    ("chunk size over 20 hex digits", CHUNKED + b"1" * 21 + b"\r\nhello\r\n0\r\n\r\n",
     "refused 400"),
    ("chunk data longer than its size", CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", "refused 400"),
    ("chunk size line ended by a bare LF", CHUNKED + b"5\nhello\r\n0\r\n\r\n", "refused 400"),
    # where llhttp is the stricter one (its lenient flags stay off); h11 drops these
    ("whitespace after a chunk size", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
     {"h11": "read", "llhttp": "refused 400"}),
    ("bare CR in a chunk extension", CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n",
     {"h11": "read", "llhttp": "refused 400"}),
    ("control byte in a chunk extension", CHUNKED + b"5;\x01\r\nhello\r\n0\r\n\r\n",
     {"h11": "read", "llhttp": "refused 400"}),
    ("Content-Length in a trailer section", CHUNKED + b"0\r\nContent-Length: 5\r\n\r\n",
     {"h11": "read", "llhttp": "refused 400"}),
    ("bare CR in a header line", POST + b"X: a\rb\r\nContent-Length: 0\r\n\r\n",
     "refused 400"),
    ("bare CR ending the request line", b"GET / HTTP/1.1\rHost: x\r\n\r\n", "refused 400"),
    ("NUL in a header value", POST + b"X: a\x00b\r\n\r\n", "refused 400"),
    ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", "refused 400"),
    ("space inside a header name", POST + b"Content Length: 5\r\n\r\n", "refused 400"),
    ("invalid token character in a name", POST + b"X@Y: 1\r\n\r\n", "refused 400"),
    ("invalid token character in the method", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
     "refused 400"),
    ("obs-fold (unfolded into one space, never forwarded folded)",
     POST + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n", "read"),
    ("obs-fold as the first header line", b"GET / HTTP/1.1\r\n X: a\r\nHost: x\r\n\r\n",
     "refused 400"),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n", "refused 400"),
    ("two Host fields", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "refused 400"),
    ("HTTP/9.9 (the bridges answer 505: check_head)", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
     "read"),
    ("HTTP/2.0 (the bridges answer 505: check_head)", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
     "read"),
    ("no HTTP version", b"GET /\r\nHost: x\r\n\r\n", "refused 400"),
    ("lower-case protocol name", b"GET / http/1.1\r\nHost: x\r\n\r\n", "refused 400"),
    ("a leading empty line", b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", "refused 400"),
    ("head over the cap", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (2 * MAX_HEAD) +
     b"\r\n\r\n", "cap"),
]


def _outcome(log: list[tuple]) -> str:
    refused = [item for item in log if item[0] == "refused"]
    return f"refused {refused[0][1]}" if refused else "read"


@pytest.mark.parametrize("name, data, expected", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("engine", ENGINES)
def test_smuggling_shape(engine: str, name: str, data: bytes, expected) -> None:
    """Each engine, in one piece and a byte at a time: the outcome of the table."""
    whole = drive(engine, "server", [data], True, [0])
    trickled = drive(engine, "server", [data[i:i + 1] for i in range(len(data))], True, [0])
    if isinstance(expected, dict):
        expected = expected["llhttp" if engine == "llhttp" else "h11"]
    if expected == "cap":  # in one piece the head is read (check_head refuses it, 431)
        assert _outcome(whole) == "read" and _outcome(trickled) == "refused 431"
        return
    assert _outcome(whole) == _outcome(trickled) == expected, (whole, trickled)
    compare("server", data, [], True, [0])


def test_smuggled_shapes_read_as_h11_reads_them() -> None:
    """What "read" means for the shapes the parser lets through."""
    log = drive("llhttp", "server", [POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n"
                                     b"hello"], True, [0])
    assert log[0][4] == [(b"Host", b"x"), (b"Content-Length", b"5")]  # one field left
    log = drive("llhttp", "server", [POST + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n"],
                True, [0])
    assert (b"X", b"a b") in log[0][4]


# --- the writer ----------------------------------------------------------------------------


def _both(role: str, head_in: bytes | None, events: list) -> tuple[list, list]:
    """The bytes (or the local error) each engine writes for `events`, after receiving
    `head_in` (a server) or before (a client, whose events begin with its request)."""
    out = []
    for engine in ENGINES.values():
        c = engine(role, MAX_HEAD)
        got: list = []
        if head_in is not None:
            c.receive(head_in)
            while type(c.next_event()) is not wire.EndOfMessage:
                pass
        for ev in events:
            try:
                got.append(c.send(ev))
            except wire.LocalProtocolError as e:
                got.append(("local error", str(e)))
                break
        got.append((c.can_answer, c.next_cycle()))
        out.append(got)
    return out[0], out[1]


GET11 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
GET10 = b"GET / HTTP/1.0\r\n\r\n"
HEAD11 = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE11 = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, foo\r\n\r\n"
CONNECT11 = b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"
UPGRADE11 = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n"


def _resp(status: int, *fields: tuple[bytes, bytes], reason: bytes = b"R") -> wire.Response:
    return _response(status, list(fields), reason)


WRITER_CASES = {
    "content-length": (GET11, [_resp(200, (b"Content-Length", b"5")), wire.Data(data=b"hel"),
                               wire.Data(data=b"lo"), wire.EndOfMessage()],
                       b"HTTP/1.1 200 R\r\nContent-Length: 5\r\n\r\nhello", True),
    "too much for content-length": (GET11, [_resp(200, (b"Content-Length", b"2")),
                                            wire.Data(data=b"hel")], None, False),
    "too little for content-length": (GET11, [_resp(200, (b"Content-Length", b"9")),
                                              wire.Data(data=b"hel"), wire.EndOfMessage()],
                                      None, False),
    "chunked, with trailers": (GET11, [_resp(200, (b"X", b"1")), wire.Data(data=b"hello"),
                                       wire.Data(data=b""), wire.EndOfMessage(
                                           headers=[(b"T", b"v"), (b"Host", b"h")])],
                               b"HTTP/1.1 200 R\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n0\r\nHost: h\r\nT: v\r\n\r\n", True),
    "chunked field replaced": (GET11, [_resp(200, (b"transfer-encoding", b"chunked"),
                                             (b"Y", b"2")), wire.EndOfMessage()],
                               b"HTTP/1.1 200 R\r\nY: 2\r\nTransfer-Encoding: chunked\r\n"
                               b"\r\n0\r\n\r\n", True),
    "HTTP/1.0 client: to the close": (GET10, [_resp(200, (b"Connection", b"keep-alive")),
                                              wire.Data(data=b"hi"), wire.EndOfMessage()],
                                      b"HTTP/1.1 200 R\r\nConnection: close\r\n\r\nhi", False),
    "HTTP/1.0 client, content-length": (GET10, [_resp(200, (b"Content-Length", b"2")),
                                                wire.Data(data=b"hi"), wire.EndOfMessage()],
                                        b"HTTP/1.1 200 R\r\nContent-Length: 2\r\n"
                                        b"Connection: close\r\n\r\nhi", False),
    "HTTP/1.0 client: no trailers": (GET10, [_resp(200), wire.EndOfMessage(
        headers=[(b"T", b"v")])], None, False),
    "HEAD: framing fields kept, no body": (HEAD11, [_resp(200, (b"Content-Length", b"50")),
                                                    wire.EndOfMessage()],
                                           b"HTTP/1.1 200 R\r\nContent-Length: 50\r\n\r\n",
                                           True),
    "HEAD: no body may be sent": (HEAD11, [_resp(200, (b"Content-Length", b"2")),
                                           wire.Data(data=b"hi")], None, False),
    "HEAD without framing": (HEAD11, [_resp(200), wire.EndOfMessage()],
                             b"HTTP/1.1 200 R\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    "1xx then the response": (GET11, [wire.InformationalResponse(
        status_code=103, headers=[(b"Link", b"</a>")], reason=b"Early"),
        _resp(204), wire.EndOfMessage()],
        b"HTTP/1.1 103 Early\r\nLink: </a>\r\n\r\nHTTP/1.1 204 R\r\n\r\n", True),
    "204 and 304 carry no framing": (GET11, [_resp(304, (b"ETag", b'"e"')),
                                             wire.EndOfMessage()],
                                     b'HTTP/1.1 304 R\r\nETag: "e"\r\n\r\n', True),
    "client asked to close": (CLOSE11, [_resp(200, (b"Connection", b"keep-alive, Foo"),
                                              (b"Content-Length", b"0")),
                                        wire.EndOfMessage()],
                              b"HTTP/1.1 200 R\r\nContent-Length: 0\r\nConnection: close\r\n"
                              b"Connection: foo\r\n\r\n", False),
    "we close": (GET11, [_resp(200, (b"Content-Length", b"0"), (b"Connection", b"close")),
                         wire.EndOfMessage()],
                 b"HTTP/1.1 200 R\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
    "CONNECT answered 200": (CONNECT11, [_resp(200, reason=b"Connection established")],
                             b"HTTP/1.1 200 Connection established\r\n\r\n", False),
    "101 to an upgrade": (UPGRADE11, [wire.InformationalResponse(
        status_code=101, headers=[(b"Upgrade", b"ws")], reason=b"Switching Protocols")],
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", False),
    "101 with no upgrade asked": (GET11, [wire.InformationalResponse(
        status_code=101, headers=[], reason=b"S")], None, False),
    "a second response": (GET11, [_resp(204), _resp(204)], None, False),
    "an error answer before any request": (b"", [*wire.error_response(400, "bad")],
                                           None, False),
}


@pytest.mark.parametrize("case", WRITER_CASES, ids=list(WRITER_CASES))
def test_server_writer_as_h11_writes(case: str) -> None:
    head_in, events, expected, keep = WRITER_CASES[case]
    ref, got = _both("server", head_in or None, events)
    assert got == ref
    if expected is None:
        assert any(isinstance(x, tuple) and x[0] == "local error" for x in got) or \
            case == "an error answer before any request", got
    else:
        assert b"".join(x for x in got if isinstance(x, bytes)) == expected
        assert got[-1][1] is keep


CLIENT_CASES = {
    "GET, Host first": [_request(b"GET", b"/p", [(b"A", b"1"), (b"Host", b"h")]),
                        wire.EndOfMessage()],
    "POST content-length": [_request(b"POST", b"/", [(b"Host", b"h"),
                                                         (b"Content-Length", b"3")]),
                            wire.Data(data=b"abc"), wire.EndOfMessage()],
    "POST chunked": [_request(b"POST", b"/", [(b"Host", b"h"),
                                                  (b"Transfer-Encoding", b"chunked")]),
                     wire.Data(data=b"abc"), wire.EndOfMessage(headers=[(b"T", b"1")])],
    "POST with no framing sends no body": [_request(b"POST", b"/", [(b"Host", b"h")]),
                                           wire.Data(data=b"abc")],
    "CONNECT": [wire.Request(method=b"CONNECT", target=b"h:1", headers=[(b"Host", b"h:1")]),
                wire.EndOfMessage()],
    "HTTP/1.0 is not sent": [wire.Request(method=b"GET", target=b"/", headers=[],
                                          http_version=b"1.0")],
}


@pytest.mark.parametrize("case", CLIENT_CASES, ids=list(CLIENT_CASES))
def test_client_writer_as_h11_writes(case: str) -> None:
    ref, got = _both("client", None, CLIENT_CASES[case])
    assert got == ref


def test_client_writer_bytes() -> None:
    _, got = _both("client", None, CLIENT_CASES["POST chunked"])
    assert got[:3] == [b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
                       b"3\r\nabc\r\n", b"0\r\nT: 1\r\n\r\n"]


def test_send_after_a_local_error_is_refused_alike() -> None:
    for engine in ENGINES.values():
        c = engine("client", MAX_HEAD)
        c.send(_request(b"POST", b"/", [(b"Host", b"h"), (b"Content-Length", b"1")]))
        with pytest.raises(wire.LocalProtocolError, match="Too much data"):
            c.send(wire.Data(data=b"ab"))
        with pytest.raises(wire.LocalProtocolError, match="state is ERROR"):
            c.send(wire.EndOfMessage())


# --- choosing the engine -------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [("h11", f"h11 {h11.__version__}"),
                                          ("httptools", "httptools "), ("", "httptools ")])
def test_version_names_the_parser(value: str, shown: str) -> None:
    env = dict(os.environ, DUMPPROXY_HTTP1_PARSER=value)
    r = subprocess.run([sys.executable, "-m", "dumpproxy", "--version"], capture_output=True,
                       env=env, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"HTTP/1 parser: {shown}" in r.stdout.decode()


def test_unknown_parser_is_a_user_error() -> None:
    env = dict(os.environ, DUMPPROXY_HTTP1_PARSER="picohttp")
    r = subprocess.run([sys.executable, "-m", "dumpproxy", "--version"], capture_output=True,
                       env=env, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == (
        "dumpproxy: error: DUMPPROXY_HTTP1_PARSER='picohttp': expected one of httptools, h11")


def test_choose_parser() -> None:
    assert wire.choose_parser(None) == "httptools"
    assert wire.choose_parser("h11") == "h11"
    with pytest.raises(ValueError):
        wire.choose_parser("x")


def test_without_httptools_h11_serves(dumpproxy, origin, tmp_path) -> None:
    """Where httptools cannot be imported, h11 parses: --version says so, asking for
    httptools is a user error, and the proxy serves (chunked bodies and keep-alive
    included)."""
    fake = tmp_path / "site"
    (fake / "httptools").mkdir(parents=True)
    (fake / "httptools" / "__init__.py").write_text('raise ImportError("no httptools")\n')
    path = os.pathsep.join([str(fake), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("DUMPPROXY_HTTP1_PARSER", None)
    r = subprocess.run([sys.executable, "-m", "dumpproxy", "--version"], capture_output=True,
                       env=env, cwd=ROOT, timeout=30)
    assert f"(HTTP/1 parser: h11 {h11.__version__})" in r.stdout.decode(), r
    r = subprocess.run([sys.executable, "-m", "dumpproxy", "--version"], capture_output=True,
                       env=dict(env, DUMPPROXY_HTTP1_PARSER="httptools"), cwd=ROOT,
                       timeout=30)
    assert r.returncode == 2 and b"httptools cannot be imported" in r.stderr, r
    p = dumpproxy(env={"PYTHONPATH": path, "DUMPPROXY_HTTP1_PARSER": ""})
    out = curl("-x", p.url, origin.url("/small"), origin.url("/chunked"))
    assert out.returncode == 0 and out.stdout.startswith(b"hello\n"), out
    p.wait_for(lambda e: e["event"] == "response", count=2)
    assert [e["status"] for e in p.of("response")] == [200, 200]
    assert len(p.of("client_connect")) == 1  # both on one kept-alive connection


@pytest.mark.parametrize("parser", ["h11", "httptools"])
@pytest.mark.parametrize("pieces", [
    [b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"\r\n\r", b"\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"],  # split inside a CRLF; a bare LF
    [b"\r\n", b"\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
], ids=["one", "split", "several"])
def test_empty_lines_before_a_request_line_are_ignored(parser: str, pieces: list) -> None:
    """RFC 9112 2.2: a server ignores at least one empty line before the request line."""
    w = Wire("server", parser=parser)
    for piece in pieces:
        w.receive(piece)
    ev = w.next_event()
    assert type(ev) is wire.Request and ev.target == b"/"


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_empty_lines_between_pipelined_requests_are_ignored(parser: str) -> None:
    """A client that ends a body with an extra CRLF (old browsers did): the next request
    read with it is still read whole."""
    w = Wire("server", parser=parser)
    w.receive(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx\r\n"
              b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [type(w.next_event()) for _ in range(3)] == [wire.Request, wire.Data,
                                                        wire.EndOfMessage]
    sink = _Sink()
    w.send(sink, _response(200, [(b"content-length", b"0")], b"OK"))
    w.send(sink, wire.EndOfMessage())
    assert w.next_cycle()
    ev = w.next_event()
    assert type(ev) is wire.Request and ev.target == b"/next"


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_empty_lines_count_against_the_head_limit(parser: str) -> None:
    w = Wire("server", parser=parser)
    w.receive(b"\r\n" * (wire.MAX_HEAD // 2 + 1) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(wire.RemoteProtocolError):
        w.next_event()


class _Sink:
    def write(self, data: bytes) -> None:
        pass
