"""ft: feature textualization for the units of BERT-family encoders.

    import ft
    result = ft.textualize(sites=["layer.3.ffn_out.17"], steps=200)
    result.targets[["sites", "objective", "most_activating_word", "closest_words"]]
    ft.load(result.run_dir)  # the same result, from disk

`ft.load_runs(paths)` reads many runs as `(targets, runs)` tables (ft.rundir.results).
"""

from __future__ import annotations

from ft.core.moved import install as _install_moved

_install_moved()  # `import ft.results` (an old name) finds ft.rundir.results, with a warning
__version__ = "0.1.0"
__all__ = ["Result", "__version__", "compose_config", "load", "load_runs", "textualize"]


def __getattr__(name: str):  # lazy: `import ft` stays cheap (torch loads on first use)
    if name in ("Result", "compose_config", "load", "load_runs", "textualize"):
        from ft import api

        return getattr(api, name)
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"ft.{name}") is not None:  # ft.train, ft.model, ...
        return importlib.import_module(f"ft.{name}")
    raise AttributeError(f"module 'ft' has no attribute {name!r}")
