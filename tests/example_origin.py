"""The origin server of the examples' sandbox (see examples.py): example.com and the other
sandbox host names on 127.0.0.1:443 (TLS, the test PKI's certificate) and 127.0.0.1:80.
`/` answers like the test origins' `/small`. Writes SANDBOX/origin-ready once listening."""

from __future__ import annotations

import ssl
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from conftest import OriginHandler


class Handler(OriginHandler):
    def do_GET(self) -> None:
        if self.path == "/":
            self.path = "/small"
        super().do_GET()

    do_POST = do_PUT = do_HEAD = do_DELETE = do_GET


def serve(port: int, context: ssl.SSLContext | None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    box = Path(sys.argv[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(box / "origin-cert.pem", box / "origin-key.pem")
    serve(443, ctx)
    serve(80, None)
    (box / "origin-ready").write_text("ready\n")
    threading.Event().wait()


if __name__ == "__main__":
    main()
