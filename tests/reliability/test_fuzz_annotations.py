"""Fuzzing the annotation readers: randomly corrupted COCO JSON and VisDrone txt files.

Every case must either load (and then give sane targets for every image, and a COCO evaluation of
its ground truth runs) or raise the project's own
error type (:class:`hmkd.errors.HMKDError`) with a one-line message; never a raw KeyError /
TypeError / ValueError / IndexError / OverflowError, and never a hang (each case runs under an
alarm). Seeded: the same ~200 cases every run.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import traceback
from pathlib import Path

import pytest
import torch

from hmkd.data import CocoDetection, VisDroneDetection, build_transforms, gt_json_for
from hmkd.data.visdrone import parse_visdrone_txt
from hmkd.engine.evaluator import coco_metrics
from hmkd.errors import HMKDError

from reliability_helpers import VISDRONE_ROWS, write_coco, write_visdrone

SEED = 20240607
N_COCO = 120
N_VISDRONE = 90
CASE_SECONDS = 10  # a case taking longer is a hang

# Values of the wrong type or range put where the readers expect something else.
BAD_VALUES = [
    None, "", "abc", "12", "1e3", -1, 0, 1, 2**70, -(2**70), 1.5, -0.5, 1e308, -1e308, float("nan"),
    float("inf"), float("-inf"), True, False, [], {}, [1, 2], [1, 2, 3, 4, 5], ["a", "b", "c", "d"],
    {"a": 1}, [[1, 2]], [None] * 4, [0, 0, float("nan"), 1],
]
BAD_TOKENS = [
    "nan", "inf", "-inf", "1e400", "-1e400", "-1", "abc", "", " ", "0x10", "1_000", "\u0967", "+5", "5.5",
    "1e3", "-0", "9" * 30, "None", "\x00", "١٢",
]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("case took longer than %d s" % CASE_SECONDS)


@pytest.fixture()
def alarm():
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _nodes(x, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _nodes(v, path + (i,))


def _mutate_tree(rng: random.Random, data: dict) -> dict:
    """1-3 structural edits: delete a key / list item, or put a bad value somewhere."""
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        nodes = [(p, v) for p, v in _nodes(data) if p]
        path, _ = rng.choice(nodes)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.random()
        if op < 0.25:
            del parent[key]
        elif op < 0.35 and isinstance(parent, dict):
            parent[rng.choice(["id", "bbox", "extra", "image_id"])] = rng.choice(BAD_VALUES)
        else:
            parent[key] = copy.deepcopy(rng.choice(BAD_VALUES))
    return data


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.random()
    if op < 0.35:
        return bytes(b[: rng.randrange(len(b))])  # truncated
    if op < 0.8:
        for _ in range(rng.randint(1, 6)):  # byte flips
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        return bytes(b)
    i = rng.randrange(len(b))  # inserted garbage
    return bytes(b[:i]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + bytes(b[i:])


def _check_one_line(e: HMKDError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


def _exercise(ds) -> None:
    """Read every item; each either works (sane target) or raises the project's own error."""
    k = ds.num_classes
    for i in range(len(ds)):
        try:
            img, t = ds[i]
        except HMKDError as e:
            _check_one_line(e)
            continue
        h, w = img.shape[-2:]
        b = t["boxes"]
        assert b.dtype == torch.float32 and b.shape[1:] == (4,)
        assert torch.isfinite(b).all()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(t["labels"]) == len(b) and ((t["labels"] >= 1) & (t["labels"] <= k)).all()
        if "masks" in t:
            assert t["masks"].shape == (len(b), h, w)


def _score(ds, iou_types) -> None:
    """COCO evaluation of the loaded ground truth against itself (one detection per annotation)."""
    gt = gt_json_for(ds)
    data = gt if isinstance(gt, dict) else ds.coco.dataset
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in data["annotations"]
    ]
    coco_metrics(gt, dets, ("bbox",))
    if "segm" in iou_types:
        coco_metrics(gt, [], ("segm",))


