"""The benchmark's figure: APs and mAP per row (mean, with the seeds' standard deviation)."""

from __future__ import annotations

from typing import Any

from hmkd.utils import save_figure

__all__ = ["plot_results"]


def plot_results(rows: dict[str, dict[str, Any]], teacher: dict[str, Any] | None, path: str, title: str) -> str:
    """Bars of APs and mAP per row of :func:`~hmkd.bench.accuracy.summary.summarise` (the teacher
    first when given), written to ``path`` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, aps, aps_err, maps, maps_err = [], [], [], [], []
    if teacher is not None:
        tm = teacher.get("metrics") or {}
        names.append("teacher")
        aps.append(tm.get("APs") or 0.0)
        maps.append(tm.get("mAP") or 0.0)
        aps_err.append(0.0)
        maps_err.append(0.0)
    for r in rows.values():
        names.append(r["label"].replace(", ", "\n"))
        aps.append(r["mean"].get("APs") or 0.0)
        maps.append(r["mean"].get("mAP") or 0.0)
        aps_err.append(r["std"].get("APs") or 0.0)
        maps_err.append(r["std"].get("mAP") or 0.0)
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) + 1.5), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    x = list(range(len(names)))
    w = 0.38
    ax.bar([i - w / 2 for i in x], aps, w, yerr=aps_err, capsize=3, label="APs", color="#2a9d8f")
    ax.bar([i + w / 2 for i in x], maps, w, yerr=maps_err, capsize=3, label="mAP", color="#e9c46a")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("AP (%)")
    top = max([a + e for a, e in zip(aps + maps, aps_err + maps_err)] + [1.0])
    ax.set_ylim(0.0, top * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
