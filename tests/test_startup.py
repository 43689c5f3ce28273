"""Start-up of a rank: its GPU is bound before the process group exists; the optimizer's lr
default is the fine-tuning one unless the model is trained from scratch."""

import os

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.engine import distributed


def test_a_rank_binds_its_gpu_before_joining_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "environ", {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    def init_process_group(**kwargs):
        calls.append(("init_process_group", kwargs["backend"], kwargs.get("device_id")))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info, device = distributed.init_distributed("auto")
    assert device == torch.device("cuda", 1) and (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init_process_group", "nccl", torch.device("cuda", 1))]


def test_the_cpu_uses_gloo_and_binds_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "environ", {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append("set_device"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs["backend"]))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    _, device = distributed.init_distributed("cpu")
    assert device == torch.device("cpu") and calls == ["gloo"]


@pytest.mark.parametrize(("overrides", "lr"), [
    (["model=eva02_b16"], 1e-5),             # a new experiment on a pretrained model: the fine-tuning lr
    (["model=vit_b16", "data=coco"], 1e-5),
    ([], 1e-3),                              # the tiny model, trained from scratch
    (["model=tiny_eva"], 1e-3),
    (["+experiment=coco_vitb16"], 1e-5),
    (["+experiment=synthetic_pretrain"], 1e-3),
    (["+experiment=synthetic_finetune"], 3e-4),
    (["model=tiny", "optim.optimizer.lr=0.1"], 0.1),  # the command line wins
])
def test_the_default_lr_is_the_fine_tuning_lr_unless_the_model_trains_from_scratch(overrides, lr):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.optim.optimizer.lr == pytest.approx(lr)
