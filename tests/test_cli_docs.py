"""The man page and the shell completions agree with the argument parser, and work.

Consistency: the option strings of `dumpproxy.cli.build_parser()` must be exactly the options
documented in the OPTIONS section of man/dumpproxy.1 and exactly the options offered by each
completion file (bash, zsh, fish), read from each file's text in the way its format defines
options. Behaviour: mandoc finds nothing above style level; the page renders; the completion
files complete in real bash (with and without bash-completion), zsh and fish. None of these
tests is skipped when a tool is missing: CI installs mandoc, bash-completion, zsh and fish.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from dumpproxy import http1_wire

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "dumpproxy.1"
BASH = ROOT / "completions" / "dumpproxy.bash"
ZSH = ROOT / "completions" / "_dumpproxy"
FISH = ROOT / "completions" / "dumpproxy.fish"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

MODES = {"regular", "upstream:", "reverse:", "socks5", "transparent"}
EVENTS = [
    "listening",
    "client_connect",
    "client_disconnect",
    "server_connect",
    "server_disconnect",
    "decision",
    "tls",
    "request",
    "response",
    "error",
    "shutdown",
]
WRAP_VARIABLES = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "NODE_OPTIONS",
    "DENO_CERT",
    "JAVA_TOOL_OPTIONS",
    "PHP_INI_SCAN_DIR",
]

# An option token: -x or --long-name, not part of a longer word (so "plain-HTTP" or
# "re-reads" are not options) and not followed by more word characters.
OPTION_RE = re.compile(r"(?<![\w-])(--?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?![\w-])")
SHELL_TIMEOUT = 60


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (CI installs it; install it to run these tests)"
    return path


# --------------------------------------------------------------------------- the parser


def parser_actions():
    from dumpproxy.cli import build_parser

    return [a for a in build_parser()._actions if a.option_strings]


def parser_options() -> set[str]:
    return {s for a in parser_actions() for s in a.option_strings}


def parser_value_options() -> set[str]:
    """Options that take a value (nargs None, 1, '?', '+', '*', ...; not flags)."""
    return {s for a in parser_actions() if a.nargs != 0 for s in a.option_strings}


# --------------------------------------------------------------------------- the man page


def deroff(text: str) -> str:
    """Roff text to plain text, enough for finding option names in it."""
    text = re.sub(r"\\f(?:\[[^]]*\]|\(..|.)", "", text)  # font changes
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    text = text.replace("\\(aq", "'").replace("\\(dq", '"').replace("\\ ", " ")
    text = re.sub(r"\\\(..", " ", text)  # other special characters
    return text


def man_section(name: str) -> list[str]:
    lines = MAN.read_text(encoding="utf-8").splitlines()
    out, inside = [], False
    for line in lines:
        if re.match(r"^\.SH\b", line):
            inside = line[3:].strip().strip('"') == name
            continue
        if inside and not line.startswith('.\\"'):
            out.append(line)
    assert out, f"{MAN.name} has no {name} section"
    return out


ALTERNATING_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}  # arguments run together


def macro_args(text: str) -> list[str]:
    """Roff macro arguments: blank-separated, "double quoted" ones may hold blanks."""
    args = []
    for m in re.finditer(r'"((?:[^"]|"")*)"?|((?:\\.|[^\s"])+)', text):
        args.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2))
    return args


def macro_text(line: str) -> str:
    """A roff line's text as printed: a macro line loses its name and argument quoting."""
    m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
    if m:
        joiner = "" if m.group(1) in ALTERNATING_MACROS else " "
        line = joiner.join(macro_args(m.group(2)))
    return deroff(line)


