import pytest

from ft.core.errors import ModelNotFoundError
from ft.model.encoder import PACKAGED, load_encoder, packaged_minilm_path
from ft.rundir.tracking import wandb_logged_in, wandb_mode


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="cannot load model '/no/such/model'.*model=minilm_l6"):
        load_encoder("/no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no loadable model"):
        load_encoder(str(tmp_path / "empty"))


def test_encoder_is_frozen(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.num_layers == 2 and tiny.hidden_size == 32


def test_packaged_model_ships_weights():
    path = packaged_minilm_path()
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    assert PACKAGED == "packaged:minilm_l6"


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not wandb_logged_in() and wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"
