"""Old module names that keep working: `import ft.results` finds `ft.rundir.results`.

ft's modules moved into subpackages (ft.core, ft.model, ...). Notebooks, pickled checkpoints and
the `_target_` strings stored in older run directories' `config.yaml` still name the old places;
an import finder maps each old name to its new module (the same module object, so a
monkeypatch or an isinstance check sees one module) and warns once per old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {  # old name -> new name
    "ft.errors": "ft.core.errors",
    "ft.bars": "ft.core.bars",
    "ft.chatter": "ft.core.chatter",
    "ft.cpuinfo": "ft.core.cpuinfo",
    "ft.cpualloc": "ft.core.cpualloc",
    "ft.integrity": "ft.core.integrity",
    "ft.signals": "ft.core.signals",
    "ft.corpus": "ft.data.corpus",
    "ft.concepts": "ft.data.concepts",
    "ft.directions": "ft.data.directions",
    "ft.arch": "ft.model.arch",
    "ft.encoder": "ft.model.encoder",
    "ft.sites": "ft.model.sites",
    "ft.fastforward": "ft.model.fastforward",
    "ft.leangrad": "ft.model.leangrad",
    "ft.ablate": "ft.model.ablate",
    "ft.vocab": "ft.model.vocab",
    "ft.substitutes": "ft.model.substitutes",
    "ft.objectives": "ft.targets.objectives",
    "ft.sae": "ft.targets.sae_file",
    "ft.sae_train": "ft.targets.sae_demo",
    "ft.clusters": "ft.targets.kinds.cluster",
    "ft.module": "ft.engine.module",
    "ft.state": "ft.engine.state",
    "ft.control": "ft.engine.control",
    "ft.strategy": "ft.engine.strategy",
    "ft.search": "ft.engine.search",
    "ft.plan": "ft.engine.plan",
    "ft.metrics": "ft.measure.metrics",
    "ft.fluency": "ft.measure.fluency",
    "ft.probe_ablation": "ft.measure.probe_ablation",
    "ft.results": "ft.rundir.results",
    "ft.tracking": "ft.rundir.tracking",
    "ft.kept": "ft.rundir.kept",
    "ft.schema": "ft.cli.schema",
    "ft.preflight": "ft.cli.preflight",
    "ft.hydra_conf": "ft.cli.hydra_conf",
    "ft.svg": "ft.cli.svg",
}
_warned: set[str] = set()


def new_name(old: str) -> str | None:
    """`ft.arch.bert` -> `ft.model.arch.bert`; None if `old` did not move."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if spec.name not in _warned:
            _warned.add(spec.name)
            warnings.warn(f"{spec.name} moved to {self.target}; import it from there", FutureWarning,
                          stacklevel=2)
        module = importlib.import_module(self.target)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module was executed when it was first imported."""


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds old module names only; every other import goes to the normal finders."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(name)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(name, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