def man_option_tags() -> list[str]:
    """The tag lines (the line after each .TP) of the OPTIONS section, as plain text."""
    lines = man_section("OPTIONS")
    return [macro_text(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


def man_documented_options() -> set[str]:
    return {opt for tag in man_option_tags() for opt in OPTION_RE.findall(tag)}


def man_value_options() -> set[str]:
    """Options whose tag line names an argument after them (`--listen-host host`)."""
    out = set()
    for tag in man_option_tags():
        names = OPTION_RE.findall(tag)
        rest = OPTION_RE.sub(" ", tag).replace(",", " ").split()
        if rest:
            out.update(names)
    return out


# --------------------------------------------------------------------------- completion files


def join_continuations(text: str) -> str:
    return re.sub(r"\\\n", " ", text)


def bash_options() -> set[str]:
    """The word list `_dumpproxy_options` that the bash completion offers for `-...`."""
    text = BASH.read_text(encoding="utf-8")
    m = re.search(r"^\s*(?:local\s+)?_dumpproxy_options=(['\"])(.*?)\1", text, re.M | re.S)
    assert m, f"{BASH.name}: no _dumpproxy_options='...' word list"
    words = m.group(2).split()
    stray = [w for w in words if not OPTION_RE.fullmatch(w)]
    assert not stray, f"{BASH.name}: not options in _dumpproxy_options: {stray}"
    return set(words)


def bash_case_patterns() -> set[str]:
    """Option names used as `case $prev in` patterns (options whose value is completed)."""
    text = join_continuations(BASH.read_text(encoding="utf-8"))
    text = re.sub(r"(?m)(^|\s)#.*$", r"\1", text)  # comments
    out: set[str] = set()
    for block in re.findall(r"\bcase\s+\"?\$\{?prev\}?\"?\s+in\b(.*?)\besac\b", text, re.S):
        for arm in re.findall(r"^\s*\(?\s*([^()\n]+?)\s*\)", block, re.M):
            alternatives = [p.strip() for p in arm.split("|")]
            out.update(p for p in alternatives if OPTION_RE.fullmatch(p))
    assert out, f"{BASH.name}: no `case $prev in` arms for option values"
    return out


def _zsh_arguments_words() -> list[str]:
    text = join_continuations(ZSH.read_text(encoding="utf-8"))
    calls = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("_arguments ")]
    assert len(calls) == 1, f"{ZSH.name}: expected one _arguments call, found {len(calls)}"
    words = shlex.split(calls[0], comments=False, posix=True)[1:]
    while words and re.fullmatch(r"-[sSCwWn]+", words[0]):  # _arguments' own flags
        words.pop(0)
    return words


def _zsh_spec(spec: str) -> tuple[list[str], list[str], bool]:
    """(option names, excluded names, takes an argument) of one _arguments spec."""
    excluded: list[str] = []
    m = re.match(r"\(([^)]*)\)", spec)
    if m:
        excluded = [w for w in m.group(1).split() if OPTION_RE.fullmatch(w)]
        spec = spec[m.end() :]
    spec = spec.lstrip("*!")
    if spec.startswith("{"):
        inner, _, rest = spec[1:].partition("}")
        alternatives = inner.split(",")
    else:
        m = re.match(r"[-+][^\[:]*", spec)
        if not m:  # a positional-argument spec such as '*: :action'
            return [], excluded, False
        alternatives, rest = [m.group(0)], spec[m.end() :]
    names = []
    for alt in alternatives:
        m = re.match(r"(--?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(=-?|\+|-)?$", alt)
        assert m, f"{ZSH.name}: cannot read option name in spec {alt!r}"
        names.append(m.group(1))
    rest = re.sub(r"^\[(?:\\.|[^]\\])*\]", "", rest)  # the description
    return names, excluded, rest.startswith(":")


def zsh_options() -> set[str]:
    names: set[str] = set()
    excluded: set[str] = set()
    for word in _zsh_arguments_words():
        n, e, _ = _zsh_spec(word)
        names.update(n)
        excluded.update(e)
    assert excluded <= names, f"{ZSH.name}: exclusion lists name unknown options {excluded - names}"
    return names


def zsh_value_options() -> set[str]:
    out = set()
    for word in _zsh_arguments_words():
        names, _, takes = _zsh_spec(word)
        if takes:
            out.update(names)
    return out


FISH_VALUE_SHORT = set("cpsloadwn")
FISH_VALUE_LONG = {
    "command",
    "path",
    "short-option",
    "long-option",
    "old-option",
    "arguments",
    "description",
    "wraps",
    "condition",
}


def fish_commands(text: str) -> list[list[str]]:
    """Split fish source into commands (lists of words), by fish's quoting rules.

    Single quotes take \\' and \\\\ escapes, double quotes \\" \\$ \\\\ escapes, a backslash
    outside quotes escapes the next character (a newline too), # at a word start begins a
    comment, and a newline or ; outside quotes and command substitutions ends a command.
    """
    commands: list[list[str]] = []
    words: list[str] = []
    word: str | None = None
    i, depth = 0, 0

    def end_word():
        nonlocal word
        if word is not None:
            words.append(word)
            word = None

    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt != "\n":
                word = (word or "") + {"t": "\t", "n": "\n"}.get(nxt, nxt)
            i += 2
            continue
        if c in "'\"":
            word = word or ""
            i += 1
            escapable = (c, "\\") if c == "'" else (c, "\\", "$")
            while i < len(text) and text[i] != c:
                if text[i] == "\\" and text[i + 1 : i + 2] in escapable:
                    i += 1
                word += text[i]
                i += 1
            assert i < len(text), f"{FISH.name}: unterminated {c} quote"
            i += 1
            continue
        if c == "#" and word is None and depth == 0:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if c in "()":
            depth += 1 if c == "(" else -1
        if depth == 0 and c in " \t":
            end_word()
        elif depth == 0 and c in "\n;":
            end_word()
            if words:
                commands.append(words)
            words = []
        else:
            word = (word or "") + c
        i += 1
    end_word()
    if words:
        commands.append(words)
    return commands


def test_fish_reader():
    text = "complete -c x -d 'a\\'b' -a \"q\\\"\" # c\n  -s p\ncomplete -c y (f a;b)\\\n -l z"
    assert fish_commands(text) == [
        ["complete", "-c", "x", "-d", "a'b", "-a", 'q"'],
        ["-s", "p"],
        ["complete", "-c", "y", "(f a;b)", "-l", "z"],
    ]


def _fish_complete_lines():
    """Each `complete` command for dumpproxy as (command, options it defines, takes a value)."""
    for words in fish_commands(FISH.read_text(encoding="utf-8")):
        if words[0] == "complete":
            yield _fish_parse_complete(words[1:])


def _fish_parse_complete(words: list[str]) -> tuple[str | None, set[str], bool]:
    command, names, takes = None, set(), False
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if name in FISH_VALUE_LONG and not eq:
                value, i = (words[i] if i < len(words) else ""), i + 1
            if name in ("require-parameter", "exclusive"):
                takes = True
            key = {"command": "c", "short-option": "s", "long-option": "l", "old-option": "o"}
            flag = key.get(name)
        elif w.startswith("-") and len(w) > 1:
            flag, value = None, None
            for j, ch in enumerate(w[1:], 1):
                if ch in "rx":
                    takes = True
                if ch in FISH_VALUE_SHORT:
                    flag = ch
                    value = w[j + 1 :]
                    if not value:
                        value, i = (words[i] if i < len(words) else ""), i + 1
                    break
        else:
            continue
        if flag == "c":
            command = value
        elif flag == "s":
            names.add("-" + value)
        elif flag == "l":
            names.add("--" + value)
        elif flag == "o":
            names.add("-" + value)
    return command, names, takes


def fish_options() -> set[str]:
    out: set[str] = set()
    for command, names, _ in _fish_complete_lines():
        if command == "dumpproxy":
            out |= names
    return out


def fish_value_options() -> set[str]:
    out: set[str] = set()
    for command, names, takes in _fish_complete_lines():
        if command == "dumpproxy" and takes:
            out |= names
    return out


# --------------------------------------------------------------------------- consistency


def diff_message(where: str, found: set[str], expected: set[str],
                 source: str = "the parser") -> str:
    missing, extra = sorted(expected - found), sorted(found - expected)
    return f"{where}: missing {missing}, not in {source} {extra}"


def test_parser_has_the_documented_option_list():
    # Guards the other checks against an empty or broken parser.
    options = parser_options()
    for opt in ("--listen-host", "-p", "--listen-port", "--mode", "--check", "--format"):
        assert opt in options


@pytest.mark.parametrize(
    "where, read",
    [
        ("man page OPTIONS", man_documented_options),
        (BASH.name, bash_options),
        (ZSH.name, zsh_options),
        (FISH.name, fish_options),
    ],
)
def test_options_match_parser(where, read):
    expected = parser_options()
    found = read()
    assert found == expected, diff_message(where, found, expected)


@pytest.mark.parametrize(
    "where, read",
    [
        ("man page OPTIONS tags", man_value_options),
        (f"{BASH.name} case $prev arms", bash_case_patterns),
        (f"{ZSH.name} specs with an argument", zsh_value_options),
        (f"{FISH.name} -r/-x lines", fish_value_options),
    ],
)
def test_value_taking_options_match_parser(where, read):
    # An option that takes a value must be treated so (its value completed, or at least
    # not offered options), and a flag must not be.
    expected = parser_value_options()
    found = read()
    assert found == expected, diff_message(where, found, expected)


def test_man_options_section_mentions_only_real_options():
    text = " ".join(macro_text(line) for line in man_section("OPTIONS"))
    stale = set(OPTION_RE.findall(text)) - parser_options()
    assert not stale, f"OPTIONS section mentions options the parser lacks: {sorted(stale)}"


def test_roff_reader():
    assert macro_text(r'.BR \-p ", " \-\-listen\-port " \fIport\fR"') == "-p, --listen-port port"
    assert macro_text(r".BR decision \-shaped") == "decision-shaped"
    assert macro_text(r".B \(aq^example\e.com:443$\(aq") == "'^example\\.com:443$'"


def test_option_token_reader():
    # The readers above rely on this: options found, hyphenated words and values not.
    found = OPTION_RE.findall("-p, --listen-port port; plain-HTTP re-reads - -- --x-y= 0.0.0.0")
    assert found == ["-p", "--listen-port", "--x-y"]


def test_man_page_covers_events_modes_and_wrap_variables():
    events = " ".join(macro_text(line) for line in man_section("EVENTS"))
    for event in EVENTS:
        assert re.search(rf"\b{event}\b", events), f"EVENTS does not describe {event}"
    options = " ".join(macro_text(line) for line in man_section("OPTIONS"))
    for mode in ("regular", "upstream:", "reverse:", "socks5", "transparent"):
        assert mode in options, f"OPTIONS does not describe mode {mode}"
    for section in ("WRAP MODE", "ENVIRONMENT"):
        text = " ".join(macro_text(line) for line in man_section(section))
        for var in WRAP_VARIABLES:
            assert re.search(rf"\b{var}\b", text), f"{section} does not list {var}"
    environment = " ".join(macro_text(line) for line in man_section("ENVIRONMENT"))
    for var in ("DUMPPROXY_HOME", "XDG_CONFIG_HOME", "HOME", http1_wire.PARSER_ENV,
                *http1_wire.PARSERS):
        assert re.search(rf"\b{var}\b", environment), f"ENVIRONMENT does not list {var}"


# --------------------------------------------------------------------------- man page tools


def test_mandoc_lint_is_clean():
    mandoc = need("mandoc")
    proc = subprocess.run(
        [mandoc, "-Tlint", str(MAN)], capture_output=True, text=True, timeout=SHELL_TIMEOUT
    )
    output = proc.stdout + proc.stderr
    bad = [ln for ln in output.splitlines() if re.search(r"\b(WARNING|ERROR|UNSUPP|BADARG)\b", ln)]
    assert not bad, "mandoc -Tlint:\n" + "\n".join(bad)
    assert proc.returncode in (0, 1), output  # 1: style messages only


def rendered(argv: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, timeout=SHELL_TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    text = proc.stdout.decode("utf-8", errors="replace")
    return re.sub(r".\x08", "", text)  # overstrike bold/underline


def test_man_page_renders():
    page = rendered([need("mandoc"), "-Tutf8", str(MAN)])
    for heading in ("NAME", "SYNOPSIS", "OPTIONS", "EVENTS", "PATTERNS", "EXIT STATUS"):
        assert re.search(rf"^{heading}$", page, re.M), f"rendered page lacks {heading}"
    assert "dumpproxy - intercepting" in page
    assert "^example\\.com:443$" in page  # backslashes survive roff escaping
    assert "17\\.178\\.\\d+\\.\\d+:443" in page
    for opt in parser_options():
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", page), opt
    if shutil.which("man"):  # man-db renders with groff: no warnings there either
        env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
        proc = subprocess.run(
            ["man", "--warnings", "-l", str(MAN)],
            capture_output=True,
            timeout=SHELL_TIMEOUT,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        assert not proc.stderr.strip(), proc.stderr.decode(errors="replace")
        page = re.sub(r".\x08", "", proc.stdout.decode("utf-8", errors="replace"))
        assert re.search(r"^OPTIONS$", page, re.M), page[:2000]


# --------------------------------------------------------------------------- real shells

BASH_DRIVER = r"""
if [[ $WITH_BASH_COMPLETION == 1 ]]; then
    source "$BASH_COMPLETION_FILE" || exit 90
fi
if [[ -n ${COMPLETION_COMMAND:-} ]]; then
    source <($COMPLETION_COMMAND) || exit 91
else
    source "$COMPLETION_FILE" || exit 91
fi
spec=$(complete -p dumpproxy) || exit 92
fn=$(sed -n 's/.*-F \([^ ]*\).*/\1/p' <<<"$spec")
[[ -n $fn ]] || exit 93
COMP_LINE=$LINE
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<<"$LINE"
[[ $LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_TYPE=9
COMPREPLY=()
"$fn" dumpproxy "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

ZSH_DRIVER = r"""
# Drive an interactive zsh in a pseudo-terminal: load the completion with compinit, type
# LINE, press Tab bound to list-choices, and print what the terminal shows.
compdir=$1 line=$2
zmodload zsh/zpty || exit 90
zpty z zsh -f -i || exit 91
zpty -w z "stty rows 500 cols 250 -echo 2>/dev/null"
zpty -w z "PS1='' PROMPT='' RPROMPT='' LISTMAX=100000; unset zle_bracketed_paste"
zpty -w z "fpath=(${(q)compdir} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "zstyle ':completion:*' format '==%d=='; zstyle ':completion:*' list-separator '--'"
zpty -w z "bindkey '^I' list-choices"
zpty -w z "echo READY-\$((20+22))"
zpty -r z out '*READY-42*' || exit 92
zpty -n -w z "$line"$'\t'
# the next keys only once the listing has started: zle skips drawing a list while typed
# keys are already waiting (seen on a loaded machine as "zsh listed nothing")
zpty -r z head '*==*==*' || exit 94
zpty -w z $'\C-u'"echo DONE-\$((50+9))"
zpty -r z out '*DONE-59*' || exit 93
print -r -- "$head$out"
zpty -d z
"""


def run(argv: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=SHELL_TIMEOUT, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


class Loader:
    """Where the shells get the completion scripts: the checkout's files, or an installed
    dumpproxy's `--completions` output (a venv, as after `pip install` or pipx)."""

    def __init__(self, name: str, bin_dir: Path | None = None):
        self.name = name
        self.bin_dir = bin_dir

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, **extra)
        if self.bin_dir is not None:
            env["PATH"] = f"{self.bin_dir}{os.pathsep}{env['PATH']}"
        return env

    def zsh_dir(self, tmp_path: Path) -> Path:
        if self.bin_dir is None:
            return ZSH.parent
        d = tmp_path / "zfunc"  # as the man page says: --completions zsh > DIR/_dumpproxy
        d.mkdir(exist_ok=True)
        (d / "_dumpproxy").write_bytes(installed_completions(self.bin_dir, "zsh"))
        return d

    def fish_load(self) -> str:
        if self.bin_dir is None:
            return f"source {shlex.quote(str(FISH))}"
        return "dumpproxy --completions fish | source"


CHECKOUT = Loader("checkout")


def installed_completions(bin_dir: Path, shell: str) -> bytes:
    proc = subprocess.run([str(bin_dir / "dumpproxy"), "--completions", shell],
                          capture_output=True, timeout=SHELL_TIMEOUT, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def complete_bash(line: str, with_bash_completion: bool = True,
                  loader: Loader = CHECKOUT) -> list[str]:
    bash = need("bash")
    if with_bash_completion:
        assert BASH_COMPLETION.is_file(), f"{BASH_COMPLETION} missing: install bash-completion"
    env = loader.env(
        LINE=line,
        COMPLETION_FILE=str(BASH),
        BASH_COMPLETION_FILE=str(BASH_COMPLETION),
        WITH_BASH_COMPLETION="1" if with_bash_completion else "0",
    )
    if loader.bin_dir is not None:
        env["COMPLETION_COMMAND"] = "dumpproxy --completions bash"
    out = run([bash, "--noprofile", "--norc", "-c", BASH_DRIVER], env=env)
    return [w for w in out.splitlines() if w]


def complete_zsh(line: str, tmp_path: Path, loader: Loader = CHECKOUT) -> list[str]:
    zsh = need("zsh")
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER, encoding="utf-8")
    env = loader.env(TERM="xterm", HOME=str(tmp_path), ZDOTDIR=str(tmp_path))
    raw = run([zsh, "-f", str(driver), str(loader.zsh_dir(tmp_path)), line], env=env)
    # Terminal control sequences and carriage returns become line breaks; the listing runs
    # from the first group heading (==description==) to the redrawn command line.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r", "\n", raw)
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if re.fullmatch(r"==.*==", ln.strip())), None)
    assert start is not None, f"zsh listed nothing for {line!r}:\n{text}"
    words: list[str] = []
    for ln in lines[start:]:
        if ln.startswith(("dumpproxy", "echo DONE", "DONE-")):
            break
        if re.fullmatch(r"==.*==", ln.strip()):
            continue
        words += ln.split(" -- ")[0].split()
    return words


