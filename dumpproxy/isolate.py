"""--isolate: CMD in a network namespace of its own whose only way out is dumpproxy.

`nshelper` makes the namespace and hands over the sockets that live in it: a TCP
listener per address family, served as one more transparent-mode listener (the
namespace's rules redirect every TCP connection to it; the original destination comes
from SO_ORIGINAL_DST, the names from SNI/Host as in transparent mode), and a UDP socket
per family for DNS, answered here. Then the helper becomes CMD.

DNS: A and AAAA are answered with the addresses dumpproxy itself resolves the name to
(getaddrinfo, so /etc/hosts counts as for dumpproxy's own connections, and the
connection the command then makes goes where dumpproxy would go); any other query is
forwarded to the system's nameservers. dnspython reads and writes the messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

from dumpproxy.config import Config
from dumpproxy.modes import Mode, TransparentMode
from dumpproxy.modespec import parse_mode


class IsolationError(Exception):
    """--isolate cannot run here; the message says why, in one line."""


class Namespace:
    """The helper (CMD to be), its control socket and the sockets inside the namespace."""

    def __init__(self, process: asyncio.subprocess.Process, ctl: socket.socket):
        self.process = process
        self.ctl = ctl
        self.listeners: list[socket.socket] = []
        self.dns: list[socket.socket] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.started = False  #: the helper has become CMD

    def modes(self, cfg: Config) -> list[Mode]:
        """A transparent listener per family, on its socket inside the namespace. No
        redirect can bring dumpproxy's own connections back there: the loop guard of
        transparent mode is not needed, and they use the shared direct connector."""
        out = []
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            mode = TransparentMode(parse_mode(f"transparent@{where}"), cfg)
            mode.connector = None
            mode.sock = sock
            out.append(mode)
        return out

    async def serve_dns(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.dns:
            transport, _ = await loop.create_datagram_endpoint(DNSResponder, sock=sock)
            self.transports.append(transport)

    async def run(self, argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        """Exec CMD in the helper; OSError (with the exec's errno) when it cannot run."""
        loop = asyncio.get_running_loop()
        data = json.dumps({"argv": argv, "env": env}).encode() + b"\n"
        await loop.sock_sendall(self.ctl, data)
        answer = await _read_line(self.ctl)
        if answer:
            await self.process.wait()
            err = json.loads(answer).get("errno", 0)
            raise OSError(err, os.strerror(err), argv[0])
        self.ctl.close()
        self.started = True
        return self.process

    def close(self) -> None:
        for t in self.transports:
            t.close()
        for s in self.listeners + self.dns:
            s.close()
        self.ctl.close()
        if not self.started and self.process.returncode is None:
            try:
                self.process.kill()  # still the helper: CMD never ran
            except ProcessLookupError:
                pass


async def _read_line(sock: socket.socket) -> bytes:
    """One JSON line from the helper, or b"" at end of file."""
    loop = asyncio.get_running_loop()
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            return data
        data += chunk
    return data


async def start(stdout: int | None) -> Namespace:
    """Start the helper (CMD's process to be) and take the namespace's sockets from it."""
    if not sys.platform.startswith("linux"):
        raise IsolationError("--isolate needs Linux (network namespaces)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dumpproxy.nshelper", str(theirs.fileno()),
            pass_fds=[theirs.fileno()], stdout=stdout,
            env={**os.environ, "PYTHONSAFEPATH": "1"})
    except OSError as e:
        ours.close()
        raise IsolationError(f"--isolate: cannot start its helper: {e.strerror or e}") from None
    finally:
        theirs.close()
    ours.setblocking(False)
    ns = Namespace(process, ours)
    data, fds = b"", []
    try:
        while not data.endswith(b"\n"):
            msg, got = await _recv_fds(ours)
            fds += got
            if not msg:
                break
            data += msg
    except OSError as e:
        ns.close()
        raise IsolationError(f"--isolate: no answer from its helper: {e.strerror}") from None
    answer = json.loads(data) if data.endswith(b"\n") else {
        "error": "its helper ended without a word"}
    if "error" in answer:
        for fd in fds:
            os.close(fd)
        ns.close()
        await process.wait()
        raise IsolationError(answer["error"] if answer["error"].startswith("--isolate")
                             else f"--isolate: {answer['error']}")
    socks = [socket.socket(fileno=fd) for fd in fds]
    ns.listeners = [s for s in socks if s.type == socket.SOCK_STREAM]
    ns.dns = [s for s in socks if s.type == socket.SOCK_DGRAM]
    for s in socks:
        s.setblocking(False)
    return ns


async def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """What the helper sent next, with the descriptors attached to it."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 8)
            return msg, fds
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


class DNSResponder(asyncio.DatagramProtocol):
    """Answers the namespace's DNS queries (one task per datagram)."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tasks: set[asyncio.Task] = set()

    def datagram_received(self, data: bytes, addr) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr) -> None:
        reply = await answer(data)
        if reply is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


async def answer(data: bytes) -> bytes | None:
    """The reply to one DNS query (wire format), None for what is no query."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype

    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR:
        return None
    reply = dns.message.make_response(query)
    if len(query.question) != 1:
        reply.set_rcode(dns.rcode.FORMERR)
        return reply.to_wire()
    q = query.question[0]
    if q.rdclass == dns.rdataclass.IN and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        await _addresses(reply, q)
        return reply.to_wire()
    forwarded = await _forward(query)
    if forwarded is None:
        reply.set_rcode(dns.rcode.SERVFAIL)
        return reply.to_wire()
    return forwarded


async def _resolve(name: str, family: int) -> list[str] | int:
    """The addresses getaddrinfo gives, or its error number."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return e.errno
    except UnicodeError:
        return socket.EAI_NONAME
    return list(dict.fromkeys(info[4][0] for info in infos))


async def _addresses(reply, q) -> None:
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    family = socket.AF_INET if q.rdtype == dns.rdatatype.A else socket.AF_INET6
    name = q.name.to_text(omit_final_dot=True)
    got = await _resolve(name, family)
    if isinstance(got, list):
        reply.answer.append(dns.rrset.from_text_list(q.name, 60, q.rdclass, q.rdtype, got))
        return
    if got in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
               getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME)):
        # the name may have addresses of the other family only: no data, not no name
        other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
        if not isinstance(await _resolve(name, other), list):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return
    reply.set_rcode(dns.rcode.SERVFAIL)


async def _forward(query) -> bytes | None:
    """The query sent on to the system's nameservers (resolv.conf); their first answer."""
    import dns.asyncquery
    import dns.exception
    import dns.resolver

    try:
        nameservers = dns.resolver.Resolver().nameservers
    except dns.exception.DNSException:
        return None
    for server in nameservers:
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(query, str(server), timeout=3)
        except (dns.exception.DNSException, OSError):
            continue
        return response.to_wire()
    return None
