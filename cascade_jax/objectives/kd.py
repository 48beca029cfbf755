"""`kd`: soft-label distillation from the stage's teacher on the run's data.

Ministral 3 (arXiv 2601.08584) and Minitron (arXiv 2407.14679) distil each pruned child with
forward KL on the teacher's logits. The settings block is a `distill.LossSpec` (divergence,
temperature, CE mix, β, chunk size of the fused loss): `stages.child.kd = dict(kind=...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cascade_jax import aot, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses
from cascade_jax.distill import step as distill_step
from cascade_jax.objectives.base import Built, StageContext


@dataclasses.dataclass(frozen=True)
class SoftLabelKD:
    name: str = "kd"
    loss_label: str = "distillation (KD + CE mix)"
    uses_teacher: bool = True

    def parse_settings(self, block: Mapping[str, Any], key: str) -> losses.LossSpec:
        return validate.construct(losses.LossSpec, block, key)

    def build(self, ctx: StageContext) -> Built:
        if ctx.teacher is None:
            raise ValueError(f"stage {ctx.stage_name!r}: objective 'kd' needs a teacher")
        dcfg = _distill_config(ctx.student, ctx.teacher.cfg, ctx.settings, ctx.grad_accum)
        optimizer, mesh = ctx.optimizer, ctx.mesh
        shardings = distill_step.state_shardings(dcfg, optimizer, mesh)

        def make_state() -> steps.TrainState:
            return distill_step.create_state(dcfg, optimizer, mesh, rng=ctx.rng,
                                             model_params=ctx.child_params)

        return Built(
            step_fn=distill_step.with_teacher(distill_step.jit_train_step(dcfg, optimizer, mesh),
                                              ctx.teacher.params),
            abstract_state=steps.abstract_state(optimizer, distill_step.param_shapes(dcfg),
                                                shardings),
            make_state=make_state, batches=ctx.train_batches(),
            model_params=lambda params: distill_step.student_model_params(dcfg, params),
            lineage={"kd": dataclasses.asdict(ctx.settings)})

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None,
                  settings: losses.LossSpec, *, optimizer: Any, batch_size: int, seq_len: int,
                  grad_accum: int) -> aot.StepSpec:
        dcfg = _distill_config(student, teacher, settings, grad_accum)
        return aot.StepSpec("distill", student, batch_size, seq_len, optimizer, dcfg)


def _distill_config(student: ModelConfig, teacher: ModelConfig, settings: losses.LossSpec,
                    grad_accum: int) -> distill_step.DistillConfig:
    return distill_step.DistillConfig(student=student, teacher=teacher, loss=settings,
                                      grad_accum=grad_accum)
