"""The proxy: the listener, one context per accepted client, pattern reloads, shutdown.

Serving a client only goes down from here: the regular mode's handler runs the HTTP/1
server, and a CONNECT it hands back goes to the tunnel module.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from dumpproxy import __version__
from dumpproxy.addresses import join_host_port
from dumpproxy.certs import CertStore
from dumpproxy.config import Config
from dumpproxy.context import Context, Services
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import HostFilter, PatternError
from dumpproxy.http1_server import serve_http1
from dumpproxy.schema import SCHEMA_VERSION, ClientDisconnect, Error, Listening, Shutdown
from dumpproxy.streams import SocketStream
from dumpproxy.tunnel import serve_connect
from dumpproxy.upstream import Connector

SHUTDOWN_GRACE = 2.0


async def serve_regular(ctx: Context) -> None:
    """Regular mode: an explicit HTTP proxy; CONNECT requests become tunnels."""
    connect = await serve_http1(ctx, ctx.stream, None)
    if connect is not None:
        await serve_connect(ctx, ctx.stream, connect)


class _Accepted(SocketStream):
    """A client socket: starts its handler when the connection is made."""

    def __init__(self, proxy: Proxy):
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.proxy.accept(self)


class Proxy:
    def __init__(self, cfg: Config, writer: EventWriter, hfilter: HostFilter,
                 certs: CertStore):
        self.cfg = cfg
        self.services = Services(cfg, writer, hfilter, certs, Connector(cfg))
        self.started = time.monotonic()
        self.tasks: set[asyncio.Task] = set()
        self._ids = 0
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    def reload_filter(self) -> None:
        """SIGHUP: re-read pattern files; a bad file keeps the old set."""
        services = self.services
        try:
            services.filter = self.cfg.sources.load()
        except PatternError as e:
            services.emit("error", Error(stage="reload",
                                         message=f"{e}; keeping previous patterns"))
            return
        if self.cfg.verbosity > 0:
            print(
                f"dumpproxy: reloaded patterns ({len(services.filter.allow)} allow, "
                f"{len(services.filter.ignore)} ignore)",
                file=sys.stderr,
            )

    # -- connections --
    def accept(self, stream: SocketStream) -> None:
        self._ids += 1
        self.services.stats.connections += 1
        ctx = Context(self.services, stream, self._ids)
        task = asyncio.get_running_loop().create_task(self._serve(ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, ctx: Context) -> None:
        ctx.emit("client_connect")
        cancelled = False
        try:
            await serve_regular(ctx)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as e:  # a bug must cost one connection, never the proxy
            ctx.error("internal", f"{type(e).__name__}: {e}")
        try:
            await ctx.finish(shutdown=cancelled)
        except asyncio.CancelledError:  # shutdown while lingering
            ctx.close()
        finally:
            ctx.emit("client_disconnect", ClientDisconnect(
                duration_ms=round((time.monotonic() - ctx.started) * 1000, 3),
                how=ctx.stream.ended or "proxy_closed"))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Accepted(self), self.cfg.listen_host, self.cfg.listen_port,
            reuse_address=True, backlog=1024,
        )
        sock = self.server.sockets[0].getsockname()
        self.address = join_host_port(sock[0], sock[1])
        self.services.emit("listening", Listening(
            address=self.address, mode=self.cfg.mode, version=__version__, pid=os.getpid(),
            ca_cert=self.services.certs.ca.cert_path, schema=SCHEMA_VERSION))
        self.services.events.flush()

    async def stop(self, reason: str, grace: float = 0.0) -> None:
        """Stop accepting, let in-flight work end (up to grace), cancel the rest."""
        if self.server is not None:
            self.server.close()
        if grace and self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=SHUTDOWN_GRACE)
        services = self.services
        stats = services.stats
        services.emit("shutdown", Shutdown(
            reason=reason, connections=stats.connections, requests=stats.requests,
            passthrough=stats.passthrough, errors=stats.errors,
            uptime_s=round(time.monotonic() - self.started, 3)))
        services.events.flush()
        services.certs.close()
