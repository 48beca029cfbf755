"""`sft`: cross-entropy on the completions of the run's task, prompt tokens masked.

The step is `ce`'s: on prompt/completion batches `lm.next_token_targets` already counts only
completion targets (their `loss_mask`), so `ce` on a task run *is* completion-only. What `sft`
adds is the guarantee: it refuses a run without a task (`needs_task`), where CE would silently
train on every token. Chain-of-thought SFT is the first post-training step of Ministral 3's
reasoning recipe (arXiv 2601.08584); `config.task.answers_only` gives its contrast.
"""

from __future__ import annotations

import dataclasses

from cascade_jax.objectives.base import Built, StageContext
from cascade_jax.objectives.ce import CrossEntropy


@dataclasses.dataclass(frozen=True)
class SupervisedFineTuning(CrossEntropy):
    """`ce`'s settings (none) and step, on the task's masked batches only."""

    name: str = "sft"
    loss_label: str = "cross-entropy on completions"
    uses_teacher: bool = False
    needs_task: bool = True

    def build(self, ctx: StageContext) -> Built:
        if ctx.task is None:
            raise ValueError(f"stage {ctx.stage_name!r}: objective 'sft' trains on a task's "
                             "completions; give the run a config.task block (and "
                             "config.data.source='task')")
        return super().build(ctx)
