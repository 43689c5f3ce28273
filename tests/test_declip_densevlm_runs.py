"""DeCLIP, DenseVLM, CLIM and the composed rows as a user runs them: ``torchrun --nproc_per_node 2`` gives the
losses and evaluation of one process holding both ranks' batches, and a run killed with SIGKILL mid-epoch resumes to the
uninterrupted run's weights bit for bit (their teachers' state included: the frozen copy, the VFM built again, the
checkpoint teacher's initial student)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_resume import TIMEOUT, _assert_same_weights, _wait_for, _weights

from fineclip.engine.checkpoint import save_checkpoint
from fineclip.models import create_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["data.synthetic.train=32", "data.synthetic.val=8", "trainer.epochs=2", "trainer.checkpoint_every=2",
          "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
          "optim.scheduler.warmup_steps=2"]
ROWS = {
    "declip": ["method=declip", "vfm=tiny"],
    "densevlm": ["method=densevlm", "teacher.checkpoint=TEACHER"],
    # composed: FineCLIP's losses with DeCLIP's csa last block; DeCLIP on the data set's boxes
    "fineclip_csa": ["model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention",
                     "+model.dense_mode.mode=csa"],
    "declip_boxes": ["method=declip", "vfm=tiny", "regions=boxes"],
    "clim": ["method=clim", "regions.sizes=[2]"],  # one mosaic of 2 x 2 per rank of 4, two in one process of 8
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(11)
    save_checkpoint({"model": create_model("fineclip-tiny").state_dict(), "config": {}}, path)
    return path


def _cmd(row, run_dir, teacher_file, *extra, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    overrides = [o.replace("TEACHER", str(teacher_file)) for o in ROWS[row]]
    return [sys.executable, *launcher, "-m", "fineclip.train", f"cache_dir={teacher_file.parent.parent / 'cache'}",
            *COMMON, f"data.batch_size={8 // ranks}", *overrides, f"hydra.run.dir={run_dir}", *extra]


def _run(cmd):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, teacher_file):
    """The uninterrupted one-process run of every row."""
    tmp = tmp_path_factory.mktemp("one")
    for row in ROWS:
        _run(_cmd(row, tmp / row, teacher_file))
    return tmp


@pytest.mark.parametrize("row", ROWS)
def test_torchrun_two_processes_equal_one_process(tmp_path, teacher_file, one_process, row):
    run_dir = tmp_path / row
    _run(_cmd(row, run_dir, teacher_file, ranks=2))
    lines = [[line for x in (d / "metrics.jsonl").read_text().splitlines() if "train/loss" in (line := json.loads(x))]
             for d in (one_process / row, run_dir)]
    assert len(lines[0]) == len(lines[1]) == 8  # 2 epochs of 4 steps
    for a, b in zip(*lines, strict=True):
        losses = [k for k in a if k.startswith("train/loss")]
        assert len(losses) > 1  # the total and each term
        for key in losses:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (row, a["step"], key)
    one = json.loads((one_process / row / "eval.json").read_text())
    assert json.loads((run_dir / "eval.json").read_text()) == pytest.approx(one, abs=1e-6)


@pytest.mark.parametrize("row", ROWS)
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, teacher_file, one_process, row):
    run_dir = tmp_path / row
    process = subprocess.Popen(_cmd(row, run_dir, teacher_file), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for(run_dir / "checkpoints" / "step_00000006.pt", process)  # epoch 2 is steps 5-8
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not after it
    output = _run(_cmd(row, run_dir, teacher_file, "trainer.resume=auto"))
    assert "resuming from" in output
    _assert_same_weights(_weights(run_dir), _weights(one_process / row))
    if (one_process / row / "checkpoints" / "ensembled.pt").exists():  # DeCLIP's and DenseVLM's released weights
        released = [torch.load(d / "checkpoints" / "ensembled.pt", weights_only=True)
                    for d in (run_dir, one_process / row)]
        _assert_same_weights(released[0]["model"], released[1]["model"])
