"""Every bad value of `python -m ft.train` is one line on stderr, exit code 2, before anything is
written. Cases are grouped by class of problem; `preflight` runs in-process, a few go through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AlbertConfig, ElectraConfig

from ft.cli.preflight import preflight
from ft.cli.schema import check_config, check_model
from ft.core.errors import ConfigError

CASES: dict[str, list[tuple[str, str]]] = {
    "type": [  # a string or a float where an integer (or a number, a bool) goes
        ("target.per_layer=abc", "target.per_layer='abc'; valid: null or an integer >= 1"),
        ("input.length=2.5", "input.length=2.5; valid: an integer >= 1"),
        ("position=first", "position='first'; valid: an integer >= 1"),
        ("seed=1.5", "seed=1.5; valid: an integer >= 0"),
        ("engine.memory_budget_mb=big", "engine.memory_budget_mb='big'; valid: a finite number > 0"),
        ("experiment=group_k10 target.num_random=ten", "target.num_random='ten'; valid: an integer >= 0"),
        ("trainer.max_steps=10.5", "trainer.max_steps=10.5; valid: an integer > 0"),
        ("experiment=group_k10 target.k=1e2", "target.k=100.0; valid: an integer >= 1"),
        ("reg.norm=high", "reg.norm='high'; valid: a finite number >= 0"),
        ("engine.stop_when_converged=maybe", "engine.stop_when_converged='maybe'; valid: true, false"),
    ],
    "range": [  # accepted before, and wrong: a window of 0 marked every target converged at once
        ("engine.converge_window=0", "engine.converge_window=0; valid: an integer >= 1"),
        ("engine.memory_budget_mb=-5", "engine.memory_budget_mb=-5; valid: a finite number > 0"),
        ("engine.runaway_factor=-1", "engine.runaway_factor=-1; valid: a finite number > 0"),
        ("engine.checkpoint_every_n_steps=0", "engine.checkpoint_every_n_steps=0; valid: an integer >= 1"),
        ("engine.curve_every=-10", "engine.curve_every=-10; valid: an integer >= 1"),
        ("experiment=group_k10 target.num_frequent=-1", "target.num_frequent=-1; valid: an integer >= 0"),
        ("target.per_layer=null target.fraction=1.5", "target.fraction=1.5; valid: null or a finite number > 0"),
        ("reg.word=-0.5", "reg.word=-0.5; valid: a finite number >= 0"),
        ("engine.converge_tol=-0.0001", "engine.converge_tol=-0.0001; valid: a finite number >= 0"),
        ("print_rows=-1", "print_rows=-1; valid: an integer >= 0"),
        ("seed=-1", "seed=-1; valid: an integer >= 0"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0; valid: an integer >= 1"),
        ("engine.memory_budget_mb=inf", "engine.memory_budget_mb=inf; valid: a finite number > 0"),
    ],
    "positions": [  # the input must fit the model's position embeddings ([CLS] + input + [SEP])
        ("input.length=511", "input.length=511; valid 1..510 for 'packaged:minilm_l6' (512 positions"),
        ("position=2 input.length=1000", "input.length=1000; valid 1..510"),
        ("input.length=100000", "input.length=100000; valid 1..510"),
        ("input.length=3 position=5", "position=5; valid 1..input.length=3"),
        ("input.length=0", "input.length=0; valid: an integer >= 1"),
        ("TINY input.length=15", "input.length=15; valid 1..14"),
    ],
    "choice": [  # values from a fixed set, and classes that must be of the right kind
        ("trainer.precision=17", "trainer.precision=17; valid: 64, 32, 16, bf16, 16-true"),
        ("trainer.precision=fp8", "trainer.precision='fp8'; valid: 64, 32"),
        ("trainer.precision=bf17-mixed", "trainer.precision='bf17-mixed'"),
        ("optim._target_=torch.nn.Linear", "optim._target_='torch.nn.Linear'; valid: a torch.optim optimizer class"),
        ("optim._target_=torch.optim.lr_scheduler.StepLR", "optim._target_='torch.optim.lr_scheduler.StepLR'; valid"),
        ("optim._target_=no.such.Optimizer", "optim._target_='no.such.Optimizer': no such class"),
        ("optim._target_=torch.optim.Nope", "optim._target_='torch.optim.Nope': no such class"),
        ("scheduler=cosine scheduler._target_=torch.optim.Adam",
         "scheduler._target_='torch.optim.Adam'; valid: a torch.optim.lr_scheduler class"),
        ("engine.keep=worst", "engine.keep='worst'; valid: last, best"),
        ("log_level=loud", "log_level='loud'; valid: debug, info, warning, error"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode='sometimes'; valid: auto, online, offline, disabled"),
        ("trainer.accelerator=quantum", "trainer.accelerator='quantum'; valid: auto, cpu, gpu"),
        ("input=onehot input.fast=maybe", "input.fast='maybe'; valid: auto, true, false"),
        ("engine.chunk_size=big", "engine.chunk_size='big'; valid: auto or an integer >= 1"),
    ],
    "scalar_for_list": [  # it used to report "site 'l'": the string was read letter by letter
        ("target.sites=layer.1.ffn_out.3", "target.sites='layer.1.ffn_out.3'; valid: null or a list of strings"),
        ("target.sites=5", "target.sites=5; valid: null or a list of strings"),
        ("experiment=group_k10 target.words=cat", "target.words='cat'; valid: null or a list of strings"),
        ("target.layers=3", "target.layers=3; valid: null or a list of integers >= 0"),
        ("tags=foo", "tags='foo'; valid: a list of strings"),
        ("target.sites=[[layer.1.ffn_out.3]]", "target.sites=[['layer.1.ffn_out.3']]; valid"),
    ],
    "duplicate": [  # silently run twice before
        ("target.sites=[layer.1.ffn_out.3,layer.1.ffn_out.3]", "target.sites=['layer.1.ffn_out.3', 'layer.1.ffn_out.3']"
         "; valid: null or a list of strings without repeats"),
        ("target.sites=[layer.1.ffn_out.3,layer.01.ffn_out.3]",
         "target.sites: 'layer.01.ffn_out.3' repeats 'layer.1.ffn_out.3'; valid: each site once"),
        ("target.sites=[layer.2.resid.0,layer.2.resid.00]",
         "target.sites: 'layer.2.resid.00' repeats 'layer.2.resid.0'"),
        ("experiment=group_k10 target.words=[cat,cat]", "target.words=['cat', 'cat']; valid: null or a list of strings"
         " without repeats"),
        ("target.layers=[1,1]", "target.layers=[1, 1]; valid: null or a list of integers >= 0 without repeats"),
        ("trainer.devices=[0,0]", "trainer.devices=[0, 0]; valid"),
    ],
    "unknown_key_or_syntax": [  # Hydra's own errors: one line, exit 2, not a traceback and exit 1
        ("trainer.max_stepz=4", "Could not override 'trainer.max_stepz'"),
        ("+engine.keeep=best", "engine.keeep: unknown key; valid: chunk_size"),
        ("+target.site=[layer.0.ffn_out.1]",
         "target.site: unknown key for target kind 'neuron'; valid: kind, point, sites"),
        ("+target.specs=[layer.0.ffn_out.1]", "target.specs: unknown key for target kind 'neuron'"),
        ("input.length=[1", "'input.length=[1' does not parse"),
        ("experiment=nope", "experiment='nope' is not an option; valid: atlas, default"),
        ("optim=rmsprop", "optim='rmsprop' is not an option; valid: adam, paper_sgd, sgd"),
        ("-m optim.lr=0.1,-1", "optim.lr=-1; valid: a finite number > 0"),
        ("-m experiment=default,nope", "experiment='nope' is not an option"),
        ("-m engine.converge_window=range(0,3)", "engine.converge_window=0; valid: an integer >= 1"),
    ],
    "objectives": [  # terms and directions: what they need, checked before anything is written
        ("target=terms", "target.specs is empty; valid: a list of expressions"),
        ("target=terms target.specs=[layer.1.ffn_out.5*layer.0.ffn_act.7]", "a product of two sites is not linear"),
        ("target=terms target.specs=[layer.1.ffn_out.5-layer.1.ffn_out.5]", "every weight cancels to 0"),
        ("target=terms target.specs=[layer.1.resid@0]", "no directions file; valid: target.file=PATH"),
        ("target=terms target.specs=[layer.1.resid.0+]", "ends early; valid: sites 'layer.L.point.unit'"),
        ("target=directions", "target.file=null; valid: a safetensors file"),
        ("target=directions target.file=/no/such.safetensors", "target.file='/no/such.safetensors' does not exist"),
        ("target=directions target.file=/no/such.safetensors target.site=layer.1.bogus",
         "target.site: 'layer.1.bogus' does not parse; expected 'layer.<L>.<point>'"),
        ("target=sae target.path=/no/such/sae", "target.path='/no/such/sae': not an SAE directory"),
        ("target=sae target.site=layer.1.resid.4", "target.site: 'layer.1.resid.4' does not parse"),
        ("target=sae target.latents=[3,3]", "target.latents=[3, 3]; valid: null or a list of integers >= 0 without"),
        ("target=sae target.demo.steps=0", "target.demo.steps=0; valid: an integer >= 1"),
        ("target=logits +target.site=layer.0.resid", "target.site: unknown key for target kind 'logit'"),
        ("target.sites=[layer.0.head.1,layer.0.head.01]", "target.sites: 'layer.0.head.01' repeats 'layer.0.head.1'"),
    ],
    "unsupported_family": [  # no adapter, a variant the adapter cannot serve, or not an encoder at all
        ("MPNET", "model_type 'mpnet' (MPNetConfig) is not supported yet; valid: an encoder of the families"),
        ("ALBERT_INNER2", "ALBERT with inner_group_num=2; valid: inner_group_num=1"),
        ("GPT2", "model_type 'gpt2' (GPT2Config) is a decoder-only model; valid: an encoder of the families bert, "
                 "roberta, xlm-roberta, camembert, electra, distilbert"),
        ("T5", "model_type 't5' (T5Config) is an encoder-decoder model"),
        ("BART", "model_type 'bart' (BartConfig) is an encoder-decoder model"),
    ],
}
ALL = [(cls, args, msg) for cls, cases in CASES.items() for args, msg in cases]


def factorized_config(name: str) -> object:
    from transformers import BartConfig, GPT2Config, MPNetConfig, T5Config

    if name in ("GPT2", "T5", "BART", "MPNET"):
        return {"GPT2": GPT2Config, "T5": T5Config, "BART": BartConfig, "MPNET": MPNetConfig}[name]()
    if name == "ALBERT_INNER2":
        return AlbertConfig(inner_group_num=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    kind, emb, hidden = name.split("_")
    make = AlbertConfig if kind == "ALBERT" else ElectraConfig
    return make(embedding_size=int(emb), hidden_size=int(hidden), num_attention_heads=2,
                intermediate_size=2 * int(hidden), num_hidden_layers=1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config-only model directories: the checks read a model's config, never its weights."""
    root = tmp_path_factory.mktemp("configs")
    dirs = {}
    for name, _ in CASES["unsupported_family"]:
        factorized_config(name).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def command_line(args: str, tiny_dir: Path, model_dirs: dict[str, Path]) -> list[str]:
    out = []
    for a in args.split():
        if a == "TINY":
            a = f"model.name_or_path={tiny_dir}"
        elif a in model_dirs:
            a = f"model.name_or_path={model_dirs[a]}"
        out.append(a)
    return out


