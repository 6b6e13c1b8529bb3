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


# ---------------------------------------------------------------- chapter figures

def plot_gridworld(env, V, policy=None, ax=None, title: str | None = None):
    """Chapter 01: a heatmap of V over the grid with the policy as arrows (walls blank, G/H labelled)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(1 + 0.7 * env.shape[1], 0.7 * env.shape[0]))
    grid = env.to_grid(V)
    im = ax.imshow(grid, cmap="viridis")
    plt.colorbar(im, ax=ax, fraction=0.046)
    d = {0: (0, -0.3), 1: (0.3, 0), 2: (0, 0.3), 3: (-0.3, 0)}
    for s, (i, j) in enumerate(env.cells):
        kind = env.layout[i][j]
        if kind in "GH":
            ax.text(j, i, kind, ha="center", va="center", color="white", fontsize=12, weight="bold")
        elif policy is not None:
            dx, dy = d[int(policy[s])]
            ax.arrow(j - dx / 2, i - dy / 2, dx, dy, head_width=0.18, head_length=0.12, color="white")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def plot_clipped_surrogate(epsilon: float = 0.2, ax=None):
    """The per-sample PPO objective min(r A, clip(r) A) as a function of the ratio r, for A > 0 and A < 0."""
    import torch

    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(9, 3.2), sharey=False)
    r = torch.linspace(0.0, 2.0, 401)
    for a, A in zip(ax, (1.0, -1.0)):
        adv = torch.full_like(r, A)
        obj = torch.min(r * adv, torch.clamp(r, 1 - epsilon, 1 + epsilon) * adv)
        a.plot(r, r * A, "--", color="gray", label="r A (unclipped)")
        a.plot(r, obj, lw=2.5, label="min(r A, clip(r) A)")
        a.axvspan(1 - epsilon, 1 + epsilon, color="C2", alpha=0.12, label=f"[1-ε, 1+ε], ε={epsilon}")
        a.axvline(1.0, color="k", lw=0.5)
        a.set_xlabel("ratio r = pi_new / pi_old")
        a.set_title(f"advantage A = {A:+.0f}")
    ax[0].set_ylabel("per-sample objective")
    ax[0].legend(fontsize=8)
    return ax


def plot_ppo_history(hist, axes=None):
    """Chapter 03: the learning curve and the four diagnostics of each PPO update (a ``ppo.PPOHistory``),
    against env steps."""
    if axes is None:
        _, axes = plt.subplots(1, 5, figsize=(17, 3))
    panels = [("episode_return", "episode return"), ("approx_kl", "approx KL"), ("clip_fraction", "clip fraction"),
              ("explained_variance", "explained variance"), ("entropy", "entropy")]
    for ax, (key, title) in zip(axes, panels):
        ax.plot(hist.step, getattr(hist, key))
        ax.set_title(title)
        ax.set_xlabel("env steps")
    plt.tight_layout()
    return axes
