import math

import pytest
import torch
import torch.nn.functional as F

from fineclip.losses import FineCLIPLoss, GlobalContrastive, RegionalContrastive, SelfDistillation, infonce_row_sum


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


def test_regional_contrastive_matches_hand_computation():
    p, tr = _unit(7, 8, 2), _unit(7, 8, 3)
    loss = RegionalContrastive()({"region_emb": p, "region_text_emb": tr, "logit_scale": torch.tensor(5.0)})
    assert loss.item() == pytest.approx(_infonce_by_hand(p.double(), tr.double(), 5.0), rel=1e-5)


def test_crop_term_contrasts_crop_embeddings_and_ignores_pooled_features():
    crop, tr, pooled = _unit(6, 8, 4), _unit(6, 8, 5), _unit(6, 8, 6)
    feats = {"crop_emb": crop, "region_emb": pooled, "region_text_emb": tr, "logit_scale": torch.tensor(5.0)}
    loss_fn = FineCLIPLoss(gc_weight=0, sd_weight=0, rc_weight=0, crop_weight=1)
    assert loss_fn.required_features == {"crop_emb", "region_text_emb", "logit_scale"}
    total, parts = loss_fn(feats)
    assert set(parts) == {"crop"}
    assert total.item() == pytest.approx(_infonce_by_hand(crop.double(), tr.double(), 5.0), rel=1e-5)


def test_padding_columns_never_enter_the_softmax():
    """The rows gathered from other ranks come padded; masked columns must not change anything."""
    a, b = _unit(7, 8, 2), _unit(7, 8, 3)
    valid = torch.tensor([True, True, False, True, True, False, True])
    scale = torch.tensor(5.0)
    local = slice(3, 5)  # this rank's rows, at offset 3 of the gathered rows
    total = infonce_row_sum(a[local], b[local], a, b, scale, offset=3, column_valid=valid)
    # by hand: the two local rows against the valid columns only
    keep = valid.nonzero().flatten().tolist()
    expected = 0.0
    for i in (3, 4):
        row = [5.0 * float(a[i] @ b[j]) for j in keep]
        col = [5.0 * float(b[i] @ a[j]) for j in keep]
        k = keep.index(i)
        ce_row = math.log(sum(math.exp(x) for x in row)) - row[k]
        ce_col = math.log(sum(math.exp(x) for x in col)) - col[k]
        expected += (ce_row + ce_col) / 2
    assert total.item() == pytest.approx(expected, rel=1e-5)
    padded = a.clone()
    padded[~valid] = _unit(2, 8, 9)
    again = infonce_row_sum(padded[local], b[local], padded, b, scale, offset=3, column_valid=valid)
    assert again.item() == pytest.approx(total.item(), rel=1e-6)


def test_region_losses_without_regions_are_zero_with_finite_grads():
    p = torch.zeros(0, 8, requires_grad=True)
    feats = {"region_emb": p, "region_text_emb": p, "crop_emb": p, "logit_scale": torch.tensor(10.0)}
    for term in (RegionalContrastive(), SelfDistillation()):
        loss = term(feats)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(p.grad).all()


def test_self_distillation_matches_formula_and_detach_option():
    p = torch.randn(5, 8, requires_grad=True)
    vr = torch.randn(5, 8, requires_grad=True)
    loss = SelfDistillation()({"region_emb": p, "crop_emb": vr})
    expected = sum(1 - (p[j] @ vr[j]).item() / (p[j].norm().item() * vr[j].norm().item()) for j in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert vr.grad.abs().sum() > 0  # the paper's setting: gradients reach the crop (teacher) side
    vr.grad = None
    SelfDistillation(detach_teacher=True)({"region_emb": p, "crop_emb_nograd": vr}).backward()
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
    assert clip_only.required_features == {"image_emb", "text_emb", "logit_scale"}
    assert "logit_scale" not in FineCLIPLoss(gc_weight=0, rc_weight=0).required_features  # L_SD alone
    with pytest.raises(ValueError):
        FineCLIPLoss(gc_weight=0, sd_weight=0, rc_weight=0)
