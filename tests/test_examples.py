"""Every example of the README and the man page runs (see examples.py for the marker
convention and the sandbox). The README's CI recipe and jq cookbook, and its install and
development commands, are run by test_readme.py; everything else is here."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Origin, curl
from examples import (
    TESTS,
    clean_env,
    example,
    make_bin_dir,
    man_examples,
    man_unmarked_blocks,
    readme_examples,
    readme_unmarked_blocks,
    run_bash,
    run_in_sandbox,
    shell_commands,
)

# --------------------------------------------------------------------------- the convention


def test_every_code_block_is_a_marked_example():
    problems = readme_unmarked_blocks() + man_unmarked_blocks()
    assert not problems, "\n".join(problems)


def test_every_marked_example_has_its_test():
    names = set(readme_examples()) | set(man_examples())
    source = "".join(p.read_text(encoding="utf-8") for p in TESTS.glob("test_*.py"))
    defined = set(re.findall(r"^def test_example_(\w+)\(", source, re.M))
    missing = sorted(n for n in names if n.replace("-", "_") not in defined)
    assert not missing, f"examples without a test_example_<name>: {missing}"
    stale = sorted(d for d in defined if d.replace("_", "-") not in names)
    assert not stale, f"test_example_<name> without an example: {stale}"


def test_shared_examples_are_the_same_text():
    both = set(readme_examples()) & set(man_examples())
    assert {"ci-capture", "trust-ca", "shell-completion", "event-lines"} <= both, both
    for name in both - {"event-lines"}:  # event-lines: each document its own sample lines
        example(name)  # asserts the texts are equal


def test_man_page_has_no_stale_ci_example():
    # The old man page example set only HTTP_PROXY and no CA bundle; the working one is
    # the README's, run by test_readme.py.
    text = example("ci-capture").text
    assert "http_proxy=" in text and "ca-bundle.pem" in text and "kill -0" in text


# --------------------------------------------------------------------------- long-running proxies

LONG_RUNNING = r"""
# the example runs in the background; a client sends requests through port 8080
setsid bash -o pipefail "$WORK/example.sh" > out.txt 2> err.txt &
example=$!
wait_until 20 listening 8080
ca=$HOME/.config/dumpproxy/ca-cert.pem
curl -sS -x http://127.0.0.1:8080 --cacert "$ca" https://example.com/ > body-https.txt
curl -sS -x http://127.0.0.1:8080 http://example.com/ > body-http.txt
# (no waiting on out.txt: jq holds its output until the end; dumpproxy loses no event
# on SIGINT)
kill -INT "$(proxy_pid)"
wait "$example"
echo "example exited $?"
"""


def run_long_running(tmp_path, pki, command: str, files: dict[str, str] | None = None):
    r, work = run_in_sandbox(tmp_path, pki, LONG_RUNNING,
                             files={"example.sh": command + "\n", **(files or {})})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.strip().endswith("example exited 0"), r.stdout + r.stderr
    assert (work / "body-https.txt").read_text() == "hello\n"
    assert (work / "body-http.txt").read_text() == "hello\n"
    return [json.loads(x) for x in (work / "out.txt").read_text().splitlines()], work


def test_example_record(tmp_path, pki):
    (command,) = shell_commands(example("record").text)
    events, _ = run_long_running(tmp_path, pki, command)
    assert [(e["event"], e["url"], e["status"]) for e in events] == [
        ("response", "https://example.com/", 200), ("response", "http://example.com/", 200)]


def test_example_record_filtered(tmp_path, pki):
    (command,) = shell_commands(example("record-filtered").text)
    events, _ = run_long_running(tmp_path, pki, command,
                                 files={"ignore.txt": "^(.+\\.)?apple\\.com:443$\n"})
    assert [(e["event"], e["url"]) for e in events] == [
        ("response", "https://example.com/"), ("response", "http://example.com/")]


def test_example_first_steps(tmp_path, pki):
    text = example("first-steps").text
    first, _, second = text.partition("# in another terminal:\n")
    (command,) = shell_commands(first)
    (client,) = shell_commands(second)
    assert client == "curl -x http://127.0.0.1:8080 http://example.com/"
    events, _ = run_long_running(tmp_path, pki, command)
    assert events[0]["event"] == "listening" and events[0]["address"] == "127.0.0.1:8080"
    assert "listening" in first and '"address":"127.0.0.1:8080"' in first
    assert any(e["event"] == "response" and e["url"] == "http://example.com/" for e in events)
    assert events[-1]["event"] == "shutdown" and events[-1]["reason"] == "SIGINT"
    # the client line itself, as written
    r, _ = run_in_sandbox(tmp_path / "again", pki, r"""
