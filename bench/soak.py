#!/usr/bin/env python3
"""Soak: dumpproxy under steady mixed traffic for a given time, its memory and descriptors
sampled, to show whether anything grows with the exchanges (issue 26).

    python3 bench/soak.py --minutes 60            # the five workloads at once, one hour
    python3 bench/soak.py --minutes 5 --one-proxy # the whole mix through one proxy
    python3 bench/soak.py --workloads h2x1 --rate h2x1=1000 --minutes 3

It starts its own nginx on loopback (plain HTTP and HTTPS with h2, a 1 KiB object,
connections never recycled by nginx unless --keepalive-requests says so), one dumpproxy
per workload from this checkout (`python -m dumpproxy -k`, events read and counted), and
hey as the load generator, rate-limited, for the whole run:

    newconn  a new HTTPS connection per request (CONNECT, both TLS handshakes)
    h1       HTTP/1.1 keep-alive, plain HTTP (the explicit proxy)
    https    HTTPS keep-alive, intercepted
    h2x4     HTTP/2, intercepted, on 4 connections
    h2x1     HTTP/2, intercepted, on 1 connection (many streams one after the other)

Each workload has its own proxy so that its memory is its own; --one-proxy sends them
all through one (the mix as a user would run it; exchanges still counted per workload by
their paths). Every --interval seconds it samples each proxy's VmRSS, RssAnon and open
descriptors; at the end it prints, per proxy, the exchanges and connections it recorded,
RSS before the load, after the warm-up (--warmup, default the first minute) and at the
end, the slope of RSS against exchanges after the warm-up in KB per 100,000 exchanges
(least squares), and descriptors at baseline, at most, and once the clients are gone.
The samples go to --out as JSON lines.

Needs nginx and hey on PATH (Debian: apt-get install nginx hey); Python with dumpproxy's
dependencies. Loopback only; everything it starts is stopped when it ends (also on
Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509  # a dependency of dumpproxy's
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose dumpproxy is soaked


@dataclass(frozen=True)
class Workload:
    title: str
    rate: float  # requests per second, all its connections together
    scheme: str
    hey: tuple[str, ...]  # hey options beyond rate, duration and proxy
    processes: int = 1  # hey processes (an HTTP/2 hey process may dial one per worker)
    workers: int = 1  # hey workers per process: keep-alive connections each


# The mix: 300 req/s HTTP/1 keep-alive, 300 HTTPS keep-alive, 100 HTTP/2 on 4
# connections, 40 new HTTPS connections/s; and one HTTP/2 connection with many streams.
WORKLOADS = {
    "newconn": Workload("new HTTPS connection per request", 40, "https",
                        ("-disable-keepalive",), workers=4),
    "h1": Workload("HTTP/1 keep-alive", 300, "http", (), workers=4),
    "https": Workload("HTTPS keep-alive, intercepted", 300, "https", (), workers=4),
    "h2x4": Workload("HTTP/2 on 4 connections", 100, "https", ("-h2",), processes=4),
    "h2x1": Workload("HTTP/2 on 1 connection", 250, "https", ("-h2",)),
}

NGINX_CONF = """\
worker_processes 1;
daemon off;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  server_tokens off;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  keepalive_timeout 600s;
  keepalive_requests {keepalive_requests};
  server {{
    listen 127.0.0.1:{http_port} backlog=4096;
    root {d}/www;
    location /w/ {{ try_files /small =404; }}
  }}
  server {{
    listen 127.0.0.1:{https_port} ssl http2 backlog=4096;
    ssl_certificate {d}/origin.crt;
    ssl_certificate_key {d}/origin.key;
    root {d}/www;
    location /w/ {{ try_files /small =404; }}
  }}
}}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"soak: {what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: {what} is not listening on {port}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen | None, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def proc_status(pid: int, keys: tuple[str, ...] = ("VmRSS", "RssAnon")) -> dict[str, int]:
    """These /proc status fields (KiB) and the open descriptors of a process."""
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


# --- the origin ---------------------------------------------------------------------------


