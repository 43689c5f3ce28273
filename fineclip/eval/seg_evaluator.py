"""The segmentation evaluator: mIoU of the dense features under a named protocol, ``seg_proxy``
(``segmentation.py``) or ``seg_linear_ibot`` (``seg_linear.py``)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf

from fineclip.errors import ProtocolError
from fineclip.eval.evaluators import Evaluator
from fineclip.eval.protocols import evaluation_source, evaluation_templates
from fineclip.eval.seg_linear import LinearSegProtocol, linear_segmentation_metrics
from fineclip.eval.segmentation import SEG_PROXY, segmentation_metrics


class Segmentation(Evaluator):
    """mIoU on the evaluated data config's ``segmentation`` section under a named protocol: ``seg_proxy``
    (zero-shot and a quick 1×1-conv probe on squashed images) or ``seg_linear_ibot`` (iBOT's mmseg linear
    head, ``seg_linear.py``; ``linear`` changes its settings and renames it)."""

    name = "segmentation"
    PROTOCOLS = (SEG_PROXY, "seg_linear_ibot")

    def __init__(self, enabled: bool = False, probe_steps: int = 500, protocol: str = SEG_PROXY,
                 linear: dict | None = None) -> None:
        super().__init__(enabled)
        if protocol not in self.PROTOCOLS:
            raise ProtocolError(f"eval.segmentation_protocol={protocol}: use one of {', '.join(self.PROTOCOLS)}")
        self.probe_steps, self.protocol = int(probe_steps), protocol
        self.linear = {k: v for k, v in (linear or {}).items() if v is not None}

    def __call__(self, model, cfg, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        seg_cfg = evaluation_source(cfg).get("segmentation")
        if not seg_cfg:
            raise ProtocolError("eval.segmentation=true needs a data config with a `segmentation` section "
                                "(data=synthetic and data=ade20k have one)")
        if self.protocol == SEG_PROXY:
            return segmentation_metrics(model, seg_cfg, evaluation_templates(cfg), cfg.eval.batch_size, device,
                                        probe_steps=self.probe_steps)
        if seg_cfg.get("train") is None:
            raise ProtocolError("seg_linear_ibot trains a head: the data config's segmentation needs a train set")
        try:
            protocol = LinearSegProtocol(**{k: tuple(v) if k == "blocks" else v for k, v in self.linear.items()})
        except TypeError as err:
            raise ProtocolError(f"eval.seg_linear={self.linear}: {err}") from err
        train, val = (instantiate(OmegaConf.to_container(seg_cfg[s], resolve=True)) for s in ("train", "val"))
        return linear_segmentation_metrics(model, train, val, protocol, device)

    def format(self, metrics: dict) -> list[str]:
        if "seg/linear_miou" in metrics:
            return [f"segmentation [{metrics['seg/protocol']}]: {metrics['seg/images']:.0f} images   "
                    f"linear mIoU {metrics['seg/linear_miou']:.1f}"]
        if "seg/zero_shot_miou" not in metrics:
            return []
        probe = metrics.get("seg/linear_probe_miou")
        return [f"segmentation [{metrics.get('seg/protocol', '?')}]: {metrics['seg/images']:.0f} images   "
                f"zero-shot mIoU {metrics['seg/zero_shot_miou']:.1f}"
                + (f"   linear-probe mIoU {probe:.1f}" if probe is not None else "")]
