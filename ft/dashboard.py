"""W&B workspace and report definitions as code (`wandb-workspaces`).

`python -m ft.dashboard --entity ME --project ft [--publish]` builds a workspace that
compares ft runs at once (curves, the paper's summary metrics, per-layer metrics, the sweep
parameters) and a report with the same panels; `--publish` saves them (needs `wandb login`).
"""

from __future__ import annotations

import re

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

CURVES = ["act/mean", "act/max", "act/min"]
SUMMARY = ["final/activation_mean", "final/maw_activation_mean", "final/activation_ratio",
           "final/closest_cos_mean", "final/snapped_activation_mean", "final/closest_is_maw_rate"]
GROUPS = ["group/target_top1_rate", "group/target_top20_rate", "group/target_cos_mean"]
LAYERS = [f"layer_{i}/activation_mean" for i in range(12)]
SWEEP = ["optim.lr", "input.kind", "target.k", "target.selection", "reg.word"]


def panels() -> dict[str, list]:
    return {
        "Activation curves": [wr.LinePlot(title="objective (mean over targets)", x="Step", y=CURVES),
                              wr.LinePlot(title="per target", x="Step", metric_regex="act_target/.*")],
        "Table 1: single neurons": [wr.BarPlot(title=m, metrics=[m]) for m in SUMMARY],
        "Figures 2-4: per layer": [wr.LinePlot(title="activation per layer", x="Step", y=LAYERS)],
        "Tables 3-4: groups": [wr.BarPlot(title=m, metrics=[m], groupby="target.k") for m in GROUPS],
        "Sweeps": [wr.ParallelCoordinatesPlot(columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(c))
                                                       for c in SWEEP]
                                              + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m))
                                                 for m in ("final/activation_mean", *GROUPS[:2])]),
                   wr.ScatterPlot(title="lr vs target top-1", x=wr.Config("optim.lr"),
                                  y=wr.SummaryMetric("group/target_top1_rate"))],
    }


def build_workspace(entity: str, project: str = "ft") -> ws.Workspace:
    return ws.Workspace(
        entity=entity, project=project, name="ft: textualization runs",
        sections=[ws.Section(name=name, panels=p, is_open=True) for name, p in panels().items()],
        runset_settings=ws.RunsetSettings(groupby=[ws.Config("experiment_name")]),
    )


def build_report(entity: str, project: str = "ft") -> wr.Report:
    blocks: list = [wr.H1("ft: feature textualization"),
                    wr.P("Activation maximization for BERT neurons and neuron groups (Baeumel et al. 2023).")]
    for name, p in panels().items():
        blocks += [wr.H2(name), wr.PanelGrid(panels=p, runsets=[wr.Runset(entity, project)])]
    return wr.Report(project=project, entity=entity, title="ft: textualization report", blocks=blocks)


def main(argv: list[str] | None = None) -> None:
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--entity", required=True)
    p.add_argument("--project", default="ft")
    p.add_argument("--publish", action="store_true", help="save to W&B (needs `wandb login`)")
    args = p.parse_args(argv)
    for flag, v in (("--entity", args.entity), ("--project", args.project)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):  # an empty name built pages for no one, exit 0
            p.error(f"{flag} {v!r}; valid: a W&B {flag[2:]} name (letters, digits, _ . -)")
    workspace, report = build_workspace(args.entity, args.project), build_report(args.entity, args.project)
    if args.publish:
        print(workspace.save().url)
        print(report.save().url)
    else:
        print(f"built workspace with {len(workspace.sections)} sections and a report with "
              f"{len(report.blocks)} blocks; pass --publish to save them")


if __name__ == "__main__":
    main()
