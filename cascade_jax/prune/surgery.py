"""Structured pruning surgery: pure functions `(cfg, params, ...) -> (child_cfg, child_params)`.

Every slicing edit is one mechanism, a checked `Take`: keep `index` along a logical axis
(`model.param_logical_axes`: 'layers', 'embed', 'heads', 'kv_heads', 'mlp') of *every* tensor
that carries that axis, and assert how many tensors were touched and their new shapes (the
idea of penzai's `selectors.assert_count_is`). So depth is a Take on 'layers'; FFN neurons on
'mlp' (W_gate/W_up columns and W_down rows together); query heads on 'heads' (wq and wo); KV
groups on 'kv_heads' (wk, wv) plus their query heads; hidden channels on 'embed' (embedding,
all norms, all projections, LM head). Qwen's q/k/v biases (arXiv 2407.10671) carry 'heads' /
'kv_heads' and go with their heads; its q/k norm scales (Qwen3, arXiv 2505.09388) carry only
'head_dim', shared by every head, and stay. Neither has an 'embed' axis, so hidden cuts and the
PCA rotation leave them alone: a bias is added after the projection, x Q · Qᵀ W + b = x W + b.
Per-layer choices (different neurons or heads in every layer) are `[N, k]` indices, one row
per layer. Adam's mu/nu mirror the param tree, so the same Takes prune them in lockstep. A
final check compares every child shape with `model.param_shapes(child_cfg)`. Nothing removed
means nothing edited: bit-identical to the parent.

`prune` composes the edits from importance scores (higher = keep; `importance.Importance`), in
this order: depth first (layer scores), then heads and FFN on the kept layers (their rows of
the per-layer scores), then the hidden dimension.

Hidden dimension, two methods:
- 'channel' (Minitron, arXiv 2407.14679): keep the top channels of the residual stream.
- 'pca' (Ministral 3, arXiv 2601.08584; SliceGPT, arXiv 2401.15024): fold every RMSNorm scale
  into the matrices that read its output (attention norm → wq/wk/wv rows, FFN norm →
  w_gate/w_up rows, final norm → LM head rows), then rotate the residual stream by Q, the
  eigenvectors of the residual second moment E[x xᵀ] (descending eigenvalue): matrices that
  write the residual (embedding, wo, w_down) become W Q, those that read it Qᵀ W, and keep the
  first d_model' columns of Q. With unit norm scales RMSNorm(x Q) = RMSNorm(x) Q exactly, so a
  full-width rotation is the parent to float rounding. Folding the final norm into the head
  breaks tied embeddings (the embedding wants E Q, the head Qᵀ diag(s) Eᵀ), so a tied parent
  gets an untied child (`tie_embeddings=False`, + vocab·d_model' params; recorded) unless the
  target asks for tied embeddings: then the head is dropped and s returns as the final norm
  scale diag(Qᵀ diag(s) Q) (exact for a uniform s).
  Adam state cannot follow a rotation (nu is elementwise squared gradients, not equivariant),
  so `prune` refuses `opt_state` with 'pca': start the child's optimizer fresh.

Tying (`Target(tie_embeddings=True)` on an untied parent, Ministral 3's 8B → tied 3B) keeps the
input embedding as the head and drops the parent's head: exact only when that head was Eᵀ,
otherwise a starting point that distillation repairs. Untying copies Eᵀ into a new head: exact.

RMSNorm after narrowing: our RMSNorm averages x² over the *current* width, so a child of
width D' would divide by D' where the parent divided by D. SliceGPT keeps dividing by the
original width (its `RMSN(mean_dim)` computes Σx² / mean_dim). We get the same with an
unchanged model: multiply the residual stream by c = sqrt(D'/D) (embedding, wo, w_down) and
divide every norm scale by c (the final norm by c² when the embedding is also the head). Then
mean(x'²) over D' equals Σx² / D, including the epsilon, so removing channels that carry no
signal (or PCA directions with zero variance) is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cascade_jax import model, paths
from cascade_jax.config import ModelConfig
from cascade_jax.prune.target import Target

Params = model.Params
Flat = dict[str, Any]
Layout = Mapping[str, tuple[str | None, ...]]

DEPTH_METHODS = ("block_influence", "norm_ratio", "contiguous")
HEAD_METHODS = ("within_group", "kv_groups")
HIDDEN_METHODS = ("channel", "pca")
INITS = ("pruned", "random")  # how `child_config`'s child gets its weights

# How many decoder tensors carry each logical axis (model.py's param tree): the plain decoder's,
# plus those of the q/k/v biases (bq on 'heads', bk and bv on 'kv_heads') and q/k norm scales
# ('head_dim' only, shared by every head) when the config has them; all of them on 'layers'.
# An edit touching any other number means the layout changed under the surgery, which must
# then be updated.
_AXIS_COUNTS = {"layers": 9, "mlp": 3, "heads": 2, "kv_heads": 2}
_BIAS_AXIS_COUNTS = {"layers": 3, "heads": 1, "kv_heads": 2}
_QK_NORM_AXIS_COUNTS = {"layers": 2}
_EMBEDDING, _LM_HEAD, _FINAL_NORM = "embed/embedding", "lm_head/kernel", "final_norm/scale"
# The matrices that read each RMSNorm's output (where a norm scale folds before a rotation).
_NORM_READERS = {
    "layers/attn_norm/scale": ("layers/attn/wq", "layers/attn/wk", "layers/attn/wv"),
    "layers/mlp_norm/scale": ("layers/mlp/w_gate", "layers/mlp/w_up"),
    _FINAL_NORM: (_LM_HEAD,),
}


class SurgeryError(RuntimeError):
    """An edit touched an unexpected set of tensors or produced a wrong shape (a bug)."""


# ------------------------------------------------------------------------------ layout


def _axis_count(cfg: ModelConfig, axis: str) -> int:
    """How many of `cfg`'s tensors an edit on logical `axis` must touch."""
    return (_AXIS_COUNTS[axis] + cfg.qkv_bias * _BIAS_AXIS_COUNTS.get(axis, 0)
            + cfg.qk_norm * _QK_NORM_AXIS_COUNTS.get(axis, 0))


