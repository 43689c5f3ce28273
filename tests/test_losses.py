import math

import pytest
import torch
import torch.nn.functional as F

from fineclip.losses import FineCLIPLoss, GlobalContrastive, RegionalContrastive, SelfDistillation, symmetric_infonce


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _infonce_by_hand(a, b, scale):
    """Row-by-row log-softmax written out with math.exp/log, both directions."""
    n = a.shape[0]
    sims = (a @ b.t()).tolist()
    total = 0.0
    for i in range(n):
        row = [scale * s for s in sims[i]]
        col = [scale * sims[j][i] for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_global_contrastive_matches_hand_computation():
    v, t = _unit(6, 8, 0), _unit(6, 8, 1)
    scale = torch.tensor(7.0)
    loss = GlobalContrastive()({"image_emb": v, "text_emb": t, "logit_scale": scale})
    assert loss.item() == pytest.approx(_infonce_by_hand(v.double(), t.double(), 7.0), rel=1e-5)


def test_regional_contrastive_ignores_padding_rows():
    p, tr = _unit(7, 8, 2), _unit(7, 8, 3)
    valid = torch.tensor([True, False, True, True, False, True, True])
    scale = torch.tensor(5.0)
    loss = RegionalContrastive()({"region_emb": p, "region_text_emb": tr, "logit_scale": scale, "region_valid": valid})
    expected = _infonce_by_hand(p[valid].double(), tr[valid].double(), 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # whatever sits in the padded rows cannot change the loss
    p2 = p.clone()
    p2[~valid] = _unit(2, 8, 9)
    feats2 = {"region_emb": p2, "region_text_emb": tr, "logit_scale": scale, "region_valid": valid}
    loss2 = RegionalContrastive()(feats2)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_contrastive_without_regions_is_zero_with_finite_grads():
    p = torch.randn(3, 8, requires_grad=True)
    loss = symmetric_infonce(p, p.detach(), torch.tensor(10.0), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(p.grad).all()
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = symmetric_infonce(empty, empty, torch.tensor(10.0))
    assert loss.item() == 0.0 and loss.requires_grad


def test_self_distillation_matches_formula_and_detach_option():
    p = torch.randn(5, 8, requires_grad=True)
    vr = torch.randn(5, 8, requires_grad=True)
    loss = SelfDistillation()({"region_emb": p, "crop_emb": vr})
    expected = sum(1 - (p[j] @ vr[j]).item() / (p[j].norm().item() * vr[j].norm().item()) for j in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert vr.grad.abs().sum() > 0  # the paper's setting: gradients reach the crop (teacher) side
    vr.grad = None
    SelfDistillation(detach_teacher=True)({"region_emb": p, "crop_emb": vr}).backward()
    assert vr.grad is None


def test_composite_weights_and_skipped_terms():
    feats = {
        "image_emb": _unit(4, 8, 0), "text_emb": _unit(4, 8, 1), "region_emb": _unit(6, 8, 2),
        "crop_emb": _unit(6, 8, 3), "region_text_emb": _unit(6, 8, 4), "logit_scale": torch.tensor(10.0),
    }
    full = FineCLIPLoss(gc_weight=1.0, sd_weight=0.5, rc_weight=2.0)
    total, parts = full(feats)
    assert total.item() == pytest.approx(parts["gc"].item() + 0.5 * parts["sd"].item() + 2.0 * parts["rc"].item())
    no_sd = FineCLIPLoss(sd_weight=0.0)
    assert "crop_emb" not in no_sd.required_features and set(no_sd.terms) == {"gc", "rc"}
    clip_only = FineCLIPLoss(sd_weight=0.0, rc_weight=0.0)
    assert clip_only.required_features == {"image_emb", "text_emb"}
    with pytest.raises(ValueError):
        FineCLIPLoss(gc_weight=0, sd_weight=0, rc_weight=0)
