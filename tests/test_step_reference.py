"""The training step (``train_step``, the one the trainer and the benchmark run) against a
straightforward one written from the method's definition: two trunk passes (open_clip's own
encode_image for v, a second pass for the dense map), every region pooled and cropped in a Python
loop, each crop through the tower on its own, losses by hand with F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fineclip.data.random_batch import random_batch
from fineclip.engine.step import forward_loss, train_step
from fineclip.losses import FineCLIPLoss
from fineclip.models import create_model


def _infonce(a, b, scale):
    logits = scale * a @ b.t()
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def reference_loss(model, batch, detach_teacher=False, crop_scale=1.5):
    H, W = model.image_size
    pixels = model.normalize_pixels(batch["images"])
    image_emb = F.normalize(model.clip.encode_image(pixels), dim=-1)  # trunk pass 1
    _, dense = model.encode_image_dense(pixels)  # trunk pass 2
    h = dense.shape[-1]
    region_emb, crop_emb = [], []
    for b, x1, y1, x2, y2 in batch["regions"].tolist():
        box = torch.tensor([[0.0, x1, y1, x2, y2]], dtype=dense.dtype)
        pooled = roi_align(dense[int(b) : int(b) + 1], box, (1, 1), spatial_scale=h / H, aligned=True)
        region_emb.append(F.normalize(pooled.flatten(), dim=0))
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * crop_scale / 2, (y2 - y1) * crop_scale / 2
        big = [0.0, max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, W), min(cy + hh, H)]
        big = torch.tensor([big], dtype=dense.dtype)
        crop = roi_align(pixels[int(b) : int(b) + 1], big, (H, W), spatial_scale=1.0, aligned=True)
        crop_emb.append(F.normalize(model.clip.encode_image(crop)[0], dim=0))
    region_emb, crop_emb = torch.stack(region_emb), torch.stack(crop_emb)
    if detach_teacher:
        crop_emb = crop_emb.detach()
    text = F.normalize(model.clip.encode_text(model.tokenizer(batch["captions"])), dim=-1)
    region_text = F.normalize(model.clip.encode_text(model.tokenizer(batch["region_captions"])), dim=-1)
    scale = model.clip.logit_scale.exp()
    gc = _infonce(image_emb, text, scale)
    sd = (1 - (region_emb * crop_emb).sum(dim=1)).mean()
    rc = _infonce(region_emb, region_text, scale)
    return gc + sd + rc


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("detach_teacher", [False, True])
def test_optimised_step_equals_the_reference_step(tiny_model, detach_teacher):
    batch = random_batch(batch_size=3, regions_per_image=3, image_size=64, step=0, device="cpu")
    batch["region_captions"] = [f"a shape number {i}" for i in range(len(batch["regions"]))]
    batch["regions"] = batch["regions"].double()
    tiny_model.double().train()  # float64: both sides agree to rounding, whatever their batching
    tiny_model.clamp_logit_scale()  # as the step does after its update: both sides see the same weights
    # lr 0: the step leaves the weights as they are and its gradients in .grad
    frozen_sgd = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    loss = train_step(tiny_model, FineCLIPLoss(detach_teacher=detach_teacher), frozen_sgd, [batch]).loss
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    expected = reference_loss(tiny_model, batch, detach_teacher)
    expected_grads = _grads(tiny_model, expected)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_crop_pass_gives_the_same_loss_and_gradients(tiny_model):
    batch = random_batch(batch_size=2, regions_per_image=5, image_size=64, step=1, device="cpu")
    tiny_model.train()
    loss, _ = forward_loss(tiny_model, FineCLIPLoss(), batch)
    grads = _grads(tiny_model, loss)
    tiny_model.crop_chunk = 3  # 10 crops in chunks of 3, each recomputed in backward
    chunked, _ = forward_loss(tiny_model, FineCLIPLoss(), batch)
    chunked_grads = _grads(tiny_model, chunked)
    assert chunked.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    from hydra import compose, initialize_config_dir

    from fineclip.benchmark import run
    from fineclip.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("benchmark", overrides=[
            "batch_size=4", "regions_per_image=2", "steps=2", "warmup_steps=1", "breakdown_steps=1",
            "loader.workers=[0]", "loader.images=8", "loader.batches=2",
        ])
    result = run(cfg)
    assert result["images_per_s"] == pytest.approx(4 / result["step_s"])
    assert set(result["parts_s"]) == {"trunk pass", "crop pass", "text", "losses", "backward", "optimizer"}
    # the parts are the sections of the very step that was timed, and together they are most of it
    assert 0.5 * result["step_s"] < sum(result["parts_s"].values()) < 3 * result["step_s"]
    assert result["loader_images_per_s"]["0"] > 0
    # the model FLOPs of the step: within a factor of two of 6 x (parameters) x (tokens) for the
    # image tower's two passes (the trunk over 4 images, the crops of 8 regions), 65 tokens each
    visual = sum(p.numel() for p in create_model("fineclip-tiny").clip.visual.parameters())
    estimate = 6 * visual * 65 * (4 + 8) / 1e12
    assert 0.5 * estimate < result["step_tflop"] < 2.5 * estimate


@pytest.mark.parametrize(("method", "parts"), [
    ("clipself", {"trunk pass", "teacher", "losses", "backward", "optimizer"}),  # no text: L_SD alone
    ("regionclip", {"trunk pass", "teacher", "text", "losses", "backward", "optimizer"}),
    ("regionclip_sigmoid", {"trunk pass", "teacher", "losses", "backward", "optimizer"}),
])
def test_benchmark_times_each_methods_own_step(method, parts):
    from hydra import compose, initialize_config_dir

    from fineclip.benchmark import run
    from fineclip.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("benchmark", overrides=[
            f"method={method}", "batch_size=4", "regions_per_image=2", "steps=1", "warmup_steps=1",
            "breakdown_steps=1", "loader.workers=[0]", "loader.images=4", "loader.batches=1",
        ])
    result = run(cfg)
    assert set(result["parts_s"]) == parts
    assert result["teacher"] == "FrozenTeacher"
    assert result["regions"] == ("GridRegions" if method == "clipself" else "random boxes")
