"""`python -m ft.bench`: ft's engine against the plain per-neuron loop, in one process.

Runs, on the same machine and in the same process:
1. the naive reference: one neuron at a time, full model forward, the literal input-space
   SGD (x in R^vocab, e = x·W_word), float32 -- plain PyTorch, no tricks;
2. ft's engine (the Lightning Trainer and TextualizationModule) over the paper's
   single-neuron protocol: 10% of the neurons of every layer, SGD lr 100, same steps;
3. the engine again in bf16 mixed precision (drift reported against fp32);
4. both on a bert-base-shaped model with random weights (the hub is unreachable here).

FLOPs are the work the engine does, counted analytically per optimization step (matmuls
only: 2 FLOPs per multiply-add). Sequence length S = l + 2, hidden H, intermediate I.
With the lean forward (ft.model.fastforward), for each chunk and each layer j, n_j rows reach
layer j and g_j of them go on above it (the other e_j = n_j - g_j end there and need only
the read position):

    forward_j = 2 · ( n_j·S·3H²                   fused Q, K, V (layer 0: n_0·(S-2)·3H² + 2·3H²,
                                                   [CLS]/[SEP] are the same in every row)
                    + 2·H·(g_j·S + e_j)·S          scores and weighted values (rows ending here:
                                                   the read position's query only)
                    + (g_j·S + e_j)·(H² + H·I)     attention output, FFN in
                    + g_j·S·H·I + u_j·I )          FFN out: in their top layer rows ending there
                                                   need only the u_j units they read (when
                                                   they read no residual stream)
    backward  = forward, except the attention products: 2x (both operands are activations);
                only activation gradients: the encoder is frozen. The hand-written backward
                (ft.model.leangrad, fp32/fp64 outside autocast) projects the query gradient of the
                rows ending at layer j at their read position only: (g_j·S + e_j)·H² instead of
                n_j·S·H² (layer 0: S-2 for S)
    fast-path preconditioner = 2 · T · l · H² per chunk   (∇e · WᵀW on the whole gradient of
                the T rows, once per chunk's backward)

With the hook-based forward every row of a chunk runs every position of layers
0..L (L = the chunk's highest layer): forward = 2 · c · (L + 1) · (S·(4H² + 2·H·I) + 2·S²·H).
A test checks the formula against torch's FLOP counter.

The matmul rate is the best of several [c·S, H] × [H, I] products (`F.linear`, as the engine
multiplies) in the same precision, measured in the same run (fp32: before and after the timed
runs, the better of the two, since this VM's speed drifts). The naive neurons run in
`--rounds` + 1 parts around `--rounds` engine runs (default: half before and half after one
run), so that drift does not bias the speedup either; more rounds average it over a longer
time. The engine's rate counts the steps after its first (which builds the pass plan);
`speedup_vs_naive_whole_fit` counts the whole `trainer.fit`, and `speedup_vs_naive_one_thread`
compares with the naive loop on one thread (at batch 1 it can be faster there than on the
default threads).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from transformers import BertConfig, BertModel

from ft.core.cpualloc import keep_freed_memory
from ft.core.cpuinfo import matmul_gflops, sync
from ft.engine.module import TextualizationModule
from ft.engine.naive import naive_textualize
from ft.inputs import build_input
from ft.model.encoder import PACKAGED, Encoder, from_model, load_encoder
from ft.model.sites import Site
from ft.model.vocab import Vocabulary
from ft.targets import neuron_targets


def progress(message: str) -> None:
    """One line of progress on stderr (stdout ends with the JSON line)."""
    print(f"[ft.bench] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine_flops(module: TextualizationModule, cfg: object = None, length: int = 1, autocast: bool = False) -> float:
    """FLOPs of one optimization step, as the engine's readers count the work they do
    (`FastSiteReader.step_flops`, `SiteReader.step_flops`); `autocast`: under bf16-mixed."""
    return module.step_flops(length, autocast)


class StepTimer(pl.Callback):
    """Wall time of the optimization steps after the first `warmup` ones (which build the
    pass plans and warm the allocator); the whole fit is timed separately."""

    def __init__(self, warmup: int = 1):
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            sync(module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(module.device)
        self.seconds = time.perf_counter() - self.start


def run_engine(enc: Encoder, sites: list[list[Site]], steps: int, lr: float, precision: str,
               chunk_size: int, device: torch.device) -> tuple[TextualizationModule, dict]:
    """Fit the protocol; returns the module and timings (steps after the first, whole fit)."""
    vocab = Vocabulary.from_tokenizer(enc.tokenizer)
    opt = partial(torch.optim.SGD, lr=lr)
    inputs = build_input("onehot", range(len(sites)), enc.word_embeddings, optimizer=opt)
    module = TextualizationModule(enc.model, sites, inputs, opt, vocab.cls_id, vocab.sep_id,
                                  chunk_size=chunk_size, stop_when_converged=False)
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         precision=precision, accelerator="gpu" if device.type == "cuda" else "cpu",
                         devices=1, callbacks=[timer])
    t = time.perf_counter()
    trainer.fit(module)
    sync(device)
    fit_s = time.perf_counter() - t
    return module, {"steps": steps - timer.warmup, "seconds": timer.seconds, "fit_seconds": fit_s}


@contextmanager
def hand_backward(on: bool) -> Iterator[None]:
    """Run the lean reader with (on) or without ft.model.leangrad's hand-written backward."""
    import ft.model.fastforward

    before = ft.model.fastforward.HAND_BACKWARD
    ft.model.fastforward.HAND_BACKWARD = on
    try:
        yield
    finally:
        ft.model.fastforward.HAND_BACKWARD = before