dumpproxy -q -o events.jsonl &
proxy=$!
wait_until 20 listening 8080
bash -eu "$WORK/client.sh" > client-out.txt
kill -TERM "$proxy"; wait
cat client-out.txt
""", files={"client.sh": client + "\n"})
    assert r.returncode == 0 and r.stdout == "hello\n", r.stdout + r.stderr


# --------------------------------------------------------------------------- clients

SCRIPT_PY = """\
# the user's script: one intercepted host, one passed through, proxy and CA from the
# environment
import urllib.request
for url in ("https://example.com/", "https://example.org/"):
    with urllib.request.urlopen(url, timeout=20) as r:
        print(url, r.status, r.read().decode().strip())
"""


def test_example_trust_ca(tmp_path, pki):
    """The client recipe records both clients' requests, and the bundle also verifies a
    passed-through host (whose certificate only the system store trusts)."""
    r, work = run_in_sandbox(tmp_path, pki, r"""
dumpproxy -q -o events.jsonl --ignore-hosts '^example\.org:443$' &
proxy=$!
wait_until 20 listening 8080
bash -eu -o pipefail "$WORK/example.sh" > example-out.txt
kill -TERM "$proxy"; wait
cat example-out.txt
""", files={"example.sh": example("trust-ca").text, "script.py": SCRIPT_PY})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout == ("hello\nhttps://example.com/ 200 hello\n"
                        "https://example.org/ 200 hello\n"), r.stdout + r.stderr
    events = [json.loads(x) for x in (work / "events.jsonl").read_text().splitlines()]
    assert [e["url"] for e in events if e["event"] == "response"] == [
        "https://example.com/", "https://example.com/"]
    assert [e["address"] for e in events
            if e["event"] == "decision" and e["action"] == "passthrough"] == ["example.org:443"]
    assert not [e for e in events if e["event"] == "error"], events


def test_example_wrap_example(tmp_path, pki):
    r, _ = run_in_sandbox(tmp_path, pki, 'bash -eu -o pipefail "$WORK/example.sh"',
                          files={"example.sh": example("wrap-example").text})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    (line,) = r.stdout.splitlines()
    event = json.loads(line)
    assert (event["event"], event["url"], event["status"]) == (
        "response", "https://example.com/", 200)
    assert "hello" in r.stderr  # curl's output, on stderr in wrap mode


def test_example_wrap_ci(tmp_path, pki):
    run_tests = ("#!/bin/sh\nset -e\ncurl -sS https://example.com/\n"
                 "curl -sS https://example.org/\ncurl -sS http://example.com/\n")
    r, work = run_in_sandbox(tmp_path, pki, 'bash -eu "$WORK/example.sh"', files={
        "example.sh": example("wrap-ci").text, "run-tests": run_tests,
        "ignore.txt": "^example\\.org:443$\n"})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    events = [json.loads(x) for x in (work / "traffic.jsonl").read_text().splitlines()]
    assert [e["url"] for e in events if e["event"] == "response"] == [
        "https://example.com/", "http://example.com/"]
    assert [(e["address"], e["source"]) for e in events if e["event"] == "decision"
            and e["action"] == "passthrough"] == [("example.org:443", "ignore.txt:1")]
    assert events[-1]["event"] == "shutdown" and events[-1]["reason"] == "command exited"


def test_example_isolate(tmp_path, pki):
    """--isolate records a suite whose clients ignore the proxy variables."""
    suite = ("#!/bin/sh\nset -e\ncurl -sS --noproxy '*' https://example.com/\n"
             "env -u HTTPS_PROXY -u https_proxy curl -sS http://example.org/\n")
    r, work = run_in_sandbox(tmp_path, pki, 'bash -eu "$WORK/example.sh"', files={
        "example.sh": example("isolate").text, "run-suite.sh": suite})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    events = [json.loads(x) for x in (work / "traffic.jsonl").read_text().splitlines()]
    assert [e["headers"]["host"] for e in events if e["event"] == "request"] == [
        "example.com", "example.org"]
    # named by their SNI and Host header, though transparent mode knows only addresses
    assert [e["url"] for e in events if e["event"] == "response"] == [
        "https://example.com/", "http://example.org/"]
    assert [e["status"] for e in events if e["event"] == "response"] == [200, 200]
    assert not [e for e in events if e["event"] == "error"]


def test_example_check_and_reload(tmp_path, pki):
    r, work = run_in_sandbox(tmp_path, pki, r"""
