"""Running the proxy: event loop, signals, wrap mode, orderly shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import select
import signal
import ssl
import stat
import sys
import tempfile
import threading
from collections.abc import Callable

from dumpproxy.certs import CA, CertStore
from dumpproxy.config import Config
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import HostFilter
from dumpproxy.proxy import Proxy

WRAP_GRACE = 5.0  # in-flight exchanges get this long to finish after CMD exits
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
          "GIT_SSL_CAINFO")


def system_ca_file() -> str | None:
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            return path
    return None


def write_bundle(ca: CA) -> str:
    """System CAs + dumpproxy's CA in a private temp file (removed after the run)."""
    system = system_ca_file()
    data = b""
    if system:
        with open(system, "rb") as f:
            data = f.read().rstrip(b"\n") + b"\n"
    fd, path = tempfile.mkstemp(prefix="dumpproxy-ca-bundle-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data + ca.pem)
    return path


def write_wgetrc(proxy_url: str, bundle: str) -> str:
    """A wgetrc for the child: the user's own (WGETRC, else ~/.wgetrc; wgetrc has no
    include) and, after it so that they win, the bundle and the proxies. wget built with
    GnuTLS (Debian's) reads no CA variable, only its ca_certificate setting."""
    own = os.environ.get("WGETRC") or os.path.expanduser("~/.wgetrc")
    text = b""
    try:
        with open(own, "rb") as f:
            text = f.read().rstrip(b"\n") + b"\n"
    except OSError:
        pass
    ours = (f"# dumpproxy wrap mode\nca_certificate = {bundle}\nuse_proxy = on\n"
            f"http_proxy = {proxy_url}\nhttps_proxy = {proxy_url}\n").encode()
    fd, path = tempfile.mkstemp(prefix="dumpproxy-wgetrc-")
    with os.fdopen(fd, "wb") as f:
        f.write(text + ours)
    return path


def wrap_env(proxy_url: str, bundle: str, wgetrc: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = proxy_url
    for name in CA_ENV:
        env[name] = bundle
    env["NODE_USE_ENV_PROXY"] = "1"  # Node >= 24 (and 22.21): fetch and https use the proxy
    if wgetrc is not None:
        env["WGETRC"] = wgetrc
    return env


def watch_output(fd: int, on_gone: Callable[[], None]) -> None:
    """Notice at once when the reader of a pipe or socket goes away, also while no event
    is written: poll(2) reports POLLERR (pipe) or POLLHUP (socket) on our end. A thread
    waits in poll, so the descriptor's flags stay as the writer set them."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) or not hasattr(select, "poll"):
        return
    loop = asyncio.get_running_loop()

    def wait() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR, POLLHUP and POLLNVAL are always reported
        try:
            while True:
                events = poller.poll()
                if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                       for _, ev in events):
                    break
        except OSError:
            return
        try:
            loop.call_soon_threadsafe(on_gone)
        except RuntimeError:  # the loop is already closed: nothing left to stop
            pass

    threading.Thread(target=wait, name="dumpproxy-output-watch", daemon=True).start()


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def run(cfg: Config, hf: HostFilter, ca: CA, fd: int, command: list[str] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []

    def trigger(why: str) -> None:
        if not reason:
            reason.append(why)
        stop.set()

    writer = EventWriter(fd, cfg.format, on_broken=lambda: trigger("output closed"))

    def output_gone() -> None:
        writer.broken = True  # nothing more can be written: the reader is gone
        trigger("output closed")

    watch_output(fd, output_gone)
    certs = CertStore(ca)
    proxy = Proxy(cfg, writer, hf, certs)
    # Before `listening` is written: a script may send SIGHUP as soon as it sees that line.
    loop.add_signal_handler(signal.SIGHUP, proxy.reload_filter)
    # wrap mode: SIGINT/SIGTERM go to CMD; one that comes before CMD runs waits for it
    # (one handler throughout: a signal read just before CMD started may run it just after)
    early: list[int] = []
    wrapped: list[asyncio.subprocess.Process] = []

    def on_wrap_signal(sig: int) -> None:
        if wrapped:
            _forward_signal(wrapped[0], sig)
        else:
            early.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if command is None:
            loop.add_signal_handler(sig, trigger, signal.Signals(sig).name)
        else:
            loop.add_signal_handler(sig, on_wrap_signal, sig)
    try:
        await proxy.start()
    except OSError as e:
        certs.close()
        reason = (os.strerror(e.errno).lower() if e.errno and e.errno > 0
                  else (e.strerror or str(e)))
        print(f"dumpproxy: error: cannot listen on {cfg.listen_host}:{cfg.listen_port}: "
              f"{reason}", file=sys.stderr)
        return 1
    if cfg.verbosity >= 0 and command is None:
        print(f"dumpproxy: listening on http://{proxy.address}", file=sys.stderr)
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # GC's full passes, which then cost little (the HTTP/2 bridge asks for one per
    # connection).
    gc.freeze()

    if command is None:
        await stop.wait()
        await proxy.stop(reason[0])
        return 0

    bundle = write_bundle(ca)
    wgetrc = None
    try:
        wgetrc = write_wgetrc(f"http://{proxy.address}", bundle)
        env = wrap_env(f"http://{proxy.address}", bundle, wgetrc)
        try:
            child = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=None if cfg.output else sys.stderr.fileno(),
            )
        except OSError as e:
            await proxy.stop(f"cannot run {command[0]}")
            print(f"dumpproxy: error: cannot run {command[0]}: {e.strerror or e}",
                  file=sys.stderr)
            return 127 if isinstance(e, FileNotFoundError) else 126
        wrapped.append(child)
        for sig in early:
            _forward_signal(child, sig)
        waiter = asyncio.ensure_future(child.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():  # our output went away: stop the command too
            _forward_signal(child, signal.SIGTERM)
        code = await waiter
        stopper.cancel()
        await proxy.stop(reason[0] if reason else "command exited", grace=WRAP_GRACE)
        return _status(code)
    finally:
        os.unlink(bundle)
        if wgetrc is not None:
            os.unlink(wgetrc)


def _forward_signal(child: asyncio.subprocess.Process, sig: int) -> None:
    if child.returncode is None:
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass
