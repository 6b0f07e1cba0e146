"""Imports run one way: glm4v (the network) → quant (loading) → engine → server | profiling → glm4v_edge (the CLI).

The in-repository form of vLLM's forbidden-imports hook: every import in every file — at module level or inside a
function, and ``importlib.import_module("...")`` with a literal name — is read from the source, and an arrow
against that order fails the test; so does an import cycle between files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"glm4v": 0, "quant": 1, "engine": 2, "server": 3, "profiling": 3, "glm4v_edge": 4}


def package_files() -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, me: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (module ``me``, by default its own name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            out.append((node.lineno, prefix))
            out += [(node.lineno, f"{prefix}.{a.name}") for a in node.names]  # `from pkg import module`
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def test_every_import_follows_the_layers():
    wrong = []
    for path in package_files():
        mine = module_name(path).split(".")[0]
        for line, name in imports_of(path):
            theirs = name.split(".")[0]
            if theirs not in LAYERS or theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against glm4v → quant → engine → server | profiling → glm4v_edge:\n" + "\n".join(wrong)


def test_no_import_cycle_between_files():
    files = {module_name(p): p for p in package_files()}
    graph = {m: set() for m in files}
    for m, path in files.items():
        for _, name in imports_of(path):
            while name and name not in files:  # `from pkg.mod import Class` → pkg.mod
                name = name.rpartition(".")[0]
            if name and name != m and not m.startswith(name + "."):  # a package's own __init__ is not a cycle
                graph[m].add(name)
    done, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            if not n.startswith(m + "."):  # a package importing its own submodules is how packages work
                visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "source,expected",
    [
        ("from server.app import create_app", "server.app"),
        ("import importlib\nimportlib.import_module('server.cli')", "server.cli"),
        ("def f():\n    from server import app", "server.app"),
        ("from .. import positions", "glm4v.positions"),
    ],
)
def test_the_checker_sees_imports(tmp_path, source, expected):
    f = tmp_path / "probe.py"
    f.write_text(source)
    assert expected in [n for _, n in imports_of(f, me="glm4v.sub.probe")]
