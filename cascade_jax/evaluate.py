"""How good a child is: perplexity on held-out text, how close it is to a teacher, and (on a
verifiable task) how often what it *generates* is right.

A cascade's results table compares stages by validation loss (perplexity), forward KL to the
teacher and top-1 agreement with it. The KL and agreement come from the fused-chunked loss of
`cascade_jax.distill.losses`, so evaluating a 131k-vocabulary child never builds [B, L, V]
logits for both models at once. On a task run the table adds `task_scores`: greedy pass@1,
maj@k / pass@k with k samples, the well-formed rate and the mean completion length, decoded
by `cascade_jax.generate` and judged by the task's verifier: a model can lower its loss on
reference traces and still not reach the right answer on its own.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cascade_jax import generate, lm, loop, model, sharding, steps, tasks
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# KL(teacher ‖ student) at T = 1: what "KL to teacher" means in a results table. The fused
# loss pads L to a multiple of the chunk (a shorter L is one chunk), so every length is fused.
CHUNK = 256  # positions per logits block of every fused or chunked evaluation
_KL_SPEC = losses.LossSpec(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=CHUNK)


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
              teacher_params: model.Params | None = None, micro_batches: int = 1,
              chunk_size: int | None = None) -> Callable[[model.Params], dict[str, float]]:
    """`params -> {loss, perplexity, tokens, [accuracy | kl_to_teacher, top1_agreement]}`
    over a fresh pass of `batches()` (the validation split): what `loop.fit` calls every
    `eval_every` steps.

    With a teacher, the figures include forward KL to it and top-1 agreement with it.
    `micro_batches` splits each batch (scanned) when its activations would not fit at once;
    `chunk_size` makes a teacher-free evaluation's logits a block of positions at a time (with
    a teacher it is always fused).
    """
    if teacher_cfg is None:
        step = steps.jit_eval_sums(cfg, mesh, micro_batches=micro_batches, chunk_size=chunk_size)
    else:
        with_teacher = jit_teacher_metric_sums(cfg, teacher_cfg, mesh,
                                               micro_batches=micro_batches)

        def step(params: model.Params, batch: Batch) -> Metrics:
            return with_teacher(params, teacher_params, batch)

    def evaluate(params: model.Params) -> dict[str, float]:
        return loop.evaluate(step, params, batches(), mesh, max_batches=max_batches)

    return evaluate


# -------------------------------------------------------------- loss by position bucket


def position_buckets(positions_BL: jax.Array, edges: Sequence[int]) -> jax.Array:
    """[B, L, K] float32 one-hot of the bucket [edges[k], edges[k+1]) each position falls in
    (all zero past the last edge): K = len(edges) - 1 small weights, never [B, L, V]."""
    lo_K, hi_K = np.asarray(edges[:-1]), np.asarray(edges[1:])
    at_BL1 = positions_BL[..., None]
    return ((at_BL1 >= lo_K) & (at_BL1 < hi_K)).astype(jnp.float32)


def position_loss_sums(cfg: ModelConfig, params: model.Params, batch: Batch,
                       edges: Sequence[int], chunk_size: int | None = CHUNK) -> Metrics:
    """`loss_sum_K` and `count_K`: the evaluation CE of `steps.ce_sums` with each target
    weighted into the bucket of the position predicting it (its segment position: the context
    it sees is that many tokens + 1). Where a long context helps is where these differ.
    Logits are made `chunk_size` positions at a time (None: whole rows)."""
    tokens_BL, segment_ids_BL = batch["tokens"], batch.get("segment_ids")
    positions_BL = batch.get("positions")
    if positions_BL is None:
        positions_BL = model.positions_from_segments(
            jnp.ones_like(tokens_BL) if segment_ids_BL is None else segment_ids_BL)
    targets_BL, weights_BL = lm.next_token_targets(batch)
    if chunk_size is None:
        nll_BL = lm.token_nll(model.forward(cfg, params, tokens_BL, segment_ids_BL,
                                            positions_BL), targets_BL)
    else:
        nll_BL, _ = lm.chunked_nll_and_hits(
            model.hidden_states(cfg, params, tokens_BL, segment_ids_BL, positions_BL),
            model.lm_head_weights(cfg, params), targets_BL, chunk_size)
    weights_BLK = position_buckets(positions_BL, edges) * weights_BL[..., None]
    return {"loss_sum_K": jnp.einsum("BL,BLK->K", jnp.where(weights_BL > 0, nll_BL, 0.0),
                                     weights_BLK),
            "count_K": jnp.sum(weights_BLK, axis=(0, 1))}


def jit_position_loss_sums(cfg: ModelConfig, mesh: Mesh, edges: Sequence[int], *,
                           micro_batches: int = 1, chunk_size: int | None = CHUNK,
                           rules: Any = sharding.DEFAULT_RULES
                           ) -> Callable[[model.Params, Batch], Metrics]:
    """`position_loss_sums` compiled for `mesh`, the batch scanned as `micro_batches`."""
    edges = tuple(int(e) for e in edges)

    def sums(params: model.Params, batch: Batch) -> Metrics:
        return steps.sum_over_micro_batches(
            functools.partial(position_loss_sums, cfg, params, edges=edges,
                              chunk_size=chunk_size), micro_batches, batch)

    return jax.jit(sharding.traced_on_mesh(sums, mesh, rules),
                   in_shardings=(sharding.param_shardings(cfg, mesh, rules),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def losses_by_position(cfg: ModelConfig, params: model.Params,
                       batches: Iterable[dict[str, np.ndarray]], edges: Sequence[int],
                       mesh: Mesh, *, max_batches: int | None = None, micro_batches: int = 1,
                       chunk_size: int | None = CHUNK) -> dict[str, list[float]]:
    """Validation loss per position bucket over a finite stream of host batches:
    `{"edges": [0, e1, ..., L], "loss": [K] nats/token (NaN for an empty bucket),
    "tokens": [K] targets counted}`. A model run beyond the length it was trained at shows it
    here first: its later buckets' loss rises (context extension, arXiv 2309.00071)."""
    step = jit_position_loss_sums(cfg, mesh, edges, micro_batches=micro_batches,
                                  chunk_size=chunk_size)
    loss_K = np.zeros(len(edges) - 1)
    count_K = np.zeros(len(edges) - 1)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        sums = jax.device_get(step(params, sharding.shard_batch(batch, mesh)))
        loss_K += np.asarray(sums["loss_sum_K"], np.float64)
        count_K += np.asarray(sums["count_K"], np.float64)
    mean_K = np.divide(loss_K, count_K, out=np.full_like(loss_K, np.nan), where=count_K > 0)
    return {"edges": [int(e) for e in edges], "loss": [float(v) for v in mean_K],
            "tokens": [float(c) for c in count_K]}


