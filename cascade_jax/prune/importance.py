"""Importance of layers, heads, FFN neurons and hidden channels, from one calibration pass.

`estimate_importance(cfg, params, batches)` runs the decoder over calibration batches and keeps
only small float32 statistics per batch; `Importance` holds the final scores, saves to one
`.npz` file and checks it is applied to the model shape it was computed on.

What is scored (higher = more important everywhere):
- layers: block influence `1 - E[cos(x_in, x_out)]` (ShortGPT, arXiv 2403.03853; Minitron,
  arXiv 2407.14679) and Ministral 3's norm ratio `E[||x_out|| / ||x_in||]` (arXiv 2601.08584;
  the paper's pseudocode computes output over input). Both are means over valid tokens.
- FFN neurons, `neuron_method`:
  'minitron' (default): the activation entering `w_down`, |SiLU(x W_gate) * (x W_up)|,
  aggregated as below. The absolute value is what NVIDIA Model Optimizer's Minitron hooks take
  (`activations.abs().mean(seq).pow(2).sum(batch)`): a neuron that fires hard with either sign
  must not cancel to zero in the sequence mean. 'ministral': Ministral 3's
  `mean |SiLU(x W1) * (x W3)|` over all valid tokens (no per-sequence step).
- attention heads: the L2 norm over head_dim of each head's output before `wo` (Minitron),
  aggregated as below; a KV group scores the sum of its query heads (query head h uses KV head
  h // G), which is what GQA-aware head pruning removes together.
- hidden channels: |RMSNorm output| at the attention norm and the FFN norm of every layer
  (Minitron), aggregated per norm site as below, then summed over the 2N sites (as Model
  Optimizer does); plus `residual_cov = E[x xᵀ]` of the residual stream at the inputs of both
  norms over all layers, for Ministral 3's PCA of the hidden dimension (uncentred, as
  SliceGPT's `Xᵀ X`).

Aggregation (Minitron §batch/sequence ablation: (L2 over batch, mean over sequence) gave the
lowest LM loss, 7.18; (mean, mean) 7.21; (L2, L2) 8.73; (var, var) 10.55). A per-token value
a[b, l, j] is first reduced over the valid positions l of each sequence (a row of the batch,
padding excluded; a row that is all padding is not a sequence; a packed row counts as one
sequence, like the packed Megatron samples Model Optimizer scores): 'mean' Σ a / n, 'l2'
sqrt(Σ a²), 'var' Σ (a - mean)² / n. The per-sequence values s[b, j] are then reduced over all
sequences of all batches: 'l2' sqrt(Σ s²), 'mean' Σ s / n_seq, 'var' Σ (s - mean)² / n_seq.

What is accumulated across batches (so streaming equals one pass over the concatenation):
token counts and sums for the layer scores, Σ|a| for 'ministral' neurons, Σ x xᵀ for the
covariance; and for every aggregated score the count, mean and M2 = Σ (s - mean)² of the
per-sequence values, merged batch by batch with Chan et al.'s parallel update. Each batch
aggregation is read off those moments at the end: 'mean' = mean, 'var' = M2 / n, and
'l2' = sqrt(M2 + n·mean²) = sqrt(Σ s²) (so the square root is taken once, at the end).

Identity: the scores carry `params_fingerprint`, a hash of a few fixed elements of every
param (`params_fingerprint`), and `prune.prune` refuses them for params with another one, since
scores of another checkpoint of the same shape pass every shape check and cut the wrong rows.

Cost: the blocks run in our own `lax.scan` over the stacked layer params, reusing
`model.Block`, and each layer's activations are reduced inside the scan body, so the
[N, B, L, ...] intermediates are never materialised and the logits are never computed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Self

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax import files, model, paths, sharding, token_ids
from cascade_jax.config import ModelConfig

Stats = dict[str, Any]

AGGREGATIONS: dict[str, tuple[str, str]] = {   # name -> (over batch, over sequence)
    "l2_mean": ("l2", "mean"),
    "mean_mean": ("mean", "mean"),
    "l2_l2": ("l2", "l2"),
    "var_var": ("var", "var"),
}
_REDUCTIONS = ("l2", "mean", "var")
NEURON_METHODS = ("minitron", "ministral")

# Config fields that fix the shapes of params and scores; the others (dtype, remat, context
# length, window, rope) do not change which rows a score refers to.
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "d_ff", "tie_embeddings")
_ARRAY_FIELDS = ("layer_block_influence", "layer_norm_ratio", "neuron", "head", "kv_group",
                 "channel", "residual_cov", "n_tokens")
_META_KEY = "__meta__"
_FORMAT = "cascade_jax.importance/v1"
_WRITER = "Importance.save, with the scores of prune.estimate_importance"
_SAMPLES_PER_LEAF = 32  # elements of each param the fingerprint reads


# ---------------------------------------------------------------------------- fingerprint


def _sample_index(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-dimension indices of up to `_SAMPLES_PER_LEAF` elements spread evenly over a
    leaf in row-major order (first and last included): fixed by the shape alone."""
    if not shape:
        return ()
    size = int(np.prod(shape))
    flat = np.unique(np.linspace(0, max(size - 1, 0), min(size, _SAMPLES_PER_LEAF))
                     .round().astype(np.int64))
    return tuple(i.astype(np.int32) for i in np.unravel_index(flat, shape))


