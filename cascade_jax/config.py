"""`ModelConfig`: the one description of a decoder's shape that every module agrees on.

Validation lives here (not in the model) so a bad shape fails at the moment it is written,
with a message that names the value and a way out, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("xla", "jax", "cudnn", "splash")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _multiples(of: int, near: int, count: int = 4) -> list[int]:
    """Multiples of `of` around `near`, to suggest valid values in error messages."""
    base = max(of, (near // of) * of)
    candidates = {max(of, base + k * of) for k in range(-1, count - 1)}
    return sorted(candidates)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's 'llama3' RoPE frequency rule: wavelengths beyond
    original_max_position_embeddings / low_freq_factor are slowed by `factor`, those below
    original / high_freq_factor kept, the band between interpolated. Field names are the
    `rope_parameters` keys of a Hugging Face config.json."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self) -> None:
        ok = (_is_real(self.factor) and self.factor >= 1 and _is_real(self.low_freq_factor)
              and _is_real(self.high_freq_factor)
              and 0 < self.low_freq_factor < self.high_freq_factor
              and _is_count(self.original_max_position_embeddings))
        if not ok:
            raise ValueError(f"rope_scaling={self!r} must have factor >= 1 (as transformers "
                             "requires), 0 < low_freq_factor < high_freq_factor and a "
                             "positive integer original_max_position_embeddings, e.g. Llama "
                             "3.1's "
                             "(8.0, 1.0, 4.0, 8192)")

    def to_dict(self) -> dict[str, Any]:
        return {"rope_type": self.rope_type, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (arXiv 2309.00071): RoPE frequencies interpolated by `factor` below a ramp between
    the dimensions that turn beta_slow and beta_fast times over original_max_position_embeddings,
    kept above it; cos/sin scaled by `attention_scale` (so the logits by its square).

    Every parameter transformers' `_compute_yarn_parameters` reads, under its names. Unset
    `attention_factor` is derived: mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
    both mscales are set and non-zero, else mscale(factor), with mscale(s, m) = 0.1 m ln(s) + 1
    (1 when s <= 1). `truncate` rounds the ramp's ends outward to whole dimensions.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: ClassVar[str] = "yarn"

    def __post_init__(self) -> None:
        optional = (self.mscale, self.mscale_all_dim, self.attention_factor)
        ok = (_is_real(self.factor) and self.factor >= 1
              and _is_count(self.original_max_position_embeddings)
              and _is_real(self.beta_fast) and _is_real(self.beta_slow)
              and self.beta_fast > self.beta_slow > 0
              and all(v is None or _is_real(v) for v in optional)
              and (self.attention_factor is None or self.attention_factor > 0)
              and isinstance(self.truncate, bool))
        if not ok:
            raise ValueError(f"rope_scaling={self!r} must have factor >= 1 (as transformers "
                             "requires), a positive integer "
                             "original_max_position_embeddings, beta_fast > beta_slow > 0, "
                             "real mscale / mscale_all_dim (or None), attention_factor > 0 (or "
                             "None) and a bool truncate; e.g. Ministral 3's factor 16.0, "
                             "original_max_position_embeddings 16384, beta_fast 32.0, "
                             "beta_slow 1.0, mscale 1.0, mscale_all_dim 1.0")

    @property
    def attention_scale(self) -> float:
        """The factor transformers multiplies cos and sin by (`attention_factor`, or derived)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(m: float) -> float:
            return 1.0 if self.factor <= 1 else 0.1 * m * math.log(self.factor) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.mscale) / mscale(self.mscale_all_dim)
        return mscale(1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"rope_type": self.rope_type, **dataclasses.asdict(self)}


RopeScaling = Llama3RopeScaling | YarnRopeScaling
ROPE_SCALINGS: dict[str, type[Llama3RopeScaling | YarnRopeScaling]] = {
    cls.rope_type: cls for cls in (Llama3RopeScaling, YarnRopeScaling)}


