"""python -m fineclip.annotate images=... out=... [proposals=...] [captioner=...] (configs/annotate.yaml)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fineclip.cli import CONFIG_DIR, exit_on_user_error
from fineclip.errors import ConfigError

log = logging.getLogger("fineclip.annotate")


def check_shard_config(out: Path, cfg: DictConfig) -> None:
    """Shards written by another configuration must not be mixed into this run's output."""
    from fineclip.annotate.pipeline import shard_dir
    from fineclip.data.convert_coco import write_json_atomic

    what = OmegaConf.to_container(cfg, resolve=True)
    for key in ("worker", "merge_only", "progress", "device"):
        what.pop(key, None)
    for group in ("proposals", "captioner"):
        what[group].pop("device", None)
    path = shard_dir(out) / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != what:
            changed = sorted(k for k in set(saved) | set(what) if saved.get(k) != what.get(k))
            raise ConfigError(f"{shard_dir(out)} holds shards of another configuration (differs in {changed}): "
                              "delete that folder, or write to another out=")
    else:
        write_json_atomic(what, path)


def run(cfg: DictConfig) -> dict | None:
    from fineclip.annotate.captioners import RuleCaptioner
    from fineclip.annotate.pipeline import Annotator, Filters, format_report, merge, run_shards, worker_from_env
    from fineclip.annotate.sources import read_source

    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(cfg.out)
    source = read_source(cfg.images, cfg.image_root, cfg.captions)
    check_shard_config(out, cfg)
    info = {"description": f"fineclip.annotate of {cfg.images}", "proposals": cfg.proposals._target_.split(".")[-1],
            "captioner": cfg.captioner._target_.split(".")[-1]}
    if not cfg.merge_only:
        proposer = instantiate(cfg.proposals)
        captioner = instantiate(cfg.captioner)
        if isinstance(captioner, RuleCaptioner):
            captioner.categories = {c["id"]: c["name"] for c in source.categories}
            if not captioner.categories:
                raise ConfigError("captioner=rule names boxes by their class: use a COCO json with categories and "
                                  "proposals=gt (or a proposals file with category_id)")
        annotator = Annotator(proposer, captioner, Filters(**cfg.filters), cfg.batch_images, cfg.image_captions)
        worker = worker_from_env(cfg.worker.index, cfg.worker.count)
        written = run_shards(annotator, source, out, cfg.shard_size, worker, cfg.progress)
        log.info("worker %d/%d wrote %d shards", worker[0] + 1, worker[1], written)
        if worker[1] > 1:
            print(f"worker {worker[0] + 1}/{worker[1]} done; when every worker is, join the shards with the same "
                  "command and merge_only=true")
            return None
    if cfg.out_format == "shards":  # out is a folder of tar shards (fineclip/data/shards.py), with the json beside
        from fineclip.data.shards import convert, schema_records

        out.mkdir(parents=True, exist_ok=True)
        report = merge(source, out, cfg.shard_size, info, target=out / "annotations.json")
        convert(*schema_records(out / "annotations.json", source.root), out, cfg.samples_per_tar)
    elif cfg.out_format == "json":
        report = merge(source, out, cfg.shard_size, info)
    else:
        raise ConfigError(f"out_format={cfg.out_format}: use json or shards")
    print(f"wrote {out}\n{format_report(report)}\nreport: {out}.report.json")
    return report


@hydra.main(config_path=str(CONFIG_DIR), config_name="annotate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
