"""`ModelConfig`: the one description of a decoder's shape that every module agrees on.

Validation lives here (not in the model) so a bad shape fails at the moment it is written,
with a message that names the value and a way out, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _multiples(of: int, near: int, count: int = 4) -> list[int]:
    """Multiples of `of` around `near`, to suggest valid values in error messages."""
    base = max(of, (near // of) * of)
    candidates = {max(of, base + k * of) for k in range(-1, count - 1)}
    return sorted(candidates)


def _check_rope_scaling(scaling: Any) -> None:
    try:
        factor, low, high, original = scaling
        ok = factor > 0 and 0 < low < high and int(original) == original and original > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"rope_scaling={scaling!r} must be (factor, low_freq_factor, "
                         "high_freq_factor, original_max_position_embeddings) with factor > 0, "
                         "0 < low_freq_factor < high_freq_factor and a positive integer "
                         "length, e.g. Llama 3.1's (8.0, 1.0, 4.0, 8192); or None")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Mistral/Llama-family decoder.

    `head_dim` is independent of `d_model / n_heads` (Mistral Small 3.1: d_model 5120 with
    32 heads of 128), which is also what lets pruning cut `d_model` and heads separately.
    `dtype` is the matmul (compute) dtype; `param_dtype` is the stored (master) dtype.
    Softmax, norms and logits are always float32.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    sliding_window: int | None = None
    # Llama 3.1's 'llama3' RoPE frequency scaling, (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), e.g. (8.0, 1.0, 4.0, 8192); None: plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_unroll: bool = False  # unroll the layer scan: faster steps, compile time grows with N
    # Queries per attention block (None: all at once). The float32 scores are [B, K, L, G, L];
    # in blocks of c queries only [B, K, c, G, L] is live, recomputed in the backward pass:
    # what makes 16k-token distillation fit (see experiments.plan). Must divide the length.
    attention_chunk: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            valid = [m for m in _multiples(self.n_kv_heads, self.n_heads)]
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads} "
                f"(grouped-query attention shares each KV head among n_heads/n_kv_heads query "
                f"heads); choose n_heads in {valid} or n_kv_heads in "
                f"{_divisors(self.n_heads)}")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even: RoPE rotates pairs of channels; "
                f"choose {self.head_dim - 1} or {self.head_dim + 1}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0 (Llama uses 10000, "
                             "Mistral Small 3.1 uses 1e9)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps!r} must be > 0 (typically 1e-5 or 1e-6)")
        if self.attention_chunk is not None and (
                not isinstance(self.attention_chunk, int) or isinstance(self.attention_chunk, bool)
                or self.attention_chunk < 1):
            raise ValueError(f"attention_chunk={self.attention_chunk!r} must be None (all "
                             "queries at once) or a positive number of queries, e.g. 1024")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
            # JSON round trips give a list; a tuple keeps the config hashable (a jit static).
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window!r} must be None (full "
                             "causal attention) or a positive number of tokens")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one "
                                 f"of {sorted(_DTYPES)}")

    @property
    def n_groups(self) -> int:
        """G: query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with `changes` applied (pruning builds child configs this way)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so typos don't pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: "
                             f"{sorted(known)}")
        return cls(**values)

    def num_params(self) -> int:
        """Parameter count, from the shapes alone (used by planning before any allocation)."""
        d, f, e = self.d_model, self.d_ff, self.head_dim
        attn = d * e * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + d
