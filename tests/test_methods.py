"""The roles methods are made of: teachers (frozen, EMA) and CLIPSelf's grid regions."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchvision.ops import roi_align

from fineclip.cli import CONFIG_DIR
from fineclip.data.random_batch import random_batch
from fineclip.engine.step import forward_loss, train_step
from fineclip.engine.trainer import train
from fineclip.losses import FineCLIPLoss
from fineclip.methods import EMATeacher, FrozenTeacher, GridRegions, grid_layouts
from fineclip.models import create_model


def test_grid_layouts_and_cells_follow_the_clipself_rule():
    expected = []
    for rows in range(1, 7):
        for cols in range(1, 7):
            if math.ceil(rows / 2) <= cols <= min(2 * rows, 6):
                expected.append((rows, cols))
    assert sorted(grid_layouts(6)) == sorted(expected)
    source = GridRegions(max_split=6, max_cells=20, seed=3)
    seen = set()
    for image_id in range(200):
        cells = source.cells(image_id, epoch=0, height=48, width=64)
        assert 1 <= len(cells) <= 20
        widths, heights = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
        rows, cols = round(48 / heights[0].item()), round(64 / widths[0].item())
        assert (rows, cols) in expected and len(cells) == min(rows * cols, 20)
        assert torch.allclose(widths, torch.full_like(widths, 64 / cols)) and torch.allclose(heights, heights[0])
        assert (cells[:, 0] >= 0).all() and (cells[:, 1] >= 0).all()
        assert (cells[:, 2] <= 64 + 1e-4).all() and (cells[:, 3] <= 48 + 1e-4).all()
        # cells are tiles of the r x c grid: their corners sit on the grid lines
        assert torch.allclose(cells[:, 0] / (64 / cols), (cells[:, 0] / (64 / cols)).round(), atol=1e-4)
        seen.add((rows, cols))
        assert torch.equal(cells, source.cells(image_id, epoch=0, height=48, width=64))  # (seed, epoch, id) only
    assert len(seen) == len(expected)  # every layout is drawn
    batch = random_batch(3, 2, 64)
    batch["image_ids"] = torch.tensor([5, 9, 11])
    gridded = source(batch, epoch=1)
    assert gridded["regions"][:, 0].unique().tolist() == [0.0, 1.0, 2.0]
    assert len(gridded["region_captions"]) == len(gridded["regions"])
    first = gridded["regions"][gridded["regions"][:, 0] == 1, 1:]
    assert torch.equal(first, source.cells(9, 1, 64, 64))


def _sd_reference(student, teacher_model, batch):
    """1 − cos(RoI feature of the student's dense map, the teacher's embedding of the 1.5x crop),
    averaged over regions, written with loops; the teacher side without gradient."""
    H, W = student.image_size
    pixels = student.normalize_pixels(batch["images"])
    _, dense = student.encode_image_dense(pixels)
    total = 0.0
    for b, x1, y1, x2, y2 in batch["regions"].tolist():
        box = torch.tensor([[0.0, x1, y1, x2, y2]], dtype=dense.dtype)
        pooled = roi_align(dense[int(b) : int(b) + 1], box, (1, 1), spatial_scale=dense.shape[-1] / W, aligned=True)
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, 0.75 * (x2 - x1), 0.75 * (y2 - y1)
        big = torch.tensor([[0.0, max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, W), min(cy + hh, H)]],
                           dtype=dense.dtype)
        with torch.no_grad():
            crop = roi_align(pixels[int(b) : int(b) + 1], big, (H, W), spatial_scale=1.0, aligned=True)
            target = F.normalize(teacher_model.clip.encode_image(crop)[0], dim=0)
        total = total + 1 - torch.dot(F.normalize(pooled.flatten(), dim=0), target)
    return total / len(batch["regions"])


def test_frozen_teacher_distils_from_the_initial_model_and_never_changes():
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", freeze_text=False).double().train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = FrozenTeacher()
    teacher.setup(model)
    loss_fn = FineCLIPLoss(gc_weight=0, sd_weight=1, rc_weight=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        batch = random_batch(2, 3, 64, step=step)
        batch["regions"] = batch["regions"].double()
        if step == 2:  # the loss and gradients against the written-out definition, in float64
            loss, _ = forward_loss(model, loss_fn, batch, teacher)
            model.zero_grad()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            expected = _sd_reference(model, teacher.model, batch)
            model.zero_grad()
            expected.backward()
            assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-8, atol=1e-10)
        train_step(model, loss_fn, optimizer, [batch], teacher=teacher)
        teacher.after_step(model, step + 1, 3)
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, initial[name]), name
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_ema_teacher_follows_dinos_momentum_schedule_indexed_from_zero():
    """DINO: momentum_schedule[it] for it = 0 … N−1, so the first update uses the base momentum and the
    last one is still an update (m < 1). Before the fix the update after step k used m_k (m_N = 1: a no-op)."""
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", freeze_text=False).double().train()
    teacher = EMATeacher(momentum=0.9)
    teacher.setup(model)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = FineCLIPLoss(gc_weight=1, sd_weight=1, rc_weight=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    total, momenta = 4, []
    for step in range(1, total + 1):
        batch = random_batch(2, 2, 64, step=step)
        batch["regions"] = batch["regions"].double()
        train_step(model, loss_fn, optimizer, [batch], teacher=teacher)
        teacher.after_step(model, step, total)
        # DINO's cosine_scheduler(0.9, 1, ...)[step - 1], written out
        m = 1 + 0.5 * (0.9 - 1) * (1 + math.cos(math.pi * (step - 1) / total))
        momenta.append(m)
        for name, param in model.named_parameters():
            expected[name] = m * expected[name] + (1 - m) * param.detach()
    assert momenta[0] == pytest.approx(0.9) and momenta[-1] < 1 - 1e-3
    for name, param in teacher.model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in teacher.model.named_parameters())


def _cfg(data_root, *extra):
    overrides = [f"data.root={data_root}", "data.batch_size=4", "data.val=null", "trainer.progress=false",
                 "trainer.tensorboard=false", "loss=sd", "trainer.epochs=2", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_an_ema_teacher_with_grid_regions_resumes_exactly(tmp_path):
    from fineclip.data.synthetic import generate

    data_root = generate(tmp_path / "data", train=16, val=0, size=64, seed=2)
    extra = ["teacher=ema", "teacher.momentum=0.8", "regions=grid", "trainer.keep_checkpoints=0",
             "trainer.checkpoint_every=2"]
    train(_cfg(data_root, *extra), tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    train(_cfg(data_root, *extra), interrupted)
    for path in interrupted.glob("checkpoints/*.pt"):  # as if it had died after step 4 of 8
        if path.name == "last.pt" or int(path.stem.split("_")[1]) > 4:
            path.unlink()
    train(_cfg(data_root, *extra, "trainer.resume=auto"), interrupted)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert b["global_step"] == a["global_step"] == 8
    for part in ("model", "teacher"):
        flat_a = a[part] if part == "model" else a[part]["model"]
        flat_b = b[part] if part == "model" else b[part]["model"]
        for name, value in flat_a.items():
            assert torch.equal(value, flat_b[name]), (part, name)
    # the EMA teacher moved away from the student's start and differs from the student
    assert any(not torch.equal(a["teacher"]["model"][k], v) for k, v in a["model"].items())


def test_methods_set_loss_teacher_and_regions_and_the_command_line_still_wins():
    def composed(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides))
        weights = (cfg.loss.gc_weight, cfg.loss.sd_weight, cfg.loss.rc_weight)
        return weights, cfg.teacher._target_.rsplit(".", 1)[1], cfg.regions._target_.rsplit(".", 1)[1]

    assert composed() == ((1, 1, 1), "SelfTeacher", "BoxRegions")  # method=fineclip, the default
    assert composed("method=clip") == ((1, 0, 0), "SelfTeacher", "BoxRegions")
    assert composed("method=clipself") == ((0, 1, 0), "FrozenTeacher", "GridRegions")
    assert composed("method=clipself", "regions=boxes") == ((0, 1, 0), "FrozenTeacher", "BoxRegions")
    assert composed("method=fineclip", "teacher=ema") == ((1, 1, 1), "EMATeacher", "BoxRegions")


def test_clipself_releases_the_alpha_ensemble_of_student_and_initial_weights(tmp_path):
    from fineclip.data.synthetic import generate
    from fineclip.engine.load import load_model
    from fineclip.eval import evaluate

    data_root = generate(tmp_path / "data", train=16, val=4, size=64, seed=4)
    overrides = [f"data.root={data_root}", "data.batch_size=4", "trainer.progress=false", "trainer.epochs=1",
                 "trainer.tensorboard=false", "method=clipself", "optim.optimizer.lr=1e-2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics = train(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    released = torch.load(tmp_path / "run" / "checkpoints" / "ensembled.pt", weights_only=True)["model"]
    initial = last["teacher"]["model"]
    moved = 0
    for name, student in last["model"].items():
        torch.testing.assert_close(released[name], 0.7 * student + 0.3 * initial[name], rtol=0, atol=1e-7)
        moved += int(not torch.equal(student, initial[name]))
    assert moved > 0  # the student trained, so the ensemble is neither of the two
    # the final evaluation is that of the released weights, and fineclip.evaluate reproduces it
    ensembled = tmp_path / "run" / "checkpoints" / "ensembled.pt"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(config_name="evaluate", overrides=[f"data.root={data_root}", f"checkpoint={ensembled}"])
    model, _ = load_model(eval_cfg)
    from fineclip.eval.eval_set import build_eval_set

    again = evaluate(model, build_eval_set(eval_cfg, 64, 8), templates=list(cfg.data.templates), progress=False)
    assert again == pytest.approx(metrics)