def complete_fish(line: str, loader: Loader = CHECKOUT) -> list[str]:
    fish = need("fish")
    out = run([fish, "--no-config", "-c", f"{loader.fish_load()}; complete -C $argv[1]", line],
              env=loader.env())
    return [ln.split("\t")[0] for ln in out.splitlines() if ln]


def complete(loader: Loader, shell: str, line: str, tmp_path: Path) -> list[str]:
    if shell == "bash":
        return complete_bash(line, loader=loader)
    if shell == "bash-without-bash-completion":
        return complete_bash(line, with_bash_completion=False, loader=loader)
    if shell == "zsh":
        return complete_zsh(line, tmp_path, loader)
    if shell == "fish":
        return complete_fish(line, loader)
    raise AssertionError(shell)


@pytest.fixture(scope="session")
def venv_bin(tmp_path_factory) -> Path:
    """dumpproxy installed from a copy of this checkout into a fresh venv, offline: the
    wheel is built by the interpreter running the tests (whose environment has the build
    backend, `.[test]` brings it) and installed without dependencies; the new venv sees
    that environment's packages through a .pth file. `--system-site-packages` would not
    do: inside a venv it exposes the base interpreter's site-packages (on Debian without
    orjson, an old cryptography), not the venv's that `pip install '.[test]'` filled."""
    base = tmp_path_factory.mktemp("venv-install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("dumpproxy", "man", "completions"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = base / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("dumpproxy-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (venv / "bin" / "dumpproxy").is_file()
    # Only now the outer environment (after the install: pip would take a dumpproxy
    # installed there, as `pip install '.[test]'` leaves it, for this one), appended
    # after the venv's own site-packages, so that the venv's dumpproxy comes first.
    (site_dir,) = (venv / "lib").glob("python3*/site-packages")
    outer = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE
                                      else [])
    (site_dir / "test-environment.pth").write_text("".join(f"{d}\n" for d in outer))
    return venv / "bin"


