"""Every loss config of configs/loss/ and every method of configs/method/, with both tower kinds
(and mixes of teachers, grid regions and proposals), trains under DDP: two gloo ranks run two
optimizer steps through the trainer and end
with the weights of one process holding both ranks' batches. (A term that leaves a trainable
parameter out of the graph, such as the logit scale under loss=sd, used to stop DDP at step 2.)"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fineclip.cli import CONFIG_DIR
from fineclip.data.synthetic import generate
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.engine.distributed import DistInfo
from fineclip.engine.trainer import train
from fineclip.models import create_model

# every loss config, except those that need their method's teacher (they run as that method below)
LOSSES = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")
                if p.stem not in ("detailclip", "clim", "declip", "densevlm"))
METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
# a method's overrides for batches of 4 per rank (CLIM's default mosaics need 29 images) and without downloads
# (DeCLIP's context teacher: a tiny random ViT; DenseVLM's teacher: another checkpoint of the student's tower)
METHOD_EXTRA = {"clim": ("regions.sizes=[2]",), "declip": ("vfm=tiny",), "densevlm": ("teacher.checkpoint=TEACHER",)}
MODELS = ("tiny", "tiny_eva")  # open_clip's VisionTransformer, timm's Eva (rotary embeddings)
# (model, loss, extra overrides): every loss and every method with both towers, and role mixes
CASES = [(model, loss, ()) for model in MODELS for loss in LOSSES] + [
    (model, None, (f"method={method}", *METHOD_EXTRA.get(method, ()))) for model in MODELS for method in METHODS
    if method != "fineclip"
] + [
    ("tiny", "sd", ("teacher=ema", "teacher.momentum=0.5", "regions=grid")),
    ("tiny", "fineclip", ("teacher=frozen",)),
    ("tiny_eva", "fineclip", ("teacher=ema", "teacher.momentum=0.5")),
    ("tiny", None, ("method=regionclip", "regions=proposals", "regions.file=PROPOSALS")),
    ("tiny", None, ("method=detailclip", "model.freeze_patch_embed=true", "model.detailclip.decoder_heads=16",
                    "model.detailclip.norm_eps=1e-6", "model.detailclip.init=reference",
                    "optim.optimizer.no_decay=ndim", "teacher.view_source=image", "teacher.view_scale=[0.14,1.0]")),
    # the reference's settings (+experiment=detailclip_*), views cut by the data loader from the full image
    ("tiny_eva_clip", "fineclip", ("model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention",
                                   "+model.dense_mode.mode=csa")),  # DeCLIP's dense mode (model=eva02_b16_csa)
    # composed rows that no fork runs: FineCLIP's losses with DeCLIP's csa block on an OpenAI-style ViT, DeCLIP on
    # the data set's boxes with the scaled attention, DenseVLM with L_GC beside it and its teacher's 203 things
    ("tiny", "fineclip", ("model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention",
                          "+model.dense_mode.mode=csa")),
    ("tiny", None, ("method=declip", "vfm=tiny", "regions=boxes", "model.dense_mode.scaled=true")),
    ("tiny", None, ("method=densevlm", "teacher.checkpoint=TEACHER", "loss.gc_weight=1.0", "loss.thing_count=203")),
]
PER_RANK = 4


def _name(model, loss, extra):
    return "-".join([model, loss or "", *(e.split("/")[-1] for e in extra)]).replace("--", "-")


def _config(data_root, loss, model, batch_size, extra=()):
    extra = [e.replace("PROPOSALS", os.path.join(data_root, "proposals.json"))
             .replace("=TEACHER", "=" + os.path.join(data_root, f"teacher_{model}.pt")) for e in extra]
    overrides = [
        *extra, *([f"loss={loss}"] if loss else []), f"model={model}", f"data.root={data_root}",
        f"data.batch_size={batch_size}",
        "data.val=null", "trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.log_every=1", "optim=sgd", "optim.optimizer.lr=0.5", "optim.optimizer.momentum=0.0",
        "optim.scheduler.warmup_steps=0", "optim.scheduler.min_lr=0.5",  # a constant lr: both steps count
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _worker(rank, init_file, data_root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for model, loss, extra in CASES:
        cfg = _config(data_root, loss, model, PER_RANK, extra)
        train(cfg, os.path.join(out_dir, _name(model, loss, extra)), DistInfo(rank, 2, rank))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_every_loss")
    data_root = generate(tmp / "data", train=16, val=0, size=64, seed=3)  # 2 steps of 2 x 4 images
    # proposals: each object's box, shifted, and one box of the image centre
    annotations = json.loads((data_root / "train.json").read_text())["annotations"]
    proposals = [{"image_id": a["image_id"], "bbox": [a["bbox"][0] + 2, a["bbox"][1] + 1, *a["bbox"][2:]],
                  "score": 0.9} for a in annotations]
    proposals += [{"image_id": i, "bbox": [16, 16, 32, 32], "score": 0.5} for i in range(1, 17)]
    (data_root / "proposals.json").write_text(json.dumps(proposals))
    for model in MODELS:  # DenseVLM's teacher: another model of the same tower, as a training checkpoint
        torch.manual_seed(7)
        save_checkpoint({"model": create_model(f"fineclip-{model.replace('_', '-')}").state_dict(), "config": {}},
                        data_root / f"teacher_{model}.pt")
    mp.spawn(_worker, args=(str(tmp / "init"), str(data_root), str(tmp / "ddp")), nprocs=2, join=True)
    return tmp, data_root


@pytest.mark.parametrize(("model", "loss", "extra"), CASES, ids=[_name(*case) for case in CASES])
def test_two_ranks_equal_one_process_for_every_loss(runs, model, loss, extra):
    tmp, data_root = runs
    torch.manual_seed(0)
    cfg = _config(data_root, loss, model, 2 * PER_RANK, extra)
    run_name = _name(model, loss, extra)
    train(cfg, tmp / "one" / run_name)
    one, two = _weights(tmp / "one" / run_name), _weights(tmp / "ddp" / run_name)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        start = instantiate(cfg.model).state_dict()  # the initial weights of both runs
    moved = 0
    for name, initial in start.items():
        delta_one, delta_two = one[name] - initial, two[name] - initial
        scale = delta_one.norm().clamp(min=1e-4)  # a zero gradient (key biases) is rounding noise either way
        rounding = 2 * torch.finfo(torch.float32).eps * initial.float().norm()  # the weights' own float32 resolution
        assert (delta_two - delta_one).norm() < 1e-4 * scale + rounding, (name, delta_one.norm().item())
        moved += int(delta_one.norm() > 0)
    assert moved > 0  # the steps did train something
    teachers = [torch.load(d / run_name / "checkpoints" / "last.pt", weights_only=True)["teacher"] for d in
                (tmp / "one", tmp / "ddp")]
    for key in ("centers",):  # DetailCLIP's centres: the mean over both ranks' targets
        if key in teachers[0]:
            torch.testing.assert_close(teachers[1][key], teachers[0][key], rtol=1e-4, atol=1e-6)
    for key, value in teachers[0].get("model", {}).items():  # a frozen or EMA copy: the same on both sides
        initial = start[key.removeprefix("model.")] if key not in start else start[key]
        scale = (value - initial).norm().clamp(min=1e-4)
        rounding = 2 * torch.finfo(torch.float32).eps * initial.float().norm()
        assert (teachers[1]["model"][key] - value).norm() < 1e-4 * scale + rounding, key
