"""Both HTTP bridges in-process, over in-memory streams: no sockets, no subprocesses.

In the manner of httpcore's AsyncMockStream tests, but with a live peer on each side: the
client is the test itself (h11 or h2), the origin is a coroutine written in the test (h11
or h2, server side). The rig (`inprocess`) is real: Config, HostFilter, Services,
Context, serve_http1, Exchange and H2Bridge. More HTTP/2 cases: test_h2_inprocess.py.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.errors
import h11
import pytest
from inprocess import CLIENT, ORIGIN_IP, H2Msg, H2Peer, Origin, Rig, h2_request, h2_start, run
from memstream import MemStream

from dumpproxy.hostfilter import FilterSources
from dumpproxy.http1_server import Connect, Target, serve_http1

# The events of one exchange on one upstream connection, in order.
ONE_EXCHANGE = ["server_connect", "decision", "request", "response", "server_disconnect"]


# --- HTTP/1 peers ------------------------------------------------------------------------


def _hdict(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.decode().lower()
        out[key] = f"{out[key]}, {value.decode()}" if key in out else value.decode()
    return out


@dataclass
class Message:
    """One HTTP/1 message as a peer received it."""

    head: Any  # h11.Request, h11.Response or h11.InformationalResponse
    body: bytes = b""
    chunks: int = 0  # Data events the body came in
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return _hdict(self.head.headers)

    @property
    def status(self) -> int:
        return self.head.status_code


class H1:
    """One side of an HTTP/1 connection in a test, driven with h11."""

    def __init__(self, stream: MemStream, role: type[h11.CLIENT] | type[h11.SERVER]):
        self.stream = stream
        self.h = h11.Connection(role)

    def send(self, *events: Any) -> None:
        for ev in events:
            data = self.h.send(ev)
            if data:
                self.stream.write(data)

    async def next_event(self) -> Any:
        while (ev := self.h.next_event()) is h11.NEED_DATA:
            self.h.receive_data(await self.stream.read())
        return ev

    async def message(self) -> Message | None:
        """The next whole message (a 1xx is one by itself); None at a clean close."""
        ev = await self.next_event()
        if type(ev) is h11.ConnectionClosed:
            return None
        msg = Message(ev)
        if type(ev) is h11.InformationalResponse:
            return msg
        while type(ev := await self.next_event()) is h11.Data:
            msg.body += ev.data
            msg.chunks += 1
        assert type(ev) is h11.EndOfMessage, ev
        msg.trailers = _hdict(ev.headers)
        return msg


def get(url: str, *headers: tuple[str, str], host: str = "example.test") -> list:
    return [h11.Request(method="GET", target=url, headers=[("Host", host), *headers]),
            h11.EndOfMessage()]


_REASONS = {200: "OK", 413: "Content Too Large"}


def response(status: int, body: bytes = b"", *headers: tuple[str, str]) -> list:
    """A Content-Length response's events."""
    events: list = [h11.Response(status_code=status, reason=_REASONS.get(status, ""),
                                 headers=[("Content-Length", str(len(body))), *headers])]
    if body:
        events.append(h11.Data(data=body))
    return [*events, h11.EndOfMessage()]


def parse_response(raw: bytes) -> Message:
    """A whole response read off a connection that then closed (e.g. an error answer)."""
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # state only
    h.send(h11.EndOfMessage())
    h.receive_data(raw)
    h.receive_data(b"")
    msg = Message(h.next_event())
    while type(ev := h.next_event()) is h11.Data:
        msg.body += ev.data
    assert type(ev) is h11.EndOfMessage, ev
    assert type(h.next_event()) is h11.ConnectionClosed  # nothing after it
    return msg


def h1_origin(answer: Callable[[Message], list]) -> Origin:
    """An origin answering each request of a connection; returns the requests it saw."""

    async def origin(stream: MemStream) -> list[Message]:
        o = H1(stream, h11.SERVER)
        seen = []
        while (req := await o.message()) is not None:
            seen.append(req)
            o.send(*answer(req))
            if o.h.our_state is h11.MUST_CLOSE:  # it said Connection: close
                stream.close()
                break
            o.h.start_next_cycle()
        return seen

    return origin


def hello(req: Message) -> list:
    return response(200, b"hello", ("Content-Type", "text/plain"))


# --- HTTP/1: the explicit proxy ----------------------------------------------------------


