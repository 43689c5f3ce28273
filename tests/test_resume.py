"""Interrupted runs: SIGKILL + resume is exact, SIGTERM saves and exits 0, a corrupt checkpoint
falls back to the previous one, torchrun equals one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

COMMON = [
    "data.synthetic.train=64", "data.synthetic.val=8", "data.batch_size=8", "trainer.epochs=3",
    "trainer.checkpoint_every=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
    "optim.scheduler.warmup_steps=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 300  # seconds for any one training command: a hung run fails the test instead of CI


def _cmd(tmp_path, run_dir, *extra):
    return [sys.executable, "-m", "fineclip.train", f"cache_dir={tmp_path.parent / 'cache'}", *COMMON,
            f"hydra.run.dir={run_dir}", *extra]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _wait_for(path, process, timeout=120):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        if time.time() - start > timeout:
            process.kill()
            pytest.fail(f"{path.name} was not written within {timeout} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    done = subprocess.run(_cmd(tmp, run_dir), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(_cmd(tmp_path, run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run_dir / "checkpoints" / "step_00000010.pt", process)  # epoch 2 is steps 9-16
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    done = subprocess.run(_cmd(tmp_path, run_dir, "trainer.resume=auto"), env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    _assert_same_weights(_weights(run_dir), _weights(reference_run))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 24


def test_sigkill_then_resume_is_exact_with_detailclips_teacher_centres_and_schedule(tmp_path):
    """DetailCLIP keeps state outside the model: the EMA teacher, the centres, the epoch's
    temperatures and the per-(epoch, image) views; a resumed run ends where an uninterrupted one does."""
    detail = ["method=detailclip", "trainer.epochs=2", "eval.segmentation=false"]
    reference = tmp_path / "reference"
    done = subprocess.run(_cmd(tmp_path, reference, *detail), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    process = subprocess.Popen(_cmd(tmp_path, run_dir, *detail), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for(run_dir / "checkpoints" / "step_00000010.pt", process)  # in epoch 2: the patch τ has changed
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = subprocess.run(_cmd(tmp_path, run_dir, *detail, "trainer.resume=auto"), env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    _assert_same_weights(_weights(run_dir), _weights(reference))
    teachers = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["teacher"] for d in (run_dir, reference)]
    _assert_same_weights(teachers[0]["model"], teachers[1]["model"])
    assert torch.equal(teachers[0]["centers"], teachers[1]["centers"])


def test_sigterm_saves_and_exits_cleanly_and_a_truncated_newest_checkpoint_falls_back(tmp_path, reference_run):
    """SIGTERM: a checkpoint and exit 0. Then the newest checkpoint is truncated: resume=auto warns, falls back to
    the one before it, and still ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(_cmd(tmp_path, run_dir), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    _wait_for(run_dir / "checkpoints" / "step_00000004.pt", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["global_step"] >= 4 and saved["global_step"] < 24
    newest, previous = sorted((run_dir / "checkpoints").glob("step_*.pt"))[::-1][:2]
    newest.write_bytes(newest.read_bytes()[:1000])
    done = subprocess.run(_cmd(tmp_path, run_dir, "trainer.resume=auto"), env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert newest.name in output and "falling back" in output
    assert "resuming from" in output and previous.name in output
    assert "Traceback" not in output
    _assert_same_weights(_weights(run_dir), _weights(reference_run))


def test_torchrun_two_processes_give_the_one_process_metrics(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fineclip.train",
           f"cache_dir={tmp_path.parent / 'cache'}", *COMMON, "data.batch_size=4", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((reference_run / "eval.json").read_text())
    two = json.loads((run_dir / "eval.json").read_text())
    assert two == pytest.approx(one, abs=1e-6)
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (reference_run, run_dir)]
    for a, b in zip(*lines, strict=True):
        for key in a:
            if key.startswith("train/loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    # (weights are not compared bit for bit: the attention key bias has a zero gradient up to
    # rounding noise, which AdamW's normalisation turns into lr-sized steps of either sign)
