"""The input-kind registry (ft.inputs.registry): every kind builds from `build_input` and from its
shipped config, the registry and configs/input agree, a kind added outside ft is found and built,
and the temperature callback asks the input whether it anneals."""

from __future__ import annotations

import re
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ft.callbacks import TemperatureSchedule
from ft.core.errors import ConfigError
from ft.inputs import (
    KINDS,
    EmbeddingInput,
    InputArgs,
    InputKind,
    InputParam,
    build_input,
    initial_embeds,
    input_kind,
    input_kinds,
    register,
    unregister,
)
from ft.model.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "input"


def shipped() -> dict[str, dict]:
    """configs/input/*.yaml by file name: the composed `input` node of each."""
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted(CONFIGS.glob("*.yaml"))}


def allowed_of(tiny) -> torch.Tensor:
    return Vocabulary.from_tokenizer(tiny.tokenizer).ids


def test_the_registry_names_the_kinds_of_the_shipped_configs():
    configs = shipped()
    assert set(input_kinds()) == {c["kind"] for c in configs.values()}
    assert len(input_kinds()) == len(configs)
    for stem, c in configs.items():
        assert c["kind"] == stem, f"configs/input/{stem}.yaml says kind={c['kind']}"
        assert c["_target_"] == input_kind(stem).target, stem
    assert KINDS == ("onehot", "embedding", "softmax", "gumbel")  # those `ft.inputs.build_input` builds from a config
    assert input_kinds()[: len(KINDS)] == list(KINDS)


def test_what_each_kind_says_about_itself():
    facts = {name: (k.needs_vocabulary_ids, k.swap_search, k.snaps_by_argmax, k.yields_tokens, k.max_length)
             for name in input_kinds() for k in [input_kind(name)]}
    assert facts == {
        "onehot": (False, False, False, False, None), "embedding": (False, False, False, False, None),
        "softmax": (False, False, True, False, None), "gumbel": (False, False, True, False, None),
        "projected": (True, False, False, True, None), "tokens": (True, True, False, True, 32),
    }
    for name in input_kinds():
        summary = input_kind(name).summary
        assert summary and "\n" not in summary and len(summary) <= 110, name


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("name", ["onehot", "embedding", "softmax", "gumbel", "projected", "tokens"])
def test_every_kind_builds_from_build_input_and_from_its_config(tiny, name, length):
    assert name in input_kinds()
    W, allowed, targets = tiny.word_embeddings, allowed_of(tiny), [0, 3, 5]
    kind = input_kind(name)
    extra = {"allowed": allowed} if kind.needs_vocabulary_ids else {}
    opt = partial(torch.optim.Adam, lr=0.1)
    direct = build_input(name, targets, W, length=length, seed=2, optimizer=opt, **extra)
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.length = length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        made = instantiate(cfg)(target_ids=targets, word_embeddings=W, seed=2, optimizer=opt, **extra)
    for p in (direct, made):
        assert isinstance(p, InputParam) and p.name == name
        p.eval()  # gumbel: noise-free
        e = p.embeds(W.detach())
        assert e.shape == (len(targets), length, W.shape[1]), (name, tuple(e.shape))
        assert p.param.shape[:2] == (len(targets), length)
        assert p.probabilistic == kind.snaps_by_argmax
        ids = p.discrete_ids(W.detach())
        assert (ids is not None) == kind.yields_tokens
        if ids is not None:
            assert ids.shape == (len(targets), length) and torch.isin(ids, allowed).all()
    torch.testing.assert_close(made.embeds(W.detach()), direct.embeds(W.detach()))


def test_a_kind_that_needs_the_vocabulary_refuses_to_build_without_it(tiny):
    for name in input_kinds():
        if input_kind(name).needs_vocabulary_ids:
            with pytest.raises(ConfigError, match=f"input={name} .*vocabulary"):
                build_input(name, [0], tiny.word_embeddings)


def test_lengths_are_checked_for_every_kind(tiny):
    W, allowed = tiny.word_embeddings, allowed_of(tiny)
    for name in input_kinds():
        with pytest.raises(ConfigError, match=re.escape("input.length=0; valid")):
            build_input(name, [0], W, length=0, allowed=allowed)
    with pytest.raises(ConfigError, match=re.escape("input.length=33; valid: 1..32 for input=tokens")):
        build_input("tokens", [0], W, length=33, allowed=allowed)
    assert build_input("embedding", [0], W, length=33).param.shape[1] == 33


def test_an_unknown_kind_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        input_kind("logits")
    message = str(err.value)
    assert "input.kind='logits'" in message
    for name in input_kinds():
        assert name in message
    with pytest.raises(ConfigError, match="input.kind='nope'; valid: onehot, embedding"):
        build_input("nope", [0], torch.zeros(4, 2))


class Doubled(InputKind):
    """A kind from outside ft: the embedding input, started twice as far out."""

    name = "doubled-test"
    summary = "the embedding input from 2 x0 · W (a test's own kind)"

    def build(self, a: InputArgs) -> InputParam:
        return EmbeddingInput(2 * initial_embeds(a.target_ids, a.length, a.word_embeddings, a.init_std, a.seed))


