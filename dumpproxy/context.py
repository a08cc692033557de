"""What a connection's handlers are given: the shared services and a per-connection context.

Modelled on mitmproxy's `proxy/context.py`: a few documented attributes, handed down to
every layer that serves the connection, so that no lower module reaches up to the proxy.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from dumpproxy.addresses import join_host_port
from dumpproxy.auth import ProxyAuth
from dumpproxy.certs import CertStore
from dumpproxy.config import Config
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import DECISION_BUDGET, Egress, HostFilter, candidates
from dumpproxy.hostfilter import Decision as HostDecision
from dumpproxy.pool import Pool, pool_key
from dumpproxy.schema import Decision, Error, Stage
from dumpproxy.streams import SocketStream
from dumpproxy.textformat import error_line
from dumpproxy.trust import ClientTrust
from dumpproxy.upstream import Connector, TLSRequest, Upstream


@dataclass
class Stats:
    """The `shutdown` event's counters."""

    connections: int = 0
    requests: int = 0
    passthrough: int = 0
    errors: int = 0
    blocked: int = 0  # egress: decisions `block`
    would_block: int = 0  # egress audit: decisions that would have blocked


class Services:
    """Run-time services shared by every connection of a run."""

    def __init__(self, cfg: Config, events: EventWriter, hfilter: HostFilter,
                 certs: CertStore, connector: Connector):
        self.cfg = cfg  #: the configuration from the command line
        self.events = events  #: the event writer
        self.filter = hfilter  #: the host filter; replaced when SIGHUP reloads patterns
        self.certs = certs  #: the CA and the leaf certificates minted from it
        self.connector = connector  #: how upstream connections are made (the mode's part)
        self.auth = ProxyAuth(cfg.proxyauth) if cfg.proxyauth else None  #: --proxyauth
        self.trust = ClientTrust()  #: what clients showed about trusting the CA, per name
        self.stats = Stats()
        self.stopping = False  #: the proxy is shutting down: no new exchange on a connection
        #: idle upstream connections, for any client connection
        self.pool = Pool(idle=cfg.pool_idle_timeout)
        #: egress: each blocked destination's [count, first time, why] (wrap mode's summary)
        self.blocked: dict[str, list] = {}
        self._flows = 0
        self._servers = 0

    def emit(self, event: str, fields: dict | None = None, conn: Context | None = None):
        """Write one event; `error` is also counted and told on stderr (unless -q)."""
        ev = self.events.emit(event, fields, conn)
        if event == "error":
            self.stats.errors += 1
            if self.cfg.verbosity >= 0:
                sys.stderr.write(error_line(ev))
        return ev

    def next_flow(self) -> int:
        """A new exchange number, unique in this run."""
        self._flows += 1
        return self._flows

    def next_server(self) -> int:
        """A new upstream connection number, unique in this run."""
        self._servers += 1
        return self._servers


