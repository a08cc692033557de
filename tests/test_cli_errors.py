"""User mistakes and startup failures: one line on stderr naming the culprit and, where
there is one, the fix; exit 2 for a mistake, 1 for a runtime failure; never a traceback.
The ten common mistakes of issue 15, a CA directory an unprivileged user cannot write,
and wrap mode's note about NO_PROXY."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, isolated_resolver, run_cli

PREFIX = "dumpproxy: error: "


def one_line(r, status: int) -> str:
    err = r.stderr.decode()
    assert r.returncode == status, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(PREFIX), err
    assert r.stdout == b"", r.stdout
    return lines[0][len(PREFIX):]


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# (name, arguments, exit status, pieces the line must contain: the culprit and the fix)
MISTAKES = [
    ("unknown option", ["--frobnicate"],
     2, ["'--frobnicate'", "dumpproxy --help"]),
    ("typo", ["--ignroe-hosts", "x"],
     2, ["'--ignroe-hosts'", "did you mean --ignore-hosts?"]),
    ("missing value", ["--ignore-hosts"],
     2, ["--ignore-hosts", "missing value", "--ignore-hosts REGEX"]),
    ("bad port", ["-p", "99999"],
     2, ["--listen-port", "'99999'", "0-65535"]),
    ("bad regex", ["--ignore-hosts", "foo("],
     2, ["--ignore-hosts", "'foo('", "missing )"]),
    ("missing file", ["--ignore-hosts-file", "no-such-file.txt"],
     2, ["no-such-file.txt", "No such file"]),
    ("empty file name", ["--ignore-hosts-file="],
     2, ["--ignore-hosts-file", "empty file name", "- for standard input"]),
    ("forgotten --", ["curl", "-s", "http://example.com/"],
     2, ["'curl'", "put '--' before it", "dumpproxy [OPTIONS] -- curl -s http://example.com/"]),
    ("subcommand after options", ["-p", "9000", "har", "traffic.jsonl"],
     2, ["'har'", "subcommand and comes first", "dumpproxy har traffic.jsonl"]),
    ("conflicting options, --check with --mode", ["--check", "a:443", "--mode", "bogus"],
     2, ["--check", "--mode"]),
    ("conflicting options, --check with a command", ["--check", "a:443", "--", "true"],
     2, ["--check", "-- true"]),
]


@pytest.mark.parametrize("name, args, status, pieces", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_common_mistakes(name, args, status, pieces, home):
    line = one_line(run_cli(*args, home=home), status)
    for piece in pieces:
        assert piece in line, f"{name}: {piece!r} not in {line!r}"


def test_misplaced_har_is_not_told_to_run_as_a_command(home):
    """`-- har FILE` would look for a program called har."""
    line = one_line(run_cli("-p", "9000", "har", "traffic.jsonl", home=home), 2)
    assert " -- " not in line, line
    assert line.endswith(": dumpproxy har traffic.jsonl"), line


def test_port_in_use(occupied_port, home):
    line = one_line(run_cli("-p", str(occupied_port), home=home), 1)
    assert line == f"cannot listen on 127.0.0.1:{occupied_port}: address already in use"


@pytest.mark.parametrize("args, where", [
    (["--listen-host", "nosuch.invalid"], "nosuch.invalid:0"),
    (["--mode", "regular@nosuch.invalid:0", "--mode", "socks5@0"],
     "nosuch.invalid:0 (--mode regular)"),
])
def test_unresolvable_listen_host(args, where, home, tmp_path):
    """Not `unknown error -2` (getaddrinfo's EAI_NONAME read as an errno). The name is
    looked up with a private resolver (nothing leaves the machine; any name fails)."""
    cmd = isolated_resolver([sys.executable, "-m", "dumpproxy", "-p", "0", *args], {}, tmp_path)
    r = subprocess.run(cmd, capture_output=True, timeout=30, cwd=ROOT,
                       env=dict(os.environ, DUMPPROXY_HOME=str(home)))
    line = one_line(r, 1)
    # no DNS server answers the private resolver: EAI_AGAIN (a real lookup: EAI_NONAME)
    assert line == (f"cannot listen on {where}: the host name does not resolve (temporary "
                    "failure in name resolution); give an address (127.0.0.1, ::1, 0.0.0.0) "
                    "or a name that resolves")


@pytest.mark.parametrize("option", ["--allow-hosts-file", "--output", "--ca-dir",
                                    "--upstream-ca"])
def test_empty_file_names_are_named(option, home):
    line = one_line(run_cli(f"{option}=", home=home), 2)
    assert line.startswith(f"{option}: empty file name"), line


@pytest.mark.parametrize("args", [
    ["--pattern-for", "a:1", "--", "true"],
    ["--print-ca", "--", "true"],
    ["--completions", "bash", "--check", "a:1"],
    ["--pattern-for", "a:1", "--mode", "socks5"],
])
def test_print_and_exit_options_do_not_combine(args, home):
    line = one_line(run_cli(*args, home=home), 2)
    assert "cannot be combined" in line, line


def test_unknown_mode_suggests(home):
    line = one_line(run_cli("--mode", "sock5", home=home), 2)
    assert "did you mean socks5?" in line, line


def test_a_typo_with_its_value_attached(home):
    line = one_line(run_cli("--frmat=text", home=home), 2)
    assert line == "unrecognized option '--frmat'; did you mean --format?"


def test_nothing_after_double_dash(home):
    line = one_line(run_cli("--", home=home), 2)
    assert "nothing to run after '--'" in line


# --------------------------------------------------------------------------- the CA as nobody

NOBODY = 65534


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run dumpproxy's main() in a forked child that has become uid/gid 65534 (the
    interpreter's own files may be unreadable to that user, so nothing is exec'd and
    everything is imported first). Returns (exit status, stderr)."""
    import dumpproxy.cli as cli

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            # pytest has replaced sys.stdout/stderr with its capture: the real ones again
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            status = cli.main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    out = b""
    while chunk := os.read(read_end, 65536):
        out += chunk
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), out.decode()


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory owned by root that everyone may enter but only root may write (pytest's
    own temporary directories are private to root)."""
    assert os.geteuid() == 0, "these tests need root, as CI runs them (to become nobody)"
    d = Path(tempfile.mkdtemp(prefix="dumpproxy-root-ca-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        d.rmdir()


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tmp_path_factory):
    """Make a CA once in this process, so every lazily imported module is loaded before a
    child gives up root (as nobody it could not read the interpreter's library)."""
    from dumpproxy.certs import load_or_create_ca

    load_or_create_ca(str(tmp_path_factory.mktemp("warm")))


def one_error_line(status: int, err: str, expected_status: int = 1) -> str:
    assert status == expected_status, (status, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0][len(PREFIX):]


def test_ca_dir_not_writable(root_dir):
    status, err = as_nobody(["--ca-dir", str(root_dir), "--print-ca"])
    line = one_error_line(status, err)
    assert line.startswith(f"{root_dir}: cannot write the CA there: Permission denied"), line
    assert "--ca-dir" in line and "a directory you own" in line
    assert list(root_dir.iterdir()) == []


def test_ca_dir_cannot_be_created(root_dir):
    target = root_dir / "sub" / "ca"
    status, err = as_nobody(["--ca-dir", str(target), "--print-ca"])
    line = one_error_line(status, err)
    assert line.startswith(f"{target}: cannot create CA directory: Permission denied"), line
    assert "--ca-dir" in line


def test_ca_readable_by_others_and_not_ours(root_dir, home):
    r = run_cli("--ca-dir", str(root_dir), "--print-ca", home=home)  # root makes the CA
    assert r.returncode == 0, r.stderr
    ca = root_dir / "ca.pem"
    ca.chmod(0o644)  # group/other-readable, owned by root
    status, err = as_nobody(["--ca-dir", str(root_dir), "--print-ca"])
    line = one_error_line(status, err)
    assert line.startswith(f"{ca}: the CA key is readable by others and cannot be made "
                           f"private (Operation not permitted)"), line
    assert f"chmod 600 {ca}" in line
    assert stat.S_IMODE(ca.stat().st_mode) == 0o644


def test_ca_not_readable(root_dir, home):
    r = run_cli("--ca-dir", str(root_dir), "--print-ca", home=home)
    assert r.returncode == 0, r.stderr
    status, err = as_nobody(["--ca-dir", str(root_dir), "--print-ca"])
    line = one_error_line(status, err)
    assert line.startswith(f"{root_dir / 'ca.pem'}: cannot read CA: Permission denied"), line
    assert "--ca-dir" in line


def test_ca_cert_file_cannot_be_written(root_dir, home):
    """ca.pem is nobody's own but the directory is not: ca-cert.pem cannot be refreshed."""
    r = run_cli("--ca-dir", str(root_dir), "--print-ca", home=home)
    assert r.returncode == 0, r.stderr
    (root_dir / "ca-cert.pem").unlink()
    os.chown(root_dir / "ca.pem", NOBODY, NOBODY)
    status, err = as_nobody(["--ca-dir", str(root_dir), "--print-ca"])
    line = one_error_line(status, err)
    assert line.startswith(f"{root_dir}: cannot write the CA there: Permission denied"), line


# --------------------------------------------------------------------------- NO_PROXY


def test_wrap_mode_says_when_no_proxy_exempts_hosts(home):
    r = run_cli("--", sys.executable, "-c", "pass", home=home,
                env={"NO_PROXY": "127.0.0.1", "no_proxy": None})
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert ("dumpproxy: note: NO_PROXY=127.0.0.1 is set: the command will not use the proxy "
            "for those hosts (unset NO_PROXY no_proxy to record them)") in err.splitlines()
    r = run_cli("--", sys.executable, "-c", "pass", home=home,
                env={"NO_PROXY": None, "no_proxy": None})
    assert r.returncode == 0 and b"NO_PROXY" not in r.stderr, r.stderr