dumpproxy -v -o events.jsonl --ignore-hosts-file ignore.txt 2> proxy.err &
proxy_pid=$!
export proxy_pid
wait_until 20 listening 8080
bash -eu -o pipefail "$WORK/example.sh" > example-out.txt
wait_until 20 grep -q 'reloaded patterns' proxy.err
curl -sS -x http://127.0.0.1:8080 https://api.example.com/ > body.txt
kill -TERM "$proxy_pid"; wait
""", files={"example.sh": example("check-and-reload").text,
            "ignore.txt": "^example\\.com:443$\n"})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert (work / "example-out.txt").read_text() == (
        "example.com:443 passthrough ignore.txt:1\nwww.example.com:443 intercept null\n")
    assert (work / "ignore.txt").read_text() == "^example\\.com:443$\n^api\\.example\\.com:443$\n"
    assert (work / "body.txt").read_text() == "hello\n"  # passed through: the origin's cert
    events = [json.loads(x) for x in (work / "events.jsonl").read_text().splitlines()]
    assert [(e["address"], e["action"], e["source"]) for e in events
            if e["event"] == "decision"] == [("api.example.com:443", "passthrough",
                                              "ignore.txt:2")]


def test_example_error_lines(tmp_path, pki):
    expected = example("error-lines").text.splitlines()
    r, _ = run_in_sandbox(tmp_path, pki, r"""
