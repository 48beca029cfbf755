"""`preference`: DPO against the stage's frozen starting params, online or offline, with or
without the score offset.

- Online (Guo et al. 2024, online AI feedback, arXiv 2402.04792; Ministral 3's ODPO): per
  prompt, `samples_per_prompt` completions from the *current* policy (key fold_in(rng, step),
  so a resumed run samples the same), scored by a judge; the best is chosen, the worst
  rejected, and the pair trained on at once. A prompt whose samples all score the same gives
  no preference: its pair is kept in the batch (static shapes) with weight 0 and counted in
  `tied`.
- Offline: `source=<file.jsonl>` of `{"prompt", "chosen", "rejected"[, "score_chosen",
  "score_rejected"]}` lines, shuffled and repeated by a checkpointed grain iterator.
- Loss: `posttrain.dpo_loss` (Rafailov et al. 2023, arXiv 2305.18290), or with
  `loss='odpo'` `posttrain.odpo_loss` (Amini et al. 2024, arXiv 2402.10571): the offset
  α·log(s_w − s_l) from the judge's (or the file's) scores.

Judges: `judge='verifier'` scores a completion by the task's verifier (`RewardSpec`: correct,
well-formed, optional length shaping). `judge='model'`: the stage's teacher compares each pair
of a prompt's samples on a comparison prompt (`judge_template`), through our sampler, in both
orders (`objectives.judge`: verdicts, position bias, win-rate scores). Another scoring function
plugs in with `register_judge(name, factory)`. A judge other than the verifier is measured
against it: `judge_agreement` and `judge_ties` (each over its own `_count`).

Each batch row holds one pair: the chosen sequence in the batch contract's keys (`tokens`,
`segment_ids`, `positions`, `loss_mask`), the rejected one under `rejected_*`, and [P, 1]
`pair_weight`, `score_chosen`, `score_rejected`; the step runs both halves through one
forward. Metrics are pair means (`count` = pairs): the loss and the DPO metrics over the
pairs that were trained on, `tied` over all. (The loop's `tokens_seen` counts the chosen
halves' completion tokens, what `loss_mask` marks; a batch of ties only still takes an
AdamW step, on a zero gradient.)

    stages.child_instruct.preference = dict(beta=0.1, samples_per_prompt=2,
                                            max_new_tokens=48)
    stages.child_odpo.preference = dict(loss='odpo', alpha=1.0, source='pairs.jsonl')
    stages.child_judged.preference = dict(judge='model', samples_per_prompt=4)  # its teacher
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cascade_jax import aot, model, posttrain, sharding, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.objectives import judge as judges
from cascade_jax.objectives import rollouts
from cascade_jax.objectives.base import Built, HostBatch, StageContext

LOSSES = ("dpo", "odpo")
SEQUENCE_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
REJECTED = "rejected_"
PAIR_METRICS = ("reward_accuracy", "margin", "chosen_reward", "rejected_reward",
                "chosen_logprob", "rejected_logprob")

# `judge(prompt texts [R], completion texts [R], completion lengths [R], k=, step=)` -> scores
# [R] (or a `judges.Judgement`); (the stage, its settings, the rollouts' shape) -> a judge
JudgeFn = judges.JudgeFn
JudgeFactory = Callable[[StageContext, "Settings", judges.RolloutShape], JudgeFn]
JUDGE_FIELDS = ("judge_template", "judge_labels", "judge_verdict", "judge_max_new_tokens",
                "judge_temperature")  # judge='model' only


def verifier_rewards(ctx: StageContext, settings: Settings, max_new_tokens: int,
                     prompts_R: Sequence[str], completions_R: Sequence[str],
                     lengths_R: np.ndarray) -> np.ndarray:
    """[R] the task's verifier, made a score by `RewardSpec`."""
    return rollouts.judge_with_verifier(ctx.task, prompts_R, completions_R, lengths_R,
                                        max_new_tokens, settings.rewards).reward


def _verifier_judge(ctx: StageContext, settings: Settings, shape: judges.RolloutShape
                    ) -> JudgeFn:
    def judge(prompts_R: Sequence[str], completions_R: Sequence[str], lengths_R: np.ndarray,
              **_: Any) -> np.ndarray:
        return verifier_rewards(ctx, settings, shape.max_new_tokens, prompts_R, completions_R,
                                lengths_R)
    return judge


JUDGES: dict[str, JudgeFactory] = {"verifier": _verifier_judge, "model": judges.model_judge}