def _gather_samples(leaves: list[Any], index: list[tuple[jax.Array, ...]]) -> jax.Array:
    """The sampled elements of every leaf, as one float32 vector (exact for bf16 and f32)."""
    parts = [jnp.asarray(x)[idx].reshape(-1).astype(jnp.float32)
             for x, idx in zip(leaves, index, strict=True)]
    return jnp.concatenate(parts) if parts else jnp.zeros(0, jnp.float32)


@functools.lru_cache(maxsize=8)
def _sampler(mesh: Mesh | None) -> Any:
    """`_gather_samples` compiled once (per param shapes); with a mesh, its small result is
    replicated, so every process can fetch it."""
    if mesh is None:
        return jax.jit(_gather_samples)
    return jax.jit(_gather_samples, out_shardings=NamedSharding(mesh, PartitionSpec()))


def params_fingerprint(params: model.Params) -> str:
    """16 hex digits identifying parameter *values*: a sha256 of every param's path and shape
    and of up to 32 fixed elements of it (gathered on device, float32, fetched).

    Cheap (a few hundred numbers are moved, whatever the model size), deterministic, and the
    same for any sharding and on every process (the elements are exact values, not sums whose
    rounding depends on the layout). Two checkpoints of one architecture differ in it; a
    bfloat16 cast of float32 params does too, since its values differ.
    """
    flat = paths.flatten(params)
    names = sorted(flat)
    leaves = [flat[name] for name in names]
    index = [_sample_index(tuple(np.shape(x))) for x in leaves]
    meshes = [x.sharding.mesh for x in leaves
              if isinstance(getattr(x, "sharding", None), NamedSharding)]
    samples = np.asarray(_sampler(meshes[0] if meshes else None)(leaves, index), np.float64)
    samples = np.where(np.isnan(samples), np.nan, samples) + 0.0  # one NaN, no -0.0
    digest = hashlib.sha256(json.dumps([[n, list(np.shape(x))] for n, x in
                                        zip(names, leaves, strict=True)]).encode())
    digest.update(samples.tobytes())
    return digest.hexdigest()[:16]


