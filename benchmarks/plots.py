"""One PNG per scenario (matplotlib, Agg): delivered msgs/s and latency (p50, p99) per system
(``plot``), or a row of bar panels for scenarios measured in other units (``bars``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, progress


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("  no plot (matplotlib is not installed: pip install matplotlib)")
        return None
    return plt


def _save(fig: Any, scenario: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{scenario}.png"
    fig.savefig(path, dpi=90)
    progress(f"  wrote results/{path.name}")
    return path


def bars(scenario: str, panels: list[tuple[str, str, list[tuple[str, float]]]], title: str) -> Path | None:
    """``panels``: (panel title, axis label, [(bar label, value)]); writes results/<scenario>.png."""
    panels = [p for p in panels if p[2]]
    plt = _pyplot()
    if plt is None or not panels:
        return None
    tallest = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, max(3.0, 0.45 * tallest + 1.8)), squeeze=False)
    for ax, (panel_title, axis_label, items) in zip(axes[0], panels, strict=True):
        y = list(range(len(items)))
        values = [v for _, v in items]
        ax.barh(y, values, color="#4477aa")
        ax.set_yticks(y, [label for label, _ in items], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(axis_label)
        ax.set_title(panel_title)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.3g}" if v < 100 else f" {v:,.0f}", va="center", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = _save(fig, scenario)
    plt.close(fig)
    return path


def plot(scenario: str, rows: list[dict[str, Any]], title: str, latency_label: str = "latency µs",
         rate_label: str = "delivered msgs/s") -> Path | None:
    """``rows``: {"label", "msgs_per_s", "p50_us", "p99_us"}; writes results/<scenario>.png."""
    rows = [r for r in rows if r.get("msgs_per_s") or r.get("p50_us")]
    plt = _pyplot() if rows else None
    if plt is None:
        return None
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9, 0.75 * len(rows) + 5), 4.8))
    y = range(len(rows))
    ax1.barh(list(y), [r.get("msgs_per_s") or 0 for r in rows], color="#4477aa")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(rate_label)
    ax1.set_title("throughput (saturated)")
    for i, r in enumerate(rows):
        if r.get("msgs_per_s"):
            ax1.text(r["msgs_per_s"], i, f" {r['msgs_per_s']:,.0f}", va="center", fontsize=7)
    h = 0.4
    p50 = [r.get("p50_us") or 0 for r in rows]
    p99 = [r.get("p99_us") or 0 for r in rows]
    ax2.barh([i - h / 2 for i in y], p50, height=h, label="p50", color="#228833")
    ax2.barh([i + h / 2 for i in y], p99, height=h, label="p99", color="#ee6677")
    ax2.set_yticks(list(y), labels, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel(latency_label)
    ax2.set_xscale("log")
    ax2.set_title("latency (paced)")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = _save(fig, scenario)
    plt.close(fig)
    return path
