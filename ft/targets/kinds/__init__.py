"""One file per unit kind; each registers its `UnitKind` (ft.targets.registry) when imported.
Every module of this folder is imported here, so a new kind is a new file and nothing else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