def bench_model(name: str, enc: Encoder, steps: int, naive_per_layer: int, lr: float,
                chunk_size: int, bf16: bool, fraction: float = 0.1, rounds: int = 1,
                compare_backward: bool = False) -> dict:
    vocab = Vocabulary.from_tokenizer(enc.tokenizer)
    targets = neuron_targets(enc.model, fraction=fraction, seed=0)
    sites = [t.sites for t in targets]
    # naive: the first `naive_per_layer` sampled neurons of every layer
    common = [i for layer in range(enc.num_layers)
              for i in [j for j, t in enumerate(targets) if t.layer == layer][:naive_per_layer]]
    device = enc.word_embeddings.device
    mm_rate = partial(matmul_gflops, min(chunk_size, len(sites)) * 3, enc.arch.hidden_size, enc.arch.intermediate_size,
                      device=device)
    progress(f"{name}: {len(sites)} targets for the engine, {len(common)} neurons for the naive loop, "
             f"{steps} steps, {rounds} round(s)")
    mm_before = mm_rate(torch.float32)

    def engine_rate(timing: dict) -> float:  # neuron-steps per second over the timed steps
        return len(sites) * timing["steps"] / timing["seconds"]

    def naive_run(part: list[int]) -> tuple[dict[int, float], float]:
        t = time.perf_counter()
        finals = {i: naive_textualize(enc, sites[i][0], i, steps, lr, vocab) for i in part}
        seconds = time.perf_counter() - t
        rate = len(part) * steps / max(seconds, 1e-9)
        progress(f"naive loop: {len(part)} neuron(s) x {steps} steps in {seconds:.1f} s "
                 f"({rate:.1f} neuron-steps/s on {torch.get_num_threads()} thread(s))")
        return finals, seconds

    # naive, engine, naive, ...: the naive neurons in `rounds` + 1 parts around `rounds` engine
    # runs, so that a drift in the machine's speed during the benchmark does not bias the ratio
    naive: dict[int, float] = {}
    naive_s, module = 0.0, None
    timing = {"steps": 0, "seconds": 0.0, "fit_seconds": 0.0}
    autograd = dict(timing)  # --compare-backward: the same fits with autograd's backward, interleaved
    autograd_final = None
    for r in range(rounds + 1):
        finals, seconds = naive_run(common[r :: rounds + 1])
        naive.update(finals)
        naive_s += seconds
        if r < rounds:  # every round is the same deterministic fit: the first one's finals are kept
            fitted, t = run_engine(enc, sites, steps, lr, "32-true", chunk_size, device)
            progress(f"engine round {r + 1}/{rounds}: {engine_rate(t):,.0f} neuron-steps/s")
            if module is None:
                module = fitted
            timing = {k: timing[k] + t[k] for k in timing}
            if compare_backward:
                with hand_backward(False):  # the same fit, autograd's backward through the lean forward
                    fitted, t = run_engine(enc, sites, steps, lr, "32-true", chunk_size, device)
                progress(f"engine round {r + 1}/{rounds}, autograd's backward: {engine_rate(t):,.0f} neuron-steps/s")
                autograd_final = fitted.result().objectives if autograd_final is None else autograd_final
                autograd = {k: autograd[k] + t[k] for k in autograd}
    # on a CPU, the naive loop at batch 1 may do better on one thread: measure that too (on half
    # its neurons)
    naive_one_thread_rate = None  # (JSON null on a GPU)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        naive_one_thread_rate = len(common[::2]) * steps / naive_run(common[::2])[1]
        torch.set_num_threads(threads)
    final = module.result().objectives
    rel = [abs(float(final[i]) - v) / max(abs(v), 1e-6) for i, v in naive.items()]
    flops_step = engine_flops(module)
    # the machine's speed drifts: the better of two measurements, before and after the runs
    mm = max(mm_before, mm_rate(torch.float32))
    rate = engine_rate(timing)
    naive_rate = len(naive) * steps / naive_s
    out = {
        "model": name, "family": enc.arch.family, "model_type": enc.model.config.model_type,
        "reader": "lean" if module.fast else "hooked",
        "device": device_name(device), "precision": "32-true", "targets": len(sites),
        "steps": steps, "rounds": rounds, "naive_neurons": len(naive),
        "neuron_steps_per_s": rate, "naive_neuron_steps_per_s": naive_rate,
        "speedup_vs_naive": rate / naive_rate,
        # the same, counting the whole fit (Trainer set-up, the first step) against the engine
        "speedup_vs_naive_whole_fit": len(sites) * steps * rounds / timing["fit_seconds"] / naive_rate,
        "naive_one_thread_neuron_steps_per_s": naive_one_thread_rate,
        "speedup_vs_naive_one_thread": None if naive_one_thread_rate is None else rate / naive_one_thread_rate,
        "achieved_gflops": flops_step * timing["steps"] / timing["seconds"] / 1e9, "matmul_gflops": mm,
        "max_rel_diff_vs_naive": max(rel), "engine_seconds": timing["seconds"],
        "engine_timed_steps": timing["steps"], "engine_fit_seconds": timing["fit_seconds"],
        "naive_seconds": naive_s,
        # the rate the efficiency is measured against: F.linear in the engine's layout, fp32
        "matmul_shape": f"[{min(chunk_size, len(sites)) * 3}, {enc.arch.hidden_size}] x "
                        f"[{enc.arch.hidden_size}, {enc.arch.intermediate_size}] float32",
    }
    out["flop_efficiency"] = out["achieved_gflops"] / mm
    if compare_backward:  # the work autograd's backward does: the lean reader without ft.model.leangrad
        with hand_backward(False):
            flops_autograd = engine_flops(module)
        gflops = flops_autograd * autograd["steps"] / autograd["seconds"] / 1e9
        out["autograd_backward"] = {
            "neuron_steps_per_s": engine_rate(autograd), "achieved_gflops": gflops, "flop_efficiency": gflops / mm,
            "hand_speedup": rate / engine_rate(autograd),
            "max_rel_diff_vs_hand": float(((autograd_final - final).abs() / final.abs().clamp_min(1e-6)).max()),
            "max_rel_diff_vs_naive": max(abs(float(autograd_final[i]) - v) / max(abs(v), 1e-6)
                                         for i, v in naive.items()),
        }
    if bf16:
        mod16, t16 = run_engine(enc, sites, steps, lr, "bf16-mixed", chunk_size, device)
        rate16 = engine_rate(t16)
        progress(f"engine bf16-mixed: {rate16:,.0f} neuron-steps/s")
        final16 = mod16.result().objectives
        mm16 = mm_rate(torch.bfloat16)
        drift = ((final16 - final).abs() / final.abs().clamp_min(1e-6))
        gflops16 = engine_flops(mod16, autocast=True) * t16["steps"] / t16["seconds"] / 1e9
        out["bf16"] = {
            "neuron_steps_per_s": rate16, "speedup_vs_naive": rate16 / naive_rate,
            "achieved_gflops": gflops16, "matmul_gflops": mm16, "flop_efficiency": gflops16 / mm16,
            "median_rel_drift_vs_fp32": float(drift.median()), "max_rel_drift_vs_fp32": float(drift.max()),
        }
    out["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def bench_report(n_runs: int) -> dict:
    """Load and report `n_runs` run directories (copies of one real run) and time it."""
    import shutil
    import tempfile
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from ft.cli.hydra_conf import CONFIG_DIR
    from ft.cli.report import build_report
    from ft.cli.run import run
    from ft.rundir.results import load_runs

    root = Path(tempfile.mkdtemp(prefix="ft-bench-report-"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_steps=20", "logger.wandb.mode=disabled",
                                          "+trainer.enable_progress_bar=false"])
    run(cfg, root / "seed_run")
    for i in range(n_runs):
        shutil.copytree(root / "seed_run", root / "runs" / f"{i:03d}", ignore=shutil.ignore_patterns("checkpoints"))
    t = time.perf_counter()
    targets, runs = load_runs([str(root / "runs")])
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    build_report([str(root / "runs")], root / "report.html", words=0)
    report_s = time.perf_counter() - t
    shutil.rmtree(root)
    return {"runs": len(runs), "targets": len(targets), "load_s": load_s, "report_s": report_s}


def random_bert_base(tokenizer: object, device: torch.device) -> Encoder:
    torch.manual_seed(0)
    return from_model(BertModel(BertConfig()).to(device), tokenizer, "bert-base-shaped (random weights)")


def plan_main(args: argparse.Namespace) -> dict:
    """`--plan`: print the projection, its assumptions, then one JSON object."""
    from dataclasses import asdict

    from ft.core.errors import FtError
    from ft.engine.plan import assumptions, plan

    steps = 1000 if args.steps is None else args.steps
    try:
        result = plan(args.plan, args.targets, steps, tuple(args.gpus), args.gpu_tflops)
    except FtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(result.lines() + assumptions(args.gpu_tflops, 15.0)))
    out = asdict(result)
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    from ft.cli.preflight import OneLineParser

    p = OneLineParser(prog="python -m ft.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=PACKAGED,
                   help=f"encoder: {PACKAGED} (default) or a local model directory")
    p.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU")
    p.add_argument("--steps", type=int, default=None, help="optimization steps for every engine (default 100; "
                   "--plan: 1000)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="share of every layer's neurons to textualize (the paper: 0.1; 1: an atlas)")
    p.add_argument("--naive-per-layer", type=int, default=2, help="neurons per layer for the naive loop")
    p.add_argument("--bert-base-steps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=1,
                   help="engine runs, interleaved with the naive loop's neurons (more: less drift)")
    p.add_argument("--compare-backward", action="store_true",
                   help="also run every engine round with autograd's backward, interleaved")
    p.add_argument("--bf16", action="store_true",
                   help="also run bf16-mixed (slow on CPUs without bf16 matmul units)")
    p.add_argument("--no-bert-base", action="store_true")
    p.add_argument("--report-runs", type=int, default=100, help="runs to load and report (0: skip)")
    p.add_argument("--plan", metavar="CONFIG_JSON", help="the cost planner: project a full atlas of this model "
                   "(its config.json; configs/plan/ has large encoders) and exit")
    p.add_argument("--targets", type=int, help="--plan: targets (default every ffn_act neuron)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="--plan: GPU counts to project")
    p.add_argument("--gpu-tflops", type=float, default=48.3, help="--plan: one GPU's fp32 matmul TFLOP/s "
                   "(default: what ft's H200 bench implies)")
    args = p.parse_args(argv)
    if args.plan:
        return plan_main(args)
    args.steps = 100 if args.steps is None else args.steps
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction={args.fraction}; valid: 0 < fraction <= 1")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds}; valid: >= 1")
    if args.steps < 2 or args.bert_base_steps < 2:
        p.error(f"--steps={args.steps}, --bert-base-steps={args.bert_base_steps}; valid: >= 2 "
                "(the first step is not timed)")
    for flag in ("chunk_size", "naive_per_layer"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}; valid: an integer >= 1")
    if args.report_runs < 0:
        p.error(f"--report-runs={args.report_runs}; valid: >= 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr={args.lr}; valid: a finite number > 0")
    if args.model != PACKAGED and not Path(args.model).is_dir():
        p.error(f"--model={args.model!r}: no such directory; valid: {PACKAGED} or a local model directory")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        p.error("--accelerator=gpu, but torch sees no CUDA device; valid here: auto, cpu")
    gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu else "cpu")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    keep_freed_memory()  # what the engine does on a CPU: here before the naive loop too, for both
    from ft.core.cpuinfo import cpu_info

    cpu = cpu_info()
    progress(f"CPU: {cpu['model']}; features {', '.join(cpu['features']) or 'none'}; bf16 units "
             f"{'yes' if cpu['bf16_units'] else 'no'}; torch {cpu['torch_capability']}")
    if args.bf16 and not gpu and not cpu["bf16_units"]:
        progress("--bf16 on a CPU without bf16 matrix units: expect bf16-mixed to be slower than fp32 here")
    enc = load_encoder(args.model)
    enc.model.to(device)
    name = "all-MiniLM-L6-v2" if args.model == PACKAGED else args.model
    results = {"minilm": bench_model(name, enc, args.steps, args.naive_per_layer,
                                     args.lr, args.chunk_size, args.bf16, args.fraction, args.rounds,
                                     args.compare_backward)}
    if not args.no_bert_base:
        results["bert_base_random"] = bench_model(
            "bert-base-shaped random", random_bert_base(enc.tokenizer, device), args.bert_base_steps, 1,
            args.lr, args.chunk_size, args.bf16 and gpu, args.fraction, args.rounds, args.compare_backward)
    if args.report_runs:
        progress(f"report: {args.report_runs} run directories")
        results["report"] = bench_report(args.report_runs)
    print(f"{'model':<28}{'prec':>10}{'targets':>8}{'nsteps/s':>11}{'naive':>9}{'speedup':>9}"
          f"{'GFLOP/s':>9}{'mm GF/s':>9}{'eff':>6}{'maxrel':>10}")
    for r in (results[k] for k in ("minilm", "bert_base_random") if k in results):
        rows = [(r["precision"], r)] + ([("bf16-mixed", {**r, **r["bf16"]})] if "bf16" in r else [])
        if "autograd_backward" in r:  # speedup column: vs the naive loop, as in every row
            a = r["autograd_backward"]
            speedup = a["neuron_steps_per_s"] / r["naive_neuron_steps_per_s"]
            rows.append(("autograd", {**r, **a, "speedup_vs_naive": speedup}))
        for prec, x in rows:
            print(f"{r['model']:<28}{prec:>10}{r['targets']:>8}{x['neuron_steps_per_s']:>11.1f}"
                  f"{r['naive_neuron_steps_per_s']:>9.1f}{x['speedup_vs_naive']:>9.1f}"
                  f"{x['achieved_gflops']:>9.1f}{x['matmul_gflops']:>9.1f}{x['flop_efficiency']:>6.2f}"
                  f"{r['max_rel_diff_vs_naive']:>10.2e}")
    print(f"matmul rate (mm GF/s): the best of F.linear {results['minilm']['matmul_shape']}, in the same run")
    if "report" in results:
        r = results["report"]
        print(f"report: {r['runs']} runs, {r['targets']} targets loaded in {r['load_s']:.2f} s, "
              f"HTML in {r['report_s']:.2f} s")
    head = results["minilm"]
    line = {k: head[k] for k in ("neuron_steps_per_s", "naive_neuron_steps_per_s", "speedup_vs_naive",
                                 "speedup_vs_naive_whole_fit", "speedup_vs_naive_one_thread",
                                 "achieved_gflops", "matmul_gflops", "flop_efficiency",
                                 "max_rel_diff_vs_naive", "model", "device", "precision")}
    line["peak_rss_mb"] = peak_rss_mb()
    line["matmul_shape"] = head["matmul_shape"]
    line["cpu"] = cpu
    line["results"] = results
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
