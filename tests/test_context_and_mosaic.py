"""Parts of the 2025 methods, against written-out computations: DeCLIP's context distillation (affinity rows
in float64 loops, a bilinear resize written out, gradients by finite differences) and CLIM's mosaics (the
tiling against a pixel loop, the cells against the images they hold, the grouping arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from fineclip.losses.context import ContextDistillation, context_row_distances
from fineclip.methods.mosaic import cell_boxes, mosaic_groups, tile


def _bilinear(grid, out_h, out_w):
    """align_corners=False bilinear resize of a (C, h, w) list-of-lists grid, one output pixel at a time."""
    channels, in_h, in_w = len(grid), len(grid[0]), len(grid[0][0])

    def source(o, n_in, n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(s)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    out = [[[0.0] * out_w for _ in range(out_h)] for _ in range(channels)]
    for y in range(out_h):
        y0, y1, fy = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, fx = source(x, in_w, out_w)
            for c in range(channels):
                g = grid[c]
                out[c][y][x] = ((1 - fy) * ((1 - fx) * g[y0][x0] + fx * g[y0][x1])
                                + fy * ((1 - fx) * g[y1][x0] + fx * g[y1][x1]))
    return out


def _cos(u, v):
    return sum(a * c for a, c in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) * sum(c * c for c in v))


def _student_vectors(features, b, height, width):
    """The (B, N, C) features of image b as H·W Python vectors, resized to H × W when their grid differs."""
    side = int(round(features.shape[1] ** 0.5))
    grid = [[[float(features[b, r * side + c, ch]) for c in range(side)] for r in range(side)]
            for ch in range(features.shape[2])]
    if (side, side) != (height, width):
        grid = _bilinear(grid, height, width)
    return [[grid[ch][p // width][p % width] for ch in range(len(grid))] for p in range(height * width)]


def _rows_reference(students, teacher):
    """‖S_T[i] − S_S[i]‖ for every image and position with Python loops in float64; S_S is the mean of the
    affinities of each of ``students`` (one (B, N, C) tensor, or Q and K in csa mode)."""
    out = []
    height, width = teacher.shape[-2:]
    for b in range(teacher.shape[0]):
        s_vectors = [_student_vectors(s, b, height, width) for s in students]
        t_vectors = [[float(teacher[b, ch, p // width, p % width]) for ch in range(teacher.shape[1])]
                     for p in range(height * width)]
        for i in range(height * width):
            out.append(math.sqrt(sum((_cos(t_vectors[i], t_vectors[j])
                                      - sum(_cos(v[i], v[j]) for v in s_vectors) / len(s_vectors)) ** 2
                                     for j in range(height * width))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("student_side", [3, 2])  # the teacher's grid, and a smaller one resized to it
def test_context_rows_equal_a_float64_loop(student_side):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, student_side ** 2, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    rows = context_row_distances(student, teacher)
    torch.testing.assert_close(rows, _rows_reference([student], teacher), rtol=1e-10, atol=1e-12)
    loss = ContextDistillation()({"context": student, "vfm_context": teacher})  # one process: the mean row
    torch.testing.assert_close(loss, rows.mean())


def test_csa_context_averages_the_q_and_k_affinities_as_a_float64_loop():
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 4, 6, generator=generator, dtype=torch.float64)  # (P=2, B, N, C): Q and K
    teacher = torch.randn(2, 3, 3, 3, generator=generator, dtype=torch.float64)
    rows = context_row_distances(torch.stack([q, k]), teacher)
    torch.testing.assert_close(rows, _rows_reference([q, k], teacher), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(rows, context_row_distances(q, teacher))  # K changes S_S


def test_context_gradients_match_finite_differences_and_skip_the_teacher():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: context_row_distances(s, teacher.detach()).sum(), (student,))
    ContextDistillation()({"context": student, "vfm_context": teacher}).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the VFM is a frozen target


def test_context_refuses_tokens_that_are_not_a_square_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        context_row_distances(torch.randn(1, 6, 3), torch.randn(1, 2, 2, 3))


def test_tiling_puts_image_k_at_row_k_div_side_column_k_mod_side():
    images = torch.arange(9 * 2 * 3 * 4, dtype=torch.float32).reshape(9, 2, 3, 4)
    mosaic = tile(images, 3)
    expected = torch.empty(2, 9, 12)
    for k in range(9):
        for c in range(2):
            for y in range(3):
                for x in range(4):
                    expected[c, (k // 3) * 3 + y, (k % 3) * 4 + x] = images[k, c, y, x]
    assert torch.equal(mosaic, expected)
    for k, (x1, y1, x2, y2) in enumerate(cell_boxes(3, 9, 12).round().int().tolist()):  # each cell holds image k
        assert torch.equal(mosaic[:, y1:y2, x1:x2], images[k])


def test_groups_follow_the_batch_order_with_the_remainder_single():
    assert mosaic_groups(32) == ([2, 3, 4], 3)
    assert mosaic_groups(58) == ([2, 2, 3, 3, 4, 4], 0)
    assert mosaic_groups(13, sizes=(2, 3)) == ([2, 3], 0)
    with pytest.raises(ValueError, match="cannot fill one mosaic of each size"):
        mosaic_groups(28)


def test_the_mosaic_source_turns_a_batch_into_mosaics_cells_and_singles():
    from fineclip.methods.mosaic import MosaicRegions

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 8, 8), generator=generator, dtype=torch.uint8)
    batch = {"images": images, "captions": [f"c{i}" for i in range(7)], "image_ids": torch.arange(10, 17),
             "regions": torch.zeros(0, 5), "region_captions": []}
    out = MosaicRegions(sizes=(2,))(batch, epoch=0)  # 7 = one 2 x 2 mosaic + 3 singles
    assert out["images"].shape == (4, 3, 8, 8) and out["images"].dtype == torch.uint8
    assert torch.equal(out["images"][1:], images[4:]) and out["image_ids"].tolist() == [10, 14, 15, 16]
    assert out["captions"] == ["c0", "c4", "c5", "c6"] and out["region_captions"] == ["c0", "c1", "c2", "c3"]
    assert out["regions"].tolist() == [[0, 0, 0, 4, 4], [0, 4, 0, 8, 4], [0, 0, 4, 4, 8], [0, 4, 4, 8, 8]]
    # the mosaic is the 16 x 16 tiling shrunk to 8 x 8: each quarter is its image shrunk (bicubic, within rounding
    # and the few pixels a bicubic kernel reaches across a seam)
    shrunk = torch.nn.functional.interpolate(images[:4].float(), size=(4, 4), mode="bicubic", align_corners=False)
    for k, (y, x) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        inner = out["images"][0, :, y + 1:y + 3, x + 1:x + 3].float()
        assert (inner - shrunk[k].clamp(0, 255)[:, 1:3, 1:3]).abs().max() <= 1


def test_clim_loss_equals_a_float64_loop_over_cells_and_singles():
    from fineclip.losses import MosaicContrastive

    generator = torch.Generator().manual_seed(2)

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, 6, generator=generator, dtype=torch.float64), dim=-1)

    features = {"region_emb": unit(8), "region_text_emb": unit(8), "image_emb": unit(5), "text_emb": unit(5),
                "logit_scale": torch.tensor(7.0, dtype=torch.float64)}  # 2 mosaics of 2 x 2, then 3 singles
    loss = MosaicContrastive(sizes=(2,))(features)
    u = [*features["region_emb"], *features["image_emb"][2:]]
    w = [*features["region_text_emb"], *features["text_emb"][2:]]
    total = 0.0
    for i in range(len(u)):
        rows = [7.0 * float(u[i] @ w[j]) for j in range(len(w))]
        cols = [7.0 * float(w[i] @ u[j]) for j in range(len(u))]
        total += 0.5 * (math.log(sum(math.exp(r) for r in rows)) - rows[i])
        total += 0.5 * (math.log(sum(math.exp(c) for c in cols)) - cols[i])
    assert float(loss) == pytest.approx(total / len(u), rel=1e-12)


def test_clim_trains_and_resumes_exactly(tmp_path):
    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR
    from fineclip.data.synthetic import generate
    from fineclip.engine.trainer import train

    data_root = generate(tmp_path / "data", train=16, val=0, size=64, seed=2)

    def cfg(*extra):
        overrides = [f"data.root={data_root}", "data.batch_size=4", "data.val=null", "trainer.progress=false",
                     "trainer.tensorboard=false", "method=clim", "regions.sizes=[2]", "trainer.epochs=2",
                     "trainer.keep_checkpoints=0", "trainer.checkpoint_every=2", *extra]  # text tower frozen
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    train(cfg(), tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    train(cfg(), interrupted)
    for path in interrupted.glob("checkpoints/*.pt"):  # as if it had died after step 4 of 8
        if path.name == "last.pt" or int(path.stem.split("_")[1]) > 4:
            path.unlink()
    train(cfg("trainer.resume=auto"), interrupted)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (tmp_path / "whole", interrupted))
    assert a["global_step"] == b["global_step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    start = torch.load(sorted((tmp_path / "whole" / "checkpoints").glob("step_*.pt"))[0], weights_only=True)
    assert any(not torch.equal(v, start["model"][k]) for k, v in a["model"].items())  # it trained
