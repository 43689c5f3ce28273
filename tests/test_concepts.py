"""RegionCLIP-style objectives against from-the-definition float64 loops (loss and gradient), the
concept sampler's rules, and the template-averaged concept pool."""

import math

import pytest
import torch

from fineclip.losses import ConceptDistillation, ConceptSigmoid, RegionCLIPLoss, sample_concepts
from fineclip.losses.concepts import read_concepts


def _cos(a, b):
    dot = sum(a[i] * b[i] for i in range(len(a)))
    na = sum(a[i] * a[i] for i in range(len(a))) ** 0.5
    nb = sum(b[i] * b[i] for i in range(len(b))) ** 0.5
    return dot / (na * nb)


def _log_softmax(xs):
    top = max(float(x.detach()) if torch.is_tensor(x) else float(x) for x in xs)
    log_z = top + torch.log(sum(torch.exp(x - top) for x in xs))
    return [x - log_z for x in xs]


def _random_case(m=5, k=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(m, d, generator=g, dtype=torch.float64)
    concepts = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    return student, teacher, concepts


def _term(cls, concepts, **kwargs):
    term = cls(**kwargs)
    term.concept_emb = concepts
    return term


def test_kl_distillation_equals_the_definition_in_float64():
    student, teacher, concepts = _random_case()
    tau = 0.05  # larger than RegionCLIP's 0.01 so that the gradient is not vanishingly small
    term = _term(ConceptDistillation, concepts, temperature=tau)
    loss = term({"region_emb": student, "crop_emb_nograd": teacher})
    loss.backward()
    grad = student.grad.clone()

    ref_student = student.detach().clone().requires_grad_(True)
    total = 0
    for j in range(len(ref_student)):
        log_p = _log_softmax([_cos(ref_student[j], concepts[c]) / tau for c in range(len(concepts))])
        log_q = _log_softmax([_cos(teacher[j], concepts[c]) / tau for c in range(len(concepts))])
        total = total + sum(math.exp(float(log_q[c])) * (log_q[c] - log_p[c]) for c in range(len(concepts)))
    reference = total / len(ref_student)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_student.grad, rtol=1e-8, atol=1e-10)


def test_kl_distillation_is_zero_when_student_matches_teacher():
    _, teacher, concepts = _random_case()
    term = _term(ConceptDistillation, concepts)
    assert term({"region_emb": 3 * teacher, "crop_emb_nograd": teacher}).abs() < 1e-10  # scale-free: cosines


def test_sigmoid_objective_equals_the_definition_in_float64():
    student, teacher, concepts = _random_case(m=6, k=12)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    term = _term(ConceptSigmoid, concepts, num_concepts=5, seed=3)
    loss = term({"region_emb": student, "crop_emb_nograd": teacher, "logit_scale": scale})
    loss.backward()
    assert scale.grad is None  # the scale is not trained by this term

    labels = [max(range(12), key=lambda c: _cos(teacher[j], concepts[c])) for j in range(6)]
    chosen = sample_concepts(torch.tensor(labels), 12, 5, seed=3).tolist()
    ref_student = student.detach().clone().requires_grad_(True)
    total = 0
    for j in range(6):
        for c in chosen:
            z = 7.0 * _cos(ref_student[j], concepts[c])
            y = 1.0 if c == labels[j] else 0.0
            sig = 1 / (1 + torch.exp(-z))
            total = total - y * torch.log(sig) - (1 - y) * torch.log(1 - sig)
    reference = total / 6
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-8, atol=1e-10)


def test_concept_sampler_keeps_every_label_and_fills_up_with_distinct_others():
    labels = torch.tensor([3, 3, 40, 7])
    chosen = sample_concepts(labels, pool_size=200, count=100, seed=0)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert {3, 7, 40} <= set(chosen.tolist()) and 0 <= chosen.min() and chosen.max() < 200
    assert torch.equal(chosen, sample_concepts(labels.flip(0), 200, 100, seed=0))  # a set of labels: order-free
    assert not torch.equal(chosen, sample_concepts(labels, 200, 100, seed=1))
    assert torch.equal(sample_concepts(labels, pool_size=60, count=100, seed=0), torch.arange(60))
    many = torch.arange(0, 240, 2)
    assert torch.equal(sample_concepts(many, 300, 100, seed=0), many)  # more labels than count: all labels


def test_concept_pool_is_the_template_average_of_each_name(tmp_path):
    def encode(texts):  # a fixed random vector per text, normalised
        rows = [torch.randn(4, generator=torch.Generator().manual_seed(sum(map(ord, t)) * 31 + len(t))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    loss = RegionCLIPLoss(objective="kl", templates=["a {}", "the {} here"])
    loss.prepare(encode, ["cat", "dog"])
    term = loss.terms["concept"]
    assert term.concept_names == ["cat", "dog"]
    for row, name in zip(term.concept_emb, ["cat", "dog"], strict=True):
        mean = (encode([f"a {name}"])[0] + encode([f"the {name} here"])[0]) / 2
        torch.testing.assert_close(row, mean / mean.norm())

    nouns = tmp_path / "nouns.txt"
    nouns.write_text("zebra\n\nkite\nzebra\n")
    assert read_concepts(str(nouns), ["ignored"]) == ["zebra", "kite"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_concepts(str(tmp_path / "missing.txt"), [])
    with pytest.raises(RuntimeError, match="prepare"):
        ConceptDistillation()({"region_emb": torch.zeros(1, 4), "crop_emb_nograd": torch.zeros(1, 4)})
