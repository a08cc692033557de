"""Upstream mode's Connector: every connection goes through another HTTP(S) proxy.

A tunnel (CONNECT from the client, SOCKS5, HTTPS in absolute form) becomes a CONNECT to
the upstream proxy; plain HTTP is sent to it in absolute form on a connection of its own.
TLS with an `https://` upstream proxy is verified like any upstream (system store,
`--upstream-ca`, `-k`). Credentials in the URL become `Proxy-Authorization` to the
upstream proxy; the client's own never go there.
"""

from __future__ import annotations

import base64
import ssl
import time

from dumpproxy import http1_wire as wire
from dumpproxy.addresses import join_host_port
from dumpproxy.config import Config
from dumpproxy.http1_wire import Wire
from dumpproxy.modespec import ModeSpec
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream
from dumpproxy.upstream import Connector, Dialed, UpstreamError, describe_tls_error, tcp_connect

MAX_CONNECT_HEAD = 64 * 1024


class ProxyConnector(Connector):
    def __init__(self, cfg: Config, spec: ModeSpec):
        super().__init__(cfg)
        self.spec = spec
        self.via = spec.url  #: `server_connect.via`: the proxy's URL, no credentials
        self.auth: tuple[tuple[bytes, bytes], ...] = ()
        if spec.user is not None:
            token = base64.b64encode(f"{spec.user}:{spec.password}".encode())
            self.auth = ((b"Proxy-Authorization", b"Basic " + token),)

    def _fail(self, message: str, status: int = 502, kind: str | None = None) -> UpstreamError:
        return UpstreamError("server_connect", f"upstream proxy {self.via}: {message}", status,
                             kind)

    async def dial(self, host: str, port: int, forward: bool = False) -> Dialed:
        spec = self.spec
        try:
            sock = await tcp_connect(spec.host or "", spec.port or 0, self.cfg.connect_timeout)
        except UpstreamError as e:
            raise self._fail(e.message, e.status, e.kind) from None
        stream: Stream = sock
        try:
            if spec.scheme == "https":
                stream = await self._tls(sock)
            if not forward:
                await self._connect(stream, host, port)
        except BaseException:
            sock.close()
            raise
        return Dialed(sock, stream, self.via, absolute_form=forward,
                      proxy_headers=self.auth if forward else ())

    async def _tls(self, sock: SocketStream) -> TLSStream:
        name = self.spec.host or ""
        try:
            return await TLSStream.handshake(
                sock, self.tls_context(("http/1.1",)), server_side=False,
                server_hostname=name, timeout=self.cfg.connect_timeout)
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            raise self._fail(describe_tls_error(e, name)) from None

    async def _connect(self, stream: Stream, host: str, port: int) -> None:
        """CONNECT host:port through the upstream proxy; returns once it answered 2xx."""
        target = join_host_port(host, port).encode()
        h = Wire("client", MAX_CONNECT_HEAD)
        try:
            h.send(stream, wire.Request(method=b"CONNECT", target=target,
                                        headers=[(b"Host", target), *self.auth]))
            await stream.drain()
        except ConnectionError as e:
            raise self._fail(f"connection lost: {e}") from None
        deadline = time.monotonic() + self.cfg.connect_timeout
        while True:
            try:
                ev = await h.read_event(stream, deadline - time.monotonic())
            except wire.RemoteProtocolError as e:
                raise self._fail(f"malformed answer to CONNECT {target.decode()}: {e}") from None
            except StreamTimeout:
                raise self._fail(f"no answer to CONNECT {target.decode()} within "
                                 f"{self.cfg.connect_timeout:g} s", 504, "timeout") from None
            except ConnectionError as e:
                raise self._fail(f"connection lost: {e}") from None
            if type(ev) is wire.InformationalResponse:
                continue
            if type(ev) is wire.Response:
                break
            raise self._fail(f"closed the connection instead of answering CONNECT "
                             f"{target.decode()}")
        status, reason = ev.status_code, ev.reason.decode("latin-1")
        if 200 <= status < 300:
            stream.unread(h.trailing)
            return
        if status in (401, 407):  # tinyproxy answers a CONNECT with bad credentials 401
            hint = ("wrong credentials in the URL" if self.auth else
                    "put them in the URL: upstream:http://USER:PASS@host:port")
            raise self._fail(f"requires authentication ({status} {reason}); {hint}")
        raise self._fail(f"refused CONNECT {target.decode()}: {status} {reason}")
