"""Pruning targets, and the search from a parameter budget to a ranked list of child shapes.

`Target` says which dimensions a child keeps (None = the parent's); `prune.prune` consumes it.
`plan(cfg, n_params)` proposes targets whose `ModelConfig.num_params()` fits a budget, before
anything is allocated, so a cascade can be sized (and its memory estimated) ahead of launch.

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

PRUNABLE = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads")


@dataclasses.dataclass(frozen=True)
class Target:
    """The dimensions a pruned child keeps; None keeps the parent's value."""

    n_layers: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    # True ties the child's output head to its input embedding (Ministral 3's 3B is tied,
    # its 8B parent is not); False unties it. None: as the parent, except that a PCA cut of
    # d_model unties (see `prune.surgery`).
    tie_embeddings: bool | None = None

    def to_dict(self) -> dict[str, int | bool | None]:
        return dataclasses.asdict(self)

    def child_tie(self, cfg: ModelConfig, rotates_hidden: bool = False) -> bool:
        """Whether the child's embeddings are tied (see `tie_embeddings`)."""
        if self.tie_embeddings is not None:
            return self.tie_embeddings
        return cfg.tie_embeddings and not rotates_hidden

    def child_config(self, cfg: ModelConfig, rotates_hidden: bool = False) -> ModelConfig:
        """The child's config, before any params exist (sizing, planning, random init)."""
        return cfg.replace(**self.resolve(cfg), tie_embeddings=self.child_tie(cfg, rotates_hidden))

    def resolve(self, cfg: ModelConfig) -> dict[str, int]:
        """Every prunable dimension, with None replaced by `cfg`'s value."""
        return {name: getattr(cfg, name) if getattr(self, name) is None else getattr(self, name)
                for name in PRUNABLE}

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError unless every set dimension is a positive int no larger than `cfg`'s."""
        if self.tie_embeddings not in (None, True, False):
            raise ValueError(f"Target tie_embeddings={self.tie_embeddings!r} must be True, "
                             "False or None (None keeps the parent's)")
        for name in PRUNABLE:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Target {name}={value!r} must be a positive integer, or None "
                                 "to keep the parent's value")
            if value > getattr(cfg, name):
                raise ValueError(f"Target {name}={value} exceeds the parent's "
                                 f"{name}={getattr(cfg, name)}; pruning only removes, so choose "
                                 f"{name} <= {getattr(cfg, name)} (or None to keep it)")

    def changed(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Names of the dimensions this target actually shrinks."""
        resolved = self.resolve(cfg)
        return tuple(name for name in PRUNABLE if resolved[name] != getattr(cfg, name))


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


def plan(cfg: ModelConfig, n_params: int, *, multiple_of: int = 64, max_candidates: int = 10,
         prune_depth: bool = True, prune_width: bool = True, tolerance: float = 0.02
         ) -> list[Candidate]:
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
