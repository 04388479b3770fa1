"""The ``peak_mem_mb`` a run logs on CPU is its own process's peak, not its parent's.

Linux carries a parent's peak RSS into ``ru_maxrss`` of a child it starts, so a benchmark holding
1.4 GB once logged 1388 MB for every child run, whatever that run used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hmkd.engine.logging_utils import peak_memory_mb
from hmkd.utils import proc_status_kb

GiB = 2**30
pytestmark = pytest.mark.skipif(proc_status_kb("VmRSS") is None, reason="needs /proc/self/status (Linux)")


def test_a_child_run_logs_its_own_peak_not_its_parents() -> None:
    ballast = bytearray(GiB)
    ballast[:: 4096] = b"\x01" * len(range(0, GiB, 4096))  # touch every page: resident, not just reserved
    parent_mb = proc_status_kb("VmRSS") / 1024
    assert parent_mb > 1024
    code = ("import torch; from hmkd.engine.logging_utils import peak_memory_mb; "
            "print(peak_memory_mb(torch.device('cpu')))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    child_mb = float(out.stdout.strip())
    del ballast
    assert 0 < child_mb < parent_mb - 700, (child_mb, parent_mb)  # the child (torch imported) is well under 1 GiB


def test_in_process_the_peak_covers_what_is_resident_now() -> None:
    now_mb = proc_status_kb("VmRSS") / 1024
    assert peak_memory_mb(torch.device("cpu")) >= now_mb > 0
