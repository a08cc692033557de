"""The explicit proxy (regular and upstream modes): absolute-form plain HTTP served request
by request, and CONNECT, whose target becomes the shared path's `Destination`.

CONNECT checks the credentials (`--proxyauth`) and the target first; the upstream
connection is made before the client is answered, so that a failure to reach the
destination is a 502 (or 504) to the CONNECT itself.
"""

from __future__ import annotations

from dumpproxy import auth
from dumpproxy import http1_wire as wire
from dumpproxy.addresses import check_host, split_host_port
from dumpproxy.context import Context
from dumpproxy.http1_server import Connect, serve_http1
from dumpproxy.http1_wire import Wire, answer_error
from dumpproxy.streams import Stream
from dumpproxy.tunnel import Destination
from dumpproxy.upstream import Upstream, UpstreamError


class ConnectAnswer:
    """CONNECT's answer: 200 once the destination is connected, else the failure."""

    def __init__(self, h: Wire, client: Stream):
        self.h = h
        self.client = client

    def connected(self, up: Upstream | None) -> bool:
        try:
            self.h.send(self.client, wire.Response(status_code=200, headers=[],
                                                   reason=b"Connection established"))
        except ConnectionError:
            return False
        self.client.unread(self.h.trailing)  # the tunnel's first bytes, read with the head
        return True

    async def failed(self, err: UpstreamError, dest: Destination) -> bool:
        answer_error(self.h, self.client, err.status, err.message)
        return False  # a CONNECT is no exchange of the record: the error stands alone

    def blocked(self, why: str) -> None:
        answer_error(self.h, self.client, 403, why)


async def serve_explicit(ctx: Context, client: Stream) -> Destination | None:
    """Serve the explicit proxy on this client stream until it closes, or until a CONNECT
    names the destination of a tunnel (returned, for the shared path)."""
    connect = await serve_http1(ctx, client, None)
    if connect is None:
        return None
    return connect_destination(ctx, client, connect)


def connect_destination(ctx: Context, client: Stream, connect: Connect) -> Destination | None:
    """The CONNECT's destination, or None once the client has been refused (wrong
    credentials, a bad target)."""
    h, req = connect.h, connect.request
    services = ctx.services
    denied = services.auth.refusal(list(req.headers.raw_items())) if services.auth else None
    if denied:
        ctx.error("auth", denied)
        answer_error(h, client, 407, "Proxy authentication required", auth.CHALLENGE)
        return None
    try:
        host, port = split_host_port(req.target.decode("latin-1"))
        check_host(host)
    except ValueError as e:
        ctx.error("http", f"bad CONNECT target: {e}")
        answer_error(h, client, 400, f"Bad CONNECT target: {e}")
        return None
    return Destination(host, port, ConnectAnswer(h, client), lazy=True)
