"""Speed and memory of the full FineCLIP training step, on random weights and random data.

    python -m fineclip.benchmark model=eva02_b16 batch_size=32 regions_per_image=8 [method=clipself]
        [trainer.compile=true]

Reports images/s and regions/s of the whole step (forward of every enabled loss term, backward,
optimizer; no host-device synchronisation inside the timed loop), the split of a step's time
between its parts (measured on separate steps that synchronise between parts), peak memory,
model-FLOPs utilisation against the device's peak, and the data loader alone (decode + resize of
JPEG files in N workers). Prints a table; ``output=PATH`` also writes json.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from fineclip.cli import CONFIG_DIR, exit_on_user_error
from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.random_batch import random_batch
from fineclip.engine.build import Method, build_method, compile_blocks, freeze_unused_parameters
from fineclip.engine.distributed import resolve_device
from fineclip.engine.step import resolve_precision, train_step
from fineclip.losses import CompositeLoss
from fineclip.methods.regions import RegionSource
from fineclip.methods.teachers import Teacher
from fineclip.models import FineCLIPModel
from fineclip.timing import section, timed_sections

log = logging.getLogger("fineclip.benchmark")

# dense bf16/fp16 tensor-core peak, FLOP/s
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """The trainer's ``train_step`` on one batch (no NaN check: no host-device synchronisation),
    with the method's teacher and region source."""

    def __init__(self, model: FineCLIPModel, loss_fn: CompositeLoss, optimizer, device, precision: str,
                 teacher: Teacher | None = None, region_source=None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.device, self.precision = device, precision
        self.teacher, self.region_source = teacher, region_source
        self.steps = 0

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.region_source is not None:
            batch = self.region_source(batch, epoch=0)
        loss = train_step(self.model, self.loss_fn, self.optimizer, [batch], precision=self.precision,
                          teacher=self.teacher).loss
        self.steps += 1
        if self.teacher is not None and type(self.teacher).after_step is not Teacher.after_step:
            # the EMA update (and DetailCLIP's centres), as after a trainer's step
            with section("teacher update"):
                self.teacher.after_step(self.model, self.steps, max(self.steps, 1000))
        return loss

    def timed(self, batch: dict) -> dict[str, float]:
        """The same step, synchronising around each of its named sections: seconds per section."""
        with timed_sections(self.device) as times:
            self(batch)
        return dict(times)


def benchmark_method(cfg: DictConfig, device) -> Method:
    """``build_method`` as the trainer calls it, with random weights, in training mode, and a RegionCLIP
    concept pool of ``concept_pool`` made-up names."""
    method = build_method(cfg, device, checkpoint=None)
    method.model.train()
    method.loss_fn.prepare(method.model.encode_text_pool, [f"class {i}" for i in range(cfg.concept_pool)],
                           method.teacher.text_encoder())
    return method


def batch_regions(regions: RegionSource) -> RegionSource | None:
    """The region source as the benchmark applies it to its random batches: only one that rewrites the
    batch (grid cells); the data set's boxes and proposals are the random batch's boxes here."""
    return regions if type(regions).__call__ is not RegionSource.__call__ else None


def model_flops(cfg: DictConfig, batch: dict, device, precision: str) -> float:
    """Model FLOPs of one step (forward + backward, no recomputation), counted by FlopCounterMode
    on a fresh eager copy (no compile, no checkpointing) after one step has filled its text cache."""
    method = benchmark_method(cfg, device)
    model = method.model
    step = Step(model, method.loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), device, precision, method.teacher,
                batch_regions(method.regions))
    step(batch)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def write_jpeg_dataset(folder: Path, count: int, size: tuple[int, int], regions: int) -> Path:
    """``count`` smooth random JPEG images of ``size`` (H, W) and a fineclip-schema json."""
    rng = np.random.default_rng(0)
    images, annotations, captions = [], [], []
    H, W = size
    for i in range(1, count + 1):
        small = rng.integers(0, 256, (H // 16, W // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((W, H), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": W, "height": H})
        captions.append({"id": i, "image_id": i, "caption": f"image {i}"})
        for r in range(regions):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1,
                                "bbox": [10.0 * r, 10.0 * r, W / 3, H / 3], "caption": f"region {r}"})
    ann = {"images": images, "annotations": annotations, "captions": captions,
           "categories": [{"id": 1, "name": "thing"}]}
    path = folder / "train.json"
    path.write_text(json.dumps(ann))
    return path


def loader_rate(ann_file: Path, image_size: int, batch_size: int, workers: int, batches: int, pin: bool) -> float:
    """Images/s of the training data loader alone (decode, resize, collate, pinned memory)."""
    dataset = RegionCaptionDataset.from_file(str(ann_file), image_size=image_size, train=True, max_regions=20)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 1))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                        collate_fn=collate_regions, drop_last=True)
    it = iter(loader)
    next(it)  # start-up of the workers is not counted
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            seen += len(next(it)["images"])
        except StopIteration:
            break
    return seen / (time.perf_counter() - start)


