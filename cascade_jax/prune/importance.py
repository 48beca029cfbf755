"""Importance of layers, heads, FFN neurons and hidden channels, from activations.

(The estimator is being written; this file fixes the contract the surgery consumes.)
"""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class Importance:
    """Scores of one model from one calibration pass; higher = more important (keep the top).

    All arrays float32. `model_config` is the `ModelConfig.to_dict()` of the scored model, so
    applying scores to a differently shaped model is caught.
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
