"""targets: what a run textualizes. The objectives algebra (`objectives`: readouts over sites
that add, subtract and scale), the `Target` row (`base`), SAE files (`sae_file`, `sae_demo`) and
clusters. May import `ft.core`, `ft.data`, `ft.model`, `ft.rundir`, `ft.inputs`.
"""

from ft.targets.base import *  # noqa: F401,F403
from ft.targets.base import KINDS, Target  # noqa: F401
