"""`on_policy`: generalized knowledge distillation (GKD), the student writes, the teacher grades.

Agarwal et al. 2024 (arXiv 2306.13649): a student trained only on fixed sequences (the data's,
or the teacher's) is graded at test time on its *own*, whose prefixes it never saw in
training. GKD mixes them: at each step, with probability λ (`student_fraction`) the batch's
completions are replaced by ones the student samples now from the batch's prompts (no
gradient through the sampling: tokens are data), otherwise they are the dataset's
(`off_policy='data'`) or the teacher's samples (`'teacher'`). The loss is the fused KD loss
of `kd` on those sequences, completion tokens only, with any divergence of its family
(generalized JSD(β), forward / reverse KL, TVD); Qwen3 distils its small models on-policy
the same way (arXiv 2505.09388). λ = 0 with `off_policy='data'` is exactly `kd` on the task.

Each row holds one prompt and its completion (`prompts.pair_rows`), so every step samples
the same number of prompts into one compiled sampler (`generate`'s bucket cache), and the
sampling happens in the loop's `prepare_batch` on the state about to be updated. The coin
and the sampler's key are functions of the step, so a resumed run samples what an
uninterrupted one did.

    stages.child_gkd.on_policy = dict(kind='jsd', beta=0.5, student_fraction=0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cascade_jax import validate
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses
from cascade_jax.distill import step as distill_step
from cascade_jax.objectives import rollouts
from cascade_jax.objectives.base import Built, HostBatch, StageContext
from cascade_jax.objectives.kd import SoftLabelKD

OFF_POLICY = ("data", "teacher")


@dataclasses.dataclass(frozen=True)
class Settings:
    """loss: the divergence (`distill.LossSpec`'s fields, flat in the block). student_fraction:
    λ, the probability a step trains on the student's own samples. off_policy: what the
    other steps train on. temperature_sample / top_p / max_new_tokens: how completions are
    sampled (None tokens: the row length minus the longest prompt). prompts: training
    problems drawn from (None: the task's whole split)."""

    loss: losses.LossSpec = dataclasses.field(
        default_factory=lambda: losses.LossSpec(kind="jsd", beta=0.5))
    student_fraction: float = 0.5
    off_policy: str = "data"
    sample_temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int | None = None
    prompts: int | None = 20_000

    def __post_init__(self) -> None:
        from cascade_jax import generate

        validate.number("student_fraction", self.student_fraction, low=0.0, high=1.0,
                        hint="GKD's λ: 0 never samples, 1 always does")
        validate.one_of("off_policy", self.off_policy, OFF_POLICY)
        validate.optional_positive_int("max_new_tokens", self.max_new_tokens,
                                       "or None: what the row leaves after the prompt")
        validate.optional_positive_int("prompts", self.prompts, "or None: the whole split")
        validate.temperature("sample_temperature", self.sample_temperature)
        generate.SamplingParams(1, temperature=self.sample_temperature, top_p=self.top_p)


OWN_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "loss")


@dataclasses.dataclass(frozen=True)
class OnPolicyKD(SoftLabelKD):
    name: str = "on_policy"
    loss_label: str = "distillation (KD + CE mix)"
    uses_teacher: bool = True
    needs_task: bool = True

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        own = {k: v for k, v in block.items() if k in OWN_FIELDS}
        loss = validate.construct(losses.LossSpec,
                                  {k: v for k, v in block.items() if k not in OWN_FIELDS}, key)
        return validate.construct(Settings, {"loss": loss, **own}, key)

    def build(self, ctx: StageContext) -> Built:
        from cascade_jax import data, prompts

        settings: Settings = ctx.settings
        ctx.require_task('on_policy')
        if ctx.teacher is None:
            raise ValueError(f"stage {ctx.stage_name!r}: objective 'on_policy' needs a teacher")
        problems = ctx.task.make_problems("train", settings.prompts, ctx.seed)
        pairs = prompts.encode_pairs([(p.prompt, p.completion) for p in problems],
                                     ctx.tokenizer)
        seq_len = ctx.data.seq_len

        def batches() -> Any:
            return iter(prompts.pair_rows(pairs, seq_len=seq_len, seed=ctx.seed,
                                          batch_size=data._host_batch_size(
                                              ctx.data.batch_size)))

        kd = super().build(dataclasses.replace(ctx, settings=settings.loss,
                                               train_batches=batches))
        dcfg = distill_step.DistillConfig(student=ctx.student, teacher=ctx.teacher.cfg,
                                          loss=settings.loss, grad_accum=ctx.grad_accum)
        sampling = rollouts.sampling_params(
            max_new_tokens=settings.max_new_tokens, temperature=settings.sample_temperature,
            top_p=settings.top_p, n=1, seq_len=seq_len,
            max_seq_len=min(ctx.student.max_seq_len, ctx.teacher.cfg.max_seq_len),
            longest_prompt=int(np.diff(pairs.prompts.offsets).max()),
            eos=data.eos_id(ctx.tokenizer), key=f"config.stages.{ctx.stage_name}.on_policy")
        teacher = ctx.teacher

        def prepare_batch(state: Any, batch: HostBatch) -> HostBatch:
            step = int(jax.device_get(state.step))
            if student_turn(ctx.seed, step, settings.student_fraction):
                cfg, params = ctx.student, distill_step.student_model_params(dcfg,
                                                                             state.params)
            elif settings.off_policy == "teacher":
                cfg, params = teacher.cfg, teacher.params
            else:
                return batch
            return sampled_batch(cfg, params, batch, sampling, seq_len=seq_len,
                                 rng=jax.random.fold_in(ctx.rng, step), mesh=ctx.mesh)

        return dataclasses.replace(kd, prepare_batch=prepare_batch, lineage={
            "on_policy": {**{k: getattr(settings, k) for k in OWN_FIELDS},
                          "loss": dataclasses.asdict(settings.loss)}})

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Settings,
                  **kwargs: Any) -> Any:
        return super().step_spec(student, teacher, settings.loss, **kwargs)

def student_turn(seed: int, step: int, student_fraction: float) -> bool:
    """GKD's coin for `step`: a function of (seed, step) only, so a resumed run flips the
    same coins."""
    return bool(np.random.default_rng([seed, 7919, step]).random() < student_fraction)


def sampled_batch(cfg: ModelConfig, params: Any, batch: HostBatch, sampling: Any, *,
                  seq_len: int, rng: jax.Array, mesh: Any) -> HostBatch:
    """`batch` (one pair per row) with each row's completion replaced by one `cfg`/`params`
    samples from the row's prompt; this process's rows of the result."""
    from cascade_jax import generate, prompts

    prompts_R = prompts.row_prompts(rollouts.global_rows(batch))
    out = generate.generate(cfg, params, prompts_R, sampling, rng=rng, mesh=mesh)
    rows = prompts.completion_rows(prompts_R, out.tokens, out.lengths, seq_len=seq_len)
    return rollouts.local_rows(rows, len(prompts_R))
