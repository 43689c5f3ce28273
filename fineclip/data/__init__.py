"""Data: region-caption annotations (schema.md), the dataset and collate, synthetic scenes."""

from fineclip.data.annotations import AnnotationError, ImageRecord, RegionAnnotations, load_region_annotations
from fineclip.data.dataset import ImageLoadError, RegionCaptionDataset, collate_regions, load_image

__all__ = [
    "AnnotationError",
    "ImageLoadError",
    "ImageRecord",
    "RegionAnnotations",
    "RegionCaptionDataset",
    "collate_regions",
    "load_image",
    "load_region_annotations",
]
