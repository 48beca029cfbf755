"""A Mistral/Llama/Qwen-family decoder in flax.linen, exposed as pure functions over param pytrees.

Layers are scanned (`nn.scan`): params are stacked with a leading `layers` axis, which keeps
compile time flat in depth and makes depth pruning a slice of every `[N, ...]` leaf. Every
param carries logical axis names (see `cascade_jax.sharding` for their mapping to a mesh).

Dimension letters (einsum strings and variable suffixes): B batch, L query length, M key
length, D d_model, H query heads, K kv heads, G = H/K, E head_dim, F d_ff, V vocab, N layers.

Param tree (N-stacked leaves under `layers`):
    embed/embedding            [V, D]        ('vocab', 'embed')
    layers/attn_norm/scale     [N, D]        ('layers', 'embed')
    layers/attn/wq             [N, D, H, E]  ('layers', 'embed', 'heads', 'head_dim')
    layers/attn/wk, wv         [N, D, K, E]  ('layers', 'embed', 'kv_heads', 'head_dim')
    layers/attn/wo             [N, H, E, D]  ('layers', 'heads', 'head_dim', 'embed')
    layers/attn/bq             [N, H, E]     ('layers', 'heads', 'head_dim')     (qkv_bias)
    layers/attn/bk, bv         [N, K, E]     ('layers', 'kv_heads', 'head_dim')  (qkv_bias)
    layers/attn/q_norm, k_norm [N, E]        ('layers', 'head_dim')              (qk_norm)
    layers/mlp_norm/scale      [N, D]
    layers/mlp/w_gate, w_up    [N, D, F]     ('layers', 'embed', 'mlp')
    layers/mlp/w_down          [N, F, D]     ('layers', 'mlp', 'embed')
    final_norm/scale           [D]
    lm_head/kernel             [D, V]        (absent when embeddings are tied)

Query head h uses KV head h // G (the layout of Hugging Face's `repeat_kv`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cascade_jax.config import Llama3RopeScaling, ModelConfig, RopeScaling, YarnRopeScaling

Params = dict[str, Any]

# What `forward_with_intermediates` can return, one array per layer each ([N, B, L, ...]).
# Pruning importance is estimated from these.
INTERMEDIATES = (
    "block_in",       # [N, B, L, D] residual stream entering the block (attention-norm input)
    "attn_norm_out",  # [N, B, L, D] RMSNorm output fed to attention
    "attn_heads",     # [N, B, L, H, E] each head's output before the output projection
    "mlp_in",         # [N, B, L, D] residual stream after attention (FFN-norm input)
    "mlp_norm_out",   # [N, B, L, D] RMSNorm output fed to the MLP
    "mlp_act",        # [N, B, L, F] SiLU(x W_gate) * (x W_up)
    "block_out",      # [N, B, L, D] residual stream leaving the block
)

_EMBED_INIT = nn.initializers.normal(stddev=0.02)

# Logical axes of the residual stream between blocks (mapped to the mesh by sharding's rules).
RESIDUAL_AXES = ("batch", "length", "activation_embed")


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., D] · w [D, ...]` as one 2-D matmul over the flattened leading dims.

    The same product as the einsum, but XLA:CPU computes the weight gradient of a 3-D einsum
    that contracts B and L through a transposed copy of the incoming gradient (measured
    ~20 ms per [4, 256, 1024] SwiGLU layer); flattened, every matmul is a plain GEMM.
    """
    out = jnp.dot(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1))
    return out.reshape(*x.shape[:-1], *w.shape[1:])


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...],
           axes: tuple[str, ...], cfg: ModelConfig) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Hugging Face does), scaled by a weight."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", nn.initializers.ones, (x_BLD.shape[-1],), ("embed",),
                         self.cfg)
        return rms_normalize(x_BLD, scale_D, self.cfg)


def rms_normalize(x: jax.Array, scale: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x / rms(x) · scale over the last axis, in float32, returned in the compute dtype."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (x32 * inv_rms * scale.astype(jnp.float32)).astype(cfg.compute_dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None
                     ) -> jax.Array:
    """[E/2] float32 inverse frequencies θ^(-2i/E), rescaled by `scaling` if any."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if isinstance(scaling, Llama3RopeScaling):
        return _llama3_frequencies(inv_freq, scaling)
    if isinstance(scaling, YarnRopeScaling):
        return _yarn_frequencies(inv_freq, head_dim, theta, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: jax.Array, scaling: Llama3RopeScaling) -> jax.Array:
    """Llama 3.1: long wavelengths (beyond original_length / low_freq_factor) slowed by
    `factor`, short ones (below original_length / high_freq_factor) kept, the band between
    interpolated."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    original_length = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original_length / low, inv_freq / factor, inv_freq)
    smooth = (original_length / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_length / high) & (wavelen <= original_length / low)
    return jnp.where(medium, smoothed, scaled)


