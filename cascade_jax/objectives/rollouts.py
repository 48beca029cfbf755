"""What the sampler-driven objectives `grpo` and `preference` share: prompts, rollouts, rewards
and the frozen reference.

- Prompts come from a grain iterator over the task's training problems, one prompt per row
  (`prompts.pair_rows`), so the loop checkpoints their position and a resumed run draws the
  same prompts; each row's completion is only an EOS placeholder (a long reference trace
  never makes a prompt unusable).
- Rollouts: every prompt of the step (all hosts') is sampled `n` times by the current policy in
  one `generate` call, prompt-major, and laid out one sequence per row (`completion_rows`),
  `loss_mask` on the completion. Each host keeps the rows of its own prompts, so the groups of
  `n` stay whole on one host.
- Rewards: the task's verifier, made a number (`RewardSpec`): correctness, a well-formed bonus
  (Magistral's formatting reward, arXiv 2506.10910) and DAPO's soft overlong punishment
  (arXiv 2503.14476, eq. 13) as optional length shaping.
- The reference is the stage's starting params, copied (the train state is donated, and may
  share buffers with them) and kept next to the stage's checkpoints, because a resumed stage
  is given no starting params and the step-0 checkpoint may have been rotated away.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax import model, sharding, validate
from cascade_jax.config import ModelConfig
from cascade_jax.objectives.base import HostBatch, StageContext

REFERENCE_DIR = "reference"
REWARD_FIELDS = ("correct_reward", "well_formed_reward", "overlong_buffer", "overlong_penalty")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """reward = correct·[correct] + well_formed·[well formed] + length shaping.

    Length shaping (DAPO's soft overlong punishment, on when `overlong_buffer` is set): with
    budget L_max = max_new_tokens and buffer L_c, a completion of n tokens loses nothing up
    to L_max − L_c tokens, then `overlong_penalty`·(n − (L_max − L_c))/L_c, linearly up to
    the whole penalty at L_max: long rambling costs reward before it is cut off.
    """

    correct_reward: float = 1.0
    well_formed_reward: float = 0.1
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        validate.number("correct_reward", self.correct_reward)
        validate.number("well_formed_reward", self.well_formed_reward,
                        hint="Magistral's formatting reward is 0.1; 0 turns it off")
        validate.optional_positive_int("overlong_buffer", self.overlong_buffer,
                                       "tokens before the budget where the length penalty "
                                       "starts, or None for no length shaping")
        validate.number("overlong_penalty", self.overlong_penalty, low=0.0,
                        hint="the reward lost by a completion that fills the whole budget")

    def check_budget(self, max_new_tokens: int, key: str) -> None:
        if self.overlong_buffer is not None and self.overlong_buffer > max_new_tokens:
            raise ValueError(f"{key}.overlong_buffer={self.overlong_buffer} exceeds the "
                             f"budget max_new_tokens={max_new_tokens}; give a buffer <= "
                             f"{max_new_tokens} (DAPO used 4096 of 20480)")


class Judged(NamedTuple):
    """The verifier's judgement of R completions, and the reward made of it (all [R])."""

    reward: np.ndarray       # float32
    correct: np.ndarray      # float32 0/1
    well_formed: np.ndarray  # float32 0/1


def overlong_penalty(lengths_R: np.ndarray, max_new_tokens: int, spec: RewardSpec
                     ) -> np.ndarray:
    """[R] float32 ≤ 0: DAPO's soft overlong punishment (0 when `overlong_buffer` is None)."""
    lengths_R = np.asarray(lengths_R, np.float32)
    if spec.overlong_buffer is None:
        return np.zeros_like(lengths_R)
    free = max_new_tokens - spec.overlong_buffer
    over_R = np.clip((lengths_R - free) / spec.overlong_buffer, 0.0, 1.0)
    return (-spec.overlong_penalty * over_R).astype(np.float32)


def judge_with_verifier(task: Any, prompt_texts_R: Sequence[str],
                        completion_texts_R: Sequence[str], lengths_R: np.ndarray,
                        max_new_tokens: int, spec: RewardSpec) -> Judged:
    """Rewards of R completions by the task's verifier (`task.score`), host-side."""
    scores = [task.score(p, c) for p, c in zip(prompt_texts_R, completion_texts_R, strict=True)]
    correct_R = np.asarray([s.correct for s in scores], np.float32)
    well_formed_R = np.asarray([s.well_formed for s in scores], np.float32)
    reward_R = (spec.correct_reward * correct_R + spec.well_formed_reward * well_formed_R
                + overlong_penalty(lengths_R, max_new_tokens, spec))
    return Judged(reward_R.astype(np.float32), correct_R, well_formed_R)


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """The stage's training prompts: a checkpointable iterator of one-prompt rows, each
    prompt's text by its token ids (what the verifier reads), and the longest prompt."""

    batches: Iterator[HostBatch]
    texts: dict[tuple[int, ...], str]
    longest: int

    def text(self, tokenizer: Any, prompt_ids: np.ndarray) -> str:
        key = tuple(int(t) for t in prompt_ids)
        return self.texts[key] if key in self.texts else tokenizer.decode(list(key))


def prompt_source(ctx: StageContext, n_problems: int | None, prompts_per_step: int
                  ) -> PromptSource:
    """`prompts_per_step` global prompts per step from `n_problems` training problems of the
    task, shuffled and repeated endlessly, each host reading its own share."""
    from cascade_jax import data, prompts

    problems = ctx.task.make_problems("train", n_problems, ctx.seed)
    if not problems:
        raise ValueError(f"stage {ctx.stage_name!r}: task {ctx.task.name!r} has no training "
                         "problems; give it more")
    texts = [p.prompt for p in problems]
    ids = prompts.encode_prompts(ctx.tokenizer, texts)
    eos = data.eos_id(ctx.tokenizer)
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token; completions must stop on one")
    pairs = prompts.token_pairs(ids, [np.zeros(0, np.int32)] * len(ids), eos_id=eos)
    batches = iter(prompts.pair_rows(pairs, seq_len=ctx.data.seq_len, seed=ctx.seed,
                                     batch_size=data._host_batch_size(prompts_per_step)))
    return PromptSource(batches, {tuple(i.tolist()): t for i, t in zip(ids, texts, strict=True)},
                        max(len(i) for i in ids))


def sampling_params(*, max_new_tokens: int | None, temperature: float, top_p: float | None,
                    n: int, seq_len: int, max_seq_len: int, longest_prompt: int,
                    eos: int | None, key: str) -> Any:
    """The policy's SamplingParams: `n` completions per prompt that fit a row after the
    longest prompt (None tokens: all the room there is), stopped at EOS."""
    from cascade_jax import generate

    room = min(seq_len, max_seq_len) - longest_prompt
    new = max_new_tokens or room
    if not 1 <= new <= room:
        raise ValueError(f"{key}.max_new_tokens={new}: the longest prompt has {longest_prompt} "
                         f"tokens and a row {seq_len}, so at most {room} fit; lower it or "
                         "raise config.data.seq_len")
    return generate.SamplingParams(new, temperature=temperature, top_p=top_p, n=n,
                                   stop_tokens=() if eos is None else (eos,))


# ----------------------------------------------------------------------------- rollouts


class Rollouts(NamedTuple):
    """R = prompts × n sampled sequences of every host's prompts, prompt-major."""

    rows: dict[str, np.ndarray]  # [R, L]: tokens, segment_ids, positions, loss_mask
    sampler_logprobs: np.ndarray  # [R, L] float32, target-aligned (0 off the completion)
    prompts: list[np.ndarray]     # [R] the prompt of each row
    texts: list[str]              # [R] each completion's text, cut before its EOS
    lengths: np.ndarray           # [R] int32 completion tokens, a stop token included


def global_rows(batch: HostBatch) -> HostBatch:
    """Every process's rows (each samples all prompts in one SPMD call); one process: as is."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in batch.items()}


def local_rows(rows: HostBatch, n_global: int) -> HostBatch:
    """This process's contiguous share of `n_global` rows (whole groups when every host
    holds the same number of prompts)."""
    local = n_global // jax.process_count()
    start = jax.process_index() * local
    return {k: v[start:start + local] for k, v in rows.items()}


def sampler_logprob_rows(prompts_R: Sequence[np.ndarray], logprobs_RT: np.ndarray,
                         lengths_R: np.ndarray, seq_len: int) -> np.ndarray:
    """[R, L] float32: the sampler's log-prob of completion token j at position p + j − 1 (p
    = prompt tokens), the target-aligned layout of `posttrain.target_logprobs`."""
    out_RL = np.zeros((len(prompts_R), seq_len), np.float32)
    for r, (prompt, n) in enumerate(zip(prompts_R, np.asarray(lengths_R), strict=True)):
        out_RL[r, prompt.size - 1:prompt.size - 1 + int(n)] = logprobs_RT[r, :int(n)]
    return out_RL


def sample_rollouts(cfg: ModelConfig, params: Any, prompts_P: Sequence[np.ndarray],
                    sampling: Any, *, seq_len: int, rng: jax.Array, mesh: Any,
                    tokenizer: Any) -> Rollouts:
    """`sampling.n` completions of each prompt by `params`, as one-sequence rows."""
    from cascade_jax import generate, prompts

    out = generate.generate(cfg, params, list(prompts_P), sampling, rng=rng, mesh=mesh)
    prompts_R = [p for p in prompts_P for _ in range(sampling.n)]
    rows = prompts.completion_rows(prompts_R, out.tokens, out.lengths, seq_len=seq_len)
    return Rollouts(rows, sampler_logprob_rows(prompts_R, out.logprobs, out.lengths, seq_len),
                    prompts_R, prompts.decode_completions(tokenizer, out.tokens, out.lengths),
                    np.asarray(out.lengths, np.int32))


def column(values_R: np.ndarray) -> np.ndarray:
    """[R] -> [R, 1] float32: a per-row feature in the batch contract's rank 2 (batches are
    sharded P(batch axes, None))."""
    return np.asarray(values_R, np.float32).reshape(-1, 1)


# ----------------------------------------------------------------------------- reference


@dataclasses.dataclass(frozen=True)
class WithFrozen:
    """`(state, batch) -> (state, metrics)`: a jitted `(state, frozen, batch)` step with its
    frozen inputs (reference, teacher) bound, and kept readable as `.frozen`."""

    step: Callable[..., Any]
    frozen: Any

    def __call__(self, state: Any, batch: Any) -> Any:
        return self.step(state, self.frozen, batch)



def _copy(tree: Any) -> Any:
    """New buffers for every leaf (jitted with out_shardings: never the input's own)."""
    return jax.tree.map(jnp.copy, tree)


def frozen_start(ctx: StageContext) -> model.Params:
    """The stage's starting params, as a frozen copy placed on the student's shardings.

    Fresh stage: `ctx.child_params` (or the random init `steps.create_state` makes from
    `ctx.rng`), saved under `<stage>/reference`. Resumed stage (no child params given): read
    back from there.
    """
    from cascade_jax import checkpoint

    shardings = sharding.param_shardings(ctx.student, ctx.mesh)
    directory = os.path.join(ctx.directory, REFERENCE_DIR) if ctx.directory else ""
    saved = bool(directory) and checkpoint.latest_step(directory) is not None
    if ctx.child_params is not None:
        params = ctx.child_params
    elif saved:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              model.param_shapes(ctx.student), shardings)
        return checkpoint.restore(directory, target).state
    elif ctx.directory and checkpoint.latest_step(
            os.path.join(ctx.directory, "checkpoints")) is not None:
        raise ValueError(f"stage {ctx.stage_name!r} resumes, but its reference params "
                         f"({directory}) were never saved; delete {ctx.directory} to restart "
                         "the stage")
    else:
        params = jax.jit(model.init, static_argnums=0, out_shardings=shardings)(ctx.student,
                                                                                ctx.rng)
    params = jax.jit(_copy, out_shardings=shardings)(params)
    if directory and not saved:
        checkpoint.save(directory, 0, params, metadata={"stage": ctx.stage_name,
                                                        "what": "frozen starting params"})
    return params
