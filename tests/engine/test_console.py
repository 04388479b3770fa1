"""What a run prints and draws: the step line, the end-of-run summary, the grouped loss curve, the
resume diff, the log formatter, and when a tqdm bar is drawn."""

from __future__ import annotations

import io
import logging
import math

from PIL import Image

from hmkd.cli import LevelFormatter
from hmkd.engine.logging_utils import _panels, bar_wanted, config_changes, format_summary, plot_loss_curve, step_line


def _record(it: int) -> dict:
    return {
        "iteration": it, "lr": 1e-3 / it, "student.classification": 1.0 / it, "student.bbox_regression": 0.5,
        "distill.others_p2": 0.2, "distill.others_p3": 0.1, "distill.bg_p2": 2e-3, "aux.identification_p3": 0.7,
        "metric.in_box_p3": 0.02, "total": 1.5 + 1.0 / it + 0.302 + 0.7, "sec_per_iter": 0.41, "data_sec": 0.02,
        "peak_mem_mb": 812.4,
    }


def test_step_line_has_every_group_time_memory_and_eta() -> None:
    line = step_line(_record(20), total_iters=300, eta_sec=112.0)
    assert line.startswith("eta: 0:01:52  iter: 20/300  total: 2.552  detection: 0.55  distillation: 0.302  auxiliary: 0.7  ")
    assert line.endswith("lr: 5e-05  time: 0.410  data_time: 0.020  max_mem: 812M")
    assert "metric" not in line and "\n" not in line


def test_summary_is_short_and_has_no_nan() -> None:
    nan = float("nan")
    result = {
        "bbox": {"mAP": 15.24, "AP50": 22.9, "AP75": 17.5, "APs": 15.8, "APm": nan, "APl": nan, "per_class": {"a": nan}},
        "status": "finished", "iteration": 300, "method": "hmkd", "best": {"iteration": 200, "mAP": 15.9},
        "timing": {"train_seconds": 602.0, "sec_per_iter": 2.0, "eval_seconds": 31.0, "images_per_sec": 2.0,
                   "device": "cpu", "world_size": 1},
        "output_dir": "runs/x",
        "outputs": {"final": "runs/x/model_final.pth", "best": "runs/x/model_best.pth", "metrics": "runs/x/metrics.json",
                    "log": "runs/x/log.jsonl", "loss_curve": "runs/x/loss_curve.png", "eval": "runs/x/eval"},
    }
    text = format_summary(result)
    lines = text.splitlines()
    assert lines[0] == ("finished: 300 iterations (hmkd) in 0:10:02 (2.000 s/iter, 2.0 images/s), "
                        "evaluation 0:00:31, on cpu")
    assert "| bbox | 15.2 | 22.9 | 17.5 | 15.8 | - | - |" in lines
    assert "best: bbox mAP 15.9 at iteration 200 (runs/x/model_best.pth)" in lines
    assert "  model_final.pth" in lines and "  eval" in lines
    assert "nan" not in text.lower() and len(lines) < 20


def test_loss_curve_is_grouped_one_panel_each(tmp_path) -> None:
    records = [_record(it) for it in range(1, 41)]
    records.insert(20, {"iteration": 20, "eval": {"bbox": {"mAP": 3.0, "APs": 2.0}}})
    records.append({"iteration": 40, "eval": {"bbox": {"mAP": 5.0, "APs": math.nan}}})
    panels = _panels(records)
    titles = [t for t, _, _ in panels]
    assert titles == ["total and its groups", "detection terms (student.*)", "distillation terms (distill.*)",
                      "auxiliary terms (aux.*)", "measurements", "learning rate", "evaluation"]
    lines = {t: [label for label, _, _ in ls] for t, _, ls in panels}
    assert lines["total and its groups"] == ["total", "detection", "distillation", "auxiliary"]
    assert lines["distillation terms (distill.*)"] == ["others_p2", "others_p3", "bg_p2"]
    assert lines["evaluation"] == ["bbox mAP", "bbox APs"]
    ev = dict((label, (xs, ys)) for label, xs, ys in panels[-1][2])
    assert ev["bbox mAP"] == ([20, 40], [3.0, 5.0]) and ev["bbox APs"] == ([20], [2.0])  # NaN left out
    path = plot_loss_curve(records, str(tmp_path / "loss_curve.png"))
    assert Image.open(path).size[1] > 7 * 150  # a panel each
    # plain training: no group panel, the total drawn with the detection terms
    plain = [{k: v for k, v in r.items() if not k.startswith(("distill.", "aux.", "metric."))} for r in records if "total" in r]
    titles = [t for t, _, _ in _panels(plain)]
    assert titles == ["detection terms (student.*)", "learning rate"]
    assert [label for label, _, _ in _panels(plain)[0][2]][0] == "total"


def test_config_changes_name_each_key() -> None:
    old = {"train": {"iters": 4, "lr": 0.1}, "distill": {"options": {"alpha": 1.0}}, "output_dir": "a"}
    new = {"train": {"iters": 6, "lr": 0.1}, "distill": {"options": {"alpha": 2.0, "beta": 1.0}}, "output_dir": "b"}
    assert config_changes(old, new, ignore=("output_dir",)) == [
        ("train.iters", 4, 6), ("distill.options.alpha", 1.0, 2.0), ("distill.options.beta", None, 1.0)]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_bar_only_on_a_terminal() -> None:
    assert bar_wanted(True, _Stream(True)) and not bar_wanted(True, _Stream(False)) and not bar_wanted(False, _Stream(True))


def test_log_lines_carry_their_level_and_warnings_stand_out() -> None:
    rec = logging.LogRecord("hmkd.training.trainer", logging.WARNING, __file__, 1, "resume: %s", ("x",), None)
    plain = LevelFormatter(colour=False).format(rec)
    assert " WARNING hmkd.training.trainer: resume: x" in plain and "\033" not in plain
    coloured = LevelFormatter(colour=True).format(rec)
    assert coloured.startswith("\033[33m") and coloured.endswith("\033[0m")
    info = logging.LogRecord("hmkd", logging.INFO, __file__, 1, "step", (), None)
    assert "\033" not in LevelFormatter(colour=True).format(info) and " INFO    hmkd: step" in LevelFormatter().format(info)


def test_the_evaluation_log_names_its_engine_and_says_it_is_exact(caplog) -> None:
    from hmkd.engine.evaluator import coco_metrics

    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
          "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16], "area": 256, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16], "score": 0.9}]
    with caplog.at_level(logging.INFO, logger="hmkd.engine.evaluator"):
        coco_metrics(gt, dets)
        coco_metrics(gt, dets, engine="pycocotools")
    said = [r.getMessage() for r in caplog.records if r.name == "hmkd.engine.evaluator"]
    assert said[0].startswith("bbox: mAP 100.00 ") and said[0].endswith(
        "(1 detections on 1 images; scored by faster-coco-eval's COCOeval, made bit-identical to pycocotools')")
    assert said[1].endswith("(1 detections on 1 images; scored by pycocotools' COCOeval)")
