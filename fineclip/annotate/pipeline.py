"""The annotation run: images in shards, each shard proposed, captioned, filtered and written
atomically; a merge joins the shards into one training file (``fineclip/data/schema.md``) and a
report.

    shard s = images [s·n, (s+1)·n) of the source, in its order          (n = shard_size)
    worker w of W runs the shards s with s mod W = w that are not written yet (resume = rerun)
    merge: every shard, in order → ids renumbered → <out> and <out>.report.json

A killed run continues where it stopped; several workers (torchrun ranks, SLURM array tasks, or
``worker.index``/``worker.count``) split the shards, and the merged output is the same for any
number of workers because every shard depends only on its images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fineclip.annotate.proposers import Proposal
from fineclip.annotate.sources import ImageRecord, ImageSource, load_image
from fineclip.data.convert_coco import PROPOSAL_CATEGORY, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Filters:
    """What a region must pass to be written; each drop is counted under its reason."""

    min_box_area: float = 64.0  # px² after clipping to the image (small_box)
    min_caption_words: int = 2  # short_caption; an empty caption is empty_caption
    drop_duplicates: bool = True  # the same caption twice in one image (duplicate_caption)
    require_caption: bool = True  # a box the captioner could not name is dropped (no_caption)


def clip_box(bbox: list[float], width: int, height: int) -> list[float]:
    x1, y1 = min(max(bbox[0], 0.0), width), min(max(bbox[1], 0.0), height)
    x2, y2 = min(max(bbox[0] + bbox[2], 0.0), width), min(max(bbox[1] + bbox[3], 0.0), height)
    return [x1, y1, x2 - x1, y2 - y1]


@dataclass
class Annotator:
    proposer: object
    captioner: object
    filters: Filters = field(default_factory=Filters)
    batch_images: int = 8  # images per proposer / captioner call
    image_captions: bool = False  # caption each whole image that has none (a model captioner's caption_crops)

    def provenance(self) -> dict:
        return {"name": self.captioner.name, **({"prompt": self.captioner.prompt}
                                                      if getattr(self.captioner, "prompt", None) else {})}

    def regions(self, image, proposals: list[Proposal], captions: list[str | None], counts: Counter) -> list[dict]:
        """The annotations of one image that pass the filters, without ids."""
        kept, seen = [], set()
        for proposal, caption in zip(proposals, captions, strict=True):
            bbox = clip_box(proposal.bbox, image.width, image.height)
            if bbox[2] * bbox[3] < self.filters.min_box_area:
                counts["small_box"] += 1
                continue
            if caption is None:
                if self.filters.require_caption:
                    counts["no_caption"] += 1
                    continue
            else:
                caption = " ".join(caption.split())
                if not caption:
                    counts["empty_caption"] += 1
                    continue
                if len(caption.split()) < self.filters.min_caption_words:
                    counts["short_caption"] += 1
                    continue
                if self.filters.drop_duplicates and caption.lower() in seen:
                    counts["duplicate_caption"] += 1
                    continue
                seen.add(caption.lower())
            region = {"category_id": proposal.category_id if proposal.category_id is not None else 0,
                      "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                      "proposal": {"source": proposal.source, "score": proposal.score}}
            if proposal.attributes:
                region["attributes"] = list(proposal.attributes)
            if caption is not None:
                region["caption"] = caption
                region["captioner"] = self.provenance()
            kept.append(region)
        counts["regions_kept"] += len(kept)
        return kept

    def shard(self, records: list[ImageRecord], on_image=None) -> dict:
        """Proposals, captions and filters for ``records``: {images, annotations, captions, counts,
        unreadable} (annotations carry their image_id; ids are given at the merge)."""
        images, annotations, captions = [], [], []
        counts, unreadable = Counter(), {}
        for start in range(0, len(records), self.batch_images):
            batch, loaded = [], []
            for record in records[start : start + self.batch_images]:
                try:
                    loaded.append(load_image(record))
                    batch.append(record)
                except (OSError, ValueError) as err:
                    counts["unreadable_image"] += 1
                    unreadable[record.file_name] = f"{type(err).__name__}: {err}"
                    log.warning("cannot read %s: %s (counted, left out)", record.path, err)
            if not batch:
                continue
            proposals = self.proposer(batch, loaded)
            texts = self.captioner(loaded, proposals)
            uncaptioned = [i for i, r in enumerate(batch) if not r.captions]
            whole = {}
            if self.image_captions and uncaptioned:
                if not hasattr(self.captioner, "caption_crops"):
                    raise ValueError(f"image_captions=true needs a model captioner, not {self.captioner.name}")
                whole = dict(zip(uncaptioned, self.captioner.caption_crops([loaded[i] for i in uncaptioned]),
                                 strict=True))
            for i, (record, image, boxes, words) in enumerate(zip(batch, loaded, proposals, texts, strict=True)):
                counts["images"] += 1
                counts["regions_proposed"] += len(boxes)
                images.append({"id": record.image_id, "file_name": record.file_name, "width": image.width,
                               "height": image.height})
                captions += [{"image_id": record.image_id, "caption": c} for c in record.captions]
                if whole.get(i, "").strip():
                    captions.append({"image_id": record.image_id, "caption": whole[i].strip(),
                                     "captioner": self.provenance()})
                kept = self.regions(image, boxes, words, counts)
                annotations += [{"image_id": record.image_id, **region} for region in kept]
                if on_image is not None:
                    on_image(len(kept))
        return {"images": images, "annotations": annotations, "captions": captions, "counts": dict(counts),
                "unreadable": unreadable}


def shard_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.shards"


def shard_path(out: Path, index: int) -> Path:
    return shard_dir(out) / f"shard_{index:06d}.json"


def worker_from_env(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(index, count) of this worker: given, else torchrun's RANK/WORLD_SIZE, else a SLURM array's
    task id / task count, else (0, 1)."""
    if index is not None and count is not None:
        return int(index), int(count)
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def run_shards(annotator: Annotator, source: ImageSource, out: Path, shard_size: int, worker: tuple[int, int],
               progress: bool = True) -> int:
    """This worker's shards that are not written yet; returns how many it wrote."""
    index, count = worker
    shards = [s for s in range(0, (len(source.records) + shard_size - 1) // shard_size) if s % count == index]
    todo = [s for s in shards if not shard_path(out, s).is_file()]
    if len(todo) < len(shards):
        log.info("resuming: %d of this worker's %d shards are already written", len(shards) - len(todo), len(shards))
    images = sum(len(source.records[s * shard_size : (s + 1) * shard_size]) for s in todo)
    bar = tqdm(total=images, desc=f"annotate (worker {index + 1}/{count})", unit="img", disable=not progress,
               dynamic_ncols=True)
    start, regions = time.perf_counter(), 0

    def on_image(kept: int) -> None:
        nonlocal regions
        regions += kept
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.update(1)
        bar.set_postfix(regions_s=f"{regions / elapsed:.1f}", regions=regions)

    for s in todo:
        result = annotator.shard(source.records[s * shard_size : (s + 1) * shard_size], on_image)
        write_json_atomic(result, shard_path(out, s))
    bar.close()
    return len(todo)


def merge(source: ImageSource, out: Path, shard_size: int, info: dict, target: Path | None = None) -> dict:
    """Every shard, in order, into ``out`` (the training schema; ``target`` instead when given) and
    ``<out>.report.json``; returns the report. Raises ``FileNotFoundError`` naming the shards not written yet."""
    total = (len(source.records) + shard_size - 1) // shard_size
    missing = [s for s in range(total) if not shard_path(out, s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {total} shards are not written yet (e.g. "
                                f"{shard_path(out, missing[0])}): run the remaining workers, then merge")
    images, annotations, captions, counts, unreadable = [], [], [], Counter(), {}
    for s in range(total):
        shard = json.loads(shard_path(out, s).read_text())
        images += shard["images"]
        annotations += [{"id": len(annotations) + i + 1, **a} for i, a in enumerate(shard["annotations"])]
        captions += [{"id": len(captions) + i + 1, **c} for i, c in enumerate(shard["captions"])]
        counts.update(shard["counts"])
        unreadable.update(shard["unreadable"])
    categories = list(source.categories)
    if any(a["category_id"] == 0 for a in annotations) and all(c["id"] != 0 for c in categories):
        categories.append(dict(PROPOSAL_CATEGORY))
    write_json_atomic({"info": info, "images": images, "annotations": annotations, "categories": categories,
                       "captions": captions}, target or out)
    report = build_report(images, annotations, counts, unreadable, len(source.records))
    write_json_atomic(report, out.parent / f"{out.name}.report.json")
    return report


def build_report(images: list[dict], annotations: list[dict], counts: Counter, unreadable: dict,
                 total: int) -> dict:
    per_image = Counter(a["image_id"] for a in annotations)
    regions = [per_image.get(im["id"], 0) for im in images]
    words = [len(a["caption"].split()) for a in annotations if "caption" in a]
    dropped = {k: counts[k] for k in ("small_box", "no_caption", "empty_caption", "short_caption",
                                      "duplicate_caption") if counts.get(k)}
    return {
        "images": {"source": total, "written": len(images), "unreadable": len(unreadable)},
        "unreadable_images": unreadable,
        "regions": {"proposed": counts.get("regions_proposed", 0), "written": len(annotations), "dropped": dropped},
        "regions_per_image": {"mean": sum(regions) / max(len(regions), 1), "max": max(regions, default=0),
                              "images_without_regions": sum(r == 0 for r in regions)},
        "caption_words": {"mean": sum(words) / max(len(words), 1), "min": min(words, default=0),
                          "max": max(words, default=0)},
    }


def format_report(report: dict) -> str:
    im, rg = report["images"], report["regions"]
    lines = [f"images: {im['written']} written of {im['source']} ({im['unreadable']} unreadable)",
             f"regions: {rg['written']} written of {rg['proposed']} proposed; dropped: "
             + (", ".join(f"{k} {v}" for k, v in rg["dropped"].items()) or "none"),
             f"regions per image: mean {report['regions_per_image']['mean']:.2f}, max "
             f"{report['regions_per_image']['max']}, {report['regions_per_image']['images_without_regions']} "
             "images without any",
             f"caption words: mean {report['caption_words']['mean']:.1f}, min {report['caption_words']['min']}, "
             f"max {report['caption_words']['max']}"]
    lines += [f"unreadable: {name} ({why})" for name, why in list(report["unreadable_images"].items())[:10]]
    return "\n".join(lines)