exec 2>&1
dumpproxy --ignore-hosts-file ignore.txt || echo "exit $?"
dumpproxy --ignroe-hosts '^example\.com:443$' || echo "exit $?"
dumpproxy -q -o events.jsonl &
proxy=$!
wait_until 20 listening 8080
dumpproxy -o second.jsonl || echo "exit $?"
kill -TERM "$proxy"; wait
""", files={"ignore.txt": "# ignore.txt\n^example\\.com:443$\nfoo(\n"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [expected[0], "exit 2", expected[1], "exit 2",
                                     expected[2], "exit 1"], r.stdout


# --------------------------------------------------------------------------- no network


def test_example_check_patterns(tmp_path):
    bin_dir = make_bin_dir(tmp_path / "bin")
    work = tmp_path / "w"
    work.mkdir()
    (work / "example.sh").write_text(example("check-patterns").text)
    r = run_bash(["-eu", "-o", "pipefail", "example.sh"], cwd=work,
                 env=clean_env(tmp_path, bin_dir))
    assert r.returncode == 0, r.stderr
    *decisions, pattern = r.stdout.splitlines()
    got = [(d["address"], d["action"], d["source"]) for d in map(json.loads, decisions)]
    assert got == [("www.mybank.example:443", "passthrough", "ignore.txt:2"),
                   ("news.example:443", "intercept", None)]
    assert pattern == "^api\\.example\\.com:443$"
    assert "# ^api\\.example\\.com:443$" in example("check-patterns").text


def test_example_pattern_file(tmp_path):
    (tmp_path / "ignore.txt").write_text(example("pattern-file").text)
    r = subprocess.run(
        [sys.executable, "-m", "dumpproxy", "--ignore-hosts-file", str(tmp_path / "ignore.txt"),
         "--check", "www.apple.com:443", "example.com:443", "www.example.com:443",
         "x#not-a-comment:443"], capture_output=True, text=True, cwd=TESTS.parent, timeout=30)
    assert r.returncode == 0, r.stderr
    got = [(d["address"], d["action"], d["source"] and d["source"].rpartition(":")[2])
           for d in map(json.loads, r.stdout.splitlines())]
    assert got == [("www.apple.com:443", "passthrough", "2"),
                   ("example.com:443", "passthrough", "3"),
                   ("www.example.com:443", "intercept", None),
                   ("x#not-a-comment:443", "passthrough", "4")]


def test_example_shell_completion(tmp_path):
    bin_dir = make_bin_dir(tmp_path / "bin")
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "w"
    work.mkdir()
    text = example("shell-completion").text
    (work / "example.sh").write_text(text + "complete -p dumpproxy\n")
    env = clean_env(tmp_path, bin_dir, HOME=str(home))
    r = run_bash(["-eu", "example.sh"], cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "complete -F _dumpproxy dumpproxy", r.stdout
    root = TESTS.parent / "completions"
    assert (home / ".zfunc" / "_dumpproxy").read_bytes() == (root / "_dumpproxy").read_bytes()
    assert (home / ".config/fish/completions/dumpproxy.fish").read_bytes() == (
        root / "dumpproxy.fish").read_bytes()


# --------------------------------------------------------------------------- output samples


@pytest.fixture(scope="module")
def traffic_file(tmp_path_factory, pki) -> Path:
    """A real capture: intercepted HTTPS (200, 404), plain HTTP, a passthrough tunnel."""
    from test_readme import capture_traffic

    tmp = tmp_path_factory.mktemp("traffic")
    bin_dir = make_bin_dir(tmp / "bin")
    origin, tls_origin = Origin(), Origin(pki.server_context(["localhost", "127.0.0.1"]))
    other = Origin(pki.server_context(["127.0.0.1"]))
    try:
        path = capture_traffic(tmp, bin_dir, origin, tls_origin, other, pki)
    finally:
        for o in (origin, tls_origin, other):
            o.close()
    return path


@pytest.fixture
def traffic(traffic_file) -> list[dict]:
    return [json.loads(x) for x in traffic_file.read_text().splitlines()]


def run_jq_example(name: str, traffic_file: Path) -> list[str]:
    command = example(name).text.strip()  # one command (a quoted jq program may span lines)
    assert command.startswith("jq ") and command.count("traffic.jsonl") == 1, command
    r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=traffic_file.parent,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", f"{command}\n{r.stderr}"
    return r.stdout.splitlines()


def test_example_jq_status(traffic_file, traffic):
    got = run_jq_example("jq-status", traffic_file)
    assert got == [f"{e['status']} {e['method']} {e['url']}" for e in traffic
                   if e["event"] == "response"]
    assert len(got) == 4  # the 502 dumpproxy answered for an unreachable origin too


def test_example_jq_hosts(traffic_file, traffic):
    got = run_jq_example("jq-hosts", traffic_file)
    assert got == sorted({e["address"] for e in traffic if e["event"] == "server_connect"})
    assert len(got) == 3


def test_example_jq_passthrough(traffic_file, traffic):
    got = [json.loads(x) for x in run_jq_example("jq-passthrough", traffic_file)]
    passed = [e for e in traffic if e["event"] == "decision" and e["action"] == "passthrough"]
    assert passed
    assert got == [{k: e[k] for k in ("address", "reason", "pattern", "source")} for e in passed]


@pytest.mark.parametrize("document", ["README", "man page"])
def test_example_event_lines(document, traffic):
    """Each sample line is one JSON object whose keys, in order, are those of a real
    event of its kind (a decision with the same action)."""
    examples = readme_examples() if document == "README" else man_examples()
    lines = examples["event-lines"].text.splitlines()
    assert len(lines) >= 3
    for line in lines:
        sample = json.loads(line)
        real = [e for e in traffic if e["event"] == sample["event"]
                and e.get("action") == sample.get("action")]
        assert real, f"no real {sample['event']} event to compare with"
        assert list(sample) == list(real[0]), f"{document}: {line}\nreal: {real[0]}"


def text_shape(line: str) -> str:
    line = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", line)
    line = re.sub(r"(?:localhost|example\.com):\d+", "HOST", line)
    line = re.sub(r"https://(?:HOST|example\.com)/\S*", "URL", line)
    line = re.sub(r"\b\d+(?:\.\d+)?[bkmgt]\b", "SIZE", line)
    return re.sub(r"\b\d+\b", "N", line)


def test_example_text_format(tmp_path, pki):
    """The sample has the lines, in the order, of a real --format text run."""
    sample = example("text-format").text.splitlines()
    tls_origin = Origin(pki.server_context(["localhost"]))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dumpproxy", "-p", "0", "-q", "--format", "text",
             "--upstream-ca", str(pki.ca_path)], cwd=TESTS.parent, stdout=subprocess.PIPE,
            env=clean_env(tmp_path, make_bin_dir(tmp_path / "bin")), text=True)
        first = proc.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", first).group(1)
        r = curl("-x", f"http://127.0.0.1:{port}", "--cacert",
                 str(tmp_path / "home" / "ca-cert.pem"), tls_origin.url("/small", host="localhost"))
        assert r.returncode == 0, r.stderr
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=15)
    finally:
        tls_origin.close()
    real = [first.rstrip("\n"), *rest.splitlines()]
    assert [text_shape(x) for x in sample] == [text_shape(x) for x in real], "\n".join(real)