@functools.lru_cache(maxsize=64)
def _layout_items(cfg: ModelConfig) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
    specs = paths.flatten(model.param_logical_axes(cfg))
    return tuple((path, tuple(spec)) for path, spec in sorted(specs.items()))


def layout(cfg: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of every param, keyed by its path (`paths`; no allocation)."""
    return dict(_layout_items(cfg))


@functools.lru_cache(maxsize=64)
def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    flat = paths.flatten(model.param_shapes(cfg))
    return {path: tuple(s.shape) for path, s in flat.items()}


def _norm_like(axes: tuple[str | None, ...]) -> bool:
    """A norm scale: its only non-layer axis is 'embed'."""
    return tuple(a for a in axes if a != "layers") == ("embed",)


def _finish(child: ModelConfig, flat: Flat) -> Params:
    """Check every child tensor against the shapes `child` implies, then rebuild the tree."""
    want = _shapes(child)
    got = {path: tuple(np.shape(x)) for path, x in flat.items()}
    if got != want:
        bad = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
        raise SurgeryError("pruned params do not match the child config at "
                           + "; ".join(f"{p}: {got.get(p)} vs {want.get(p)}" for p in bad))
    return paths.unflatten(flat)


# -------------------------------------------------------------------------- the one edit


@dataclasses.dataclass(frozen=True)
class Take:
    """Keep `index` along logical `axis` in every tensor that has it; exactly `count` must.

    `index` is `[k]` (the same for every layer) or `[N, k]` (one row per layer; the tensor's
    'layers' axis picks the row).
    """

    axis: str
    index: np.ndarray
    count: int


def take(flat: Flat, lay: Layout, edit: Take) -> Flat:
    """Apply one checked `Take` to a flat `{path: array}` tree laid out as `lay`.

    `flat` is `paths.flatten(params)` (or of a copy of them inside an optimizer state) and
    `lay` is `layout(cfg)`; `paths.unflatten` turns the result back into a param tree.
    """
    if set(flat) != set(lay):
        raise SurgeryError(f"tree paths {sorted(set(flat) ^ set(lay))} are not in both the "
                           "tree and its layout")
    index = np.asarray(edit.index)
    out, touched = dict(flat), []
    for path, axes in lay.items():
        if edit.axis not in axes:
            continue
        x, ax = flat[path], axes.index(edit.axis)
        if index.ndim == 1:
            y = jnp.take(x, index, axis=ax)
        else:
            if "layers" not in axes or x.shape[axes.index("layers")] != index.shape[0]:
                raise SurgeryError(f"per-layer index {index.shape} does not fit {path} "
                                   f"{tuple(x.shape)} with axes {axes}")
            shape = [1] * x.ndim
            shape[axes.index("layers")], shape[ax] = index.shape
            y = jnp.take_along_axis(x, jnp.asarray(index).reshape(shape), axis=ax)
        want = (*x.shape[:ax], index.shape[-1], *x.shape[ax + 1:])
        if y.shape != want:
            raise SurgeryError(f"{path}: Take on {edit.axis!r} gave {y.shape}, expected {want}")
        out[path] = y
        touched.append(path)
    if len(touched) != edit.count:
        raise SurgeryError(f"Take on {edit.axis!r} touched {len(touched)} tensors {touched}, "
                           f"expected {edit.count}; the param layout changed, update surgery")
    return out


def _apply(flat: Flat, lay: Layout, edits: Sequence[Take]) -> Flat:
    for edit in edits:
        flat = take(flat, lay, edit)
    return flat


def _broadcast(v: jax.Array, v_axes: tuple[str | None, ...], x_axes: tuple[str | None, ...]
               ) -> jax.Array:
    """Reshape `v` so each of its named axes lines up with the same name in `x_axes`."""
    positions = [x_axes.index(a) for a in v_axes]
    if positions != sorted(positions):
        raise SurgeryError(f"axes {v_axes} are not in the order of {x_axes}")
    shape = [1] * len(x_axes)
    for pos, size in zip(positions, v.shape, strict=True):
        shape[pos] = size
    return v.reshape(shape)


def _scale_residual(flat: Flat, lay: Layout, c: float, tied: bool) -> Flat:
    """Multiply the residual stream by `c` and divide norm scales by `c` (see module doc)."""
    out = dict(flat)
    writers = [p for p, a in lay.items() if a[-1] == "embed" and not _norm_like(a)]
    norms = [p for p, a in lay.items() if _norm_like(a)]
    if len(writers) != 3 or len(norms) != 3:
        raise SurgeryError(f"expected 3 residual writers and 3 norms, got {writers}, {norms}")
    for path in writers:
        out[path] = (flat[path].astype(jnp.float32) * c).astype(flat[path].dtype)
    for path in norms:
        div = c * c if tied and path == _FINAL_NORM else c
        out[path] = (flat[path].astype(jnp.float32) / div).astype(flat[path].dtype)
    return out


def _retie(flat: Flat, tied: bool) -> Flat:
    """Make the head match `tied`. Untying starts the head as Eᵀ (exact); tying keeps the
    input embedding as the head too and drops the parent's head (an approximation that
    distillation repairs, exact when the parent's head was Eᵀ)."""
    flat = dict(flat)
    if tied:
        flat.pop(_LM_HEAD, None)
    elif _LM_HEAD not in flat:
        flat[_LM_HEAD] = flat[_EMBEDDING].T
    return flat


def _tie_rotated(flat: Flat, final_scale_D: Any, q_DP: np.ndarray, c: float) -> Flat:
    """Tie after a PCA rotation, which folded the final norm scale s into the head.

    The rotated embedding c·E·Q becomes the head again, so s must come back as a norm scale
    in the rotated basis: diag(Qᵀ diag(s) Q), the closest diagonal to the rotated scale
    (exact when s is uniform), divided by c² like any tied final norm (module doc).
    """
    s = _float64(final_scale_D)
    q = _float64(q_DP)
    scale_P = (q * q).T @ s / (c * c)
    flat = _retie(flat, tied=True)
    flat[_FINAL_NORM] = jnp.asarray(scale_P, flat[_FINAL_NORM].dtype)
    return flat


# ---------------------------------------------------------------------------- indices


def _as_index(name: str, index: Any, size: int, n_rows: int | None = None) -> np.ndarray:
    """Validate kept indices: integers in [0, size), unique per row; [k] or [n_rows, k]."""
    arr = np.asarray(index)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer indices, got dtype {arr.dtype}")
    ndims = (1,) if n_rows is None else (1, 2)
    if arr.ndim not in ndims or arr.shape[-1] == 0:
        want = "[k]" if n_rows is None else f"[k] or [{n_rows}, k] (one row per layer)"
        raise ValueError(f"{name} must be a non-empty {want} array, got shape {arr.shape}")
    if arr.ndim == 2 and arr.shape[0] != n_rows:
        raise ValueError(f"{name} has {arr.shape[0]} rows but the model has {n_rows} layers")
    if arr.min() < 0 or arr.max() >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values from {arr.min()} to "
                         f"{arr.max()}")
    if (np.diff(np.sort(arr, axis=-1), axis=-1) == 0).any():
        raise ValueError(f"{name} has repeated indices: {arr.tolist()}; keep each at most once")
    return arr.astype(np.int32)


