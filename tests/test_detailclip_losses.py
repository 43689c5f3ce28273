"""DetailCLIP's terms against float64 loops over their definitions."""

import math

import torch

from fineclip.losses.detailclip import (
    dino_cls_loss,
    ibot_patch_loss,
    patchify,
    reconstruction_loss,
    teacher_patch_temperature,
    update_center,
)
from fineclip.models.detail_heads import DetailCLIPHead


def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def _cross_entropy(teacher_row, center, t_temp, student_row, s_temp):
    q = _softmax([(float(t) - float(c)) / t_temp for t, c in zip(teacher_row, center, strict=True)])
    p = _softmax([float(s) / s_temp for s in student_row])
    return -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))


def test_dino_cls_loss_and_centre_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g,
                                                                                          dtype=torch.float64)
    center = torch.randn(5, generator=g, dtype=torch.float64)
    loss = dino_cls_loss(student, teacher, center, 0.1, 0.04)
    pairs = [(0, 1), (1, 0)]
    reference = sum(_cross_entropy(teacher[v, b], center, 0.04, student[u, b], 0.1)
                    for u, v in pairs for b in range(3)) / (len(pairs) * 3)
    assert abs(loss.item() - reference) < 1e-10
    new = update_center(center, teacher, 0.9)
    for k in range(5):
        mean = sum(float(teacher[v, b, k]) for v in range(2) for b in range(3)) / 6
        assert abs(float(new[k]) - (0.9 * float(center[k]) + 0.1 * mean)) < 1e-12


def test_ibot_patch_loss_averages_over_removed_tokens_then_images():
    g = torch.Generator().manual_seed(1)
    student, teacher = (torch.randn(2, 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    center = torch.randn(6, generator=g, dtype=torch.float64)
    removed = torch.tensor([[True, False, True, True], [False, True, False, False]])
    loss = ibot_patch_loss(student, teacher, removed, center, 0.1, 0.07)
    per_image = []
    for b in range(2):
        tokens = [n for n in range(4) if removed[b, n]]
        per_image.append(sum(_cross_entropy(teacher[b, n], center, 0.07, student[b, n], 0.1) for n in tokens)
                         / len(tokens))
    assert abs(loss.item() - sum(per_image) / 2) < 1e-10
    assert teacher_patch_temperature(0) == 0.04 and teacher_patch_temperature(1) == 0.07


def test_reconstruction_loss_on_normalised_removed_patches():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    removed = torch.tensor([[True, False, False, True]])
    pred = torch.randn(1, 4, 12, generator=g, dtype=torch.float64)
    loss = reconstruction_loss(pred, images, removed, patch=2)
    total, count = 0.0, 0
    for n, (py, px) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        pixels = [float(images[0, c, 2 * py + i, 2 * px + j]) for i in range(2) for j in range(2) for c in range(3)]
        assert [float(v) for v in patchify(images, 2)[0, n]] == pixels
        if not removed[0, n]:
            continue
        mu = sum(pixels) / 12
        var = sum((x - mu) ** 2 for x in pixels) / 11
        target = [(x - mu) / math.sqrt(var + 1e-6) for x in pixels]
        total += sum((float(p) - t) ** 2 for p, t in zip(pred[0, n], target, strict=True)) / 12
        count += 1
    assert abs(loss.item() - total / count) < 1e-10


def test_head_output_layer_has_unit_norm_rows_on_a_normalised_bottleneck():
    head = DetailCLIPHead(16, hidden=32, bottleneck=8, out_dim=20)
    torch.testing.assert_close(head.last.weight.norm(dim=1), torch.ones(20))
    x = torch.randn(5, 16)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ (head.last.weight).t())
    assert not head.last.parametrizations.weight.original0.requires_grad


def test_detailclip_loss_over_features_equals_its_four_terms_written_out():
    from fineclip.losses import DetailCLIPLoss

    g = torch.Generator().manual_seed(3)
    V, B, D, K, R, N = 2, 3, 4, 5, 2, 4
    f64 = {"dtype": torch.float64, "generator": g}
    features = {
        "view_emb": torch.nn.functional.normalize(torch.randn(V, B, D, **f64), dim=-1),
        "text_emb": torch.nn.functional.normalize(torch.randn(B, D, **f64), dim=-1),
        "logit_scale": torch.tensor(7.0, dtype=torch.float64),
        "student_cls": torch.randn(V, B, K, **f64), "teacher_cls": torch.randn(V, B, K, **f64),
        "student_patch": torch.randn(V * B, R, K, **f64), "teacher_patch": torch.randn(V * B, R, K, **f64),
        "centers": torch.randn(2, K, **f64), "teacher_temperature": torch.tensor([0.04, 0.07], dtype=torch.float64),
        "rec_pred": torch.randn(V * B, N, 12, **f64), "views": torch.rand(V * B, 3, 4, 4, **f64),
        "keep": torch.tensor([[True, False, True, False]] * (V * B)),
    }
    total, parts = DetailCLIPLoss()(features)

    def log_softmax_row(row):
        top = max(row)
        norm = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - norm for x in row]

    s = 7.0
    clip = 0.0
    for v in range(V):
        img, txt = features["view_emb"][v].tolist(), features["text_emb"].tolist()
        sim = [[s * sum(a * b for a, b in zip(img[i], txt[j], strict=True)) for j in range(B)] for i in range(B)]
        i2t = -sum(log_softmax_row(sim[i])[i] for i in range(B)) / B
        t2i = -sum(log_softmax_row([sim[j][i] for j in range(B)])[i] for i in range(B)) / B
        clip += (i2t + t2i) / 2 / V
    c_cls, c_patch = features["centers"]
    cls = sum(_cross_entropy(features["teacher_cls"][v, b], c_cls, 0.04, features["student_cls"][u, b], 0.1)
              for u, v in [(0, 1), (1, 0)] for b in range(B)) / (2 * B)
    patch = sum(_cross_entropy(features["teacher_patch"][r, n], c_patch, 0.07, features["student_patch"][r, n], 0.1)
                for r in range(V * B) for n in range(R)) / (V * B * R)
    rec = reconstruction_loss(features["rec_pred"], features["views"], ~features["keep"], patch=2).item()
    for name, expected in (("clip", clip), ("cls", cls), ("patch", patch), ("rec", rec)):
        assert abs(parts[name].item() - expected) < 1e-9, name
    assert abs(total.item() - (clip + cls + patch + rec)) < 1e-9
