"""Named evaluation protocols: every published number is comparable only with numbers made the
same way, so each evaluation runs one protocol and records its name next to the numbers.

Box classification (dense RoI features of boxes vs class-name embeddings):

- ``box_fc`` (FineCLIP): image squashed to the model's size (224 B/16, 336 L/14), bilinear; COCO
  panoptic, 133 classes; mean per-class top-1/5 over all classes (thing/stuff split too).
- ``box_cs`` (CLIPSelf): longest side 64 patches (1024 px B/16, 896 L/14), bicubic, padded right
  and bottom; COCO panoptic; mean per-class top-1/5 of thing and stuff apart; also ``crops``
  (thing box 1.5x, stuff box tight, letterboxed to the model's size) and ``maskpool`` (mean of the
  normalised tokens inside the segment's mask).
- ``box_fg`` (FG-CLIP): squashed to the model's size, bilinear; COCO instances, 80 classes, crowd
  boxes dropped; per-box top-1/5; also ``crops`` (the tight box, squashed).
- ``box_default``: squashed, bicubic, the data config's own templates, mean per-class top-1/5.

The panoptic protocols take the boxes as the public CLIPSelf/FineCLIP evaluation does: the first
100 segments of an image in json order, thing boxes from the json, stuff boxes from the mask with
the last pixel's index as the far edge, segments under 64 px² dropped. All three embed the classes
with the 63 ViLD templates (``vild_prompts``).

Retrieval (global embeddings, I2T and T2I R@1/5/10):

- ``retrieval_fc`` (FineCLIP's COCO numbers): val2017, every caption of each image (~25 K T2I
  queries on 5 K images), squashed, bilinear.
- ``retrieval_karpathy`` (COCO 5K / Flickr30K 1K test): the first 5 captions, squashed, bicubic.
- ``retrieval_default``: the data config's captions (at most 5), squashed, bicubic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from fineclip.errors import ProtocolError
from fineclip.models.prompts import DEFAULT_TEMPLATES

# The ViLD prompt ensemble as the public CLIPSelf text-embedding script writes it ({article} = a/an).
VILD_TEMPLATES = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)



def processed_name(name: str) -> str:
    """Class name as the prompts use it: ``_`` -> space, ``/`` -> " or ", lower case, no final dot."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def article(name: str) -> str:
    """a/an, chosen (as in the reference script) from the first letter of the raw name."""
    return "an" if name[0] in "aeiou" else "a"


def vild_prompts(name: str) -> list[str]:
    """The 63 prompts of one class; "This is " is prefixed to every prompt that starts with "a" or "the"."""
    prompts = [t.format(processed_name(name), article=article(name)) for t in VILD_TEMPLATES]
    return ["This is " + p if p.startswith(("a", "the")) else p for p in prompts]


@dataclass(frozen=True)
class BoxProtocol:
    name: str
    resize: str = "squash"  # "squash" to the model's size, or "longest": longest side to `patches` patches + pad
    interpolation: str = "bicubic"
    longest_patches: int = 0  # "longest": the image's longest side in patches (64: 1024 px at patch 16)
    prompts: str = "vild"  # "vild": the 63 ViLD prompts; "data": the data config's templates
    report: str = "pooled"  # "pooled": mean per class over all classes (+ thing/stuff); "apart": thing, stuff
    per_box: bool = False  # the headline metric is per-box accuracy instead of mean per class
    extras: tuple[str, ...] = ()  # "crops": global embedding of each box's crop; "maskpool": mask-pooled tokens
    crop: str = "roi"  # "letterbox" (thing box 1.5x, stuff tight, longest side to the model size + centred pad)
    #                    or "tight" (the box itself, squashed) or "roi" (1.5x, RoIAlign on the batch)
    reference_panoptic_boxes: bool = True  # the CLIPSelf/FineCLIP box extraction (see module docstring)
    data: tuple[str, ...] = ()  # data configs it is defined for (empty: any)


