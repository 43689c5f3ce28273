"""Tar shards: the conversion round-trips the schema, the reader gives the folder reader's items, a bad sample is
replaced by the next readable one and named, a truncated shard and a missing sizes.json are handled, and the
loader counts what it skipped against data.max_bad_fraction."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from fineclip.data import RegionCaptionDataset
from fineclip.data.dataset import collate_regions
from fineclip.data.loader import MapStyleBatches
from fineclip.data.shards import ShardedRegionDataset, ShardIndex, convert, finehard_records, reindex, schema_records
from fineclip.data.synthetic import generate
from fineclip.errors import AnnotationError, ImageLoadError


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("scenes"), train=24, val=0, size=64, seed=5)


@pytest.fixture(scope="module")
def shards(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    records, categories = schema_records(scenes / "train.json")
    stats = convert(records, categories, out, per_shard=10)
    assert stats["images"] == 24 and stats["shards"] == 3
    return out


def test_shards_hold_the_original_bytes_and_the_schema_records(scenes, shards):
    data = json.loads((scenes / "train.json").read_text())
    assert json.loads((shards / "sizes.json").read_text()) == {"shard-000000.tar": 10, "shard-000001.tar": 10,
                                                               "shard-000002.tar": 4}
    with tarfile.open(shards / "shard-000001.tar") as tar:  # tar itself reads them
        names = tar.getnames()
        first = json.loads(tar.extractfile(names[1]).read())
        image = tar.extractfile(names[0]).read()
    assert names[:2] == [f"{first['id']:012d}.png", f"{first['id']:012d}.json"]
    source = next(i for i in data["images"] if i["id"] == first["id"])
    assert image == (scenes / source["file_name"]).read_bytes()
    anns = [a for a in data["annotations"] if a["image_id"] == first["id"]]
    assert [r["bbox"] for r in first["regions"]] == [a["bbox"] for a in anns]
    assert [r["caption"] for r in first["regions"]] == [a["caption"] for a in anns]
    assert first["captions"] == [c["caption"] for c in data["captions"] if c["image_id"] == first["id"]]
    assert json.loads((shards / "categories.json").read_text()) == {str(c["id"]): c["name"]
                                                                    for c in data["categories"]}


def test_the_shard_reader_gives_the_folder_readers_items(scenes, shards):
    folder = RegionCaptionDataset.from_file(scenes / "train.json", image_size=32, train=True, seed=3)
    sharded = ShardedRegionDataset(shards, image_size=32, train=True, seed=3)
    assert len(sharded) == len(folder) == 24 and sharded.categories == folder.categories
    for epoch in (0, 1):
        folder.set_epoch(epoch)
        sharded.set_epoch(epoch)
        for i in range(len(folder)):
            a, b = folder[i], sharded[i]
            assert a["image_id"] == b["image_id"] and a["caption"] == b["caption"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
            assert a["region_captions"] == b["region_captions"] and b["skipped"] == []
            assert len(b["negatives"]) == len(b["region_captions"])  # the synthetic regions' hard negatives
            assert all(len(n) > 0 for n in b["negatives"])


def _copy_with_zeroed_images(shards, out, samples, length=None):
    """A copy of the shard folder whose ``samples`` have their image bytes (the first ``length`` of them, default all)
    overwritten with zeros."""
    out.mkdir()
    for path in shards.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    index = ShardIndex(out)
    for i in samples:
        shard = out / index.shards[int(index.shard_of[i])]
        with open(shard, "r+b") as f:
            f.seek(int(index.image_at[0][i]))
            f.write(b"\0" * (length or int(index.image_at[1][i])))
    return out


def test_a_corrupt_image_is_replaced_by_the_next_sample_and_named(shards, tmp_path):
    broken = _copy_with_zeroed_images(shards, tmp_path / "broken", [3])
    dataset = ShardedRegionDataset(broken, image_size=32, train=False)
    item = dataset[3]
    assert item["image_id"] == dataset[4]["image_id"]  # sample 4 stands in for 3
    assert len(item["skipped"]) == 1 and "shard-000000.tar: sample 3" in item["skipped"][0]
    batch = collate_regions([dataset[2], dataset[3]])
    assert len(batch["skipped"]) == 1 and len(batch["images"]) == 2


def test_a_truncated_shard_skips_what_is_cut_and_a_missing_sizes_file_is_an_error(shards, tmp_path):
    cut = _copy_with_zeroed_images(shards, tmp_path / "cut", [])
    last = cut / "shard-000002.tar"
    index = ShardIndex(cut)
    last.write_bytes(last.read_bytes()[: int(index.image_at[0][22]) + 10])  # samples 22 and 23 cut
    dataset = ShardedRegionDataset(cut, image_size=32, train=False)
    item = dataset[22]
    assert item["image_id"] == dataset[0]["image_id"]  # wraps around to the first readable sample
    assert len(item["skipped"]) == 2 and all("shard-000002.tar" in s for s in item["skipped"])
    (cut / "sizes.json").unlink()
    with pytest.raises(AnnotationError, match=r"sizes.json not found.*python -m fineclip.data.shards index"):
        ShardedRegionDataset(cut)
    (cut / "shard-000000.idx.json").unlink()
    sizes = reindex(cut)  # the index command rebuilds both from the tars, without what the cut took
    assert sizes == {"shard-000000.tar": 10, "shard-000001.tar": 10, "shard-000002.tar": 2}
    assert len(ShardIndex(cut)) == 22


def test_the_loader_counts_skips_and_stops_past_the_allowed_fraction(shards, tmp_path):
    broken = _copy_with_zeroed_images(shards, tmp_path / "broken", [11, 12], length=64)
    dataset = ShardedRegionDataset(broken, image_size=32)
    tolerant = MapStyleBatches(dataset, batch_size=4, max_bad_fraction=0.1)  # 2 of 24 allowed
    tolerant.set_position(0, 0)
    assert sum(len(group[0]["images"]) for group in tolerant) == 24
    assert tolerant.skipped == 2
    strict = MapStyleBatches(dataset, batch_size=4, max_bad_fraction=0.05)  # 1 of 24
    strict.set_position(0, 0)
    with pytest.raises(ImageLoadError, match=r"2 unreadable samples, over data.max_bad_fraction=0.05"):
        list(strict)


def test_the_index_is_plain_arrays_of_28_bytes_a_sample(shards):
    index = ShardIndex(shards)
    assert index.nbytes == 28 * len(index)
    assert index.shard_of.dtype == np.int32 and index.image_at[0].dtype == np.int64


def test_finehard_records_become_schema_records_with_negatives(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    items = [{"f_path": "a.jpg", "caption": "a long caption", "short_caption": "short",
              "bbox_info": [{"bbox": [0.1, 0.2, 0.5, 0.6, 0.9], "short_expr": "a red cup", "long_expr": "a red cup on",
                             "flag_short_neg": 1, "short_expr_negs": {"0": "a blue cup", "1": "a red bowl"}},
                            {"bbox": [0.0, 0.0, 1.0, 1.0], "short_expr": "a table", "flag_short_neg": 0,
                             "short_expr_negs": {"0": "x"}}]}]
    (tmp_path / "fine.json").write_text(json.dumps(items))
    records, categories = finehard_records(tmp_path / "fine.json", tmp_path)
    (record, file), = list(records)
    assert file == tmp_path / "a.jpg" and record["captions"] == ["a long caption", "short"]
    assert record["regions"][0]["bbox"] == pytest.approx([20.0, 20.0, 80.0, 40.0])
    assert record["regions"][0]["negatives"] == ["a blue cup", "a red bowl"]
    assert "negatives" not in record["regions"][1]
    out = tmp_path / "out"
    convert(iter([(record, file)]), categories, out)
    item = ShardedRegionDataset(out, image_size=32)[0]
    assert item["region_captions"] == ["a red cup", "a table"]
    assert item["negatives"] == [["a blue cup", "a red bowl"], []]


def _train_cmd(root, run_dir, *extra, ranks=1):
    import sys

    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "fineclip.train", "data=shards", f"data.root={root}",
            f"data.batch_size={8 // ranks}", "data.num_workers=1", "trainer.epochs=2", "trainer.checkpoint_every=2",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
            "optim.scheduler.warmup_steps=2", f"hydra.run.dir={run_dir}", *extra]


def test_training_on_shards_two_ranks_equal_one_process_and_a_sigkill_resumes_exactly(shards, tmp_path):
    import os
    import signal
    import subprocess

    from test_resume import _assert_same_weights, _wait_for, _weights

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(cmd):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    run(_train_cmd(shards, tmp_path / "one"))
    run(_train_cmd(shards, tmp_path / "two", ranks=2))
    lines = [[x for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "train/loss" in x]
             for d in (tmp_path / "one", tmp_path / "two")]
    assert len(lines[0]) == len(lines[1]) == 6  # 2 epochs of 3 steps of 8 images (24 samples)
    for a, b in zip(*lines, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), a["step"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_cmd(shards, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for(killed / "checkpoints" / "step_00000004.pt", process)  # in epoch 2
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert "resuming from" in run(_train_cmd(shards, killed, "trainer.resume=auto"))
    _assert_same_weights(_weights(killed), _weights(tmp_path / "one"))


def test_workers_forked_after_the_parent_read_get_their_own_reads(shards):
    """The parent reads first (its descriptors open), then 2 forked workers read in parallel: every item equals
    the one read in a single process (a shared file offset would interleave their seeks)."""
    from torch.utils.data import DataLoader

    dataset = ShardedRegionDataset(shards, image_size=32, train=False)
    expected = [dataset[i] for i in range(len(dataset))]
    for _ in range(2):
        loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_regions,
                            multiprocessing_context="fork")
        batches = list(loader)
        images = torch.cat([b["images"] for b in batches])
        assert torch.equal(images, torch.stack([e["image"] for e in expected]))
        assert all(not b["skipped"] for b in batches)


def test_the_gpu_checks_shard_loader_row_runs_on_a_cpu(gpu_check):
    import argparse

    args = argparse.Namespace(device="cpu", batch=4, precision="fp32", steps=1, benchmark_model="tiny",
                              loader_workers=1, loader_images=16, loader_size=64)
    row = gpu_check.shard_loader_row(args)
    assert row["ok"] and row["check"] == "shard loader, 1 workers" and "bounds it" in row["result"], row
    assert row["images_per_s"] > 0
