"""What only a GPU can show, in one run and one table (scripts/gpu_check.sh starts it):

1. every method= for a few optimizer steps at the real model sizes with random weights (EVA02-B-16 and
   ViT-B-16 at 224 px, batch 32, 8 regions per image, bf16, torch.compile): does the step run, is the
   loss finite, step time, images/s, peak memory;
2. a 1-process NCCL torchrun of the tiny experiment (train + evaluate);
3. python -m fineclip.benchmark of EVA02-B-16: images/s, peak memory, MFU;
4. a BLIP-2-sized captioner (blip2-opt-2.7b's dimensions) with random weights: regions/s of fineclip.annotate's
   HFCaptioner;
5. an EVA02-B-16 file in EVA-CLIP's native layout (random weights, as ``EVA02_CLIP_B_psz16_s8B.pt`` stores them)
   converted at load and evaluated with box_fc at 224 px on generated COCO-panoptic-shaped data: boxes/s;
6. fineclip.detect's OV-COCO B/16 detector (F-ViT) at 640 px, batch 8, random backbone weights: s/iteration and
   peak memory of the training step;
7. method=declip as +experiment=declip_coco_b16 trains: EVA02-B-16 at 560 px, batch 16, CLIPSelf's grid cells
   (≤ 20 per image), crops at 224 px through the frozen copy, a DINOv2-B/14-reg-sized context teacher at 490 px
   (random weights): images/s and peak memory;
8. the shard reader (``data=shards``) with 16 workers feeding bf16 EVA02-B-16 fineclip steps at 224 px, batch 32:
   samples/s of the loader alone, of the step alone (one batch again and again) and of both together — is the
   loader the bottleneck?

Each part runs inside a time budget; a part that fails or is cut prints its reason in the table instead
of stopping the others. On a CPU, ``--models tiny --precision fp32 --no-compile --batch 4`` checks the
script itself in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fineclip", "clip", "clipself", "regionclip", "regionclip_sigmoid", "detailclip")


def compose_benchmark(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="benchmark", overrides=list(overrides))


def method_row(model: str, method: str, args, *extra: str, batch: int | None = None, label: str | None = None) -> dict:
    """A few optimizer steps of ``method`` on ``model`` with random weights, as the trainer builds them
    (``extra``: more overrides; ``batch``: another batch size)."""
    from hydra.utils import instantiate

    from fineclip.benchmark import Step, batch_regions, benchmark_method, sync
    from fineclip.data.random_batch import random_batch
    from fineclip.engine.build import compile_blocks, freeze_unused_parameters
    from fineclip.engine.distributed import resolve_device
    from fineclip.engine.step import resolve_precision

    batch = batch or args.batch
    cfg = compose_benchmark(f"model={model}", f"method={method}", f"batch_size={batch}",
                            f"regions_per_image={args.regions}", f"trainer.precision={args.precision}",
                            f"trainer.compile={str(args.compile).lower()}", f"trainer.device={args.device}", *extra)
    device = resolve_device(cfg.trainer.device)
    precision = resolve_precision(device, cfg.trainer.precision)
    torch.manual_seed(0)
    method_parts = benchmark_method(cfg, device)
    model_ = method_parts.model
    freeze_unused_parameters(model_, method_parts.loss_fn, precision, method_parts.teacher)
    if cfg.trainer.compile:
        compile_blocks(model_)
    optimizer = instantiate(cfg.optim.optimizer, model=model_)
    step = Step(model_, method_parts.loss_fn, optimizer, device, precision, method_parts.teacher,
                batch_regions(method_parts.regions))
    size = model_.image_size[0]
    views = method_parts.teacher.dataset_arguments().get("views")
    batches = [random_batch(batch, args.regions, size, i, device, views=views) for i in range(2)]
    start = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % 2])
    sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [step(batches[i % 2]) for i in range(args.steps)]
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    finite = all(bool(torch.isfinite(x)) for x in losses)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model_, method_parts, optimizer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"check": label or f"method={method}", "model": cfg.model.name, "ok": finite,
            "result": f"loss {losses[-1].item():.3f}{'' if finite else ' NOT FINITE'}; warm-up+compile {first:.0f} s",
            "step_s": seconds, "images_per_s": batch / seconds, "peak_gb": peak}


def shard_loader_row(args) -> dict:
    """The shard reader with ``args.loader_workers`` workers feeding ``args.benchmark_model`` fineclip steps."""
    from hydra.utils import instantiate

    from fineclip.benchmark import Step, benchmark_method, sync
    from fineclip.data.loader import MapStyleBatches
    from fineclip.data.shards import ShardedRegionDataset, convert, schema_records
    from fineclip.data.synthetic import generate
    from fineclip.engine.build import freeze_unused_parameters
    from fineclip.engine.distributed import resolve_device
    from fineclip.engine.step import resolve_precision

    cfg = compose_benchmark(f"model={args.benchmark_model}", "method=fineclip", f"batch_size={args.batch}",
                            f"trainer.precision={args.precision}", f"trainer.device={args.device}")
    device = resolve_device(cfg.trainer.device)
    precision = resolve_precision(device, cfg.trainer.precision)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = generate(Path(tmp) / "scenes", train=args.loader_images, val=0, size=args.loader_size, seed=0)
        convert(*schema_records(scenes / "train.json"), Path(tmp) / "shards", per_shard=1000)
        torch.manual_seed(0)
        method = benchmark_method(cfg, device)
        dataset = ShardedRegionDataset(Path(tmp) / "shards", image_size=method.model.image_size[0])
        freeze_unused_parameters(method.model, method.loss_fn, precision, method.teacher)
        step = Step(method.model, method.loss_fn, instantiate(cfg.optim.optimizer, model=method.model), device,
                    precision, method.teacher)

        def epoch(run_step: bool) -> float:
            batches = MapStyleBatches(dataset, args.batch, num_workers=args.loader_workers,
                                      pin_memory=device.type == "cuda")
            batches.set_position(0, 0)
            start, count = time.perf_counter(), 0
            for group in batches:
                count += len(group[0]["images"])
                if run_step:
                    step(group[0])
            sync(device)
            return count / (time.perf_counter() - start)

        loader_rate = epoch(run_step=False)
        fixed = next(iter(MapStyleBatches(dataset, args.batch)))[0]
        for _ in range(2):  # warm-up: text cache, cuDNN
            step(fixed)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(fixed)
        sync(device)
        step_rate = args.batch * args.steps / (time.perf_counter() - start)
        both = epoch(run_step=True)
    bound = "the loader" if loader_rate < step_rate else "the step"
    return {"check": f"shard loader, {args.loader_workers} workers", "model": cfg.model.name, "ok": True,
            "result": f"loader alone {loader_rate:.0f}, step alone {step_rate:.0f}, together {both:.0f} samples/s "
                      f"({args.loader_images} scenes of {args.loader_size} px): {bound} bounds it",
            "step_s": args.batch / both, "images_per_s": both, "peak_gb": None}


def declip_row(args) -> dict:
    """method=declip in +experiment=declip_coco_b16's setting, with random weights (student and VFM)."""
    return method_row(args.declip_model, "declip", args, f"model.image_size={args.declip_size}",
                      f"teacher.crop_size={args.declip_crop}", f"vfm={args.declip_vfm}", "vfm.random_init=true",
                      batch=args.declip_batch,
                      label=f"method=declip {args.declip_size} px, vfm={args.declip_vfm}, batch {args.declip_batch}")


