"""Replay (SPEC §9.3), the pure half: recorded exchanges, matching, order, closest misses.

A `Recorded` is one exchange a replay file holds (where its response body is, not the body
itself); `Replay` answers "which recorded response serves this request": method, scheme,
host, port, path and query (minus the ignored parameters), and the request body when it
was recorded (by its SHA-256). Identical requests get their recorded responses in
recorded order, then the last one again. A miss names the closest recorded requests for
its host. What the files hold and how bodies are read is `replaysource`'s job.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from dumpproxy import headers as hdr

# Fields of a recorded response that are the connection's or the framing's, not the
# response's: recomputed for the client (HTTP/2 forbids some; lengths are ours).
RECOMPUTED = hdr.H2_FORBIDDEN | {b"content-length"}
REDACTED = hdr.REDACTED
MAX_CLOSEST = 3
MAX_REQUEST_BODY = 64 * 1024 * 1024  # a request body held whole to be matched


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class Request:
    """What a request is matched on."""

    method: str
    scheme: str
    host: str
    port: int
    path: str  # origin-form: path and query

    @property
    def shown(self) -> str:
        """The request as a person reads it: `GET https://host:port/path`."""
        return f"{self.method} {self.scheme}://{_authority(self.host, self.port)}{self.path}"


@dataclass(slots=True)
class Recorded:
    """One recorded exchange: its request, its response head, where its body is.

    problem: why it cannot be served (a cut body, no body recorded): listed, never served.
    warning: served, but not as recorded (redacted credential headers dropped)."""

    request: Request
    body: bytes | None  # SHA-256 of the recorded request body; None: not recorded
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    source: str  # `cap.jsonl:17`, `file.har#entry 3`
    where: object  # how replaysource finds the response body (offset, or the bytes)
    problem: str | None = None
    warning: str | None = None


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_path(path: str) -> tuple[str, str]:
    base, _, query = path.partition("?")
    return base, query


def header_items(pairs: Iterable[tuple[str, str]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Recorded headers (an event's object's items, HAR's pairs) -> items; True when a
    credential value was redacted (that field is left out: a redacted cookie served as
    such would be a wrong one)."""
    items: list[tuple[bytes, bytes]] = []
    redacted = False
    for raw_name, raw_value in pairs:
        name, value = str(raw_name).lower(), str(raw_value)
        values = value.split("\n") if name == "set-cookie" else [value]
        for v in values:
            if name in hdr.CREDENTIAL_HEADERS and REDACTED in v:
                redacted = True
                continue
            items.append((name.encode(), v.encode("utf-8", "replace")))
    return items, redacted


def response_headers(rec: Recorded, method: str, length: int) -> list[tuple[bytes, bytes]]:
    """The recorded response's headers as sent to a client: connection-specific and
    framing fields recomputed (a body of `length` bytes, sent whole)."""
    drop = hdr.connection_tokens(rec.headers) | RECOMPUTED
    out = [(n, v) for n, v in rec.headers if n not in drop and not n.startswith(b":")]
    if method == "HEAD" or rec.status in (204, 304) or rec.status < 200:
        length_value = hdr.header_value(rec.headers, b"content-length")
        if length_value is not None and method == "HEAD":
            out.append((b"content-length", length_value))
        return out
    out.append((b"content-length", str(length).encode()))
    return out


class Replay:
    """The recorded exchanges of every --replay file, as they are matched at run time.

    The only state is the position in each run of identical requests."""

    def __init__(self, entries: list[Recorded], ignore_params: Iterable[str] = (),
                 ignore_body: bool = False, forward: bool = False):
        self.ignore_params = frozenset(ignore_params)
        self.ignore_body = ignore_body
        self.forward = forward  # a miss goes to the real destination
        self.entries = entries
        self._by_key: dict[tuple, list[Recorded]] = {}
        self._hosts: set[tuple[str, int]] = set()
        self._by_host: dict[str, list[Recorded]] = {}  # what a miss is compared with
        for rec in entries:
            if rec.problem is None:
                self._by_key.setdefault(self.key(rec.request), []).append(rec)
                self._hosts.add((rec.request.host.lower(), rec.request.port))
                self._by_host.setdefault(rec.request.host.lower(), []).append(rec)
        self._served: dict[tuple, int] = {}  # per key and body: how many were served

    def key(self, req: Request) -> tuple:
        base, query = split_path(req.path)
        pairs = parse_qsl(query, keep_blank_values=True)
        if self.ignore_params:
            pairs = [(k, v) for k, v in pairs if k not in self.ignore_params]
        return (req.method.upper(), req.scheme, req.host.lower(), req.port, base,
                tuple(pairs))

    def serves(self, host: str, port: int) -> bool:
        """Something is recorded for this destination."""
        return (host.lower(), port) in self._hosts

    def match(self, req: Request, body: bytes | None) -> Recorded | None:
        """The recorded response for this request (its body's digest, None for none),
        advancing through identical requests' responses; None: a miss."""
        key = self.key(req)
        candidates = self._by_key.get(key)
        if not candidates:
            return None
        if not self.ignore_body:
            digest = body_digest(body or b"")
            candidates = [r for r in candidates if r.body is None or r.body == digest]
            if not candidates:
                return None
            key = (*key, digest)
        n = self._served.get(key, 0)
        self._served[key] = n + 1
        return candidates[min(n, len(candidates) - 1)]

    def closest(self, req: Request, limit: int = MAX_CLOSEST) -> list[Recorded]:
        """Up to `limit` recorded requests for the same host, most like this one first
        (same method first, then the likeness of path and query)."""
        seen: set[tuple] = set()
        scored = []
        for rec in self._by_host.get(req.host.lower(), ()):
            r = rec.request
            ident = (r.method, r.scheme, r.port, r.path)
            if ident in seen:
                continue
            seen.add(ident)
            likeness = difflib.SequenceMatcher(None, req.path, r.path).ratio()
            scored.append((r.method != req.method, r.port != req.port, -likeness,
                           len(scored), rec))
        scored.sort(key=lambda t: t[:4])
        return [t[4] for t in scored[:limit]]

    def miss_message(self, req: Request) -> str:
        """The `error` message of a miss: the request and the closest recorded ones."""
        close = self.closest(req)
        if close:
            named = "; ".join(f"{c.request.shown} ({c.source})" for c in close)
            return f"not in the replay files: {req.shown}; closest recorded: {named}"
        return f"not in the replay files: {req.shown}; nothing recorded for " \
               f"{_authority(req.host, req.port)}"