@pytest.fixture(params=["checkout", "venv"])
def loader(request) -> Loader:
    if request.param == "checkout":
        return CHECKOUT
    return Loader("venv", request.getfixturevalue("venv_bin"))


SHELLS = ["bash", "bash-without-bash-completion", "zsh", "fish"]


def names(words: list[str]) -> set[str]:
    """Completions as bare names: paths to their last part, listing marks dropped."""
    return {os.path.basename(w.rstrip("/*@")) or w for w in words}


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_option_prefix(shell, tmp_path, loader):
    got = names(complete(loader, shell, "dumpproxy --ig", tmp_path))
    assert {"--ignore-hosts", "--ignore-hosts-file"} <= got, got
    assert "--allow-hosts" not in got, got


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_modes(shell, tmp_path, loader):
    got = names(complete(loader, shell, "dumpproxy --mode ", tmp_path))
    assert MODES <= got, got
    assert not any(w.startswith("-") for w in got), got


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_formats(shell, tmp_path, loader):
    got = names(complete(loader, shell, "dumpproxy -q --format ", tmp_path))
    assert {"json", "text"} <= got, got


@pytest.mark.parametrize("shell", SHELLS)
def test_offers_every_option(shell, tmp_path, loader):
    got = {w for w in complete(loader, shell, "dumpproxy -", tmp_path) if w.startswith("-")}
    expected = parser_options()
    assert got == expected, diff_message(f"{shell} completing 'dumpproxy -'", got, expected)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("option", ["-o", "--output", "--ignore-hosts-file", "--upstream-ca"])
