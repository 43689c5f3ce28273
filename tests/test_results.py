"""The results table from run and multirun directories."""

import csv
import json

import yaml

from fineclip.results import collect, main


def _fake_run(path, overrides, loss, metrics=None, epochs=()):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"name": "table", "loss": {"gc_weight": loss[0], "sd_weight": loss[1], "rc_weight": loss[2]}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (path / "eval.json").write_text(json.dumps(metrics))
    lines = [{"step": 10, "train/loss": 1.0}]
    lines += [{"step": 20 * (i + 1), "epoch": i, "epoch/time_s": t, "epoch/peak_memory_gb": m} for i, (t, m) in
              enumerate(epochs)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_rows_follow_job_order_with_labels_averages_and_failures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    common = ["+experiment=x", "trainer.progress=False"]
    metrics = {"box/top1": 45.94, "box/top5": 99.0, "retrieval/i2t_r1": 80.0, "retrieval/t2i_r1": 70.25,
               "box/protocol": "box_fc", "retrieval/protocol": "retrieval_fc"}
    _fake_run(sweep / "10_loss=fineclip", [*common, "loss=fineclip"], (1, 1, 1), metrics, [(10.0, 1.0), (14.0, 1.5)])
    _fake_run(sweep / "2_loss=clip", [*common, "loss=clip"], (1, 0, 0), {"box/top1": 25.0}, [(4.0, 0.5)])
    _fake_run(sweep / "3_loss=sd", [*common, "loss=sd"], (0, 1, 0))  # failed: no eval.json
    (sweep / "multirun.yaml").write_text("{}")
    single = tmp_path / "pretrained"
    _fake_run(single, ["+experiment=pre"], (1, 0, 0), {"box/top1": 26.0}, [(30.0, 2.0)])

    rows = collect([single, sweep])
    assert [r.label for r in rows] == ["table", "loss=clip", "loss=sd", "loss=fineclip"]  # job 2 < 3 < 10
    assert rows[3].values["epoch_time_s"] == 12.0 and rows[3].values["peak_memory_gb"] == 1.5
    assert rows[3].loss_weights == "gc + sd + rc" and rows[1].loss_weights == "gc" and "box/top1" not in rows[2].values

    out = tmp_path / "results.csv"
    main([str(single), str(sweep), "--csv", str(out)])
    table = capsys.readouterr().out
    row = "| 4 | loss=fineclip | gc + sd + rc | 45.9 | 99.0 | 80.0 | 70.2 | 12 | 1.50 | box_fc, retrieval_fc |"
    assert row in table
    assert "| 2 | loss=clip | gc | 25.0 | — | — | — | 4 | 0.50 | — |" in table
    assert "1 run(s) without eval.json" in table and "3_loss=sd" in table
    with open(out, newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["table", "loss=clip", "loss=sd", "loss=fineclip"]
    assert float(records[3]["retrieval/t2i_r1"]) == 70.25 and records[2]["box/top1"] == ""
    assert records[3]["protocols"] == "box_fc, retrieval_fc"


def test_rows_name_loss_terms_teacher_and_regions():
    from fineclip.results import loss_terms, roles

    weights = {"gc_weight": 1.0, "sd_weight": 0.5, "rc_weight": 0.0, "crop_weight": 1.0}
    assert loss_terms(weights) == "gc + 0.5·sd + crop"
    assert loss_terms({"objective": "sigmoid", "gc_weight": 0.0, "distill_weight": 1.0}) == "distill (sigmoid)"
    assert roles({"teacher": {"_target_": "fineclip.methods.FrozenTeacher"},
                  "regions": {"_target_": "fineclip.methods.regions.GridRegions"}}) == "frozen / grid"
    assert roles({"teacher": {"_target_": "fineclip.methods.EMATeacher"}, "regions": {"source": "proposals"}}) == \
        "ema / proposals"
    assert roles({"teacher": {"_target_": "fineclip.methods.FrozenTeacher"}, "vfm": {"arch": "vit_base_patch14"},
                  "regions": {"_target_": "fineclip.methods.regions.GridRegions"}}) == "frozen + vfm / grid"
    assert roles({}) == ""


def _fake_detect_run(path, backbone, ap50):
    path.mkdir(parents=True)
    config = {"name": "detect_synthetic", "backbone": {"checkpoint": backbone}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    novel, base, all_ = ap50
    (path / "detect.json").write_text(json.dumps({"detect/protocol": "ov_synthetic", "detect/novel_ap50": novel,
                                                  "detect/base_ap50": base, "detect/all_ap50": all_}))


def test_a_detection_run_joins_the_row_of_its_backbones_training_run(tmp_path, capsys):
    trained = tmp_path / "fineclip"
    _fake_run(trained, ["method=fineclip"], (1, 1, 1), {"box/top1": 40.0, "box/protocol": "box_cs"}, [(5.0, 1.0)])
    _fake_detect_run(tmp_path / "detect_fineclip", str(trained / "checkpoints" / "last.pt"), (12.34, 30.0, 25.0))
    _fake_detect_run(tmp_path / "detect_untrained", None, (1.0, 8.0, 6.0))
    rows = collect([trained, tmp_path / "detect_fineclip", tmp_path / "detect_untrained"])
    assert [r.label for r in rows] == ["table", "detect_synthetic"]  # the fineclip detection joined its backbone
    assert rows[0].values["detect/novel_ap50"] == 12.34 and rows[0].values["box/top1"] == 40.0
    main([str(trained), str(tmp_path / "detect_fineclip"), str(tmp_path / "detect_untrained")])
    table = capsys.readouterr().out
    assert "| AP50 novel | AP50 base | AP50 all |" in table
    assert "| 1 | table | gc + sd + rc | 40.0 | 12.3 | 30.0 | 25.0 | 5 | 1.00 | box_cs, ov_synthetic |" in table
    assert "| 2 | detect_synthetic |  | — | 1.0 | 8.0 | 6.0 | — | — | ov_synthetic |" in table
    assert "without eval.json" not in table and "mask APr" not in table  # no OV-LVIS run: no column
    lvis = tmp_path / "detect_lvis"
    _fake_detect_run(lvis, None, (1.0, 2.0, 3.0))
    (lvis / "detect.json").write_text(json.dumps({"detect/protocol": "ov_lvis", "detect/mask_apr": 4.56}))
    main([str(lvis)])
    assert "| 1 | detect_synthetic |  | 4.6 | ov_lvis |" in capsys.readouterr().out