def test_every_class_has_five_cases_and_forty_in_all():
    assert all(len(cases) >= 5 for cases in CASES.values()) and len(ALL) >= 40


@pytest.mark.parametrize("cls,args,message", ALL, ids=[f"{c}:{a}" for c, a, _ in ALL])
def test_bad_value_is_one_line_exit_2_and_nothing_written(cls, args, message, tiny_dir, model_dirs, tmp_path,
                                                          monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as e:
        preflight(command_line(args, tiny_dir, model_dirs))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    key = args.split()[-1].lstrip("+-").split("=")[0]
    assert key in err or cls == "unsupported_family" and f"model {str(model_dirs[args])!r}" in err, err
    assert not any(work.iterdir()) and not (tmp_path / "cache").exists()


def test_good_command_lines_pass(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for args in ([], ["experiment=group_k250"], ["-m", "experiment=group_k10,default", "optim.lr=0.1,0.3"],
                 ["input=onehot", "optim=paper_sgd", "input.length=3", "position=2", "engine.keep=best"],
                 [f"model.name_or_path={tiny_dir}", "input.length=14", "target.sites=[layer.1.ffn_out.3]"],
                 ["trainer.precision=bf16-mixed", "trainer.devices=auto", "+trainer.gradient_clip_val=1.0",
                  "hydra.run.dir=somewhere", "scheduler=cosine"],
                 ["target=terms", "target.specs=[layer.0.head.0-layer.0.head.10]"],  # heads alone: norms, no weights
                 ["target.sites=[layer.0.head.1,layer.2.attn_out.5]"],
                 ["input=tokens", "input.length=5", "search.topk=16"]):
        preflight(args)  # returns: no SystemExit
    assert not any(tmp_path.iterdir())


def test_schema_accepts_every_shipped_config():
    from hydra import compose, initialize_config_dir

    from ft.cli.hydra_conf import CONFIG_DIR

    experiments = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
    inputs = sorted(p.stem for p in Path(CONFIG_DIR, "input").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for exp in experiments:
            for inp in inputs:
                check_config(compose("train", overrides=[f"experiment={exp}", f"input={inp}", "scheduler=cosine"]))


def test_run_refuses_an_unsupported_model_before_writing(tmp_path):
    """The job checks again (an API caller skips the CLI): an in-memory MPNet is refused."""
    import torch
    from transformers import BertTokenizerFast, MPNetModel

    from ft.model.arch import UnsupportedModelError
    from ft.model.encoder import from_model
    from tests.conftest import VOCAB

    torch.manual_seed(0)
    from transformers import MPNetConfig

    model = MPNetModel(MPNetConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)})
    with pytest.raises(UnsupportedModelError, match="model_type 'mpnet'"):
        from_model(model, tok, "mpnet-tiny")
    assert not (tmp_path / "run").exists()


def test_model_check_reads_positions_from_the_config():
    cfg = {"model": {"name_or_path": "m"}, "input": {"length": 6}}
    check_model(cfg, ElectraConfig(embedding_size=32, hidden_size=32, max_position_embeddings=8))
    with pytest.raises(ConfigError, match=r"input.length=6; valid 1..5 for 'm' \(7 positions"):
        check_model(cfg, ElectraConfig(embedding_size=32, hidden_size=32, max_position_embeddings=7))


CLI = [("engine.converge_window=0", "engine.converge_window=0"), ("target.sites=layer.1.ffn_out.3", "target.sites="),
       ("trainer.max_stepz=4", "trainer.max_stepz"), ("input.length=511", "input.length=511"),
       ("-m optim.lr=0.1,nan", "optim.lr=nan")]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", CLI, ids=[a for a, _ in CLI])
def test_cli_bad_value_exits_2_before_hydra_writes(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ft.train", *args.split()], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # no logs/, .hydra/, wandb/
