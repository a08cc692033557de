"""Proxy authentication (pure): checking the credentials a client presents.

HTTP Basic in `Proxy-Authorization` (`check_basic`) and SOCKS5's user/pass (RFC 1929,
`check_user_pass`) are checked against the same `--proxyauth USER:PASS`.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from dumpproxy import headers as hdr

# What a 407 answer carries so that clients know to send Basic credentials.
CHALLENGE = ((b"proxy-authenticate", b'Basic realm="dumpproxy"'),)


class ProxyAuth:
    """The one USER:PASS that `--proxyauth` requires."""

    def __init__(self, user_pass: str):
        self._user_pass = user_pass.encode()
        self._basic = base64.b64encode(self._user_pass)

    def check_basic(self, items: list[tuple[bytes, bytes]]) -> bool:
        """True when the request's Proxy-Authorization carries the right Basic token."""
        value = hdr.header_value(items, b"proxy-authorization")
        if value is None:
            return False
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:  # normalise the encoding (padding, whitespace) before comparing
            token = base64.b64encode(base64.b64decode(token.strip(), validate=True))
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(token, self._basic)

    def check_user_pass(self, user: bytes, password: bytes) -> bool:
        return hmac.compare_digest(user + b":" + password, self._user_pass)
