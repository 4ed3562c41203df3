"""The package's shape, read from its source with `ast`: imports run one way between layers,
no module imports another that (through any chain) imports it back, and no subpackage imports a
command module (`python -m ft.X`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FT = Path(__file__).resolve().parents[1] / "ft"
# lowest first: a module may import its own layer and the layers before it, never one after it
LAYERS = ("core", "data", "model", "rundir", "inputs", "targets", "engine", "measure", "callbacks", "cli")
COMMANDS = len(LAYERS)  # the modules directly in ft/ (commands and the api) sit on top


def module_name(path: Path) -> str:
    parts = path.relative_to(FT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every ft module `path` imports at run time, at module level or inside a function (imports
    under `if TYPE_CHECKING:` name types only and are left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c == "ft" or c.startswith("ft."):
                found.add(c)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in FT.rglob("*.py") if "configs" not in p.parts}
    out: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps = set()
        for imported in imports_of(path, name):
            # `from ft.model import sites` names the module ft.model.sites; `from ft.x import f` the module ft.x
            while imported not in paths and "." in imported:
                imported = imported.rpartition(".")[0]
            if imported in paths and imported != name and imported != "ft":
                deps.add(imported)
        out[name] = deps
    return out


def rank(name: str) -> int:
    parts = name.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in LAYERS):  # ft.<layer>.x or the package ft.<layer>
        return LAYERS.index(parts[1])
    return COMMANDS


GRAPH = graph()


def test_the_layers_are_the_subpackages():
    found = {p.name for p in FT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"configs"}
    assert found == set(LAYERS), f"subpackages {sorted(found)} differ from the declared layers {LAYERS}"


def test_no_import_runs_up_a_layer():
    upward = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
                    if a != "ft" and rank(b) > rank(a))
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_no_subpackage_imports_a_command():
    commands = {n for n in GRAPH if rank(n) == COMMANDS and n != "ft"}
    bad = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps & commands if rank(a) < COMMANDS)
    assert not bad, "\n".join(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    g = {a: {b for b in deps if b != "ft"} for a, deps in GRAPH.items() if a != "ft"}
    assert not cycles(g), f"import circles: {cycles(g)}"


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name,expected", [("ft.core.errors", 0), ("ft.model.arch.bert", 2), ("ft.cli", 9),
                                           ("ft.train", COMMANDS)])
def test_rank_reads_the_layer_from_the_path(name, expected):
    assert rank(name) == expected


def test_at_most_fifteen_modules_directly_in_ft():
    top = sorted(p.name for p in FT.glob("*.py"))
    assert len(top) <= 15, top
