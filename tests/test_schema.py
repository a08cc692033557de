"""The event schema: `dumpproxy --schema`, the packaged copy, and the man page against it.

Every event line the rest of the suite sees is validated by conftest's SCHEMA_CHECK; these
tests check the schema itself, and that it is strict enough for that to mean something.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources

import pytest
from conftest import ROOT, SCHEMA_CHECK
from jsonschema import Draft202012Validator

from dumpproxy.schema import EVENTS, STAGES, event_fields

MAN = (ROOT / "man" / "dumpproxy.1").read_text()


def schema_output() -> bytes:
    r = subprocess.run([sys.executable, "-m", "dumpproxy", "--schema"], cwd=ROOT,
                       capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    return r.stdout


def test_schema_option_prints_a_valid_2020_12_schema_that_the_package_ships() -> None:
    out = schema_output()
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert sorted(schema["$defs"]) == sorted(EVENTS)
    shipped = resources.files("dumpproxy").joinpath("event-schema.json").read_bytes()
    assert shipped == out, "dumpproxy/event-schema.json is stale: regenerate with --schema"
    r = subprocess.run([sys.executable, "-m", "json.tool"], input=out, capture_output=True)
    assert r.returncode == 0


GOOD = {"ts": 1.5, "event": "error", "conn": 1, "client": "127.0.0.1:5", "stage": "http",
        "message": "bad"}


@pytest.mark.parametrize("change, why", [
    ({"event": "errors"}, "unknown event"),
    ({"stage": "nonsense"}, "stage outside the closed list"),
    ({"flow": "1"}, "wrong type"),
    ({"extra": 1}, "field not in the definition"),
    ({"message": None}, "null where a string is required"),
])
def test_schema_rejects_what_the_definitions_do_not_allow(change: dict, why: str) -> None:
    validator = SCHEMA_CHECK.whole
    assert validator.is_valid(GOOD)
    assert not validator.is_valid({**GOOD, **change}), why


def test_schema_requires_the_fields_every_event_of_a_kind_has() -> None:
    ev = {"ts": 1.0, "event": "server_connect", "conn": 1, "client": "c", "server": 1,
          "address": "a:1", "ip": "1.2.3.4:1"}
    assert not SCHEMA_CHECK.whole.is_valid(ev)  # connect_ms missing
    assert SCHEMA_CHECK.whole.is_valid({**ev, "connect_ms": 0.5})
    assert not SCHEMA_CHECK.whole.is_valid({"ts": 1.0, "event": "client_connect"})  # no conn


def test_key_order_is_checked_against_the_definitions() -> None:
    before = len(SCHEMA_CHECK.failures)
    SCHEMA_CHECK.check({"ts": 1.0, "event": "error", "stage": "http", "message": "m",
                        "address": "a:1", "flow": 2})
    assert "out of order" in SCHEMA_CHECK.failures[-1]
    del SCHEMA_CHECK.failures[before:]  # a deliberate failure, not one of the suite's


def _man_section(name: str) -> str:
    m = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH )", MAN, re.S | re.M)
    assert m, name
    return m.group(1)


def _man_event_entries() -> dict[str, str]:
    """EVENTS section: `.TP` / `.B name` entries and their text."""
    body = _man_section("EVENTS").split("\n.SS ")[0]
    body = re.sub(r"^\.RS\n.*?^\.RE\n", "", body, flags=re.S | re.M)  # nested lists
    entries = re.split(r"^\.TP\n\.B ", body, flags=re.M)[1:]
    return {e.split("\n", 1)[0]: e.split("\n", 1)[1] for e in entries}


def _bold_words(text: str) -> set[str]:
    words = set()
    for line in text.splitlines():
        m = re.match(r"\.(?:B|BR|RB) (.*)", line)
        if m:
            words.update(w.strip('",()') for w in m.group(1).split())
    return words


def test_man_page_describes_every_event_and_field_of_the_schema() -> None:
    entries = _man_event_entries()
    assert set(entries) == set(EVENTS)
    common = {"ts", "event", "conn", "client"}
    for name, text in entries.items():
        missing = set(event_fields(name)) - common - _bold_words(text)
        assert not missing, f"man page: event {name} does not name {sorted(missing)}"


def test_man_page_lists_exactly_the_error_stages_of_the_code() -> None:
    events = _man_section("EVENTS")
    nested = re.search(r"The stages, a closed list:\n\.RS\n(.*?)^\.RE\n", events, re.S | re.M)
    assert nested, "the error stages are listed in an .RS/.RE list"
    listed = re.findall(r"^\.TP\n\.B (\w+)\n", nested.group(1), re.M)
    assert sorted(listed) == sorted(STAGES)
    assert len(listed) == len(set(listed))


def test_man_page_example_events_match_the_schema() -> None:
    examples = re.search(r"Example lines.*?\.EX\n(.*?)\.EE", _man_section("EVENTS"), re.S)
    assert examples
    lines = [line.replace("\\-", "-").replace("\\e", "\\")
             for line in examples.group(1).splitlines()]
    assert len(lines) >= 3
    for line in lines:
        ev = json.loads(line)
        assert SCHEMA_CHECK.whole.is_valid(ev), line
        assert list(ev) == [k for k in event_fields(ev["event"]) if k in ev], line