def run_command(name: str, command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                              env={**os.environ, **(env or {})})
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        return 124, f"{name}: over {timeout:.0f} s\n{err.stdout or ''}", time.perf_counter() - start


def torchrun_row(args, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rc, out, seconds = run_command("torchrun", [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "fineclip.train",
            "data.synthetic.train=256", "data.synthetic.val=32", "data.batch_size=32", "trainer.epochs=1",
            "trainer.progress=false", f"trainer.device={args.device}", f"hydra.run.dir={tmp}/run"],
            timeout, {"FINECLIP_CACHE": f"{tmp}/cache"})
        metrics = json.loads(Path(tmp, "run", "eval.json").read_text()) if rc == 0 else {}
    backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
    result = (f"box top-1 {metrics['box/top1']:.1f}, I2T R@1 {metrics['retrieval/i2t_r1']:.1f}" if metrics
              else out.strip().splitlines()[-1][:200] if out.strip() else f"exit {rc}")
    return {"check": f"torchrun 1 process ({backend})", "model": "fineclip-tiny", "ok": rc == 0,
            "result": f"{result}; {seconds:.0f} s", "step_s": None, "images_per_s": None, "peak_gb": None}


def benchmark_row(args, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rc, out, seconds = run_command("benchmark", [
            sys.executable, "-m", "fineclip.benchmark", f"model={args.benchmark_model}", f"batch_size={args.batch}",
            f"trainer.precision={args.precision}", f"trainer.compile={str(args.compile).lower()}",
            f"trainer.device={args.device}", "steps=10", "warmup_steps=3", "breakdown_steps=2", "loader.workers=[8]",
            "loader.batches=20", f"output={tmp}/bench.json", f"hydra.run.dir={tmp}/run"], timeout)
        result = json.loads(Path(tmp, "bench.json").read_text()) if rc == 0 else None
    if result is None:
        return {"check": "fineclip.benchmark", "model": args.benchmark_model, "ok": False,
                "result": (out.strip().splitlines() or [f"exit {rc}"])[-1][:200], "step_s": None,
                "images_per_s": None, "peak_gb": None}
    mfu = f"MFU {100 * result['mfu']:.1f} %" if result.get("mfu") else "MFU n/a"
    loader = ", ".join(f"{w} workers {r:.0f} img/s" for w, r in result["loader_images_per_s"].items())
    return {"check": "fineclip.benchmark", "model": result["model"], "ok": True,
            "result": f"{mfu}, {result['achieved_tflops']:.0f} TFLOP/s; loader {loader}; {seconds:.0f} s",
            "step_s": result["step_s"], "images_per_s": result["images_per_s"], "peak_gb": result["peak_memory_gb"]}


def blip2_captioner(device: torch.device, full_size: bool):
    """fineclip.annotate's HFCaptioner around a BLIP-2 with random weights (blip2-opt-2.7b's size, or tiny)."""
    from fineclip.annotate.captioners import HFCaptioner
    from fineclip.annotate.random_blip2 import random_blip2

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = random_blip2(full_size, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    return HFCaptioner.from_model(model, processor, name="blip2-random", crop_scale=1.5, batch_size=32,
                                  max_new_tokens=20, device=str(device)), params


def captioner_row(args) -> dict:
    from PIL import Image

    from fineclip.annotate.proposers import Proposal

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    captioner, params = blip2_captioner(device, full_size=not args.tiny_captioner)
    images = [Image.new("RGB", (640, 480), (40 * i % 255, 90, 160)) for i in range(8)]
    boxes = [[Proposal([20 * r, 15 * r, 160, 120], 1.0, "gt") for r in range(16)] for _ in images]
    captioner(images[:1], boxes[:1])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    captioner(images, boxes)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    regions = sum(len(b) for b in boxes)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"check": "BLIP-2 captioner (random weights)", "model": f"{params / 1e9:.2f} B parameters", "ok": True,
            "result": f"{regions / seconds:.1f} regions/s ({regions} crops, batch 32, 20 new tokens)",
            "step_s": None, "images_per_s": None, "peak_gb": peak}


# open_clip/timm EVA names -> EVA-CLIP's own (the inverse of timm's eva.checkpoint_filter_fn)
EVA_CLIP_NAMES = (("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"),
                  ("attn.norm", "attn.inner_attn_ln"), ("attn.q_proj.bias", "attn.q_bias"),
                  ("attn.v_proj.bias", "attn.v_bias"))


def eva_clip_layout(state: dict) -> dict:
    """An open_clip EVA02 state dict written in EVA-CLIP's native layout (``visual.blocks.N.attn.q_bias``, ...)."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual.trunk."):
            key = "visual." + key.removeprefix("visual.trunk.")
            for ours, theirs in EVA_CLIP_NAMES:
                key = key.replace(ours, theirs)
        out[key] = value
    return out


def write_panoptic(root: Path, count: int, size: tuple[int, int] = (640, 480)) -> None:
    """COCO panoptic val2017's layout: noise images, 8 non-overlapping segments each (a 4 x 2 grid of cells),
    10 thing and 10 stuff classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    categories = ([{"id": i + 1, "name": f"thing{i}", "isthing": 1} for i in range(10)]
                  + [{"id": 100 + i, "name": f"stuff{i}", "isthing": 0} for i in range(10)])
    width, height = size
    cell_w, cell_h = width // 4, height // 2
    images, annotations = [], []
    for n in range(count):
        name = f"{n:012d}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "val2017" / f"{name}.jpg")
        ids, segments = np.zeros((height, width), dtype=np.int64), []
        for k in range(8):
            x1, y1 = (k % 4) * cell_w + 5, (k // 4) * cell_h + 5
            w, h = int(rng.integers(30, cell_w - 10)), int(rng.integers(30, cell_h - 10))
            ids[y1:y1 + h, x1:x1 + w] = k + 1
            category = categories[int(rng.integers(len(categories)))]
            segments.append({"id": k + 1, "category_id": category["id"], "bbox": [x1, y1, w, h], "area": w * h,
                             "iscrowd": 0})
        png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(png).save(root / "annotations" / "panoptic_val2017" / f"{name}.png")
        images.append({"id": n, "file_name": f"{name}.jpg", "width": width, "height": height})
        annotations.append({"image_id": n, "file_name": f"{name}.png", "segments_info": segments})
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def eva_clip_eval_row(args) -> dict:
    """``fineclip.evaluate`` of an EVA-CLIP-layout file (random weights) with box_fc: boxes/s of the evaluator."""
    import open_clip
    from hydra import compose, initialize_config_dir

    from fineclip.engine.checkpoint import save_checkpoint
    from fineclip.evaluate import run

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model={args.eva_model}", "data=coco_panoptic", f"data.root={tmp}/coco", f"device={args.device}",
                     f"cache_dir={tmp}/cache", "eval.class_cache_dir=null", f"eval.batch_size={args.batch}"]
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=overrides)
        torch.manual_seed(0)
        save_checkpoint(eva_clip_layout(open_clip.create_model(cfg.model.name).state_dict()), f"{tmp}/eva_clip.pt")
        write_panoptic(Path(tmp, "coco"), args.eva_images)
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[*overrides, f"model.checkpoint={tmp}/eva_clip.pt"])
        start = time.perf_counter()
        metrics = run(cfg)
        seconds = time.perf_counter() - start
    boxes = metrics["box/boxes"]
    return {"check": "EVA-CLIP layout file, box_fc", "model": cfg.model.name, "ok": metrics["box/protocol"] == "box_fc",
            "result": f"{boxes / seconds:.0f} boxes/s ({boxes:.0f} boxes on {args.eva_images} images, "
                      f"{cfg.model.image_size} px, batch {args.batch}, load + conversion + class prompts included); "
                      f"{seconds:.0f} s",
            "step_s": None, "images_per_s": args.eva_images / seconds, "peak_gb": None}