def test_completes_files(shell, option, tmp_path, loader):
    (tmp_path / "traffic.jsonl").write_text("")
    (tmp_path / "tree").mkdir()
    got = names(complete(loader, shell, f"dumpproxy {option} {tmp_path}/tr", tmp_path))
    assert {"traffic.jsonl", "tree"} <= got, got


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_directories_for_ca_dir(shell, tmp_path, loader):
    (tmp_path / "traffic.jsonl").write_text("")
    (tmp_path / "tree").mkdir()
    got = names(complete(loader, shell, f"dumpproxy --ca-dir {tmp_path}/tr", tmp_path))
    assert "tree" in got, got
    assert "traffic.jsonl" not in got, got


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_command_after_double_dash(shell, tmp_path, loader):
    got = names(complete(loader, shell, "dumpproxy -q -- ech", tmp_path))
    assert "echo" in got, got
    got = names(complete(loader, shell, "dumpproxy -q -- --ig", tmp_path))
    assert "--ignore-hosts" not in got, got


# --------------------------------------------------------------------------- reference vs code


def man_tags(lines: list[str]) -> list[str]:
    return [macro_text(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


def man_sublist(section: str, item: str) -> list[str]:
    """The tags of the indented (.RS ... .RE) list inside the entry `.B item` of section."""
    lines = man_section(section)
    depth, start = 0, None
    for i, line in enumerate(lines):
        depth += {".RS": 1, ".RE": -1}.get(line, 0)
        if depth == 0 and line == f".B {item}" and lines[i - 1] == ".TP":
            start = i
            break
    assert start is not None, f"{section} has no entry {item}"
    rs = lines.index(".RS", start)
    assert not [ln for ln in lines[start + 1 : rs] if ln == ".TP"], f"{item}: no list"
    return man_tags(lines[rs : lines.index(".RE", rs)])


def test_man_shutdown_reasons_match_code():
    from dumpproxy.status import SHUTDOWN_REASONS

    documented = {t for tag in man_sublist("EVENTS", "shutdown") for t in tag.split(", ")}
    in_code = {r.format(command="cmd") for r in SHUTDOWN_REASONS}
    assert documented == in_code, diff_message("man page shutdown reasons", documented,
                                               in_code, "the code")


def test_shutdown_reasons_come_from_the_constants():
    # A reason written as a literal in the code would escape the comparison above.
    runner = (ROOT / "dumpproxy" / "runner.py").read_text(encoding="utf-8")
    literal = re.findall(r"\b(?:stop|trigger)\(\s*f?[\"']", runner)
    assert not literal, f"runner.py passes literal shutdown reasons: {literal}"
    events = re.findall(r"\"shutdown\"", "".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "dumpproxy").glob("*.py")))
    assert events, "no shutdown event in the code"


