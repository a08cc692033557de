"""Shared helper: the examples of the README and the man page, and running them.

One marker convention for both documents: a comment on the line right before a code
block names the example, and a test called `test_example_<name>` (hyphens as
underscores) runs it.

    README.md:          <!-- test: NAME -->       before a ``` fence
    man/dumpproxy.1:    .\\" test: NAME            before .EX

Every code block in both documents carries a marker (test_examples.py checks), and a
name used in both documents is one example: its text is the same in both.

Examples that talk to hosts by name (example.com, port 8080, the system CA file) run in
a sandbox: a private network namespace (its own loopback, so port 8080 and 443 are free)
and mount namespace (its own /etc/hosts, resolv.conf pointing at 127.0.0.1, and a system
CA file that also holds the test origins' CA), with an origin server for example.com and
friends on 127.0.0.1:80 and :443 inside it. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
README = ROOT / "README.md"
MAN = ROOT / "man" / "dumpproxy.1"

README_MARKED = re.compile(r"^<!-- test: ([\w-]+) -->\n```(\w*)\n(.*?)^```\n", re.S | re.M)
README_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MAN_MARKER = re.compile(r'^\.\\" test: ([\w-]+)$')

SANDBOX_HOSTS = ("example.com", "www.example.com", "api.example.com", "example.org")
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass
class Example:
    name: str
    text: str  # as a reader copies it: plain text, roff escapes resolved


# --------------------------------------------------------------------------- reading


def readme_examples() -> dict[str, Example]:
    out: dict[str, Example] = {}
    for name, _lang, body in README_MARKED.findall(README.read_text(encoding="utf-8")):
        assert name not in out, f"README: two blocks marked {name!r}"
        out[name] = Example(name, body)
    return out


def readme_unmarked_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    marked = len(README_MARKED.findall(text))
    blocks = README_FENCE.findall(text)
    problems = []
    if len(blocks) != marked:
        problems.append(f"README: {len(blocks) - marked} code blocks without a marker")
    if text.count("<!-- test: ") != marked:
        problems.append("README: a marker not right before a code block")
    return problems


def roff_text(line: str) -> str:
    """A line of an .EX block as printed: escapes resolved (what a reader copies)."""
    line = re.sub(r"\\f(?:\[[^]]*\]|\(..|.)", "", line)
    line = line.replace("\\(aq", "'").replace("\\(dq", '"').replace("\\-", "-")
    return line.replace("\\&", "").replace("\\e", "\\")


def man_examples() -> dict[str, Example]:
    out: dict[str, Example] = {}
    lines = MAN.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = MAN_MARKER.match(line)
        if not m:
            continue
        name = m.group(1)
        assert lines[i + 1] == ".EX", f"man page: marker {name!r} not right before .EX"
        end = lines.index(".EE", i + 2)
        assert name not in out, f"man page: two blocks marked {name!r}"
        out[name] = Example(name, "".join(roff_text(x) + "\n" for x in lines[i + 2 : end]))
    return out


def man_unmarked_blocks() -> list[str]:
    lines = MAN.read_text(encoding="utf-8").splitlines()
    return [f"man page line {i + 1}: .EX without a test marker before it"
            for i, line in enumerate(lines)
            if line == ".EX" and not (i and MAN_MARKER.match(lines[i - 1]))]


def example(name: str) -> Example:
    """The example called name, from whichever document has it (the same text in both)."""
    found = [d[name] for d in (readme_examples(), man_examples()) if name in d]
    assert found, f"no example marked {name!r}"
    assert all(e.text == found[0].text for e in found), f"{name}: README and man page differ"
    return found[0]


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        current += line
        # a trailing comment is not part of the command
        commands.append(re.sub(r"\s+#\s.*$", "", current).strip())
        current = ""
    assert not current, "block ends in a continuation line"
    return commands


# --------------------------------------------------------------------------- running


def make_bin_dir(directory: Path) -> Path:
    """A directory with a `dumpproxy` that runs this checkout with this interpreter.
    With DUMPPROXY_PIDS set, each run appends its pid there (so a test can signal the
    proxy of a pipeline, and only it)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "dumpproxy"
    shim.write_text(
        "#!/bin/sh\n"
        '[ -n "$DUMPPROXY_PIDS" ] && echo $$ >> "$DUMPPROXY_PIDS"\n'
        f"PYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} "
        '-m dumpproxy "$@"\n'
    )
    shim.chmod(0o755)
    return directory