def _yarn_ramp_bounds(head_dim: int, theta: float, scaling: YarnRopeScaling
                      ) -> tuple[float, float]:
    """YaRN's ramp ends (arXiv 2309.00071, "NTK-by-parts"): the frequency indices whose
    wavelength turns beta_fast resp. beta_slow times over the original context, clipped to
    [0, E - 1] (rounded outward when `truncate`)."""

    def index_of(rotations: float) -> float:
        length = scaling.original_max_position_embeddings
        return (head_dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = index_of(scaling.beta_fast), index_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _yarn_frequencies(inv_freq: jax.Array, head_dim: int, theta: float,
                      scaling: YarnRopeScaling) -> jax.Array:
    """YaRN's "NTK-by-parts": frequency i interpolated (divided by `factor`) by the weight of a
    linear ramp from 0 at `low` to 1 at `high`, extrapolated (kept) by the rest."""
    low, high = _yarn_ramp_bounds(head_dim, theta, scaling)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_attention_scale(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention scale, else 1."""
    return scaling.attention_scale if isinstance(scaling, YarnRopeScaling) else 1.0


def rope_tables(positions_BL: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotary angles, [B, L, E/2] in float32, computed once per forward (times
    YaRN's attention scale, as transformers does: q and k both carry it)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles_BLE2 = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    scale = rope_attention_scale(scaling)
    return jnp.cos(angles_BLE2) * scale, jnp.sin(angles_BLE2) * scale


def query_scale(positions_BL: jax.Array, beta: float, original_length: int) -> jax.Array:
    """[B, L] float32 Ministral 3 query scale 1 + β·log(1 + floor(position / original_length))
    (arXiv 2601.08584; transformers' `get_llama_4_attn_scale`). The floor is an integer
    division, exact at any position."""
    periods_BL = (positions_BL // original_length).astype(jnp.float32)
    return 1.0 + beta * jnp.log1p(periods_BL)


class PositionTables(NamedTuple):
    """What attention needs from the token positions, computed once per forward and shared by
    every layer: RoPE cos/sin [B, L, E/2] and Ministral 3's query scale [B, L] (None: off)."""

    cos_BLE2: jax.Array
    sin_BLE2: jax.Array
    query_scale_BL: jax.Array | None


def position_tables(cfg: ModelConfig, positions_BL: jax.Array) -> PositionTables:
    """`PositionTables` for `positions_BL` (each token's position within its own segment)."""
    cos_BLE2, sin_BLE2 = rope_tables(positions_BL, cfg.head_dim, cfg.rope_theta,
                                     cfg.rope_scaling)
    scale_BL = None
    if cfg.query_scale_beta is not None:
        scale_BL = query_scale(positions_BL, cfg.query_scale_beta,
                               cfg.rope_scaling.original_max_position_embeddings)
    return PositionTables(cos_BLE2, sin_BLE2, scale_BL)


def apply_rope(x_BLHE: jax.Array, cos_BLE2: jax.Array, sin_BLE2: jax.Array) -> jax.Array:
    """Rotate channel i with channel i + E/2 (Hugging Face's `rotate_half` convention)."""
    x1, x2 = jnp.split(x_BLHE.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BLE2[:, :, None, :], sin_BLE2[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLHE.dtype)


def attention_mask(segment_ids_BL: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, L, M] bool: causal, within the same packed segment, and inside the window if any."""
    length = segment_ids_BL.shape[1]
    q_idx = jnp.arange(length)[:, None]
    k_idx = jnp.arange(length)[None, :]
    allowed_LM = k_idx <= q_idx
    if sliding_window is not None:
        allowed_LM &= q_idx - k_idx < sliding_window
    same_segment_BLM = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return allowed_LM[None] & same_segment_BLM


def positions_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
    """Position of each token within its own segment (restarts at every segment change)."""
    idx_BL = jnp.broadcast_to(jnp.arange(segment_ids_BL.shape[1]), segment_ids_BL.shape)
    changed_BL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BL[:, :1], dtype=bool),
         segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    start_BL = jax.lax.cummax(jnp.where(changed_BL, idx_BL, 0), axis=1)
    return idx_BL - start_BL


def attend(q_BLKGE: jax.Array, k_BMKE: jax.Array, v_BMKE: jax.Array, mask_BLM: jax.Array
           ) -> jax.Array:
    """softmax(q kᵀ / sqrt(E), masked) v for every query head; scores and softmax in float32."""
    scores_BKLGM = jnp.einsum("BLKGE,BMKE->BKLGM", q_BLKGE, k_BMKE,
                              preferred_element_type=jnp.float32) * (q_BLKGE.shape[-1] ** -0.5)
    # L next to G: each (B, K) is one [L*G, E] x [E, M] matmul (measured faster than
    # BKGLM on XLA:CPU, fwd+bwd).
    scores_BKLGM = jnp.where(mask_BLM[:, None, :, None, :], scores_BKLGM,
                             jnp.finfo(jnp.float32).min)
    probs_BKLGM = jax.nn.softmax(scores_BKLGM, axis=-1).astype(v_BMKE.dtype)
    return jnp.einsum("BKLGM,BMKE->BLKGE", probs_BKLGM, v_BMKE)


def attend_in_chunks(q_BLKGE: jax.Array, k_BMKE: jax.Array, v_BMKE: jax.Array,
                     mask_BLM: jax.Array, chunk: int) -> jax.Array:
    """`attend`, `chunk` queries at a time: the same softmax over all keys per query, so the
    same result, with only one block's [B, K, chunk, G, M] scores live. Each block is
    rematerialised in the backward pass (a checkpointed `lax.map`)."""
    batch, length = q_BLKGE.shape[:2]
    if length % chunk:
        raise ValueError(f"attention_chunk={chunk} does not divide the sequence length "
                         f"{length}; choose a divisor of {length} (or None)")
    blocks = length // chunk
    q_nBcKGE = jnp.swapaxes(q_BLKGE.reshape(batch, blocks, chunk, *q_BLKGE.shape[2:]), 0, 1)
    mask_nBcM = jnp.swapaxes(mask_BLM.reshape(batch, blocks, chunk, -1), 0, 1)

    @jax.checkpoint
    def block(q_and_mask: tuple[jax.Array, jax.Array]) -> jax.Array:
        return attend(q_and_mask[0], k_BMKE, v_BMKE, q_and_mask[1])

    out_nBcKGE = jax.lax.map(block, (q_nBcKGE, mask_nBcM))
    return jnp.swapaxes(out_nBcKGE, 0, 1).reshape(q_BLKGE.shape[:-1] + v_BMKE.shape[-1:])


def _attention_params(module: nn.Module, cfg: ModelConfig) -> Params:
    """Declare the attention params `cfg` has (module docstring) and return them by name."""
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    in_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    specs = {
        "wq": (in_init, (d, h, e), ("embed", "heads", "head_dim")),
        "wk": (in_init, (d, k, e), ("embed", "kv_heads", "head_dim")),
        "wv": (in_init, (d, k, e), ("embed", "kv_heads", "head_dim")),
        "wo": (out_init, (h, e, d), ("heads", "head_dim", "embed")),
    }
    if cfg.qkv_bias:
        zeros = nn.initializers.zeros
        specs["bq"] = (zeros, (h, e), ("heads", "head_dim"))
        specs["bk"] = (zeros, (k, e), ("kv_heads", "head_dim"))
        specs["bv"] = (zeros, (k, e), ("kv_heads", "head_dim"))
    if cfg.qk_norm:
        specs["q_norm"] = (nn.initializers.ones, (e,), ("head_dim",))
        specs["k_norm"] = (nn.initializers.ones, (e,), ("head_dim",))
    return {name: _param(module, name, init, shape, axes, cfg)
            for name, (init, shape, axes) in specs.items()}


def _project_qkv(cfg: ModelConfig, w: Params, x_BLD: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, L, H, E], k and v [B, L, K, E] before RoPE: projections, plus the biases (Qwen2)
    and the per-head q/k RMSNorm (Qwen3) when `cfg` has them."""
    dt = cfg.compute_dtype
    q_BLHE, k_BLKE, v_BLKE = (_dense(x_BLD, w[name].astype(dt)) for name in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q_BLHE, k_BLKE, v_BLKE = (y + w[name].astype(dt) for y, name in
                                  ((q_BLHE, "bq"), (k_BLKE, "bk"), (v_BLKE, "bv")))
    if cfg.qk_norm:
        q_BLHE = rms_normalize(q_BLHE, w["q_norm"], cfg)
        k_BLKE = rms_normalize(k_BLKE, w["k_norm"], cfg)
    return q_BLHE, k_BLKE, v_BLKE


def _position_qk(q_BLHE: jax.Array, k_BLKE: jax.Array, tables: PositionTables
                 ) -> tuple[jax.Array, jax.Array]:
    """RoPE on q and k, then Ministral 3's query scale on q (transformers' order)."""
    q_BLHE = apply_rope(q_BLHE, tables.cos_BLE2, tables.sin_BLE2)
    k_BLKE = apply_rope(k_BLKE, tables.cos_BLE2, tables.sin_BLE2)
    if tables.query_scale_BL is not None:
        q_BLHE = q_BLHE * tables.query_scale_BL[:, :, None, None].astype(q_BLHE.dtype)
    return q_BLHE, k_BLKE


class Attention(nn.Module):
    """Grouped-query causal self-attention; softmax in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, tables: PositionTables, mask_BLM: jax.Array
                 ) -> jax.Array:
        cfg = self.cfg
        h, k, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        w = _attention_params(self, cfg)
        q_BLHE, k_BMKE, v_BMKE = _project_qkv(cfg, w, x_BLD)
        q_BLHE, k_BMKE = _position_qk(q_BLHE, k_BMKE, tables)

        batch, length = x_BLD.shape[:2]
        q_BLKGE = q_BLHE.reshape(batch, length, k, cfg.n_groups, e)
        if cfg.attention_chunk is None or cfg.attention_chunk >= length:
            out_BLKGE = attend(q_BLKGE, k_BMKE, v_BMKE, mask_BLM)
        else:
            out_BLKGE = attend_in_chunks(q_BLKGE, k_BMKE, v_BMKE, mask_BLM, cfg.attention_chunk)
        heads_BLHE = out_BLKGE.reshape(batch, length, h, e)
        self.sow("intermediates", "attn_heads", heads_BLHE)
        wo_FD = w["wo"].reshape(h * e, cfg.d_model).astype(cfg.compute_dtype)
        return _dense(heads_BLHE.reshape(batch, length, h * e), wo_FD)


class Mlp(nn.Module):
    """SwiGLU feed-forward: W_down(SiLU(x W_gate) * (x W_up))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        init = nn.initializers.lecun_normal()
        w_gate_DF = _param(self, "w_gate", init, (d, f), ("embed", "mlp"), cfg)
        w_up_DF = _param(self, "w_up", init, (d, f), ("embed", "mlp"), cfg)
        w_down_FD = _param(self, "w_down", init, (f, d), ("mlp", "embed"), cfg)
        dt = cfg.compute_dtype
        gate_BLF = _dense(x_BLD, w_gate_DF.astype(dt))
        up_BLF = _dense(x_BLD, w_up_DF.astype(dt))
        act_BLF = jax.nn.silu(gate_BLF) * up_BLF
        self.sow("intermediates", "mlp_act", act_BLF)
        return _dense(act_BLF, w_down_FD.astype(dt))


def constrain_residual(x_BLD: jax.Array) -> jax.Array:
    """Pin the residual stream to its logical layout: batch split, d_model whole.

    A no-op outside a mesh context (see `sharding.traced_on_mesh`). Without it XLA's
    propagation copies the `embed` params' fsdp sharding onto the activations.
    """
    return nn.with_logical_constraint(x_BLD, RESIDUAL_AXES)


class Block(nn.Module):
    """Pre-norm residual block; the signature `(carry, *broadcast) -> (carry, None)` suits scan."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, tables: PositionTables, mask_BLM: jax.Array
                 ) -> tuple[jax.Array, None]:
        x_BLD = constrain_residual(x_BLD)
        self.sow("intermediates", "block_in", x_BLD)
        h_BLD = RMSNorm(self.cfg, name="attn_norm")(x_BLD)
        self.sow("intermediates", "attn_norm_out", h_BLD)
        x_BLD = x_BLD + Attention(self.cfg, name="attn")(h_BLD, tables, mask_BLM)
        self.sow("intermediates", "mlp_in", x_BLD)
        h_BLD = RMSNorm(self.cfg, name="mlp_norm")(x_BLD)
        self.sow("intermediates", "mlp_norm_out", h_BLD)
        x_BLD = x_BLD + Mlp(self.cfg, name="mlp")(h_BLD)
        x_BLD = constrain_residual(x_BLD)
        self.sow("intermediates", "block_out", x_BLD)
        return x_BLD, None


class LmHead(nn.Module):
    """Untied output projection; logits are accumulated and returned in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        w_DV = _param(self, "kernel", _EMBED_INIT, (cfg.d_model, cfg.vocab_size),
                      ("embed", "vocab"), cfg)
        return jnp.einsum("BLD,DV->BLV", x_BLD, w_DV.astype(cfg.compute_dtype),
                          preferred_element_type=jnp.float32)


class Decoder(nn.Module):
    """Embedding → scanned blocks → final norm; `unembed` maps hidden states to logits."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False,
                             policy=jax.checkpoint_policies.nothing_saveable)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
            unroll=cfg.n_layers if cfg.scan_unroll else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            embedding_init=nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")),
            name="embed")
        self.final_norm = RMSNorm(cfg, name="final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = LmHead(cfg, name="lm_head")

    def __call__(self, tokens_BL: jax.Array, segment_ids_BL: jax.Array | None = None,
                 positions_BL: jax.Array | None = None, *, logits: bool = True) -> jax.Array:
        cfg = self.cfg
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(tokens_BL)
        if positions_BL is None:
            positions_BL = positions_from_segments(segment_ids_BL)
        tables = position_tables(cfg, positions_BL)
        mask_BLM = attention_mask(segment_ids_BL, cfg.sliding_window)
        x_BLD = self.embed(tokens_BL)
        x_BLD, _ = self.layers(x_BLD, tables, mask_BLM)
        x_BLD = self.final_norm(x_BLD)
        return self.unembed(x_BLD) if logits else x_BLD

    def unembed(self, x_BLD: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            w_VD = self.embed.embedding.astype(self.cfg.compute_dtype)
            return jnp.einsum("BLD,VD->BLV", x_BLD, w_VD, preferred_element_type=jnp.float32)
        return self.lm_head(x_BLD)


# ----------------------------------------------------------------------------- pure functions


def _dummy_tokens(cfg: ModelConfig) -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Fresh params (plain arrays, no logical-axis boxes). For sharded init see `sharding`."""
    return nn.unbox(Decoder(cfg).init(rng, _dummy_tokens(cfg), logits=True)["params"])


def param_logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every param, as a pytree of `PartitionSpec`s (no allocation)."""
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), _dummy_tokens(cfg)))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(cfg: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` of every param (no allocation)."""
    return jax.eval_shape(lambda: init(cfg, jax.random.key(0)))


def forward(cfg: ModelConfig, params: Params, tokens_BL: jax.Array,
            segment_ids_BL: jax.Array | None = None,
            positions_BL: jax.Array | None = None) -> jax.Array:
    """Next-token logits, [B, L, V] float32.

    `segment_ids_BL` (0 = padding) keeps packed documents from attending to each other;
    `positions_BL` defaults to the position within each segment.
    """
    return Decoder(cfg).apply({"params": params}, tokens_BL, segment_ids_BL, positions_BL)


def hidden_states(cfg: ModelConfig, params: Params, tokens_BL: jax.Array,
                  segment_ids_BL: jax.Array | None = None,
                  positions_BL: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [B, L, D] in the compute dtype, without the [B, L, V] logits.

    A fused loss multiplies these by `lm_head_weights` chunk by chunk instead.
    """
    return Decoder(cfg).apply({"params": params}, tokens_BL, segment_ids_BL, positions_BL,
                              logits=False)


def lm_head_weights(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output projection as [D, V] (the transposed embedding when tied)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def forward_with_intermediates(
        cfg: ModelConfig, params: Params, tokens_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None, positions_BL: jax.Array | None = None,
        names: tuple[str, ...] = INTERMEDIATES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits plus per-layer activations, each stacked over layers: `{name: [N, B, L, ...]}`.

    Only the requested `names` are kept (see `INTERMEDIATES`); under `jit` XLA drops the rest.
    """
    unknown = sorted(set(names) - set(INTERMEDIATES))
    if unknown:
        raise ValueError(f"unknown intermediates {unknown}; choose from {list(INTERMEDIATES)}")
    logits_BLV, state = Decoder(cfg).apply({"params": params}, tokens_BL, segment_ids_BL,
                                           positions_BL, mutable=["intermediates"])
    sown = state["intermediates"]["layers"]
    found: dict[str, jax.Array] = {}
    for module_path in (sown, sown.get("attn", {}), sown.get("mlp", {})):
        for name, value in module_path.items():
            if name in names and isinstance(value, tuple):
                found[name] = value[0]
    return logits_BLV, {name: found[name] for name in names}