# ------------------------------------------------------------------- scores by generation


def default_max_new_tokens(cfg: ModelConfig, prompts_R: Sequence[np.ndarray],
                           reference_lengths: Sequence[int]) -> int:
    """Room for the longest reference completion (+ EOS) and 8 tokens to ramble, within the
    model's positions after the longest prompt."""
    room = cfg.max_seq_len - max(len(p) for p in prompts_R)
    if room < 1:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts_R)} tokens leaves no room "
                         f"to generate within max_seq_len={cfg.max_seq_len}")
    return max(1, min(max(reference_lengths) + 1 + 8, room))


def sample_in_chunks(cfg: ModelConfig, params: model.Params, prompts_R: Sequence[np.ndarray],
                     sampling: generate.SamplingParams, *, rng: jax.Array | None = None,
                     mesh: Mesh | None = None, chunk: int = 256) -> generate.Completions:
    """`generate` over many prompts, `chunk` at a time; the last chunk is padded with copies
    of its first prompt (results dropped) so every call reuses one compiled sampler. Chunk c
    samples with `fold_in(rng, c)`."""
    parts = []
    for c, first in enumerate(range(0, len(prompts_R), chunk)):
        part = list(prompts_R[first:first + chunk])
        count = len(part)
        part += [part[0]] * (min(chunk, len(prompts_R)) - count)
        out = generate.generate(cfg, params, part, sampling, mesh=mesh,
                                rng=None if rng is None else jax.random.fold_in(rng, c))
        rows = count * sampling.n
        parts.append(generate.Completions(*(x[:rows] for x in out)))
    return generate.Completions(*(np.concatenate(column) for column in zip(*parts,
                                                                           strict=True)))