def test_get_with_content_length() -> None:
    async def main() -> None:
        rig = Rig(h1_origin(hello))
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://example.test/path?q=1", ("Proxy-Connection", "keep-alive")))
        resp = await c.message()
        client.close()
        assert await serving is None

        assert resp is not None and resp.status == 200 and resp.body == b"hello"
        assert resp.headers["content-length"] == "5"
        [[req]] = await rig.origins()
        assert (req.head.method, req.head.target) == (b"GET", b"/path?q=1")  # origin-form
        assert req.headers == {"host": "example.test"}  # Proxy-Connection is hop-by-hop

        assert rig.kinds() == ONE_EXCHANGE
        assert all(e["conn"] == 1 and e["client"] == CLIENT for e in rig.events)
        connect, decision, request, resp_ev, disconnect = rig.events
        assert (connect["address"], connect["ip"]) == ("example.test:80", f"{ORIGIN_IP}:80")
        assert decision["action"] == "intercept" and decision["reason"] == "default"
        assert decision["candidates"] == [f"{ORIGIN_IP}:80", "example.test:80"]
        assert request["flow"] == resp_ev["flow"] == 1
        assert request["url"] == "http://example.test/path?q=1"
        assert (request["method"], request["host"], request["port"], request["path"]) == (
            "GET", "example.test", 80, "/path?q=1")
        assert request["headers"]["proxy-connection"] == "keep-alive"  # recorded as sent
        assert (resp_ev["status"], resp_ev["reason"]) == (200, "OK")
        assert (resp_ev["request_bytes"], resp_ev["response_bytes"]) == (0, 5)
        assert resp_ev["headers"]["content-type"] == "text/plain"
        rig.check_disconnect(disconnect)

    run(main)


def test_chunked_response_with_trailers() -> None:
    def chunked(req: Message) -> list:
        return [h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]),
                h11.Data(data=b"hel"), h11.Data(data=b"lo, "), h11.Data(data=b"world"),
                h11.EndOfMessage(headers=[("X-Checksum", "abc")])]

    async def main() -> None:
        rig = Rig(h1_origin(chunked))
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://example.test/trailers", ("TE", "trailers")))
        resp = await c.message()
        client.close()
        await serving

        assert resp is not None and resp.body == b"hello, world"
        assert resp.headers["transfer-encoding"] == "chunked"
        assert resp.trailers == {"x-checksum": "abc"}
        [[req]] = await rig.origins()
        assert "te" not in req.headers  # hop-by-hop on HTTP/1
        assert rig.kinds() == ONE_EXCHANGE
        [ev] = rig.of("response")
        assert (ev["status"], ev["request_bytes"], ev["response_bytes"]) == (200, 0, 12)

    run(main)


def test_post_body_streams_up() -> None:
    parts = [b"a" * 1000, b"b" * 2000, b"c" * 3000]
    arrived: asyncio.Queue[int] = asyncio.Queue()

    async def origin(stream: MemStream) -> tuple[Message, list[bytes]]:
        o = H1(stream, h11.SERVER)
        head = await o.next_event()
        got = []
        while type(ev := await o.next_event()) is h11.Data:
            got.append(ev.data)
            arrived.put_nowait(len(ev.data))  # lets the client send its next part
        o.send(*response(200, str(sum(map(len, got))).encode()))
        await o.message()  # until the proxy closes
        return Message(head), got

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(h11.Request(method="POST", target="http://example.test/upload", headers=[
            ("Host", "example.test"), ("Content-Length", str(sum(map(len, parts))))]))
        for part in parts:
            # Each part is sent only once the origin has the previous one: a proxy that
            # held the body back would hang here (and fail at TIME_LIMIT).
            c.send(h11.Data(data=part))
            assert await arrived.get() == len(part)
        c.send(h11.EndOfMessage())
        resp = await c.message()
        client.close()
        await serving

        assert resp is not None and (resp.status, resp.body) == (200, b"6000")
        [(head, got)] = await rig.origins()
        assert head.head.method == b"POST" and head.headers["content-length"] == "6000"
        assert got == parts
        [ev] = rig.of("response")
        assert (ev["request_bytes"], ev["response_bytes"]) == (6000, 4)

    run(main)


