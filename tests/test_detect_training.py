"""The detector's training run (fineclip/detect/run.py) as the engine's: BatchNorm synchronised over gloo ranks
against one BatchNorm over the whole batch (float64, gradients too); two gloo ranks train the detector to the
weights of one process holding both ranks' images; a run stopped mid-epoch resumes to the uninterrupted run's
weights and metrics, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn

import fineclip.detect.run as detect_run
from fineclip.cli import CONFIG_DIR
from fineclip.data.synthetic import prepare_synthetic
from fineclip.detect.sync_bn import AllReduceBatchNorm2d, sync_batchnorm
from fineclip.engine.checkpoint import load_checkpoint
from fineclip.engine.distributed import DistInfo

ROWS = (3, 5)
ONE_EPOCH_SGD = ("epochs=1", "optim.lr=1.0", "optim.weight_decay=0")  # uneven halves of the batch on ranks 0 and 1


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(ROWS), 4, 3, 2, generator=generator, dtype=torch.float64) * 3 + 1
    return x, torch.randn(x.shape, generator=generator, dtype=torch.float64)  # the loss is Σ y · w


def _bn_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, w = _batch()
    part = slice(0, ROWS[0]) if rank == 0 else slice(ROWS[0], None)
    x = x[part].clone().requires_grad_(True)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=0.3).double()), torch.device("cpu"))[0]
    assert type(bn) is AllReduceBatchNorm2d
    with torch.no_grad():
        bn.weight.copy_(torch.arange(1.0, 5.0))
        bn.bias.copy_(torch.arange(4.0))
    y = bn(x)
    (y * w[part]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_reduce_batchnorm_equals_one_batchnorm_over_both_ranks_batches(tmp_path):
    mp.spawn(_bn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, w = _batch()
    x.requires_grad_(True)
    bn = nn.BatchNorm2d(4, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.arange(1.0, 5.0))
        bn.bias.copy_(torch.arange(4.0))
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad)  # through the other rank's rows too
    for name in ("weight", "bias"):  # DDP sums (then averages) the ranks' parameter gradients
        torch.testing.assert_close(ranks[0][f"{name}_grad"] + ranks[1][f"{name}_grad"], getattr(bn, name).grad)
    for r in ranks:  # every rank keeps the whole batch's running statistics (unbiased variance)
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def _cfg(cache_dir, *overrides):
    args = ["data.synthetic.train=32", "data.synthetic.val=8", f"cache_dir={cache_dir}", "epochs=2",
            "optim.warmup_iters=1", "progress=false", "tensorboard=false", "log_every=1", "detector.fpn_channels=16",
            "detector.roi_samples=16", "data.batch_size=8", *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="detect", overrides=args)
    prepare_synthetic(cfg.data)
    return cfg


def _sgd(params, lr, betas, weight_decay):
    """Adam's first steps turn a gradient's rounding noise into ±lr; plain SGD keeps the comparison on the
    gradients, which is what the ranks must agree on (the optimiser runs the same on every rank)."""
    return torch.optim.SGD(params, lr=lr)


def _ddp_worker(rank, init_file, cache_dir, run_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.optim.AdamW = _sgd
    torch.manual_seed(0)
    detect_run.train(_cfg(cache_dir, *ONE_EPOCH_SGD), run_dir, DistInfo(rank, 2, rank), torch.device("cpu"))
    dist.destroy_process_group()


def _trained(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["detector"]


def test_two_gloo_ranks_train_the_detector_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _sgd)
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, *ONE_EPOCH_SGD)
    detect_run.train(cfg, tmp_path / "one", DistInfo(), torch.device("cpu"))
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), tmp_path / "two"), nprocs=2, join=True)
    torch.manual_seed(0)
    start, _ = detect_run.build(cfg, torch.device("cpu"))  # the heads' initial weights (same seed)
    one, two = _trained(tmp_path / "one"), _trained(tmp_path / "two")
    assert one.keys() == two.keys()
    moved = 0
    for name, initial in start.trainable_state_dict().items():
        if not initial.is_floating_point():  # BatchNorm's step counts, the novel-class mask
            assert torch.equal(one[name], two[name]) and not (name.endswith("tracked") and one[name] == 0), name
            continue
        delta_one, delta_two = one[name] - initial, two[name] - initial
        rounding = 4 * torch.finfo(torch.float32).eps * initial.float().norm()
        assert (delta_two - delta_one).norm() < 1e-4 * delta_one.norm().clamp(min=1e-4) + rounding, name
        moved += int(delta_one.norm() > 0)
    assert moved > 10  # the heads, the pyramid and the BatchNorm statistics all moved


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_runs_weights_and_metrics(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "checkpoint_every=1")
    torch.manual_seed(0)
    reference = detect_run.train(cfg, tmp_path / "reference", DistInfo(), torch.device("cpu"))

    learning_rate = detect_run.learning_rate

    def stop_at_iteration_5(cfg, iteration, epoch):  # 3 steps an epoch: epoch 1 step 2, after the checkpoint of (1, 2)
        if iteration == 5:
            raise KeyboardInterrupt
        return learning_rate(cfg, iteration, epoch)

    monkeypatch.setattr(detect_run, "learning_rate", stop_at_iteration_5)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        detect_run.train(cfg, tmp_path / "run", DistInfo(), torch.device("cpu"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.setattr(detect_run, "learning_rate", learning_rate)
    torch.manual_seed(0)  # the random (untrained) backbone of the config is rebuilt from the seed, as the command does
    resumed = detect_run.train(cfg, tmp_path / "run", DistInfo(), torch.device("cpu"))
    final, expected = _trained(tmp_path / "run"), _trained(tmp_path / "reference")
    for name, value in expected.items():
        assert torch.equal(final[name], value), name
    assert resumed == pytest.approx(reference, nan_ok=True)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "detect/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: the stopped run's 5, the resumed run's last
