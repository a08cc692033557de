"""TLS terminated towards a client: the one handshake every way in uses (intercepted tunnels,
reverse mode, TLS to the proxy itself), with what its failures mean.

A client that drops the connection mid-handshake, or closes it right after without a
request, is either rejecting the dumpproxy CA or a browser dropping a spare connection;
the run's `ClientTrust` tells them apart from sibling connections to the same name, so
only a rejection is an `error` (stage `client_tls`).
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import Awaitable, Callable

from dumpproxy.addresses import BadHost, check_host
from dumpproxy.context import Context
from dumpproxy.streams import Stream, StreamTimeout, TLSStream
from dumpproxy.trust import SILENT_REJECT_WINDOW
from dumpproxy.upstream import OUT_OF_DESCRIPTORS

HTTP1_ALPN = "http/1.1"
H2_ALPN = "h2"
SUPPORTED_ALPN = (H2_ALPN, HTTP1_ALPN)
# The ALPN ids to offer, or how to find them out first (the tunnel asks the origin).
Offer = tuple[str, ...] | Callable[[], Awaitable[tuple[str, ...]]]


def client_dropped(e: BaseException) -> bool:
    """The client ended the connection mid-handshake without an alert (EOF or reset)."""
    if isinstance(e, (ssl.SSLEOFError, ConnectionError)):
        return True
    return isinstance(e, ssl.SSLError) and e.reason == "UNEXPECTED_EOF_WHILE_READING"


# The client's alerts that reject our certificate (OpenSSL's reason names).
_DISTRUST = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR",
             "ACCESS_DENIED", "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED")
# Handshakes that failed before any certificate could matter: what each means.
_NO_COMMON_GROUND = {
    "NO_SHARED_CIPHER": "the client offers no cipher suite dumpproxy accepts (TLS 1.2: "
                        "ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3: any)",
    "NO_SUITABLE_KEY_SHARE": "the client offers no key exchange group dumpproxy accepts",
    "NO_SHARED_GROUP": "the client offers no key exchange group dumpproxy accepts",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions dumpproxy does not speak "
                            "(TLS 1.2 and 1.3)",
    "VERSION_TOO_LOW": "the client offers only TLS versions dumpproxy does not speak "
                       "(TLS 1.2 and 1.3)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the client offers only TLS versions dumpproxy does not "
                                    "speak (TLS 1.2 and 1.3)",
    "WRONG_VERSION_NUMBER": "the client's bytes are not a TLS handshake dumpproxy can read",
    "HTTP_REQUEST": "the client sent plain HTTP where a TLS handshake was expected",
    "HTTPS_PROXY_REQUEST": "the client sent a plain HTTP CONNECT where a TLS handshake was "
                           "expected",
    "UNSUPPORTED_ELLIPTIC_CURVE": "the client supports no elliptic curve of dumpproxy's "
                                  "certificate (P-256)",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "the client accepts no signature algorithm of "
                                      "dumpproxy's certificate (ECDSA P-256 with SHA-256)",
}


def client_tls_message(e: BaseException | None, ca_path: str, silent: bool = False) -> str:
    """What a failed handshake with a client means, by its cause: a rejection of the
    certificate (what to do about it), no common ground (what was missing), a client that
    went silent or away (what it may mean)."""
    hint = (
        f"trust the dumpproxy CA ({ca_path}; `dumpproxy --print-ca` prints it): "
        "curl --cacert FILE, SSL_CERT_FILE / REQUESTS_CA_BUNDLE for Python, "
        "NODE_EXTRA_CA_CERTS for Node, or add it to the system store"
    )
    if silent:
        return ("the client closed the connection right after the TLS handshake without a "
                "request; if it rejected the certificate (GnuTLS clients such as wget and git "
                f"do that without an alert: wget --ca-certificate FILE, GIT_SSL_CAINFO), {hint}")
    if isinstance(e, StreamTimeout):
        return "the client did not complete the TLS handshake in time"
    what = getattr(e, "reason", None) or str(e) or type(e).__name__
    upper = what.upper()
    if isinstance(e, ssl.SSLError) and any(k in upper for k in _DISTRUST):
        return f"the client does not trust the dumpproxy CA ({what}); {hint}"
    for key, meaning in _NO_COMMON_GROUND.items():
        if key in upper:
            return f"TLS handshake with the client failed: {meaning} ({what})"
    if e is not None and client_dropped(e):
        return ("the client closed the connection during the TLS handshake without an alert; "
                f"if it rejected the certificate (Node.js does that), {hint}")
    if "ALERT" in upper:
        return (f"the client ended the TLS handshake with an alert ({what}); if it rejected "
                f"the certificate, {hint}")
    return f"TLS handshake with the client failed ({what})"


def usable_sni(ctx: Context, sni: str | None, address: str) -> bool:
    """False (and an error event) when the client's SNI cannot name a host: no leaf
    certificate or upstream TLS can be made for it."""
    if sni:
        try:
            check_host(sni)
        except BadHost as e:
            ctx.error("client_tls", f"the client's TLS server name (SNI): {e}", address=address)
            return False
    return True


def _leaf_context(ctx: Context, name: str, alpn: tuple[str, ...], address: str):
    """The dumpproxy CA's leaf for name, or None (and an error event) without one."""
    try:
        return ctx.services.certs.server_context(name, alpn)
    except OSError as e:  # loading the leaf needs a descriptor, like everything else
        why = OUT_OF_DESCRIPTORS if e.errno in (errno.EMFILE, errno.ENFILE) else e
        ctx.error("client_tls", f"no certificate for {name}: {why}", address=address)
        return None


