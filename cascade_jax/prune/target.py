"""`Target`: the dimensions a pruned child keeps. `prune.prune` consumes it, `search_targets`
proposes it, and `prune.child_config` turns it into the child's checked config.
"""

from __future__ import annotations

import dataclasses

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
