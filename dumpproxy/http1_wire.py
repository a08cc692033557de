"""HTTP/1 on the wire: the one place where the HTTP/1 parsers are chosen and driven.

Everything above speaks in the events named here (h11's shapes: `Request`, `Response`,
`InformationalResponse`, `Data`, `EndOfMessage`, `ConnectionClosed`) and drives a
connection only through `Wire`'s methods: parsing, encoding, and the few questions about
its state a bridge asks (may an answer still be sent, has a new head begun, can the
connection carry another exchange).

Two engines yield those events alike: llhttp through httptools (`http1_llhttp`, the
default) and h11 (the reference, and the fallback where httptools cannot be imported).
DUMPPROXY_HTTP1_PARSER=h11 forces h11, =httptools insists on llhttp; `dumpproxy --version`
says which one runs.
"""

from __future__ import annotations

import os
import re
import time
from typing import Literal

import h11
from h11._headers import Headers

from dumpproxy import headers as hdr
from dumpproxy.streams import Stream, StreamTimeout

try:
    from dumpproxy import http1_llhttp
except ImportError:  # httptools missing: h11 alone
    http1_llhttp = None  # type: ignore[assignment]

MAX_HEAD = 64 * 1024  # request or response head, bytes
PARSER_ENV = "DUMPPROXY_HTTP1_PARSER"
PARSERS = ("httptools", "h11")

# The events (h11's classes: the seam's vocabulary).
Request = h11.Request
Response = h11.Response
InformationalResponse = h11.InformationalResponse
Data = h11.Data
EndOfMessage = h11.EndOfMessage
ConnectionClosed = h11.ConnectionClosed
Event = h11.Event
# The failures: the peer broke the protocol (Remote), or we were about to (Local).
ProtocolError = h11.ProtocolError
RemoteProtocolError = h11.RemoteProtocolError
LocalProtocolError = h11.LocalProtocolError
NEED_DATA = h11.NEED_DATA
PAUSED = h11.PAUSED


def choose_parser(value: str | None) -> str:
    """The parser for a DUMPPROXY_HTTP1_PARSER value (unset or empty: the fastest one
    there is); ValueError for a value naming no parser, or httptools when it is missing."""
    if not value:
        return "h11" if http1_llhttp is None else "httptools"
    if value not in PARSERS:
        raise ValueError(f"{PARSER_ENV}={value!r}: expected one of {', '.join(PARSERS)}")
    if value == "httptools" and http1_llhttp is None:
        raise ValueError(f"{PARSER_ENV}=httptools, but httptools cannot be imported")
    return value


def _env_parser() -> str:
    try:
        return choose_parser(os.environ.get(PARSER_ENV))
    except ValueError:  # the command line reports it (cli); never at import
        return "h11"


PARSER = _env_parser()  # the parser of this process


def parser_version() -> str:
    """`httptools 0.9.0 (llhttp)` or `h11 0.16.0`: for --version."""
    if PARSER == "httptools":
        return f"httptools {http1_llhttp.VERSION} (llhttp)"  # type: ignore[union-attr]
    return f"h11 {h11.__version__}"


def fields(ev: h11.Request | h11.Response | h11.InformationalResponse) -> list[hdr.Field]:
    """A head's fields as (name, lower-case name, value): h11 keeps them so, whichever
    parser read the head. The list is the event's own: read it, never change it."""
    return ev.headers._full_items  # type: ignore[attr-defined]


def _headers(head: list[hdr.Field]) -> Headers:
    """h11's header list from fields a parser already validated and normalised (a new
    list the caller hands over)."""
    out = object.__new__(Headers)
    object.__setattr__(out, "_full_items", head)
    return out


def request(method: bytes, target: bytes, headers: list[hdr.Field]) -> h11.Request:
    """A request head whose fields came out of a parser (already validated): h11's
    per-field checks, the largest cost of a small exchange, are skipped. The head keeps
    the list it is given: a new one (`headers.forwardable_fields` makes one)."""
    ev = object.__new__(h11.Request)
    object.__setattr__(ev, "method", method)
    object.__setattr__(ev, "target", target)
    object.__setattr__(ev, "headers", _headers(headers))
    object.__setattr__(ev, "http_version", b"1.1")
    return ev


def response(status: int, headers: list[hdr.Field], reason: bytes) -> h11.Response:
    """A response head from already-parsed fields (see `request`)."""
    ev = object.__new__(h11.Response)
    object.__setattr__(ev, "status_code", status)
    object.__setattr__(ev, "reason", reason)
    object.__setattr__(ev, "headers", _headers(headers))
    object.__setattr__(ev, "http_version", b"1.1")
    return ev


class H11Connection:
    """h11 behind the engine interface `Wire` drives (`http1_llhttp.LlhttpConnection`'s)."""

    __slots__ = ("_h",)

    def __init__(self, role: Literal["client", "server"], max_head: int):
        self._h = h11.Connection(h11.CLIENT if role == "client" else h11.SERVER,
                                 max_incomplete_event_size=max_head)

    nothing_to_parse = False  # h11 is always asked

    def next_event(self):
        return self._h.next_event()

    def receive(self, data: bytes) -> None:
        self._h.receive_data(data)

    @property
    def trailing(self) -> bytes:
        return bytes(self._h.trailing_data[0])

    def send(self, event) -> bytes | None:
        return self._h.send(event)

    def send_pieces(self, event) -> list | None:
        return self._h.send_with_data_passthrough(event)

    @property
    def can_answer(self) -> bool:
        return self._h.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def idle(self) -> bool:
        h = self._h
        return (h.our_state is h11.IDLE and h.their_state is h11.IDLE
                and not h.trailing_data[0])

    @property
    def head_started(self) -> bool:
        return self._h.their_state is not h11.IDLE or bool(self._h.trailing_data[0])

    def next_cycle(self) -> bool:
        h = self._h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            return True
        return False