def detect_row(args) -> dict:
    """A few training iterations of the OV-COCO detector (``+detect=ov_coco_b16``) on random images and boxes."""
    from hydra import compose, initialize_config_dir

    from fineclip.benchmark import sync
    from fineclip.detect.model import build_detector
    from fineclip.detect.run import load_backbone

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    overrides = [f"+detect={args.detect_config}", *args.detect_overrides.split()]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="detect", overrides=overrides)
    torch.manual_seed(0)
    model = load_backbone(cfg).to(device)
    classes = len(cfg.data.base) + len(cfg.data.novel)
    embeddings = torch.nn.functional.normalize(torch.randn(classes + 1, model.embed_dim), dim=-1)
    weight = torch.cat([torch.tensor([0.6]), torch.ones(classes)])
    detector = build_detector(model, embeddings, weight, torch.zeros(classes + 1, dtype=torch.bool),
                              cfg.detector).to(device).train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size, batch = int(cfg.data.image_size), args.detect_batch
    generator = torch.Generator().manual_seed(0)

    def sample():
        corner = torch.rand(6, 2, generator=generator) * size * 0.6
        boxes = torch.cat([corner, corner + 20 + torch.rand(6, 2, generator=generator) * size * 0.35], dim=1)
        labels = torch.randint(1, classes + 1, (6,), generator=generator)
        return {"boxes": boxes.to(device), "labels": labels.to(device)}

    images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
    targets = [sample() for _ in range(batch)]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"check": f"fineclip.detect {args.detect_config}", "model": cfg.model.name, "ok": bool(torch.isfinite(loss)),
            "result": f"{seconds:.3f} s/iteration at {size} px, batch {batch}, loss {loss.item():.3f}",
            "step_s": seconds, "images_per_s": batch / seconds, "peak_gb": peak}


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "" if v is None or v != v else format(v, fmt)

    lines = ["| check | model | ok | step (s) | img/s | peak GB | result |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['model']} | {'yes' if r['ok'] else 'NO'} | {num(r['step_s'], '.3f')} | "
              f"{num(r['images_per_s'], '.0f')} | {num(r['peak_gb'], '.1f')} | {r['result']} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="eva02_b16,vit_b16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--benchmark-model", default="eva02_b16")
    parser.add_argument("--tiny-captioner", action="store_true", help="a tiny BLIP-2 (checks the script on a CPU)")
    parser.add_argument("--eva-model", default="eva02_b16", help="the model config of the EVA-CLIP-layout row")
    parser.add_argument("--eva-images", type=int, default=256, help="generated COCO-panoptic-shaped images")
    parser.add_argument("--detect-config", default="ov_coco_b16", help="the +detect= config of the detection row")
    parser.add_argument("--detect-overrides", default="", help="more overrides of the detection row (space-separated)")
    parser.add_argument("--detect-batch", type=int, default=8)
    parser.add_argument("--declip-model", default="eva02_b16")
    parser.add_argument("--declip-size", type=int, default=560, help="the student's input size of the declip row")
    parser.add_argument("--declip-crop", type=int, default=224, help="the frozen copy's crop size of the declip row")
    parser.add_argument("--declip-vfm", default="dinov2_b14_reg", help="the vfm= config of the declip row")
    parser.add_argument("--declip-batch", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=16)
    parser.add_argument("--loader-images", type=int, default=1024, help="synthetic scenes of the shard-loader row")
    parser.add_argument("--loader-size", type=int, default=320)
    parser.add_argument("--budget-s", type=float, default=450, help="time for all parts; the rest is skipped")
    parser.add_argument("--out", default=None, help="also write the table (markdown) and rows (json) here")
    args = parser.parse_args()

    start = time.perf_counter()
    rows: list[dict] = []

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    def attempt(name: str, model: str, part, reserve: float) -> None:
        if left() < reserve:
            rows.append({"check": name, "model": model, "ok": False, "result": "skipped: out of time budget",
                         "step_s": None, "images_per_s": None, "peak_gb": None})
            return
        try:
            rows.append(part())
        except Exception as err:  # noqa: BLE001 - every part reports its own failure in the table
            traceback.print_exc()
            rows.append({"check": name, "model": model, "ok": False, "result": f"{type(err).__name__}: {err}"[:200],
                         "step_s": None, "images_per_s": None, "peak_gb": None})
        print(table(rows[-1:]).splitlines()[-1], flush=True)

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"gpu_check on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}",
          flush=True)
    later = 320  # seconds kept for the benchmark, the captioner, the EVA-CLIP, the detection and the declip rows (last)
    attempt("torchrun", "fineclip-tiny", lambda: torchrun_row(args, min(120, left() - later)), later + 30)
    for method in args.methods.split(","):
        for model in args.models.split(","):
            attempt(f"method={method}", model, lambda m=model, me=method: method_row(m, me, args), later + 20)
    attempt("fineclip.benchmark", args.benchmark_model, lambda: benchmark_row(args, min(150, left() - 50)), 80)
    attempt("BLIP-2 captioner", "blip2-opt-2.7b size", lambda: captioner_row(args), 40)
    attempt("EVA-CLIP layout file, box_fc", args.eva_model, lambda: eva_clip_eval_row(args), 30)
    attempt(f"fineclip.detect {args.detect_config}", "EVA02-B-16", lambda: detect_row(args), 30)
    attempt("method=declip", args.declip_model, lambda: declip_row(args), 30)
    attempt("shard loader", args.benchmark_model, lambda: shard_loader_row(args), 30)
    text = table(rows)
    print(f"\n{text}\n\n{time.perf_counter() - start:.0f} s in all", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.md").write_text(text + "\n")
        Path(args.out, "gpu_check.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