@dataclass(frozen=True)
class RetrievalProtocol:
    name: str
    max_captions: int | None = 5  # None: all captions of each image
    interpolation: str = "bicubic"
    data: tuple[str, ...] = field(default_factory=tuple)


BOX_PROTOCOLS = {
    "box_default": BoxProtocol("box_default", prompts="data", reference_panoptic_boxes=False),
    "box_fc": BoxProtocol("box_fc", interpolation="bilinear", data=("coco_panoptic",)),
    "box_cs": BoxProtocol("box_cs", resize="longest", longest_patches=64, report="apart",
                          extras=("crops", "maskpool"), crop="letterbox", data=("coco_panoptic",)),
    "box_fg": BoxProtocol("box_fg", interpolation="bilinear", per_box=True, extras=("crops",), crop="tight",
                          reference_panoptic_boxes=False, data=("coco_instances",)),
}
RETRIEVAL_PROTOCOLS = {
    "retrieval_fc": RetrievalProtocol("retrieval_fc", max_captions=None, interpolation="bilinear",
                                      data=("coco_captions",)),
    "retrieval_karpathy": RetrievalProtocol("retrieval_karpathy", max_captions=5,
                                            data=("coco_karpathy", "flickr30k", "coco_captions")),
    "retrieval_default": RetrievalProtocol("retrieval_default", max_captions=5),
}


def evaluation_source(cfg: DictConfig) -> DictConfig:
    """The data config that is evaluated: ``eval.benchmark`` if set (any data config, e.g.
    ``+data@eval.benchmark=coco_panoptic``), else ``data`` (its ``val`` split)."""
    return cfg.eval.get("benchmark") or cfg.data


def evaluation_templates(cfg: DictConfig) -> list[str]:
    """The class-name prompt templates of an evaluation (box_default, segmentation, the logged and drawn
    maps): ``eval.templates``, else the ``templates`` of the evaluated data config, else
    ``DEFAULT_TEMPLATES``. The one place this choice is made."""
    return list(cfg.eval.get("templates") or evaluation_source(cfg).get("templates") or DEFAULT_TEMPLATES)


def protocol_name(cfg: DictConfig) -> str | None:
    """``eval.protocol``, else the ``protocol`` of the evaluated data config (coco_panoptic: box_fc)."""
    return cfg.eval.get("protocol") or evaluation_source(cfg).get("protocol")


def _choose(cfg: DictConfig, own: dict, other: dict, default: str):
    name = protocol_name(cfg)
    if name is None or name in other:  # a protocol of the other task: this task's default
        return own[default]
    if name not in own:
        raise ProtocolError(f"eval.protocol={name!r} is unknown; known protocols: {', '.join([*own, *other])}")
    return _check_data(own[name], cfg)


def box_protocol(cfg: DictConfig) -> BoxProtocol:
    """The box protocol of a composed config (none named: box_default)."""
    return _choose(cfg, BOX_PROTOCOLS, RETRIEVAL_PROTOCOLS, "box_default")


def retrieval_protocol(cfg: DictConfig) -> RetrievalProtocol:
    """The retrieval protocol of a composed config (none named: retrieval_default)."""
    return _choose(cfg, RETRIEVAL_PROTOCOLS, BOX_PROTOCOLS, "retrieval_default")


def _check_data(protocol, cfg: DictConfig):
    kind = evaluation_source(cfg).get("name")
    if protocol.data and kind not in protocol.data:
        raise ProtocolError(f"eval.protocol={protocol.name} is defined on data={' or data='.join(protocol.data)}, "
                            f"not on data={kind}")
    return protocol


def dense_image_size(protocol: BoxProtocol, patch_size: int) -> int | None:
    """The input size of the dense (RoI) pass when the protocol fixes one (box_cs: 64 patches on
    the longest side, 1024 px at patch 16, 896 at patch 14); None: the model's own size."""
    return protocol.longest_patches * patch_size if protocol.resize == "longest" else None
