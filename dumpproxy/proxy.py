"""The proxy: the listeners, one context per accepted client, pattern reloads, shutdown.

One listener per `--mode`, each with its `modes.Mode` (how the destination is learned,
how upstream connections are made); all share the services (CA, host filter, output).
Serving a client only goes down from here.
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import sys
import time

from dumpproxy import __version__
from dumpproxy.addresses import join_host_port
from dumpproxy.certs import CertStore
from dumpproxy.config import Config
from dumpproxy.context import Context, Services
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import HostFilter, PatternError
from dumpproxy.modes import Mode, make_mode
from dumpproxy.schema import SCHEMA_VERSION, ClientDisconnect, Error, Listening, Shutdown
from dumpproxy.streams import SocketStream
from dumpproxy.upstream import OUT_OF_DESCRIPTORS, Connector

SHUTDOWN_GRACE = 2.0
FD_RESERVE = 16  # descriptors kept free: to answer a client, load a leaf, write events


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0  # no /proc: rely on the upstream connect's EMFILE answer


class ListenError(OSError):
    """A listener could not bind; `where` names its mode and address."""

    def __init__(self, where: str, e: OSError):
        super().__init__(e.errno, e.strerror)
        self.where = where


class _Accepted(SocketStream):
    """A client socket: starts its listener's handler when the connection is made."""

    __slots__ = ("proxy", "mode")

    def __init__(self, proxy: Proxy, mode: Mode):
        super().__init__()
        self.proxy = proxy
        self.mode = mode

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.proxy.accept(self, self.mode)


