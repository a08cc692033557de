"""An HTTP/2 test origin: an ASGI app for hypercorn (h2 via ALPN with TLS, h2c without).

    cd tests && hypercorn --certfile C --keyfile K -b 127.0.0.1:PORT h2origin:app

Endpoints:
  /small            "hello\\n"
  /echo             JSON: method, path, query, http_version, body_len, body_sha256, headers
                    (the request headers as a list of [name, value] pairs, as received)
  /bytes/N          N zero bytes, streamed in 64 KiB chunks
  /slow?n=N&d=S     N bytes "x", one every S seconds (defaults 20, 0.1)
  /trailers         a body, then trailers `x-checksum: abc` and `x-count: 3` (hypercorn
                    sends trailers only when the request carries `te: trailers`)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from urllib.parse import parse_qs

CHUNK = 64 * 1024
ZEROS = b"\0" * CHUNK


async def _read_body(receive) -> tuple[int, str]:
    size = 0
    digest = hashlib.sha256()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body = message.get("body", b"")
        size += len(body)
        digest.update(body)
        if not message.get("more_body", False):
            break
    return size, digest.hexdigest()


async def _simple(send, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    query = parse_qs(scope.get("query_string", b"").decode())
    if path == "/small":
        await _read_body(receive)
        await _simple(send, 200, b"hello\n")
    elif path == "/echo":
        size, sha = await _read_body(receive)
        info = {
            "method": scope["method"],
            "path": path,
            "query": scope.get("query_string", b"").decode("latin-1"),
            "http_version": scope["http_version"],
            "body_len": size,
            "body_sha256": sha,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")]
                        for n, v in scope["headers"]],
        }
        await _simple(send, 200, json.dumps(info).encode(), b"application/json")
    elif path.startswith("/bytes/"):
        await _read_body(receive)
        n = int(path.split("/")[2])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(n).encode())]})
        left = n
        while left > 0:
            k = min(left, CHUNK)
            left -= k
            await send({"type": "http.response.body", "body": ZEROS[:k],
                        "more_body": left > 0})
        if n == 0:
            await send({"type": "http.response.body", "body": b""})
    elif path == "/slow":
        await _read_body(receive)
        n = int(query.get("n", ["20"])[0])
        delay = float(query.get("d", ["0.1"])[0])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(n).encode())]})
        for i in range(n):
            await send({"type": "http.response.body", "body": b"x", "more_body": i < n - 1})
            await asyncio.sleep(delay)
        if n == 0:
            await send({"type": "http.response.body", "body": b""})
    elif path == "/trailers":
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"content-type", b"text/plain"), (b"trailer", b"x-checksum")]})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await send({"type": "http.response.trailers",
                    "headers": [(b"x-checksum", b"abc"), (b"x-count", b"3")]})
    else:
        await _read_body(receive)
        await _simple(send, 404, b"not found\n")