@flax.struct.dataclass
class Importance:
    """Scores of one model from one calibration pass; higher = more important (keep the top).

    All arrays float32. `model_config` is the `ModelConfig.to_dict()` of the scored model, so
    applying scores to a differently shaped model is caught (`check_matches`). `method` says
    how the scores were made (aggregation, neuron method, sequences and batches seen).
    `params_fingerprint` identifies the scored params (`check_params`); None when unknown
    (scores made by hand, or saved before fingerprints existed).
    """

    layer_block_influence: jax.Array  # [N]    1 - E[cos(block_in, block_out)]  (ShortGPT)
    layer_norm_ratio: jax.Array       # [N]    E ||block_out|| / ||block_in||   (Ministral 3)
    neuron: jax.Array                 # [N, F] FFN neuron scores
    head: jax.Array                   # [N, H] query-head scores
    kv_group: jax.Array               # [N, K] sum over each group's query heads
    channel: jax.Array                # [D]    hidden-channel scores
    residual_cov: jax.Array           # [D, D] E[x xᵀ] of the residual at both norm inputs
    n_tokens: jax.Array               # []     tokens the statistics were accumulated over
    model_config: dict[str, Any] = flax.struct.field(pytree_node=False)
    method: dict[str, Any] = flax.struct.field(pytree_node=False, default_factory=dict)
    params_fingerprint: str | None = flax.struct.field(pytree_node=False, default=None)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape every score array must have for `model_config`."""
        c = self.model_config
        n, d = c["n_layers"], c["d_model"]
        return {"layer_block_influence": (n,), "layer_norm_ratio": (n,),
                "neuron": (n, c["d_ff"]), "head": (n, c["n_heads"]),
                "kv_group": (n, c["n_kv_heads"]), "channel": (d,), "residual_cov": (d, d),
                "n_tokens": ()}

    def check_matches(self, cfg: ModelConfig | Mapping[str, Any]) -> None:
        """Raise ValueError unless these scores were computed on a model shaped like `cfg`.

        Only shape fields are compared (dtype, remat, context length do not matter); the score
        arrays are also checked against the shapes their own config implies.
        """
        target = cfg.to_dict() if isinstance(cfg, ModelConfig) else dict(cfg)
        diffs = [f"{k}: scores {self.model_config.get(k)!r} vs model {target.get(k)!r}"
                 for k in _SHAPE_FIELDS if self.model_config.get(k) != target.get(k)]
        if diffs:
            raise ValueError(
                "importance scores belong to a differently shaped model (" + "; ".join(diffs)
                + "). Re-run prune.estimate_importance on this model's params, or load the "
                "scores computed for it.")
        bad = [f"{name} {tuple(np.shape(getattr(self, name)))} != {shape}"
               for name, shape in self.expected_shapes().items()
               if tuple(np.shape(getattr(self, name))) != shape]
        if bad:
            raise ValueError("importance arrays do not fit their own model_config: "
                             + "; ".join(bad) + ". The scores file is corrupt; recompute it.")

    def check_params(self, params: model.Params) -> None:
        """Raise ValueError unless these scores were computed on `params` (same fingerprint).

        Scores of another model of the same shape (another checkpoint, another seed) pass
        `check_matches` and would silently keep the wrong rows. No-op when the fingerprint is
        unknown (None).
        """
        if self.params_fingerprint is None:
            return
        found = params_fingerprint(params)
        if found != self.params_fingerprint:
            raise ValueError(
                f"importance scores were computed on params with fingerprint "
                f"{self.params_fingerprint}, but the params given have fingerprint {found}: "
                "they are another model (or checkpoint) of the same shape. Re-score these "
                "params with prune.estimate_importance(cfg, params, batches) (a cascade does "
                "so when the stage's importance.npz is deleted), or pass "
                "check_fingerprint=False to prune.prune if you mean to apply these scores to "
                "other weights")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one `.npz` (arrays + JSON config/method) atomically: temp file, then rename.

        Only process 0 writes (every process holds the same scores).
        """
        if jax.process_index() != 0:
            return
        path = os.fspath(path)
        arrays = {name: np.asarray(jax.device_get(getattr(self, name)), np.float32)
                  for name in _ARRAY_FIELDS}
        meta = json.dumps({"format": _FORMAT, "model_config": self.model_config,
                           "method": self.method, "params_fingerprint": self.params_fingerprint})
        arrays[_META_KEY] = np.array(meta)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.atomic_write(os.path.abspath(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str], cfg: ModelConfig | None = None) -> Self:
        """Read scores written by `save`; with `cfg`, also `check_matches(cfg)`. Every error
        names the file; a file without a params fingerprint (written before they existed)
        loads with a warning, and `prune` cannot check it belongs to the params it cuts."""
        path = os.fspath(path)
        data = files.read_npz(path, (_META_KEY, *_ARRAY_FIELDS), written_by=_WRITER)
        meta = files.parse_json(str(data[_META_KEY]), f"{path} ({_META_KEY})", _WRITER)
        if not isinstance(meta, dict) or "model_config" not in meta:
            raise ValueError(f"{path} has no model_config in its {_META_KEY!r} entry; it is "
                             f"damaged: rewrite it ({_WRITER})")
        if meta.get("params_fingerprint") is None:
            warnings.warn(f"{path} holds no params fingerprint (written before they existed): "
                          "prune.prune cannot check that these scores belong to the params "
                          "it cuts; re-score and save to have it checked", stacklevel=2)
        arrays = {name: jnp.asarray(data[name]) for name in _ARRAY_FIELDS}
        scores = cls(**arrays, model_config=meta["model_config"], method=meta.get("method", {}),
                     params_fingerprint=meta.get("params_fingerprint"))
        scores.check_matches(scores.model_config)
        if cfg is not None:
            scores.check_matches(cfg)
        return scores


