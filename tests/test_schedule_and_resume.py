"""The lr schedule reaches its floor at the last step, and a resumed run follows the *current*
config: a longer run continues on the longer schedule, a change that cannot be honoured stops."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.engine.optim import build_scheduler
from fineclip.engine.trainer import train
from fineclip.errors import ConfigError, ResumeError


def expected_lr(k, total, warmup, peak, floor, start=0.0):
    """The schedule written out: linear warmup to the peak at step W, cosine to the floor at step N."""
    if k <= warmup:
        return start + (peak - start) * k / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


@pytest.mark.parametrize(("total", "warmup"), [(300, 30), (4620, 1000), (7, 0)])
def test_schedule_is_linear_warmup_then_cosine_down_to_the_floor_at_the_last_step(total, warmup):
    peak, floor = 2e-3, 1e-5
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup, min_lr=floor)
    lrs = []
    for k in range(1, total + 1):  # the trainer sets the lr of step k just before taking it
        scheduler.step_update(k)
        lrs.append(optimizer.param_groups[0]["lr"])
    for k, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(expected_lr(k, total, warmup, peak, floor), rel=1e-9, abs=1e-15), k
    assert lrs[-1] == pytest.approx(floor, rel=1e-12)  # the floor, at the last optimizer step
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(peak)
        assert all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup], strict=True))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:-1], lrs[warmup + 1:], strict=True))  # then never rising


def test_a_warmup_that_outlasts_the_run_is_refused_and_a_fraction_scales_with_it():
    """detailclip_scratch once set 2,000 warmup steps, more than an 8-GPU COCO run of 25 epochs has
    (~1,425): the lr never peaked and the cosine never ran. Before the fix this warned and shortened it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ConfigError, match="warmup_steps=2000 is not shorter than the run's 1425"):
        build_scheduler(optimizer, total_steps=1425, warmup_steps=2000)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        build_scheduler(optimizer, total_steps=100, warmup_fraction=1.0)
    scheduler = build_scheduler(optimizer, total_steps=1425, warmup_fraction=0.04)  # one epoch of 25
    lrs = []
    for k in range(1, 1426):
        scheduler.step_update(k)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(range(1425), key=lrs.__getitem__) + 1 == round(0.04 * 1425) == 57  # the peak, at step W
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_the_published_experiments_fit_their_warmup_into_the_run():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=detailclip_scratch"])
    assert cfg.optim.scheduler.warmup_steps is None and cfg.optim.scheduler.warmup_fraction == pytest.approx(1 / 25)


def test_training_with_too_long_a_warmup_stops_before_the_first_step(tmp_path, data_root):
    with pytest.raises(ConfigError, match="warmup_steps=8 is not shorter"):
        train(_cfg(data_root, "trainer.epochs=2", "optim.scheduler.warmup_steps=8"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _cfg(data_root, *extra):
    overrides = [f"data.root={data_root}", "data.batch_size=4", "data.val=null", "trainer.progress=false",
                 "trainer.tensorboard=false", "trainer.log_every=1", "optim.scheduler.warmup_steps=2",
                 "optim.scheduler.min_lr=1e-4", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _lrs(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in lines if "train/lr" in r}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from fineclip.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("sched") / "data", train=16, val=0, size=64, seed=1)  # 4 steps/epoch


def test_the_trainer_ends_on_the_floor(tmp_path, data_root):
    train(_cfg(data_root, "trainer.epochs=2"), tmp_path / "run")
    lrs = _lrs(tmp_path / "run")
    assert sorted(lrs) == list(range(1, 9))
    for k, lr in lrs.items():
        assert lr == pytest.approx(expected_lr(k, 8, 2, 1e-3, 1e-4), rel=1e-6)
    assert lrs[8] == pytest.approx(1e-4)


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path, data_root, caplog):
    run_dir = tmp_path / "run"
    train(_cfg(data_root, "trainer.epochs=1"), run_dir)
    first = _lrs(run_dir)
    assert first[4] == pytest.approx(1e-4)  # a finished 1-epoch run ends on the floor
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    with caplog.at_level("WARNING"):
        train(_cfg(data_root, "trainer.epochs=3", "trainer.resume=auto"), run_dir)
    assert "trainer.epochs: 1 -> 3" in caplog.text
    lrs = _lrs(run_dir)
    for k in range(5, 13):  # the rest of a 12-step schedule, not the old one's floor (or 0)
        assert lrs[k] == pytest.approx(expected_lr(k, 12, 2, 1e-3, 1e-4), rel=1e-6)
    assert lrs[5] > 5e-4
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert after["global_step"] == 12
    assert any(not torch.equal(after["model"][k], v) for k, v in weights.items())


def test_resume_refuses_another_global_batch_or_model(tmp_path, data_root):
    run_dir = tmp_path / "run"
    train(_cfg(data_root, "trainer.epochs=1"), run_dir)
    with pytest.raises(ResumeError, match="global batch of 4 images .* this run has 8"):
        train(_cfg(data_root, "trainer.epochs=2", "trainer.resume=auto", "data.batch_size=8"), run_dir)
    with pytest.raises(ResumeError, match=r"another model.*model.image_size: 64 -> 72"):
        train(_cfg(data_root, "trainer.epochs=2", "trainer.resume=auto", "model.image_size=72"), run_dir)
    with pytest.raises(ResumeError, match="the trainable parameters differ"):
        train(_cfg(data_root, "trainer.epochs=2", "trainer.resume=auto", "loss=sd"), run_dir)