def test_keep_alive_reuses_one_upstream() -> None:
    def by_path(req: Message) -> list:
        return response(200, b"answer to " + req.head.target)

    async def main() -> None:
        rig = Rig(h1_origin(by_path))
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        bodies = []
        for path in ("/one", "/two"):
            c.send(*get("http://example.test" + path))
            resp = await c.message()
            assert resp is not None
            bodies.append(resp.body)
            c.h.start_next_cycle()
        client.close()
        await serving

        assert bodies == [b"answer to /one", b"answer to /two"]
        assert rig.connector.connects == ["example.test:80"]
        [seen] = await rig.origins()  # one connection carried both
        assert [m.head.target for m in seen] == [b"/one", b"/two"]
        assert rig.kinds() == ["server_connect", "decision", "request", "response",
                               "decision", "request", "response", "server_disconnect"]
        assert [e["flow"] for e in rig.of("request")] == [1, 2]
        assert [(e["flow"], e["url"]) for e in rig.of("response")] == [
            (1, "http://example.test/one"), (2, "http://example.test/two")]
        rig.check_disconnect(rig.events[-1])

    run(main)


def test_ignored_host_is_forwarded_unrecorded() -> None:
    async def main() -> None:
        rig = Rig(h1_origin(hello),
                  sources=FilterSources(ignore_flags=(r"^ignored\.test:80$",)))
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://ignored.test/x", host="ignored.test"))
        resp = await c.message()
        client.close()
        await serving

        assert resp is not None and (resp.status, resp.body) == (200, b"hello")
        [[req]] = await rig.origins()
        assert req.head.target == b"/x"
        assert rig.kinds() == ["server_connect", "decision", "server_disconnect"]
        [d] = rig.of("decision")
        assert (d["address"], d["action"], d["reason"]) == (
            "ignored.test:80", "passthrough", "ignore_hosts")
        assert (d["pattern"], d["source"], d["matched"]) == (
            r"^ignored\.test:80$", "--ignore-hosts", "ignored.test:80")
        assert rig.services.stats.passthrough == 1

    run(main)


def test_origin_closes_mid_body() -> None:
    async def origin(stream: MemStream) -> Message | None:
        o = H1(stream, h11.SERVER)
        req = await o.message()
        o.send(h11.Response(status_code=200, headers=[("Content-Length", "10")]),
               h11.Data(data=b"part"))
        stream.close()  # 6 bytes short
        return req

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        H1(client, h11.CLIENT).send(*get("http://example.test/cut"))
        raw, reset = await client.read_all()
        await serving

        # The head was out: the client can only be cut off, never sent a clean end.
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\npart")
        assert reset
        assert rig.kinds() == ["server_connect", "decision", "request", "server_disconnect",
                               "error", "response"]
        err, resp = rig.events[-2:]
        assert (err["stage"], err["flow"], err["address"]) == ("upstream", 1, "example.test:80")
        assert err["message"] == ("example.test:80 closed the connection: connection closed "
                                  "before the response ended")
        # the exchange is in the record, cut by the origin, with what got through
        assert (resp["flow"], resp["status"], resp["aborted"], resp["response_bytes"]) == (
            1, 200, "server", 4)

    run(main)


def test_malformed_response_head() -> None:
    async def origin(stream: MemStream) -> Message | None:
        o = H1(stream, h11.SERVER)
        req = await o.message()
        stream.write(b"HTTP/1.1 two hundred OK\r\n\r\n")
        await stream.read_all()  # until the proxy hangs up
        return req

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        H1(client, h11.CLIENT).send(*get("http://example.test/bad"))
        raw, reset = await client.read_all()
        await serving

        assert not reset
        resp = parse_response(raw)
        assert resp.status == 502 and resp.headers["connection"] == "close"
        assert resp.body.startswith(b"malformed response from example.test:80: ")
        [req] = await rig.origins()
        assert req.head.target == b"/bad"
        assert rig.kinds() == ["server_connect", "decision", "request", "server_disconnect",
                               "error", "response"]
        err, answered = rig.events[-2:]
        assert (err["stage"], err["flow"], err["address"]) == ("upstream", 1, "example.test:80")
        assert err["message"] == resp.body.decode().rstrip("\n")  # what the client was told
        # dumpproxy's own answer is the exchange's response, as the client got it
        assert (answered["flow"], answered["status"], answered["response_bytes"]) == (
            1, 502, len(resp.body))
        assert "aborted" not in answered

    run(main)