class Wire:
    """One HTTP/1 connection's protocol state, as client or server."""

    __slots__ = ("_c", "role", "_engine", "_max", "_blank", "_skipped")

    def __init__(self, role: Literal["client", "server"], max_head: int = MAX_HEAD,
                 parser: str | None = None):
        self.role = role
        self._max = max_head
        self._engine = http1_llhttp.LlhttpConnection if (parser or PARSER) == "httptools" \
            else H11Connection
        self._c = self._engine(role, max_head)  # type: ignore[operator]
        # RFC 9112 2.2: a server ignores empty lines before a request line (some clients
        # send CRLF after a body); counted against the head's size limit
        self._blank = role == "server"
        self._skipped = 0

    # -- parsing --
    def next_event(self):
        """The next event parsed from what was received, or NEED_DATA."""
        return self._c.next_event()

    def receive(self, data: bytes) -> None:
        """Feed received bytes; b"" is the peer's EOF."""
        if self._blank and data:
            data = self._skip_blank(data)
            if not data:
                return
        self._c.receive(data)

    def _skip_blank(self, data: bytes) -> bytes:
        """data without the empty lines that lead a request (a CR at the end of data is
        taken for the start of a CRLF; a bare CR before other bytes is the parser's)."""
        i, n = 0, len(data)
        while i < n and data[i] in (10, 13):
            if data[i] == 13 and i + 1 < n and data[i + 1] != 10:
                break  # a bare CR: the parser's to refuse
            i += 1
        self._skipped += i
        if self._skipped > self._max:  # the parser refuses what it then sees, as for a head
            self._blank = False
            return data
        if i < n:
            self._blank = False
        return data[i:]

    async def read_event(self, stream: Stream, timeout: float | None):
        """The next event, reading from the stream as needed (EOF is fed as b"").

        The timeout bounds the whole event (a head trickled a byte at a time included),
        not each read."""
        c = self._c
        deadline = None if timeout is None else time.monotonic() + timeout
        ask = not c.nothing_to_parse  # (a keep-alive connection's next head: read first)
        while True:
            if ask:
                ev = c.next_event()
                if ev is not NEED_DATA:
                    return ev
            ask = True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise StreamTimeout()
            data = await stream.read(remaining)
            if self._blank and data:
                data = self._skip_blank(data)
                if not data:
                    continue
            c.receive(data)

    @property
    def trailing(self) -> bytes:
        """Received bytes not parsed yet (what follows the last event)."""
        return self._c.trailing

    # -- encoding --
    def send(self, stream: Stream, event) -> None:
        data = self._c.send(event)
        if data:
            stream.write(data)

    def send_body(self, stream: Stream, data: bytes) -> None:
        """Body bytes, framed as the head announced, written without copying them."""
        for piece in self._c.send_pieces(h11.Data(data=data)):  # type: ignore[union-attr]
            stream.write(piece)

    # -- state --
    @property
    def can_answer(self) -> bool:
        """No response head has gone out yet: an answer of our own can still be sent."""
        return self._c.can_answer

    @property
    def idle(self) -> bool:
        """Between exchanges: no message under way either way, nothing unparsed."""
        return self._c.idle

    @property
    def head_started(self) -> bool:
        """The peer began a message (some of its bytes arrived) that is not complete."""
        return self._c.head_started

    def next_cycle(self) -> bool:
        """Both messages of the exchange are complete: ready the connection for the next
        one. False when it cannot carry another (closing, or a message unfinished)."""
        if not self._c.next_cycle():
            return False
        if self.role == "server":
            self._blank, self._skipped = True, 0
            early = self._c.trailing
            if early[:1] in (b"\r", b"\n"):  # the next head came with empty lines before it
                self._c = self._engine(self.role, self._max)  # type: ignore[operator]
                self.receive(early)
        return True


def error_response(status: int, message: str, extra: tuple = ()) -> list:
    """The events of a short text/plain answer made by dumpproxy itself."""
    body = (message.rstrip("\n") + "\n").encode()
    head = h11.Response(
        status_code=status,
        reason=hdr.reason_phrase(status).encode(),
        headers=[
            *extra,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    return [head, h11.Data(data=body), h11.EndOfMessage()]


def answer_error(wire: Wire, client: Stream, status: int, message: str,
                 extra: tuple = ()) -> bool:
    """Best effort error answer (the connection is closed after it); False when it could
    not be sent (the client is gone, or a response head went out already)."""
    if not wire.can_answer:
        return False
    try:
        for event in error_response(status, message, extra):
            wire.send(client, event)
    except (h11.LocalProtocolError, ConnectionError):
        return False
    return True


def protocol_error_text(e: h11.ProtocolError, redact: bool) -> str:
    """The parser's message, whose quoted raw line may carry credentials (a malformed
    `Authorization` line): withheld unless --no-redact; a bytearray repr made readable."""
    text = str(e)
    if redact:
        cut = re.search(r": (bytearray\()?b['\"]", text)
        if cut:
            return text[: cut.start()] + " (raw bytes withheld; --no-redact shows them)"
        return text
    return re.sub(r"bytearray\((b'.*?')\)", r"\1", text)


def status_hint(e: h11.ProtocolError) -> int:
    """The status a malformed request is answered with (400, 431 for a head too large)."""
    return e.error_status_hint or 400