def greedy_continuations(cfg: ModelConfig, params: model.Params, tokenizer: Any,
                         prompts: Sequence[str], *, max_new_tokens: int,
                         mesh: Mesh | None = None) -> list[dict[str, str]]:
    """[{'prompt', 'text'}]: each prompt's greedy continuation, decoded (generation stops at
    the tokenizer's EOS); one compiled sampler for all of them."""
    from cascade_jax import data

    prompts_R = [np.asarray(tokenizer.encode(p).ids, np.int32) for p in prompts]
    eos = data.eos_id(tokenizer)
    room = cfg.max_seq_len - max(len(p) for p in prompts_R)
    sampling = generate.SamplingParams(max_new_tokens=max(1, min(max_new_tokens, room)),
                                       temperature=0.0,
                                       stop_tokens=() if eos is None else (eos,))
    out = generate.generate(cfg, params, prompts_R, sampling, mesh=mesh)
    return [{"prompt": prompt, "text": tokenizer.decode(out.tokens[i, :out.lengths[i]].tolist())}
            for i, prompt in enumerate(prompts)]


def task_scores(cfg: ModelConfig, params: model.Params, task: tasks.Task, tokenizer: Any,
                problems: Sequence[tasks.Problem], *, samples: int = 1,
                temperature: float = 1.0, max_new_tokens: int | None = None,
                rng: jax.Array | None = None, mesh: Mesh | None = None, chunk: int = 256
                ) -> dict[str, float]:
    """How often the model's own completions of `problems` are right, by the task's verifier.

    Always: `pass@1` (greedy accuracy), `well_formed` (greedy completions with an answer
    line), `length` (mean greedy completion tokens, stop token included). With `samples`
    k > 1 (at `temperature`, `rng` required): `maj@k` (the most frequent well-formed answer
    of the k is right; ties go to the answer seen first) and `pass@k` (any of the k is).
    """
    from cascade_jax import prompts  # grain: only when a task is scored

    if not problems:
        raise ValueError("no problems to score; pass at least one")
    eos = prompts.data.eos_id(tokenizer)
    prompts_R = prompts.encode_prompts(tokenizer, [p.prompt for p in problems])
    if max_new_tokens is None:
        reference = [len(ids) for ids in prompts.encode_prompts(
            tokenizer, [p.completion for p in problems])]
        max_new_tokens = default_max_new_tokens(cfg, prompts_R, reference)
    stops = () if eos is None else (eos,)
    greedy = sample_in_chunks(cfg, params, prompts_R, generate.SamplingParams(
        max_new_tokens, temperature=0.0, stop_tokens=stops), mesh=mesh, chunk=chunk)
    texts = prompts.decode_completions(tokenizer, greedy.tokens, greedy.lengths)
    judged = [task.score(p.prompt, t) for p, t in zip(problems, texts, strict=True)]
    out = {"pass@1": float(np.mean([s.correct for s in judged])),
           "well_formed": float(np.mean([s.well_formed for s in judged])),
           "length": float(np.mean(greedy.lengths))}
    if samples > 1:
        if rng is None:
            raise ValueError(f"samples={samples} draws k completions per problem: pass rng")
        drawn = sample_in_chunks(cfg, params, prompts_R, generate.SamplingParams(
            max_new_tokens, temperature=temperature, n=samples, stop_tokens=stops),
            rng=rng, mesh=mesh, chunk=max(1, chunk // samples))
        texts = prompts.decode_completions(tokenizer, drawn.tokens, drawn.lengths)
        majority, any_right = [], []
        for i, problem in enumerate(problems):
            group = texts[i * samples:(i + 1) * samples]
            any_right.append(any(task.score(problem.prompt, t).correct for t in group))
            answers = [tasks.extract_answer(t, task.answer_pattern) for t in group]
            votes = collections.Counter(a for a in answers if a is not None).most_common(1)
            # the majority answer is judged through a completion that gives it
            majority.append(bool(votes) and task.score(
                problem.prompt, group[answers.index(votes[0][0])]).correct)
        out[f"maj@{samples}"] = float(np.mean(majority))
        out[f"pass@{samples}"] = float(np.mean(any_right))
    return out

