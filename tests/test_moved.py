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
