"""Small helpers every part of hmkd uses: atomic file writes, JSON-safe values, machine facts, the
cache folder, and a block that leaves the global random streams as it found them.

Atomic writes: everything hmkd writes (checkpoints, configs, metrics, tables, figures) goes to a
temporary file in the destination's folder (``.NAME.XXXX.tmp``) that is moved over the destination
with ``os.replace`` only once it is complete, so a reader never sees a half-written file and a
killed process leaves the previous file as it was. The finished file gets the mode an ordinary
``open()`` would give it (``0o666`` less the umask), not the private ``0o600`` of a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

__all__ = [
    "atomic_open", "cache_root", "preserved_random_state", "write_text", "write_json", "save_figure", "json_safe",
    "machine_info", "proc_status_kb",
]

_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_root() -> str:
    """hmkd's cache folder (fitted decoders, pretrained stand-ins): ``$HMKD_CACHE``, default ``~/.cache/hmkd``."""
    return os.environ.get("HMKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hmkd")


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the block and put Python's, NumPy's and torch's global random states back as they were.

    For work a run does only when a cache is cold (the pretrained stand-in, a fitted decoder): the
    random streams the run goes on with are then the same whether the cache held the result or the
    work was done now. torch's CUDA generators are restored when CUDA was initialised on entry (a
    generator not initialised then is seeded later, by the run's own seeding, before it is used).
    """
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = False, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched. ``durable=True``
    also flushes and fsyncs the file (and its folder) so that the new content survives a power
    cut (checkpoints). Missing parent folders are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats as ``None``, NumPy scalars as Python numbers, mapping keys as
    strings and tuples as lists: what strict JSON (``allow_nan=False``) accepts."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and hasattr(x, "dtype") and getattr(x, "ndim", 1) == 0:  # NumPy / torch scalar
        return json_safe(x.item())
    return x


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, **dump_kwargs: Any) -> str:
    """Write ``json_safe(data)`` to ``path`` atomically (strict JSON: NaN becomes ``null``);
    ``dump_kwargs`` go to :func:`json.dump` (e.g. ``separators``, ``sort_keys``)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=indent, allow_nan=False, **dump_kwargs)
    return os.fspath(path)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``fig.savefig`` to ``path`` atomically; the format comes from the file's extension."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)
    return os.fspath(path)


def _cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: a
    virtual machine's name is often just "AMD EPYC", the same for CPU generations of very
    different speed."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def proc_status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...); None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_info(device: Any = None) -> dict[str, Any]:
    """Facts about this machine a benchmark result must carry: CPU, cores, threads, versions, GPU."""
    import torch
    import torchvision

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.cuda.is_available(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
