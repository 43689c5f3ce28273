import pytest
import torch
import torch.nn.functional as F

from fineclip.eval import box_accuracy, retrieval_recall
from fineclip.models.prompts import class_embeddings


def _brute_force_recall(image_emb, text_emb, text_to_image, k):
    """Sort every query's candidates and look for a correct one among the first k."""
    i2t_hits = 0
    for i in range(image_emb.shape[0]):
        scores = [(float(image_emb[i] @ text_emb[t]), t) for t in range(text_emb.shape[0])]
        top = [t for _, t in sorted(scores, reverse=True)[:k]]
        i2t_hits += any(int(text_to_image[t]) == i for t in top)
    t2i_hits = 0
    for t in range(text_emb.shape[0]):
        scores = [(float(text_emb[t] @ image_emb[i]), i) for i in range(image_emb.shape[0])]
        top = [i for _, i in sorted(scores, reverse=True)[:k]]
        t2i_hits += int(text_to_image[t]) in top
    return 100.0 * i2t_hits / image_emb.shape[0], 100.0 * t2i_hits / text_emb.shape[0]


def test_retrieval_recall_matches_brute_force_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    n_images, dim = 30, 16
    image_emb = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    counts = torch.randint(1, 6, (n_images,), generator=g)  # 1 to 5 captions per image
    text_to_image = torch.repeat_interleave(torch.arange(n_images), counts)
    # captions are noisy copies of their image so that recall is neither 0 nor 100
    text_emb = F.normalize(image_emb[text_to_image] + 1.2 * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    perm = torch.randperm(len(text_to_image), generator=g)  # captions in any order
    text_emb, text_to_image = text_emb[perm], text_to_image[perm]
    metrics = retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=7)
    for k in (1, 5, 10):
        i2t, t2i = _brute_force_recall(image_emb, text_emb, text_to_image, k)
        assert metrics[f"i2t_r{k}"] == pytest.approx(i2t)
        assert metrics[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < metrics["i2t_r1"] < 100


def test_retrieval_ties_count_against_the_query():
    """A collapsed model (every image embedding the same) must not get credit from ties."""
    image_emb = F.normalize(torch.ones(4, 8), dim=-1)
    text_emb = F.normalize(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    text_to_image = torch.arange(4).repeat_interleave(2)
    metrics = retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 4))
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_r4"] == 100.0  # all 4 images tie: rank 3
    # one image query: its 2 captions vs 6 others with the same (collapsed) scores at best
    two = torch.cat([image_emb[:1], -image_emb[:1]])
    assert retrieval_recall(two, torch.cat([two[:1]] * 2 + [two[:1]] * 2), torch.tensor([0, 0, 1, 1]),
                            ks=(1,))["i2t_r1"] == 0.0


def test_box_accuracy_mean_per_class_against_hand_count():
    # 3 classes; class 0 has 4 boxes (3 right at top-1), class 1 has 1 box (wrong, right at top-2),
    # class 2 has 2 boxes (1 right).
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],
            [0.8, 0.1, 0.1],
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.3],  # class 0 ranked last
            [0.6, 0.4, 0.0],  # class 1 second
            [0.0, 0.1, 0.9],
            [0.5, 0.1, 0.4],  # class 2 second
        ]
    )
    out = box_accuracy(logits, labels, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(100 * (3 / 4 + 0 / 1 + 1 / 2) / 3)
    assert out["overall_top1"] == pytest.approx(100 * 4 / 7)
    assert out["top2"] == pytest.approx(100 * (3 / 4 + 1 + 1) / 3)
    assert out["top5"] == pytest.approx(100.0)  # k capped at the number of classes


def test_class_embeddings_average_normalised_prompts():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.stack([torch.tensor([float(len(t)), 1.0, float(t.count("a"))]) for t in texts])

    out = class_embeddings(encode, ["cat", "dog"], ["a {}.", "the {} here"])
    assert calls == [["a cat.", "the cat here", "a dog.", "the dog here"]]
    raw = encode(["a cat.", "the cat here"])
    expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
