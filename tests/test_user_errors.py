"""Input a user gets wrong is refused with one clear sentence and exit status 1, never a traceback or
a silent guess: an unreadable checkpoint, a model= that contradicts the checkpoint, a config whose
model computes another function than its weights."""

import os
import subprocess
import sys

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.engine.load import load_model
from fineclip.errors import ConfigError


def _compose(config, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_checkpoint(trained_tiny_run):
    return trained_tiny_run / "checkpoints" / "last.pt"


@pytest.mark.parametrize("entry", ["fineclip.evaluate", "fineclip.viz"])
def test_a_truncated_checkpoint_is_one_sentence_and_exit_1(tmp_path, tiny_checkpoint, entry):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    env = {**os.environ, "FINECLIP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", entry, f"checkpoint={broken}", f"hydra.run.dir={tmp_path}/out"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert f"cannot read checkpoint {broken} (truncated or corrupt?)" in output
    assert "Traceback" not in output


def test_model_choice_that_contradicts_the_checkpoint_is_refused(tiny_checkpoint):
    cfg = _compose("evaluate", "model=vit_b16", f"checkpoint={tiny_checkpoint}")
    with pytest.raises(ConfigError, match=r"model=vit_b16 contradicts checkpoint=.*name: 'fineclip-tiny' in the "
                                          r"checkpoint, 'ViT-B-16-quickgelu' in model=vit_b16"):
        load_model(cfg, "vit_b16")
    # without model= (or naming the checkpoint's own model) the checkpoint's saved config is used
    model, model_cfg = load_model(_compose("evaluate", f"checkpoint={tiny_checkpoint}"), None)
    assert model_cfg.name == "fineclip-tiny"
    _, model_cfg = load_model(_compose("evaluate", "model=tiny", f"checkpoint={tiny_checkpoint}"), "tiny")
    assert model_cfg.name == "fineclip-tiny"


def test_a_checkpoint_written_before_dense_modes_loads_as_the_value_path(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["config"]["model"]["dense_mode"]
    save_checkpoint(state, tmp_path / "old.pt")
    model, model_cfg = load_model(_compose("evaluate", "model=tiny", f"checkpoint={tmp_path / 'old.pt'}"), "tiny")
    assert model.dense_mode.name == "value" and model_cfg.dense_mode._target_.endswith("ValuePath")


def test_the_openai_vit_b16_config_computes_quickgelu():
    """OpenAI's ViT-B/16 weights were trained with QuickGELU; open_clip's plain ViT-B-16 uses GELU, so a
    local OpenAI file loaded into it would compute another function without an error."""
    name = _compose("train", "model=vit_b16").model.name
    assert open_clip.get_model_config(name).get("quick_gelu") is True
    assert not open_clip.get_model_config("ViT-B-16").get("quick_gelu", False)


def test_a_user_error_that_hydra_wraps_is_still_one_sentence_and_exit_1(caplog):
    """Hydra wraps what a ``_target_`` raises in an InstantiationException; the entry points unwrap it."""
    import logging

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from fineclip.cli import exit_on_user_error

    node = {"_target_": "fineclip.engine.optim.warmup_length", "total_steps": 5, "warmup_steps": 9,
            "warmup_fraction": None}
    with pytest.raises(InstantiationException):
        instantiate(node)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        exit_on_user_error(lambda: instantiate(node), logging.getLogger("test"))
    assert exit_.value.code == 1
    assert caplog.records[-1].getMessage().startswith("optim.scheduler.warmup_steps=9 is not shorter than the run's 5")
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback stays
        exit_on_user_error(lambda: 1 / 0, logging.getLogger("test"))
