"""Post-training math, model-independent and pure: the functions the sampler-driven objectives
(preference, grpo, on-policy distillation) are built from, and other research code can call.

    logprobs    per-token log-probs of a batch's targets (chunked over L) and per-sequence sums
    preference  DPO and offset DPO on per-sequence log-prob sums
    grpo        group advantages, the clipped policy loss, its aggregation modes and presets
"""

from cascade_jax.posttrain import grpo, logprobs, preference
from cascade_jax.posttrain.grpo import (
    DAPO,
    DR_GRPO,
    GRPO,
    MAGISTRAL,
    Advantages,
    GRPOSpec,
    aggregate,
    aggregation_weights,
    group_advantages,
    k3_kl,
    policy_loss,
)
from cascade_jax.posttrain.logprobs import (
    sequence_ids_from_segments,
    sequence_logprob_sums,
    target_logprobs,
    token_logprobs_from_hidden,
)
from cascade_jax.posttrain.preference import dpo_loss, odpo_loss

__all__ = [
    "DAPO",
    "DR_GRPO",
    "GRPO",
    "MAGISTRAL",
    "Advantages",
    "GRPOSpec",
    "aggregate",
    "aggregation_weights",
    "dpo_loss",
    "group_advantages",
    "grpo",
    "k3_kl",
    "logprobs",
    "odpo_loss",
    "policy_loss",
    "preference",
    "sequence_ids_from_segments",
    "sequence_logprob_sums",
    "target_logprobs",
    "token_logprobs_from_hidden",
]
