"""Peak memory of a block of code above what the process held just before it.

On CUDA: ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus the bytes
allocated before. On CPU: the process's resident-set high-water mark (``VmHWM`` of
``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``; a thread sampling
``VmRSS`` every 2 ms where that is not allowed) minus the RSS before, measured after
``gc.collect()`` and glibc ``malloc_trim(0)`` so that memory freed earlier is given back first.
``tracemalloc`` / ``ru_maxrss`` would miss torch's allocations or could not be reset.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any

import torch

from hmkd.utils import proc_status_kb

__all__ = ["PeakMemory"]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory above the current level while the ``with`` block runs (see the module doc):
    ``peak_bytes`` and ``method`` (how it was measured) once the block has exited."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.peak_bytes = 0
        self.base_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
            return self
        rss = proc_status_kb("VmRSS")
        self.base_bytes = (rss or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM)
            self.method = "process VmHWM (reset via /proc/self/clear_refs) - VmRSS before"
        except OSError:
            self.method = "process VmRSS sampled every 2 ms (max) - VmRSS before"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, (proc_status_kb("VmRSS") or 0) * 1024)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = (proc_status_kb("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self.base_bytes)