def test_malformed_response_line_is_redacted() -> None:
    async def origin(stream: MemStream) -> None:
        o = H1(stream, h11.SERVER)
        await o.message()
        stream.write(b"HTTP/1.1 200 OK\r\nSet-Cookie sid=s3cret\r\nContent-Length: 0\r\n\r\n")
        await stream.read_all()

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        H1(client, h11.CLIENT).send(*get("http://example.test/"))
        raw, _ = await client.read_all()
        await serving
        assert parse_response(raw).status == 502
        [err] = rig.of("error")
        assert err["stage"] == "upstream"
        assert err["message"].startswith("malformed response from example.test:80: ")
        assert "s3cret" not in err["message"]

    run(main)


async def client_gone_mid_upload(framing: str) -> tuple[Rig, Message, str]:
    """A client sends part of a request body, then closes: the rig, what the origin got
    (head and body) and how its read ended."""
    arrived = asyncio.Event()

    async def origin(stream: MemStream) -> tuple[Message, str]:
        o = H1(stream, h11.SERVER)
        msg = Message(await o.next_event())
        try:
            while type(ev := await o.next_event()) is h11.Data:
                msg.body += ev.data
                arrived.set()
            outcome = f"ended: {ev!r}"
        except h11.RemoteProtocolError:  # EOF before the body's framing was complete
            outcome = "cut"
        return msg, outcome

    # A response timeout far above TIME_LIMIT: waiting for it would fail the test.
    rig = Rig(origin, response_timeout=30.0)
    client, serving = rig.start()
    c = H1(client, h11.CLIENT)
    length = ("Content-Length", "100") if framing == "content-length" else (
        "Transfer-Encoding", "chunked")
    c.send(h11.Request(method="POST", target="http://example.test/up", headers=[
        ("Host", "example.test"), length]), h11.Data(data=b"x" * 10))
    await arrived.wait()
    client.close()
    assert await serving is None
    [(msg, outcome)] = await rig.origins()
    return rig, msg, outcome


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_client_gone_mid_upload(framing: str) -> None:
    async def main() -> None:
        rig, msg, outcome = await client_gone_mid_upload(framing)
        assert (msg.head.target, msg.body, outcome) == (b"/up", b"x" * 10, "cut")
        # the client's own doing: no error, the exchange cut by the client
        assert rig.kinds() == ["server_connect", "decision", "request", "server_disconnect",
                               "response"]
        resp = rig.events[-1]
        assert (resp["flow"], resp["status"], resp["aborted"]) == (1, 0, "client")
        assert resp["request_bytes"] == 10

    run(main)


def test_client_gone_mid_upload_is_not_called_malformed() -> None:
    async def main() -> None:
        rig, _, _ = await client_gone_mid_upload("content-length")
        assert not rig.of("error")  # a departure, not a malformed body
        assert rig.events[-1]["aborted"] == "client"

    run(main)


def test_origin_answers_before_request_body_ends() -> None:
    async def origin(stream: MemStream) -> bytes:
        o = H1(stream, h11.SERVER)
        await o.next_event()  # the head
        ev = await o.next_event()
        assert type(ev) is h11.Data
        o.send(*response(413, b"too big"))
        rest, _ = await stream.read_all()  # whatever else comes, until the proxy hangs up
        return ev.data + rest

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(h11.Request(method="POST", target="http://example.test/up", headers=[
            ("Host", "example.test"), ("Content-Length", "100")]), h11.Data(data=b"x" * 10))
        raw, reset = await client.read_all()  # ends only if the proxy closes the client
        await serving

        assert not reset
        resp = parse_response(raw)
        assert (resp.status, resp.body) == (413, b"too big")
        [got] = await rig.origins()
        assert got == b"x" * 10
        assert rig.kinds() == ONE_EXCHANGE
        [ev] = rig.of("response")
        assert (ev["status"], ev["request_bytes"], ev["response_bytes"]) == (413, 10, 7)

    run(main)