def test_man_exit_statuses_match_code():
    from dumpproxy.status import EXIT_SIGNAL_BASE, EXIT_STATUSES

    documented = set(man_tags(man_section("EXIT STATUS")))
    in_code = {str(s) for s in EXIT_STATUSES} | {f"{EXIT_SIGNAL_BASE}+n"}
    assert documented == in_code, diff_message("man page EXIT STATUS", documented, in_code,
                                               "the code")


def test_exit_statuses_come_from_the_constants():
    for name in ("cli.py", "runner.py"):
        text = (ROOT / "dumpproxy" / name).read_text(encoding="utf-8")
        literal = re.findall(r"^\s*return \d+\b|_fail\([^)]*,\s*\d+\)", text, re.M)
        assert not literal, f"{name}: exit statuses not from dumpproxy.status: {literal}"


def test_man_signals_match_code():
    from dumpproxy.status import RELOAD_SIGNAL, STOP_SIGNALS

    documented = {t for tag in man_tags(man_section("SIGNALS")) for t in tag.split(", ")}
    in_code = {s.name for s in (*STOP_SIGNALS, RELOAD_SIGNAL)}
    assert documented == in_code, diff_message("man page SIGNALS", documented, in_code, "the code")


def test_man_error_stages_are_a_closed_list():
    # The list itself is compared with the event definitions elsewhere; here: no "..."
    # left, and every tag is one stage name.
    stages = man_sublist("EVENTS", "error")
    assert len(stages) >= 12, stages
    assert all(re.fullmatch(r"[a-z_0-9]+", s) for s in stages), stages
    assert stages == sorted(stages)
    events = " ".join(macro_text(line) for line in man_section("EVENTS"))
    assert "..." not in events and "\u2026" not in events


