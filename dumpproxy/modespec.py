"""`--mode` values (pure): `MODE[@PORT|@HOST:PORT]`, mitmproxy's vocabulary.

MODE is `regular`, `upstream:URL`, `reverse:URL`, `socks5` or `transparent`. The listen
suffix is split off at the last `@` when the text after it is `PORT` or `HOST:PORT`.
For a URL mode an `@` can also separate the URL's credentials from its host
(`upstream:http://user:pass@proxy:3128`): that `@` is taken for credentials when the
URL before it has no host of its own (`http://user:pass`, a non-numeric "port"), and a
URL ending in `/` always ends before a suffix (`upstream:http://proxy:3128/@127.0.0.1:8081`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from dumpproxy.addresses import DEFAULT_PORTS, join_host_port, strip_brackets

KINDS = ("regular", "upstream", "reverse", "socks5", "transparent")
URL_KINDS = ("upstream", "reverse")
MODES_HELP = "regular, upstream:URL, reverse:URL, socks5, transparent"
_LISTEN = re.compile(r"(\[[^\]]*\]:|[^:\[\]@/]+:)?\d+")


class ModeError(ValueError):
    """A bad --mode value; the message names what is wrong."""


@dataclass(frozen=True)
class ModeSpec:
    kind: str  # one of KINDS
    text: str  # the mode as given, without the listen suffix
    scheme: str | None = None  # URL modes: http / https
    host: str | None = None  # URL modes: the URL's host (brackets removed)
    port: int | None = None  # URL modes: the URL's port (default for the scheme)
    user: str | None = None  # upstream: credentials from the URL's userinfo
    password: str | None = None
    listen_host: str | None = None  # from the suffix; None: --listen-host
    listen_port: int | None = None  # from the suffix; None: -p/--listen-port

    @property
    def address(self) -> str:
        """The URL's host:port (URL modes)."""
        return join_host_port(self.host or "", self.port or 0)

    @property
    def url(self) -> str:
        """The URL without credentials: `http://proxy:3128`."""
        return f"{self.scheme}://{self.address}"

    def shown(self, redact: bool = True) -> str:
        """The mode as events show it: the URL's password replaced unless redact is off."""
        if self.kind not in URL_KINDS or self.user is None or not redact:
            return self.text
        return f"{self.kind}:{self.scheme}://<redacted>@{self.address}"


def _split_suffix(text: str) -> tuple[str, str | None]:
    head, at, tail = text.rpartition("@")
    if not at or not _LISTEN.fullmatch(tail):
        return text, None
    kind, _, rest = head.partition(":")
    if kind in URL_KINDS and "://" in rest and not rest.endswith("/"):
        netloc = rest.split("://", 1)[1].split("/", 1)[0]
        _, colon, maybe_port = netloc.rpartition(":")
        if "@" not in netloc and not (colon and maybe_port.isdigit()) and not tail.isdigit():
            return text, None  # `http://user:pass@host:port`: that @ is the URL's own
    return head, tail


def _listen(tail: str) -> tuple[str | None, int]:
    """`PORT` or `HOST:PORT` (`[v6]:PORT`), already matched by _LISTEN; port 0 allowed."""
    host_part, _, port_text = tail.rpartition(":")
    host = strip_brackets(host_part) if host_part else None
    if host == "":
        raise ModeError(f"bad listen address {tail!r}: empty host")
    port = int(port_text)
    if port > 65535:
        raise ModeError(f"bad listen port in {tail!r} (0-65535)")
    return host, port


def parse_mode(value: str) -> ModeSpec:
    """One --mode value; raises ModeError."""
    head, tail = _split_suffix(value.strip())
    listen_host, listen_port = _listen(tail) if tail is not None else (None, None)
    kind, colon, data = head.partition(":")
    if kind not in KINDS:
        raise ModeError(f"unknown mode {value!r} (choose from {MODES_HELP})")
    if kind not in URL_KINDS:
        if colon:
            raise ModeError(f"mode {kind} takes no argument (got {value!r})")
        return ModeSpec(kind, head, listen_host=listen_host, listen_port=listen_port)
    if not data:
        raise ModeError(f"{kind} needs a URL ({kind}:http://host:port)")
    try:
        parts = urlsplit(data)
        port = parts.port
    except ValueError as e:
        raise ModeError(f"{kind}: bad URL {data!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ModeError(f"{kind}: URL {data!r} must start with http:// or https://")
    if not parts.hostname:
        raise ModeError(f"{kind}: URL {data!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ModeError(f"{kind}: URL {data!r} must not have a path (only scheme://host:port)")
    user = password = None
    if parts.username is not None or parts.password is not None:
        if kind != "upstream":
            raise ModeError(f"{kind}: credentials in the URL are not supported")
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
    return ModeSpec(kind, head, scheme, parts.hostname, port or DEFAULT_PORTS[scheme],
                    user, password, listen_host, listen_port)
