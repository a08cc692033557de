"""Real origins for the real-client tests: nginx (HTTP/1.1 and HTTP/2 over TLS, static
files, a dumb-HTTP git repository, a WebSocket location proxied to an echo server).

Loopback only: nginx listens on 127.0.0.1 on a free port; the WebSocket echo (Python
`websockets`) likewise. Host names (`app.test`, `cdn.test`, `git.test`) are resolved by
dumpproxy's private resolver (`hosts=`), never by DNS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from conftest import TestPKI, free_port, stop_process

HOSTS = ("app.test", "cdn.test", "git.test")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dumpproxy page</title>
<link rel="stylesheet" href="https://cdn.test:{port}/style.css">
<script src="https://cdn.test:{port}/lib.js"></script>
<script src="/app.js"></script>
</head>
<body>
<img id="a" src="/local.svg"><img id="b" src="https://cdn.test:{port}/logo.svg">
<script>
const params = new URLSearchParams(location.search);
const n = Number(params.get("n") || 1), last = Number(params.get("last") || 1);
const run = params.get("run") || "";
window.addEventListener("load", () => {{
  const imgs = [...document.images].every(i => i.complete && i.naturalWidth > 0);
  const css = getComputedStyle(document.body).marginLeft === "7px";
  const ws = new WebSocket("wss://app.test:{port}/ws");
  let wsok = false;
  ws.onopen = () => ws.send("ping-" + n);
  ws.onmessage = (m) => {{ wsok = m.data === "ping-" + n; ws.close(); }};
  ws.onclose = ws.onerror = async () => {{
    if (ws.done) return;
    ws.done = true;
    const q = `run=${{run}}&n=${{n}}&ws=${{wsok}}&lib=${{window.LIB === 1}}` +
              `&app=${{window.APP === 1}}&imgs=${{imgs}}&css=${{css}}`;
    await fetch("https://cdn.test:{port}/done?" + q, {{mode: "no-cors"}});
    if (n < last) location.href = `/?run=${{run}}&n=${{n + 1}}&last=${{last}}`;
  }};
}});
</script>
</body></html>
"""

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4">'
       '<rect width="4" height="4" fill="#c00"/></svg>\n')

NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  types {{ text/html html; application/javascript js; text/css css; image/svg+xml svg;
          text/plain txt; }}
  default_type application/octet-stream;
  log_format t '$host $server_protocol $request_method $request_uri $status';
  access_log {d}/access.log t;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  {keepalive}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    listen 127.0.0.1:{http_port};
    server_name app.test cdn.test git.test;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    root {d}/www;
    location /ws {{
      proxy_pass http://127.0.0.1:{ws_port};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
    }}
    location /done {{ add_header Access-Control-Allow-Origin *; return 204; }}
    location /small {{ return 200 "hello\\n"; }}
  }}
}}
"""


class WebSocketEcho:
    """A plain-HTTP WebSocket echo server (nginx proxies /ws to it)."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        def echo(ws) -> None:
            try:
                for message in ws:
                    ws.send(message)
            except Exception:  # the client went away: nothing to echo to
                pass

        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()


class Nginx:
    """nginx on 127.0.0.1:port, TLS with h2 and http/1.1, names app/cdn/git.test; the same
    site in plain HTTP/1.1 on http_port."""

    def __init__(self, directory: Path, pki: TestPKI, keepalive_requests: int | None = None):
        self.dir = directory
        self.ws = WebSocketEcho()
        self.port = free_port()
        self.http_port = free_port()  # the same site in plain HTTP/1.1
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        www = directory / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text(PAGE.format(port=self.port))
        (www / "style.css").write_text("body { margin-left: 7px; }\n")
        (www / "lib.js").write_text("window.LIB = 1;\n")
        (www / "app.js").write_text("window.APP = 1;\n")
        (www / "local.svg").write_text(SVG)
        (www / "logo.svg").write_text(SVG)
        (www / "hello.txt").write_text("hello\n")
        (www / "big.bin").write_bytes(os.urandom(256 * 1024))
        make_git_repo(www / "repo.git", directory / "src")
        leaf, key = pki.leaf(list(HOSTS))
        cert = directory / "chain.pem"  # leaf + CA: a client pinning the CA's key sees it
        cert.write_bytes(leaf.read_bytes() + pki.ca_path.read_bytes())
        keepalive = (f"keepalive_requests {keepalive_requests};"
                     if keepalive_requests is not None else "")
        conf = directory / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""  # files under a private tmp dir
        conf.write_text(NGINX_CONF.format(user=user, d=directory, port=self.port,
                                          http_port=self.http_port,
                                          ws_port=self.ws.port, cert=cert, key=key,
                                          keepalive=keepalive))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(directory / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError("nginx did not start: " + self.errors())
            time.sleep(0.05)

    def url(self, path: str = "/", host: str = "app.test") -> str:
        return f"https://{host}:{self.port}{path}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def access(self) -> list[str]:
        """Lines of the access log: host protocol method uri status."""
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        stop_process(self.proc)
        self.ws.close()


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def make_git_repo(bare: Path, work: Path) -> None:
    """A bare repository with one commit, ready for dumb HTTP (update-server-info)."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_NOSYSTEM="1", HOME=str(work.parent))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (work / "README").write_text("a repository served by nginx\n")
    git("add", "README")
    git("commit", "-q", "-m", "first")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=work.parent)
    git("update-server-info", cwd=bare)