def clean_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """No proxy or CA settings from outside; `dumpproxy` on PATH is this checkout's."""
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and not re.search(r"CA_|CERT|CAINFO", k)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["DUMPPROXY_HOME"] = str(tmp_path / "home")
    env.update(extra)
    return env


def run_bash(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60
             ) -> subprocess.CompletedProcess:
    """bash in its own process group, removed whole when bash exits: a background dumpproxy
    the script left running (a broken recipe) neither outlives the test nor keeps it
    waiting. Output goes through files, which a leftover process cannot hold open."""
    out_path, err_path = cwd / ".bash-stdout", cwd / ".bash-stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(["bash", *args], cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    if proc.returncode is None:
        proc.wait()
        raise AssertionError(f"bash timed out\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# Bash functions every sandbox driver may use. Waits poll with a deadline.
DRIVER_LIB = r"""
wait_until() {  # wait_until SECONDS COMMAND...: poll COMMAND until it succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        if ((SECONDS >= deadline)); then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.05
    done
}
listening() { ss -Hltn "sport = :$1" | grep -q .; }
proxy_pid() { head -n 1 "$DUMPPROXY_PIDS"; }  # the first dumpproxy started
"""

SANDBOX_SETUP = r"""
set -eu
ip link set lo up
mount --bind "$SANDBOX/hosts" /etc/hosts
mount --bind "$SANDBOX/resolv.conf" /etc/resolv.conf
mount --bind "$SANDBOX/system-ca.pem" "$SYSTEM_CA_FILE"
python3 "$TESTS/example_origin.py" "$SANDBOX" 2> "$SANDBOX/origin.err" &
origin=$!
deadline=$((SECONDS + 20))
until [ -e "$SANDBOX/origin-ready" ]; do
    kill -0 "$origin" 2>/dev/null || { cat "$SANDBOX/origin.err" >&2; exit 97; }
    ((SECONDS < deadline)) || { echo "origin did not start" >&2; exit 98; }
    sleep 0.05
done
cd "$WORK"
set +e
bash -eu -o pipefail "$SANDBOX/driver.sh"
status=$?
kill "$origin"
exit "$status"
"""


def make_sandbox(tmp_path: Path, pki) -> Path:
    """Files for a sandbox: hosts, resolv.conf, a system CA file that also trusts the test
    origins' CA, and the origin's certificate for the sandbox's host names."""
    box = tmp_path / "sandbox"
    box.mkdir(parents=True)
    (box / "hosts").write_text("127.0.0.1 localhost " + " ".join(SANDBOX_HOSTS)
                               + "\n::1 localhost ip6-localhost\n")
    (box / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    system = Path(SYSTEM_CA_FILE).read_bytes().rstrip(b"\n") + b"\n"
    (box / "system-ca.pem").write_bytes(system + pki.ca_path.read_bytes())
    cert, key = pki.leaf(list(SANDBOX_HOSTS))
    (box / "origin-cert.pem").write_bytes(cert.read_bytes())
    (box / "origin-key.pem").write_bytes(key.read_bytes())
    return box


def run_in_sandbox(tmp_path: Path, pki, driver: str, files: dict[str, str] | None = None,
                   timeout: float = 90) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the bash `driver` (with DRIVER_LIB's functions) in a fresh sandbox, in a work
    directory holding `files`. Returns bash's result and the work directory."""
    box = make_sandbox(tmp_path, pki)
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    for name, text in (files or {}).items():
        path = work / name
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)
    (box / "driver.sh").write_text(DRIVER_LIB + driver)
    (box / "setup.sh").write_text(SANDBOX_SETUP)
    bin_dir = make_bin_dir(tmp_path / "bin")
    env = clean_env(tmp_path, bin_dir, SANDBOX=str(box), TESTS=str(TESTS), WORK=str(work),
                    SYSTEM_CA_FILE=SYSTEM_CA_FILE, HOME=str(work / "home"),
                    DUMPPROXY_PIDS=str(box / "pids"))
    del env["DUMPPROXY_HOME"]  # the default CA directory, under HOME
    env.pop("XDG_CONFIG_HOME", None)
    r = run_bash(["-c", 'exec unshare -n -m bash "$SANDBOX/setup.sh"'], cwd=tmp_path,
                 env=env, timeout=timeout)
    return r, work