def test_a_kind_registered_outside_ft_is_found_and_built(tiny):
    W = tiny.word_embeddings
    assert "doubled-test" not in input_kinds()
    register(Doubled())
    try:
        assert isinstance(input_kind("doubled-test"), Doubled) and "doubled-test" in input_kinds()
        p = build_input("doubled-test", [0, 1], W, length=2, seed=3)
        plain = build_input("embedding", [0, 1], W, length=2, seed=3)
        torch.testing.assert_close(p.embeds(W.detach()), 2 * plain.embeds(W.detach()))
        with pytest.raises(ConfigError, match="input.length=0"):  # the shared checks apply to it too
            build_input("doubled-test", [0], W, length=0)

        class Impostor(Doubled):
            pass

        with pytest.raises(ValueError, match="taken"):
            register(Impostor())
        register(Doubled())  # the same class again (a reloaded module): fine
    finally:
        unregister("doubled-test")
    assert "doubled-test" not in input_kinds()
    with pytest.raises(ConfigError, match="doubled-test"):
        input_kind("doubled-test")


class Warming(EmbeddingInput):
    """An input that anneals without being gumbel: the callback must ask it, not check its class."""

    name = "warming"
    anneals = True

    def __init__(self, e0: torch.Tensor):
        super().__init__(e0)
        self.calls: list[tuple[int, int]] = []
        self.t = 1.0

    def anneal_total(self, max_steps: int) -> int:
        return 2 * max_steps

    def anneal(self, step: int, total: int) -> float:
        self.calls.append((step, total))
        self.t = 1.0 + step
        return self.t

    @property
    def temperature(self) -> float:
        return self.t

    @property
    def final_temperature(self) -> float:
        return 0.5


class Cold(EmbeddingInput):
    """An input that does not anneal: the callback leaves it alone."""

    def anneal(self, step: int, total: int) -> float:
        raise AssertionError("annealed an input that does not anneal")


def fake_module(inputs: InputParam, step: int = 0) -> SimpleNamespace:
    logged: list[tuple[str, float]] = []
    return SimpleNamespace(inputs=inputs, state=SimpleNamespace(step=step), logged=logged,
                           log=lambda key, value, **_: logged.append((key, value)))


def test_the_temperature_callback_anneals_only_an_input_that_says_it_anneals(tiny):
    cb, trainer = TemperatureSchedule(), SimpleNamespace(max_steps=5)
    e0 = torch.zeros(2, 1, 4)
    warm = fake_module(Warming(e0), step=3)
    with pytest.warns(UserWarning, match="warming anneal_steps=10 > trainer.max_steps=5"):
        cb.on_train_start(trainer, warm)
    cb.on_train_batch_start(trainer, warm, None, 0)
    assert warm.inputs.calls == [(3, 10)] and warm.logged == [("input/tau", 4.0)]
    with pytest.warns(UserWarning, match="ended at tau=4 before the warming schedule"):
        cb.on_train_end(trainer, warm)

    for inputs in (Cold(e0), build_input("softmax", [0], tiny.word_embeddings),
                   build_input("embedding", [0], tiny.word_embeddings)):
        cold = fake_module(inputs, step=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cb.on_train_start(trainer, cold)
            cb.on_train_batch_start(trainer, cold, None, 0)
            cb.on_train_end(trainer, cold)
        assert cold.logged == []
    assert cb.on_train_batch_start(trainer, SimpleNamespace(), None, 0) is None  # a module without inputs

    gumbel = fake_module(build_input("gumbel", [0], tiny.word_embeddings, tau_start=2.0, tau_end=0.5), step=4)
    assert gumbel.inputs.anneals and gumbel.inputs.temperature == pytest.approx(2.0)
    cb.on_train_batch_start(trainer, gumbel, None, 0)
    assert gumbel.logged == [("input/tau", pytest.approx(0.5))] and float(gumbel.inputs.tau) == pytest.approx(0.5)


def test_callers_ask_the_registry_and_the_object_not_the_kind_string():
    """No `kind ==` / `kind in` / `kind !=` in the inputs, the engine or the callbacks, and the
    temperature callback names no parameterization class."""
    pattern = re.compile(r"kind (==|in |!=)")
    found = [f"{p.relative_to(ROOT)}:{i}" for layer in ("inputs", "engine", "callbacks")
             for p in sorted((ROOT / "ft" / layer).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
    source = (ROOT / "ft" / "callbacks" / "temperature.py").read_text()
    assert "GumbelInput" not in source and "isinstance" not in source


def test_the_old_token_input_names_still_resolve():
    import ft.engine.search as search
    import ft.inputs as inputs

    assert search.build_token_input is inputs.build_token_input and search.TokenInput is inputs.TokenInput
    assert search.MAX_LENGTH == input_kind("tokens").max_length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        made = instantiate({"_target_": "ft.search.build_token_input", "_partial_": True, "kind": "tokens",
                            "length": 2})  # the `_target_` of run directories written before ft.engine
    p = made(target_ids=[0, 1], word_embeddings=torch.randn(9, 4), allowed=torch.arange(5, 9), seed=0)
    assert isinstance(p, inputs.TokenInput) and p.ids.shape == (2, 2) and bool((p.ids >= 5).all())
