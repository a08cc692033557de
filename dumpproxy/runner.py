"""Running the proxy: event loop, signals, wrap mode, orderly shutdown."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import resource
import select
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from dumpproxy.addresses import join_host_port, strip_brackets
from dumpproxy.auth import url_userinfo
from dumpproxy.certs import CA, CertStore
from dumpproxy.config import Config
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import HostFilter
from dumpproxy.isolate import IsolationError, Namespace
from dumpproxy.isolate import start as start_isolation
from dumpproxy.proxy import ListenError, Proxy
from dumpproxy.schema import Error
from dumpproxy.status import (
    EXIT_BLOCKED,
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_SIGNAL_BASE,
    REASON_COMMAND_EXITED,
    REASON_OUTPUT_CLOSED,
    REASON_OUTPUT_FAILED,
    RELOAD_SIGNAL,
    STOP_SIGNALS,
    cannot_run,
)
from dumpproxy.wrapenv import RuntimeFiles, prepare

NO_GRACE = 0.0  # the events of what is still in flight could not be written anyway
# getaddrinfo's failures, in the system's words (os.strerror knows only errno values)
GAI_ERRORS = {socket.EAI_NONAME: "name or service not known",
              socket.EAI_AGAIN: "temporary failure in name resolution",
              socket.EAI_FAIL: "non-recoverable failure in name resolution"}
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


def write_wgetrc(proxy_url: str | None, bundle: str) -> str:
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
    ours = f"# dumpproxy wrap mode\nca_certificate = {bundle}\n"
    if proxy_url is not None:
        ours += f"use_proxy = on\nhttp_proxy = {proxy_url}\nhttps_proxy = {proxy_url}\n"
    fd, path = tempfile.mkstemp(prefix="dumpproxy-wgetrc-")
    with os.fdopen(fd, "wb") as f:
        f.write(text + ours.encode())
    return path


def wrap_env(proxy_url: str | None, bundle: str, wgetrc: str | None = None) -> dict[str, str]:
    """CMD's environment: the proxy variables (when there is an HTTP proxy listener), the
    CA bundle variables, and what wget and Node need besides."""
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        if proxy_url is not None:
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
    return EXIT_SIGNAL_BASE - returncode if returncode < 0 else returncode


def listen_error(where: str, e: OSError) -> str:
    """`cannot listen on HOST:PORT: address already in use`: the system's words for the
    errno, not the event loop's ("error while attempting to bind on address (...)").
    A negative errno is getaddrinfo's (EAI_*): the host name did not resolve."""
    if e.errno is not None and e.errno < 0:
        why = GAI_ERRORS.get(e.errno, f"getaddrinfo error {e.errno}")
        return (f"cannot listen on {where}: the host name does not resolve ({why}); give "
                "an address (127.0.0.1, ::1, 0.0.0.0) or a name that resolves")
    why = os.strerror(e.errno) if e.errno else str(e)
    why = why[:1].lower() + why[1:]
    return f"cannot listen on {where}: {why}"