def test_man_page_has_the_reference_sections():
    page = MAN.read_text(encoding="utf-8")
    for section in ("SIGNALS", "SHELL COMPLETION", "CAVEATS", "SEE ALSO"):
        assert man_section(section), section
    see_also = " ".join(macro_text(line) for line in man_section("SEE ALSO"))
    for page_ref in ("mitmproxy(1)", "jq(1)", "curl(1)"):
        assert page_ref in see_also, see_also
    caveats = " ".join(macro_text(line) for line in man_section("CAVEATS"))
    for word in ("NO_PROXY", "fetch", "not implemented", "raw bytes"):
        assert word.lower() in caveats.lower(), word
    files = " ".join(macro_text(line) for line in man_section("FILES"))
    from dumpproxy.certs import CA_CERT_FILE, CA_FILE

    named = set(re.findall(r"ca-dir/([\w.-]+)", files))
    assert named == {CA_FILE, CA_CERT_FILE}, named
    assert "ca-key.pem" not in page


def test_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "dumpproxy", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    usage = text[: text.index("\n\n")]
    for form in ("dumpproxy [OPTIONS]", "-- CMD [ARG...]", "--check HOST:PORT",
                 "--pattern-for HOST:PORT", "--print-ca", "--completions bash|zsh|fish"):
        assert form in usage, form
    examples = text[text.index("examples:"):]
    assert len(re.findall(r"^  dumpproxy ", examples, re.M)) >= 2
    assert text.rstrip().endswith("see dumpproxy(1).")
    synopsis = " ".join(macro_text(line) for line in man_section("SYNOPSIS"))
    for opt in set(OPTION_RE.findall(synopsis)) | {"--"}:
        assert opt in usage, f"SYNOPSIS form with {opt} missing from --help usage"


# --------------------------------------------------------------------------- --completions


@pytest.mark.parametrize("shell, path", [("bash", BASH), ("zsh", ZSH), ("fish", FISH)])
def test_completions_option_prints_the_file(shell, path):
    proc = subprocess.run([sys.executable, "-m", "dumpproxy", "--completions", shell],
                          capture_output=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == path.read_bytes()


@pytest.mark.parametrize("shell, path", [("bash", BASH), ("zsh", ZSH), ("fish", FISH)])
def test_installed_completions_are_the_files(shell, path, venv_bin):
    """From a non-editable install (no checkout beside the package) as well."""
    assert installed_completions(venv_bin, shell) == path.read_bytes()
    site = list((venv_bin.parent / "lib").glob("python3*/site-packages/dumpproxy"))
    assert site and not (site[0].parent / "completions").exists()


def test_venv_bash_completes_from_the_printed_script(venv_bin):
    # `source <(dumpproxy --completions bash)` in a real bash, as the man page says
    got = complete_bash("dumpproxy --mo", loader=Loader("venv", venv_bin))
    assert got == ["--mode"], got
