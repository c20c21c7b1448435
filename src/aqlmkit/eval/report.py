"""``save_report``: every benchmark/eval writes the same pair, stem.json (+ stem.png), atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from aqlmkit.utils import atomic_path, atomic_save_json

PlotSpec = Union[dict, Callable]


def _draw(fig, plot: PlotSpec) -> None:
    """``plot`` is a callable ``f(fig)`` or a dict: x, series {label: ys}, xlabel, ylabel, title,
    logx/logy, kind ("line" or "bar")."""
    if callable(plot):
        plot(fig)
        return
    ax = fig.add_subplot(1, 1, 1)
    series = plot.get("series", {})
    x = plot.get("x")
    if plot.get("kind") == "bar":
        labels = list(series)
        ax.bar(labels, [series[k] for k in labels])
    else:
        for label, ys in series.items():
            ax.plot(x if x is not None else range(len(ys)), ys, marker="o", label=label)
        if len(series) > 1:
            ax.legend()
    ax.set_xlabel(plot.get("xlabel", ""))
    ax.set_ylabel(plot.get("ylabel", ""))
    ax.set_title(plot.get("title", ""))
    if plot.get("logx"):
        ax.set_xscale("log")
    if plot.get("logy"):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def save_report(stem: str | Path, data: dict, plot: PlotSpec | None = None) -> list[Path]:
    """Write ``stem.json`` (and ``stem.png`` when ``plot`` is given); returns the paths written."""
    stem = Path(stem)
    if stem.suffix in {".json", ".png"}:
        stem = stem.with_suffix("")
    json_path = stem.parent / f"{stem.name}.json"
    atomic_save_json(json_path, data)
    written = [json_path]
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(7, 4.5))
        try:
            _draw(fig, plot)
            fig.tight_layout()
            png = stem.parent / f"{stem.name}.png"
            with atomic_path(png) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
            written.append(png)
        finally:
            plt.close(fig)
    return written