# ------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class _Settings:
    batch_agg: str
    seq_agg: str
    neuron_method: str


def _settings(aggregation: str | tuple[str, str], neuron_method: str) -> _Settings:
    if isinstance(aggregation, str):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is unknown; choose one of "
                             f"{sorted(AGGREGATIONS)} or a pair (over_batch, over_sequence) "
                             f"from {_REDUCTIONS}")
        batch_agg, seq_agg = AGGREGATIONS[aggregation]
    else:
        pair = tuple(aggregation)
        if len(pair) != 2 or any(r not in _REDUCTIONS for r in pair):
            raise ValueError(f"aggregation={aggregation!r} must be a name in "
                             f"{sorted(AGGREGATIONS)} or a pair (over_batch, over_sequence) "
                             f"with each in {_REDUCTIONS}")
        batch_agg, seq_agg = pair
    if neuron_method not in NEURON_METHODS:
        raise ValueError(f"neuron_method={neuron_method!r} is unknown; choose one of "
                         f"{NEURON_METHODS}")
    return _Settings(batch_agg, seq_agg, neuron_method)


# ------------------------------------------------------------------- per-batch reductions


def _per_sequence(a_BLX: jax.Array, w_BL: jax.Array, seq_agg: str) -> jax.Array:
    """Reduce a per-token value over each row's valid positions: [B, L, ...] -> [B, ...]."""
    a = a_BLX.astype(jnp.float32)
    if seq_agg == "l2":
        return jnp.sqrt(jnp.einsum("BL,BL...->B...", w_BL, a * a))
    inv_n = 1.0 / jnp.maximum(jnp.sum(w_BL, axis=1), 1.0)
    inv_n = inv_n.reshape(inv_n.shape + (1,) * (a.ndim - 2))  # [B, 1, ...]
    mean = jnp.einsum("BL,BL...->B...", w_BL, a) * inv_n
    if seq_agg == "mean":
        return mean
    centred = a - jnp.expand_dims(mean, 1)
    return jnp.einsum("BL,BL...->B...", w_BL, centred * centred) * inv_n


def _layer_reductions(settings: _Settings, acts: dict[str, jax.Array], w_BL: jax.Array
                      ) -> Stats:
    """One layer's activations -> small float32 statistics (sums over this batch's tokens,
    per-sequence values for the aggregated scores)."""
    x_in = acts["block_in"].astype(jnp.float32)
    x_out = acts["block_out"].astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    norm_in_BL = jnp.linalg.norm(x_in, axis=-1)
    norm_out_BL = jnp.linalg.norm(x_out, axis=-1)
    cos_BL = jnp.sum(x_in * x_out, axis=-1) / jnp.maximum(norm_in_BL * norm_out_BL, tiny)
    ratio_BL = norm_out_BL / jnp.maximum(norm_in_BL, tiny)
    act_abs_BLF = jnp.abs(acts["mlp_act"].astype(jnp.float32))
    heads = acts["attn_heads"].astype(jnp.float32)
    head_norm_BLH = jnp.sqrt(jnp.sum(heads * heads, axis=-1))
    per_seq = functools.partial(_per_sequence, w_BL=w_BL, seq_agg=settings.seq_agg)
    stats: Stats = {
        "cos": jnp.sum(w_BL * cos_BL),
        "ratio": jnp.sum(w_BL * ratio_BL),
        "head": per_seq(head_norm_BLH),
        "channel": jnp.stack([per_seq(jnp.abs(acts[name]))  # [2, B, D]
                              for name in ("attn_norm_out", "mlp_norm_out")]),
    }
    if settings.neuron_method == "minitron":
        stats["neuron"] = per_seq(act_abs_BLF)
    else:
        stats["neuron_abs"] = jnp.einsum("BL,BLF->F", w_BL, act_abs_BLF)
    return stats


