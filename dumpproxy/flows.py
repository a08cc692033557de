"""What both HTTP bridges record about an exchange: URL, bodies, request/response events."""

from __future__ import annotations

import base64
import time

from dumpproxy import headers as hdr
from dumpproxy.addresses import authority
from dumpproxy.context import Context
from dumpproxy.schema import Aborted, Request, Response


def build_url(scheme: str, host: str, port: int, path: str) -> str:
    return f"{scheme}://{authority(scheme, host, port)}{path}"


class BodyCapture:
    """The first N bytes of a body, for `--bodies`."""

    __slots__ = ("limit", "data", "truncated")

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room >= len(chunk):
            self.data += chunk
        else:
            if room > 0:
                self.data += chunk[:room]
            self.truncated = True

    def fields(self, prefix: str) -> dict:
        raw = bytes(self.data)
        try:
            out: dict = {prefix: raw.decode()}
        except UnicodeDecodeError:
            out = {prefix: base64.b64encode(raw).decode(), f"{prefix}_encoding": "base64"}
        if self.truncated:
            out[f"{prefix}_truncated"] = True
        return out


class Flow:
    """One recorded exchange: numbered, with its `request` and `response` events."""

    __slots__ = ("ctx", "flow", "method", "url", "http_version", "started", "request_bytes",
                 "response_bytes", "req_body", "resp_body", "replayed")

    def __init__(self, ctx: Context, method: str, scheme: str, host: str, port: int,
                 path: str, http_version: str, header_items, started: float | None = None):
        self.ctx = ctx
        self.flow = ctx.services.next_flow()
        ctx.services.stats.requests += 1
        self.method = method
        self.url = build_url(scheme, host, port, path)
        self.http_version = http_version
        self.started = time.monotonic() if started is None else started
        self.request_bytes = 0
        self.response_bytes = 0
        self.replayed: str | None = None  # the replay source that answered it
        cfg = ctx.cfg
        self.req_body = BodyCapture(cfg.max_body_bytes) if cfg.bodies else None
        self.resp_body = BodyCapture(cfg.max_body_bytes) if cfg.bodies else None
        # (dict displays typed as the schema's TypedDicts: calling one costs twice as much)
        fields: Request = {
            "flow": self.flow, "method": method, "url": self.url,
            "scheme": scheme, "host": host, "port": port, "path": path,  # type: ignore
            "http_version": http_version,  # type: ignore[typeddict-item]
            "headers": hdr.header_object(header_items, cfg.redact)}
        ctx.emit("request", fields)  # type: ignore[arg-type]

    def request_data(self, data: bytes) -> None:
        self.request_bytes += len(data)
        if self.req_body is not None:
            self.req_body.add(data)

    def response_data(self, data: bytes) -> None:
        self.response_bytes += len(data)
        if self.resp_body is not None:
            self.resp_body.add(data)

    def respond(self, status: int, reason: str, header_items,
                aborted: Aborted | None = None, server: int | None = None) -> None:
        """The `response` event: written once the last body byte was forwarded, or when
        the exchange was cut (aborted: by whom; status 0 when no response head had come).
        server: the upstream connection that carried it."""
        ctx = self.ctx
        fields: Response = {
            "flow": self.flow, "method": self.method, "url": self.url,
            "http_version": self.http_version,  # type: ignore[typeddict-item]
            "status": status, "reason": reason,
            "headers": hdr.header_object(header_items, ctx.cfg.redact),
            "request_bytes": self.request_bytes, "response_bytes": self.response_bytes,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3)}
        if server is not None:
            fields["server"] = server
        if aborted is not None:
            fields["aborted"] = aborted
        if self.replayed is not None:
            fields["replayed"] = True
            fields["replay_source"] = self.replayed
        if self.req_body is not None and self.resp_body is not None:
            fields.update(self.req_body.fields("request_body"))  # type: ignore[typeddict-item]
            fields.update(self.resp_body.fields("response_body"))  # type: ignore[typeddict-item]
        ctx.emit("response", fields)
