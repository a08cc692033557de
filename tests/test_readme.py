"""The README's code runs: the CI traffic-capture recipe (bash, in a temp dir, against a
local HTTPS origin), every jq cookbook line (against a traffic.jsonl that dumpproxy
captured), the install and development commands, and the test command CI runs.

Blocks are marked with an HTML comment on the line before the fence,
`<!-- test: NAME -->`, and run by `test_example_NAME` (examples.py has the convention,
shared with the man page; test_examples.py runs the other examples).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, Origin, curl, parse_events
from examples import (
    README,
    clean_env,
    example,
    make_bin_dir,
    readme_examples,
    run_bash,
    shell_commands,
)

CI_RUN = ROOT / ".ci" / "run"
CI_BLOCK = ROOT / ".ci" / "readme-block"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
TEST_COMMAND = "python3 -m pytest -q"


def marked_blocks() -> dict[str, str]:
    return {name: ex.text for name, ex in readme_examples().items()}


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    return make_bin_dir(tmp_path / "bin")


# --- the marked blocks exist ----------------------------------------------------------------


def test_marked_blocks_exist_and_are_shell():
    text = README.read_text()
    found = {name for name, _, _ in re.findall(
        r"^<!-- test: ([\w-]+) -->\n```(\w*)\n(.*?)^```\n", text, re.S | re.M)}
    assert {"ci-capture", "jq-cookbook", "install", "tests", "development", "clickhouse",
            "har"} <= found
    # the recipe sits under its own heading
    head, _, _ = text.partition("<!-- test: ci-capture -->")
    assert head.rstrip().rpartition("\n## ")[2].startswith("CI traffic capture")


# --- the CI recipe ----------------------------------------------------------------------------


def test_example_ci_capture(tmp_path, bin_dir, tls_origin, pki):
    """bash runs the README block verbatim. The test provides ORIGIN_URL (the suite's
    target, a local HTTPS origin) and, as the machine's trust store for dumpproxy's own
    upstream connections, SSL_CERT_FILE = the origin's CA (OpenSSL's own override)."""
    recipe = example("ci-capture").text  # the man page's EXAMPLES has the same text
    work = tmp_path / "ci"
    work.mkdir()
    (work / "traffic.jsonl").write_text('{"event":"stale"}\n')  # from an earlier run
    script = work / "recipe.sh"
    script.write_text(recipe)
    origin_url = f"https://localhost:{tls_origin.port}"
    env = clean_env(tmp_path, bin_dir, ORIGIN_URL=origin_url, SSL_CERT_FILE=str(pki.ca_path))
    r = run_bash(["-eu", "-o", "pipefail", str(script)], cwd=work, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr

    # the summary
    out = r.stdout
    hosts, _, statuses = out.partition("status counts:\n")
    assert hosts.startswith("hosts contacted:\n"), out
    # one connection: the second request took the first's from the pool
    assert re.fullmatch(rf"hosts contacted:\n\s+1 localhost:{tls_origin.port}\n", hosts), out
    assert re.fullmatch(r"\s+1 200\n\s+1 404\n", statuses), out

    # the artifact: a fresh capture, complete, with the suite's two exchanges
    events = parse_events((work / "traffic.jsonl").read_text())
    kinds = [e["event"] for e in events]
    assert kinds[0] == "listening" and kinds[-1] == "shutdown", kinds
    assert kinds.count("listening") == 1 and "stale" not in kinds
    assert events[-1]["reason"] == "SIGTERM"
    assert [(e["url"], e["status"]) for e in events if e["event"] == "response"] == [
        (f"{origin_url}/small", 200), (f"{origin_url}/missing", 404)]
    assert not [e for e in events if e["event"] == "error"]
    assert [(m, p) for m, p, _ in tls_origin.requests] == [("GET", "/small"),
                                                           ("GET", "/missing")]
    # the bundle the clients trusted: system CAs plus dumpproxy's CA
    bundle = (work / "ca-bundle.pem").read_bytes()
    ca = Path(events[0]["ca_cert"]).read_bytes()
    assert ca.strip() in bundle
    assert bundle.count(b"BEGIN CERTIFICATE") > 10


def test_ci_capture_recipe_keeps_a_request_in_flight_at_kill(tmp_path, bin_dir, tls_origin,
                                                             pki):
    """The recipe with a slow download still running in the background at `kill -TERM`
    (a suite whose job left a request open): the client gets its whole response, and the
    capture has it, within the default grace period."""
    recipe = marked_blocks()["ci-capture"]
    slow = ('curl -sS -o slow.out "$ORIGIN_URL/slow?n=10" &\nslow_pid=$!\n'
            'until grep -q "/slow" traffic.jsonl; do sleep 0.05; done\n')
    marker = 'kill -TERM "$proxy_pid"'
    assert marker in recipe
    recipe = recipe.replace(marker, slow + marker, 1) + 'wait "$slow_pid"\n'
    work = tmp_path / "ci"
    work.mkdir()
    (work / "recipe.sh").write_text(recipe)
    origin_url = f"https://localhost:{tls_origin.port}"
    env = clean_env(tmp_path, bin_dir, ORIGIN_URL=origin_url, SSL_CERT_FILE=str(pki.ca_path))
    r = run_bash(["-eu", "-o", "pipefail", "recipe.sh"], cwd=work, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert (work / "slow.out").read_bytes() == b"x" * 10  # 2 s of it, after the TERM
    events = parse_events((work / "traffic.jsonl").read_text())
    assert events[-1]["event"] == "shutdown" and events[-1]["reason"] == "SIGTERM"
    [slow_resp] = [e for e in events if e["event"] == "response" and "/slow" in e["url"]]
    assert (slow_resp["status"], slow_resp["response_bytes"]) == (200, 10)
    assert "aborted" not in slow_resp
    assert re.fullmatch(r"\s+2 200\n\s+1 404\n", r.stdout.partition("status counts:\n")[2])
    assert not [e for e in events if e["event"] == "error"]


def test_ci_capture_recipe_fails_when_proxy_cannot_start(tmp_path, bin_dir):
    """The wait loop does not spin forever when dumpproxy dies at startup."""
    recipe = marked_blocks()["ci-capture"]
    work = tmp_path / "ci"
    work.mkdir()
    (work / "recipe.sh").write_text(recipe)
    home = tmp_path / "home"
    home.write_text("not a directory")  # the CA cannot be created: exit 1 at startup
    env = clean_env(tmp_path, bin_dir, ORIGIN_URL="https://localhost:9")
    t0 = time.monotonic()
    r = run_bash(["-eu", "-o", "pipefail", "recipe.sh"], cwd=work, env=env, timeout=30)
    assert r.returncode != 0
    assert "dumpproxy: error:" in r.stderr
    assert time.monotonic() - t0 < 15


# --- the jq cookbook ----------------------------------------------------------------------------


def capture_traffic(tmp_path: Path, bin_dir: Path, origin, tls_origin, other, pki) -> Path:
    """A real traffic.jsonl: intercepted HTTPS (200, 404), plain HTTP, a passthrough tunnel
    decided by --ignore-hosts, and a connection error."""
    out = tmp_path / "traffic.jsonl"
    ignore = rf"^127\.0\.0\.1:{other.port}$"
    env = clean_env(tmp_path, bin_dir)
    proc = subprocess.Popen(
        ["dumpproxy", "-p", "0", "-q", "-o", str(out), "--upstream-ca", str(pki.ca_path),
         "--ignore-hosts", ignore], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not (out.exists() and out.read_text().endswith("\n")):
            assert proc.poll() is None and time.monotonic() < deadline, "no listening line"
            time.sleep(0.05)
        proxy = "http://" + json.loads(out.read_text().splitlines()[0])["address"]
        ca = tmp_path / "home" / "ca-cert.pem"
        for args in (
            ["--cacert", str(ca), tls_origin.url("/small", host="localhost")],
            ["--cacert", str(ca), tls_origin.url("/status/404", host="localhost")],
            [origin.url("/small")],
            ["--cacert", str(pki.ca_path), other.url("/small")],
        ):
            r = curl("-x", proxy, *args)
            assert r.returncode == 0, r.stderr
        closed = Origin()  # a port with nothing listening: a server_connect error
        port = closed.port
        closed.close()
        r = curl("-x", proxy, "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{port}/")
        assert r.stdout == b"502", (r.stdout, r.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
    return out


def test_example_jq_cookbook(tmp_path, bin_dir, origin, tls_origin, pki):
    other = Origin(pki.server_context(["127.0.0.1"]))
    try:
        traffic = capture_traffic(tmp_path, bin_dir, origin, tls_origin, other, pki)
    finally:
        other.close()
    events = parse_events(traffic.read_text())
    assert events[-1]["event"] == "shutdown"

    block = marked_blocks()["jq-cookbook"]
    commands = shell_commands(block)
    comments = [line for line in block.splitlines() if line.startswith("#")]
    assert len(commands) == len(comments) >= 6, "each cookbook line has its comment"
    tls = f"localhost:{tls_origin.port}"
    plain = f"127.0.0.1:{origin.port}"
    passed = f"127.0.0.1:{other.port}"
    checks = {
        "every response": lambda out: (  # the 502 of the unreachable origin is one too
            len(out) == 4 and {json.loads(x)[0] for x in out} == {200, 404, 502}
            and all(json.loads(x)[1] == "GET" for x in out)),
        "hosts contacted": lambda out: (
            f"{tls} 127.0.0.1:{tls_origin.port}" in out and f"{plain} {plain}" in out
            and f"{passed} {passed}" in out),
        "status counts": lambda out: (
            sorted(x.split() for x in out) == [["1", "404"], ["1", "502"], ["2", "200"]]),
        "slowest": lambda out: (
            1 <= len(out) <= 5 and all(isinstance(json.loads(x)[0], (int, float))
                                       for x in out)),
        "passed through": lambda out: (
            out == [json.dumps([passed, rf"^127\.0\.0\.1:{other.port}$", "--ignore-hosts"],
                               separators=(",", ":"))]),
        "errors": lambda out: (
            len(out) >= 1 and all(json.loads(x)[0] == "server_connect" for x in out)),
    }
    used = set()
    for comment, command in zip(comments, commands, strict=True):
        assert command.startswith("jq ") and "traffic.jsonl" in command, command
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{command}\n{r.stderr}"
        assert r.stderr == "", f"{command}\n{r.stderr}"
        out = r.stdout.splitlines()
        assert out and all(line.strip() for line in out), f"{command}: no output"
        assert "null" not in r.stdout, f"{command}:\n{r.stdout}"
        for key, check in checks.items():
            if key in comment:
                used.add(key)
                assert check(out), f"{comment}\n{command}\n{r.stdout}"
    assert used == set(checks), f"cookbook lines without their check: {set(checks) - used}"


# --- first screen and CI ------------------------------------------------------------------------


def install_commands() -> list[str]:
    return shell_commands(marked_blocks()["install"])


def readme_tests_commands() -> list[str]:
    return shell_commands(marked_blocks()["tests"])


def test_example_install():
    # a venv: Debian's and Ubuntu's Python refuse system-wide pip, and a regular (not
    # editable) install puts the man page where `man dumpproxy` finds it (the venv's bin
    # on PATH). One command a line: CI runs the block with `bash -e`, which would not stop
    # at a failure inside an && list; and no proxy left running in the foreground.
    assert install_commands() == ["python3 -m venv .venv", ". .venv/bin/activate",
                                  "pip install .", "dumpproxy --version"]
    assert not [c for c in install_commands() if "&&" in c]
    # the install block is the first thing in the README, the tests block right after
    text = README.read_text()
    assert text.index("<!-- test: install -->") < text.index("<!-- test: tests -->") < \
        text.index("\n## ")


def test_example_tests():
    """The tests block: what the tests need, then the README's test command (CI runs it)."""
    commands = readme_tests_commands()
    assert commands[0] == "apt-get update"
    assert commands[1].startswith("apt-get install -y ")
    # npm only where Node.js does not bring its own (Debian's npm conflicts with it)
    assert commands[2:] == ["command -v npm >/dev/null || apt-get install -y npm",
                            "python3 -m venv .venv", ". .venv/bin/activate",
                            "pip install '.[test]'", "npm install --prefix tests/clients",
                            TEST_COMMAND]
    assert not [c for c in commands if "&&" in c]
    # what they name exists: the package with its console script and test extra, the
    # packages the tests use
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dumpproxy = "dumpproxy.cli:main"' in pyproject
    assert re.search(r"^test = \[", pyproject, re.M)
    packages = set(commands[1].split()[3:])
    assert {"curl", "jq", "util-linux", "python3-venv", "nginx", "chromium", "libnss3-tools",
            "wget", "git", "clickhouse-server", "logrotate", "tinyproxy", "nftables"} <= packages