def rope_scaling_from(value: Any) -> RopeScaling | None:
    """A `RopeScaling` from itself, its `to_dict()` (JSON), or the 4-tuple (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings) that configs and
    checkpoint metadata written before YaRN store for 'llama3'."""
    if value is None or isinstance(value, RopeScaling):
        return value
    if isinstance(value, Mapping):
        fields = dict(value)
        kind = fields.pop("rope_type", None)
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={value!r} has rope_type={kind!r}; choose one of "
                             f"{sorted(ROPE_SCALINGS)}")
        cls = ROPE_SCALINGS[kind]
        known = {f.name: f for f in dataclasses.fields(cls)}
        required = [name for name, f in known.items() if f.default is dataclasses.MISSING]
        if set(fields) - set(known) or set(required) - set(fields):
            raise ValueError(f"rope_scaling={value!r}: {kind!r} needs {required} and may have "
                             f"{sorted(set(known) - set(required))}; unknown "
                             f"{sorted(set(fields) - set(known))}, missing "
                             f"{sorted(set(required) - set(fields))}")
        return cls(**fields)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4:
        return Llama3RopeScaling(*value)
    raise ValueError(f"rope_scaling={value!r} must be None, a Llama3RopeScaling / "
                     "YarnRopeScaling (or its to_dict()), or Llama 3.1's 4-tuple (factor, "
                     "low_freq_factor, high_freq_factor, original_max_position_embeddings), "
                     "e.g. (8.0, 1.0, 4.0, 8192)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Mistral/Llama/Qwen-family decoder.

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
    # RoPE frequency scaling: Llama 3.1's 'llama3' or YaRN; None: plain RoPE. Also given as
    # its to_dict() or (llama3 only) the old 4-tuple, converted here (see rope_scaling_from).
    rope_scaling: RopeScaling | None = None
    # Ministral 3's query scale (arXiv 2601.08584; Llama 4's attention temperature): queries
    # times 1 + β·log(1 + floor(position / original_max_position_embeddings)), the position
    # within its own packed segment and the length rope_scaling's. None: no scale.
    query_scale_beta: float | None = None
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, arXiv 2407.10671)
    qk_norm: bool = False   # per-head RMSNorm of q and k before RoPE (Qwen3, arXiv 2505.09388)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_unroll: bool = False  # unroll the layer scan: faster steps, compile time grows with N
    # Queries (and keys) per attention block (None: all at once). The float32 scores are
    # [B, K, L, G, L]; in blocks of c queries × c keys (flash attention, `model.attend_blocks`)
    # only [B, K, c, G, c] is live, recomputed in the backward pass, and blocks the causal mask
    # or window rules out are skipped: what makes 16k+ token distillation fit (see
    # experiments.plan). Need not divide the length (the last block is padded).
    attention_chunk: int | None = None
    # Who computes attention in the forward and training passes: 'xla' (our einsums, any
    # dtype, chunkable), 'jax' (`jax.nn.dot_product_attention` lowered by XLA: the same
    # plumbing as 'cudnn', checkable on any backend) or 'cudnn' (cuDNN flash attention on
    # NVIDIA GPUs, bfloat16/float16; packed segments and windows go in as a [B, 1, L, L] mask,
    # so no attention_chunk) or 'splash' (Pallas splash attention for TPU: segment ids, causal,
    # window and GQA inside the kernel; attention_chunk is its block size, a multiple of 128
    # dividing the length, default min(512, length)). The cached decode always uses 'xla'.
    attention_impl: str = "xla"
    # Run 'splash' on a non-TPU backend in Pallas interpret mode (slow: for checking a config
    # on a laptop before a pod). Without it 'splash' off TPU is an error naming what to use.
    splash_interpret: bool = False

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
        self._check_attention_impl()
        # A frozen dataclass, not a dict or list, keeps the config hashable (a jit static).
        object.__setattr__(self, "rope_scaling", rope_scaling_from(self.rope_scaling))
        self._check_query_scale()
        for name in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window!r} must be None (full "
                             "causal attention) or a positive number of tokens")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one "
                                 f"of {sorted(_DTYPES)}")

    def _check_attention_impl(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of "
                             f"{ATTENTION_IMPLS}")
        if not isinstance(self.splash_interpret, bool):
            raise ValueError(f"splash_interpret={self.splash_interpret!r} must be True or False")
        if self.attention_impl == "xla":
            return
        if self.attention_impl == "splash":
            if self.attention_chunk is not None and self.attention_chunk % 128:
                raise ValueError(f"attention_chunk={self.attention_chunk} is splash attention's "
                                 "block size and must be a multiple of 128 (its kernel's tile); "
                                 "choose e.g. 512, or None (min(512, length))")
            return
        if self.attention_chunk is not None:
            raise ValueError(f"attention_chunk={self.attention_chunk} needs attention_impl="
                             f"'xla' (got {self.attention_impl!r}, which does not chunk); set "
                             "one of them to its default")
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise ValueError("attention_impl='cudnn' needs dtype='bfloat16' or 'float16' "
                             "(cuDNN flash attention has no float32 kernel); or use 'xla'")

    def _check_query_scale(self) -> None:
        beta = self.query_scale_beta
        if beta is None:
            return
        if not _is_real(beta):
            raise ValueError(f"query_scale_beta={beta!r} must be a real number (Ministral 3 "
                             "uses 0.1) or None")
        if self.rope_scaling is None:
            raise ValueError(f"query_scale_beta={beta} needs rope_scaling: the query scale "
                             "counts positions in units of rope_scaling's "
                             "original_max_position_embeddings; set rope_scaling (Ministral 3: "
                             "YaRN) or query_scale_beta=None")

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
        """JSON-ready fields; `rope_scaling` as its tagged dict ({"rope_type": ..., ...})."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so typos don't pass silently.

        Dicts written before a field existed load with its default, and an old 'llama3'
        `rope_scaling` 4-tuple (a list after JSON) still reads."""
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
        attn += self.qkv_bias * e * (self.n_heads + 2 * self.n_kv_heads) + self.qk_norm * 2 * e
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + d
