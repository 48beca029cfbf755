"""The next-token objective shared by training, distillation and evaluation.

Targets keep the batch's [B, L] shape (the last position of each row gets weight 0), so losses
can be chunked over L without re-slicing. Metrics are (sum, count) pairs: averages across
hosts and chunks are then weighted by tokens, not by batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax import chunks, model, token_ids

Batch = dict[str, jax.Array]


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(targets_BL, weights_BL): position t predicts token t+1 of the same packed segment.

    A target counts only inside one document (segment ids equal and non-zero), so the model
    is never asked to predict across a packing boundary or into padding. With a `loss_mask`
    (prompt/completion batches, `cascade_jax.prompts`) it also counts only where the *target*
    is a completion token (or its EOS): every loss and evaluation built on these weights (CE,
    the fused KD losses, evaluation) is then completion-only, with no change of its own.
    A batch whose rows `balance_rows` reordered carries them as `targets`/`target_weights`.
    """
    if "targets" in batch:  # rows reordered by `balance_rows`: shifting no longer works
        return batch["targets"], batch["target_weights"].astype(jnp.float32)
    tokens_BL = batch["tokens"]
    segment_ids_BL = batch.get("segment_ids")
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones_like(tokens_BL)
    next_tokens = tokens_BL[:, 1:]
    counts = (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]) & (segment_ids_BL[:, 1:] != 0)
    loss_mask_BL = batch.get("loss_mask")
    if loss_mask_BL is not None:
        counts &= loss_mask_BL[:, 1:] != 0
    targets_BL = jnp.pad(next_tokens, ((0, 0), (0, 1)))
    weights_BL = jnp.pad(counts, ((0, 0), (0, 1))).astype(jnp.float32)
    return targets_BL, weights_BL


def dual_chunk_swap(length: int, shards: int) -> np.ndarray:
    """[L] the token order that balances causal attention over `shards` context shards: the row
    cut into 2·shards chunks, shard d holding chunks d and 2·shards − 1 − d (an early and a
    late one, so every shard's queries see the same number of keys in all)."""
    pieces = 2 * shards
    if length % pieces:
        raise ValueError(f"seq_len={length} does not split into {pieces} equal chunks (2 per "
                         f"context shard of {shards}); use a seq_len that is a multiple of "
                         f"{pieces}, or balance=False")
    chunk = length // pieces
    order = [c for d in range(shards) for c in (d, pieces - 1 - d)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])


def balance_rows(batch: dict[str, np.ndarray], shards: int) -> dict[str, np.ndarray]:
    """Every [B, L, ...] array of a host batch reordered along L by `dual_chunk_swap`.

    Positions (from the segment ids, if absent) and the next-token targets and weights
    (`targets`, `target_weights`) are computed first, in the original order, and reordered
    with the rest: attention masks by positions and losses read the carried targets, so
    every objective gives the same result on the reordered rows. Per-token outputs come back
    in the reordered order. With shards=1 the order is the identity. Rows reordered for more
    shards than the mesh's context axis break the blockwise attention's block skipping
    (which assumes index order outside context parallelism): use `sharding.shard_batch(...,
    balance=True)`, which takes the mesh's count.
    """
    batch = {name: np.asarray(value) for name, value in batch.items()}
    length = batch["tokens"].shape[1]
    if "segment_ids" not in batch:
        batch["segment_ids"] = np.ones_like(batch["tokens"])
    if "positions" not in batch:
        batch["positions"] = np.asarray(model.positions_from_segments(batch["segment_ids"]),
                                        np.int32)
    if "targets" not in batch:
        targets_BL, weights_BL = next_token_targets(batch)
        batch["targets"] = np.asarray(targets_BL, batch["tokens"].dtype)
        batch["target_weights"] = np.asarray(weights_BL, np.float32)
    order_L = dual_chunk_swap(length, shards)
    return {name: value[:, order_L] if value.ndim >= 2 and value.shape[1] == length else value
            for name, value in batch.items()}


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """[B, L] float32 −log p(target) at every position (weight them yourself).

    A target outside [0, V) is not an error by itself: >= V (or < -V) gathers NaN, [-V, 0)
    wraps to another token's log-prob. With `CASCADE_JAX_CHECK_IDS=1` it is one, naming the
    id (`token_ids.maybe_check`).
    """
    token_ids.maybe_check(targets_BL, logits_BLV.shape[-1], where="targets")
    logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights), in float32 (see `token_nll`)."""
    nll_BL = token_nll(logits_BLV, targets_BL)
    return jnp.sum(nll_BL * weights_BL), jnp.sum(weights_BL)


def chunked_nll_and_hits(hidden_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                         chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """([B, L] float32 −log p(target), [B, L] float32 1 where the argmax is the target), the
    logits made `chunk_size` positions at a time from the final hidden states in a
    checkpointed scan (recomputed in the backward pass), so no [B, L, V] float32 is ever live:
    one row's is 128 GiB at 262k tokens × 131k vocabulary (Ministral 3's context)."""
    token_ids.maybe_check(targets_BL, head_DV.shape[-1], where="targets")
    length = targets_BL.shape[1]
    chunk, _ = chunks.count(length, chunk_size)

    @jax.checkpoint
    def block(h_BCD: jax.Array, targets_BC: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD, head_DV.astype(h_BCD.dtype),
                                preferred_element_type=jnp.float32)
        picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        hits_BC = (jnp.argmax(logits_BCV, axis=-1) == targets_BC).astype(jnp.float32)
        return jax.nn.logsumexp(logits_BCV, axis=-1) - picked_BC, hits_BC

    def body(carry: None, x: tuple[jax.Array, jax.Array]
             ) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return carry, block(*x)

    _, (nll_nBC, hits_nBC) = jax.lax.scan(
        body, None, (chunks.split(hidden_BLD, chunk), chunks.split(targets_BL, chunk)))
    return chunks.merge(nll_nBC, length), chunks.merge(hits_nBC, length)


def correct_top1(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
                 ) -> jax.Array:
    """Weighted count of positions whose argmax is the target (accuracy = this / count)."""
    hits_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return jnp.sum(hits_BL * weights_BL)
