"""Models: the open_clip wrapper with dense features, region pooling and region crops."""

from fineclip.models.factory import create_model, load_clip_weights, read_state_dict
from fineclip.models.fineclip_model import FEATURES, FineCLIPModel
from fineclip.models.regions import crop_regions, enlarge_boxes, pool_regions

__all__ = [
    "FEATURES",
    "FineCLIPModel",
    "create_model",
    "crop_regions",
    "enlarge_boxes",
    "load_clip_weights",
    "pool_regions",
    "read_state_dict",
]