def _float64(x: Any) -> np.ndarray:
    """A host float64 copy (asking jax for float64 directly warns when x64 is off)."""
    return np.asarray(x).astype(np.float64)


def top_k(scores: Any, k: int) -> np.ndarray:
    """Indices of the `k` highest scores along the last axis, in ascending index order
    (original order preserved; ties keep the lower index)."""
    s = _float64(scores)
    if not np.isfinite(s).all():
        raise ValueError("importance scores contain NaN or inf; recompute them (a NaN score "
                         "usually means the calibration pass overflowed)")
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1).astype(np.int32)


def _heads_of_groups(groups_NK: np.ndarray, n_groups: int) -> np.ndarray:
    """Query heads of the kept KV heads (query head h uses KV head h // G)."""
    heads = groups_NK[..., None] * n_groups + np.arange(n_groups)
    return heads.reshape(*groups_NK.shape[:-1], -1).astype(np.int32)


# ------------------------------------------------------------- individual surgeries


def keep_layers(cfg: ModelConfig, params: Params, layers: Sequence[int]
                ) -> tuple[ModelConfig, Params]:
    """Keep the blocks `layers` (increasing parent indices); the others are skipped."""
    idx = _as_index("layers", layers, cfg.n_layers)
    if (np.diff(idx) <= 0).any():
        raise ValueError(f"layers={idx.tolist()} must be increasing: blocks run in order; "
                         "sort them")
    child = cfg.replace(n_layers=len(idx))
    return child, _finish(child, take(paths.flatten(params), layout(cfg),
                                      Take("layers", idx, _axis_count(cfg, "layers"))))


