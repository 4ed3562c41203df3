"""engine: the optimization itself. The LightningModule whose only trainable parameter is the
input (`module`), per-row state (`state`), convergence control (`control`), device strategy
(`strategy`), the token search step (`search`) and the cost planner (`plan`). May import the
layers below it: `core`, `data`, `model`, `rundir`, `inputs`, `targets`.
"""