def _residual_second_moment(acts: dict[str, jax.Array], w_BL: jax.Array) -> jax.Array:
    """Σ x xᵀ over valid tokens at both norm inputs of one layer, [D, D], float32 accumulate.

    One side is masked (w is 0/1, so w² = w); one einsum per site, as stacking the two sites
    first made XLA:CPU copy them and run at half speed.
    """
    d = acts["block_in"].shape[-1]
    cov_DD = jnp.zeros((d, d), jnp.float32)
    for x_BLD in (acts["block_in"], acts["mlp_in"]):
        masked_BLD = x_BLD * w_BL[..., None].astype(x_BLD.dtype)
        # i, j: the two copies of D of a D × D covariance.
        cov_DD += jnp.einsum("BLi,BLj->ij", masked_BLD, x_BLD,
                             preferred_element_type=jnp.float32)
    return cov_DD


def _sown(state: dict[str, Any]) -> dict[str, jax.Array]:
    """Flatten a Block's sown intermediates ({name: (value,)}, nested under attn/mlp)."""
    sown = state["intermediates"]
    found = {}
    for scope in (sown, sown.get("attn", {}), sown.get("mlp", {})):
        found.update({k: v[0] for k, v in scope.items() if isinstance(v, tuple)})
    return found


def _batch_statistics(cfg: ModelConfig, settings: _Settings, params: model.Params,
                      batch: dict[str, jax.Array]) -> Stats:
    """Run the blocks over one batch, reducing each layer's activations inside the scan.

    Per layer (stacked [N, ...]): sums of cos / norm ratio over valid tokens and per-sequence
    values [N, B, ...]; plus Σ x xᵀ summed over layers. Logits are never computed.
    """
    tokens_BL, segment_ids_BL, positions_BL = (batch["tokens"], batch["segment_ids"],
                                               batch["positions"])
    w_BL = (segment_ids_BL > 0).astype(jnp.float32)
    tables = model.position_tables(cfg, positions_BL)
    mask_BLM = model.SegmentMask(segment_ids_BL, positions_BL)
    x_BLD = model.Decoder(cfg).apply({"params": params}, tokens_BL,
                                     method=lambda decoder, t: decoder.embed(t))
    block = model.Block(cfg)

    def body(carry, layer_params):
        x_BLD, cov_DD = carry
        (x_BLD, _), state = block.apply({"params": layer_params}, x_BLD, tables, mask_BLM,
                                        mutable=["intermediates"])
        acts = _sown(state)
        cov_DD = cov_DD + _residual_second_moment(acts, w_BL)
        return (x_BLD, cov_DD), _layer_reductions(settings, acts, w_BL)

    cov0 = jnp.zeros((cfg.d_model, cfg.d_model), jnp.float32)
    (_, cov_DD), per_layer = jax.lax.scan(body, (x_BLD, cov0), params["layers"])
    n_B = jnp.sum(w_BL, axis=1)
    return dict(per_layer, cov=cov_DD, n_tokens=jnp.sum(segment_ids_BL > 0, dtype=jnp.int32),
                row_weight=(n_B > 0).astype(jnp.float32))


# ------------------------------------------------------------------ streaming accumulation

_AGGREGATED = ("neuron", "head", "channel")  # per-sequence values, axis of B given below
_SEQ_AXIS = {"neuron": 1, "head": 1, "channel": 2}  # [N, B, F], [N, B, H], [N, 2, B, D]


def _empty_moments(shape: tuple[int, ...]) -> Stats:
    return {"mean": jnp.zeros(shape, jnp.float32), "m2": jnp.zeros(shape, jnp.float32)}


