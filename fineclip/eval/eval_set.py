"""The evaluation set of a composed config, read as its box and retrieval protocols say."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from fineclip.data import RegionCaptionDataset
from fineclip.data.synthetic import prepare_synthetic
from fineclip.errors import MissingImagesError
from fineclip.eval.protocols import (
    BoxProtocol,
    RetrievalProtocol,
    box_protocol,
    evaluation_source,
    retrieval_protocol,
)


def build_eval_set(
    cfg: DictConfig, image_size: int, patch_size: int | None = None, crop_size: int | None = None
) -> RegionCaptionDataset | None:
    """The evaluation data set of a composed config (None if it has no ``val``), read and resized as
    its box/retrieval protocol says: images at ``image_size``, mask-pooling masks on the grid of
    ``patch_size``, box crops at ``crop_size`` (default ``image_size``). Missing image files stop
    the evaluation with their list, unless ``eval.allow_missing=true`` (then they are skipped and
    counted in the metrics)."""
    source = evaluation_source(cfg)
    if source.get("val") is None:
        return None
    prepare_synthetic(source)
    box, retrieval = box_protocol(cfg), retrieval_protocol(cfg)
    overrides = {"image_size": image_size, **readings(box, retrieval, image_size, patch_size, crop_size or image_size)}
    target = source.val.get("_target_", "")
    if target.endswith("from_panoptic"):
        overrides["reference_boxes"] = box.reference_panoptic_boxes
    if target.endswith(("from_coco_captions", "from_karpathy")):
        overrides["max_captions"] = retrieval.max_captions
    dataset: RegionCaptionDataset = instantiate(source.val, **overrides)
    if dataset.missing and not cfg.eval.get("allow_missing", False):
        shown = "\n".join(f"  {p}" for p in dataset.missing[:20])
        more = f"\n  ... and {len(dataset.missing) - 20} more" if len(dataset.missing) > 20 else ""
        raise MissingImagesError(
            f"{len(dataset.missing)} image(s) of the benchmark are missing; without them the numbers would not be "
            f"the benchmark's:\n{shown}{more}\nrestore them, or set eval.allow_missing=true to score the rest "
            "(the count is recorded as missing_images)"
        )
    return dataset


def readings(box: BoxProtocol, retrieval: RetrievalProtocol, image_size: int, patch_size: int | None,
             crop_size: int) -> dict[str, dict]:
    """The data set's constructor arguments for reading images as the protocols say: a data set with
    categories as its box protocol (resizing, crops, masks), a captions-only one as its retrieval protocol."""
    box_reading = {"resize": box.resize, "interpolation": box.interpolation}
    if "crops" in box.extras:
        box_reading.update(crop_mode=box.crop, crop_size=crop_size)
    if "maskpool" in box.extras and patch_size:
        box_reading["mask_grid"] = [image_size // patch_size, image_size // patch_size]
    return {"box_reading": box_reading, "caption_reading": {"interpolation": retrieval.interpolation}}


def describe_eval_set(cfg: DictConfig) -> str:
    val = evaluation_source(cfg).val
    for key in ("ann_file", "panoptic_json", "captions_json", "karpathy_json"):
        if val.get(key):
            return str(val[key])
    return str(val.get("_target_"))
