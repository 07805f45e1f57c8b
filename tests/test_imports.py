"""The project's import graph: no circle between its modules, and project imports at the top of files.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import`/`from` of a project
module B in module A, typing-only imports (under `if TYPE_CHECKING:`) aside. A circle would mean two modules that
cannot be understood, or loaded, one before the other; a function-local project import usually hides one.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "runtimes", "corpus_tools", "gate", "bench")
MAX_LOCAL = 3   # function-local project imports allowed in all (each with its reason in a comment)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def targets(node: ast.ImportFrom | ast.Import, mod: str, path: Path, mods: dict) -> list[str]:
    """The project modules an import statement loads (a `from pkg import name` of a submodule names it)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


@functools.cache   # three tests read it; parsing the project takes a second or more
def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(edges, function-local project imports as (module, imported, line)); read-only for the tests."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If) and "TYPE_CHECKING" in
                       ast.unparse(top.test) for n in ast.walk(top)}
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                for t in targets(node, mod, path, mods):
                    if t != mod and not mod.startswith(t + "."):   # a package's own __init__ is not a circle
                        edges[mod].add(t)
                        if id(node) in in_function:
                            local.append((mod, t, node.lineno))
    return edges, local


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_finds_a_circle_when_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_project_modules():
    edges, _ = graph()
    assert len(edges) > 50   # the scan found the project
    assert circles(edges) == []


def test_project_imports_are_at_the_top_of_files():
    _, local = graph()
    assert len(local) <= MAX_LOCAL, local


def test_layers_import_downward_only():
    """common <- runtimes <- corpus_tools <- gate <- bench: no package imports one above it."""
    order = {p: i for i, p in enumerate(PACKAGES)}
    edges, _ = graph()
    upward = [(a, b) for a, targets_ in edges.items() for b in targets_
              if order[b.split(".")[0]] > order[a.split(".")[0]]]
    assert upward == []