class Proxy:
    def __init__(self, cfg: Config, writer: EventWriter, hfilter: HostFilter,
                 certs: CertStore):
        self.cfg = cfg
        self.services = Services(cfg, writer, hfilter, certs, Connector(cfg))
        self.started = time.monotonic()
        self.tasks: dict[asyncio.Task, Context] = {}  # each client's task, and its context
        self._hurry = asyncio.Event()  # a second signal: stop now
        self._ids = 0
        self.modes = [make_mode(spec, cfg) for spec in cfg.modes]
        self.servers: list[asyncio.AbstractServer] = []
        self.address = ""  #: the first listener's address (wrap mode, the stderr line)
        self.stopping = False
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_base = _open_descriptors()  # what the process holds before any client

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
                f"{len(services.filter.ignore)} ignore, {len(services.filter.egress_allow)} "
                f"egress allow, {len(services.filter.egress_deny)} egress deny)",
                file=sys.stderr,
            )

    # -- connections --
    def accept(self, stream: SocketStream, mode: Mode) -> None:
        """A new client: counted and recorded at once, served by its listener's mode in its
        own task; whatever becomes of the task (even cancelled before it ran), the client
        is closed and `client_disconnect` written, so the counters always match the events."""
        if self.stopping:  # accepted after the listeners closed: never served, not counted
            stream.abort()
            return
        self._ids += 1
        self.services.stats.connections += 1
        ctx = Context(self.services, stream, self._ids, mode.connector)
        ctx.emit("client_connect")
        if self._short_of_descriptors():
            self._refuse(ctx, mode)
            return
        task = asyncio.get_running_loop().create_task(self._serve(ctx, mode))
        self.tasks[task] = ctx
        task.add_done_callback(functools.partial(self._served, ctx))

    def _short_of_descriptors(self) -> bool:
        """Fewer than FD_RESERVE descriptors left (each client costs about two, with its
        upstream). Counted for real only when the estimate comes near the limit."""
        if self.fd_base + 2 * len(self.tasks) + FD_RESERVE < self.fd_limit:
            return False
        return _open_descriptors() + FD_RESERVE >= self.fd_limit

    def _refuse(self, ctx: Context, mode: Mode) -> None:
        """Out of descriptors: say so to the client (while we still can) and in an event,
        instead of leaving the event loop to drop connections without a word."""
        ctx.error("server_connect", OUT_OF_DESCRIPTORS)
        if mode.spec.kind in ("regular", "upstream"):
            body = OUT_OF_DESCRIPTORS.encode() + b"\n"
            try:
                ctx.stream.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; "
                                 b"charset=utf-8\r\ncontent-length: %d\r\nconnection: close"
                                 b"\r\n\r\n%s" % (len(body), body))
            except ConnectionError:
                pass
        ctx.stream.mark("proxy_closed")
        ctx.close()
        ctx.emit("client_disconnect", ClientDisconnect(duration_ms=0.0, how="proxy_closed"))

    async def _serve(self, ctx: Context, mode: Mode) -> None:
        cancelled = False
        try:
            await mode.serve(ctx)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as e:  # a bug must cost one connection, never the proxy
            ctx.error("internal", f"{type(e).__name__}: {e}")
        try:
            await ctx.finish(shutdown=cancelled)  # upstreams closed, the client without a reset
        except asyncio.CancelledError:  # shutdown while lingering
            ctx.stream.mark("shutdown")

    def _served(self, ctx: Context, task: asyncio.Task) -> None:
        self.tasks.pop(task, None)
        if task.cancelled():  # cancelled before it ran
            ctx.stream.mark("shutdown")
        ctx.close()
        ctx.emit("client_disconnect", ClientDisconnect(
            duration_ms=round((time.monotonic() - ctx.started) * 1000, 3),
            how=ctx.stream.ended or "proxy_closed"))

    async def start(self) -> None:
        """Bind every listener (all or none), then write one `listening` per listener."""
        loop = asyncio.get_running_loop()
        for mode in self.modes:
            spec = mode.spec
            host = spec.listen_host or self.cfg.listen_host
            port = spec.listen_port if spec.listen_port is not None else self.cfg.listen_port
            if mode.sock is not None:  # listening already (--isolate)
                host = port = None
            try:
                server = await loop.create_server(
                    lambda mode=mode: _Accepted(self, mode), host, port,
                    reuse_address=True, backlog=1024, sock=mode.sock,
                )
            except OSError as e:
                for s in self.servers:
                    s.close()
                self.servers.clear()
                where = join_host_port(host, port)
                if len(self.modes) > 1:
                    where += f" (--mode {spec.shown()})"
                raise ListenError(where, e) from None
            self.servers.append(server)
            mode.sockname = server.sockets[0].getsockname()
            mode.address = join_host_port(mode.sockname[0], mode.sockname[1])
        self.address = self.modes[0].address
        for mode in self.modes:
            self.services.emit("listening", Listening(
                address=mode.address, mode=mode.spec.shown(self.cfg.redact),
                version=__version__, pid=os.getpid(),
                ca_cert=self.services.certs.ca.cert_path, schema=SCHEMA_VERSION))
        self.services.events.flush()

    def hurry(self) -> None:
        """A second signal during the grace period: cut what is still in flight now."""
        self._hurry.set()

    async def stop(self, reason: str, grace: float = 0.0) -> None:
        """Stop accepting; close idle connections at once, let exchanges in flight finish
        (up to grace, or until `hurry`), then cut the rest (their responses say
        `aborted: shutdown`) and write `shutdown`."""
        self.stopping = self.services.stopping = True
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + grace
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            while self.tasks and not self._hurry.is_set():
                for task, ctx in list(self.tasks.items()):
                    if ctx.quiesce is not None and ctx.quiesce():
                        task.cancel()  # nothing in flight on it
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait({*self.tasks, hurry}, timeout=min(left, 0.05),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self.tasks and (left := deadline - time.monotonic()) > 0:
            # Again each round: on Python 3.11 asyncio.wait_for can swallow a cancel that
            # arrives as its inner future completes, and the task would run on.
            for t in list(self.tasks):
                t.cancel()
            await asyncio.wait(set(self.tasks), timeout=min(left, 0.05))
        services = self.services
        services.pool.close_all("shutdown")
        stats = services.stats
        fields = Shutdown(
            reason=reason, connections=stats.connections, requests=stats.requests,
            passthrough=stats.passthrough, errors=stats.errors,
            uptime_s=round(time.monotonic() - self.started, 3))
        if services.filter.egress_on:
            fields["blocked"] = stats.blocked
            fields["would_block"] = stats.would_block
        services.emit("shutdown", fields)
        services.events.close()  # `shutdown` is the last line
        services.certs.close()
