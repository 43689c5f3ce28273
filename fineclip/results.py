"""Collect finished runs into one results table (markdown on stdout, optionally csv).

    python -m fineclip.results runs/multirun/synthetic_table1/<date_time> [more run or multirun dirs] --csv results.csv

Each argument is a run directory (holds ``config.yaml``) or a multirun directory (its
sub-folders are runs, taken in job order). A row: the run's label (the overrides that set it
apart from the other jobs of its sweep, or its ``name``), its loss terms, teacher and regions, box top-1/top-5,
I2T/T2I R@1, the detection AP50 novel/base/all (OV-LVIS: mask APr), the mean time per epoch and the peak
memory (GPU: allocated; CPU: process RSS). A run without ``eval.json`` (failed or unfinished) keeps its row,
with empty metrics.

A ``python -m fineclip.detect`` run is a row of its own (its ``detect.json``), unless its backbone checkpoint
lies inside a training run of the same table: then its AP50 columns join that run's row.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.utils import get_class

COLUMNS = (  # (key, header, format)
    ("box/top1", "box top-1", "{:.1f}"),
    ("box/top5", "box top-5", "{:.1f}"),
    ("box/crop_top1", "crop top-1", "{:.1f}"),
    ("box/thing_top1", "thing top-1", "{:.1f}"),
    ("box/stuff_top1", "stuff top-1", "{:.1f}"),
    ("retrieval/i2t_r1", "I2T R@1", "{:.1f}"),
    ("retrieval/t2i_r1", "T2I R@1", "{:.1f}"),
    ("seg/linear_probe_miou", "probe mIoU", "{:.1f}"),
    ("seg/zero_shot_miou", "zero-shot mIoU", "{:.1f}"),
    ("detect/novel_ap50", "AP50 novel", "{:.1f}"),
    ("detect/base_ap50", "AP50 base", "{:.1f}"),
    ("detect/all_ap50", "AP50 all", "{:.1f}"),
    ("detect/mask_apr", "mask APr", "{:.1f}"),
    ("fgovd/hard/top1", "FG hard", "{:.1f}"),
    ("fgovd/medium/top1", "FG medium", "{:.1f}"),
    ("fgovd/easy/top1", "FG easy", "{:.1f}"),
    ("fgovd/trivial/top1", "FG trivial", "{:.1f}"),
    ("epoch_time_s", "time/epoch (s)", "{:.0f}"),
    ("peak_memory_gb", "peak mem (GB)", "{:.2f}"),
)


@dataclass
class RunResult:
    path: Path
    name: str
    overrides: list[str]
    loss_weights: str
    values: dict[str, float] = field(default_factory=dict)
    label: str = ""
    roles: str = ""
    backbone: Path | None = None  # a detection run's backbone checkpoint


def loss_terms(loss: dict) -> str:
    """The enabled terms of a loss config: "gc + sd + rc", "0.5·sd", "gc + distill (kl)"."""
    order = ("gc", "sd", "rc", "crop", "distill")  # the paper's order; others after, by name
    terms = sorted(((k.removesuffix("_weight"), v) for k, v in loss.items() if k.endswith("_weight") and v),
                   key=lambda t: (order.index(t[0]) if t[0] in order else len(order), t[0]))
    text = " + ".join(name if weight == 1 else f"{weight:g}·{name}" for name, weight in terms)
    return f"{text} ({loss['objective']})" if loss.get("objective") else text


def roles(config: dict) -> str:
    """"teacher / regions" of a run: "self / boxes", "frozen / grid", "frozen + vfm / grid" (an external VFM beside
    the teacher), "" for configs without roles."""
    teacher = (config.get("teacher") or {}).get("_target_", "")
    regions = config.get("regions") or {}
    if not teacher:
        return ""
    teacher = teacher.rsplit(".", 1)[-1].removesuffix("Teacher").lower() + (" + vfm" if config.get("vfm") else "")
    source = regions.get("source")  # configs written before region sources had a _target_
    if not source:
        target = regions.get("_target_")
        source = get_class(target).name if target else "boxes"
    return f"{teacher} / {source}"


def _job_number(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else sys.maxsize, path.name)


def find_runs(path: Path) -> list[list[Path]]:
    """Groups of run directories: [path] for a run, its job folders (in job order) for a multirun."""
    if (path / "config.yaml").is_file():
        return [[path]]
    jobs = sorted((p for p in path.iterdir() if (p / "config.yaml").is_file() or (p / ".hydra").is_dir()),
                  key=_job_number) if path.is_dir() else []
    if not jobs:
        raise FileNotFoundError(f"{path} is neither a run directory (config.yaml) nor a multirun directory")
    return [jobs]


def read_run(run_dir: Path) -> RunResult:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    result = RunResult(run_dir, config.get("name", run_dir.name), list(overrides), loss_terms(config.get("loss", {})),
                       roles=roles(config))
    for name in ("eval.json", "detect.json"):
        if (run_dir / name).is_file():
            result.values.update(json.loads((run_dir / name).read_text()))
    checkpoint = (config.get("backbone") or {}).get("checkpoint")
    result.backbone = Path(checkpoint).resolve() if checkpoint else None
    epoch_times, peaks = [], []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "epoch/time_s" in record:
                epoch_times.append(record["epoch/time_s"])
                peaks.append(record["epoch/peak_memory_gb"])
    if epoch_times:
        result.values["epoch_time_s"] = sum(epoch_times) / len(epoch_times)
        result.values["peak_memory_gb"] = max(peaks)
    return result


def collect(paths: list[str | Path]) -> list[RunResult]:
    """Every run under ``paths``, labelled by what distinguishes it within its sweep."""
    rows = []
    for path in paths:
        for group in find_runs(Path(path)):
            results = [read_run(p) for p in group]
            common = set.intersection(*(set(r.overrides) for r in results)) if len(results) > 1 else None
            for r in results:
                own = [o for o in r.overrides if common is not None and o not in common]
                r.label = " ".join(own) or r.name
            rows.extend(results)
    return join_detection(rows)


def join_detection(rows: list[RunResult]) -> list[RunResult]:
    """Detection rows whose backbone checkpoint lies inside another row's run folder join that row."""
    kept = []
    for row in rows:
        owner = next((r for r in rows if r is not row and row.backbone and "detect/protocol" not in r.values
                      and row.backbone.is_relative_to(r.path.resolve())), None)
        if owner is None:
            kept.append(row)
        else:
            owner.values.update({k: v for k, v in row.values.items() if k.startswith("detect/")})
    return kept