def _empty_accumulators(cfg: ModelConfig, settings: _Settings) -> Stats:
    """Zeros of every accumulated statistic: float32 sums and moments, int32 counts."""
    n, d = cfg.n_layers, cfg.d_model
    acc: Stats = {
        "n_tokens": jnp.zeros((), jnp.int32), "n_seq": jnp.zeros((), jnp.int32),
        "cos": jnp.zeros((n,), jnp.float32), "ratio": jnp.zeros((n,), jnp.float32),
        "cov": jnp.zeros((d, d), jnp.float32),
        "head": _empty_moments((n, cfg.n_heads)), "channel": _empty_moments((n, 2, d)),
    }
    if settings.neuron_method == "minitron":
        acc["neuron"] = _empty_moments((n, cfg.d_ff))
    else:
        acc["neuron_abs"] = jnp.zeros((n, cfg.d_ff), jnp.float32)
    return acc


def _merge_moments(acc: Stats, n_acc: jax.Array, s: jax.Array, row_weight_B: jax.Array,
                   axis: int) -> Stats:
    """Chan et al.'s parallel update of (mean, M2) with this batch's per-sequence values."""
    w = jnp.expand_dims(row_weight_B, tuple(range(axis)) + tuple(range(axis + 1, s.ndim)))
    n_acc, n_b = n_acc.astype(jnp.float32), jnp.sum(row_weight_B)
    mean_b = jnp.sum(w * s, axis=axis) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.sum(w * (s - jnp.expand_dims(mean_b, axis)) ** 2, axis=axis)
    n = n_acc + n_b
    delta = mean_b - acc["mean"]
    return {"mean": acc["mean"] + delta * (n_b / jnp.maximum(n, 1.0)),
            "m2": acc["m2"] + m2_b + delta * delta * (n_acc * n_b / jnp.maximum(n, 1.0))}


def _accumulate(cfg: ModelConfig, settings: _Settings, acc: Stats, params: model.Params,
                batch: dict[str, jax.Array]) -> Stats:
    """Fold one batch into the running statistics (pure; jitted by `estimate_importance`)."""
    stats = _batch_statistics(cfg, settings, params, batch)
    new = {name: acc[name] + stats[name] for name in ("n_tokens", "cos", "ratio", "cov")}
    if "neuron_abs" in acc:
        new["neuron_abs"] = acc["neuron_abs"] + stats["neuron_abs"]
    for name in _AGGREGATED:
        if name in acc:
            new[name] = _merge_moments(acc[name], acc["n_seq"], stats[name],
                                       stats["row_weight"], _SEQ_AXIS[name])
    new["n_seq"] = acc["n_seq"] + jnp.sum(stats["row_weight"]).astype(jnp.int32)
    return new


def _over_batch(moments: Stats, n_seq: int, batch_agg: str) -> np.ndarray:
    if batch_agg == "mean":
        return moments["mean"]
    if batch_agg == "var":
        return moments["m2"] / n_seq
    return np.sqrt(moments["m2"] + n_seq * moments["mean"] ** 2)


def _finalize(cfg: ModelConfig, settings: _Settings, acc: Stats, n_batches: int) -> Importance:
    """Accumulated statistics -> `Importance` (see the module docstring for the formulas)."""
    acc = jax.device_get(acc)
    n_tokens, n_seq = int(acc["n_tokens"]), int(acc["n_seq"])
    if n_tokens == 0:
        raise ValueError("no calibration tokens were seen: `batches` was empty or every "
                         "position was padding (segment_ids == 0); pass batches with text")
    over_batch = functools.partial(_over_batch, n_seq=n_seq, batch_agg=settings.batch_agg)
    if settings.neuron_method == "minitron":
        neuron = over_batch(acc["neuron"])
    else:
        neuron = acc["neuron_abs"] / n_tokens
    head = over_batch(acc["head"])
    kv_group = head.reshape(cfg.n_layers, cfg.n_kv_heads, cfg.n_groups).sum(-1)
    scores = {
        "layer_block_influence": 1.0 - acc["cos"] / n_tokens,
        "layer_norm_ratio": acc["ratio"] / n_tokens,
        "neuron": neuron, "head": head, "kv_group": kv_group,
        "channel": over_batch(acc["channel"]).sum(axis=(0, 1)),
        "residual_cov": acc["cov"] / (2 * cfg.n_layers * n_tokens),
        "n_tokens": n_tokens,
    }
    method = {"aggregation": [settings.batch_agg, settings.seq_agg],
              "neuron_method": settings.neuron_method, "n_sequences": n_seq,
              "n_batches": n_batches}
    return Importance(**{k: jnp.asarray(v, jnp.float32) for k, v in scores.items()},
                      model_config=cfg.to_dict(), method=method)


