"""hmkd.bench.parts: time inside named profiler ranges, per step, from torch.profiler."""

from __future__ import annotations

import time

import pytest
import torch
from torch.profiler import record_function

from hmkd.bench.parts import part_ranges, profile_parts, timed_range


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_profile_parts_sums_ranges_per_step_and_counts_nested_ones_once():
    calls = []

    def step() -> None:
        calls.append(1)
        with timed_range("distill_forward"):
            with record_function("hmkd.masks"):
                _busy(0.004)
            for _ in range(2):  # a part entered twice per step, with another part inside it
                with record_function("hmkd.others"):
                    _busy(0.006)
                    with record_function("hmkd.masks"):
                        _busy(0.002)
            _busy(0.005)  # in distill_losses, outside every part
        _busy(0.003)  # the rest of the step

    ranges = {"masks": "hmkd.masks", "others": "hmkd.others", "gcblock_bg": "hmkd.gcblock_bg"}
    res = profile_parts(step, ranges, 3, torch.device("cpu"))
    assert len(calls) == 3
    parts, prof = res["parts"], res["profile"]
    assert set(parts) == set(ranges)
    assert parts["masks"]["calls"] == 3 and parts["others"]["calls"] == 2 and parts["gcblock_bg"]["calls"] == 0
    assert parts["gcblock_bg"]["forward_s"] == 0
    # lower bounds only: the busy waits last at least this long, a loaded machine makes them longer
    assert parts["masks"]["forward_s"] >= 0.008 and parts["others"]["forward_s"] >= 0.016
    assert prof["steps"] == 3 and prof["step_s"] >= 0.028
    assert prof["distill_forward_s"] <= prof["step_s"]
    assert parts["others"]["share"] == pytest.approx(parts["others"]["forward_s"] / prof["step_s"])

    # one step: the medians are that step's own numbers, so the sums can be checked exactly
    one = profile_parts(step, ranges, 1, torch.device("cpu"))
    p1, s1 = one["parts"], one["profile"]
    nested = p1["masks"]["forward_s"] + p1["others"]["forward_s"] - s1["parts_s"]  # masks inside others, 2 x 2 ms
    assert 0.004 <= nested < p1["masks"]["forward_s"]
    assert s1["unattributed_s"] == pytest.approx(s1["distill_forward_s"] - s1["parts_s"])
    assert s1["unattributed_s"] >= 0.005

def test_part_ranges_of_the_marked_methods():
    from hmkd.distill.hmkd import PROFILE_PARTS

    hm = part_ranges("hmkd")
    assert hm is not None and set(hm.values()) == {f"hmkd.{p}" if not p.startswith("hmkd.") else p for p in PROFILE_PARTS}
    assert "masks" in hm and hm["masks"] == "hmkd.masks"
    icd = part_ranges("icd")
    assert icd is not None and all(r.startswith("icd.") and not k.startswith("icd.") for k, r in icd.items())
    assert part_ranges("fitnet") is None and part_ranges("none") is None
