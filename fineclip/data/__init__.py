"""Data: region-caption annotations (schema.md), the dataset and collate, synthetic scenes."""

from fineclip.data.annotations import ImageRecord, RegionAnnotations, load_region_annotations
from fineclip.data.dataset import RegionCaptionDataset, collate_regions, load_image

__all__ = [
    "ImageRecord",
    "RegionAnnotations",
    "RegionCaptionDataset",
    "collate_regions",
    "load_image",
    "load_region_annotations",
]
