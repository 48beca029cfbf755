"""Cutting the sequence axis into chunks and back: the one implementation that the fused KD
loss, blockwise attention and the teacher cache's writer share.

Letters: n = number of chunks, C = positions per chunk (a chunk of L), as in `x_nBC...`.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp


def count(length: int, chunk: int | None) -> tuple[int, int]:
    """(chunk size, number of chunks) covering `length`; a chunk longer than the sequence
    (or None) is the whole sequence."""
    size = min(chunk or length, length)
    return size, -(-length // size)


def split(x_BL: jax.Array, chunk: int) -> jax.Array:
    """[B, L, ...] → [n, B, C, ...], zero-padded at the end of L up to n·C."""
    length = x_BL.shape[1]
    _, n_chunks = count(length, chunk)
    pad = n_chunks * chunk - length
    if pad:
        x_BL = jnp.pad(x_BL, [(0, 0), (0, pad)] + [(0, 0)] * (x_BL.ndim - 2))
    return einops.rearrange(x_BL, "B (n C) ... -> n B C ...", C=chunk)


def merge(x_nBC: jax.Array, length: int) -> jax.Array:
    """Inverse of `split`: [n, B, C, ...] → [B, L, ...], the padding dropped."""
    return einops.rearrange(x_nBC, "n B C ... -> B (n C) ...")[:, :length]