def test_upgrade_then_raw_bytes_both_ways() -> None:
    async def origin(stream: MemStream) -> tuple[Message, bytes, bytes]:
        o = H1(stream, h11.SERVER)
        req = await o.message()
        assert req is not None
        o.send(h11.InformationalResponse(status_code=101, reason="Switching Protocols",
                                         headers=[("Upgrade", "websocket"),
                                                  ("Connection", "Upgrade")]))
        up = bytes(o.h.trailing_data[0])
        while len(up) < 4:
            up += await stream.read()
        stream.write(b"pong")
        rest, reset = await stream.read_all()  # until the client's half-close comes through
        assert not reset
        stream.write_eof()
        return req, up, rest

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://example.test/ws", ("Connection", "Upgrade"),
                    ("Upgrade", "websocket")))
        resp = await c.message()
        assert resp is not None and resp.status == 101
        assert resp.headers["upgrade"] == "websocket"
        client.write(b"ping")
        down = bytes(c.h.trailing_data[0])
        while len(down) < 4:
            down += await client.read()
        client.write_eof()
        rest, reset = await client.read_all()
        assert await serving is None

        assert (down, rest, reset) == (b"pong", b"", False)
        [(req, up, up_rest)] = await rig.origins()
        assert req.headers["upgrade"] == "websocket"
        assert req.headers["connection"].lower() == "upgrade"
        assert (up, up_rest) == (b"ping", b"")
        assert rig.kinds() == ONE_EXCHANGE
        [ev] = rig.of("response")
        assert (ev["status"], ev["reason"], ev["response_bytes"]) == (
            101, "Switching Protocols", 0)
        rig.check_disconnect(rig.events[-1])

    run(main)


def test_upgraded_connection_reset_by_client_is_teardown() -> None:
    """A browser closing its page resets its WebSocket: an orderly end (SPEC §7), recorded
    on the disconnect events, not an `error`; the origin's side is closed, not reset."""
    async def origin(stream: MemStream) -> tuple[bytes, bool]:
        o = H1(stream, h11.SERVER)
        await o.message()
        o.send(h11.InformationalResponse(status_code=101, headers=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade")]))
        return await stream.read_all()

    async def main() -> None:
        rig = Rig(origin)
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://example.test/ws", ("Connection", "Upgrade"),
                    ("Upgrade", "websocket")))
        resp = await c.message()
        assert resp is not None and resp.status == 101
        client.abort()
        await serving

        [(_, reset)] = await rig.origins()
        assert not reset  # closed in order towards the origin
        assert rig.kinds() == ONE_EXCHANGE

    run(main)


@pytest.mark.parametrize("framing", ["content-length", "transfer-encoding"])
def test_connection_header_never_strips_framing(framing: str) -> None:
    """`Connection: content-length` names a hop-by-hop field, but the body's framing must
    survive: dropping it would make the body vanish (or be smuggled as a next request)."""

    def echo(req: Message) -> list:
        return response(200, req.body)

    async def main() -> None:
        rig = Rig(h1_origin(echo))
        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        length = ("Content-Length", "11") if framing == "content-length" else (
            "Transfer-Encoding", "chunked")
        c.send(h11.Request(method="POST", target="http://example.test/post", headers=[
            ("Host", "example.test"), length, ("Connection", framing)]),
            h11.Data(data=b"hello"), h11.Data(data=b" world"), h11.EndOfMessage())
        resp = await c.message()
        client.close()
        await serving

        assert resp is not None and (resp.status, resp.body) == (200, b"hello world")
        [[req]] = await rig.origins()
        assert req.body == b"hello world"
        assert req.headers[length[0].lower()] == length[1]
        assert "connection" not in req.headers
        [ev] = rig.of("response")
        assert (ev["request_bytes"], ev["response_bytes"]) == (11, 11)

    run(main)


