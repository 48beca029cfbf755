"""`ce`: next-token cross-entropy on the run's data, no teacher.

How a root learns, and the baselines a distilled child is compared with (the same shape from
random init; the pruned child retrained without a teacher).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cascade_jax import aot, model, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.objectives.base import Built, StageContext


@dataclasses.dataclass(frozen=True)
class Settings:
    """`ce`'s block: `chunk_size`, positions per logits block (None: whole rows). Long rows
    need it: at 262k tokens × 131k vocabulary one row's float32 logits are 128 GiB."""

    chunk_size: int | None = None

    def __post_init__(self) -> None:
        validate.optional_positive_int("chunk_size", self.chunk_size,
                                       "or None: whole-row logits")


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    name: str = "ce"
    loss_label: str = "cross-entropy"
    uses_teacher: bool = False

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        return validate.construct(Settings, block, key)

    def build(self, ctx: StageContext) -> Built:
        cfg, optimizer, mesh = ctx.student, ctx.optimizer, ctx.mesh
        shardings = steps.model_state_shardings(cfg, optimizer, mesh)

        def make_state() -> steps.TrainState:
            if ctx.child_params is None:
                return steps.create_state(cfg, optimizer, ctx.rng, mesh)
            return steps.place_state(optimizer, ctx.child_params, shardings)

        return Built(
            step_fn=steps.jit_ce_train_step(cfg, optimizer, mesh, grad_accum=ctx.grad_accum,
                                            chunk_size=ctx.settings.chunk_size),
            abstract_state=steps.abstract_state(optimizer, model.param_shapes(cfg), shardings),
            make_state=make_state, batches=ctx.train_batches())

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Settings,
                  *, optimizer: Any, batch_size: int, seq_len: int, grad_accum: int
                  ) -> aot.StepSpec:
        return aot.StepSpec("train", student, batch_size, seq_len, optimizer,
                            micro_batches=grad_accum, loss_chunk=settings.chunk_size)
