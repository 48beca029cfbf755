"""How good a child is: perplexity on held-out text, and how close it is to a teacher.

A cascade's results table compares stages by validation loss (perplexity), forward KL to the
teacher and top-1 agreement with it. The KL and agreement come from the fused-chunked loss of
`cascade_jax.distill.losses`, so evaluating a 131k-vocabulary child never builds [B, L, V]
logits for both models at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from cascade_jax import lm, loop, model, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# KL(teacher ‖ student) at T = 1: what "KL to teacher" means in a results table. The fused
# loss pads L to a multiple of the chunk (a shorter L is one chunk), so every length is fused.
_KL_SPEC = losses.LossSpec(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=256)


def teacher_metric_sums(cfg: ModelConfig, teacher_cfg: ModelConfig, params: model.Params,
                        teacher_params: model.Params, batch: Batch) -> Metrics:
    """Token-weighted sums: `loss_sum` (CE on the text), `kl_to_teacher_sum` (forward KL to the
    teacher at T = 1), `top1_agreement_sum` (student's top-1 = teacher's top-1), `count`."""
    targets_BL, weights_BL = lm.next_token_targets(batch)
    args = (batch["tokens"], batch.get("segment_ids"), batch.get("positions"))
    student_BLD = model.hidden_states(cfg, params, *args)
    teacher_BLT = model.hidden_states(teacher_cfg, teacher_params, *args)
    _, sums = losses.distill_loss(student_BLD, model.lm_head_weights(cfg, params), teacher_BLT,
                                  model.lm_head_weights(teacher_cfg, teacher_params),
                                  targets_BL, weights_BL, _KL_SPEC)
    return {"loss_sum": sums["ce_sum"], "kl_to_teacher_sum": sums["kd_sum"],
            "top1_agreement_sum": sums["top1_agreement_sum"], "count": sums["count"]}


def jit_teacher_metric_sums(cfg: ModelConfig, teacher_cfg: ModelConfig, mesh: Mesh,
                            rules: Any = sharding.DEFAULT_RULES, *, micro_batches: int = 1
                            ) -> Callable[[model.Params, model.Params, Batch], Metrics]:
    """`teacher_metric_sums` compiled for `mesh`: `(params, teacher_params, batch) -> sums`,
    the batch scanned as `micro_batches`."""
    def sums(params: model.Params, teacher_params: model.Params, batch: Batch) -> Metrics:
        return steps.sum_over_micro_batches(
            functools.partial(teacher_metric_sums, cfg, teacher_cfg, params, teacher_params),
            micro_batches, batch)

    return jax.jit(sharding.traced_on_mesh(sums, mesh, rules),
                   in_shardings=(sharding.param_shardings(cfg, mesh, rules),
                                 sharding.param_shardings(teacher_cfg, mesh, rules),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def evaluator(cfg: ModelConfig, mesh: Mesh, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
              *, max_batches: int | None = None, teacher_cfg: ModelConfig | None = None,
              teacher_params: model.Params | None = None, micro_batches: int = 1
              ) -> Callable[[model.Params], dict[str, float]]:
    """`params -> {loss, perplexity, tokens, [accuracy | kl_to_teacher, top1_agreement]}`
    over a fresh pass of `batches()` (the validation split): what `loop.fit` calls every
    `eval_every` steps.

    With a teacher, the figures include forward KL to it and top-1 agreement with it.
    `micro_batches` splits each batch (scanned) when its activations would not fit at once.
    """
    if teacher_cfg is None:
        step = steps.jit_eval_sums(cfg, mesh, micro_batches=micro_batches)
    else:
        with_teacher = jit_teacher_metric_sums(cfg, teacher_cfg, mesh,
                                               micro_batches=micro_batches)

        def step(params: model.Params, batch: Batch) -> Metrics:
            return with_teacher(params, teacher_params, batch)

    def evaluate(params: model.Params) -> dict[str, float]:
        return loop.evaluate(step, params, batches(), mesh, max_batches=max_batches)

    return evaluate

