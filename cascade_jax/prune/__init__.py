"""Pruning: importance scores → surgery → a smaller child config and params.

    from cascade_jax import prune
    scores = prune.estimate_importance(cfg, params, calib_batches)   # Importance; .save/.load
    target = prune.Target(n_layers=30, d_ff=14336)
    prune.child_config(cfg, target)           # the child's config, checked, before any work
    out = prune.prune(cfg, params, scores, target)    # Pruned
    out.cfg, out.params, out.record           # out.opt_state when opt_state= was given
    prune.search_targets(cfg, n_params=8_000_000_000)  # ranked Candidates within a budget
    prune.surgery.keep_layers(cfg, params, [0, 1, 3])  # the primitives, one edit at a time

Modules: `importance` (scores), `target` (`Target`), `budget` (`search_targets`), `surgery`
(`prune`, `child_config` and the checked edits: keep_layers, keep_neurons, keep_query_heads,
keep_kv_groups, keep_channels, rotate_hidden, pca_rotation, take / Take on
`paths.flatten(params)` with `layout(cfg)`, top_k, select_layers, hidden_map: the residual
basis change, also `PruneRecord.hidden_map()`, that `hf.save(vision_from=...)` maps a
vision projector with).
"""

from cascade_jax.prune import surgery
from cascade_jax.prune.budget import Candidate, search_targets
from cascade_jax.prune.importance import Importance, estimate_importance
from cascade_jax.prune.surgery import Pruned, PruneRecord, child_config, prune
from cascade_jax.prune.target import Target

__all__ = [
    "Candidate",
    "Importance",
    "PruneRecord",
    "Pruned",
    "Target",
    "child_config",
    "estimate_importance",
    "prune",
    "search_targets",
    "surgery",
]
