"""inputs: the trainable input, one parameterization per kind, one file per kind (onehot, embedding,
softmax, gumbel, projected, tokens), each registering its `InputKind` (ft.inputs.registry) under the
`input.kind` it is built from. May import `ft.core`, `ft.data`, `ft.model`, `ft.rundir`.
`ft.inputs.build_input` and `ft.inputs.build_projected` are the `_target_`s of the shipped configs
(configs/input/tokens.yaml names `ft.engine.search.build_token_input`, which is `build_token_input`).
"""

# isort: off
# each file registers its kind, in this order: input_kinds(), KINDS and the config schema's choices
from ft.inputs import onehot, embedding, softmax, gumbel, projected, tokens  # noqa: F401
# isort: on
from ft.inputs.base import (  # noqa: F401
    InputParam,
    initial_embeds,
    initial_onehot,
    initial_row,
    is_linear_optimizer,
    random_tokens,
)
from ft.inputs.embedding import EmbeddingInput  # noqa: F401
from ft.inputs.gumbel import GumbelInput  # noqa: F401
from ft.inputs.onehot import OneHotFastInput, OneHotInput  # noqa: F401
from ft.inputs.projected import ProjectedInput, build_projected  # noqa: F401
from ft.inputs.registry import (  # noqa: F401
    InputArgs,
    InputKind,
    build_input,
    find_input_kind,
    input_kind,
    input_kinds,
    register,
    unregister,
)
from ft.inputs.softmax import SoftmaxInput  # noqa: F401
from ft.inputs.tokens import MAX_LENGTH, TokenInput, build_token_input, initial_tokens  # noqa: F401

# the kinds built by `ft.inputs.build_input` from their shipped config, registered here (as before the
# registry: onehot, embedding, softmax, gumbel); `input_kinds()` has every kind
KINDS = tuple(name for name in input_kinds() if input_kind(name).target == "ft.inputs.build_input")
