"""Notebook-ready matplotlib figures (matplotlib is a dependency of cascade_jax; it is imported
here only when a figure is made). Given axes, a function draws into them and never touches
pyplot or the backend; without axes it makes a new figure with pyplot, as a notebook expects."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cascade_jax.prune.importance import Importance


def plot_layer_importance(importance: Importance, ax: Axes | None = None) -> Figure:
    """Per-layer block influence (left axis) and norm ratio (right axis) on twin axes.

    Block influence 1 - cos(x_in, x_out) (ShortGPT / Minitron) is ≈ 0 for a layer that barely
    changes the residual stream; the Ministral 3 norm ratio ||x_out|| / ||x_in|| is ≈ 1 there.
    The two axes keep both readable, since their scales differ by orders of magnitude. Pass
    `ax` to draw into an existing figure; returns the figure either way.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    else:
        fig = ax.figure
    influence = np.asarray(importance.layer_block_influence, np.float64)
    ratio = np.asarray(importance.layer_norm_ratio, np.float64)
    layers = np.arange(influence.shape[0])
    influence_color, ratio_color = "tab:blue", "tab:orange"
    ax.plot(layers, influence, "o-", color=influence_color, label="block influence")
    ax.set_xlabel("layer")
    ax.set_ylabel("block influence  1 − cos(x_in, x_out)", color=influence_color)
    ax.tick_params(axis="y", labelcolor=influence_color)
    ax.set_xticks(layers)
    twin = ax.twinx()
    twin.plot(layers, ratio, "s--", color=ratio_color, label="norm ratio")
    twin.set_ylabel("norm ratio  ‖x_out‖ / ‖x_in‖", color=ratio_color)
    twin.tick_params(axis="y", labelcolor=ratio_color)
    tokens = float(np.asarray(importance.n_tokens))
    method = importance.method.get("aggregation")
    ax.set_title(f"layer importance ({tokens:,.0f} tokens"
                 + (f", aggregation {method}" if method else "") + ")")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    return fig


def plot_task_accuracy(results: list[dict], ax: Axes | None = None) -> Figure:
    """Task accuracy by generation per stage (greedy pass@1 on held-out problems, and on the
    harder split where there is one), one group of bars per stage, baselines hatched."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 3.8), layout="constrained")
    else:
        fig = ax.figure
    series = [name for name in ("pass@1", "pass@1_harder") if any(name in r for r in results)]
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(results))
    for i, name in enumerate(series):
        values = [r.get(name, np.nan) for r in results]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width,
                      label="held-out" if name == "pass@1" else "harder")
        for bar, r in zip(bars, results, strict=True):
            if r.get("baseline"):
                bar.set_hatch("//")
    ax.set_xticks(x, [r["stage"] for r in results], rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="greedy pass@1", ylim=(0, 1), title="task accuracy by generation "
           "(hatched: baselines)")
    ax.legend(fontsize="small")
    return fig
