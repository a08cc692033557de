"""Proxy authentication (pure): checking the credentials a client presents.

HTTP Basic in `Proxy-Authorization` (`refusal`) and SOCKS5's user/pass (RFC 1929,
`check_user_pass`) are checked against the same `--proxyauth USER:PASS`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from urllib.parse import quote

from dumpproxy import headers as hdr

# What a 407 answer carries so that clients know to send Basic credentials.
CHALLENGE = ((b"proxy-authenticate", b'Basic realm="dumpproxy"'),)


class ProxyAuth:
    """The one USER:PASS that `--proxyauth` requires."""

    def __init__(self, user_pass: str):
        self._user_pass = user_pass.encode()
        self._basic = base64.b64encode(self._user_pass)

    def refusal(self, items: list[tuple[bytes, bytes]]) -> str | None:
        """None when the request's Proxy-Authorization carries the right Basic token, else
        why not, for the `error` event: it names the user (as SOCKS5 does), never the
        password, nor a header it cannot read (that may be a token)."""
        value = hdr.header_value(items, b"proxy-authorization")
        if value is None:
            return "proxy authentication required: no credentials sent"
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return "proxy authentication failed: credentials are not HTTP Basic"
        try:  # normalise the encoding (padding, whitespace) before comparing
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        user, colon, _ = decoded.partition(b":")
        if not colon:
            return "proxy authentication failed: malformed Basic credentials"
        if hmac.compare_digest(base64.b64encode(decoded), self._basic):
            return None
        return f"proxy authentication failed for user {user.decode('latin-1')[:100]!r}"

    def check_user_pass(self, user: bytes, password: bytes) -> bool:
        return hmac.compare_digest(user + b":" + password, self._user_pass)


def url_userinfo(user_pass: str) -> str:
    """`USER:PASS@` for a proxy URL (wrap mode's HTTP_PROXY), each part percent-encoded so
    that a `@`, `:` or `/` in it survives every client's URL parser."""
    user, _, password = user_pass.partition(":")
    return f"{quote(user, safe='')}:{quote(password, safe='')}@"