def test_content_length_with_transfer_encoding_is_refused() -> None:
    async def main() -> None:
        rig = Rig(h1_origin(hello))
        client, serving = rig.start()
        client.write(b"POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        raw, reset = await client.read_all()
        assert await serving is None

        assert not reset
        resp = parse_response(raw)
        assert resp.status == 400
        assert resp.body == b"request has both Content-Length and Transfer-Encoding\n"
        assert rig.connector.connects == []  # refused before any upstream
        # a request that can be named is in the record, with the answer it got
        assert rig.kinds() == ["request", "error", "response"]
        req, err, answered = rig.events
        assert (err["stage"], err["message"]) == (
            "http", "request has both Content-Length and Transfer-Encoding")
        assert err["flow"] == req["flow"] == answered["flow"] == 1
        assert (req["method"], req["url"]) == ("POST", "http://example.test/")
        assert (answered["status"], answered["response_bytes"]) == (400, len(resp.body))

    run(main)


def test_proxy_authentication() -> None:
    good = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"alice:guess").decode()

    async def main() -> None:
        rig = Rig(h1_origin(hello), proxyauth="alice:s3cret")
        for creds in ((), (("Proxy-Authorization", wrong),)):
            client, serving = rig.start()
            H1(client, h11.CLIENT).send(*get("http://example.test/", *creds))
            raw, reset = await client.read_all()
            assert await serving is None
            resp = parse_response(raw)
            assert resp.status == 407 and not reset
            assert resp.headers["proxy-authenticate"] == 'Basic realm="dumpproxy"'
        assert rig.connector.connects == []
        assert rig.kinds() == ["request", "error", "response"] * 2
        assert [(e["stage"], e["message"]) for e in rig.of("error")] == [
            ("auth", "proxy authentication required: no credentials sent"),
            ("auth", "proxy authentication failed for user 'alice'")]
        assert [e["status"] for e in rig.of("response")] == [407, 407]
        assert [e["flow"] for e in rig.of("error")] == [1, 2]

        client, serving = rig.start()
        c = H1(client, h11.CLIENT)
        c.send(*get("http://example.test/", ("Proxy-Authorization", good)))
        resp = await c.message()
        client.close()
        await serving
        assert resp is not None and resp.status == 200
        [[req]] = await rig.origins()
        assert "proxy-authorization" not in req.headers  # the credentials stop here
        ev = rig.of("request")[-1]
        assert ev["conn"] == 3
        assert ev["headers"]["proxy-authorization"] == "Basic <redacted>"

    run(main)


def test_connect_is_handed_back() -> None:
    async def main() -> None:
        rig = Rig(h1_origin(hello))
        ctx, client = rig.connect()
        serving = asyncio.ensure_future(serve_http1(ctx, ctx.stream, None))
        # The client's first tunnel bytes may come with the head: they must stay readable.
        client.write(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"
                     b"\x16\x03\x01")
        connect = await serving

        assert isinstance(connect, Connect)
        assert (connect.request.method, connect.request.target) == (
            b"CONNECT", b"example.test:443")
        assert connect.h.trailing == b"\x16\x03\x01"
        assert rig.connector.connects == [] and rig.events == []  # the tunnel's business
        assert not client.at_eof  # the connection stays open for the tunnel

    run(main)


def test_tunnel_target_reconnects_after_close() -> None:
    """A fixed Target (an intercepted tunnel): origin-form requests, no decisions, and a new
    upstream connection when the origin closed the last one."""

    def closing(req: Message) -> list:
        return response(200, req.head.target, ("Connection", "close"))

    async def main() -> None:
        rig = Rig(h1_origin(closing))
        ctx, client = rig.connect()
        up = await ctx.open_upstream("example.test", 80)
        target = Target("http", "example.test", 80, up)
        serving = asyncio.ensure_future(rig.serve(ctx, target))
        c = H1(client, h11.CLIENT)
        bodies = []
        for path in ("/a", "/b"):
            c.send(*get(path))
            resp = await c.message()
            assert resp is not None
            assert "connection" not in resp.headers  # hop-by-hop: the client keeps its own
            bodies.append(resp.body)
            c.h.start_next_cycle()
        client.close()
        await serving

        assert bodies == [b"/a", b"/b"]
        assert rig.connector.connects == ["example.test:80", "example.test:80"]
        assert [[m.head.target for m in seen] for seen in await rig.origins()] == [
            [b"/a"], [b"/b"]]
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"] * 2
        assert [e["url"] for e in rig.of("response")] == [
            "http://example.test/a", "http://example.test/b"]
        for i, ev in enumerate(rig.of("server_disconnect")):
            rig.check_disconnect(ev, i)

    run(main)


# --- HTTP/2 ------------------------------------------------------------------------------