def keep_neurons(cfg: ModelConfig, params: Params, neurons: Any) -> tuple[ModelConfig, Params]:
    """Keep FFN neurons (W_gate/W_up columns and W_down rows): `[k]` or per layer `[N, k]`."""
    idx = _as_index("neurons", neurons, cfg.d_ff, cfg.n_layers)
    child = cfg.replace(d_ff=idx.shape[-1])
    return child, _finish(child, take(paths.flatten(params), layout(cfg),
                                      Take("mlp", idx, _axis_count(cfg, "mlp"))))


def _query_heads_edit(cfg: ModelConfig, heads: Any) -> tuple[ModelConfig, Take]:
    idx = _as_index("query heads", heads, cfg.n_heads, cfg.n_layers)
    kept, k = idx.shape[-1], cfg.n_kv_heads
    if kept % k:
        raise ValueError(f"keeping {kept} query heads with n_kv_heads={k} leaves an unequal "
                         f"number per KV group; keep a multiple of {k}, or drop whole groups "
                         "with keep_kv_groups")
    group_of_slot = np.arange(kept) // (kept // k)
    if (idx // cfg.n_groups != group_of_slot).any():
        raise ValueError(f"query heads {idx.tolist()} must keep {kept // k} heads of every KV "
                         f"group, listed group by group (child head j uses KV head "
                         f"j // {kept // k}); parent head h belongs to group h // "
                         f"{cfg.n_groups}")
    return cfg.replace(n_heads=kept), Take("heads", idx, _axis_count(cfg, "heads"))


def keep_query_heads(cfg: ModelConfig, params: Params, heads: Any
                     ) -> tuple[ModelConfig, Params]:
    """Keep the same number of query heads in every KV group (n_kv_heads unchanged).

    `heads` is `[H']` or per layer `[N, H']`, grouped: child head j must come from KV group
    j // (H' / n_kv_heads).
    """
    child, edit = _query_heads_edit(cfg, heads)
    return child, _finish(child, take(paths.flatten(params), layout(cfg), edit))


def _kv_groups_edit(cfg: ModelConfig, groups: Any) -> tuple[ModelConfig, list[Take]]:
    idx = _as_index("kv groups", groups, cfg.n_kv_heads, cfg.n_layers)
    child = cfg.replace(n_heads=idx.shape[-1] * cfg.n_groups, n_kv_heads=idx.shape[-1])
    heads = _heads_of_groups(idx, cfg.n_groups)
    return child, [Take("kv_heads", idx, _axis_count(cfg, "kv_heads")),
                   Take("heads", heads, _axis_count(cfg, "heads"))]


def keep_kv_groups(cfg: ModelConfig, params: Params, groups: Any) -> tuple[ModelConfig, Params]:
    """Keep whole KV groups (a KV head and its G query heads): `[K']` or per layer `[N, K']`."""
    child, edits = _kv_groups_edit(cfg, groups)
    return child, _finish(child, _apply(paths.flatten(params), layout(cfg), edits))


def _embed_count(cfg: ModelConfig) -> int:
    """Tensors with a hidden axis: embedding, 9 per layer, final norm, LM head if untied."""
    return 11 + (not cfg.tie_embeddings)


def keep_channels(cfg: ModelConfig, params: Params, channels: Sequence[int]
                  ) -> tuple[ModelConfig, Params]:
    """Keep hidden channels `channels` (any order) in every tensor, then rescale the residual
    stream so RMSNorm still averages over the parent's width (module docstring)."""
    idx = _as_index("channels", channels, cfg.d_model)
    child = cfg.replace(d_model=len(idx))
    lay = layout(cfg)
    flat = take(paths.flatten(params), lay, Take("embed", idx, _embed_count(cfg)))
    if len(idx) < cfg.d_model:
        flat = _scale_residual(flat, lay, math.sqrt(len(idx) / cfg.d_model), cfg.tie_embeddings)
    return child, _finish(child, flat)


def pca_rotation(cov_DD: Any, d_model: int) -> np.ndarray:
    """The first `d_model` principal directions of a [D, D] second moment, as [D, d_model]
    float32 (columns by descending eigenvalue; eigh in float64)."""
    cov = _float64(cov_DD)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square [D, D], got shape {cov.shape}")
    if not np.isfinite(cov).all():
        raise ValueError("covariance contains NaN or inf; recompute the importance scores")
    if not 1 <= d_model <= cov.shape[0]:
        raise ValueError(f"d_model={d_model} must be in [1, {cov.shape[0]}]")
    _, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return np.ascontiguousarray(vecs[:, ::-1][:, :d_model]).astype(np.float32)


def _fold_norms(flat: Flat, lay: Layout) -> tuple[Flat, dict[str, tuple[str | None, ...]]]:
    """Fold every norm scale into the matrices that read its output; scales become 1.

    A tied embedding first gets its own head (`lm_head/kernel` = Eᵀ), because the folded head
    and the rotated embedding differ.
    """
    flat, lay = dict(flat), dict(lay)
    if _LM_HEAD not in flat:
        flat[_LM_HEAD], lay[_LM_HEAD] = flat[_EMBEDDING].T, ("embed", "vocab")
    readers = {p for p, a in lay.items() if "embed" in a and a[-1] != "embed"}
    folded = set()
    for norm, norm_readers in _NORM_READERS.items():
        scale = flat[norm].astype(jnp.float32)
        for path in norm_readers:
            w = flat[path]
            flat[path] = (w.astype(jnp.float32)
                          * _broadcast(scale, lay[norm], lay[path])).astype(w.dtype)
            folded.add(path)
        flat[norm] = jnp.ones_like(flat[norm])
    if folded != readers:
        raise SurgeryError(f"folded {sorted(folded)} but the residual readers are "
                           f"{sorted(readers)}; update _NORM_READERS for the new layout")
    return flat, lay


def _rotate(flat: Flat, lay: Layout, q_DP: np.ndarray) -> Flat:
    """Contract the 'embed' axis of every matrix with Q ([D, D']); unit norm scales → [D']."""
    q = jnp.asarray(q_DP, jnp.float32)
    out, rotated = dict(flat), []
    for path, axes in lay.items():
        if "embed" not in axes:
            continue
        x, ax = flat[path], axes.index("embed")
        if _norm_like(axes):
            out[path] = jnp.ones((*x.shape[:-1], q.shape[1]), x.dtype)
            continue
        y = jnp.tensordot(x.astype(jnp.float32), q, axes=([ax], [0]),
                          precision=jax.lax.Precision.HIGHEST)
        out[path] = jnp.moveaxis(y, -1, ax).astype(x.dtype)
        rotated.append(path)
    if len(rotated) != 9:
        raise SurgeryError(f"rotated {rotated}; expected the embedding, LM head and 7 "
                           "per-layer matrices")
    return out


def _pca_flat(cfg: ModelConfig, flat: Flat, q_DP: np.ndarray) -> Flat:
    flat, lay = _fold_norms(flat, layout(cfg))
    flat = _rotate(flat, lay, q_DP)
    if q_DP.shape[1] < cfg.d_model:
        flat = _scale_residual(flat, lay, math.sqrt(q_DP.shape[1] / cfg.d_model), tied=False)
    return flat


def _check_rotation(d_model: int, rotation: Any) -> np.ndarray:
    q = _float64(rotation)
    if q.ndim != 2 or q.shape[0] != d_model or not 1 <= q.shape[1] <= d_model:
        raise ValueError(f"rotation must be [d_model={d_model}, D'] with D' <= d_model, "
                         f"got shape {q.shape}")
    err = np.abs(q.T @ q - np.eye(q.shape[1])).max()
    if err > 1e-4:
        raise ValueError(f"rotation columns are not orthonormal (max |QᵀQ - I| = {err:.2g}); "
                         "use pca_rotation(cov, d_model) or another orthonormal basis")
    return q


def rotate_hidden(cfg: ModelConfig, params: Params, rotation_DP: Any
                  ) -> tuple[ModelConfig, Params]:
    """SliceGPT-style hidden pruning: fold norms, rotate the residual by `rotation_DP`
    ([D, D'], orthonormal columns, e.g. `pca_rotation`), keep D' channels. The child is
    always untied (module docstring)."""
    q = _check_rotation(cfg.d_model, rotation_DP)
    child = cfg.replace(d_model=q.shape[1], tie_embeddings=False)
    return child, _finish(child, _pca_flat(cfg, paths.flatten(params), q))


def hidden_map(d_model: int, *, channels: Sequence[int] | None = None,
               rotation: Any = None) -> np.ndarray:
    """The [d_model, D'] float32 matrix M taking a parent residual vector to the child's
    (child = parent @ M): c·(columns `channels` of the identity) after a channel cut,
    c·`rotation` after PCA, the identity when neither, with c = sqrt(D'/d_model) the residual
    rescale every narrowing applies (module docstring).

    Why: anything written into the residual from outside the decoder (a vision projector's
    output, in place of token embeddings) must be mapped by M to mean to the child what it
    meant to the parent. A child of a child: M_parent @ M_child.
    """
    if channels is not None and rotation is not None:
        raise ValueError("give channels (a channel cut) or rotation (PCA), not both")
    if rotation is not None:
        basis = _check_rotation(d_model, rotation)
    elif channels is not None:
        basis = np.eye(d_model)[:, _as_index("channels", channels, d_model)]
    else:
        basis = np.eye(d_model)
    return (basis * math.sqrt(basis.shape[1] / d_model)).astype(np.float32)


# ------------------------------------------------------------------------ the record


@dataclasses.dataclass
class PruneRecord:
    """What a prune kept, in parent indices, for the child checkpoint's lineage.

    Per-layer lists are indexed by child layer. `rotation` ([D, D'] float32, PCA only) is kept
    as an array: `to_dict` stores its shape, `arrays()` the values.
    """

    parent_config: dict[str, Any]
    child_config: dict[str, Any]
    target: dict[str, Any]
    methods: dict[str, Any]
    layers: list[int] | None = None
    query_heads: list[list[int]] | None = None
    kv_heads: list[list[int]] | None = None
    neurons: list[list[int]] | None = None
    channels: list[int] | None = None
    rotation: np.ndarray | None = None
    residual_scale: float = 1.0
    untied_embeddings: bool = False
    tied_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; the rotation is summarised (save `arrays()` alongside)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.rotation is not None:
            out["rotation"] = {"shape": list(self.rotation.shape),
                               "note": "parent→child residual basis; values in arrays()"}
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {} if self.rotation is None else {"rotation": self.rotation}

    @staticmethod
    def array_file(name: str) -> str:
        """The file an array of `arrays()` is kept in beside the record (`prune_rotation.npy`):
        one spelling for every writer (the cascade, experiments.prune) and reader (export)."""
        return f"prune_{name}.npy"

    def hidden_map(self) -> np.ndarray:
        """`hidden_map` of this prune: parent residual @ it = the child's ([D, D'])."""
        return hidden_map(int(self.parent_config["d_model"]), channels=self.channels,
                          rotation=self.rotation)


class Pruned(NamedTuple):
    """`prune`'s result. `opt_state` is the pruned optimizer state, or None if none was given."""

    cfg: ModelConfig
    params: Params
    record: PruneRecord
    opt_state: Any = None


# ------------------------------------------------------------------------------ prune


def _resolve_heads(cfg: ModelConfig, target: Target, head_method: str) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of the child, checked against what `head_method` can do."""
    h = cfg.n_heads if target.n_heads is None else target.n_heads
    k = cfg.n_kv_heads if target.n_kv_heads is None else target.n_kv_heads
    if (h, k) == (cfg.n_heads, cfg.n_kv_heads):
        return h, k
    g = cfg.n_groups
    if head_method == "kv_groups":
        if target.n_kv_heads is None:
            if h % g:
                raise ValueError(
                    f"n_heads={h} cannot come from whole KV groups of G={g} query heads; "
                    f"choose n_heads in {[g * i for i in range(1, cfg.n_kv_heads + 1)]}, or "
                    "head_method='within_group'")
            k = h // g
        if target.n_heads is None:
            h = k * g
        if h != k * g:
            raise ValueError(f"head_method='kv_groups' keeps G={g} query heads per KV head, so "
                             f"n_kv_heads={k} needs n_heads={k * g}, not {h}; or use "
                             "head_method='within_group' to thin heads inside each group")
        return h, k
    if k != cfg.n_kv_heads:
        raise ValueError(f"head_method='within_group' keeps all n_kv_heads={cfg.n_kv_heads}; "
                         f"to reach n_kv_heads={k} use head_method='kv_groups'")
    if h % k:
        valid = [k * i for i in range(1, g + 1)]
        raise ValueError(f"n_heads={h} is not a multiple of n_kv_heads={k}; choose n_heads in "
                         f"{valid}")
    return h, k


def _check_method(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {list(allowed)}")


def _check_target(cfg: ModelConfig, target: Any) -> None:
    if not isinstance(target, Target):
        raise TypeError(f"target must be a prune.Target, got {type(target).__name__}")
    target.check(cfg)


@dataclasses.dataclass(frozen=True)
class _Resolved:
    child: ModelConfig
    dims: dict[str, int]
    explicit_layers: np.ndarray | None


def _child_shape(cfg: ModelConfig, target: Target, depth_method: Any, head_method: str,
                 hidden_method: str | None) -> _Resolved:
    """The checks that need only the configs, and the child they imply."""
    _check_target(cfg, target)
    dims = target.resolve(cfg)
    explicit = None
    if isinstance(depth_method, str):
        _check_method("depth_method", depth_method, DEPTH_METHODS)
    else:
        explicit = _as_index("depth_method (kept layer indices)", depth_method, cfg.n_layers)
        if (np.diff(explicit) <= 0).any():
            raise ValueError(f"kept layers {explicit.tolist()} must be increasing; sort them")
        if target.n_layers is not None and target.n_layers != len(explicit):
            raise ValueError(f"Target n_layers={target.n_layers} but {len(explicit)} layers "
                             f"were listed to keep ({explicit.tolist()}); make them agree")
        dims["n_layers"] = len(explicit)
    _check_method("head_method", head_method, HEAD_METHODS)
    _check_method("hidden_method", hidden_method, (*HIDDEN_METHODS, None))
    dims["n_heads"], dims["n_kv_heads"] = _resolve_heads(cfg, target, head_method)
    shrink_hidden = dims["d_model"] < cfg.d_model
    if shrink_hidden and hidden_method is None:
        raise ValueError(f"Target d_model={dims['d_model']} < {cfg.d_model} but "
                         "hidden_method=None cannot prune the hidden dimension; pass "
                         "hidden_method='channel' or 'pca', or leave d_model=None")
    rotates = shrink_hidden and hidden_method == "pca"
    child = cfg.replace(**dims, tie_embeddings=target.child_tie(cfg, rotates))
    return _Resolved(child, dims, explicit)


def child_config(cfg: ModelConfig, target: Target, *, init: str = "pruned",
                 depth_method: str | Sequence[int] = "block_influence",
                 head_method: str = "within_group", hidden_method: str | None = "channel"
                 ) -> ModelConfig:
    """The child's config from the configs alone, every check run: no params or scores
    needed, so a bad request fails before a checkpoint loads.

    init='pruned': the config `prune` returns for the same arguments (heads resolved by
      `head_method`, a PCA cut of d_model unties).
    init='random': a child initialised from scratch at the target's shape and tying
      (`Target.check`, then `ModelConfig`'s own checks); the methods play no part, since
      nothing is cut.
    """
    _check_method("init", init, INITS)
    if init == "random":
        _check_target(cfg, target)
        return cfg.replace(**target.resolve(cfg), tie_embeddings=target.child_tie(cfg))
    return _child_shape(cfg, target, depth_method, head_method, hidden_method).child


def _resolve(cfg: ModelConfig, importance: Any, target: Target, depth_method: Any,
             head_method: str, hidden_method: str | None, opt_state: Any, optimizer: Any
             ) -> _Resolved:
    """Every check `prune` makes before touching params."""
    shape = _child_shape(cfg, target, depth_method, head_method, hidden_method)
    dims, child, explicit = shape.dims, shape.child, shape.explicit_layers
    shrink_hidden = dims["d_model"] < cfg.d_model
    scored = [name for name in ("n_heads", "d_ff", "d_model") if dims[name] < getattr(cfg, name)]
    if dims["n_layers"] < cfg.n_layers and explicit is None:
        scored.append("n_layers")
    if importance is None and scored:
        raise ValueError(f"pruning {scored} needs importance scores; pass "
                         "prune.estimate_importance(cfg, params, batches)")
    if importance is not None:
        importance.check_matches(cfg)
    if optimizer is not None and opt_state is None:
        raise ValueError("optimizer was given without opt_state; it only locates the param "
                         "copies inside opt_state, so pass both or neither")
    if opt_state is not None and shrink_hidden and hidden_method == "pca":
        raise ValueError("hidden_method='pca' cannot carry optimizer state: Adam's nu "
                         "(squared gradients) does not rotate with the params. Prune without "
                         "opt_state and initialise the child's optimizer, or use "
                         "hidden_method='channel'")
    if opt_state is not None and child.tie_embeddings != cfg.tie_embeddings:
        raise ValueError(f"tying changes (tie_embeddings {cfg.tie_embeddings} → "
                         f"{child.tie_embeddings}), so the LM head's optimizer state has no "
                         "counterpart; prune without opt_state and initialise the child's "
                         "optimizer")
    return _Resolved(child, dims, explicit)


def select_layers(importance: Any, n_layers: int, method: str) -> np.ndarray:
    """Parent indices of the `n_layers` blocks to keep, increasing.

    'block_influence' / 'norm_ratio': the top scores (ShortGPT/Minitron; Ministral 3).
    'contiguous': drop the run of consecutive blocks with the least total block influence
    (Llama-3.1-Minitron drops a contiguous block).
    """
    if method == "contiguous":
        bi = _float64(importance.layer_block_influence)
        drop = len(bi) - n_layers
        start = int(np.argmin([bi[s:s + drop].sum() for s in range(n_layers + 1)]))
        return np.r_[0:start, start + drop:len(bi)].astype(np.int32)
    scores = {"block_influence": importance.layer_block_influence,
              "norm_ratio": importance.layer_norm_ratio}[method]
    return top_k(scores, n_layers)


def _map_param_copies(fn: Callable[[Params], Params], opt_state: Any, params: Params,
                      optimizer: Any) -> Any:
    """Apply `fn` to every copy of the param tree inside `opt_state` (Adam's mu and nu).

    With `optimizer`, copies are located by optax (`tree_map_params`); without, by matching
    the params' tree structure and shapes.
    """
    found = 0

    def edit(tree: Params) -> Params:
        nonlocal found
        found += 1
        return fn(tree)

    if optimizer is not None:
        out = optax.tree_utils.tree_map_params(optimizer, edit, opt_state, is_leaf=lambda _: True)
    else:
        treedef = jax.tree.structure(params)
        shapes = [np.shape(x) for x in jax.tree.leaves(params)]

        def is_copy(x: Any) -> bool:
            return (jax.tree.structure(x) == treedef
                    and [np.shape(leaf) for leaf in jax.tree.leaves(x)] == shapes)

        out = jax.tree.map(lambda x: edit(x) if is_copy(x) else x, opt_state, is_leaf=is_copy)
    if not found:
        raise ValueError("opt_state holds no copy of the param tree to prune; pass the state "
                         "made by optimizer.init(params) (and the optimizer itself)")
    return out


def prune(cfg: ModelConfig, params: Params, importance: Any, target: Target, *,
          depth_method: str | Sequence[int] = "block_influence",
          head_method: str = "within_group", hidden_method: str | None = "channel",
          opt_state: Any = None, optimizer: Any = None, check_fingerprint: bool = True
          ) -> Pruned:
    """Prune `params` to `target` using `importance` (higher score = keep); pure.

    depth_method: 'block_influence' | 'norm_ratio' | 'contiguous', or the increasing parent
      indices of the layers to keep.
    head_method: 'within_group' (every KV group keeps the top n_heads / n_kv_heads of its
      query heads) | 'kv_groups' (keep the top whole KV groups).
    hidden_method: 'channel' | 'pca' | None (d_model must then stay).
    opt_state (+ optimizer, optional): pruned in lockstep with the params (not with 'pca').
    check_fingerprint: refuse scores computed on other params of the same shape (their
      `params_fingerprint` differs); False applies them knowingly (e.g. scores transferred
      from a sibling checkpoint).
    Ministral 3's recipe is depth_method='norm_ratio', hidden_method='pca'; Minitron's is the
    default. All checks run before any tensor is touched. Returns `Pruned(cfg, params, record,
    opt_state)`.
    """
    res = _resolve(cfg, importance, target, depth_method, head_method, hidden_method,
                   opt_state, optimizer)
    if importance is not None and check_fingerprint:
        importance.check_params(params)
    dims, child = res.dims, res.child
    record = PruneRecord(parent_config=cfg.to_dict(), child_config=child.to_dict(),
                         target=target.to_dict(),
                         methods={"depth_method": depth_method if res.explicit_layers is None
                                  else "explicit", "head_method": head_method,
                                  "hidden_method": hidden_method},
                         untied_embeddings=cfg.tie_embeddings and not child.tie_embeddings,
                         tied_embeddings=child.tie_embeddings and not cfg.tie_embeddings)
    edits: list[Take] = []
    rows = np.arange(cfg.n_layers)
    if dims["n_layers"] < cfg.n_layers:
        rows = (res.explicit_layers if res.explicit_layers is not None
                else select_layers(importance, dims["n_layers"], depth_method))
        edits.append(Take("layers", rows, _axis_count(cfg, "layers")))
        record.layers = rows.tolist()
    if dims["n_kv_heads"] < cfg.n_kv_heads:
        groups = top_k(np.asarray(importance.kv_group)[rows], dims["n_kv_heads"])
        edits += _kv_groups_edit(cfg.replace(n_layers=len(rows)), groups)[1]
        record.kv_heads = groups.tolist()
        record.query_heads = _heads_of_groups(groups, cfg.n_groups).tolist()
    elif dims["n_heads"] < cfg.n_heads:
        k, g_kept = cfg.n_kv_heads, dims["n_heads"] // cfg.n_kv_heads
        scores_NKG = np.asarray(importance.head)[rows].reshape(len(rows), k, cfg.n_groups)
        heads = top_k(scores_NKG, g_kept) + (np.arange(k) * cfg.n_groups)[:, None]
        heads = heads.reshape(len(rows), dims["n_heads"]).astype(np.int32)
        edits.append(Take("heads", heads, _axis_count(cfg, "heads")))
        record.query_heads = heads.tolist()
    if dims["d_ff"] < cfg.d_ff:
        neurons = top_k(np.asarray(importance.neuron)[rows], dims["d_ff"])
        edits.append(Take("mlp", neurons, _axis_count(cfg, "mlp")))
        record.neurons = neurons.tolist()
    shrink_hidden = dims["d_model"] < cfg.d_model
    if shrink_hidden and hidden_method == "channel":
        channels = top_k(importance.channel, dims["d_model"])
        edits.append(Take("embed", channels, _embed_count(cfg)))
        record.channels = channels.tolist()

    lay = layout(cfg)
    flat = _apply(paths.flatten(params), lay, edits)
    rotates = shrink_hidden and hidden_method == "pca"
    if not rotates:
        flat = _retie(flat, child.tie_embeddings)
    if shrink_hidden and hidden_method == "channel":
        record.residual_scale = math.sqrt(dims["d_model"] / cfg.d_model)
        flat = _scale_residual(flat, lay, record.residual_scale, child.tie_embeddings)
    if rotates:
        q = pca_rotation(importance.residual_cov, dims["d_model"])
        record.rotation, record.residual_scale = q, math.sqrt(dims["d_model"] / cfg.d_model)
        final_scale = flat[_FINAL_NORM]
        flat = _pca_flat(cfg, flat, q)
        if child.tie_embeddings:
            flat = _tie_rotated(flat, final_scale, q, record.residual_scale)
    child_params = _finish(child, flat)

    child_opt = None
    if opt_state is not None:
        child_opt = _map_param_copies(
            lambda t: paths.unflatten(_apply(paths.flatten(t), lay, edits)), opt_state, params,
            optimizer)
    return Pruned(child, child_params, record, child_opt)
