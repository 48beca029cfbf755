"""Per-token and per-sequence log-probs of a batch's own tokens: what every post-training loss
(DPO's sequence sums, GRPO's importance ratio, the reverse-KL reward of on-policy distillation)
is made of.

Layout: the batch contract of `cascade_jax.data` (`tokens`, `segment_ids`, `positions`, and
optionally `loss_mask`). Position t holds log p(tokens[t + 1] | tokens[≤ t]), the *target*
convention of `lm.next_token_targets`, whose weights say which positions count: inside one
packed segment, and with a `loss_mask` only where the target is a completion token (or its
EOS). So a completion of k tokens (EOS included) after a prompt of p tokens, starting at column
c of its row, has its k log-probs at columns c + p − 1 … c + p + k − 2.

Memory: logits are made from the final hidden states and the [D, V] head one chunk of L at a
time inside a `lax.scan` whose body is `jax.checkpoint`ed, so neither the forward nor the
backward pass holds more than one [B, C, V] float32 block (the backward recomputes each chunk's
logits; 4 [B·L, D]×[D, V] matmuls in all, as many as the unchunked gradient).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cascade_jax import chunks, lm, model, token_ids
from cascade_jax.config import ModelConfig

Batch = dict[str, jax.Array]


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int)
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer, or None for "
                         "whole-sequence logits")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, int | float) and not isinstance(temperature, bool)
            and 0 < temperature < float("inf")):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (1.0: the "
                         "model's own distribution, as the sampler's log-probs)")


def token_logprobs_from_hidden(hidden_BLD: jax.Array, head_DV: jax.Array,
                               targets_BL: jax.Array, *, chunk_size: int | None = 512,
                               temperature: float = 1.0) -> jax.Array:
    """[B, L] float32 log softmax(h·W / T)[target] at every position (masking is the caller's).

    Why from hidden states: a teacher or reference of any size gives its log-probs the same
    way, and no [B, L, V] float32 is live (see the module docstring). The head is cast to the
    hidden states' dtype inside each chunk, as `model.forward`'s unembedding does, so the
    values equal `log_softmax(model.forward(...))` and the head's gradient accumulates across
    chunks in its own (float32) dtype.
    """
    _check_chunk(chunk_size)
    _check_temperature(temperature)
    vocab = head_DV.shape[-1]
    token_ids.maybe_check(targets_BL, vocab, where="targets")
    length = targets_BL.shape[1]
    chunk, _ = chunks.count(length, chunk_size)

    @jax.checkpoint
    def chunk_logprobs(h_BCD: jax.Array, targets_BC: jax.Array) -> jax.Array:
        logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD, head_DV.astype(h_BCD.dtype),
                                preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits_BCV = logits_BCV / temperature
        picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        return picked_BC - jax.nn.logsumexp(logits_BCV, axis=-1)

    def body(carry: None, x: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        return carry, chunk_logprobs(*x)

    xs = (chunks.split(hidden_BLD, chunk), chunks.split(targets_BL, chunk))
    _, logprobs_nBC = jax.lax.scan(body, None, xs)
    return chunks.merge(logprobs_nBC, length)


def target_logprobs(cfg: ModelConfig, params: Any, batch: Batch, *,
                    chunk_size: int | None = 512, temperature: float = 1.0
                    ) -> tuple[jax.Array, jax.Array]:
    """(logprobs_BL, weights_BL): float32 log-prob of each next-token target under the model,
    0 wherever its weight is 0, with the weights of `lm.next_token_targets(batch)`.

    Differentiable w.r.t. `params` (the policy's log-probs); a frozen reference or the "old"
    policy of GRPO calls it under `jax.lax.stop_gradient` or outside `grad`. `temperature`
    divides the logits (1.0 matches the sampler's untempered log-probs).
    """
    targets_BL, weights_BL = lm.next_token_targets(batch)
    hidden_BLD = model.hidden_states(cfg, params, batch["tokens"], batch.get("segment_ids"),
                                     batch.get("positions"))
    logprobs_BL = token_logprobs_from_hidden(hidden_BLD, model.lm_head_weights(cfg, params),
                                             targets_BL, chunk_size=chunk_size,
                                             temperature=temperature)
    return jnp.where(weights_BL > 0, logprobs_BL, 0.0), weights_BL


def sequence_ids_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
    """[B, L] int32 global sequence index: the packed segments numbered 0, 1, 2, ... in
    row-major order of appearance (row 0's segments first), −1 on padding (segment 0).

    Why: `data` numbers segments 1, 2, ... afresh in every row, so (row, segment id) names a
    sequence, not the id alone. With one sequence per row (rollouts) this is the row index.
    """
    starts_BL = jnp.concatenate(
        [segment_ids_BL[:, :1] != 0,
         (segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]) & (segment_ids_BL[:, 1:] != 0)],
        axis=1)
    index_BL = jnp.cumsum(starts_BL.reshape(-1)).reshape(segment_ids_BL.shape) - 1
    return jnp.where(segment_ids_BL != 0, index_BL, -1).astype(jnp.int32)


def sequence_logprob_sums(logprobs_BL: jax.Array, weights_BL: jax.Array,
                          sequence_ids_BL: jax.Array, n_sequences: int) -> jax.Array:
    """[S] float32: Σ weight·log-prob over each sequence's counted targets (S = n_sequences).

    `sequence_ids_BL` gives every position the index in [0, S) of the sequence its target
    belongs to (`sequence_ids_from_segments` for packed batches; any numbering the caller
    likes, e.g. chosen = 2i, rejected = 2i + 1); ids outside [0, S) are dropped. A target at
    position t belongs to the segment of position t (weights are 0 across boundaries). The
    counted tokens of each sequence are `sequence_logprob_sums(weights_BL, weights_BL, ...)`.
    """
    if not isinstance(n_sequences, int) or isinstance(n_sequences, bool) or n_sequences < 1:
        raise ValueError(f"n_sequences={n_sequences!r} must be a positive integer (a static "
                         "upper bound on the sequences in the batch; unused slots sum to 0)")
    if not (logprobs_BL.shape == weights_BL.shape == sequence_ids_BL.shape):
        raise ValueError(f"logprobs {logprobs_BL.shape}, weights {weights_BL.shape} and "
                         f"sequence_ids {sequence_ids_BL.shape} must share one [B, L] shape")
    weights_BL = weights_BL.astype(jnp.float32)
    contrib_BL = jnp.where(weights_BL > 0, logprobs_BL.astype(jnp.float32) * weights_BL, 0.0)
    ids_BL = jnp.where((sequence_ids_BL >= 0) & (sequence_ids_BL < n_sequences),
                       sequence_ids_BL, n_sequences)
    return jax.ops.segment_sum(contrib_BL.reshape(-1), ids_BL.reshape(-1),
                               num_segments=n_sequences + 1)[:n_sequences]