def no_proxy_note(env: dict[str, str]) -> str | None:
    """Wrap mode keeps NO_PROXY from the environment: say so, or a capture may stay empty
    without a word."""
    value = env.get("NO_PROXY") or env.get("no_proxy")
    if not value:
        return None
    return (f"dumpproxy: note: NO_PROXY={value} is set: the command will not use the proxy "
            f"for those hosts (unset NO_PROXY no_proxy to record them)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(strip_brackets(host)).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def raise_descriptor_limit() -> None:
    """Every connection costs two descriptors: take all the hard limit allows (the soft
    limit is often 1,024, which 500 tunnels use up)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        pass  # keep the limit we have


async def run(cfg: Config, hf: HostFilter, ca: CA, fd: int, command: list[str] | None) -> int:
    raise_descriptor_limit()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []

    def trigger(why: str) -> None:
        if not reason:
            reason.append(why)
        stop.set()

    output = cfg.output or "standard output"

    def output_failed(why: str) -> None:
        # Serving on while dropping events would break the record: stop, exit 1.
        print(f"dumpproxy: error: cannot write events to {output}: {why}", file=sys.stderr)
        trigger(REASON_OUTPUT_FAILED)

    writer = EventWriter(fd, cfg.format, on_broken=lambda: trigger(REASON_OUTPUT_CLOSED),
                         on_failed=output_failed)

    def output_gone() -> None:
        writer.broken = True  # nothing more can be written: the reader is gone
        trigger(REASON_OUTPUT_CLOSED)

    watch_output(fd, output_gone)
    certs = CertStore(ca)
    proxy = Proxy(cfg, writer, hf, certs)

    def on_hup() -> None:
        """Reload the pattern files, then reopen -o FILE (logrotate: rename, then HUP)."""
        proxy.reload_filter()
        if cfg.output and not writer.broken:
            try:
                writer.reopen(cfg.output)
            except OSError as e:
                proxy.services.emit("error", Error(
                    stage="reload", message=f"cannot reopen {cfg.output}: "
                    f"{e.strerror or e}; writing on to the old file"))
            else:
                if cfg.verbosity > 0:
                    print(f"dumpproxy: reopened {cfg.output}", file=sys.stderr)

    # Before `listening` is written: a script may send SIGHUP as soon as it sees that line.
    loop.add_signal_handler(RELOAD_SIGNAL, on_hup)
    # wrap mode: SIGINT/SIGTERM go to CMD; one that comes before CMD runs waits for it
    # (one handler throughout: a signal read just before CMD started may run it just after)
    early: list[int] = []
    wrapped: list[asyncio.subprocess.Process] = []
    hurried: list[int] = []  # a signal that came while stopping: cut everything now

    def hurry(sig: int) -> None:
        hurried.append(sig)
        proxy.hurry()

    def on_signal(sig: int) -> None:
        if stop.is_set():
            hurry(sig)
        else:
            trigger(signal.Signals(sig).name)

    def on_wrap_signal(sig: int) -> None:
        if not wrapped:
            early.append(sig)
        elif wrapped[0].returncode is None:
            _forward_signal(wrapped[0], sig)
        else:  # CMD is done and its exchanges are finishing
            hurry(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal if command is None else on_wrap_signal, sig)
    isolation: Namespace | None = None
    if command is not None and cfg.isolate:
        try:
            isolation = await start_isolation(None if cfg.output else sys.stderr.fileno())
        except IsolationError as e:
            certs.close()
            print(f"dumpproxy: error: {e}", file=sys.stderr)
            return EXIT_RUNTIME
        proxy.modes += isolation.modes(cfg)
    try:
        await proxy.start()
        if isolation is not None:
            await isolation.serve_dns()
    except OSError as e:
        if isolation is not None:
            isolation.close()
        certs.close()
        where = e.where if isinstance(e, ListenError) else \
            join_host_port(cfg.listen_host, cfg.listen_port)
        print(f"dumpproxy: error: {listen_error(where, e)}", file=sys.stderr)
        return EXIT_RUNTIME
    if writer.failure is not None:  # not even `listening` could be written
        if isolation is not None:
            isolation.close()
        await proxy.stop(REASON_OUTPUT_FAILED)
        return EXIT_RUNTIME
    for mode in proxy.modes:  # open proxies (reverse and transparent are no proxy to use)
        open_proxy = mode.spec.kind in ("regular", "upstream", "socks5")
        host = mode.spec.listen_host or cfg.listen_host
        if open_proxy and not cfg.proxyauth and not is_loopback(host) and cfg.verbosity >= 0:
            print(f"dumpproxy: warning: listening on {mode.address} without --proxyauth: "
                  "anyone who can reach this port can use the proxy", file=sys.stderr)
    if cfg.verbosity >= 0 and command is None:
        for mode in proxy.modes:
            kind = mode.spec.kind
            scheme = "socks5" if kind == "socks5" else "http"
            what = "" if kind == "regular" else f" ({kind})"
            print(f"dumpproxy: listening on {scheme}://{mode.address}{what}",
                  file=sys.stderr)
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # GC's full passes, which then cost little (the HTTP/2 bridge asks for one per
    # connection).
    gc.freeze()

    def grace(why: str) -> float:
        """Exchanges in flight may finish, unless their events could not be written."""
        if why in (REASON_OUTPUT_CLOSED, REASON_OUTPUT_FAILED):
            return NO_GRACE
        return cfg.shutdown_grace

    def status(otherwise: int) -> int:
        if writer.failure is not None:
            return EXIT_RUNTIME
        return EXIT_SIGNAL_BASE + hurried[0] if hurried else otherwise

    if command is None:
        await stop.wait()
        await proxy.stop(reason[0], grace(reason[0]))
        return status(EXIT_OK)

    bundle = write_bundle(ca)
    wgetrc = None
    runtimes = RuntimeFiles()
    try:
        # the first regular or upstream listener, if any (other modes: CMD names the
        # listener itself, e.g. curl --proxy socks5h://...; it still gets the CA bundle)
        # (with --proxyauth, the URL carries the credentials: every client sends them)
        userinfo = url_userinfo(cfg.proxyauth) if cfg.proxyauth else ""
        http_proxy = next((f"http://{userinfo}{m.address}" for m in proxy.modes
                           if m.spec.kind in ("regular", "upstream")), None)
        if isolation is not None:  # every connection is redirected: no proxy to name
            http_proxy = None
        wgetrc = write_wgetrc(http_proxy, bundle)
        env = wrap_env(http_proxy, bundle, wgetrc)
        command, notes = prepare(runtimes, command, env, http_proxy, bundle, ca.pem,
                                 cfg.browser_flags)
        for note in [no_proxy_note(env), *notes]:
            if note and cfg.verbosity >= 0:
                print(note, file=sys.stderr)
        try:
            if isolation is not None:
                child = await isolation.run(command, env)
            else:
                child = await asyncio.create_subprocess_exec(
                    *command, env=env, stdout=None if cfg.output else sys.stderr.fileno(),
                )
        except OSError as e:
            await proxy.stop(cannot_run(command[0]))
            print(f"dumpproxy: error: cannot run {command[0]}: {e.strerror or e}",
                  file=sys.stderr)
            return EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_EXECUTE
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
        why = reason[0] if reason else REASON_COMMAND_EXITED
        await proxy.stop(why, grace(why))
        code = _status(code)
        blocked = proxy.services.blocked
        for line in blocked_lines(blocked):
            print(line, file=sys.stderr)
        return status(EXIT_BLOCKED if blocked and code == EXIT_OK else code)
    finally:
        os.unlink(bundle)
        if wgetrc is not None:
            os.unlink(wgetrc)
        runtimes.close()
        if isolation is not None:
            isolation.close()


def blocked_lines(blocked: dict[str, list]) -> list[str]:
    """Wrap mode's summary: one line per destination the egress policy blocked."""
    out = []
    for address, (count, first, why) in sorted(blocked.items()):
        when = time.strftime("%H:%M:%S", time.gmtime(first))
        times = "once" if count == 1 else f"{count} times"
        out.append(f"dumpproxy: blocked {address} ({times}, first at {when} UTC): {why}")
    return out


def _forward_signal(child: asyncio.subprocess.Process, sig: int) -> None:
    if child.returncode is None:
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass
