"""HTTP/1 with llhttp (httptools): the fast engine behind `http1_wire.Wire`. Pure: bytes in,
h11's event objects out; events in, bytes out; no I/O.

It behaves as an `h11.Connection` does, event for event, refusal for refusal (the
differential tests in tests/test_http1_parsers.py hold it to that):

- llhttp parses heads and chunked bodies, its lenient flags off (nothing here calls
  `set_dangerous_leniencies`). A head is fed to it up to its first CRLFCRLF only, so the
  bytes after a head stay unparsed (`trailing`), as with h11; a chunked body is fed up to
  each CRLFCRLF, where it may end. A message is parsed by a parser of its own.
- A head llhttp refuses, or one it accepts where h11 would decide otherwise (HTTP/0.9
  request lines, a first byte below "!", a missing or repeated Host, a Transfer-Encoding
  other than "chunked", a Content-Length over 20 digits, a status under 100, odd bytes in
  a reason, an upgrade with a chunked body), is parsed again by an h11 connection, which
  reads that one message: h11's event or h11's exception, the same as the h11 engine's.
- Content-Length and read-until-close bodies are sliced here (nothing to parse).
- The state machine is h11's own `ConnectionState`, driven as `h11.Connection` drives
  it: switch proposals, keep-alive, the errors for events sent in the wrong state.
- Writing is done here, byte for byte as h11 writes (Host first; a response's framing and
  Connection fields fixed as h11 fixes them), without h11's per-event overhead.

Where llhttp is stricter than h11 inside a chunked body (whitespace after a chunk size,
chunk extensions that are not `;token[=token|quoted-string]`, sizes over 16 hex digits,
control bytes, obs-fold or framing fields in trailers), the message is refused: no head is
refused for it, and what h11 tolerated there is dropped when dumpproxy re-frames the body
anyway. The head cap inside a chunked body (h11's "receive buffer too long" for a chunk
line or trailer section over the cap) counts the bytes fed since the last body byte.
"""

from __future__ import annotations

import re

import h11
import httptools
from h11._headers import Headers
from h11._state import (
    _SWITCH_CONNECT,
    _SWITCH_UPGRADE,
    CLIENT,
    DONE,
    ERROR,
    EVENT_TRIGGERED_TRANSITIONS,
    IDLE,
    MIGHT_SWITCH_PROTOCOL,
    SEND_BODY,
    SEND_RESPONSE,
    SERVER,
    STATE_TRIGGERED_TRANSITIONS,
    SWITCHED_PROTOCOL,
    ConnectionState,
)

Request = h11.Request
Response = h11.Response
InformationalResponse = h11.InformationalResponse
Data = h11.Data
EndOfMessage = h11.EndOfMessage
ConnectionClosed = h11.ConnectionClosed
LocalProtocolError = h11.LocalProtocolError
RemoteProtocolError = h11.RemoteProtocolError
NEED_DATA = h11.NEED_DATA
PAUSED = h11.PAUSED

VERSION = httptools.__version__

_new = object.__new__
_set = object.__setattr__
_HEAD_END = b"\r\n\r\n"
# Header names whose values the engine needs while parsing (framing, Host, keep-alive).
_NOTED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                    b"upgrade"})
_BAD_REASON = re.compile(rb"[\x00\x0b\x0c]").search  # llhttp allows them in a reason; h11 not
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}

# Body framings (h11's names).
_LENGTH = "content-length"
_CHUNKED = "chunked"
_UNTIL_CLOSE = "http/1.0"


class _Fallback(Exception):
    """llhttp cannot decide this head as h11 would: h11 parses it."""


def _tokens(items, name: bytes) -> list[bytes]:
    """h11's get_comma_header over full items."""
    return [t for _, n, v in items if n == name for t in
            (s.strip() for s in v.lower().split(b",")) if t]


def _set_comma(items: list, name: bytes, values: list[bytes]) -> list:
    """h11's set_comma_header: the field moved to the end, title-cased, one line a value."""
    title = name.title()
    return [it for it in items if it[1] != name] + [(title, name, v) for v in values]


def _head_block(items) -> list[bytes]:
    """Header lines as h11 writes them: Host first."""
    lines = [b"%s: %s\r\n" % (raw, value) for raw, name, value in items if name == b"host"]
    if lines:
        lines += [b"%s: %s\r\n" % (raw, value) for raw, name, value in items
                  if name != b"host"]
    else:
        lines = [b"%s: %s\r\n" % (raw, value) for raw, _, value in items]
    lines.append(b"\r\n")
    return lines


