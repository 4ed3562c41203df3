"""The unit-kind registry: the shipped kinds and their configs agree, one spelling per kind with
the older ones still read, and a kind defined in one place (here, in a test) is checked, built,
labelled and rebuilt by the same code paths as the shipped ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from ft.cli.hydra_conf import CONFIG_DIR
from ft.cli.schema import check_config, target_keys
from ft.core.errors import ConfigError
from ft.core.typed import Int
from ft.model.sites import Site
from ft.targets import Target, readouts_of_table, unit_kind, unit_kinds, unit_label
from ft.targets.objectives import mean, neuron
from ft.targets.registry import BuildContext, RebuildContext, UnitKind, canonical, register, unregister
from tests.test_train import compose_cfg

TARGET_YAMLS = sorted((Path(CONFIG_DIR) / "target").glob("*.yaml"))


def test_every_target_option_is_a_registered_kind_and_back():
    """configs/target/<option>.yaml names its kind by its one spelling; each kind with an option has
    its yaml; kinds without one (head) are made by another kind's targets."""
    yaml_kinds = {p.stem: yaml.safe_load(p.read_text())["kind"] for p in TARGET_YAMLS}
    for option, kind in yaml_kinds.items():
        assert unit_kind(kind).name == kind and unit_kind(kind).option == option, option
    options = {unit_kind(n).option: n for n in unit_kinds() if unit_kind(n).option}
    assert options == {o: k for o, k in yaml_kinds.items()}


def test_every_kinds_keys_are_the_keys_of_its_yaml():
    """The schema's keys for a kind are exactly those its shipped yaml sets (no stale key, none missing)."""
    for p in TARGET_YAMLS:
        node = yaml.safe_load(p.read_text())
        assert set(target_keys()[node["kind"]]) == set(node), p.name


def test_an_older_spelling_is_read_as_the_kind():
    assert canonical("clusters") == "cluster" and unit_kind("clusters") is unit_kind("cluster")
    cfg = compose_cfg(["target=clusters", "target.kind=clusters"])
    check_config(cfg)  # stored configs of runs before one spelling per kind still check


def test_an_unknown_kind_names_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        unit_kind("neurons")
    assert "target.kind='neurons'" in str(e.value) and all(n in str(e.value) for n in unit_kinds())


class Pair(UnitKind):
    """A kind made up here: the mean of two units of one layer (`target.layer`, `target.units`)."""

    name = "pair_of_units"
    option = None
    summary_line = "two units of ffn_out in one layer"
    keys = {"layer": Int(ge=0), "units": list[int]}

    def check(self, t: dict) -> None:
        if len(t["units"]) != 2:
            raise ConfigError(f"target.units={t['units']}; valid: two units")

    def build(self, ctx: BuildContext) -> list[Target]:
        t = ctx.cfg.target
        return [Target(self.name, mean([Site(t.layer, "ffn_out", u) for u in t.units]))]

    def label(self, t: Target) -> str:
        return "pair " + "+".join(str(s.unit) for s in t.sites)

    def rebuild(self, row: Any, ctx: RebuildContext):
        return mean([Site.parse(s).check(ctx.model) for s in row.sites])


@pytest.fixture
def pair_kind():
    register(Pair)
    yield unit_kind("pair_of_units")
    unregister("pair_of_units")


def test_a_kind_defined_in_one_place_runs_through_every_seam(pair_kind, tiny, tmp_path):
    from ft.cli.run import run
    from ft.rundir.results import read_targets

    base = [f"model.name_or_path={tiny.name}", "trainer.max_steps=3", "logger.wandb.mode=disabled",
            "+trainer.enable_progress_bar=false"]
    cfg = compose_cfg(base)
    with pytest.raises(ConfigError, match="target.units=\\[1\\]; valid: two units"):  # its own check
        cfg.target = {"kind": "pair_of_units", "layer": 1, "units": [1], "seed": 0, "shard": 0, "num_shards": 1}
        check_config(cfg)
    with pytest.raises(ConfigError, match="target.point: unknown key for target kind 'pair_of_units'"):
        cfg.target = {"kind": "pair_of_units", "layer": 1, "units": [1, 2], "point": "ffn_out", "seed": 0,
                      "shard": 0, "num_shards": 1}
        check_config(cfg)
    cfg.target = {"kind": "pair_of_units", "layer": 1, "units": [3, 5], "seed": 0, "shard": 0, "num_shards": 1}
    run(cfg, tmp_path / "run", tiny)
    df = read_targets(tmp_path / "run")
    assert list(df.kind) == ["pair_of_units"] and list(df.label) == ["pair 3+5"]
    (rebuilt,) = readouts_of_table(tiny.model, df)
    assert rebuilt.weights == mean([Site(1, "ffn_out", 3), Site(1, "ffn_out", 5)]).weights


def test_labels_come_from_the_kind():
    t = Target("neuron", neuron(Site(2, "ffn_out", 7)))
    assert unit_label(t) == "layer.2.ffn_out.7" == t.label
    frame = pd.DataFrame({"kind": ["neuron"], "sites": [["layer.0.ffn_out.1"]]})
    assert frame.kind.map(lambda k: unit_kind(k).report_table).tolist() == ["neurons"]
