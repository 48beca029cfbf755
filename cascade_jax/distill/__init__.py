"""Distillation: KD losses (dense, fused-chunked, sparse, from a mixture of teachers), the
distill steps (online, and fed by an offline teacher cache) and the codistillation step
(`distill.codistill`: N models in one step, each pulled toward its peers)."""

from cascade_jax.distill.losses import (
    KINDS,
    SPARSE_MODES,
    LossSpec,
    distill_loss,
    distill_loss_from_logits,
    divergence,
    mixture_distill_loss,
    mixture_logprobs,
    sample_teacher_targets,
    sparse_distill_loss,
    top_k_teacher_targets,
)
from cascade_jax.distill.step import (
    DistillConfig,
    HiddenDistill,
    compute_grads_cached,
    jit_train_step,
    jit_train_step_cached,
    train_step,
    train_step_cached,
)

__all__ = [
    "KINDS",
    "SPARSE_MODES",
    "DistillConfig",
    "HiddenDistill",
    "LossSpec",
    "compute_grads_cached",
    "distill_loss",
    "distill_loss_from_logits",
    "divergence",
    "jit_train_step",
    "jit_train_step_cached",
    "mixture_distill_loss",
    "mixture_logprobs",
    "sample_teacher_targets",
    "sparse_distill_loss",
    "top_k_teacher_targets",
    "train_step",
    "train_step_cached",
]
