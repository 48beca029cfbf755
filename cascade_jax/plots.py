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
