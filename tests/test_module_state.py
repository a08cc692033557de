"""No mutable state at module level in the package: what a run shares lives in
`context.Services` (handed down), so two proxies in one process, or a test beside a run,
never see each other's state. Constants and caches of pure functions are fine.

Checked two ways: every module-level value that is an instance of a dumpproxy class is
immutable (a frozen dataclass or an enum member), and no code in the package rebinds a
global (`global`) or changes a module-level container (item assignment, `del`, augmented
assignment, or a mutating method such as `append`/`update`), in its own module or through
another module's attribute."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import pkgutil

from conftest import ROOT

import dumpproxy

MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem",
            "remove", "discard", "clear", "sort", "reverse", "__setitem__", "__delitem__"}


def _modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(dumpproxy.__path__) if m.name != "__main__"]


def _containers(name: str) -> set[str]:
    mod = importlib.import_module(f"dumpproxy.{name}")
    return {k for k, v in vars(mod).items()
            if isinstance(v, (dict, list, set, bytearray)) and not k.startswith("__")}


def test_module_level_instances_are_immutable() -> None:
    found = []
    for name in _modules():
        mod = importlib.import_module(f"dumpproxy.{name}")
        for key, value in vars(mod).items():
            kind = type(value)
            if not kind.__module__.startswith("dumpproxy") or isinstance(value, type):
                continue
            frozen = dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen
            if not (frozen or isinstance(value, enum.Enum)):
                found.append(f"dumpproxy.{name}.{key}: a {kind.__name__}")
    assert not found, "mutable objects at module level (put them in Services):\n" + \
        "\n".join(found)


def _target_name(node: ast.AST, module_aliases: dict[str, str]) -> tuple[str, str] | None:
    """(module, NAME) when node names a module-level name: NAME, or alias.NAME."""
    if isinstance(node, ast.Name):
        return "", node.id
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases):
        return module_aliases[node.value.id], node.attr
    return None


def _mutations(path, own: str) -> list[tuple[str, str, int]]:
    """(module, NAME, line) for every place the file changes a module-level container or
    rebinds a global; "" as module means the file's own."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "dumpproxy":
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dumpproxy."):
                    aliases[a.asname or a.name.split(".")[-1]] = a.name.split(".")[1]
    out = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Global):
            out += [("", f"global {n}", node.lineno) for n in node.names]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            raw = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            targets = [t.value for t in raw if isinstance(t, ast.Subscript)]
            if isinstance(node, ast.AugAssign):
                targets.append(node.target)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MUTATORS):
            targets = [node.func.value]
        for t in targets:
            named = _target_name(t, aliases)
            if named is not None:
                out.append((named[0] or own, named[1], node.lineno))
    return out


def test_no_module_level_container_is_changed() -> None:
    containers = {name: _containers(name) for name in _modules()}
    found = []
    for path in sorted((ROOT / "dumpproxy").glob("*.py")):
        for module, name, line in _mutations(path, path.stem):
            if name.startswith("global ") or name in containers.get(module, ()):
                found.append(f"{path.name}:{line}: {name} (of {module})")
    assert not found, "module-level state changed at run time:\n" + "\n".join(found)


def test_the_check_sees_a_mutation(tmp_path) -> None:
    """The AST check finds the shapes it promises to find."""
    src = tmp_path / "m.py"
    src.write_text("TABLE = {}\nSEEN = []\nN = 0\n"
                   "def f(x):\n    TABLE[x] = 1\n    SEEN.append(x)\n"
                   "def g():\n    global N\n    N += 1\n")
    got = {(name, line) for _, name, line in _mutations(src, "m")}
    assert {("TABLE", 5), ("SEEN", 6), ("global N", 8)} <= got