class Context:
    """One client connection: its id and address, its events, decisions and upstreams.

    It owns every upstream connection opened for the client: the code that uses one
    releases it (`Upstream.release`), and only the context closes it."""

    def __init__(self, services: Services, stream: SocketStream, cid: int,
                 connector: Connector | None = None):
        self.services = services  #: the shared services
        #: how this connection's upstreams are made: its listener's mode (default: direct)
        self.connector = connector or services.connector
        self.cfg = services.cfg  #: shorthand for services.cfg
        self.stream = stream  #: the client's socket
        self.id = cid  #: `conn` in events
        peer = stream.peername or ("?", 0)
        self.client = join_host_port(peer[0], peer[1])  #: `client` in events
        self.started = time.monotonic()
        # Asked once per connection: on Python 3.11 get_running_loop() (and so
        # ensure_future) makes a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.upstreams: set[Upstream] = set()  #: open upstream connections, closed with it
        self._decided: dict[tuple, tuple[HostDecision, dict]] = {}  # see decide()
        # While set, whoever serves the connection says whether it may be closed now, in a
        # shutdown (nothing in flight: a keep-alive connection waiting for its next request).
        # Called again until it says yes; the HTTP/2 bridge sends its GOAWAY on the first.
        self.quiesce: Callable[[], bool] | None = None

    def emit(self, event: str, fields: dict | None = None) -> dict:
        return self.services.emit(event, fields, self)

    def error(self, stage: Stage, message: str, flow: int | None = None,
              address: str | None = None) -> None:
        fields = Error(stage=stage, message=message)
        if flow is not None:
            fields["flow"] = flow
        if address is not None:
            fields["address"] = address
        self.emit("error", fields)

    def egress(self, host: str, port: int) -> Egress | None:
        """The egress verdict on a destination named by the client, judged on the name
        alone before any connection or DNS lookup (None: no egress lists)."""
        f = self.services.filter
        return f.egress(candidates(host, port)) if f.egress_on else None

    def decide(self, host: str, port: int, cands: list[str], sni: str | None,
               egress: Egress | None = None, flow: int | None = None) -> HostDecision:
        """Decide block, intercept or passthrough for these candidates (after the egress
        verdict already judged, if any); write `decision` (with the flow of a plain-HTTP
        request it blocks)."""
        services = self.services
        f = services.filter
        # A keep-alive client asks again for each request: its last answers are kept, for
        # the filter they came from (a SIGHUP reload makes a new one). Never a timeout, nor
        # a decision with an egress verdict (its fields are extended per request).
        key = (f, host, port, tuple(cands), sni) if egress is None else None
        known = self._decided.get(key) if key is not None else None
        if known is not None:  # the same fields again (the writer copies them)
            d, fields = known
            address = fields["address"]
        else:
            address = join_host_port(host, port)
            d = f.decide(cands, egress)
            fields = Decision(address=address, **d.fields(),  # type: ignore[typeddict-item]
                              sni=sni)
            if key is not None and d.egress is None and d.reason != "timeout":
                if len(self._decided) >= 16:
                    self._decided.clear()
                self._decided[key] = (d, fields)
        if d.passthrough:
            services.stats.passthrough += 1
        if d.egress is not None:
            if flow is not None:
                fields["flow"] = flow
            fields.update(d.extra_fields())  # type: ignore[typeddict-item]
            self._count_egress(address, d)
        self.emit("decision", fields)
        slow = d.egress if d.egress is not None and d.egress.reason == "timeout" else d
        if slow.reason == "timeout":
            outcome = ("passed through untouched" if slow is d else "blocked" if
                       d.action == "block" else "it would have been blocked")
            self.error("decision", f"pattern {slow.pattern!r} ({slow.source}) took more than "
                       f"{DECISION_BUDGET * 1000:g} ms to match; {outcome}: "
                       "rewrite the pattern without nested or adjacent repeats",
                       address=address)
        return d

    def _count_egress(self, address: str, d: HostDecision) -> None:
        stats, e = self.services.stats, d.egress
        assert e is not None
        if d.action == "block":
            stats.blocked += 1
            seen = self.services.blocked.get(address)
            if seen is None:
                self.services.blocked[address] = [1, time.time(), e.why(address)]
            else:
                seen[0] += 1
        elif e.blocked:
            stats.would_block += 1

    async def open_upstream(self, host: str, port: int, tls: TLSRequest | None = None,
                            forward: bool = False, reuse: bool = True) -> Upstream:
        """A connection to host:port (TLS on top when asked), owned by this one: an idle
        one from the pool when there is one (reuse: the caller will speak HTTP on it),
        else a new one.

        forward: it carries the explicit proxy's plain HTTP (an upstream proxy then takes
        the requests in absolute form instead of a CONNECT)."""
        services = self.services
        up = services.pool.take(pool_key(self.connector, host, port, tls, forward)) \
            if reuse else None
        if up is not None:
            up.adopt(self.emit, self._released)
        else:
            up = await self.connector.open(self.emit, services.next_server(), host, port,
                                           self._released, tls, forward)
        self.upstreams.add(up)
        return up

    def pooled_address(self, host: str, port: int) -> str | None:
        """The resolved address of an idle connection to host:port in the pool."""
        return self.services.pool.address_of(self.connector, host, port)

    def _released(self, up: Upstream, reusable: bool) -> None:
        """An upstream handed back by its user: into the pool when it can serve another
        exchange, else closed."""
        self.upstreams.discard(up)
        if up.closed:
            return
        if reusable and self.services.pool.put(up, pool_key(
                up.connector, up.host, up.port, up.tls_request, up.forward)):
            return
        up.close()

    def _close_upstreams(self, shutdown: bool = False) -> None:
        for up in list(self.upstreams):
            if shutdown:
                up.sock.mark("shutdown")
            self.upstreams.discard(up)
            up.close()

    def close(self) -> None:
        self._close_upstreams()
        self.stream.close()

    async def finish(self, shutdown: bool = False) -> None:
        """The connection is over: close its upstreams, then the client socket without a
        reset (FIN, wait briefly for the client's own FIN)."""
        if shutdown:
            self.stream.mark("shutdown")
        self._close_upstreams(shutdown)
        if shutdown:
            self.stream.close()
        else:
            await self.stream.linger_close()