def _failure(case: int, content: bytes, e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{Path(tb.filename).name}:{tb.lineno}"
    return f"case {case}: {type(e).__name__} at {where}: {' '.join(str(e).split())[:200]} -- input {content[:160]!r}"


def _run_case(fn) -> str:
    signal.alarm(CASE_SECONDS)
    try:
        fn()
        return "loaded"
    except HMKDError as e:
        _check_one_line(e)
        return "error"
    finally:
        signal.alarm(0)


def test_fuzz_coco_json(tmp_path: Path, alarm) -> None:
    rng = random.Random(SEED)
    img_dir, _, base = write_coco(tmp_path)
    raw = json.dumps(base).encode()
    outcomes = {"loaded": 0, "error": 0}
    failures: list[str] = []
    for case in range(N_COCO):
        ann = tmp_path / f"case{case:03d}.json"
        kind = rng.random()
        if kind < 0.3:
            ann.write_bytes(_mutate_bytes(rng, raw))
        else:
            ann.write_text(json.dumps(_mutate_tree(rng, base)))  # NaN/Infinity written as JSON allows
        train, masks = rng.random() < 0.5, rng.random() < 0.5
        tf = build_transforms(train, hflip=True)

        def load():
            ds = CocoDetection(img_dir, ann, train=train, transforms=tf, with_masks=masks)
            _exercise(ds)
            _score(ds, ("bbox", "segm") if masks else ("bbox",))

        try:
            outcomes[_run_case(load)] += 1
        except Exception as e:
            failures.append(_failure(case, ann.read_bytes(), e))
    assert not failures, f"{len(failures)} of {N_COCO} cases leaked a raw exception:\n" + "\n".join(failures[:8])
    # both outcomes occur, so the cases are neither all harmless nor all fatal
    assert outcomes["loaded"] >= 5 and outcomes["error"] >= 5, outcomes


def _mutate_rows(rng: random.Random) -> str:
    rows = [r.split(",") for r in VISDRONE_ROWS]
    for _ in range(rng.randint(1, 3)):
        r = rng.choice(rows)
        op = rng.random()
        if op < 0.5:
            r[rng.randrange(len(r))] = rng.choice(BAD_TOKENS)
        elif op < 0.65:
            del r[rng.randrange(len(r))]
        elif op < 0.8:
            r.insert(rng.randrange(len(r) + 1), rng.choice(BAD_TOKENS + ["1"]))
        else:
            r[rng.randrange(len(r))] = repr(rng.uniform(-1e6, 1e6))
    sep = rng.choice(["\n", "\r\n", "\n\n"])
    return sep.join(",".join(r) + ("," if rng.random() < 0.1 else "") for r in rows) + "\n"


def test_fuzz_visdrone_txt(tmp_path: Path, alarm) -> None:
    rng = random.Random(SEED + 1)
    root = write_visdrone(tmp_path / "vd")
    txt = root / "annotations" / "0000001.txt"
    raw = txt.read_bytes()
    outcomes = {"loaded": 0, "error": 0}
    failures: list[str] = []
    for case in range(N_VISDRONE):
        if rng.random() < 0.35:
            content = _mutate_bytes(rng, raw)
            txt.write_bytes(content)
        else:
            content = _mutate_rows(rng).encode()
            txt.write_bytes(content)
        train = rng.random() < 0.5

        def load():
            parse_visdrone_txt(txt)
            _exercise(VisDroneDetection(root, train=train, transforms=build_transforms(train, hflip=True)))

        try:
            outcomes[_run_case(load)] += 1
        except Exception as e:
            failures.append(_failure(case, content, e))
    assert not failures, f"{len(failures)} of {N_VISDRONE} cases leaked a raw exception:\n" + "\n".join(failures[:8])
    assert outcomes["loaded"] >= 5 and outcomes["error"] >= 5, outcomes


def test_fuzz_visdrone_nonfinite_rows_name_the_line(tmp_path: Path) -> None:
    """Non-finite or non-integral numbers are errors naming file and line, not silently dropped boxes."""
    for row in ("nan,2,10,10,1,4,0,0", "1,inf,10,10,1,4,0,0", "1,2,10,10,1,inf,0,0", "1,2,10,10,1,1e400,0,0",
                "1,2,10,10,1,4.5,0,0", "1,2,10,10,1,-0.5,0,0"):
        root = write_visdrone(tmp_path / "vd", rows=[VISDRONE_ROWS[0], row])
        with pytest.raises(HMKDError, match=r"0000001\.txt:2:") as ei:
            VisDroneDetection(root, train=True)
        _check_one_line(ei.value)
