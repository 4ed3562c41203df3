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
# names that left a module that stays: module -> {name: the module it lives in now}
MOVED_NAMES: dict[str, dict[str, str]] = {'ft.api': {'run_paths': 'ft.rundir.results'},
     'ft.cli.preflight': {'Before': 'ft.cli.undo',
                          'DEPTH': 'ft.cli.undo',
                          'HYDRA_FILES': 'ft.cli.undo',
                          'NothingToDo': 'ft.cli.undo',
                          'folders': 'ft.cli.undo',
                          'hydra_file': 'ft.cli.undo',
                          'made_by': 'ft.cli.undo',
                          'nothing_left_if_refused': 'ft.cli.undo',
                          'only_hydra_files': 'ft.cli.undo',
                          'output_root': 'ft.cli.undo',
                          'override_keys': 'ft.cli.undo',
                          'remove_empty_up_to': 'ft.cli.undo',
                          'run_files_written': 'ft.cli.undo',
                          'take': 'ft.cli.undo',
                          'undo': 'ft.cli.undo'},
     'ft.cli.schema': {'SaeDemoSchema': 'ft.targets.kinds.sae'},
     'ft.core.signals': {'save_atomically': 'ft.callbacks.checkpoint'},
     'ft.examples': {'STOPWORDS': 'ft.measure.examples',
                     'Span': 'ft.measure.examples',
                     'TargetScorer': 'ft.measure.examples',
                     'corpus_search': 'ft.measure.examples',
                     'is_stopword': 'ft.measure.examples',
                     'local_search': 'ft.measure.examples',
                     'merge_top': 'ft.measure.examples',
                     'ngram_search': 'ft.measure.examples',
                     'passes': 'ft.measure.examples',
                     'prune': 'ft.measure.examples',
                     'text_of': 'ft.measure.examples',
                     'tokens_of': 'ft.measure.examples'},
     'ft.export': {'BATCH': 'ft.cli.neuronpedia',
                   'DATA_FILE': 'ft.cli.export_files',
                   'EXPLANATION_TYPE': 'ft.cli.neuronpedia',
                   'Entry': 'ft.cli.neuronpedia',
                   'GZ_TABLES': 'ft.cli.neuronpedia',
                   'HF_COLUMNS': 'ft.cli.export_files',
                   'RELEASE': 'ft.cli.neuronpedia',
                   'SAFE_ID': 'ft.cli.neuronpedia',
                   'SaeCopy': 'ft.cli.neuronpedia',
                   'Unit': 'ft.cli.neuronpedia',
                   'card': 'ft.cli.export_files',
                   'config_tables': 'ft.cli.neuronpedia',
                   'corpus_stats': 'ft.cli.neuronpedia',
                   'explanation_of': 'ft.cli.neuronpedia',
                   'finite': 'ft.cli.neuronpedia',
                   'gz': 'ft.cli.export_files',
                   'hf_rows': 'ft.cli.export_files',
                   'ident': 'ft.cli.neuronpedia',
                   'is_diverged': 'ft.cli.neuronpedia',
                   'jsonl': 'ft.cli.export_files',
                   'kept_input': 'ft.cli.neuronpedia',
                   'label_of': 'ft.cli.export_files',
                   'layout': 'ft.cli.neuronpedia',
                   'model_id_of': 'ft.cli.neuronpedia',
                   'model_row': 'ft.cli.neuronpedia',
                   'record_of': 'ft.cli.neuronpedia',
                   'run_entries': 'ft.cli.neuronpedia',
                   'run_label': 'ft.cli.export_files',
                   'run_labels': 'ft.cli.export_files',
                   'run_tag': 'ft.cli.neuronpedia',
                   'sae_copy': 'ft.cli.neuronpedia',
                   'separate_saes': 'ft.cli.neuronpedia',
                   'set_description': 'ft.cli.neuronpedia',
                   'source_tables': 'ft.cli.neuronpedia',
                   'staging': 'ft.cli.export_files',
                   'static_values': 'ft.cli.neuronpedia',
                   'top_activations': 'ft.cli.neuronpedia',
                   'top_layer': 'ft.cli.neuronpedia',
                   'unit_of': 'ft.cli.neuronpedia',
                   'with_sae_copies': 'ft.cli.neuronpedia',
                   'write_files': 'ft.cli.export_files'},
     'ft.model.fastforward': {'SHORT_SEQUENCE': 'ft.model.lean_plan'},
     'ft.model.vocab': {'WordStats': 'ft.measure.word_stats',
                        'logit_word_stats': 'ft.measure.word_stats',
                        'objective_chunks': 'ft.measure.word_stats',
                        'readout_values': 'ft.measure.word_stats',
                        'stream_word_stats': 'ft.measure.word_stats',
                        'vocab_objective': 'ft.measure.word_stats',
                        'weight_matrix': 'ft.measure.word_stats',
                        'word_stats': 'ft.measure.word_stats'},
     'ft.probe': {'PROBE_SUMMARY': 'ft.measure.probe',
                  'ProbeFit': 'ft.measure.probe',
                  'ablate_probe': 'ft.measure.probe',
                  'concept_activations': 'ft.measure.probe',
                  'concept_label': 'ft.targets.kinds.probe',
                  'concept_scores': 'ft.targets.kinds.probe',
                  'concept_words': 'ft.targets.kinds.probe',
                  'control_labels': 'ft.measure.probe',
                  'fit_probe': 'ft.measure.probe',
                  'max_positions': 'ft.measure.probe',
                  'probeless': 'ft.measure.probe',
                  'ranks': 'ft.measure.probe',
                  'split_types': 'ft.measure.probe'},
     'ft.report': {'CONFIG_COLUMNS': 'ft.cli.report_parts',
                   'CSS': 'ft.cli.report_parts',
                   'JS': 'ft.cli.report_parts',
                   'PAPER_TABLE4': 'ft.cli.report',
                   'WANDB_RUN_URL': 'ft.cli.report_parts',
                   'finite_rows': 'ft.cli.report_parts',
                   'flat': 'ft.cli.report_parts',
                   'fmt': 'ft.cli.report_parts',
                   'label_runs': 'ft.cli.report_parts',
                   'ms': 'ft.cli.report_parts',
                   'name_runs': 'ft.cli.report_parts',
                   'regression': 'ft.cli.report_parts',
                   'run_key': 'ft.cli.report_parts',
                   'run_name': 'ft.cli.report_parts',
                   'secondary': 'ft.cli.report_parts',
                   'section_atlas': 'ft.cli.report',
                   'section_compare': 'ft.cli.report',
                   'section_concepts': 'ft.cli.report',
                   'section_curves': 'ft.cli.report',
                   'section_frontier': 'ft.cli.report',
                   'section_groups': 'ft.cli.report',
                   'section_layers': 'ft.cli.report',
                   'section_pca': 'ft.cli.report',
                   'section_table1': 'ft.cli.report',
                   'section_table2': 'ft.cli.report',
                   'table': 'ft.cli.report_parts',
                   'user_set_run_name': 'ft.cli.report_parts',
                   'wandb_url': 'ft.cli.report_parts',
                   'word_vectors_for': 'ft.cli.report_parts'},
     'ft.static': {'COLUMNS': 'ft.model.static',
                   'HIDDEN_POINTS': 'ft.model.static',
                   'agreement': 'ft.model.static',
                   'readings': 'ft.model.static',
                   'top_tokens': 'ft.model.static',
                   'unit_vectors': 'ft.model.static',
                   'vocab_matrix': 'ft.model.static'},
     'ft.targets.objectives': {'DirectionLookup': 'ft.targets.expressions',
                               'SYNTAX': 'ft.targets.expressions',
                               'check_width': 'ft.targets.expressions',
                               'parse': 'ft.targets.expressions',
                               'reads_of': 'ft.targets.expressions'},
     'ft.train': {'IDENTITY': 'ft.cli.resume',
                  'RESUME_DEFAULTS': 'ft.cli.resume',
                  'RESUME_LOG': 'ft.cli.resume',
                  'RESUME_MAY_CHANGE': 'ft.cli.resume',
                  'TrainingDivergedError': 'ft.cli.run',
                  'best_restarts': 'ft.cli.build',
                  'build_module': 'ft.cli.build',
                  'build_sae_targets': 'ft.targets.kinds.sae',
                  'build_search_module': 'ft.cli.build',
                  'build_targets': 'ft.cli.build',
                  'checkpoint_origin': 'ft.cli.resume',
                  'checkpoint_to_resume': 'ft.cli.resume',
                  'corpus_path': 'ft.data.corpus',
                  'curve_table': 'ft.cli.build',
                  'engine_chunk': 'ft.cli.build',
                  'fast_choice': 'ft.cli.build',
                  'fluency_weights': 'ft.cli.build',
                  'frontier_table': 'ft.cli.build',
                  'input_sources': 'ft.cli.resume',
                  'keep_inputs': 'ft.cli.resume',
                  'made_by': 'ft.cli.resume',
                  'prepare_targets': 'ft.cli.build',
                  'probe_concept': 'ft.targets.kinds.probe',
                  'quiet_expected_warnings': 'ft.cli.run',
                  'read_checkpoint': 'ft.cli.resume',
                  'read_checkpoint_step': 'ft.cli.resume',
                  'record_resume': 'ft.cli.resume',
                  'refuse_changed_inputs': 'ft.cli.resume',
                  'resume_changes': 'ft.cli.resume',
                  'resumed_demo_sae': 'ft.cli.resume',
                  'row_fluency_weights': 'ft.cli.build',
                  'select_targets': 'ft.cli.build'}}
_warned: set[str] = set()


def moved_attribute(module: str, name: str) -> object:
    """`module.name` for a name that moved to another module (a module's `__getattr__` calls this):
    the object from its new home, with a FutureWarning once per name; AttributeError otherwise."""
    home = MOVED_NAMES.get(module, {}).get(name)
    if home is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    if f"{module}.{name}" not in _warned:
        _warned.add(f"{module}.{name}")
        warnings.warn(f"{module}.{name} moved to {home}.{name}; import it from there", FutureWarning, stacklevel=3)
    return getattr(importlib.import_module(home), name)


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