def test_h2_get_and_post_on_one_connection() -> None:
    async def origin(stream: MemStream) -> dict[int, H2Msg]:
        o = H2Peer(stream, client_side=False)
        await o.until(lambda: len([m for m in o.streams.values() if m.ended]) == 2)
        for sid in sorted(o.streams):
            m = o.streams[sid]
            body = b"hello" if m.pseudo(b":path") == b"/get" else str(len(m.body)).encode()
            o.conn.send_headers(sid, [(b":status", b"200"),
                                      (b"content-length", str(len(body)).encode())])
            o.conn.send_data(sid, body, end_stream=True)
        o.flush()
        await o.until(lambda: o.eof)
        return o.streams

    async def main() -> None:
        rig = Rig(origin)
        client, serving = await h2_start(rig)
        c = H2Peer(client, client_side=True)
        c.conn.send_headers(1, h2_request("GET", "/get"), end_stream=True)
        c.conn.send_headers(3, h2_request("POST", "/post", (b"content-length", b"3000")))
        c.conn.send_data(3, b"p" * 1000)
        c.conn.send_data(3, b"q" * 2000, end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1, 3))
        c.close()
        await serving

        assert dict(c.streams[1].headers)[b":status"] == b"200"
        assert (c.streams[1].body, c.streams[3].body) == (b"hello", b"3000")
        [seen] = await rig.origins()
        assert sorted(seen) == [1, 3]
        assert [(m.pseudo(b":method"), m.pseudo(b":path")) for _, m in sorted(seen.items())] \
            == [(b"GET", b"/get"), (b"POST", b"/post")]
        assert seen[3].body == b"p" * 1000 + b"q" * 2000

        assert rig.kinds() == ["server_connect", "request", "request", "response", "response",
                               "server_disconnect"]
        r1, r3 = rig.of("response")
        assert [e["flow"] for e in rig.of("request")] == [r1["flow"], r3["flow"]] == [1, 2]
        assert (r1["method"], r1["url"], r1["http_version"], r1["status"]) == (
            "GET", "https://example.test/get", "HTTP/2.0", 200)
        assert (r1["request_bytes"], r1["response_bytes"]) == (0, 5)
        assert (r3["method"], r3["url"]) == ("POST", "https://example.test/post")
        assert (r3["request_bytes"], r3["response_bytes"]) == (3000, 4)
        rig.check_disconnect(rig.events[-1])

    run(main)


def test_h2_client_resets_a_stream() -> None:
    got_request, got_reset = asyncio.Event(), asyncio.Event()

    async def origin(stream: MemStream) -> dict[int, H2Msg]:
        o = H2Peer(stream, client_side=False)
        await o.until(lambda: 1 in o.streams)
        got_request.set()
        await o.until(lambda: o.streams[1].reset is not None)
        got_reset.set()
        await o.until(lambda: o.eof)
        return o.streams

    async def main() -> None:
        rig = Rig(origin)
        client, serving = await h2_start(rig)
        c = H2Peer(client, client_side=True)
        c.conn.send_headers(1, h2_request("GET", "/slow"), end_stream=True)
        c.flush()
        await got_request.wait()
        c.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        await got_reset.wait()  # closing at once would race the reset through the bridge
        c.close()
        await serving

        [seen] = await rig.origins()
        assert seen[1].reset == h2.errors.ErrorCodes.CANCEL
        assert not seen[1].body
        # a client's cancel is orderly: no error, the exchange cut by the client
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        resp = rig.of("response")[0]
        assert (resp["flow"], resp["status"], resp["aborted"]) == (1, 0, "client")

    run(main)


def test_h2_response_trailers() -> None:
    async def origin(stream: MemStream) -> dict[int, H2Msg]:
        o = H2Peer(stream, client_side=False)
        await o.until(lambda: o.ended(1))
        o.conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
        o.conn.send_data(1, b"body")
        o.conn.send_headers(1, [(b"x-checksum", b"abc"), (b"x-count", b"3")], end_stream=True)
        o.flush()
        await o.until(lambda: o.eof)
        return o.streams

    async def main() -> None:
        rig = Rig(origin)
        client, serving = await h2_start(rig)
        c = H2Peer(client, client_side=True)
        c.conn.send_headers(1, h2_request("GET", "/trailers", (b"te", b"trailers")),
                            end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        resp = c.streams[1]
        assert resp.body == b"body"
        assert resp.trailers == [(b"x-checksum", b"abc"), (b"x-count", b"3")]
        [seen] = await rig.origins()
        assert (b"te", b"trailers") in seen[1].headers  # the one TE HTTP/2 allows
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        [ev] = rig.of("response")
        assert (ev["status"], ev["request_bytes"], ev["response_bytes"]) == (200, 0, 4)
        assert ev["headers"] == {"content-type": "text/plain"}

    run(main)
