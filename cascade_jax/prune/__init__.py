"""Pruning: importance scores → surgery → a smaller child config and params.

    scores = prune.estimate_importance(cfg, params, calib_batches)
    out = prune.prune(cfg, params, scores, prune.Target(n_layers=30, d_ff=14336))
    out.cfg, out.params, out.record          # out.opt_state when opt_state= was given
    prune.plan(cfg, n_params=8_000_000_000)  # ranked targets that fit a parameter budget
    prune.child_config(cfg, target)          # the child's config, checked, before any work
"""

from cascade_jax.prune.importance import Importance, estimate_importance
from cascade_jax.prune.plan import Candidate, Target, plan
from cascade_jax.prune.surgery import (
    Pruned,
    PruneRecord,
    Take,
    child_config,
    keep_channels,
    keep_kv_groups,
    keep_layers,
    keep_neurons,
    keep_query_heads,
    layout,
    pca_rotation,
    prune,
    rotate_hidden,
    select_layers,
    take,
    top_k,
)

# importance.py saves and loads through `Importance.save(path)` / `Importance.load(path, cfg)`.
save_importance = Importance.save
load_importance = Importance.load

__all__ = [
    "Candidate",
    "Importance",
    "PruneRecord",
    "Pruned",
    "Take",
    "Target",
    "child_config",
    "estimate_importance",
    "keep_channels",
    "keep_kv_groups",
    "keep_layers",
    "keep_neurons",
    "keep_query_heads",
    "layout",
    "load_importance",
    "pca_rotation",
    "plan",
    "prune",
    "rotate_hidden",
    "save_importance",
    "select_layers",
    "take",
    "top_k",
]
