"""`python -m ft.bench` refuses bad arguments before it loads anything."""

import pytest
import torch

from ft.bench import main


@pytest.mark.parametrize("argv,named", [
    (["--steps", "1"], "--steps=1"),
    (["--bert-base-steps", "0"], "--bert-base-steps=0"),
    (["--fraction", "0"], "--fraction=0.0"),
    (["--fraction", "1.5"], "--fraction=1.5"),
    (["--accelerator", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_name_the_value(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and ("valid" in err or "choose from" in err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_asked_for_without_one(capsys):
    with pytest.raises(SystemExit):
        main(["--accelerator", "gpu"])
    assert "--accelerator=gpu" in capsys.readouterr().err