class ClientTLS:
    """TLS with one client under a leaf for `name`: the handshake, then its end.

    address and sni are what the `tls` and `error` events name; prefix tells whose TLS
    it is in error messages (the proxy's own: "secure web proxy: ")."""

    def __init__(self, ctx: Context, client: Stream, name: str, address: str,
                 sni: str | None, prefix: str = ""):
        self.ctx = ctx
        self.client = client
        self.name = name
        self.address = address
        self.sni = sni
        self.prefix = prefix
        self.tls: TLSStream | None = None
        self._serving_since: float | None = None
        self._ended: str | None = None  # how the connection under the TLS ended
        self._failure: BaseException | None = None  # the handshake's

    def _error(self, message: str) -> None:
        self.ctx.error("client_tls", self.prefix + message, address=self.address)

    async def handshake(self, offer: Offer) -> TLSStream | None:
        """The handshake, offering these ALPN ids (or those `offer` settles first). None
        when there is no TLS to speak: then `failed()` says why."""
        ctx = self.ctx
        alpn = offer if isinstance(offer, tuple) else await offer()
        server_ctx = _leaf_context(ctx, self.name, alpn, self.address)
        if server_ctx is None:
            return None
        try:
            tls = await TLSStream.handshake(self.client, server_ctx, server_side=True,
                                            timeout=ctx.cfg.peek_timeout)
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            self._failure = e
            return None
        ctx.emit("tls", tls.event("client", self.address, self.sni))
        self.tls = tls
        return tls

    async def failed(self) -> None:
        """After a failed handshake: an `error`, unless the client dropped the connection
        while a sibling showed trust in the CA (a spare; client_disconnect says how it
        ended). Nothing when the failure was told already (no certificate)."""
        failure, trust = self._failure, self.ctx.services.trust
        if failure is None:
            return
        if not client_dropped(failure) or not await trust.settle(
                lambda: trust.handshaken(self.name)):
            self._error(client_tls_message(failure, self.ctx.services.certs.ca.cert_path))

    def serving(self) -> None:
        """Requests will be served on this TLS: it shows trust to its siblings."""
        assert self.tls is not None
        self.ctx.services.trust.handshake_done(self.name, self.tls)
        self._serving_since = time.monotonic()

    def finish(self) -> None:
        """The connection is over: close_notify (unless the client reset it)."""
        tls = self.tls
        if tls is None:
            return
        self._ended = tls.ended
        if self._ended != "peer_reset":
            tls.write_eof()  # close_notify, then FIN: an orderly close
        if self._serving_since is not None:
            self.ctx.services.trust.closed(self.name, tls)

    async def judge_silence(self) -> None:
        """After `finish`: a client that closed right after the handshake without a
        request may have rejected the CA (GnuTLS clients say nothing): an `error`, unless
        a sibling connection carried requests (then it was a spare)."""
        tls, trust = self.tls, self.ctx.services.trust
        if (tls is not None and self._serving_since is not None and tls.bytes_in == 0
                and self._ended in ("peer_closed", "peer_reset")
                and time.monotonic() - self._serving_since < SILENT_REJECT_WINDOW
                and not await trust.settle(lambda: trust.proven(self.name))):
            self._error(client_tls_message(None, self.ctx.services.certs.ca.cert_path,
                                           silent=True))
