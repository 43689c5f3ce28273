"""trainer.sync_grads=false: each rank trains alone on its shard of every global batch, with local
losses and no gradient synchronisation (how the public CLIPSelf-lineage code trains); rank 0's
weights are saved. So rank 0 must end where one process trained on rank 0's shard alone ends."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.data import loader as loader_module
from fineclip.data.sampler import GlobalBatchSampler
from fineclip.data.synthetic import generate
from fineclip.engine import trainer as trainer_module
from fineclip.engine.distributed import DistInfo


def _cfg(data_root, batch_size, *extra):
    overrides = [f"data.root={data_root}", f"data.batch_size={batch_size}", "data.val=null", "trainer.epochs=1",
                 "trainer.progress=false", "trainer.tensorboard=false", "optim=sgd", "optim.optimizer.lr=0.5",
                 "optim.optimizer.momentum=0.0", "optim.scheduler.warmup_steps=0", "optim.scheduler.min_lr=0.5",
                 *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _worker(rank, init_file, data_root, run_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    trainer_module.train(_cfg(data_root, 4, "trainer.sync_grads=false"), run_dir, DistInfo(rank, 2, rank))
    dist.destroy_process_group()


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_parity_mode_rank0_equals_one_process_on_its_shard(tmp_path, monkeypatch):
    data_root = generate(tmp_path / "data", train=16, val=0, size=64, seed=5)  # 2 steps of 2 x 4 images
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(data_root), str(tmp_path / "parity")), nprocs=2, join=True)

    # one process that sees exactly rank 0's slice of every global batch of 8
    def shard0(num_samples, batch_size, seed, rank, world_size):
        return GlobalBatchSampler(num_samples, batch_size, seed, rank=0, world_size=2)

    with monkeypatch.context() as patch:
        patch.setattr(loader_module, "GlobalBatchSampler", shard0)
        trainer_module.train(_cfg(data_root, 4), tmp_path / "shard0")
    trainer_module.train(_cfg(data_root, 8), tmp_path / "global")  # the synchronised objective
    parity, alone, synced = (_weights(tmp_path / d) for d in ("parity", "shard0", "global"))
    for name, value in alone.items():
        torch.testing.assert_close(parity[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert max((parity[k] - synced[k]).abs().max().item() for k in synced) > 1e-3  # not the synced run