def _facts(items) -> tuple:
    """What framing, keep-alive and upgrades depend on, in one pass over the fields:
    (Transfer-Encoding, Content-Length, Connection names close, Upgrade is set)."""
    te = cl = None
    close = upgrade = False
    for _, name, value in items:
        if name in _NOTED:
            if name == b"transfer-encoding":
                te = te or value.strip() or None
            elif name == b"content-length":
                cl = cl or value
            elif name == b"connection":
                close = close or b"close" in (t.strip() for t in value.lower().split(b","))
            elif name == b"upgrade":
                upgrade = upgrade or any(t.strip() for t in value.split(b","))
    return te, cl, close, upgrade


def _framing(method: bytes | None, ev, te, cl) -> tuple[str, int]:
    """h11's _body_framing, from the head's facts."""
    if type(ev) is Response:
        status = ev.status_code
        if status in (204, 304) or method == b"HEAD" or (
                method == b"CONNECT" and 200 <= status < 300):
            return _LENGTH, 0
    if te is not None:
        return _CHUNKED, 0
    if cl is not None:
        return _LENGTH, int(cl)
    return (_LENGTH, 0) if type(ev) is Request else (_UNTIL_CLOSE, 0)


class _States(ConnectionState):
    """h11's state machine, with the event of a plain keep-alive exchange applied directly:
    with no protocol switch proposed and keep-alive on, h11's rules reduce to its event
    table, plus its state-triggered table when the new pair of states is in it. Anything
    else (a switch, a close, an error, an event out of place) goes through h11's own code,
    which also raises its errors."""

    def process_event(self, role, event_type, server_switch_event=None) -> None:
        if server_switch_event is None and self.keep_alive and not self.pending_switch_proposals:
            states = self.states
            new = EVENT_TRIGGERED_TRANSITIONS[role][states[role]].get(event_type)
            if new is not None and event_type is not ConnectionClosed:
                if event_type is Request:
                    server = EVENT_TRIGGERED_TRANSITIONS[SERVER][states[SERVER]].get(
                        (Request, CLIENT))
                    if server is None:
                        return super().process_event(role, event_type)
                    states[SERVER] = server
                states[role] = new
                if (states[CLIENT], states[SERVER]) in STATE_TRIGGERED_TRANSITIONS:
                    self._fire_state_triggered_transitions()
                return None
        return super().process_event(role, event_type, server_switch_event)


