"""Distillation: KD losses (dense, fused-chunked, sparse) and, later, the distill step."""

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

__all__ = [
    "KINDS",
    "SPARSE_MODES",
    "LossSpec",
    "distill_loss",
    "distill_loss_from_logits",
    "divergence",
    "sample_teacher_targets",
    "sparse_distill_loss",
    "top_k_teacher_targets",
]
