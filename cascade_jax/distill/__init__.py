"""Distillation: KD losses (dense, fused-chunked, sparse) and the distill steps (online, and
fed by an offline teacher cache)."""

from cascade_jax.distill.losses import (
    KINDS,
    SPARSE_MODES,
    LossSpec,
    distill_loss,
    distill_loss_from_logits,
    divergence,
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
    "sample_teacher_targets",
    "sparse_distill_loss",
    "top_k_teacher_targets",
    "train_step",
    "train_step_cached",
]