# --------------------------------------------------------------------------- entry point


def host_batch(batch: Mapping[str, Any] | np.ndarray | jax.Array,
               vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """A calibration batch as int32 numpy tokens/segment_ids/positions [B, L].

    Accepts a plain [B, L] token array (one unpadded document per row) or a dict with
    `tokens` and optionally `segment_ids` (0 = padding) and `positions`. Token ids outside
    [0, vocab_size) (or not fitting int32) are refused before the cast, naming the id.
    """
    if not isinstance(batch, Mapping):
        batch = {"tokens": batch}
    if "tokens" not in batch:
        raise ValueError(f"a calibration batch needs 'tokens'; got keys {sorted(batch)}")
    token_ids.check(batch["tokens"], vocab_size, where="calibration batch tokens")
    tokens = np.asarray(batch["tokens"], np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    segment_ids = batch.get("segment_ids")
    segment_ids = (np.ones_like(tokens) if segment_ids is None
                   else np.asarray(segment_ids, np.int32))
    positions = batch.get("positions")
    if positions is None:
        positions = np.asarray(model.positions_from_segments(jnp.asarray(segment_ids)))
    return {"tokens": tokens, "segment_ids": segment_ids,
            "positions": np.asarray(positions, np.int32)}


@functools.lru_cache(maxsize=32)
def _compiled_step(cfg: ModelConfig, settings: _Settings, mesh: Mesh | None):
    """The jitted `_accumulate`, cached so repeated scoring of one model compiles once."""
    step = functools.partial(_accumulate, cfg, settings)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    acc_sh = jax.tree.map(lambda _: sharding.replicated(mesh),
                          jax.eval_shape(lambda: _empty_accumulators(cfg, settings)))
    return jax.jit(sharding.traced_on_mesh(step, mesh), donate_argnums=0,
                   in_shardings=(acc_sh, sharding.param_shardings(cfg, mesh),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=acc_sh)


def estimate_importance(cfg: ModelConfig, params: model.Params,
                        batches: Iterable[Mapping[str, Any] | np.ndarray], *,
                        mesh: Mesh | None = None,
                        aggregation: str | tuple[str, str] = "l2_mean",
                        neuron_method: str = "minitron", max_batches: int | None = None,
                        progress: bool = True) -> Importance:
    """Score layers, heads, KV groups, FFN neurons and hidden channels in one pass.

    `batches` yields host batches (dicts of int32 [B, L] `tokens`, `segment_ids`, `positions`,
    or plain [B, L] token arrays); with a `mesh`, each is sharded with `sharding.shard_batch`
    and params are expected in (or moved to) `sharding.param_shardings(cfg, mesh)`. Padding
    (segment_ids == 0) never counts. `aggregation` is a name in `AGGREGATIONS` or a pair
    (over_batch, over_sequence); defaults follow Minitron.
    """
    settings = _settings(aggregation, neuron_method)
    step = _compiled_step(cfg, settings, mesh)
    acc = _empty_accumulators(cfg, settings)
    if mesh is not None:
        acc = jax.device_put(acc, sharding.replicated(mesh))
        params = sharding.shard_like(params, sharding.param_shardings(cfg, mesh))
    bar = tqdm.tqdm(desc="importance", unit="batch", dynamic_ncols=True,
                    disable=not progress or jax.process_index() != 0)
    n_batches = 0
    for batch in itertools.islice(batches, max_batches):  # never pulls a batch it won't use
        host = host_batch(batch, cfg.vocab_size)
        device = (sharding.shard_batch(host, mesh) if mesh is not None
                  else {k: jnp.asarray(v) for k, v in host.items()})
        acc = step(acc, params, device)
        n_batches += 1
        bar.update(1)
    bar.close()
    scores = _finalize(cfg, settings, acc, n_batches)
    return scores.replace(params_fingerprint=params_fingerprint(params))
