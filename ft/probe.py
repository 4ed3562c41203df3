"""`python -m ft.probe concept=... [key=value ...]`: which neurons encode a concept?

1. Activations of every unit of `point` (all layers, or `layers`) over the concept's words: a word
   list reads each word alone as `[CLS] w [SEP]` at its position (as the vocabulary sweep does),
   sentences read each word at its first word piece in context.
2. A logistic probe with ElasticNet regularization (L1 + L2: `probe.l1_ratio`, strength `probe.C`,
   scikit-learn's saga solver) on standardized activations; accuracy on a held-out split of word
   types (`probe.test_fraction`, seeded): no word type is on both sides.
3. A control task (Hewitt and Liang 2019): every word type gets a random label drawn from the
   label distribution, the same label wherever the type occurs; the same probe on it gives the
   control accuracy; selectivity = accuracy - control accuracy.
4. Rankings of the units: by the probe's weight mass (sum over classes of |w|, NeuroX's top
   neurons) and probeless, by the class-mean difference (largest |mean of a class - mean of the
   rest| over classes, on standardized activations).

Writes a run directory (hydra.run.dir): `probe.parquet` (site, layer, unit, weight_mass, weight
(signed, toward the concept label, for two labels), mean_diff, rank_probe, rank_probeless; rank 1
= first), `config.yaml` and `summary.json` (probe/accuracy,
probe/control_accuracy, probe/selectivity, probe/top10_overlap, ..., and `ablate/*`), through the
run-directory manifest like ft.train's results.

5. Ablation (`ablate.top=N`, or `ablate.sites=[...]`; `ablate.top=0` turns it off): the probe's
   accuracy drop and the masked-token accuracy drop (where a masked-LM head exists) with those
   units ablated, against N random probed units over `ablate.seeds` draws: `ablation.parquet`
   and the `ablate/*` summary keys (ft.measure.probe_ablation).
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from ft.cli.probe_run import probe
from ft.core.errors import FtError
from ft.measure.probe import PROBE

CONFIG_DIR = str(files("ft.configs"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="probe")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ft.core.chatter import configure_output

    configure_output("info")
    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        summary = probe(cfg, run_dir)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = pd.read_parquet(run_dir / PROBE)
    for name, col in (("probe", "rank_probe"), ("probeless", "rank_probeless")):
        print(f"top 10 by {name}: {' '.join(table.nsmallest(10, col).site)}")
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"run directory: {run_dir}")


def cli() -> None:
    """`python -m ft.probe`: the checks ft.train has (one line, exit 2, nothing written), then Hydra."""
    from ft.cli.preflight import preflight
    from ft.cli.undo import nothing_left_if_refused

    preflight(sys.argv[1:], "probe")
    with nothing_left_if_refused(sys.argv[1:], "probe"):
        main()


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)


if __name__ == "__main__":
    cli()
