"""The test harness's own servers: closing one ends its accept loop first.

Why (the cause of test_rotate's failures in full runs): a helper origin closed its
listening socket while its thread sat in accept(). The thread stayed blocked on the old
socket; when the kernel restarted the call (a signal handled with SA_RESTART, ptrace, a
cgroup freeze and thaw), it ran on the descriptor number, by then reused by a later
test's origin, and took one of that origin's connections: the helper answered it its own
way (a TLS handshake on plain HTTP, then a close with the request unread: a reset), the
proxy gave its client a 502, and the real origin's accept loop, woken for a connection
that was gone, blocked its teardown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT, Origin, close_listener
from test_hardening import CountingH2Origin
from test_http1 import RawOrigin


def blocked_in_accept() -> tuple[socket.socket, threading.Thread, list[object]]:
    srv = socket.create_server(("127.0.0.1", 0))
    taken: list[object] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError as e:
                taken.append(e)
                return
            taken.append(conn.getsockname())
            conn.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    time.sleep(0.1)  # in accept()
    return srv, t, taken


def restart_signal() -> signal.Handlers:
    """SIGUSR1, handled with SA_RESTART (as asyncio's add_signal_handler and glibc's
    set*id broadcast do): a blocking call it interrupts is restarted by the kernel."""
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.siginterrupt(signal.SIGUSR1, False)
    return old


def test_the_cause_a_thread_left_in_accept_takes_a_later_sockets_connection():
    """The failure itself, without the proxy: the listener closed under its accept loop,
    its number reused by a later (blocking) listener, the blocked call restarted: the old
    loop accepts the new listener's connection."""
    srv, t, taken = blocked_in_accept()
    fd = srv.fileno()
    srv.close()  # what the helpers did
    later = socket.create_server(("127.0.0.1", 0))
    port = later.getsockname()[1]
    old = restart_signal()
    try:
        assert later.fileno() == fd
        signal.pthread_kill(t.ident, signal.SIGUSR1)
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            t.join(5)  # it took the connection, closed it, then failed on its own socket
        assert taken[0] == ("127.0.0.1", port), taken
    finally:
        signal.signal(signal.SIGUSR1, old)
        later.close()


def test_origins_do_not_block_on_a_vanished_connection():
    """Origin's listener has a timeout, so its descriptor is non-blocking: its accept loop
    goes on past a connection that is gone by the time it accepts, and a call restarted
    on its number by a stray thread fails at once instead of taking connections."""
    srv, t, taken = blocked_in_accept()
    fd = srv.fileno()
    srv.close()
    o = Origin()
    old = restart_signal()
    try:
        assert o.server.socket.fileno() == fd and not os.get_blocking(fd)  # O_NONBLOCK
        signal.pthread_kill(t.ident, signal.SIGUSR1)
        t.join(5)
        assert isinstance(taken[0], BlockingIOError), taken
        s = socket.create_connection(("127.0.0.1", o.port), timeout=5)
        s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200 ")
        s.close()
    finally:
        signal.signal(signal.SIGUSR1, old)
        o.close()


def test_close_listener_ends_the_accept_loop_before_the_number_is_reused():
    srv, t, taken = blocked_in_accept()
    fd = srv.fileno()
    close_listener(srv, t)
    assert not t.is_alive()
    (err,) = taken
    assert isinstance(err, OSError)  # woken by shutdown(), not by a connection
    o = Origin()  # the number goes to the next socket, and only that socket accepts on it
    try:
        assert o.server.socket.fileno() == fd
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", o.port), timeout=5)
            s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")
            s.close()
    finally:
        o.close()
    assert len(taken) == 1


def test_helper_origins_leave_no_thread_in_accept(pki):
    for helper in (CountingH2Origin(pki), RawOrigin(b"HTTP/1.1 200 OK\r\n\r\n", reset=True)):
        thread = helper.thread
        assert thread.is_alive()  # waiting for a connection that never comes
        helper.close()
        assert not thread.is_alive(), type(helper).__name__


def test_the_suite_summary_counts_what_every_worker_checked():
    """The schema and record checks run in each pytest-xdist worker; the summary line is
    the controller's: it adds up what the workers checked, the same as one process."""
    modules = ["tests/test_modes_socks5.py", "tests/test_modes_upstream.py"]
    summaries = []
    for workers in ("2", "0"):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-n", workers, *modules], cwd=ROOT, capture_output=True,
                           text=True, timeout=110)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        summaries.append(re.findall(r"^(?:event schema|record invariant): .*$", r.stdout,
                                    re.M))
    assert summaries[0] == summaries[1] and len(summaries[0]) == 2, summaries
    validated = int(re.search(r"(\d+) event lines validated", summaries[0][0]).group(1))
    flows = int(re.search(r"(\d+) flows checked", summaries[0][1]).group(1))
    assert validated > 0 and flows > 0, summaries