def protocols(r: RunResult) -> str:
    """The evaluation protocols that made the run's numbers (fineclip.eval.protocols)."""
    keys = ("box/protocol", "retrieval/protocol", "detect/protocol")
    return ", ".join(str(r.values[k]) for k in keys if k in r.values)


def markdown_table(rows: list[RunResult]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r.values for r in rows)]
    with_protocols = any(protocols(r) for r in rows)
    with_roles = any(r.roles for r in rows)
    header = ["#", "run", "loss terms", *(["teacher / regions"] if with_roles else []), *(c[1] for c in columns)]
    header += ["protocols"] if with_protocols else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        cells = [fmt.format(r.values[key]) if key in r.values else "—" for key, _, fmt in columns]
        cells += [protocols(r) or "—"] if with_protocols else []
        lead = [str(i), r.label, r.loss_weights, *([r.roles or "—"] if with_roles else [])]
        lines.append("| " + " | ".join([*lead, *cells]) + " |")
    headline = {"box/top1", "retrieval/i2t_r1", "detect/all_ap50", "detect/mask_apr"}
    missing = [r for r in rows if not headline & set(r.values)]
    if missing:
        lines.append("")
        lines.append(f"{len(missing)} run(s) without eval.json (failed or unfinished): "
                     + ", ".join(str(r.path) for r in missing))
    return "\n".join(lines)


def write_csv(rows: list[RunResult], path: str | Path) -> None:
    keys = [c[0] for c in COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "path", "loss terms", "teacher / regions", *keys, "protocols"])
        for r in rows:
            writer.writerow([r.label, str(r.path), r.loss_weights, r.roles, *(r.values.get(k, "") for k in keys),
                             protocols(r)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories and/or multirun directories, in row order")
    parser.add_argument("--csv", help="also write the table as csv to this file")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.paths)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(markdown_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