class Nginx:
    def __init__(self, directory: Path, keepalive_requests: int):
        self.dir = directory
        self.http_port, self.https_port = free_port(), free_port()
        (directory / "tmp").mkdir(parents=True)
        (directory / "www").mkdir()
        line = b"dumpproxy soak object 0123456789abcdefghijklmnopqrstuvwxyz\n"
        (directory / "www" / "small").write_bytes((line * 20)[:1024])
        self._certificate()
        user = "user root;" if os.geteuid() == 0 else ""  # its files are in a private dir
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            user=user, d=directory, http_port=self.http_port, https_port=self.https_port,
            keepalive_requests=keepalive_requests))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for port in (self.http_port, self.https_port):
            wait_port(port, self.proc, "nginx")

    def _certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (the proxy runs with -k)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(key, hashes.SHA256()))
        (self.dir / "origin.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / "origin.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    def url(self, scheme: str, name: str) -> str:
        port = self.https_port if scheme == "https" else self.http_port
        return f"{scheme}://127.0.0.1:{port}/w/{name}"

    def close(self) -> None:
        stop(self.proc)


# --- the proxies --------------------------------------------------------------------------


class Proxy:
    """One dumpproxy from this checkout; its events are read and counted: by kind, and
    `response` by workload (the path's /w/NAME); `error` events are kept."""

    def __init__(self, name: str, home: Path, extra: list[str]):
        self.name = name
        home.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(DUMPPROXY_HOME=str(home), PYTHONUNBUFFERED="1")
        self.cmd = [sys.executable, "-m", "dumpproxy", "-p", "0", "-k", "-q", *extra]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.kinds: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()  # by workload
        self.errors: list[dict] = []
        self.shutdown: dict | None = None
        self.port = 0
        self._listening = threading.Event()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(20):
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""
            stop(self.proc)
            raise SystemExit(f"soak: dumpproxy did not start listening\n{err}")
        self.baseline = proc_status(self.proc.pid)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            start = raw.find(b'"event":"') + 9
            kind = raw[start:raw.find(b'"', start)].decode()
            workload = ""
            if kind == "response":
                at = raw.find(b"/w/", raw.find(b'"url":"'))
                workload = raw[at + 3:raw.find(b'"', at)].decode() if at > 0 else "?"
            with self._lock:
                self.kinds[kind] += 1
                if workload:
                    self.responses[workload] += 1
                elif kind in ("error", "shutdown", "listening"):
                    ev = json.loads(raw)
                    if kind == "error":
                        self.errors.append(ev)
                    elif kind == "shutdown":
                        self.shutdown = ev
                    else:
                        self.port = int(ev["address"].rsplit(":", 1)[1])
                        self._listening.set()

    def sample(self) -> dict:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"soak: dumpproxy ({self.name}) exited with status "
                             f"{self.proc.returncode}\n{err}")
        with self._lock:
            counts = {"exchanges": self.kinds["response"], "requests": self.kinds["request"],
                      "connections": self.kinds["client_connect"],
                      "errors": self.kinds["error"]}
        return {**proc_status(self.proc.pid), **counts}

    def close(self) -> int | None:
        """SIGTERM: the proxy's own orderly shutdown (its `shutdown` event)."""
        stop(self.proc, grace=15)
        self._reader.join(5)
        return self.proc.returncode


# --- the load -----------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    workload: Workload
    rate: float
    procs: list[subprocess.Popen] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def start(self, proxy_port: int, url: str, seconds: float, workdir: Path) -> None:
        w = self.workload
        per_worker = self.rate / (w.processes * w.workers)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        for i in range(w.processes):
            out = workdir / f"hey-{self.name}-{i}.txt"
            cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(w.workers), "-q", f"{per_worker:g}",
                   "-t", "30", *w.hey, "-x", f"http://127.0.0.1:{proxy_port}", url]
            with open(out, "w") as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                   env=env, start_new_session=True))
            self.outputs.append(out)

    def results(self) -> tuple[int, int, Counter[str]]:
        """(requests hey sent, 2xx answers, what went wrong: status or error, count)."""
        sent = ok = 0
        bad: Counter[str] = Counter()
        for out in self.outputs:
            text = out.read_text(errors="replace")
            for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text):
                sent += int(n)
                if code.startswith("2"):
                    ok += int(n)
                else:
                    bad[f"status {code}"] += int(n)
            if "Error distribution:" in text:
                errors = text.split("Error distribution:", 1)[1]
                for n, msg in re.findall(r"^\s+\[(\d+)\]\s+(.*)$", errors, re.M):
                    sent += int(n)
                    bad[msg.strip()[:100]] += int(n)
            if "Status code distribution:" not in text and "Error distribution:" not in text:
                bad["hey printed no summary: " + text.strip()[-200:]] += 1
        return sent, ok, bad

    def stop(self) -> None:
        for p in self.procs:
            stop(p)


