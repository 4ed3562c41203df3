"""targets: what a run textualizes. The objectives algebra (`objectives`: readouts over sites that
add, subtract and scale), the `Target` row (`base`), the unit-kind registry (`registry`) and one
file per kind under `kinds/` (neuron, head, group, terms, direction, sae, logit, probe, cluster, ...),
SAE files (`sae_file`, `sae_demo`). May import `ft.core`, `ft.data`, `ft.model`, `ft.rundir`,
`ft.inputs`. Importing anything of `ft.targets` registers every shipped kind.
"""

import ft.targets.kinds  # noqa: F401  (each kind file registers itself)
from ft.targets.base import (  # noqa: F401
    Target,
    check_word,
    direction_lookup,
    number_targets,
    readouts_of_table,
    refuse_empty,
    unit_label,
    with_restarts,
)
from ft.targets.kinds.direction import direction_targets  # noqa: F401
from ft.targets.kinds.group import LATIN_WORD, SELECTIONS, group_targets, pick_words, select_group, target_words  # noqa: F401
from ft.targets.kinds.logit import logit_targets  # noqa: F401
from ft.targets.kinds.neuron import neuron_targets, site_target  # noqa: F401
from ft.targets.kinds.probe import probe_concept, probe_targets  # noqa: F401
from ft.targets.kinds.sae import check_sae_fits, sae_targets  # noqa: F401
from ft.targets.kinds.terms import terms_targets  # noqa: F401
from ft.targets.registry import UnitKind, register, unit_kind, unit_kinds  # noqa: F401

KINDS = tuple(unit_kinds())  # every registered kind's name (the targets table's `kind` values)
