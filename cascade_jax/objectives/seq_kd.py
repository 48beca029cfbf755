"""`seq_kd`: hard-label distillation, cross-entropy on what the teacher writes.

The teacher samples k completions of each training prompt once (`teacher_data.write`, kept
next to the stage, resumable); the verifier may keep only the correct ones (rejection
sampling, as DeepSeek-R1's distillation data, arXiv 2501.12948); the student then trains with
the `ce` step on those pairs, completion tokens only (sequence-level KD, Kim & Rush 2016,
arXiv 1606.07947). With `source=<file.jsonl>` the samples are a black-box teacher's outputs
instead (nothing is sampled). `answers_only=True` keeps only each sample's final answer line:
the contrast that says whether the teacher's *reasoning* is what transfers.

    stages.child_seq_kd.seq_kd = dict(samples_per_prompt=2, prompts=4000, temperature=1.0,
                                      keep='correct')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

from cascade_jax import validate
from cascade_jax.config import ModelConfig
from cascade_jax.objectives import rollouts
from cascade_jax.objectives.base import Built, StageContext
from cascade_jax.objectives.ce import CrossEntropy

DATA_DIR = "teacher_data"


@dataclasses.dataclass(frozen=True)
class Settings:
    """samples_per_prompt: k teacher samples per prompt. prompts: training problems to sample
    (None: the task's whole training split, for a finite JSONL task). temperature / top_p /
    max_new_tokens: the teacher's sampling (None tokens: the row length minus the longest
    prompt). keep: 'all' | 'correct' (rejection sampling) | 'well_formed'. answers_only:
    train on the final answer lines only. source: a JSONL file of an external teacher's
    `{"prompt", "completion"}` outputs, or another stage's `teacher_data` directory ('' =
    sample the stage's teacher). chunk_size: positions per logits block of the student's CE
    step (`ce`'s setting)."""

    samples_per_prompt: int = 1
    prompts: int | None = 2000
    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int | None = None
    keep: str = "all"
    answers_only: bool = False
    source: str = ""
    prompts_per_part: int = 256
    chunk_size: int | None = None  # the student's CE step, as `ce`'s block

    def __post_init__(self) -> None:
        from cascade_jax import generate, teacher_data

        validate.positive_int("samples_per_prompt", self.samples_per_prompt)
        validate.optional_positive_int("prompts", self.prompts, "or None: the whole split")
        validate.optional_positive_int("max_new_tokens", self.max_new_tokens,
                                       "or None: what the row leaves after the prompt")
        validate.one_of("keep", self.keep, teacher_data.KEEP,
                        "'correct' keeps only verified samples")
        validate.boolean("answers_only", self.answers_only)
        validate.string("source", self.source, hint="'' samples the teacher; or a .jsonl path")
        validate.positive_int("prompts_per_part", self.prompts_per_part)
        validate.optional_positive_int("chunk_size", self.chunk_size,
                                       "or None: whole-row logits")
        if self.source and not os.path.exists(self.source):
            raise ValueError(f"source={self.source!r} does not exist; give a JSONL file of "
                             "teacher outputs (or another stage's teacher_data directory), "
                             "or '' to sample the stage's teacher")
        generate.SamplingParams(1, temperature=self.temperature, top_p=self.top_p)  # checks


@dataclasses.dataclass(frozen=True)
class SequenceKD(CrossEntropy):
    name: str = "seq_kd"
    loss_label: str = "cross-entropy on teacher samples"
    uses_teacher: bool = True
    needs_task: bool = True

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        return validate.construct(Settings, block, key)

    def check_files(self, settings: Settings, tokenizer: Any, *, seq_len: int,
                    vocab_size: int) -> None:
        """`source`'s rows, typed and checked against the run's tokenizer and the student's
        vocabulary, before any work."""
        from cascade_jax import teacher_data

        del seq_len  # rows longer than seq_len are cut, as any CE data
        if settings.source:
            teacher_data.check_rows(teacher_data.read(settings.source), tokenizer, vocab_size)

    def build(self, ctx: StageContext) -> Built:
        from cascade_jax import data, prompts, teacher_data

        settings: Settings = ctx.settings
        ctx.require_task('seq_kd')
        if settings.source:
            rows = teacher_data.read(settings.source)
            manifest = {"source": os.path.abspath(settings.source), "rows": len(rows)}
        else:
            if ctx.teacher is None:
                raise ValueError(f"stage {ctx.stage_name!r}: 'seq_kd' samples its teacher; "
                                 "name one, or give seq_kd.source=<teacher outputs.jsonl>")
            problems = ctx.task.make_problems("train", settings.prompts, ctx.seed)
            directory = os.path.join(ctx.directory, DATA_DIR)
            manifest = teacher_data.write(
                directory, ctx.teacher.cfg, ctx.teacher.params, problems, ctx.tokenizer,
                self.sampling(settings, ctx.teacher.cfg, ctx.data.seq_len, ctx.tokenizer,
                              problems),
                rng=jax.random.fold_in(ctx.rng, 17), task=ctx.task,
                teacher=ctx.teacher.fingerprint or ctx.teacher.name, mesh=ctx.mesh,
                prompts_per_part=settings.prompts_per_part)
            rows = teacher_data.read(directory)
        teacher_data.check_rows(rows, ctx.tokenizer, ctx.student.vocab_size)
        rows = teacher_data.judged(rows, ctx.task)
        pairs = teacher_data.training_pairs(rows, ctx.tokenizer, keep=settings.keep,
                                            answers_only=settings.answers_only,
                                            answer_pattern=ctx.task.answer_pattern)

        def batches() -> Any:
            return iter(prompts.pair_dataset(
                pairs, seq_len=ctx.data.seq_len, seed=ctx.seed, shuffle=True, num_epochs=None,
                batch_size=data._host_batch_size(ctx.data.batch_size)))

        built = super().build(dataclasses.replace(ctx, train_batches=batches))
        return dataclasses.replace(built, lineage={
            "seq_kd": dataclasses.asdict(settings),
            "teacher_data": {**manifest, "trained_pairs": len(pairs)}})

    @staticmethod
    def sampling(settings: Settings, teacher: ModelConfig, seq_len: int, tokenizer: Any,
                 problems: list) -> Any:
        """The teacher's SamplingParams: completions that fit a training row after their
        prompt, stopped at EOS."""
        from cascade_jax import data, prompts

        longest = max(len(p) for p in prompts.encode_prompts(tokenizer,
                                                              [p.prompt for p in problems]))
        return rollouts.sampling_params(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=settings.top_p, n=settings.samples_per_prompt,
            seq_len=seq_len - 1,  # an EOS is appended to a completion that ran out of room
            max_seq_len=teacher.max_seq_len, longest_prompt=longest,
            eos=data.eos_id(tokenizer), key="seq_kd")
