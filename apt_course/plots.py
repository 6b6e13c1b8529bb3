"""Plots and tables the notebooks share."""

from __future__ import annotations

import matplotlib.pyplot as plt


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(histories: dict[str, dict], key: str = "loss", x: str = "step", title: str | None = None,
                ax=None, window: int = 1, logy: bool = False):
    """One line per run: ``histories = {"run name": {"step": [...], "loss": [...]}}``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, h in histories.items():
        if key not in h:
            raise KeyError(f"history {name!r} has no {key!r}; it has {sorted(h)}")
        ys = smooth(h[key], window) if window > 1 else h[key]
        ax.plot(h.get(x, range(len(ys))), ys, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(histories) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return ax


def before_after(before: dict[str, float], after: dict[str, float], names=("before", "after")):
    """A table with a row per metric: its value before, after, and the change."""
    import pandas as pd

    rows = []
    for metric in before:
        if metric not in after:
            raise KeyError(f"metric {metric!r} is in 'before' but not in 'after'")
        rows.append({"metric": metric, names[0]: before[metric], names[1]: after[metric],
                     "change": after[metric] - before[metric]})
    return pd.DataFrame(rows).set_index("metric").round(4)
