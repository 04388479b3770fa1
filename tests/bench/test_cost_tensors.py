"""hmkd.bench.parts: the biggest tensors of a step (issue 29), recorded in the FLOP-counted step; on the
tiny cost bench: tests/bench/test_cost.py."""

from __future__ import annotations

import torch
from torch import nn

from hmkd.bench.parts import count_step_flops

KEYS = {"mb", "shape", "dtype", "op", "module", "range", "owner", "phase", "saved_for_backward"}


class _Toy(nn.Module):
    """A distiller-shaped toy: a ``student`` and a method's own head."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(4, 64)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.student(x)
        h.relu_()  # in place: not a new tensor
        wide = h[:, :1].expand(32, 4096)  # a view (512 KB as shaped): not a new tensor
        flat = h.view(64, 32)  # a view
        big = torch.ones(32, 128)  # new, needs no gradient: not saved
        return self.head(h).sum() + 0 * (wide.sum() + flat.sum() + big.sum())


def test_views_and_in_place_results_are_not_new_and_saved_is_read_from_the_graph():
    toy, x = _Toy(), torch.randn(32, 4)

    def step(clock):
        loss = toy(x)
        clock("forward")
        loss.backward()
        clock("backward")
        clock("optimizer")

    out = count_step_flops(step, toy, biggest=40)
    rows = out["biggest_tensors"]
    assert rows and all(set(r) == KEYS for r in rows)
    assert [r["mb"] for r in rows] == sorted((r["mb"] for r in rows), reverse=True)
    shapes = [r["shape"] for r in rows]
    assert [32, 4096] not in shapes and [64, 32] not in shapes  # views are not new tensors
    ones = next(r for r in rows if r["op"] == "aten.ones")
    assert ones == {"mb": 32 * 128 * 4 / 2**20, "shape": [32, 128], "dtype": "float32", "op": "aten.ones",
                    "module": "_Toy", "range": None, "owner": "method", "phase": "forward",
                    "saved_for_backward": False}
    # the student's output, made once (relu_ made no new one), saved for the backward (relu_'s result,
    # the head's input)
    (hidden,) = [r for r in rows if r["phase"] == "forward" and r["shape"] == [32, 64]]
    assert hidden["op"] == "aten.addmm" and hidden["module"] == "student" and hidden["owner"] == "student"
    assert hidden["saved_for_backward"] is True
    assert all(r["saved_for_backward"] is None for r in rows if r["phase"] != "forward")
    assert any(r["phase"] == "backward" and r["module"] == "student" for r in rows)  # by autograd node
    assert all(r["owner"] == "method" for r in out["biggest_method_tensors"])
    assert ones in out["biggest_method_tensors"]
    # n keeps the n biggest, biggest first; of equal ones the earlier
    top2 = count_step_flops(step, toy, biggest=2)["biggest_tensors"]
    assert top2 == rows[:2]
    assert "biggest_tensors" not in count_step_flops(step, toy)