# --- the report ---------------------------------------------------------------------------


def slope_per_100k(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of KiB against exchanges, per 100,000 exchanges."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if not var:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / var * 100_000


def mb(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def report(proxies: dict[str, Proxy], loads: dict[str, Load], samples: list[dict],
           after: dict[str, dict], warmup: float, seconds: float) -> list[str]:
    lines = []
    for name, proxy in proxies.items():
        mine = [s for s in samples if s["proxy"] == name]
        loaded = [s for s in mine if s["t"] <= seconds]
        warm = [s for s in loaded if s["t"] >= warmup]
        first = warm[0] if warm else None
        end = loaded[-1]
        slope = slope_per_100k([(s["exchanges"], s["VmRSS"]) for s in warm])
        peak_fds = max(s["fds"] for s in mine)
        delta = f"{end['VmRSS'] - first['VmRSS']:+,}" if first else "n/a"
        lines.append(
            f"{name:8} {end['exchanges']:>10,} {end['connections']:>8,} {end['errors']:>6} "
            f"{mb(proxy.baseline['VmRSS']):>7} "
            f"{mb(first['VmRSS']) if first else 'n/a':>9} {mb(end['VmRSS']):>7} "
            f"{delta:>8} "
            f"{'n/a' if slope is None else f'{slope:+,.0f}':>10} "
            f"{proxy.baseline['fds']:>4} {peak_fds:>4} {after[name]['fds']:>5}")
    header = (f"{'proxy':8} {'exchanges':>10} {'conns':>8} {'errors':>6} {'RSS MB':>7} "
              f"{'@' + f'{warmup:g}s':>9} {'end':>7} {'end-@ KB':>8} {'KB/100k':>10} "
              f"{'fds':>4} {'max':>4} {'after':>5}")
    out = [header, *lines, ""]
    out.append("exchanges by workload (proxy record; hey: sent, 2xx, problems):")
    for name, load in loads.items():
        recorded = sum(p.responses[name] for p in proxies.values())
        sent, ok, bad = load.results()
        problems = ", ".join(f"{k}: {v}" for k, v in bad.most_common(3)) or "none"
        out.append(f"  {name:8} {load.workload.title:34} {load.rate:>6g}/s  recorded "
                   f"{recorded:>10,}  hey {sent:,} sent, {ok:,} 2xx; problems: {problems}")
    return out


# --- the run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--minutes", type=float, default=60.0, help="how long the load runs")
    ap.add_argument("--warmup", type=float, default=60.0, metavar="SECONDS",
                    help="RSS is compared with its value this long into the load (default 60)")
    ap.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                    help="sampling interval (default 5)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list from {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--rate", action="append", default=[], metavar="NAME=REQ_PER_S",
                    help="a workload's rate, all its connections together; repeatable "
                         "(default: " + ", ".join(f"{k}={w.rate:g}" for k, w in
                                                  WORKLOADS.items()) + ")")
    ap.add_argument("--one-proxy", action="store_true",
                    help="all workloads through one proxy instead of one each")
    ap.add_argument("--keepalive-requests", type=int, default=100_000_000,
                    help="nginx's requests per connection (default: never recycled; "
                         "nginx's own default is 1000)")
    ap.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                    help="an extra dumpproxy argument (e.g. --proxy-arg=--bodies); repeatable")
    ap.add_argument("--out", type=Path, help="samples as JSON lines (default: in the work "
                    "directory, which is then kept)")
    a = ap.parse_args(argv)
    names = [n for n in a.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        ap.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    a.names = names
    a.rates = {n: WORKLOADS[n].rate for n in names}
    for spec in a.rate:
        name, _, value = spec.partition("=")
        if name not in a.rates:
            ap.error(f"--rate {spec}: not a selected workload")
        try:
            a.rates[name] = float(value)
        except ValueError:
            ap.error(f"--rate {spec}: not a number")
        if a.rates[name] <= 0:
            ap.error(f"--rate {spec}: must be above 0")
    if a.minutes <= 0 or a.interval <= 0 or a.warmup < 0:
        ap.error("--minutes and --interval must be above 0, --warmup not below")
    return a


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # so a killed run still stops what it started


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for tool in ("nginx", "hey"):
        if not shutil.which(tool):
            raise SystemExit(f"soak: {tool} not found (Debian: apt-get install nginx hey)")
    seconds = a.minutes * 60
    signal.signal(signal.SIGTERM, _sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="dumpproxy-soak-"))
    out_path = a.out or workdir / "samples.jsonl"
    nginx: Nginx | None = None
    proxies: dict[str, Proxy] = {}
    loads = {n: Load(n, WORKLOADS[n], a.rates[n]) for n in a.names}
    samples: list[dict] = []
    interrupted = False
    try:
        nginx = Nginx(workdir / "nginx", a.keepalive_requests)
        for name in (["mix"] if a.one_proxy else a.names):
            proxies[name] = Proxy(name, workdir / f"home-{name}", a.proxy_arg)
        log(f"nginx on {nginx.http_port}/{nginx.https_port}; dumpproxy "
            + ", ".join(f"{n} pid {p.proc.pid} port {p.port}" for n, p in proxies.items()))
        log(f"load for {a.minutes:g} min: " + ", ".join(
            f"{n} {r:g}/s" for n, r in a.rates.items()) + f"; samples in {out_path}")
        t0 = time.monotonic()
        for name, load in loads.items():
            proxy = proxies["mix" if a.one_proxy else name]
            load.start(proxy.port, nginx.url(load.workload.scheme, name), seconds, workdir)
        # every --interval seconds, and once more just before the load ends
        times = [i * a.interval for i in range(int((seconds - 0.5) // a.interval) + 1)]
        if times[-1] < seconds - 1:
            times.append(seconds - 0.5)
        every_minute = max(1, round(60 / a.interval))
        with open(out_path, "w") as out:
            for i, at in enumerate(times):
                time.sleep(max(0.0, at - (time.monotonic() - t0)))
                t = round(time.monotonic() - t0, 1)
                for name, proxy in proxies.items():
                    s = {"t": t, "proxy": name, **proxy.sample()}
                    samples.append(s)
                    out.write(json.dumps(s) + "\n")
                out.flush()
                if i % every_minute == 0 or i == len(times) - 1:
                    log(", ".join(f"{s['proxy']} {mb(s['VmRSS'])} MB, {s['fds']} fds, "
                                  f"{s['exchanges']:,} exchanges"
                                  for s in samples[-len(proxies):]))
            for load in loads.values():  # hey ends by itself (-z)
                for p in load.procs:
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.terminate()
            # the clients are gone: descriptors back to where they were before the load
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(
                    proc_status(p.proc.pid)["fds"] > p.baseline["fds"] for p in proxies.values()):
                time.sleep(0.2)
            after = {n: p.sample() for n, p in proxies.items()}
            for name, s in after.items():
                out.write(json.dumps({"t": "after", "proxy": name, **s}) + "\n")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything")
    finally:
        for load in loads.values():
            load.stop()
        statuses = {n: p.close() for n, p in proxies.items()}
        if nginx is not None:
            nginx.close()
    if interrupted:
        return 130

    layout = "one proxy for the mix" if a.one_proxy else "one proxy per workload"
    command = " ".join(["bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"soak: {a.minutes:g} min, {layout}, nginx keepalive_requests "
        f"{a.keepalive_requests:,}; dumpproxy {_version()}, Python {sys.version.split()[0]}, "
        f"{dt.datetime.now().isoformat(timespec='seconds')}",
        f"command: {command}",
        "RSS (VmRSS) in MB before the load, after the warm-up (@) and at the end, then the "
        "difference in KB;",
        "KB/100k: its slope after the warm-up; fds before the load, at most, after the "
        "clients left",
        "",
        *report(proxies, loads, samples, after, a.warmup, seconds),
        "",
    ]
    for name, proxy in proxies.items():
        paired = proxy.kinds["request"] == proxy.kinds["response"]
        lines.append(f"{name}: exit {statuses[name]}, requests {proxy.kinds['request']:,}, "
                     f"responses {proxy.kinds['response']:,}{'' if paired else ' (UNPAIRED)'}, "
                     f"errors {len(proxy.errors)}"
                     + "".join(f"\n    {e.get('stage')}: {e.get('message')}"
                               for e in proxy.errors[:5]))
    print("\n".join(lines))
    if a.out is None:
        log(f"samples and hey's outputs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _version() -> str:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
