"""The search from a parameter budget to a ranked list of child shapes.

`search_targets(cfg, n_params)` proposes `Target`s (`prune.target`) whose
`ModelConfig.num_params()` fits a budget, before anything is allocated, so a cascade can be
sized (and its memory estimated) ahead of launch. Each comes as a `Candidate` with its config
and parameter count; `prune.prune` consumes the candidate's `target`.

What the search varies, and why:
- `d_model` and `d_ff` move in multiples of `multiple_of` (64/128: MXU/tensor-core tiles and
  shardable sizes; the parent's own size is always allowed, meaning "not pruned");
- `n_layers` moves by one;
- attention heads stay: Ministral 3 keeps 32 query / 8 KV heads at every size (arXiv
  2601.08584) and Llama-3.1-Minitron-4B-Width keeps its heads too (arXiv 2408.11796). Ask
  `prune.prune` for head targets by hand if you want them.

For each (n_layers, d_model) the largest allowed `d_ff` that fits is taken (the count is linear
in `d_ff`), so every candidate is as close to the budget as its grid allows.

Ranking (best first):
1. candidates within `tolerance` of the budget (`budget·(1 - tolerance) ≤ n_params ≤ budget`)
   come before the rest; outside it, the closer the better;
2. fewer dimensions changed (each changed dimension is another axis of damage for distillation
   to repair; Ministral 3's 24B → 14B step cut only the FFN, 32768 → 16384);
3. less depth pruned (width pruning retrains better than depth pruning at equal size: Minitron
   reports validation LM loss 2.049 width-only vs 2.155 depth-only after the same KD tokens);
4. the smaller largest relative cut across dimensions (spread the cut rather than gut one axis);
5. closeness to the budget.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

from cascade_jax.config import ModelConfig
from cascade_jax.prune.target import PRUNABLE, Target


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One proposed child: its target, config, parameter count and how it was ranked."""

    target: Target
    child_cfg: ModelConfig
    n_params: int
    budget_fraction: float       # n_params / budget
    changed: tuple[str, ...]     # dimensions the target shrinks

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict(), "child_config": self.child_cfg.to_dict(),
                "n_params": self.n_params, "budget_fraction": self.budget_fraction,
                "changed": list(self.changed)}


def allowed_sizes(parent: int, multiple_of: int) -> list[int]:
    """Sizes a pruned dimension may take: positive multiples of `multiple_of` below `parent`,
    plus `parent` itself (unpruned), ascending."""
    return [*range(multiple_of, parent, multiple_of), parent]


def _largest_d_ff(cfg: ModelConfig, budget: int, sizes_F: list[int]) -> int | None:
    """The largest size in `sizes_F` whose model fits `budget`, or None.

    `num_params` is affine in d_ff, so its slope and offset are read off two evaluations
    rather than re-deriving the parameter formula here.
    """
    p1 = cfg.replace(d_ff=1).num_params()
    slope = cfg.replace(d_ff=2).num_params() - p1
    f_max = (budget - (p1 - slope)) // slope
    i = bisect.bisect_right(sizes_F, f_max)
    return sizes_F[i - 1] if i else None


def _rank_key(cand: Candidate, parent: ModelConfig, budget: int, tolerance: float
              ) -> tuple[Any, ...]:
    gap = (budget - cand.n_params) / budget
    outside = gap > tolerance
    child = cand.child_cfg
    max_cut = max(1 - getattr(child, name) / getattr(parent, name) for name in PRUNABLE)
    return (outside, gap if outside else 0.0, len(cand.changed),
            parent.n_layers - child.n_layers, max_cut, gap)


def search_targets(cfg: ModelConfig, n_params: int, *, multiple_of: int = 64,
                   max_candidates: int = 10, prune_depth: bool = True,
                   prune_width: bool = True, tolerance: float = 0.02) -> list[Candidate]:
    """Child shapes with at most `n_params` parameters, best first (see the module docstring).

    Every candidate has `num_params() <= n_params`; `d_model` and `d_ff` are multiples of
    `multiple_of` unless left at the parent's value. `prune_depth` / `prune_width` switch the
    layer and the (d_model, d_ff) searches on or off.
    """
    parent_params = cfg.num_params()
    if not isinstance(n_params, int) or n_params < 1:
        raise ValueError(f"n_params={n_params!r} must be a positive integer parameter count")
    if n_params >= parent_params:
        raise ValueError(f"n_params={n_params:,} is not below the parent's {parent_params:,}; "
                         "nothing to prune. Ask for a smaller budget.")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of} must be >= 1 (64 or 128 suit accelerators)")
    if not prune_depth and not prune_width:
        raise ValueError("prune_depth and prune_width are both False: nothing may change; "
                         "enable at least one")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in [0, 1) (a fraction of the budget)")
    layers = range(1, cfg.n_layers + 1) if prune_depth else [cfg.n_layers]
    sizes_D = allowed_sizes(cfg.d_model, multiple_of) if prune_width else [cfg.d_model]
    sizes_F = allowed_sizes(cfg.d_ff, multiple_of) if prune_width else [cfg.d_ff]

    candidates = []
    for n in layers:
        for d in sizes_D:
            shape = cfg.replace(n_layers=n, d_model=d)
            f = _largest_d_ff(shape, n_params, sizes_F)
            if f is None:
                continue
            child = shape.replace(d_ff=f)
            target = Target(**{name: getattr(child, name)
                               for name in ("n_layers", "d_model", "d_ff")
                               if getattr(child, name) != getattr(cfg, name)})
            count = child.num_params()
            candidates.append(Candidate(target, child, count, count / n_params,
                                        target.changed(cfg)))
    if not candidates:
        smallest = cfg.replace(n_layers=min(layers), d_model=min(sizes_D), d_ff=min(sizes_F))
        raise ValueError(f"no child fits n_params={n_params:,}: the smallest shape on this grid "
                         f"({smallest.n_layers} layers, d_model={smallest.d_model}, "
                         f"d_ff={smallest.d_ff}) has {smallest.num_params():,}. Raise the "
                         "budget, lower multiple_of, or enable prune_depth/prune_width.")
    candidates.sort(key=lambda c: _rank_key(c, cfg, n_params, tolerance))
    return candidates[:max_candidates]
