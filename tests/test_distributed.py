"""Two gloo processes with per-rank batch b must equal one process with batch 2b."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fineclip.engine.step import forward_loss
from fineclip.losses import FineCLIPLoss
from fineclip.models import create_model

B = 2  # images per rank


def _global_batch(regions_per_image):
    g = torch.Generator().manual_seed(0)
    n = len(regions_per_image)
    rows, captions = [], []
    for i, count in enumerate(regions_per_image):
        for j in range(count):
            x1, y1 = 4 + 9 * j, 2 + 7 * j
            rows.append([i, x1, y1, x1 + 20 + 3 * i, y1 + 18 + 2 * j])
            captions.append(f"a {['red', 'blue', 'green', 'white'][j % 4]} {['circle', 'square'][i % 2]} number {i}{j}")
    return {
        "images": torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8),
        "captions": [f"scene {i} with {c} shapes" for i, c in enumerate(regions_per_image)],
        "regions": torch.tensor(rows, dtype=torch.float32).reshape(-1, 5),
        "region_captions": captions,
    }


def _rank_slice(batch, rank):
    keep = (batch["regions"][:, 0] >= rank * B) & (batch["regions"][:, 0] < (rank + 1) * B)
    regions = batch["regions"][keep].clone()
    regions[:, 0] -= rank * B
    return {
        "images": batch["images"][rank * B : (rank + 1) * B],
        "captions": batch["captions"][rank * B : (rank + 1) * B],
        "regions": regions,
        "region_captions": [c for c, k in zip(batch["region_captions"], keep.tolist(), strict=True) if k],
    }


def _run(model, batch):
    loss, parts = forward_loss(model, FineCLIPLoss(), batch)
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in parts.items()} | {"total": loss.item()}, grads


def _worker(rank, world, init_file, regions_per_image, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", freeze_text=False)
    ddp = DistributedDataParallel(model)
    losses, grads = _run(ddp, _rank_slice(_global_batch(regions_per_image), rank))
    torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("regions_per_image", [(2, 1, 0, 0), (1, 1, 3, 2)], ids=["rank1-no-regions", "uneven"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, regions_per_image):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), regions_per_image, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    reference_losses, reference_grads = _run(create_model("fineclip-tiny", freeze_text=False),
                                             _global_batch(regions_per_image))
    # the objective is the mean over ranks of the per-rank losses
    for key, value in reference_losses.items():
        mean = sum(r["losses"][key] for r in ranks) / 2
        assert mean == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # DDP leaves the same averaged gradient on every rank, equal to the one-process gradient
    assert set(ranks[0]["grads"]) == set(reference_grads)
    for name, grad in reference_grads.items():
        for r in ranks:  # float32 summation order differs: compare each tensor's relative error
            error = (r["grads"][name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert error < 1e-5, (name, error.item())


def test_slurm_tasks_become_torch_distributed_ranks(monkeypatch):
    from fineclip.engine.distributed import slurm_to_torch_env

    environ = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    environ.update(SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_JOB_ID="4242",
                   MASTER_ADDR="node-a")  # otherwise read from `scontrol show hostnames`
    monkeypatch.setattr(os, "environ", environ)  # a private copy: nothing leaks into later tests
    slurm_to_torch_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_ADDR"] == "node-a" and os.environ["MASTER_PORT"] == str(20000 + 4242)
