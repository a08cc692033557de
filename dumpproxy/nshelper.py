"""--isolate's helper: the process that becomes CMD, inside a network namespace of its own.

Run by `isolate` as `python -m dumpproxy.nshelper FD` (FD: a Unix stream socket to
dumpproxy). It leaves dumpproxy's network namespace (and, without root, its user
namespace: the user's own uid is root inside), sets the new one up, and hands dumpproxy
the sockets that stay inside it; then it waits for the command and execs it.

Inside: only `lo`, with default routes through it (so a connection to any address is
made locally, where the rules below catch it); nftables rules that redirect every TCP
connection to the transparent listener and every UDP datagram to port 53 to the DNS
socket (both made here and served by dumpproxy), and refuse everything else that is not
for the namespace's own loopback. Nothing inside leads anywhere else: the namespace has
no other interface, so even a command that could change the rules has no way out.

Protocol on FD (JSON lines): the helper sends {"ports": ...} with the sockets attached
(SCM_RIGHTS), or {"error": "one line"}; dumpproxy sends {"argv": [...], "env": {...}};
the helper execs it, or answers {"errno": N} when it cannot. A successful exec closes FD
(close-on-exec), which dumpproxy reads as the go.

No import from dumpproxy: the helper starts with Python's standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

RULES = """\
table ip dumpproxy {{
  chain out {{
    type nat hook output priority -100; policy accept;
    udp dport 53 redirect to :{dns4}
    meta l4proto tcp redirect to :{tcp4}
  }}
}}
{ip6}table inet dumpproxy_refuse {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    reject with icmpx type admin-prohibited
  }}
}}
"""
RULES6 = """\
table ip6 dumpproxy {{
  chain out {{
    type nat hook output priority -100; policy accept;
    udp dport 53 redirect to :{dns6}
    meta l4proto tcp redirect to :{tcp6}
  }}
}}
"""


class Failure(Exception):
    """Why the namespace cannot be made: one line for the user."""


def run(*argv: str) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise Failure(f"cannot run {argv[0]}: {e.strerror}") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[0]
        raise Failure(f"{' '.join(argv[:3])}: {why}")


def unshare() -> None:
    """A network namespace; without the privilege for one, a user namespace with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return
    first = ctypes.get_errno()
    uid, gid = os.geteuid(), os.getegid()
    if first != errno.EPERM or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno() if first == errno.EPERM else first
        raise Failure(
            f"cannot create a network namespace: {os.strerror(err)} (--isolate needs root, "
            "or unprivileged user namespaces: sysctl user.max_user_namespaces, "
            "kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns)")
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    except OSError as e:
        raise Failure(f"cannot map the user into its namespace: {e.strerror}") from None


def listener(family: int, host: str, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    return sock


def setup() -> tuple[dict, list[socket.socket]]:
    if not sys.platform.startswith("linux"):
        raise Failure("--isolate needs Linux (network namespaces)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise Failure(f"--isolate needs {tool} ({package}), not found on PATH")
    unshare()
    run("ip", "link", "set", "lo", "up")
    run("ip", "route", "add", "default", "dev", "lo", "src", "127.0.0.1")
    ipv6 = socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")
    if ipv6:
        try:
            run("ip", "-6", "route", "add", "default", "dev", "lo", "src", "::1")
        except Failure:
            ipv6 = False  # IPv6 off in this kernel: IPv4 alone
    socks = [listener(socket.AF_INET, "127.0.0.1", socket.SOCK_STREAM),
             listener(socket.AF_INET, "127.0.0.1", socket.SOCK_DGRAM)]
    ports = {"tcp4": socks[0].getsockname()[1], "dns4": socks[1].getsockname()[1]}
    if ipv6:
        socks += [listener(socket.AF_INET6, "::1", socket.SOCK_STREAM),
                  listener(socket.AF_INET6, "::1", socket.SOCK_DGRAM)]
        ports.update(tcp6=socks[2].getsockname()[1], dns6=socks[3].getsockname()[1])
    rules = RULES.format(ip6=RULES6.format(**ports) if ipv6 else "", **ports)
    r = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[0]
        raise Failure(f"nft cannot load the redirect rules here (a kernel without "
                      f"nftables NAT?): {why}")
    return ports, socks


def send(ctl: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(ctl, [data], list(fds))
    else:
        ctl.sendall(data)


def receive(ctl: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = ctl.recv(65536)
        if not chunk:
            os._exit(1)  # dumpproxy went away before the command: nothing to run
        data += chunk
    return json.loads(data)


def main() -> None:
    fd = int(sys.argv[1])
    os.set_inheritable(fd, False)  # closed by the exec: dumpproxy's go
    ctl = socket.socket(fileno=fd)
    try:
        ports, socks = setup()
    except Failure as e:
        send(ctl, {"error": str(e)})
        sys.exit(1)
    send(ctl, {"ports": ports}, [s.fileno() for s in socks])
    for s in socks:
        s.close()  # dumpproxy holds them now
    command = receive(ctl)
    argv, env = command["argv"], command["env"]
    # what Python set for itself must not reach the command (as subprocess does)
    for sig in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        send(ctl, {"errno": e.errno})
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
