"""inputs: the trainable input, one parameterization per kind (onehot, embedding, softmax,
gumbel, projected, tokens), built from `input.kind`. May import `ft.core`, `ft.data`, `ft.model`.
`ft.inputs.build_input` and `ft.inputs.build_projected` are the `_target_`s of the shipped configs.
"""

from ft.inputs.base import *  # noqa: F401,F403
from ft.inputs.base import KINDS, InputParam, build_input, build_projected  # noqa: F401
