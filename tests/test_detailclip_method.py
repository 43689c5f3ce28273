"""DetailCLIP's wiring against independent computations: the teacher's views, kept tokens, targets,
centres and temperature schedule; the EMA over the image tower and head; the student's kept-token
pass, decoder and heads; the run end to end, reproduced from its checkpoint."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fineclip.cli import CONFIG_DIR
from fineclip.data.views import make_views, view_params
from fineclip.engine.build import check_features_provided
from fineclip.errors import ConfigError
from fineclip.methods import DetailCLIPTeacher, SelfTeacher
from fineclip.models import create_model
from fineclip.models.attention import cls_attention, kept_tokens


def _model():
    torch.manual_seed(0)
    return create_model("fineclip-tiny", freeze_text=False, detailclip={}).train()


def _batch(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(ids), 3, 80, 96), dtype=torch.uint8, generator=g)
    return {"images": images, "image_ids": torch.tensor(ids)}


def _normed_tokens(visual, pixels):
    """open_clip's own forward, with the final norm's output (every token) captured."""
    captured = []
    hook = visual.ln_post.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        visual(pixels)
    hook.remove()
    return captured[0]


def test_teacher_views_kept_tokens_targets_and_centres():
    model = _model()
    teacher = DetailCLIPTeacher(seed=5)
    teacher.setup(model)
    teacher.set_epoch(3)
    batch = _batch([11, 12, 13])
    old_centers = torch.randn(2, teacher.centers.shape[1]) * 0.1
    teacher.centers = old_centers.clone()
    out = teacher.features(batch, teacher.provides)
    views = out["views"]

    # each image's view v comes from its own draw (seed, epoch, image id, v) at the model's size
    for v in range(2):
        for b, image_id in enumerate([11, 12, 13]):
            u = torch.from_numpy(np.random.default_rng((5, 3, image_id, v)).random(8))[None]
            expected = make_views(batch["images"][b:b + 1].float() / 255, view_params(u, 80, 96), 64)
            torch.testing.assert_close(views[v * 3 + b:v * 3 + b + 1], model.normalize_pixels(expected))
    # ... so a batch of other images and order gives the same view of an image (ranks, resume)
    alone = teacher.features(_batch([13, 99], seed=0) | {"images": batch["images"][[2, 0]]}, teacher.provides)
    torch.testing.assert_close(alone["views"][0], views[2])

    # kept tokens: the top ⌊16·0.5⌋ + 1 = 9 of 4 × 4 cells of the teacher's attention (2 × 2 tokens each)
    attention = cls_attention(teacher.model.clip.visual, views)
    assert torch.equal(out["keep"], kept_tokens(attention, 4, 0.5))
    assert (out["keep"].sum(1) == 36).all()

    # targets: the teacher's head on open_clip's normed tokens; patch targets at the removed tokens
    tokens = _normed_tokens(teacher.model.clip.visual, views)
    with torch.no_grad():
        head = teacher.model.detail.head(tokens)
    torch.testing.assert_close(out["teacher_cls"], head[:, 0].view(2, 3, -1))
    for row in range(6):
        torch.testing.assert_close(out["teacher_patch"][row], head[row, 1:][~out["keep"][row]])
    # centres: the loss sees the old ones; after the optimizer step c ← 0.9·c + 0.1·(mean of its teacher outputs)
    assert torch.equal(out["centers"], old_centers) and torch.equal(teacher.centers, old_centers)
    cls_mean = head[:, 0].double().mean(0)
    patch_mean = head[:, 1:].double().reshape(-1, head.shape[-1]).mean(0)
    expected = torch.stack([0.9 * old_centers[0].double() + 0.1 * cls_mean,
                            0.9 * old_centers[1].double() + 0.1 * patch_mean])
    teacher.begin_step()  # (drops what the two calls above gathered)
    teacher.features(batch, teacher.provides)
    teacher.after_step(model, 1, 10)
    torch.testing.assert_close(teacher.centers.double(), expected, rtol=1e-5, atol=1e-6)


def test_centres_move_once_per_optimizer_step_from_all_its_micro_batches_and_not_on_skipped_steps():
    """DINO/iBOT update the centres once per optimizer step from the whole batch. With K = 2 micro-batches
    the update is c ← 0.9·c + 0.1·(mean over both), not two updates; a step skipped for a non-finite
    loss (begin_step, no after_step) leaves them and leaks nothing into the next step."""
    model = _model()
    teacher = DetailCLIPTeacher(seed=1)
    teacher.setup(model)
    old = torch.randn(2, teacher.centers.shape[1]) * 0.1
    teacher.centers = old.clone()
    means = []
    teacher.begin_step()
    for ids in ([1, 2], [3, 4]):
        out = teacher.features(_batch(ids), teacher.provides)
        assert torch.equal(out["centers"], old)  # every micro-batch of the step sees the same centres
        means.append(torch.stack([out["teacher_cls"].double().reshape(-1, out["teacher_cls"].shape[-1]).mean(0),
                                  _patch_mean(teacher, out)]))
    teacher.after_step(model, 1, 10)
    expected = 0.9 * old.double() + 0.1 * (means[0] + means[1]) / 2
    torch.testing.assert_close(teacher.centers.double(), expected, rtol=1e-5, atol=1e-6)

    after_first = teacher.centers.clone()
    teacher.begin_step()
    teacher.features(_batch([5, 6]), teacher.provides)  # this step's loss is not finite: no after_step
    assert torch.equal(teacher.centers, after_first)
    teacher.begin_step()
    out = teacher.features(_batch([7, 8]), teacher.provides)
    teacher.after_step(model, 2, 10)
    mean = torch.stack([out["teacher_cls"].double().reshape(-1, out["teacher_cls"].shape[-1]).mean(0),
                        _patch_mean(teacher, out)])
    torch.testing.assert_close(teacher.centers.double(), 0.9 * after_first.double() + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)


def _patch_mean(teacher, out) -> torch.Tensor:
    """The mean of the teacher head over every patch token (kept and removed) of the views."""
    tokens = _normed_tokens(teacher.model.clip.visual, out["views"])
    with torch.no_grad():
        head = teacher.model.detail.head(tokens)
    return head[:, 1:].double().reshape(-1, head.shape[-1]).mean(0)


def test_teacher_temperatures_follow_the_epoch_and_probe_keeps_centres():
    model = _model()
    teacher = DetailCLIPTeacher()
    teacher.setup(model)
    temps = {}
    for epoch in (0, 1, 4):
        teacher.set_epoch(epoch)
        temps[epoch] = teacher.features(_batch([1, 2]), teacher.provides)["teacher_temperature"].tolist()
    assert temps[0] == pytest.approx([0.04, 0.04]) and temps[1] == temps[4] == pytest.approx([0.04, 0.07])
    before = teacher.centers.clone()
    with teacher.probe():
        teacher.features(_batch([3, 4]), teacher.provides)
    assert torch.equal(teacher.centers, before)


def test_ema_follows_the_cosine_momentum_on_the_image_tower_and_head_only():
    model = _model()
    teacher = DetailCLIPTeacher(momentum=0.9)
    teacher.setup(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.detach().double().clone() for k, v in teacher.model.named_parameters()}
    student = {k: v.detach().double() for k, v in model.named_parameters()}
    step, total = 3, 10
    teacher.after_step(model, step, total)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * (step - 1) / total) + 1) / 2  # DINO's schedule, indexed 0 … N−1
    followed = 0
    for name, param in teacher.model.named_parameters():
        if name.startswith(("clip.visual.", "detail.head.")):
            torch.testing.assert_close(param.double(), m * before[name] + (1 - m) * student[name])
            followed += 1
        else:  # the text tower, logit scale and decoder are not the teacher's
            assert torch.equal(param.double(), before[name]), name
    assert followed > 20


def test_student_pass_decoder_and_heads():
    model = _model()
    g = torch.Generator().manual_seed(2)
    views = torch.randn(4, 3, 64, 64, generator=g)
    keep = torch.zeros(4, 64, dtype=torch.bool)
    for row in range(4):
        keep[row, torch.randperm(64, generator=g)[:28]] = True
    seen = []
    hook = model.detail.decoder.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = model.detail(model, torch.zeros(2, 3, 64, 64), {"views": views, "keep": keep}, model.detail.provides)
    hook.remove()
    visual, decoder = model.clip.visual, model.detail.decoder
    with torch.no_grad():
        x = visual.transformer(torch.cat([visual._embeds(views)[:, :1],
                                          torch.stack([visual._embeds(views)[r, 1:][keep[r]] for r in range(4)])], 1))
        latent = visual.ln_post(x)
        emb = F.normalize(latent[:, 0] @ visual.proj, dim=-1)
        torch.testing.assert_close(out["view_emb"], emb.view(2, 2, -1))
        torch.testing.assert_close(out["student_cls"], model.detail.head(latent[:, 0]).view(2, 2, -1))
        # the decoder's input: CLS, then each position its kept token or the mask token, plus positions
        embedded = decoder.embed(latent)
        for row in range(4):
            kept = iter(embedded[row, 1:])
            expected = [embedded[row, 0]] + [next(kept) if keep[row, n] else decoder.mask_token[0, 0]
                                             for n in range(64)]
            torch.testing.assert_close(seen[0][row], torch.stack(expected) + decoder.pos_embed[0])
        decoded = decoder.norm(decoder.block(seen[0]))[:, 1:]
        torch.testing.assert_close(out["rec_pred"], decoder.pixels(decoded))
        for row in range(4):
            torch.testing.assert_close(out["student_patch"][row], model.detail.head(decoded[row][~keep[row]]))


def test_detailclip_loss_without_its_teacher_is_a_config_error():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["method=detailclip", "teacher=self"])
    model = instantiate(cfg.model)
    with pytest.raises(ConfigError, match="method=detailclip"):
        check_features_provided(instantiate(cfg.loss), model, SelfTeacher())


def test_detailclip_trains_evaluates_everything_and_reproduces_from_its_checkpoint(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    common = [f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8",
              "eval.segmentation=true", "eval.probe_steps=30"]
    cmd = [sys.executable, "-m", "fineclip.train", "method=detailclip", *common, "data.batch_size=8",
           "trainer.epochs=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
           f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in lines if "train/loss" in r]
    assert len(losses) == 6 and {"train/loss_clip", "train/loss_cls", "train/loss_patch", "train/loss_rec"} <= set(
        losses[0])
    for r in losses:
        total = sum(r[f"train/loss_{k}"] for k in ("clip", "cls", "patch", "rec"))
        assert r["train/loss"] == pytest.approx(total, rel=1e-5)
    trained = json.loads((run_dir / "eval.json").read_text())
    assert {"box/top1", "retrieval/i2t_r1", "seg/zero_shot_miou", "seg/linear_probe_miou"} <= set(trained)
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["teacher"]["centers"].abs().sum() > 0 and any(k.startswith("detail.") for k in saved["model"])
    out = tmp_path / "eval.json"
    evaluate = subprocess.run([sys.executable, "-m", "fineclip.evaluate", *common,
                               f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"output={out}",
                               f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(out.read_text()) == pytest.approx(trained, abs=1e-6)