class LlhttpConnection:
    """One HTTP/1 connection as client or server: the interface `http1_wire.Wire` uses."""

    __slots__ = (
        "_our", "_their", "_cs", "_max", "_buf", "_eof", "_events",
        "_method", "_their_version", "_sent", "_fallback",
        # reading a head
        "_parser", "_head", "_fed", "_tail", "_target", "_reason", "_items", "_done",
        "_upgraded", "_hosts", "_te", "_cl", "_close", "_upgrade",
        # reading a body
        "_mode", "_left", "_length", "_trailers", "_complete", "_run",
        # writing
        "_wmode", "_wleft",
    )

    def __init__(self, role: str, max_head: int):
        self._our, self._their = (CLIENT, SERVER) if role == "client" else (SERVER, CLIENT)
        self._cs = _States()
        self._max = max_head
        self._buf = b""  # received, not given to a parser yet
        self._eof = False
        # parsed from a chunked body, not returned yet (a list: a deque's first block
        # is 0.5 KB, and thousands of idle connections each hold one)
        self._events: list = []
        self._method: bytes | None = None  # the request method of this exchange
        self._their_version: bytes | None = None
        self._sent: Request | None = None  # client: the request head sent (for h11)
        self._fallback: h11.Connection | None = None  # h11 reading the current message
        self._parser = None
        self._target = self._reason = b""
        self._items: list = []
        self._done = self._upgraded = self._close = self._upgrade = False
        self._hosts = 0
        self._te = self._cl = None
        self._head: list[bytes] = []  # the raw head so far (for h11, for `trailing`)
        self._fed = 0
        self._tail = b""
        self._mode = None
        self._left = self._length = 0
        self._trailers: list = []
        self._complete = False
        self._run = 0
        self._wmode = None
        self._wleft = 0

    # -- llhttp's callbacks --
    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, h11 does not
        if self._done:  # a trailer field (h11 validates and normalises trailers itself)
            self._trailers.append((name, value))
            return
        if lname in _NOTED:
            if lname == b"host":
                self._hosts += 1
            elif lname == b"content-length":
                self._cl = value
            elif lname == b"transfer-encoding":
                value = value.lower()
                # repeated fields are one list (RFC 9110 5.3), as h11 reads them: anything
                # but a lone `chunked` goes to h11, which refuses it
                self._te = value if self._te is None else self._te + b", " + value
            elif lname == b"connection":
                self._close = self._close or b"close" in (
                    t.strip() for t in value.lower().split(b","))
            else:
                self._upgrade = self._upgrade or any(t.strip() for t in value.split(b","))
        self._items.append((name, lname, value))

    def on_headers_complete(self) -> None:
        self._done = True

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(data=body))
        self._run = 0

    def on_message_complete(self) -> None:
        if self._done and self._mode is _CHUNKED:
            self._complete = True

    # -- reading --
    def receive(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise RuntimeError("received close, then received more data?")
            if self._fallback is not None:
                self._fallback.receive_data(data)
            else:
                self._buf = self._buf + data if self._buf else bytes(data)
        else:
            self._eof = True
            if self._fallback is not None:
                self._fallback.receive_data(b"")

    def next_event(self):
        cs = self._cs
        if cs.states[self._their] is ERROR:
            raise RemoteProtocolError("Can't receive data when peer state is ERROR")
        try:
            ev = self._extract()
            if ev is NEED_DATA:
                if self._fallback is None:
                    if self._pending() > self._max:
                        raise RemoteProtocolError("Receive buffer too long",
                                                  error_status_hint=431)
                    if self._eof:
                        raise RemoteProtocolError("peer unexpectedly closed connection")
            elif ev is not PAUSED:
                self._received(ev)
            return ev
        except BaseException as exc:
            cs.process_error(self._their)
            if isinstance(exc, LocalProtocolError):
                exc._reraise_as_remote_protocol_error()
            raise

    @property
    def nothing_to_parse(self) -> bool:
        """A head is awaited and nothing was received: next_event() could only say
        NEED_DATA, with no other effect (the caller reads first)."""
        if self._buf or self._fed or self._eof or self._events or self._fallback is not None:
            return False
        state = self._cs.states[self._their]
        return state is IDLE or state is SEND_RESPONSE

    def _pending(self) -> int:
        """What h11 would hold in its buffer while it needs more data."""
        if self._mode is _CHUNKED:
            return self._run
        return self._fed + len(self._buf)

    def _extract(self):
        if self._events:
            ev = self._events.pop(0)
            if type(ev) is LocalProtocolError:
                raise ev
            return ev
        state = self._cs.states[self._their]
        if state is DONE and (self._buf or self._fallback is not None and
                              self._fallback.trailing_data[0]):
            return PAUSED
        if state is MIGHT_SWITCH_PROTOCOL or state is SWITCHED_PROTOCOL:
            return PAUSED
        if self._fallback is not None:
            return self._from_fallback()
        if state is SEND_BODY:
            ev = self._read_body()
        elif state is IDLE or state is SEND_RESPONSE:
            ev = self._read_head()
        else:  # DONE, MUST_CLOSE, CLOSED
            if self._buf:
                raise LocalProtocolError("Got data when expecting EOF")
            ev = None
        if ev is None:
            if self._eof and not self._buf and not self._fed:
                if state is SEND_BODY:
                    return self._body_eof()
                return ConnectionClosed()
            return NEED_DATA
        return ev

    def _from_fallback(self):
        h = self._fallback
        ev = h.next_event()  # type: ignore[union-attr]
        if type(ev) is EndOfMessage:  # the message is read: llhttp takes the next one
            self._buf = bytes(h.trailing_data[0])  # type: ignore[union-attr]
            self._fallback = None
        return ev

    def _read_head(self):
        while self._buf:
            buf = self._buf
            if not self._fed:  # a new head
                if buf[0] < 0x21:  # h11 refuses at once; llhttp would skip CR and LF
                    return self._fall_back()
                self._start_head()
                self._tail = b""
            end = _cut(self._tail, buf)
            piece, self._buf = buf[:end], buf[end:]
            self._head.append(piece)
            self._fed += len(piece)
            whole = (self._tail + piece).endswith(_HEAD_END)  # the head ends here
            self._tail = (self._tail + piece)[-3:] if len(piece) < 3 else piece[-3:]
            try:
                self._parser.feed_data(piece)  # type: ignore[union-attr]
            except httptools.HttpParserUpgrade:
                self._upgraded = True
            except httptools.HttpParserError:
                return self._fall_back()
            if self._done:
                try:
                    return self._head_event()
                except _Fallback:
                    return self._fall_back()
            if whole:  # a whole head llhttp wants more after (a PRI line): h11 says
                return self._fall_back()
        return None

    def _start_head(self) -> None:
        self._parser = (httptools.HttpResponseParser if self._our is CLIENT
                        else httptools.HttpRequestParser)(self)
        self._target = self._reason = b""
        self._items = []
        self._done = self._upgraded = self._close = self._upgrade = False
        self._mode = None
        self._hosts = 0
        self._te = self._cl = None

    def _head_event(self):
        """The parsed head as h11's event, or _Fallback where h11 might differ."""
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())  # type: ignore[union-attr]
        if version is None:
            version = parser.get_http_version().encode()  # type: ignore[union-attr]
            if version == b"0.9":  # also what llhttp makes of a line without a version
                raise _Fallback
        te, cl = self._te, self._cl
        if te is not None and (te != b"chunked" or self._upgraded):
            raise _Fallback
        if cl is not None and len(cl) > 20:
            raise _Fallback
        headers = _new(Headers)
        _set(headers, "_full_items", self._items)
        if self._our is SERVER:
            if self._hosts != 1 and (self._hosts or version == b"1.1"):
                raise _Fallback
            ev = _new(Request)
            _set(ev, "method", parser.get_method())  # type: ignore[union-attr]
            _set(ev, "target", self._target)
        else:
            status = parser.get_status_code()  # type: ignore[union-attr]
            reason = self._reason
            if status < 100 or reason and _BAD_REASON(reason):
                raise _Fallback
            ev = _new(Response if status >= 200 else InformationalResponse)
            _set(ev, "status_code", status)
            _set(ev, "reason", reason)
        _set(ev, "headers", headers)
        _set(ev, "http_version", version)
        self._head = []
        self._fed = 0
        if te is None:
            self._parser = None  # the body, if any, is sliced here
        return ev

    def _fall_back(self):
        """h11 reads this message, from the first byte of its head."""
        h = h11.Connection(self._our, max_incomplete_event_size=self._max)
        sent = self._sent
        if sent is not None:  # h11 frames a response by the request it answers
            h.send(Request(method=sent.method, target=sent.target, headers=[
                (n, v) for n, ln, v in sent.headers._full_items
                if ln not in (b"content-length", b"transfer-encoding")]))
            h.send(EndOfMessage())
        raw = b"".join(self._head) + self._buf
        if raw:
            h.receive_data(raw)
        if self._eof:
            h.receive_data(b"")
        self._head = []
        self._fed = 0
        self._buf = b""
        self._parser = None
        self._fallback = h
        return self._from_fallback()

    def _read_body(self):
        mode = self._mode
        if mode is _LENGTH:
            left = self._left
            if not left:
                return EndOfMessage()
            data = self._buf
            if not data:
                return None
            if len(data) > left:
                data, self._buf = data[:left], data[left:]
            else:
                self._buf = b""
            self._left = left - len(data)
            return Data(data=data)
        if mode is _UNTIL_CLOSE:
            data = self._buf
            if not data:
                return None
            self._buf = b""
            return Data(data=data)
        return self._read_chunked()

    def _read_chunked(self):
        parser, events = self._parser, self._events
        while self._buf and not self._complete:
            buf = self._buf
            end = _cut(self._tail, buf)
            piece, self._buf = buf[:end], buf[end:]
            self._tail = (self._tail + piece)[-3:] if len(piece) < 3 else piece[-3:]
            self._run += len(piece)
            try:
                parser.feed_data(piece)  # type: ignore[union-attr]
            except httptools.HttpParserError as e:  # after the body bytes before it
                events.append(LocalProtocolError(f"illegal chunked body: {e}"))
                self._buf = b""
                break
        if self._complete:
            self._parser = None
            self._mode = None
            trailers = self._trailers
            events.append(EndOfMessage(headers=trailers) if trailers else EndOfMessage())
        if events:
            ev = events.pop(0)
            if type(ev) is LocalProtocolError:
                raise ev
            return ev
        return None

    def _body_eof(self):
        """EOF where a body is being read (h11's read_eof)."""
        if self._mode is _UNTIL_CLOSE:
            return EndOfMessage()
        if self._mode is _LENGTH:
            raise RemoteProtocolError(
                "peer closed connection without sending complete message body "
                f"(received {self._length - self._left} bytes, expected {self._length})")
        raise RemoteProtocolError("peer closed connection without sending complete "
                                  "message body (incomplete chunked read)")

    def _received(self, ev) -> None:
        """A received event through the state machine, as h11.Connection does it."""
        kind = type(ev)
        if kind is Data:
            return
        cs = self._cs
        role = self._their
        before = cs.states[role]
        generic = self._fallback is not None  # h11 parsed it: the facts from its headers
        if kind is Request:
            if ev.method == b"CONNECT":
                cs.process_client_switch_proposal(_SWITCH_CONNECT)
            if _tokens(ev.headers._full_items, b"upgrade") if generic else self._upgrade:
                cs.process_client_switch_proposal(_SWITCH_UPGRADE)
        switch = _server_switch(cs, ev) if role is SERVER else None
        cs.process_event(role, kind, switch)
        if kind is Request:
            self._method = ev.method
        if kind is Request or kind is Response or kind is InformationalResponse:
            self._their_version = ev.http_version
            if kind is not InformationalResponse and (
                    (b"close" in _tokens(ev.headers._full_items, b"connection")
                     if generic else self._close) or ev.http_version < b"1.1"):
                cs.process_keep_alive_disabled()
        state = cs.states[role]
        if state is SEND_BODY:
            if before is not SEND_BODY and not generic:
                mode, self._left = _framing(self._method, ev, self._te, self._cl)
                self._length = self._left
                self._mode = mode
                if mode is _CHUNKED:
                    self._trailers = []
                    self._complete = False
                    self._run = 0
                    self._tail = b""
                else:
                    self._parser = None
        elif self._parser is not None:
            self._parser = None

    # -- writing --
    def send(self, event) -> bytes | None:
        """The bytes for an event (None for ConnectionClosed)."""
        pieces = self.send_pieces(event)
        if pieces is None:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def send_pieces(self, event) -> list | None:
        """The event's bytes in pieces: a Data event's own bytes are one of them."""
        cs = self._cs
        our = self._our
        kind = type(event)
        state = cs.states[our]
        try:
            if kind is Data and state is SEND_BODY:  # the hot path: no state change
                return self._write_data(event.data)
            if state is ERROR:
                raise LocalProtocolError("Can't send data when our state is ERROR")
            if kind is Response and our is SERVER:
                event, facts = self._clean_response(event)
            elif kind is Request or kind is Response:
                facts = _facts(event.headers._full_items)
            else:
                facts = None
            self._sent_event(event, facts)
            if kind is ConnectionClosed:
                return None
            if kind is Data:
                return self._write_data(event.data)
            if kind is EndOfMessage:
                return self._write_eom(event.headers)
            if event.http_version != b"1.1":
                raise LocalProtocolError("I only send HTTP/1.1")
            if kind is Request:
                first = b"%s %s HTTP/1.1\r\n" % (event.method, event.target)
            else:
                first = b"HTTP/1.1 %s %s\r\n" % (str(event.status_code).encode("ascii"),
                                                 event.reason)
            lines = _head_block(event.headers._full_items)
            lines.insert(0, first)
            return [b"".join(lines)]
        except BaseException:
            if state is not ERROR:
                cs.process_error(our)
            raise

    def _sent_event(self, event, facts: tuple | None) -> None:
        """A sent event through the state machine (h11.Connection._process_event)."""
        cs = self._cs
        role = self._our
        kind = type(event)
        if kind is Request:
            if event.method == b"CONNECT":
                cs.process_client_switch_proposal(_SWITCH_CONNECT)
            if facts[3]:  # type: ignore[index]
                cs.process_client_switch_proposal(_SWITCH_UPGRADE)
        switch = _server_switch(cs, event) if role is SERVER else None
        before = cs.states[role]
        cs.process_event(role, kind, switch)
        if kind is Request:
            self._method = event.method
            self._sent = event
        if facts is not None:
            if facts[2] or event.http_version < b"1.1":
                cs.process_keep_alive_disabled()
            if cs.states[role] is SEND_BODY and before is not SEND_BODY:
                self._wmode, self._wleft = _framing(self._method, event, facts[0], facts[1])

    def _clean_response(self, resp) -> tuple:
        """h11's _clean_up_response_headers_for_sending: a body of unknown length is
        chunked to an HTTP/1.1 client, else runs to the close; `Connection: close` when
        the connection will not be kept. The response, and its facts."""
        method = self._method
        status = resp.status_code
        items = resp.headers._full_items
        facts = _facts(items)
        changed = need_close = False
        if _framing(b"GET" if method == b"HEAD" else method, resp, facts[0],
                    facts[1])[0] is not _LENGTH:
            items = _set_comma(items, b"content-length", [])
            version = self._their_version
            if version is None or version < b"1.1":
                items = _set_comma(items, b"transfer-encoding", [])
                need_close = method != b"HEAD"
            else:
                items = _set_comma(items, b"transfer-encoding", [b"chunked"])
            changed = True
        if need_close or not self._cs.keep_alive:
            tokens = set(_tokens(items, b"connection"))
            tokens.discard(b"keep-alive")
            tokens.add(b"close")
            items = _set_comma(items, b"connection", sorted(tokens))
            changed = True
        if not changed:
            return resp, facts
        headers = _new(Headers)
        _set(headers, "_full_items", items)
        out = _new(Response)
        _set(out, "headers", headers)
        _set(out, "status_code", status)
        _set(out, "http_version", resp.http_version)
        _set(out, "reason", resp.reason)
        return out, _facts(items)

    def _write_data(self, data) -> list:
        mode = self._wmode
        if mode is _LENGTH:
            left = self._wleft - len(data)
            if left < 0:
                raise LocalProtocolError("Too much data for declared Content-Length")
            self._wleft = left
            return [data]
        if mode is _CHUNKED:
            return [b"%x\r\n" % len(data), data, b"\r\n"] if data else []
        return [data]

    def _write_eom(self, headers) -> list:
        mode = self._wmode
        self._wmode = None
        if mode is _LENGTH:
            if self._wleft:
                raise LocalProtocolError("Too little data for declared Content-Length")
            if headers:
                raise LocalProtocolError("Content-Length and trailers don't mix")
            return []
        if mode is _CHUNKED:
            return [b"0\r\n" + b"".join(_head_block(headers._full_items))]
        if headers:
            raise LocalProtocolError("can't send trailers to HTTP/1.0 client")
        return []

    # -- state --
    @property
    def trailing(self) -> bytes:
        """Received bytes not parsed yet."""
        if self._fallback is not None:
            return bytes(self._fallback.trailing_data[0])
        if self._fed:
            return b"".join(self._head) + self._buf
        return self._buf

    @property
    def can_answer(self) -> bool:
        return self._cs.states[self._our] in (IDLE, SEND_RESPONSE)

    @property
    def idle(self) -> bool:
        states = self._cs.states
        return (states[self._our] is IDLE and states[self._their] is IDLE
                and not self.head_started)

    @property
    def head_started(self) -> bool:
        return self._cs.states[self._their] is not IDLE or bool(
            self._buf or self._fed or self._fallback is not None
            and self._fallback.trailing_data[0])

    def next_cycle(self) -> bool:
        cs = self._cs
        if cs.states[self._our] is DONE and cs.states[self._their] is DONE:
            cs.start_next_cycle()
            self._method = self._sent = None
            self._mode = self._wmode = None
            return True
        return False


def _server_switch(cs: ConnectionState, ev):
    """h11.Connection._server_switch_event."""
    kind = type(ev)
    if kind is InformationalResponse and ev.status_code == 101:
        return _SWITCH_UPGRADE
    if kind is Response and _SWITCH_CONNECT in cs.pending_switch_proposals and \
            200 <= ev.status_code < 300:
        return _SWITCH_CONNECT
    return None


def _cut(tail: bytes, buf: bytes) -> int:
    """How much of buf to feed: up to the end of the first CRLFCRLF (which may begin in the
    last bytes fed, `tail`), else all of it."""
    if tail:
        joint = (tail + buf[:3]).find(_HEAD_END)
        if joint != -1:
            return joint + 4 - len(tail)
    i = buf.find(_HEAD_END)
    return len(buf) if i == -1 else i + 4
