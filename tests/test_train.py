"""End to end through the Hydra entry points, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fineclip.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_one_epoch_through_hydra_then_evaluate_reproduces_the_numbers(tmp_path):
    run_dir = tmp_path / "run"
    common = [f"cache_dir={tmp_path / 'cache'}", "data.synthetic.train=48", "data.synthetic.val=12"]
    train = _run(
        "fineclip.train", *common, "data.batch_size=16", "trainer.epochs=1", "trainer.log_every=1",
        "optim.scheduler.warmup_steps=1", "trainer.progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "box classification" in train.stdout and "I2T R@1/5/10" in train.stdout
    checkpoint = run_dir / "checkpoints" / "last.pt"
    assert checkpoint.is_file()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3]
    assert {"train/loss_gc", "train/loss_sd", "train/loss_rc"} <= set(lines[0])
    trained = json.loads((run_dir / "eval.json").read_text())

    out = tmp_path / "eval.json"
    evaluate = _run(
        "fineclip.evaluate", *common, f"checkpoint={checkpoint}", f"output={out}",
        f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(out.read_text()) == pytest.approx(trained, abs=1e-6)


def test_coco_vitb16_composes_with_the_paper_setting():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=coco_vitb16"])
    assert cfg.model.name == "EVA02-B-16" and cfg.model.image_size == 224 and cfg.model.freeze_text
    assert cfg.optim.optimizer.lr == 1e-5 and cfg.optim.optimizer.weight_decay == 0.1
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.999] and cfg.optim.optimizer.eps == 1e-8
    assert cfg.optim.scheduler.warmup_steps == 1000 and cfg.trainer.epochs == 10
    assert cfg.data.batch_size == 32 and cfg.data.train.max_regions == 20 and cfg.data.train.min_box_area == 64
    assert (cfg.loss.gc_weight, cfg.loss.sd_weight, cfg.loss.rc_weight) == (1.0, 1.0, 1.0)
    assert not cfg.loss.detach_teacher


def test_coco_vitb16_without_paths_fails_at_once_naming_them(tmp_path):
    result = _run("fineclip.train", "+experiment=coco_vitb16", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    message = result.stdout + result.stderr
    assert "data.root=<path>" in message and "model.checkpoint=<path>" in message
    assert "Traceback" not in message
    result = _run(
        "fineclip.train", "+experiment=coco_vitb16", f"data.root={tmp_path}", "model.checkpoint=/nonexistent/b16.pt",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 1 and "/nonexistent/b16.pt   does not exist" in result.stdout + result.stderr


def _sweep_jobs(sweeper_params) -> list[list[str]]:
    """The override lists of a basic-sweeper grid (comma-separated values)."""
    jobs = [[]]
    for key, values in (sweeper_params or {}).items():
        jobs = [job + [f"{key}={v.strip()}"] for job in jobs for v in str(values).split(",")]
    return jobs


def test_every_config_composes():
    """Every experiment, and every job of every sweep, composes and resolves (paths filled in)."""
    paths = ["data.root=/data/coco", "model.checkpoint=/w/b16.pt", "checkpoint_dir=/w"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        jobs_seen = 0
        for experiment in sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")):
            cfg = compose(config_name="train", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
            assert cfg.name
            for job in _sweep_jobs(cfg.hydra.sweeper.params):
                overrides = [f"+experiment={experiment}", *job]
                if experiment.startswith("coco"):
                    overrides += [p for p in paths if p.split("=")[0] not in ("checkpoint_dir",)
                                  or experiment == "coco_backbones"]
                job_cfg = compose(config_name="train", overrides=overrides)
                OmegaConf.to_container(job_cfg, resolve=True)  # a broken interpolation raises here
                instantiate(job_cfg.loss)
                jobs_seen += 1
        assert jobs_seen >= 6 + 6 + 9 + 4 + 2
        for kind in ("coco_panoptic", "coco_captions"):
            cfg = compose(config_name="train", overrides=[f"+data@eval.benchmark={kind}", "eval.benchmark.root=/x"])
            assert cfg.eval.benchmark.val._target_.startswith("fineclip.data.RegionCaptionDataset.from_")
        for group in ("data", "model", "loss", "optim", "trainer", "teacher", "regions"):
            for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
                compose(config_name="train", overrides=[f"{group}={option}"])
        for option in sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")):
            compose(config_name="evaluate", overrides=[f"data={option}"])
        slurm = compose(config_name="train", overrides=["hydra/launcher=slurm", "+experiment=coco_vitb16"],
                        return_hydra_config=True)
        assert slurm.hydra.launcher.tasks_per_node == slurm.hydra.launcher.gpus_per_node
        assert "SlurmLauncher" in slurm.hydra.launcher._target_


def test_step_checkpoints_are_pruned_and_a_truncated_one_falls_back(tmp_path, caplog):
    import logging

    import torch

    from fineclip.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_step_checkpoint

    for step in (10, 20, 30):
        save_step_checkpoint({"step": step, "w": torch.full((2,), float(step))}, tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_00000020.pt", "step_00000030.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 30
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash of the file system
    with pytest.raises(RuntimeError, match="step_00000030.pt"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000020.pt" and state["step"] == 20
    assert "step_00000030.pt" in caplog.text and "falling back" in caplog.text


def test_exported_weights_load_in_open_clip(tmp_path):
    import open_clip
    import torch

    from fineclip.engine.checkpoint import save_checkpoint
    from fineclip.export import export
    from fineclip.models import create_model

    torch.manual_seed(1)
    model = create_model("fineclip-tiny", freeze_text=False)
    save_checkpoint({"model": model.state_dict(), "config": {"model": {"name": "fineclip-tiny"}}}, tmp_path / "c.pt")
    assert export(str(tmp_path / "c.pt"), str(tmp_path / "open_clip.pt")) == "fineclip-tiny"
    loaded = open_clip.create_model("fineclip-tiny", pretrained=str(tmp_path / "open_clip.pt"))
    for name, value in model.clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    common = [f"cache_dir={tmp_path / 'cache'}", "data.synthetic.train=48", "data.synthetic.val=8",
              "data.batch_size=8", "trainer.epochs=1", "trainer.progress=false", "trainer.checkpoint_every=1",
              "optim.optimizer.lr=1e30", "optim.scheduler.warmup_steps=0"]  # the first step blows the weights up
    blown = _run("fineclip.train", *common, f"hydra.run.dir={tmp_path / 'stop'}", cwd=tmp_path)
    output = blown.stdout + blown.stderr
    assert blown.returncode == 1 and "non-finite loss at step 2" in output and "Traceback" not in output
    checkpoints = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step_*.pt"))
    assert checkpoints == ["step_00000001.pt"]  # the last checkpoint before the bad step, intact
    torch.load(tmp_path / "stop" / "checkpoints" / "step_00000001.pt", weights_only=True)
    skipped = _run("fineclip.train", *common, "trainer.on_nonfinite=skip", f"hydra.run.dir={tmp_path / 'skip'}",
                   cwd=tmp_path)
    assert skipped.returncode == 0 and "step skipped (5 so far)" in skipped.stdout + skipped.stderr


def test_evaluation_during_training_uses_the_configured_benchmark(tmp_path):
    """eval.benchmark (any data config) is what is evaluated every epoch and at the end."""
    from fineclip.engine.trainer import train
    from fineclip.eval import evaluate
    from fineclip.eval.eval_set import build_eval_set

    overrides = [
        f"cache_dir={tmp_path / 'cache'}", "data.synthetic.train=32", "data.synthetic.val=8", "data.batch_size=16",
        "trainer.epochs=2", "trainer.eval_every=1", "trainer.progress=false", "optim.scheduler.warmup_steps=1",
        "+data@eval.benchmark=synthetic", "eval.benchmark.synthetic.seed=7", "eval.benchmark.synthetic.train=4",
        "eval.benchmark.synthetic.val=12",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    from fineclip.data.synthetic import prepare_synthetic

    prepare_synthetic(cfg.data)
    metrics = train(cfg, tmp_path / "run")
    assert cfg.eval.benchmark.root.endswith("synthetic-v2-s7-n4-64px")
    benchmark = build_eval_set(cfg, image_size=64)
    assert len(benchmark) == 12
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val/box/top1" in r] == [2, 4]  # after epoch 1, and the end
    model = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    from hydra.utils import instantiate

    fresh = instantiate(cfg.model)
    fresh.load_state_dict(model)
    assert evaluate(fresh, benchmark, templates=list(cfg.data.templates), progress=False) == pytest.approx(metrics)


def test_a_benchmark_without_its_root_fails_naming_the_key(tmp_path):
    result = _run("fineclip.evaluate", "data=coco_panoptic", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    message = result.stdout + result.stderr
    assert result.returncode == 1 and "data.root is not set" in message and "Traceback" not in message


def _wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its transaction log (a 7-byte header,
    then 32 KiB blocks of chunks with a (crc32, length, type) header; type 1 = whole record,
    2/3/4 = first/middle/last piece), each record a protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = payload + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_logs_the_same_scalars_offline(tmp_path, monkeypatch, synthetic_root):
    from fineclip.engine.trainer import train

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8",
            "data.batch_size=8", "trainer.epochs=1", "trainer.log_every=1",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.wandb=true",
        ])
    train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = _wandb_history(tmp_path / "run")
    logged = {}
    for row in rows:
        logged.setdefault(row["_step"], {}).update(row)
    for line in lines:
        for key, value in line.items():
            if "/" in key and not isinstance(value, str):
                assert logged[line["step"]][key] == pytest.approx(value, rel=1e-6), (line["step"], key)
    assert [s for s in logged if "train/loss" in logged[s]] == [1, 2, 3]
    assert logged[3]["val/box/top1"] == json.loads((tmp_path / "run" / "eval.json").read_text())["box/top1"]


def test_peak_memory_restarts_for_each_run():
    """Each job of a multirun (one process) reports its own peak, not the process's lifetime peak."""
    import numpy as np

    from fineclip.engine.metrics_log import peak_memory_gb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base = peak_memory_gb(cpu)
    block = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    high = peak_memory_gb(cpu)
    del block
    reset_peak_memory(cpu)
    assert high > base + 0.3 and peak_memory_gb(cpu) < high - 0.3