def register_judge(name: str, factory: JudgeFactory) -> None:
    """Make `judge=name` available: `factory(ctx, settings, judges.RolloutShape)` returns the
    function that scores a step's completions, called as `judge(prompts_R, completions_R,
    lengths_R, k=samples per prompt, step=loop step)` (rows prompt-major; randomness keyed
    by the step); it returns [R] scores or a `judges.Judgement` with its comparisons."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"judge name {name!r} must be a non-empty string")
    JUDGES[name] = factory


@dataclasses.dataclass(frozen=True)
class Settings:
    """loss: 'dpo' | 'odpo'. beta: DPO's β. alpha / min_score_gap: the offset of 'odpo'.
    source: '' (online: the policy samples, the judge ranks) or a JSONL file of pairs.
    judge: a name in `JUDGES` ('verifier', 'model': the stage's teacher compares samples).
    judge_template / judge_labels / judge_verdict ('generate' | 'logprob') /
    judge_max_new_tokens / judge_temperature: the judge model's comparison prompt, its verdict
    labels and how the verdict is read (`objectives.judge`). samples_per_prompt: online
    samples per prompt (best vs worst). pairs_per_step: pairs (prompts) per loop step (None:
    config.data.batch_size).
    sample_temperature / top_p / max_new_tokens / prompts: the online sampler and the
    problems it draws from. rewards: the verifier's score (`RewardSpec` fields, flat).
    chunk_size: positions per chunk of the log-prob head."""

    rewards: rollouts.RewardSpec = dataclasses.field(default_factory=rollouts.RewardSpec)
    loss: str = "dpo"
    beta: float = 0.1
    alpha: float = 1.0
    min_score_gap: float = 1e-3
    source: str = ""
    judge: str = "verifier"
    judge_template: str = judges.DEFAULT_TEMPLATE
    judge_labels: tuple[str, str] = judges.DEFAULT_LABELS
    judge_verdict: str = "generate"
    judge_max_new_tokens: int = 4
    judge_temperature: float = 0.0
    samples_per_prompt: int = 2
    pairs_per_step: int | None = None
    sample_temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int | None = None
    prompts: int | None = 20_000
    chunk_size: int | None = 512

    def __post_init__(self) -> None:
        from cascade_jax import generate

        validate.one_of("loss", self.loss, LOSSES, "'odpo' offsets by the score gap")
        validate.positive_number("beta", self.beta, "0.1 is the usual start")
        validate.number("alpha", self.alpha, low=0.0, hint="0 is plain DPO; ODPO used 1")
        validate.positive_number("min_score_gap", self.min_score_gap,
                                 "below the smallest score gap that should count, e.g. 1e-3")
        validate.string("source", self.source, hint="'' samples online; or a .jsonl of pairs")
        if self.source and not os.path.isfile(self.source):
            raise ValueError(f"source={self.source!r} is not a file; give a JSONL file of "
                             "{prompt, chosen, rejected} pairs, or '' to sample online")
        validate.one_of("judge", self.judge, JUDGES,
                        "register another with preference.register_judge")
        object.__setattr__(self, "judge_labels", judges.check_template(
            self.judge_template, self.judge_labels))
        validate.one_of("judge_verdict", self.judge_verdict, judges.VERDICTS,
                        "'logprob' compares the labels' log-probs, without sampling")
        validate.positive_int("judge_max_new_tokens", self.judge_max_new_tokens,
                              "a few tokens: the verdict label")
        validate.temperature("judge_temperature", self.judge_temperature)
        generate.SamplingParams(self.judge_max_new_tokens, temperature=self.judge_temperature)
        if self.judge != "model":
            fields = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [f for f in JUDGE_FIELDS if getattr(self, f) != fields[f]]
            if changed:
                raise ValueError(f"{changed} set the judge model, but judge={self.judge!r}; "
                                 "set judge='model' or drop them")
        if self.source and self.judge != "verifier":
            raise ValueError(f"judge={self.judge!r} judges online samples, but source="
                             f"{self.source!r} reads offline pairs (their order is the "
                             "preference); drop one")
        validate.positive_int("samples_per_prompt", self.samples_per_prompt)
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: a preference "
                             "needs two samples of a prompt; use 2 (or more: best vs worst)")
        validate.optional_positive_int("pairs_per_step", self.pairs_per_step,
                                       "or None: config.data.batch_size")
        validate.optional_positive_int("max_new_tokens", self.max_new_tokens,
                                       "or None: what the row leaves after the prompt")
        validate.optional_positive_int("prompts", self.prompts, "or None: the whole split")
        validate.optional_positive_int("chunk_size", self.chunk_size,
                                       "or None: whole-sequence logits")
        validate.temperature("sample_temperature", self.sample_temperature)
        generate.SamplingParams(1, temperature=self.sample_temperature, top_p=self.top_p)


OWN_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "rewards")


def parse(block: Mapping[str, Any], key: str) -> Settings:
    validate.known_keys(key, block, (*OWN_FIELDS, *rollouts.REWARD_FIELDS))
    rewards = validate.construct(rollouts.RewardSpec, {k: v for k, v in block.items()
                                                       if k in rollouts.REWARD_FIELDS}, key)
    return validate.construct(Settings, {**{k: v for k, v in block.items()
                                            if k in OWN_FIELDS}, "rewards": rewards}, key)


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the preference step (hashable)."""

    student: ModelConfig
    loss: str = "dpo"
    beta: float = 0.1
    alpha: float = 1.0
    min_score_gap: float = 1e-3
    chunk_size: int | None = 512
    grad_accum: int = 1


def both_halves(batch: steps.Batch) -> steps.Batch:
    """[2P, L]: the chosen sequences (rows 0..P−1), then the rejected ones."""
    return {k: jnp.concatenate([batch[k], batch[REJECTED + k]]) for k in SEQUENCE_KEYS}


def pair_logprob_sums(scfg: StepConfig, params: Any, batch: steps.Batch
                      ) -> tuple[jax.Array, jax.Array]:
    """(chosen [P], rejected [P]): Σ log-prob over each completion's tokens (its EOS included,
    the prompt not), one forward over both halves."""
    both = both_halves(batch)
    logp_BL, weights_BL = posttrain.target_logprobs(scfg.student, params, both,
                                                    chunk_size=scfg.chunk_size)
    rows = both["tokens"].shape[0]
    ids_BL = jnp.where(both["segment_ids"] != 0, jnp.arange(rows)[:, None], -1)  # 1 per row
    sums_S = posttrain.sequence_logprob_sums(logp_BL, weights_BL, ids_BL, rows)
    return sums_S[:rows // 2], sums_S[rows // 2:]


def pair_losses(scfg: StepConfig, policy: tuple[jax.Array, jax.Array],
                reference: tuple[jax.Array, jax.Array], score_chosen_P: jax.Array,
                score_rejected_P: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [P], metrics [P] each): `posttrain.dpo_loss` / `odpo_loss` of each pair alone,
    so pairs can be weighted (ties left out) and summed over micro-batches."""
    def one(pc: jax.Array, pr: jax.Array, rc: jax.Array, rr: jax.Array, sc: jax.Array,
            sr: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        args = (pc[None], pr[None], rc[None], rr[None])
        if scfg.loss == "odpo":
            return posttrain.odpo_loss(*args, sc[None], sr[None], beta=scfg.beta,
                                       alpha=scfg.alpha, min_score_gap=scfg.min_score_gap)
        return posttrain.dpo_loss(*args, beta=scfg.beta)

    return jax.vmap(one)(*policy, *reference, score_chosen_P, score_rejected_P)


def loss_sums(scfg: StepConfig, params: Any, reference: Any, scale: jax.Array,
              batch: steps.Batch) -> tuple[jax.Array, steps.Metrics]:
    """(Σ weight·loss·scale, sums): `scale` = pairs / trained pairs of the whole batch, so
    that dividing by the pairs (`count`) gives means over the trained pairs."""
    weight_P = batch["pair_weight"][:, 0]
    ref = jax.lax.stop_gradient(pair_logprob_sums(scfg, jax.lax.stop_gradient(reference),
                                                  batch))
    loss_P, metrics_P = pair_losses(scfg, pair_logprob_sums(scfg, params, batch), ref,
                                    batch["score_chosen"][:, 0], batch["score_rejected"][:, 0])
    names = PAIR_METRICS + (("offset", "gap_clamped") if scfg.loss == "odpo" else ())
    sums = {f"{k}_sum": jnp.sum(weight_P * metrics_P[k]) * scale for k in names}
    sums["score_gap_sum"] = jnp.sum(weight_P * (batch["score_chosen"][:, 0]
                                                - batch["score_rejected"][:, 0])) * scale
    sums["loss_sum"] = jnp.sum(weight_P * loss_P) * scale
    sums["tied_sum"] = jnp.sum(1.0 - weight_P)
    for name in judges.METRICS:  # a judge other than the verifier: (sum, own count) columns
        if name in batch:
            sums[f"{name}_sum"] = jnp.sum(batch[name])
            sums[f"{name}_count"] = jnp.sum(batch[f"{name}_count"])
    sums["count"] = jnp.asarray(weight_P.shape[0], jnp.float32)
    return sums["loss_sum"], sums


def train_step(scfg: StepConfig, optimizer: optax.GradientTransformation,
               state: steps.TrainState, reference: Any, batch: steps.Batch
               ) -> tuple[steps.TrainState, steps.Metrics]:
    """One optimizer step on a batch of pairs (micro-batched by `grad_accum`, pairs whole)."""
    weight_P = batch["pair_weight"][:, 0]
    scale = weight_P.shape[0] / jnp.maximum(jnp.sum(weight_P), 1.0)
    def loss_fn(params: Any, micro: steps.Batch) -> tuple[jax.Array, steps.Metrics]:
        return loss_sums(scfg, params, reference, scale, micro)

    grads, metrics = steps.accumulate_grads(loss_fn, scfg.grad_accum, state.params, batch)
    return steps.apply_grads(optimizer, state, grads, metrics)


@functools.lru_cache(maxsize=8)
def jit_train_step(scfg: StepConfig, optimizer: optax.GradientTransformation, mesh: Any
                   ) -> Any:
    """`train_step` compiled for `mesh`: `(state, reference, batch) -> (state, metrics)`,
    built once per (step config, optimizer, mesh)."""
    return steps.jit_step(functools.partial(train_step, scfg, optimizer),
                          steps.model_state_shardings(scfg.student, optimizer, mesh), mesh,
                          frozen_shardings=(sharding.param_shardings(scfg.student, mesh),))


# ----------------------------------------------------------------------------- pairs


def best_and_worst(scores_PK: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen [P], rejected [P], tied [P] bool): per prompt the index of its best and of its
    worst sample (first of equals); tied where all K scores are equal (then 0 and 1)."""
    scores_PK = np.asarray(scores_PK)
    tied_P = scores_PK.max(axis=1) == scores_PK.min(axis=1)
    chosen_P = np.where(tied_P, 0, scores_PK.argmax(axis=1))
    rejected_P = np.where(tied_P, 1, scores_PK.argmin(axis=1))
    return chosen_P, rejected_P, tied_P


def pair_batch(chosen: Mapping[str, np.ndarray], rejected: Mapping[str, np.ndarray],
               score_chosen_P: np.ndarray, score_rejected_P: np.ndarray,
               weight_P: np.ndarray) -> dict[str, np.ndarray]:
    """One pair per row: chosen under the contract's keys, rejected under `rejected_*`."""
    return {**{k: chosen[k] for k in SEQUENCE_KEYS},
            **{REJECTED + k: rejected[k] for k in SEQUENCE_KEYS},
            "pair_weight": rollouts.column(weight_P),
            "score_chosen": rollouts.column(score_chosen_P),
            "score_rejected": rollouts.column(score_rejected_P)}


def online_pairs(rows: Mapping[str, np.ndarray], scores_R: np.ndarray, k: int
                 ) -> dict[str, np.ndarray]:
    """Pairs from R = P × k scored rollouts (prompt-major): best vs worst of each prompt."""
    scores_PK = np.asarray(scores_R, np.float32).reshape(-1, k)
    chosen_P, rejected_P, tied_P = best_and_worst(scores_PK)
    base_P = np.arange(scores_PK.shape[0]) * k
    pick = {name: {key: rows[key][base_P + idx] for key in SEQUENCE_KEYS}
            for name, idx in (("chosen", chosen_P), ("rejected", rejected_P))}
    lines = np.arange(scores_PK.shape[0])
    return pair_batch(pick["chosen"], pick["rejected"], scores_PK[lines, chosen_P],
                      scores_PK[lines, rejected_P], (~tied_P).astype(np.float32))


def agreement(judged: judges.Judgement, verifier_R: np.ndarray, k: int
              ) -> dict[str, np.ndarray]:
    """The judge's agreement with the verifier as [P, 1] columns of the pair batch (its
    comparisons; a scoring judge's from its scores)."""
    comparisons = judged.comparisons or judges.score_comparisons(judged.scores, k)
    columns = judges.agreement_columns(comparisons, verifier_R, k, len(verifier_R) // k)
    return {name: rollouts.column(values) for name, values in columns.items()}


def read_offline_pairs(path: str, tokenizer: Any, *, seq_len: int, need_scores: bool
                       ) -> list[dict[str, np.ndarray]]:
    """Every line of a pairs JSONL as a one-pair row (weight 1). Refused by line: a pair
    longer than a row (never cut), missing scores for 'odpo', a chosen scored below its
    rejected."""
    from cascade_jax import data, prompts
    from cascade_jax.tasks import jsonl

    records = list(jsonl.read_records(path, required=("prompt", "chosen", "rejected"),
                                      hint="a preference pair"))
    if not records:
        raise ValueError(f"{path} holds no pairs; give one JSON object per line")
    eos = data.eos_id(tokenizer)
    prompt_ids = prompts.encode_prompts(tokenizer, [r["prompt"] for _, r in records])
    halves = {name: [np.append(ids, np.int32(eos)) for ids in prompts.encode_completions(
        tokenizer, [r[name] for _, r in records])] for name in ("chosen", "rejected")}
    out = []
    for i, (line, record) in enumerate(records):
        where = f"{path}:{line}"
        scores = [record.get("score_chosen"), record.get("score_rejected")]
        for name, score in zip(("score_chosen", "score_rejected"), scores, strict=True):
            if score is not None:
                validate.number(f"{where} {name}", score)
        given = [isinstance(s, int | float) and not isinstance(s, bool) for s in scores]
        if need_scores and not all(given):
            raise ValueError(f"{where} has no numeric score_chosen and score_rejected; "
                             "loss='odpo' needs both on every line (or use loss='dpo')")
        score_c, score_r = (float(s) for s in scores) if all(given) else (0.0, 0.0)
        if all(given) and score_c < score_r:
            raise ValueError(f"{where}: score_chosen={score_c} < score_rejected={score_r}; "
                             "swap chosen and rejected on this line")
        sides = {}
        for name in ("chosen", "rejected"):
            n = prompt_ids[i].size + halves[name][i].size
            if n > seq_len:
                raise ValueError(f"{where}: prompt + {name} is {n} tokens, longer than "
                                 f"seq_len={seq_len}; raise config.data.seq_len or drop the "
                                 "line (a pair is never cut)")
            sides[name] = prompts.completion_rows([prompt_ids[i]], halves[name][i][None],
                                                  np.asarray([halves[name][i].size]),
                                                  seq_len=seq_len)
        row = pair_batch(sides["chosen"], sides["rejected"], np.asarray([score_c]),
                         np.asarray([score_r]), np.ones(1, np.float32))
        out.append({k: v[0] for k, v in row.items()})
    return out


def offline_batches(pairs: list[dict[str, np.ndarray]], *, batch_size: int, seed: int
                    ) -> Any:
    """Endless shuffled batches of `batch_size` pairs per host (hosts read disjoint pairs),
    as a checkpointable grain iterator."""
    import grain

    shard, count = jax.process_index(), jax.process_count()
    examples = grain.MapDataset.source(pairs)[shard::count]
    if len(examples) < 1:
        raise ValueError(f"no pairs for host {shard} of {count}: {len(pairs)} pairs in all")
    return iter(examples.shuffle(seed).repeat(None)
                .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
                .batch(batch_size, drop_remainder=True))


# ----------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class Preference:
    name: str = "preference"
    loss_label: str = "DPO loss"
    uses_teacher: bool = True  # only judge='model' uses it: the judge
    needs_task: bool = False  # offline pairs need none; online sampling checks at build

    def teacher_used(self, settings: Settings) -> bool:
        return settings.judge == "model"

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        return parse(block, key)

    def check_files(self, settings: Settings, tokenizer: Any, *, seq_len: int,
                    vocab_size: int) -> None:
        """`source`'s pairs, read and checked line by line, before any work (their ids come
        from `tokenizer`, whose vocabulary the run checks against the models')."""
        del vocab_size
        if settings.source:
            read_offline_pairs(settings.source, tokenizer, seq_len=seq_len,
                               need_scores=settings.loss == "odpo")

    def build(self, ctx: StageContext) -> Built:
        from cascade_jax import data, prompts

        settings: Settings = ctx.settings
        where = f"stage {ctx.stage_name!r}"
        if ctx.data is None or ctx.tokenizer is None:
            raise ValueError(f"{where}: objective 'preference' needs the run's data config "
                             "and tokenizer")
        n_pairs = settings.pairs_per_step or ctx.data.batch_size
        scfg = StepConfig(ctx.student, settings.loss, settings.beta, settings.alpha,
                          settings.min_score_gap, settings.chunk_size, ctx.grad_accum)
        reference = rollouts.frozen_start(ctx)
        shardings = steps.model_state_shardings(ctx.student, ctx.optimizer, ctx.mesh)
        step_fn = rollouts.WithFrozen(jit_train_step(scfg, ctx.optimizer, ctx.mesh), reference)
        lineage = {k: getattr(settings, k) for k in OWN_FIELDS}
        lineage.update(pairs_per_step=n_pairs, rewards=dataclasses.asdict(settings.rewards))
        prepare_batch = None
        if settings.source:
            pairs = read_offline_pairs(settings.source, ctx.tokenizer,
                                       seq_len=ctx.data.seq_len,
                                       need_scores=settings.loss == "odpo")
            batches = offline_batches(pairs, batch_size=data._host_batch_size(n_pairs),
                                      seed=ctx.seed)
            lineage.update(source=os.path.abspath(settings.source), pairs=len(pairs))
        else:
            if ctx.task is None:
                raise ValueError(f"{where}: online 'preference' samples a task's prompts; give "
                                 "the run a config.task block, or preference.source=<pairs."
                                 "jsonl> for offline DPO")
            source = rollouts.prompt_source(ctx, settings.prompts, n_pairs)
            batches = source.batches
            sampling = rollouts.sampling_params(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.sample_temperature, top_p=settings.top_p,
                n=settings.samples_per_prompt, seq_len=ctx.data.seq_len,
                max_seq_len=ctx.student.max_seq_len, longest_prompt=source.longest,
                eos=data.eos_id(ctx.tokenizer), key=f"{where}.preference")
            settings.rewards.check_budget(sampling.max_new_tokens, f"{where}.preference")
            judge = JUDGES[settings.judge](ctx, settings, judges.RolloutShape(
                sampling.max_new_tokens, source.longest))
            lineage.update(max_new_tokens=sampling.max_new_tokens)
            if settings.judge == "model":
                lineage.update(judge_model=ctx.teacher.name, judge_slots=judge.slots)

            def prepare_batch(state: steps.TrainState, batch: HostBatch) -> HostBatch:
                step = int(jax.device_get(state.step))
                everything = rollouts.global_rows(batch)
                roll = rollouts.sample_rollouts(
                    ctx.student, state.params, prompts.row_prompts(everything), sampling,
                    seq_len=ctx.data.seq_len, rng=jax.random.fold_in(ctx.rng, step),
                    mesh=ctx.mesh, tokenizer=ctx.tokenizer)
                texts = [source.text(ctx.tokenizer, p) for p in roll.prompts]
                judged = judge(texts, roll.texts, roll.lengths, k=settings.samples_per_prompt,
                               step=step)
                if not isinstance(judged, judges.Judgement):
                    judged = judges.Judgement(np.asarray(judged, np.float32))
                pairs = online_pairs(roll.rows, judged.scores, settings.samples_per_prompt)
                if settings.judge != "verifier" and callable(getattr(ctx.task, "score", None)):
                    pairs.update(agreement(judged, verifier_rewards(
                        ctx, settings, sampling.max_new_tokens, texts, roll.texts, roll.lengths),
                        settings.samples_per_prompt))
                return rollouts.local_rows(pairs, len(pairs["tokens"]))

        def make_state() -> steps.TrainState:
            if ctx.child_params is None:
                return steps.create_state(ctx.student, ctx.optimizer, ctx.rng, ctx.mesh)
            return steps.place_state(ctx.optimizer, ctx.child_params, shardings)

        return Built(step_fn=step_fn,
                     abstract_state=steps.abstract_state(ctx.optimizer,
                                                         model.param_shapes(ctx.student),
                                                         shardings),
                     make_state=make_state, batches=batches, prepare_batch=prepare_batch,
                     lineage={"preference": lineage})

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Settings,
                  *, optimizer: Any, batch_size: int, seq_len: int, grad_accum: int
                  ) -> aot.StepSpec:
        """A train step on both halves of the pairs (2 × pairs rows); the reference's
        forward adds one frozen forward of the same rows."""
        rows = 2 * (settings.pairs_per_step or batch_size)
        return aot.StepSpec("train", student, rows, seq_len, optimizer, micro_batches=grad_accum)
