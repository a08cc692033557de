"""The event schema: one typed definition per event, and the JSON Schema made from them.

Each event is a TypedDict of the fields that follow the common ones, in output order;
emitting code builds its fields with these classes (plain dicts at run time, so no cost
on the hot path). `json_schema()` turns the definitions into the JSON Schema (draft
2020-12) that `dumpproxy --schema` prints and the package ships as `event-schema.json`.
The man page describes the same fields; the test suite validates every event it sees.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Literal, TypedDict, Union

import orjson

SCHEMA_VERSION = 1  # the `schema` field of `listening`; bumped on an incompatible change
SCHEMA_ID = "https://dumpproxy.invalid/event-schema/v1.json"

Stage = Literal[
    "auth",  # proxy authentication missing or wrong
    "client_tls",  # TLS handshake with the client failed (e.g. it distrusts the CA)
    "decision",  # a pattern took too long to match: passed through, fix the pattern
    "http",  # a malformed or refused HTTP/1 request
    "http2",  # HTTP/2 protocol or connection trouble
    "internal",  # a bug in dumpproxy (costs one connection)
    "relay",  # a passed-through tunnel or upgraded connection broke
    "reload",  # SIGHUP: a pattern file could not be loaded, or -o FILE not reopened
    "replay",  # a request not in the --replay files (it names the closest recorded ones)
    "server_connect",  # the destination could not be reached
    "server_tls",  # TLS with the destination failed (e.g. untrusted certificate)
    "socks5",  # a malformed or refused SOCKS5 handshake or request
    "transparent",  # transparent mode: no original destination, or a redirect loop
    "upstream",  # the destination misbehaved mid-exchange
]
STAGES: tuple[str, ...] = typing.get_args(Stage)

Ended = Literal[
    "peer_closed",  # the peer closed it (FIN, TLS close_notify, HTTP/2 GOAWAY): orderly
    "peer_reset",  # the peer reset it or it was lost (RST, broken pipe)
    "proxy_closed",  # dumpproxy closed it: the exchange or tunnel was over, or it failed
    "idle_timeout",  # dumpproxy closed it after the head or idle timeout (it was quiet)
    "shutdown",  # dumpproxy closed it while shutting down
]
ENDED: tuple[str, ...] = typing.get_args(Ended)

Ms = Annotated[float, "milliseconds, 3 decimals"]
Address = Annotated[str, "host:port, IPv6 bracketed"]
Headers = Annotated[dict[str, str], "lower-case names; repeats joined"]


class Listening(TypedDict):
    """First line, once the port accepts connections."""

    address: Address
    mode: Annotated[str, "this listener's mode: regular, upstream:URL, reverse:URL, socks5 "
                         "or transparent (an upstream URL's credentials redacted)"]
    version: Annotated[str, "dumpproxy's version"]
    pid: int
    ca_cert: Annotated[str, "path of the CA certificate"]
    schema: Annotated[int, "version of this event schema"]


class ClientConnect(TypedDict):
    """A client connection was accepted."""


class ClientDisconnect(TypedDict):
    """A client connection was closed."""

    duration_ms: Ms
    how: Annotated[Ended, "how it ended (who closed it, and how)"]


ServerId = Annotated[int, "the upstream connection's number, unique per run"]


class _ServerConnectHead(TypedDict):
    server: ServerId
    address: Annotated[str, "the logical destination, host:port"]
    ip: Annotated[str, "the resolved peer, ip:port (the upstream proxy in upstream mode)"]
    connect_ms: Ms


class ServerConnect(_ServerConnectHead, total=False):
    """A TCP connection to the destination is up."""

    via: Annotated[str, "upstream mode: the upstream proxy it went through (URL)"]


class ServerDisconnect(TypedDict):
    """A connection to the destination was closed."""

    server: ServerId
    address: Address
    ip: Address
    bytes_sent: int
    bytes_received: int
    how: Annotated[Ended, "how it ended (who closed it, and how)"]


class _DecisionHead(TypedDict):
    address: Address
    action: Annotated[Literal["intercept", "passthrough", "block"],
                      "block: the egress lists keep the destination out (SPEC 9.4)"]
    reason: Annotated[Literal["allow_hosts", "ignore_hosts", "default", "timeout",
                              "egress_allow", "egress_deny"],
                      "timeout: a pattern took too long; passed through (an egress "
                      "pattern: blocked)"]
    pattern: Annotated[str | None, "the pattern that decided it"]
    source: Annotated[str | None, "FILE:LINE or the flag that gave the pattern (a block "
                                  "by no egress allow pattern: the allow list's files)"]
    matched: Annotated[str | None, "the candidate the pattern matched"]
    candidates: Annotated[list[str], "candidate strings, in the order they were tried"]
    sni: str | None


class Decision(_DecisionHead, total=False):
    """A tunnel or plain-HTTP request was decided: block, intercept or pass through. A
    line of `--check` is a decision with no connection (no conn, client). The egress
    fields are there only with egress lists."""

    flow: Annotated[int, "a blocked plain-HTTP request: its exchange"]
    egress_reason: Annotated[Literal["egress_allow", "egress_deny", "default", "timeout"],
                             "the egress verdict on a destination not blocked"]
    egress_pattern: Annotated[str | None, "the egress pattern that let it out"]
    egress_source: Annotated[str | None, "that pattern's FILE:LINE or flag"]
    would_block: Annotated[Literal[True], "--egress-audit: it would have been blocked"]


class _TlsHead(TypedDict):
    side: Literal["client", "server"]
    address: Address
    sni: str | None
    alpn: str | None
    version: str | None
    cipher: str | None


class Tls(_TlsHead, total=False):
    """A TLS handshake completed."""

    server: Annotated[int, "side server: the upstream connection's number"]


class Request(TypedDict):
    """Request headers received from the client (intercepted traffic only)."""

    flow: Annotated[int, "the exchange's number, unique per run"]
    method: str
    url: str
    scheme: Literal["http", "https"]
    host: str
    port: int
    path: str
    http_version: Literal["HTTP/1.0", "HTTP/1.1", "HTTP/2.0"]
    headers: Headers


class _ResponseHead(TypedDict):
    flow: int
    method: str
    url: str
    http_version: Literal["HTTP/1.0", "HTTP/1.1", "HTTP/2.0"]
    status: int
    reason: str
    headers: Headers
    request_bytes: Annotated[int, "request body bytes forwarded"]
    response_bytes: Annotated[int, "response body bytes forwarded"]
    duration_ms: Ms


Aborted = Literal[
    "client",  # the client went away or cancelled (HTTP/1 close, HTTP/2 RST_STREAM)
    "server",  # the destination broke off (an `error` says how)
    "shutdown",  # dumpproxy was stopping and its grace period ran out
]
ABORTED: tuple[str, ...] = typing.get_args(Aborted)


class Response(_ResponseHead, total=False):
    """The exchange ended: the last body byte was forwarded, dumpproxy answered the request
    itself, or the exchange was cut (`aborted`). Bodies with --bodies."""

    server: Annotated[int, "the upstream connection that carried it (none when dumpproxy "
                           "answered before reaching the destination)"]
    aborted: Annotated[Aborted, "the exchange was cut before its end: who cut it (the "
                                "byte counts say how far it got)"]
    replayed: Annotated[Literal[True], "answered from a --replay file, not the destination"]
    replay_source: Annotated[str, "the recorded exchange that answered it: FILE:LINE of "
                                  "a capture, FILE#entry N of a HAR file"]
    request_body: Annotated[str, "UTF-8 text, or base64 (see request_body_encoding)"]
    request_body_encoding: Literal["base64"]
    request_body_truncated: Literal[True]
    response_body: str
    response_body_encoding: Literal["base64"]
    response_body_truncated: Literal[True]


class _ErrorHead(TypedDict):
    stage: Stage
    message: str


class Error(_ErrorHead, total=False):
    """Something failed that a user must act on."""

    flow: int
    address: Address


class _ShutdownHead(TypedDict):
    reason: Annotated[str, "SIGINT, SIGTERM, output closed, command exited, cannot run CMD"]
    connections: int
    requests: int
    passthrough: int
    errors: int
    uptime_s: float


class Shutdown(_ShutdownHead, total=False):
    """Last line. The egress counts are there only with egress lists."""

    blocked: Annotated[int, "decisions `block`"]
    would_block: Annotated[int, "--egress-audit: decisions that would have blocked"]


# event name -> (its fields, tied to a client connection: True, False or None = optional)
EVENTS: dict[str, tuple[type, bool | None]] = {
    "listening": (Listening, False),
    "client_connect": (ClientConnect, True),
    "client_disconnect": (ClientDisconnect, True),
    "server_connect": (ServerConnect, True),
    "server_disconnect": (ServerDisconnect, True),
    "decision": (Decision, None),  # None: --check prints decisions outside any connection
    "tls": (Tls, True),
    "request": (Request, True),
    "response": (Response, True),
    "error": (Error, None),
    "shutdown": (Shutdown, False),
}


def event_fields(name: str) -> list[str]:
    """Every field an event may carry, in output order (common ones first)."""
    cls, tied = EVENTS[name]
    common = ["ts", "event"] + (["conn", "client"] if tied is not False else [])
    return common + list(typing.get_type_hints(cls))


# --- JSON Schema ------------------------------------------------------------------------

_SIMPLE = {int: "integer", float: "number", str: "string", bool: "boolean",
           type(None): "null"}


def _type_schema(tp: object) -> dict:
    description = None
    if typing.get_origin(tp) is Annotated:
        tp, description = typing.get_args(tp)[0], typing.get_args(tp)[1]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SIMPLE:
        out: dict = {"type": _SIMPLE[tp]}  # type: ignore[index]
    elif origin is Literal:
        out = {"enum": list(args)}
    elif origin in (Union, types.UnionType):
        parts = [_type_schema(a) for a in args]
        if all(set(p) == {"type"} for p in parts):
            out = {"type": [p["type"] for p in parts]}
        else:
            out = {"anyOf": parts}
    elif origin is list:
        out = {"type": "array", "items": _type_schema(args[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _type_schema(args[1])}
    else:  # pragma: no cover - a definition above uses a type this does not know
        raise TypeError(f"no JSON Schema for {tp!r}")
    if description:
        out["description"] = description
    return out


def _event_schema(name: str) -> dict:
    cls, tied = EVENTS[name]
    props: dict = {
        "ts": {"type": "number", "description": "Unix time, seconds, 6 decimals"},
        "event": {"const": name},
    }
    required = ["ts", "event"]
    if tied is not False:
        props["conn"] = {"type": "integer", "description": "client connection id"}
        props["client"] = {"type": "string", "description": "client address, host:port"}
        if tied:
            required += ["conn", "client"]
    hints = typing.get_type_hints(cls, include_extras=True)
    for field, tp in hints.items():
        props[field] = _type_schema(tp)
    required += [f for f in hints if f in cls.__required_keys__]  # type: ignore[attr-defined]
    return {
        "description": (cls.__doc__ or "").strip(),
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of one event line."""
    defs = {name: _event_schema(name) for name in EVENTS}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "dumpproxy event",
        "description": f"One line of dumpproxy's JSON Lines output (schema {SCHEMA_VERSION}).",
        "type": "object",
        "required": ["ts", "event"],
        "properties": {"event": {"enum": list(EVENTS)}},
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in EVENTS],
        "$defs": defs,
    }


def schema_text() -> bytes:
    """The schema as printed by `--schema` and shipped as event-schema.json."""
    return orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
