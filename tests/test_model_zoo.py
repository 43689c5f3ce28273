"""Every command of docs/model-zoo.md runs: the model swapped for its tiny stand-in of the same kind, the
weights file for a generated one in the row's format, COCO for a panoptic fixture; the evaluation reads the
file as the row's format and reports the protocol the command names."""

from __future__ import annotations

import logging
import re
import shlex

import eva_clip_layout as eva
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_protocols import _panoptic_root
from test_weights import _openai_archive

from fineclip.cli import CONFIG_DIR
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.evaluate import run as evaluate_run

ZOO = CONFIG_DIR.parent / "docs" / "model-zoo.md"
STAND_INS = {
    "eva02_b16": ["model=tiny_eva_clip"],
    "eva02_l14": ["model=tiny_eva_clip"],
    "eva02_b16_csa": ["model=tiny_eva_clip", "model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention",
                      "+model.dense_mode.mode=csa"],
    "vit_b16": ["model=tiny", "model.name=fineclip-tiny-quickgelu"],
}


def zoo_rows() -> list[dict]:
    lines = ZOO.read_text().split("<!-- zoo-table")[1].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("checkpoint", "---"):
            continue
        rows.append({"name": cells[0], "format": cells[2].strip("`"), "command": cells[3].strip("`")})
    return rows


def test_the_table_has_every_checkpoint_of_the_family():
    names = " ".join(r["name"] for r in zoo_rows())
    for family in ("EVA02-CLIP B/16", "EVA02-CLIP L/14-336", "FineCLIP COCO B/16", "FineCLIP COCO L/14", "CLIPSelf",
                   "DeCLIP", "DenseVLM", "CLIM", "OpenAI"):
        assert family in names, family


def _weights_file(fmt: str, folder) -> str:
    path = folder / f"{fmt.replace('/', '_')}.pt"
    if fmt.endswith("eva_clip"):
        state = eva.generate(seed=3)
        if fmt.startswith("training-code"):
            state = {"epoch": 6, "name": "zoo", "state_dict": {f"module.{k}": v for k, v in state.items()}}
        save_checkpoint(state, path)
    else:
        torch.manual_seed(0)
        state = open_clip.create_model("fineclip-tiny-quickgelu").state_dict()
        if fmt == "openai":
            _openai_archive(path, state)
        else:
            save_checkpoint({"epoch": 1, "name": "zoo", "state_dict": {f"module.{k}": v for k, v in state.items()}},
                            path)
    return str(path)


@pytest.mark.parametrize("row", zoo_rows(), ids=lambda r: r["name"])
def test_the_command_of_each_row_runs_on_a_tiny_stand_in(row, tmp_path, caplog):
    words = shlex.split(row["command"])
    assert words[:3] == ["python", "-m", "fineclip.evaluate"], row["command"]
    overrides, model = [], None
    for word in words[3:]:
        key, value = word.split("=", 1)
        if key == "model":
            model = value
        elif key == "model.checkpoint":
            overrides.append(f"model.checkpoint={_weights_file(row['format'], tmp_path)}")
        elif key == "data.root":
            (tmp_path / "coco").mkdir()
            overrides.append(f"data.root={_panoptic_root(tmp_path / 'coco')}")
        elif key not in ("model.name", "model.image_size"):  # the full-size model's own settings
            overrides.append(word)
    args = [*STAND_INS[model], f"cache_dir={tmp_path / 'cache'}", "eval.class_cache_dir=null", *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=args)
    with caplog.at_level(logging.INFO, logger="fineclip.models.factory"):
        metrics = evaluate_run(cfg)
    assert f"({row['format']} format)" in caplog.text
    protocol = re.search(r"eval\.protocol=(\w+)", row["command"])
    assert metrics["box/protocol"] == (protocol.group(1) if protocol else "box_fc")
    top1 = metrics["box/top1"] if "box/top1" in metrics else metrics["box/thing_top1"]  # box_cs: thing, stuff apart
    assert 0 <= top1 <= 100 and metrics["box/boxes"] == 3