def test_the_readme_venv_is_ignored_by_git():
    """The README creates .venv in the checkout: `git status` stays clean."""
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "python3 -m venv .venv" in install_commands()


# --- CI: the README's blocks, verbatim ---------------------------------------------------


def readme_block(name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CI_BLOCK), name], capture_output=True, text=True,
                          cwd="/", timeout=30)


def test_ci_extracts_every_marked_block_as_the_readme_has_it():
    """.ci/readme-block (what CI runs) gives each block's exact text, as the tests read
    it; an unknown name is an error, not an empty script."""
    blocks = marked_blocks()
    assert {"install", "tests"} <= set(blocks)
    for name, text in blocks.items():
        r = readme_block(name)
        assert (r.returncode, r.stdout) == (0, text), name
    r = readme_block("no-such-block")
    assert r.returncode != 0 and r.stdout == ""


def test_example_h11_tests():
    """The Development section's second parser run, which CI runs in the tests block's
    venv: the HTTP/1 modules, with h11 forced."""
    (command,) = shell_commands(marked_blocks()["h11-tests"])
    env, _, rest = command.partition(" ")
    assert env == "DUMPPROXY_HTTP1_PARSER=h11" and rest.startswith(TEST_COMMAND + " ")
    modules = rest.removeprefix(TEST_COMMAND + " ").split()
    assert "tests/test_http1.py" in modules
    assert all((ROOT / m).is_file() for m in modules), modules


