"""The next-token objective shared by training, distillation and evaluation.

Targets keep the batch's [B, L] shape (the last position of each row gets weight 0), so losses
can be chunked over L without re-slicing. Metrics are (sum, count) pairs: averages across
hosts and chunks are then weighted by tokens, not by batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cascade_jax import chunks, token_ids

Batch = dict[str, jax.Array]


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(targets_BL, weights_BL): position t predicts token t+1 of the same packed segment.

    A target counts only inside one document (segment ids equal and non-zero), so the model
    is never asked to predict across a packing boundary or into padding. With a `loss_mask`
    (prompt/completion batches, `cascade_jax.prompts`) it also counts only where the *target*
    is a completion token (or its EOS): every loss and evaluation built on these weights (CE,
    the fused KD losses, evaluation) is then completion-only, with no change of its own.
    """
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
