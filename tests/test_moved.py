"""Old import paths keep working after the restructure: every moved module by its old name (the
same module object), every name that left a module from that module, each with one FutureWarning."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from ft.core import moved


@pytest.mark.parametrize("old,new", sorted(moved.MOVED.items()))
def test_an_old_module_name_is_the_new_module(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # as in a fresh process
    monkeypatch.setattr(moved, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        f"{old} moved to {new}; import it from there"]


NAMES = sorted((module, name, home) for module, names in moved.MOVED_NAMES.items() for name, home in names.items())


@pytest.mark.parametrize("module,name,home", NAMES)
def test_a_name_that_left_a_module_still_imports_from_it(module, name, home, monkeypatch):
    monkeypatch.setattr(moved, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(importlib.import_module(module), name)
    assert got is getattr(importlib.import_module(home), name)
    assert any(f"{module}.{name} moved to {home}.{name}" in str(w.message) for w in caught)


def test_an_unknown_name_is_still_an_attribute_error():
    import ft.train

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ft.train.nothing_here  # noqa: B018


def test_the_old_expression_parser_path_works_through_both_moves():
    from ft.objectives import parse  # ft.objectives -> ft.targets.objectives -> parse in ft.targets.expressions

    from ft.targets.expressions import parse as new

    assert parse is new


def test_fts_own_code_imports_nothing_from_an_old_place():
    """The old paths are for users' code: ft itself (and its tests) import from the new homes, so a
    command never prints a FutureWarning of its own making."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for path in [*root.glob("ft/**/*.py"), *root.glob("tests/*.py")]:
        if path.name == "test_moved.py" or path.name == "test_premove_run.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module in moved.MOVED or moved.new_name(node.module) is not None:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module}")
                gone = moved.MOVED_NAMES.get(node.module, {})
                bad += [f"{path.relative_to(root)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                        if a.name in gone]
            elif isinstance(node, ast.Import):
                bad += [f"{path.relative_to(root)}:{node.lineno}: import {a.name}" for a in node.names
                        if moved.new_name(a.name) is not None]
    assert not bad, "\n".join(bad)