def run(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.trainer.device)
    precision = resolve_precision(device, cfg.trainer.precision)
    torch.manual_seed(0)
    if cfg.model.get("checkpoint"):
        log.info("benchmark uses random weights: model.checkpoint is ignored")
    method = benchmark_method(cfg, device)
    model, loss_fn, teacher, region_source = method.model, method.loss_fn, method.teacher, batch_regions(method.regions)
    if cfg.trainer.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    freeze_unused_parameters(model, loss_fn, precision, teacher)  # as the trainer does, before compiling
    if cfg.trainer.compile:
        compile_blocks(model)
    optimizer = instantiate(cfg.optim.optimizer, model=model)
    size = model.image_size[0]
    B, R = cfg.batch_size, cfg.regions_per_image
    step = Step(model, loss_fn, optimizer, device, precision, teacher, region_source)
    views = teacher.dataset_arguments().get("views")  # DetailCLIP's loader-cut views, when its teacher asks
    batches = [random_batch(B, R, size, i, device, views=views) for i in range(4)]

    for i in range(cfg.warmup_steps):
        step(batches[i % 4])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(cfg.steps):
        loss = step(batches[i % 4])
    loss.item()  # one synchronisation, at the end
    seconds = (time.perf_counter() - start) / cfg.steps
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    parts: dict[str, float] = {}
    for i in range(cfg.breakdown_steps):
        for name, t in step.timed(batches[i % 4]).items():
            parts[name] = parts.get(name, 0.0) + t / cfg.breakdown_steps
    flops = model_flops(cfg, batches[0], device, precision)
    peak = device_peak_flops(device)
    result = {
        "method": method_name(cfg), "teacher": type(teacher).__name__,
        "regions": type(region_source).__name__ if region_source is not None else "random boxes",
        "model": cfg.model.name, "image_size": size, "batch_size": B, "regions_per_image": R,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "compile": bool(cfg.trainer.compile),
        "grad_checkpointing": bool(cfg.trainer.grad_checkpointing), "crop_chunk": model.crop_chunk,
        "losses": dict(loss_fn.weights), "detach_teacher": bool(cfg.loss.get("detach_teacher", False)),
        "step_s": seconds, "images_per_s": B / seconds, "regions_per_s": B * R / seconds,
        "peak_memory_gb": peak_gb, "step_tflop": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None, "parts_s": parts,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ann = write_jpeg_dataset(Path(tmp), cfg.loader.images, tuple(cfg.loader.source_size), R)
        result["loader_images_per_s"] = {
            str(w): loader_rate(ann, size, B, w, cfg.loader.batches, device.type == "cuda") for w in cfg.loader.workers
        }
    return result


def method_name(cfg: DictConfig) -> str:
    """The method= choice, from Hydra's record of the composed defaults."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("method", "fineclip")
    except ValueError:  # composed outside a Hydra run (tests): no record of the choices
        return "-"


def format_result(r: dict) -> str:
    flags = [r["precision"]] + [k for k in ("compile", "grad_checkpointing") if r[k]]
    if r["detach_teacher"]:
        flags.append("detach_teacher")
    if r["crop_chunk"]:
        flags.append(f"crop_chunk={r['crop_chunk']}")
    lines = [
        f"method={r['method']} (teacher {r['teacher']}, regions {r['regions']}): "
        f"{r['model']} @ {r['image_size']} px, batch {r['batch_size']} x {r['regions_per_image']} regions, "
        f"{r['device']}, {', '.join(flags)}, losses {r['losses']}",
        "| images/s | regions/s | step (ms) | peak memory (GB) | TFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
        "| {:.1f} | {:.0f} | {:.1f} | {} | {:.2f} | {:.1f} | {} |".format(
            r["images_per_s"], r["regions_per_s"], 1000 * r["step_s"],
            f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "—",
            r["step_tflop"], r["achieved_tflops"], f"{100 * r['mfu']:.0f} %" if r["mfu"] else "—",
        ),
        "",
        "| part (synchronised) | ms | share |",
        "|---|---|---|",
    ]
    total = sum(r["parts_s"].values())
    lines += [f"| {k} | {1000 * v:.1f} | {100 * v / total:.0f} % |" for k, v in r["parts_s"].items()]
    lines += ["", "| loader workers | images/s |", "|---|---|"]
    lines += [f"| {w} | {v:.0f} |" for w, v in r["loader_images_per_s"].items()]
    return "\n".join(lines)


@hydra.main(config_path=str(CONFIG_DIR), config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = exit_on_user_error(lambda: run(cfg), log)
    print(format_result(result))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
