"""hmkd.bench.evalspeed: hmkd's COCO numbers against pycocotools' on a small synthetic set."""

from __future__ import annotations

import json

import copy

import numpy as np
import pytest

from hmkd.bench.evalspeed import make_synthetic_coco, pycocotools_eval, run_evalspeed
from hmkd.engine.evaluator import make_eval, match_pycocotools_precision, quiet


def test_synthetic_coco_is_deterministic_and_mixed():
    gt, dets = make_synthetic_coco(20, 10, seed=3)
    gt2, dets2 = make_synthetic_coco(20, 10, seed=3)
    assert gt == gt2 and dets == dets2
    assert len(gt["images"]) == 20 and len(dets) == 200
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2  # small and large objects
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2, 3}


def test_evalspeed_50_images_identical_numbers(tmp_path):
    res = run_evalspeed(str(tmp_path), n_images=50, dets_per_image=20, seed=0)
    v = res["variants"]
    assert list(v)[0] == "pycocotools"
    assert v["hmkd"]["vs_pycocotools"]["identical"], v["hmkd"]["vs_pycocotools"]
    # hmkd reports percent: pycocotools' stats x 100, exactly
    assert v["hmkd"]["stats_percent"] == [x * 100.0 if x >= 0 else None for x in v["pycocotools"]["stats"]]
    for name, r in v.items():
        assert r["seconds"] > 0 and r["speedup"] > 0, name
        assert len(r["stats"]) == 12
        # every engine agrees with pycocotools far below any printed digit
        if name != "pycocotools":
            assert r["vs_pycocotools"]["max_abs_diff"] < 1e-9, name
    data = json.loads((tmp_path / "evalspeed.json").read_text())
    assert data["n_images"] == 50 and data["n_detections"] == 1000
    assert "| variant | seconds |" in (tmp_path / "evalspeed.md").read_text()
    assert res["target"]["identical"] is True
    assert v["pycocotools_gc_paused"]["vs_pycocotools"]["identical"]
    assert v["pycocotools_gc_paused"]["vs_pycocotools"]["precision_identical"]


@pytest.mark.parametrize("n_images,dets,seed", [(10, 1, 4), (20, 3, 2), (40, 30, 5)])
def test_faster_engine_precision_repair_is_bit_identical(n_images, dets, seed):
    """Few objects per class: many curves start with a lone true positive, where faster-coco-eval's
    1.0 differs from pycocotools' 1 - 2^-52; the evaluator's repair must fix exactly those."""
    gt, d = make_synthetic_coco(n_images, dets, seed)
    ref = pycocotools_eval(copy.deepcopy(gt), copy.deepcopy(d))
    g = copy.deepcopy(gt)
    ev = make_eval("faster", g, copy.deepcopy(d), "bbox")
    with quiet():
        ev.evaluate()
        ev.accumulate()
        assert not np.array_equal(ref["precision"], np.asarray(ev.eval["precision"]))  # the bug is there
        n_fixed = match_pycocotools_precision(ev, g)
        ev.summarize()
    assert n_fixed > 0
    assert np.array_equal(ref["precision"], np.asarray(ev.eval["precision"]))
    assert np.array_equal(ref["recall"], np.asarray(ev.eval["recall"]))
    assert [float(x) for x in ev.stats[:12]] == ref["stats"]


def test_evalspeed_cli_writes_results_and_rejects_bad_counts(tmp_path, capsys):
    from hmkd.cli import main

    assert main(["bench", "evalspeed", "--images", "20", "--dets", "10", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert "pycocotools" in capsys.readouterr().out
    data = json.loads((tmp_path / "evalspeed.json").read_text())
    assert data["variants"]["hmkd"]["vs_pycocotools"]["identical"]
    assert main(["bench", "evalspeed", "--images", "0", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "--images" in err and len(err.strip().splitlines()) == 1
