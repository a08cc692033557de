"""The HTTP/2 bridge in-process, over in-memory streams: GOAWAY on either side, resets,
flow control, trailers, informational responses, the stream limits and broken frames.

The client and the origin are h2 connections driven by the test (`inprocess.H2Peer`),
each with a log of the frames it received; the bridge between them is the real
`H2Bridge` with real services (`inprocess.Rig`). Tests whose origin must be replaced after
a GOAWAY speak TLS with it (the bridge reconnects only to an origin that negotiates h2).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import h2.errors
import h2.settings
import hyperframe.frame
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import H2Peer, Rig, h2_client, h2_origin, h2_request, ok, run, settle

from dumpproxy.h2conn import CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW
from dumpproxy.http2 import RESET_ALLOWANCE

E = h2.errors.ErrorCodes
S = h2.settings.SettingCodes
ADDRESS = "example.test:443"
URL = "https://example.test"


def goaway(last_stream_id: int, error: int = 0) -> bytes:
    """A GOAWAY frame, written past h2 (which would stop its own connection with it)."""
    frame = hyperframe.frame.GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = error
    return frame.serialize()


def tls_rig(pki, serve: Callable[[H2Peer], Awaitable[object]], **peer) -> Rig:
    """A rig whose origins speak TLS (ALPN h2) with a certificate the proxy trusts."""
    context = pki.server_context(["example.test"], ["h2"])
    return Rig(h2_origin(serve, context, **peer), upstream_ca=str(pki.ca_path))


def error(ev: dict) -> tuple:
    return ev["stage"], ev["message"], ev.get("flow"), ev.get("address")


# --- GOAWAY from the origin --------------------------------------------------------------


def test_h2_origin_goaway_replays_unprocessed_streams(pki) -> None:
    """GOAWAY(last-stream-id 1) with streams 1, 3 and 5 open: 1 finishes on the old
    connection; 3 (a GET) and 5 (a POST whose body had not started) go to a fresh one."""
    replayed, first_answered = asyncio.Event(), asyncio.Event()
    conns: list[H2Peer] = []

    async def serve(o: H2Peer) -> None:
        conns.append(o)
        if len(conns) == 1:
            await o.until(lambda: {1, 3, 5} <= o.streams.keys())
            o.raw(goaway(1))
            await replayed.wait()  # the fresh connection is up: stream 1 still ends here
            o.answer(1, b"one")
        else:
            await o.until(lambda: {1, 3} <= o.streams.keys())
            replayed.set()
            await o.until(lambda: o.ended(1, 3))
            await first_answered.wait()
            for sid in (1, 3):
                m = o.streams[sid]
                o.answer(sid, m.pseudo(b":path") + b" " + m.body)

    async def main() -> None:
        rig = tls_rig(pki, serve)
        c, serving = await h2_client(rig, tls=True)
        c.get(1, "/one")
        c.get(3, "/two")
        c.conn.send_headers(5, h2_request("POST", "/post", (b"content-length", b"6")))
        c.flush()
        await replayed.wait()  # the bridge took the GOAWAY: the body goes to the new one
        c.conn.send_data(5, b"abcdef", end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1))
        first_answered.set()
        await c.until(lambda: c.ended(3, 5))
        c.close()
        await serving

        assert [(c.streams[s].pseudo(b":status"), c.streams[s].body) for s in (1, 3, 5)] == [
            (b"200", b"one"), (b"200", b"/two "), (b"200", b"/post abcdef")]
        first, second = await rig.origins()
        assert sorted(first.streams) == [1, 3, 5]
        assert [f.kind for f in first.log.on(5)] == ["HEADERS"]  # no body went there
        assert [(m.pseudo(b":method"), m.pseudo(b":path"), m.body, m.ended)
                for _, m in sorted(second.streams.items())] == [
            (b"GET", b"/two", b"", True), (b"POST", b"/post", b"abcdef", True)]
        assert rig.connector.connects == [ADDRESS, ADDRESS]

        assert rig.kinds() == [
            "server_connect", "tls", "request", "request", "request",
            "server_connect", "tls", "response", "server_disconnect",
            "response", "response", "server_disconnect"]
        assert [e["flow"] for e in rig.of("request")] == [1, 2, 3]
        assert [(e["flow"], e["url"], e["status"], e["request_bytes"], e["response_bytes"])
                for e in rig.of("response")] == [
            (1, f"{URL}/one", 200, 0, 3), (2, f"{URL}/two", 200, 0, 5),
            (3, f"{URL}/post", 200, 6, 12)]
        assert [(e["side"], e["alpn"]) for e in rig.of("tls")] == [("server", "h2")] * 2
        gone, last = rig.of("server_disconnect")
        assert (gone["how"], last["how"]) == ("peer_closed", "proxy_closed")
        rig.check_disconnect(gone, 0)
        rig.check_disconnect(last, 1)

    run(main)


def test_h2_origin_goaway_refuses_stream_whose_body_went_up(pki) -> None:
    """A stream above the GOAWAY's last-stream-id whose body was partly sent upstream
    cannot be replayed: the client gets REFUSED_STREAM for it; a new stream afterwards goes
    to a fresh connection."""
    conns: list[H2Peer] = []

    async def serve(o: H2Peer) -> None:
        conns.append(o)
        if len(conns) == 1:
            await o.until(lambda: 1 in o.streams and o.msg(3).body == b"abc")
            o.raw(goaway(1))
            o.answer(1, b"one")
        else:
            await o.until(lambda: o.ended(1))
            o.answer(1, b"fresh")

    async def main() -> None:
        rig = tls_rig(pki, serve)
        c, serving = await h2_client(rig, tls=True)
        c.get(1, "/one")
        c.conn.send_headers(3, h2_request("POST", "/upload", (b"content-length", b"6")))
        c.conn.send_data(3, b"abc")
        c.flush()
        await c.until(lambda: c.done(1) and c.done(3))
        assert (c.streams[1].body, c.streams[1].reset) == (b"one", None)
        assert c.streams[3].reset == E.REFUSED_STREAM and not c.streams[3].headers
        c.get(5, "/after")
        c.flush()
        await c.until(lambda: c.ended(5))
        c.close()
        await serving

        assert c.streams[5].body == b"fresh"
        first, second = await rig.origins()
        assert first.streams[3].body == b"abc" and not first.streams[3].ended
        assert [m.pseudo(b":path") for m in second.streams.values()] == [b"/after"]
        assert rig.kinds() == [
            "server_connect", "tls", "request", "request", "response", "response",
            "server_disconnect", "request", "server_connect", "tls", "response",
            "server_disconnect"]
        assert [(e["flow"], e["url"]) for e in rig.of("request")] == [
            (1, f"{URL}/one"), (2, f"{URL}/upload"), (3, f"{URL}/after")]
        # the refused stream is in the record, cut by the server side; the origin declined
        # it gracefully and the client may retry: no error
        assert not rig.of("error")
        assert [(e["flow"], e["status"], e.get("aborted")) for e in rig.of("response")] == [
            (2, 0, "server"), (1, 200, None), (3, 200, None)]

    run(main)


def test_h2_replayed_get_still_ends_with_its_headers(pki) -> None:
    """A GET sent with END_STREAM on its HEADERS, moved by a GOAWAY(0): the fresh
    connection gets HEADERS with END_STREAM too (else the origin waits for a body)."""
    conns: list[H2Peer] = []

    async def serve(o: H2Peer) -> None:
        conns.append(o)
        await o.until(lambda: 1 in o.streams)
        if len(conns) == 1:
            o.raw(goaway(0))
        else:
            o.answer(1, b"replayed")  # at once: a missing END_STREAM fails, no hang

    async def main() -> None:
        rig = tls_rig(pki, serve)
        c, serving = await h2_client(rig, tls=True)
        c.get(1, "/get")
        c.flush()
        await c.until(lambda: c.done(1))
        c.close()
        await serving

        assert (c.streams[1].body, c.streams[1].reset) == (b"replayed", None)
        first, second = await rig.origins()
        assert [(f.kind, "END_STREAM" in f.flags) for f in first.log.on(1)] == [
            ("HEADERS", True)]
        assert [(f.kind, "END_STREAM" in f.flags) for f in second.log.on(1)] == [
            ("HEADERS", True)]
        assert second.streams[1].ended and second.streams[1].pseudo(b":path") == b"/get"
        assert rig.kinds() == [
            "server_connect", "tls", "request", "server_disconnect",
            "server_connect", "tls", "response", "server_disconnect"]
        [resp] = rig.of("response")
        assert (resp["flow"], resp["status"], resp["response_bytes"]) == (1, 200, 8)

    run(main)


# --- GOAWAY and resets from the client, resets from the origin ----------------------------


def test_h2_client_goaway_lets_open_streams_finish() -> None:
    """The client's GOAWAY(NO_ERROR) with two streams open (one still uploading): both
    finish, then the bridge ends by itself (GOAWAY to the client, connections closed)."""

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1, 3))
        o.answer(1, b"one")
        o.answer(3, b"got " + o.streams[3].body)

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.get(1, "/one")
        c.conn.send_headers(3, h2_request("POST", "/up", (b"content-length", b"4")))
        c.raw(goaway(0))
        c.conn.send_data(3, b"data", end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1, 3))
        await c.until_eof()  # the bridge closes the connection: the client does not
        await serving

        assert (c.streams[1].body, c.streams[3].body) == (b"one", b"got data")
        assert c.goaway is not None and c.goaway.error_code == E.NO_ERROR
        assert rig.bridges[0].ctx.stream.closed and rig.connector.ends[0].peer.closed
        [o] = await rig.origins()
        assert o.streams[3].body == b"data"
        assert rig.kinds() == ["server_connect", "request", "request", "response", "response",
                               "server_disconnect"]
        assert [e["flow"] for e in rig.of("response")] == [1, 2]
        [gone] = rig.of("server_disconnect")
        assert gone["how"] == "proxy_closed"
        rig.check_disconnect(gone)

    run(main)


def test_h2_origin_resets_one_stream() -> None:
    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1, 3))
        o.conn.send_headers(1, ok(b"still here"))
        o.conn.reset_stream(3, E.INTERNAL_ERROR)
        o.conn.send_data(1, b"still here", end_stream=True)
        o.flush()

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.get(1, "/one")
        c.get(3, "/three")
        c.flush()
        await c.until(lambda: c.done(1) and c.done(3))
        c.close()
        await serving

        assert (c.streams[1].body, c.streams[1].ended, c.streams[1].reset) == (
            b"still here", True, None)
        assert (c.streams[3].reset, c.streams[3].headers, c.streams[3].body) == (
            E.INTERNAL_ERROR, [], b"")
        assert rig.kinds() == ["server_connect", "request", "request", "error", "response",
                               "response", "server_disconnect"]
        [err] = rig.of("error")
        assert error(err) == ("http2", "server reset the stream (INTERNAL_ERROR)", 2, ADDRESS)
        cut, resp = rig.of("response")
        assert (cut["flow"], cut["status"], cut["aborted"]) == (2, 0, "server")
        assert (resp["flow"], resp["status"], resp["response_bytes"]) == (1, 200, 10)

    run(main)


def test_h2_client_reset_mid_upload_stops_the_upload() -> None:
    """The origin's window holds most of the upload in the bridge; the client resets: the
    origin's stream is reset and nothing of what waited follows, even once its window
    opens; the connection carries on."""
    got_part, got_reset = asyncio.Event(), asyncio.Event()
    window = 1000

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: len(o.msg(1).body) == window)
        got_part.set()
        await o.until(lambda: o.streams[1].reset is not None)
        got_reset.set()
        o.ack()  # the connection window opens again: the dropped bytes must stay dropped
        await o.until(lambda: o.ended(3))
        o.answer(3, b"next")

    async def main() -> None:
        rig = Rig(h2_origin(serve, auto_ack=False, settings={S.INITIAL_WINDOW_SIZE: window}))
        c, serving = await h2_client(rig)
        c.conn.send_headers(1, h2_request("POST", "/big", (b"content-length", b"5000")))
        c.conn.send_data(1, b"u" * 5000)
        c.flush()
        await got_part.wait()
        await settle()  # the rest of the upload waits in the bridge
        c.conn.reset_stream(1, E.CANCEL)
        c.flush()
        await got_reset.wait()
        c.get(3, "/next")
        c.flush()
        await c.until(lambda: c.ended(3))
        c.close()
        await serving

        assert c.streams[3].body == b"next"
        [o] = await rig.origins()
        assert o.streams[1].body == b"u" * window
        frames = [(f.kind, f.length) for f in o.log.on(1)]
        assert frames[0][0] == "HEADERS" and frames[-1][0] == "RST_STREAM"
        assert {k for k, _ in frames[1:-1]} == {"DATA"}
        assert sum(n for _, n in frames[1:-1]) == window
        assert o.streams[1].reset == E.CANCEL
        # the client's cancel is orderly: no error, its exchange cut by the client
        assert rig.kinds() == ["server_connect", "request", "response", "request", "response",
                               "server_disconnect"]
        cut, resp = rig.of("response")
        assert (cut["flow"], cut["status"], cut["aborted"]) == (1, 0, "client")
        assert cut["request_bytes"] == window
        assert (resp["flow"], resp["url"]) == (2, f"{URL}/next")

    run(main)


@pytest.mark.parametrize("cause", [
    "client_reset",
    "origin_goaway",
])
def test_h2_dropped_upload_gives_the_connection_window_back(pki, cause: str) -> None:
    """Upload bytes the bridge held for a stream that then ended (the client reset it, or
    the origin's GOAWAY refused it) are acknowledged to the client all the same: else
    its connection window shrinks for good, and enough such streams stall the connection.

    Seen from the client: after the dropped upload and a second one that brings the
    bytes the bridge processed to half its connection window, h2 sends the client a
    WINDOW_UPDATE for all of them: its window is whole again only if none was lost."""
    sent = 100_000  # the origin's window takes 65535 of them, the bridge holds the rest
    rest = CONNECTION_WINDOW // 2 - sent
    conns: list[H2Peer] = []
    got_part = asyncio.Event()

    async def serve(o: H2Peer) -> None:
        conns.append(o)
        sid = 1  # where the second upload arrives: a fresh connection after the GOAWAY
        if len(conns) == 1:
            await o.until(lambda: len(o.msg(1).body) == 65535)  # and reads no more
            got_part.set()
            if cause == "origin_goaway":
                o.raw(goaway(0))
                return
            await o.until(lambda: o.streams[1].reset is not None)
            sid = 3
        o.ack()
        await o.until(lambda: o.ended(sid))
        o.answer(sid, str(len(o.streams[sid].body)).encode())

    async def main() -> None:
        rig = tls_rig(pki, serve, auto_ack=False)
        c, serving = await h2_client(rig, tls=True)
        await c.until(lambda: c.conn.outbound_flow_control_window == CONNECTION_WINDOW)
        c.conn.send_headers(1, h2_request("POST", "/dropped"))
        await c.send(1, b"d" * sent)
        await got_part.wait()
        if cause == "client_reset":
            c.conn.reset_stream(1, E.CANCEL)
            c.flush()
        else:
            await c.until(lambda: c.done(1))
            assert c.streams[1].reset == E.REFUSED_STREAM
        await c.until(lambda: c.conn.outbound_flow_control_window == CONNECTION_WINDOW - sent)
        c.conn.send_headers(3, h2_request("POST", "/rest"))
        await c.send(3, b"r" * rest, end_stream=True)
        await c.until(lambda: c.ended(3))
        assert c.streams[3].body == str(rest).encode()
        assert c.conn.outbound_flow_control_window == CONNECTION_WINDOW
        c.close()
        await serving

    run(main)


# --- flow control, trailers, informational responses -------------------------------------


def test_h2_flow_control_stalls_then_resumes() -> None:
    """The client grants a 16 KiB stream window and acknowledges nothing: the bridge
    forwards 16 KiB, reads from the origin no more than its own stream window (the origin
    stalls), and holds at most that; once the client acknowledges, all arrives."""
    body = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32) + b"tail"
    client_window = 16384
    origins: list[H2Peer] = []

    async def serve(o: H2Peer) -> None:
        origins.append(o)
        await o.until(lambda: o.ended(1))
        o.conn.send_headers(1, ok(body))
        await o.send(1, body, end_stream=True)  # as its windows allow

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig, auto_ack=False,
                                     settings={S.INITIAL_WINDOW_SIZE: client_window})
        c.get(1, "/big")
        c.flush()
        await c.until(lambda: c.received == client_window)
        await settle(2000)
        [o] = origins
        stalled = o.sent
        await settle(2000)
        assert o.sent == stalled  # stalled, not slow
        assert c.received == client_window
        # The bridge read (and acknowledged) no more than it forwarded plus its own window.
        assert STREAM_WINDOW <= stalled <= STREAM_WINDOW + client_window
        pair = rig.bridges[0].client.pairs[1]
        buffered = sum(len(item[0]) for item in pair.down.chunks)
        assert buffered == stalled - client_window <= STREAM_WINDOW

        c.ack()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        got = c.streams[1].body
        assert (len(got), hashlib.sha256(got).hexdigest()) == (
            len(body), hashlib.sha256(body).hexdigest())
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        [resp] = rig.of("response")
        assert (resp["status"], resp["response_bytes"]) == (200, len(body))

    run(main)


def test_h2_request_trailers_reach_the_origin() -> None:
    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1))
        o.answer(1, b"done")

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.conn.send_headers(1, h2_request("POST", "/grpc", (b"te", b"trailers"),
                                          (b"content-type", b"application/grpc")))
        c.conn.send_data(1, b"part1")
        c.conn.send_data(1, b"part2")
        c.conn.send_headers(1, [(b"x-checksum", b"123"), (b"x-count", b"2")], end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        assert c.streams[1].body == b"done"
        [o] = await rig.origins()
        m = o.streams[1]
        assert (m.body, m.ended) == (b"part1part2", True)
        assert m.trailers == [(b"x-checksum", b"123"), (b"x-count", b"2")]
        assert (b"te", b"trailers") in m.headers
        assert [f.kind for f in o.log.on(1)] == ["HEADERS", "DATA", "DATA", "HEADERS"]
        assert "END_STREAM" in o.log.on(1)[-1].flags
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        [resp] = rig.of("response")
        assert (resp["request_bytes"], resp["response_bytes"]) == (10, 4)

    run(main)


def test_h2_fields_kept_out_of_hpack_tables_stay_so() -> None:
    """A field the sender marked never-indexed reaches the other side marked so (RFC 7541
    7.1.3), whichever way it goes; credentials are marked whatever the client did, as h2
    itself marks them; other fields stay indexable. (Short cookies are marked too, but an
    h2 receiver marks every cookie it joins, so this origin cannot tell.)"""
    secret = NeverIndexedHeaderTuple(b"x-secret", b"s3cret")

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1))
        o.conn.send_headers(1, ok(b"done", NeverIndexedHeaderTuple(b"set-cookie", b"id=1"),
                                  (b"x-plain", b"1")), end_stream=False)
        o.conn.send_data(1, b"done", end_stream=True)
        o.flush()

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.conn.config.normalize_outbound_headers = False  # h2 would mark credentials itself
        c.conn.send_headers(1, [HeaderTuple(n, v) for n, v in h2_request(
            "GET", "/", (b"authorization", b"Bearer t"), (b"x-plain", b"2"))] + [secret],
            end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        [o] = await rig.origins()
        got = {h[0]: h for h in o.streams[1].headers}
        never = {n for n, h in got.items() if isinstance(h, NeverIndexedHeaderTuple)}
        assert never == {b"authorization", b"x-secret"}
        assert got[b"x-secret"][1] == b"s3cret" and got[b"x-plain"][1] == b"2"
        back = {h[0]: h for h in c.streams[1].headers}
        assert isinstance(back[b"set-cookie"], NeverIndexedHeaderTuple)
        assert not isinstance(back[b"x-plain"], NeverIndexedHeaderTuple)
        assert c.streams[1].body == b"done"

    run(main)


def test_h2_early_hints_come_before_the_response() -> None:
    hints = [(b":status", b"103"), (b"link", b"</app.css>; rel=preload")]

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1))
        o.conn.send_headers(1, hints)
        o.flush()
        await settle()  # forwarded on its own, not held for the final response
        o.answer(1, b"page")

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.get(1, "/page")
        c.flush()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        m = c.streams[1]
        assert m.informational == [hints]
        assert (m.pseudo(b":status"), m.body) == (b"200", b"page")
        kinds = [f.kind for f in c.log.on(1)]  # the 103's HEADERS, the 200's, its DATA
        assert kinds[:2] == ["HEADERS", "HEADERS"] and set(kinds[2:]) == {"DATA"}
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        [resp] = rig.of("response")
        assert (resp["status"], resp["reason"], resp["response_bytes"]) == (200, "OK", 4)

    run(main)


def test_h2_100_continue_before_the_upload() -> None:
    """The client waits for 100 Continue before sending its body: the 100 must come
    through on its own, before any final response."""

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: 1 in o.streams)
        o.conn.send_headers(1, [(b":status", b"100")])
        o.flush()
        await o.until(lambda: o.ended(1))
        o.answer(1, b"stored " + o.streams[1].body)

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.conn.send_headers(1, h2_request("PUT", "/file", (b"expect", b"100-continue"),
                                          (b"content-length", b"4")))
        c.flush()
        await c.until(lambda: bool(c.msg(1).informational))
        assert c.streams[1].informational == [[(b":status", b"100")]]
        assert c.streams[1].headers == []  # no final response yet
        c.conn.send_data(1, b"data", end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1))
        c.close()
        await serving

        assert c.streams[1].body == b"stored data"
        [o] = await rig.origins()
        assert (b"expect", b"100-continue") in o.streams[1].headers
        assert rig.kinds() == ["server_connect", "request", "response", "server_disconnect"]
        [resp] = rig.of("response")
        assert (resp["status"], resp["request_bytes"], resp["response_bytes"]) == (200, 4, 11)

    run(main)


# --- abuse: rapid reset, too many streams, broken frames ---------------------------------


def open_and_reset(c: H2Peer, first: int, count: int) -> list[int]:
    """Open count GET streams from stream id first, each reset at once (CANCEL), in one
    write."""
    sids = list(range(first, first + 2 * count, 2))
    for sid in sids:
        c.get(sid, f"/r{sid}")
        c.conn.reset_stream(sid, E.CANCEL)
    c.flush()
    return sids


async def until_closed(o: H2Peer) -> None:
    """An origin that answers nothing (its streams get reset) until the bridge leaves."""


MANY_STREAMS = {S.MAX_CONCURRENT_STREAMS: 1000}  # an origin that takes all the proxy sends


def test_h2_rapid_reset_gets_enhance_your_calm() -> None:
    async def main() -> None:
        rig = Rig(h2_origin(until_closed, settings=MANY_STREAMS))
        c, serving = await h2_client(rig)
        sids = open_and_reset(c, 1, RESET_ALLOWANCE + 1)
        await c.until(lambda: c.goaway is not None)
        await c.until_eof()
        await serving

        assert c.goaway is not None
        assert (c.goaway.error_code, c.goaway.last_stream_id) == (E.ENHANCE_YOUR_CALM, sids[-1])
        [o] = await rig.origins()
        assert sorted(o.streams) == sids
        assert all(o.streams[s].reset == E.CANCEL for s in sids)
        n = RESET_ALLOWANCE + 1
        # each cancel is orderly (its exchange cut by the client); going over is not
        assert rig.kinds() == ["server_connect", *["request", "response"] * n, "error",
                               "server_disconnect"]
        assert [(e["flow"], e["status"], e["aborted"]) for e in rig.of("response")] == [
            (f, 0, "client") for f in range(1, n + 1)]
        [calm] = rig.of("error")
        assert error(calm) == (
            "http2", f"the client reset {n} streams before their responses (HTTP/2 rapid "
            "reset): connection closed with ENHANCE_YOUR_CALM", None, ADDRESS)

    run(main)


def test_h2_resets_within_the_allowance_are_served() -> None:
    """RESET_ALLOWANCE resets are fine; each response the client gets allows one more;
    the next one over is not."""

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: any(m.pseudo(b":path") == b"/real" and m.ended
                                  for m in o.streams.values()))
        [sid] = [s for s, m in o.streams.items() if m.pseudo(b":path") == b"/real"]
        o.answer(sid, b"real")

    async def main() -> None:
        rig = Rig(h2_origin(serve, settings=MANY_STREAMS))
        c, serving = await h2_client(rig)
        sids = open_and_reset(c, 1, RESET_ALLOWANCE)
        real = sids[-1] + 2
        c.get(real, "/real")
        c.flush()
        await c.until(lambda: c.ended(real))
        open_and_reset(c, real + 2, 1)  # allowed: one response was had
        await settle()
        assert c.goaway is None
        open_and_reset(c, real + 4, 1)  # one over
        await c.until(lambda: c.goaway is not None)
        await serving

        assert c.streams[real].body == b"real"
        assert c.goaway is not None and c.goaway.error_code == E.ENHANCE_YOUR_CALM
        assert rig.kinds().count("request") == RESET_ALLOWANCE + 3
        responses = rig.of("response")
        assert len(responses) == RESET_ALLOWANCE + 3  # every exchange has its response
        assert [e["status"] for e in responses if "aborted" not in e] == [200]
        assert rig.of("error")[-1]["message"] == (
            f"the client reset {RESET_ALLOWANCE + 2} streams before their responses (HTTP/2 "
            "rapid reset): connection closed with ENHANCE_YOUR_CALM")
        assert len(rig.of("error")) == 1  # cancels are no errors; going over is

    run(main)


def test_h2_streams_over_the_limit_are_refused_one_by_one() -> None:
    """MAX_STREAMS + 2 requests in one write: the two over the limit get REFUSED_STREAM on
    their own; the others are all answered."""
    n = MAX_STREAMS + 2

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: len(o.streams) == MAX_STREAMS and o.ended(*o.streams))
        for sid, m in sorted(o.streams.items()):
            o.answer(sid, m.pseudo(b":path") or b"")

    async def main() -> None:
        rig = Rig(h2_origin(serve, settings=MANY_STREAMS))
        c, serving = await h2_client(rig)
        sids = [1 + 2 * i for i in range(n)]
        for i, sid in enumerate(sids):  # before the bridge's SETTINGS: h2 lets us
            c.get(sid, f"/{i}")
        c.flush()
        await c.until(lambda: all(c.done(s) for s in sids))
        c.close()
        await serving

        legal, over = sids[:MAX_STREAMS], sids[MAX_STREAMS:]
        assert [(c.streams[s].reset, c.streams[s].body) for s in legal] == [
            (None, f"/{i}".encode()) for i in range(MAX_STREAMS)]
        assert [(c.streams[s].reset, c.streams[s].headers) for s in over] == [
            (E.REFUSED_STREAM, [])] * 2
        [o] = await rig.origins()
        assert sorted(m.pseudo(b":path") for m in o.streams.values()) == sorted(
            f"/{i}".encode() for i in range(MAX_STREAMS))
        assert rig.kinds() == ["server_connect", *["request"] * MAX_STREAMS,
                               *["response"] * MAX_STREAMS, "server_disconnect"]
        assert sorted(e["flow"] for e in rig.of("response")) == list(range(1, MAX_STREAMS + 1))

    run(main)


def test_h2_origin_concurrency_limit_is_respected_without_refusals() -> None:
    """The origin allows 2 concurrent streams, the proxy 128: a client that stays within
    what the proxy advertised has all its streams answered, and nothing is an error."""
    paths = [b"/1", b"/2", b"/3"]

    async def serve(o: H2Peer) -> None:
        answered: set[int] = set()
        while not o.eof:  # answer each request as it ends, one read at a time
            for sid, m in sorted(o.streams.items()):
                if m.ended and sid not in answered:
                    answered.add(sid)
                    o.answer(sid, m.pseudo(b":path") or b"")
            await o.step()

    async def main() -> None:
        rig = Rig(h2_origin(serve, settings={S.MAX_CONCURRENT_STREAMS: 2}))
        c, serving = await h2_client(rig)
        await settle()  # both sides' SETTINGS are known to the bridge and to the client
        sids = [1, 3, 5]
        for sid, path in zip(sids, paths, strict=True):
            while c.conn.open_outbound_streams >= c.conn.remote_settings.max_concurrent_streams:
                await c.step()  # as many as the proxy allows, no more
            c.get(sid, path.decode())
        c.flush()
        await c.until(lambda: all(c.done(s) for s in sids))
        c.close()
        await serving

        assert [(c.streams[s].reset, c.streams[s].body) for s in sids] == [
            (None, p) for p in paths]
        assert rig.of("error") == []
        assert [e["flow"] for e in rig.of("response")] == [1, 2, 3]

    run(main)


def test_h2_reverse_mode_rewrites_every_authority() -> None:
    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1, 3))
        o.answer(1, b"a")
        o.answer(3, b"b")

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig, authority=b"target.test:8443")
        first = [(n, b"proxy.local:8080" if n == b":authority" else v)
                 for n, v in h2_request("GET", "/a")]
        second = [(n, b"other.test" if n == b":authority" else v)
                  for n, v in h2_request("GET", "/b", (b"host", b"other.test"))]
        c.conn.send_headers(1, first, end_stream=True)
        c.conn.send_headers(3, second, end_stream=True)
        c.flush()
        await c.until(lambda: c.ended(1, 3))
        c.close()
        await serving

        assert (c.streams[1].body, c.streams[3].body) == (b"a", b"b")
        [o] = await rig.origins()
        for sid, path in ((1, b"/a"), (3, b"/b")):
            m = o.streams[sid]
            assert [(n, v) for n, v in m.headers if n.startswith(b":")] == [
                (b":method", b"GET"), (b":scheme", b"https"),
                (b":authority", b"target.test:8443"), (b":path", path)]
            assert b"host" not in dict(m.headers)
        assert [(e["url"], e["headers"]) for e in rig.of("request")] == [
            (f"{URL}/a", {}), (f"{URL}/b", {"host": "other.test"})]

    run(main)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_h2_origin_gone_with_streams_open(how: str) -> None:
    """The origin's connection ends with two streams open (one mid-body): an error, the
    client's connection is ended (GOAWAY, then closed) and every stream with it."""

    async def serve(o: H2Peer) -> None:
        await o.until(lambda: o.ended(1, 3))
        o.conn.send_headers(1, ok(b"0123456789"))
        o.conn.send_data(1, b"012")
        o.flush()
        getattr(o.stream, how)()

    async def main() -> None:
        rig = Rig(h2_origin(serve))
        c, serving = await h2_client(rig)
        c.get(1, "/cut")
        c.get(3, "/never")
        c.flush()
        await c.until_eof()
        await serving

        assert (c.streams[1].pseudo(b":status"), c.streams[1].body) == (b"200", b"012")
        assert not c.ended(1) and 3 not in c.streams
        assert c.goaway is not None
        assert (c.goaway.error_code, c.goaway.last_stream_id) == (E.NO_ERROR, 3)
        bridge = rig.bridges[0]
        assert bridge.ctx.stream.closed and rig.connector.ends[0].peer.closed
        assert not bridge.ctx.upstreams and not bridge.upstreams.servers
        assert rig.kinds() == ["server_connect", "request", "request", "error", "error",
                               "response", "error", "response", "server_disconnect"]
        lost = {"close": "server closed the connection with 2 stream(s) open",
                "abort": "server connection lost: connection reset by peer"}[how]
        assert [error(e) for e in rig.of("error")] == [
            ("http2", lost, None, ADDRESS),
            ("http2", "connection closed before the response ended", 1, ADDRESS),
            ("http2", "connection closed before the response ended", 2, ADDRESS)]
        # both exchanges in the record, cut by the server (the first one mid-body)
        assert [(e["flow"], e["status"], e["aborted"]) for e in rig.of("response")] == [
            (1, 200, "server"), (2, 0, "server")]
        [gone] = rig.of("server_disconnect")
        assert gone["how"] == {"close": "peer_closed", "abort": "peer_reset"}[how]

    run(main)


def test_h2_huge_frame_header_gets_frame_size_error_at_once() -> None:
    """A frame header announcing 16 MiB - 1 from the client: GOAWAY FRAME_SIZE_ERROR
    without waiting for the payload (which never comes)."""

    async def main() -> None:
        rig = Rig(h2_origin(until_closed))
        c, serving = await h2_client(rig)
        c.raw((0xFFFFFF).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big"))
        await c.until(lambda: c.goaway is not None)
        await c.until_eof()
        await serving

        assert c.goaway is not None and c.goaway.error_code == E.FRAME_SIZE_ERROR
        assert rig.kinds() == ["server_connect", "error", "server_disconnect"]
        assert error(rig.events[1]) == (
            "http2", "protocol error from the client: frame of 16777215 bytes, more than "
            "the maximum 16384", None, ADDRESS)
        [o] = await rig.origins()
        assert o.streams == {}

    run(main)


# --- frames on a stream after its reset ---------------------------------------------------


def late_frames(peer: H2Peer, sid: int, head: list, body: bytes) -> None:
    """A head and a body on sid as the peer sent them before it saw the stream's reset:
    past its h2 (which knows of the reset now), HPACK from its own encoder."""
    frame = hyperframe.frame.HeadersFrame(sid)
    frame.data = peer.conn.encoder.encode(head)
    frame.flags.add("END_HEADERS")
    data = hyperframe.frame.DataFrame(sid)
    data.data = body
    data.flags.add("END_STREAM")
    peer.raw(frame.serialize() + data.serialize())


@pytest.mark.parametrize("sender", ["client", "origin"])
def test_h2_late_frames_on_a_reset_stream_are_a_stream_error(sender: str) -> None:
    """RFC 9113 5.1: frames the peer sent before it saw our RST_STREAM get RST_STREAM
    (STREAM_CLOSED) and the connection carries on, even with twice MAX_STREAMS streams
    finished in between: the closed streams h2 remembers are bounded (h2conn's
    MAX_CLOSED_STREAMS), never below what that needs. The client's frames: trailers of an
    upload the origin reset; the origin's: the response to a request the client cancelled."""
    between = 2 * MAX_STREAMS

    async def serve(o: H2Peer) -> None:
        answered: set[int] = set()
        while not o.eof:
            for sid, m in sorted(o.streams.items()):
                path = m.pseudo(b":path")
                if sid in answered or path is None or (path == b"/slow" and not m.reset):
                    continue
                answered.add(sid)
                if path == b"/upload":
                    o.conn.reset_stream(sid, E.CANCEL)
                    o.flush()
                elif path == b"/slow":  # reset by the bridge: it answers when told
                    slow.append(sid)
                elif path == b"/late":
                    if slow:
                        late_frames(o, slow[0], ok(b"late"), b"late")
                    o.answer(sid, b"after")
                elif m.ended:
                    o.answer(sid, b"ok")
            await o.step()

    slow: list[int] = []

    async def main() -> None:
        rig = Rig(h2_origin(serve, settings=MANY_STREAMS))
        c, serving = await h2_client(rig)
        if sender == "client":
            c.conn.send_headers(1, h2_request("POST", "/upload"))
            c.flush()
            await c.until(lambda: c.done(1))
            assert c.streams[1].reset == E.CANCEL
        else:
            c.get(1, "/slow")
            c.flush()
            await settle()
            c.conn.reset_stream(1, E.CANCEL)
            c.flush()
            await settle()
        sids = [3 + 2 * i for i in range(between)]
        for start in range(0, between, MAX_STREAMS // 2):
            batch = sids[start:start + MAX_STREAMS // 2]
            for sid in batch:
                c.get(sid, "/")
            c.flush()
            await c.until(lambda batch=batch: c.ended(*batch))
        if sender == "client":
            late_frames(c, 1, [(b"x-checksum", b"1")], b"late upload")
        last = sids[-1] + 2
        c.get(last, "/late")
        c.flush()
        await c.until(lambda: c.ended(last))
        c.close()
        await serving

        assert c.goaway is None
        assert [c.streams[s].body for s in sids] == [b"ok"] * between
        assert c.streams[last].body == b"after"
        [o] = await rig.origins()
        assert o.goaway is None
        late_to = c if sender == "client" else o  # who sent the late frames
        late_sid = 1 if sender == "client" else slow[0]
        assert [f.kind for f in late_to.log.on(late_sid)][-1] == "RST_STREAM"
        assert not [e for e in rig.of("error") if "protocol error" in e["message"]]
        assert len(rig.of("response")) == between + 2

    run(main)


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=200))
def test_hpack_huffman_decoding_remembered_decodes_as_hpack_does(value: bytes) -> None:
    """The remembered Huffman decoder gives hpack's own result for every string; a short
    one comes from the cache the second time, a long one (or a bytearray) is never kept."""
    import hpack.hpack
    import hpack.huffman_table
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    from dumpproxy import h2conn

    assert hpack.hpack.decode_huffman is h2conn.decode_huffman  # what HPACK calls
    cache = h2conn._decode_huffman_cached
    coded = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(value)
    assert h2conn.decode_huffman(coded) == hpack.huffman_table.decode_huffman(coded) == value
    before = cache.cache_info()
    assert h2conn.decode_huffman(coded) == value
    assert h2conn.decode_huffman(bytearray(coded)) == value
    after = cache.cache_info()
    short = len(coded) <= h2conn.HUFFMAN_CACHED
    assert (after.hits - before.hits, after.misses - before.misses) == ((1, 0) if short
                                                                          else (0, 0))


def test_hpack_huffman_errors_are_not_remembered() -> None:
    """Invalid Huffman input (the EOS code inside a string) fails each time and leaves
    nothing in the cache."""
    import hpack.exceptions

    from dumpproxy import h2conn

    bad = b"\xff\xff\xff\xff"
    size = h2conn._decode_huffman_cached.cache_info().currsize
    for _ in range(2):
        with pytest.raises(hpack.exceptions.HPACKDecodingError):
            h2conn.decode_huffman(bad)
    assert h2conn._decode_huffman_cached.cache_info().currsize == size


def test_never_indexed_marks_what_hpack_must_not_index() -> None:
    """Pure: marks kept per (name, value), credentials and cookies under 20 bytes marked,
    everything else left as plain pairs."""
    from dumpproxy.h2conn import never_indexed

    received = [HeaderTuple(b"cookie", b"a=1"), HeaderTuple(b"cookie", b"b" * 20),
                NeverIndexedHeaderTuple(b"x-s", b"1"), HeaderTuple(b"x-s", b"2"),
                HeaderTuple(b"proxy-authorization", b"Basic eA==")]
    out = never_indexed(received, [(h[0], h[1]) for h in received])
    assert [isinstance(h, NeverIndexedHeaderTuple) for h in out] == [
        True, False, True, False, True]
    assert [tuple(h) for h in out] == [tuple(h) for h in received]