def test_ci_runs_the_readme_blocks_and_no_command_of_its_own():
    """CI runs the install block, then the test block, in one shell (`bash -e`), in a
    fresh clone, once per interpreter: its only test command is the README's. The scope
    of the second interpreter's run names test modules that exist."""
    ci = CI_RUN.read_text()
    code = [line.strip() for line in ci.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert 'readme=$(.ci/readme-block install)$\'\\n\'$(.ci/readme-block tests)' in code
    assert any('bash -e -o pipefail -c "$readme"' in line for line in code)
    assert "h11=$(.ci/readme-block h11-tests)" in code
    assert any('bash -e -o pipefail -c "$h11"' in line for line in code)
    assert any(line.startswith("git clone ") for line in code)
    assert not [line for line in code if "pytest" in line and "PYTEST_ADDOPTS" not in line]
    assert not [line for line in code if re.search(r"\b(pip|apt-get|npm) ", line)]
    assert readme_tests_commands()[-1] == TEST_COMMAND
    scope = re.search(r'DEBIAN_SCOPE="(.*?)"', ci, re.S)
    assert scope, "no DEBIAN_SCOPE in .ci/run"
    modules = scope.group(1).split()
    assert modules and all((ROOT / m).is_file() for m in modules), modules


def test_example_development():
    commands = shell_commands(marked_blocks()["development"])
    # a venv first (PEP 668: Debian's python3 refuses pip outside one), the same as the
    # install section's, then the editable install into it
    assert commands[:3] == ["python3 -m venv .venv", ". .venv/bin/activate",
                            "pip install -e '.[test]'"]
    assert install_commands()[:2] == commands[:2]
    assert TEST_COMMAND in commands
    ruff = [c for c in commands if c.startswith("ruff check")]
    assert ruff, commands
    r = subprocess.run(["python3", "-m", *ruff[0].split()], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_example_bench_commands():
    """The shared benchmark is not in the repository (a clone has nothing beside it): the
    README says where it lives, and its commands are the two the workspace's scripts
    take. The micro-benchmarks the README names are in bench/."""
    commands = shell_commands(marked_blocks()["bench-commands"])
    assert commands == ["bash ../shared/bench/setup.sh",
                        "python3 ../shared/bench/bench.py --rounds 3"]
    text = " ".join(README.read_text().split())
    assert "not part of this repository" in text and "`../shared/bench/`" in text
    scripts = re.findall(r"`python (bench/\w+\.py)`", README.read_text())
    assert scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
