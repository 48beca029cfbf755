"""`grpo`: group-relative policy optimisation on the task's verifier, or on a teacher's log-probs.

Per loop step (Shao et al. 2024, GRPO, arXiv 2402.03300): `prepare_batch` samples G
completions of each of the step's prompts from the current policy (the state's params, key
fold_in(rng, step), so a resumed run samples the same), the verifier scores them host-side and
the batch holds one sequence per row, `loss_mask` on the completion, the rewards as [R, 1]
features. The jitted step then makes μ optimizer updates on those rollouts (one `lax.scan`):

- old log-probs: the trainer's own forward at the first update, whose ratio is then exactly 1
  by construction; the sampler's log-probs (kept in the batch) enter only the
  `sampler_mismatch` metric, never the ratio;
- reference log-probs from the stage's frozen starting params, only when `kl_beta > 0` (a
  frozen argument of the step, as `kd`'s teacher: no gradient, no optimizer state);
- advantages by `posttrain.group_advantages`, the loss by `posttrain.policy_loss`, with any
  `GRPOSpec`: a preset (GRPO, Dr. GRPO arXiv 2503.20783, DAPO arXiv 2503.14476, Magistral
  arXiv 2506.10910) and field overrides.

`reward='teacher_logprob'` is on-policy distillation as a reward (Thinking Machines 2025,
"On-Policy Distillation"; GKD, arXiv 2306.13649): each sampled token's advantage is
−(log π_old(x_t) − log π_teacher(x_t)), the per-token reverse-KL estimate, so only the
teacher's log-prob of each sampled token is needed; no group centring (G may be 1), no
equal-group skipping. The verifier still scores every rollout, for the metrics.

DAPO's dynamic sampling (`dynamic_sampling=True`): groups whose rewards are all equal carry no
signal, so more prompts are drawn from the same iterator (up to `sampling_rounds` rounds in
all) until the step holds `prompts_per_step` informative groups; any shortfall is filled with
equal groups (advantage 0, left out when `skip_equal_groups`).

With μ > 1 the stage's learning-rate schedule (`optax.scale_by_schedule` states) advances once
per loop step, not once per update, and `state.step` counts loop steps (what the loop resumes
by and the sampler is keyed on).

    stages.child_rl.grpo = dict(preset='magistral', group_size=8, prompts_per_step=16,
                                max_new_tokens=48, mu=2)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cascade_jax import aot, lm, model, posttrain, sharding, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.objectives import rollouts
from cascade_jax.objectives.base import Built, HostBatch, StageContext
from cascade_jax.posttrain import GRPOSpec

PRESETS: dict[str, GRPOSpec] = {"grpo": posttrain.GRPO, "dr_grpo": posttrain.DR_GRPO,
                                "dapo": posttrain.DAPO, "magistral": posttrain.MAGISTRAL}
REWARDS = ("verifier", "teacher_logprob")
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOSpec))
ROW_FEATURES = ("reward", "correct", "well_formed", "sampling_rounds")  # [R, 1] each


@dataclasses.dataclass(frozen=True)
class Settings:
    """spec: the GRPO loss (`preset` then `GRPOSpec` fields, flat in the block). rewards: the
    verifier's reward (`RewardSpec` fields, flat). group_size: G samples per prompt.
    prompts_per_step: prompts per loop step (None: config.data.batch_size // G, so a step
    has the run's batch of rows). sample_temperature / top_p / max_new_tokens: the sampler
    (None tokens: what the row leaves after the longest prompt). prompts: training problems
    drawn from. reward: 'verifier' | 'teacher_logprob'. teacher_reward_scale: the weight of
    the per-token reverse-KL reward. dynamic_sampling / sampling_rounds: DAPO's resampling.
    chunk_size: positions per chunk of the log-prob head (no [B, L, V] float32 live)."""

    spec: GRPOSpec = dataclasses.field(default_factory=GRPOSpec)
    rewards: rollouts.RewardSpec = dataclasses.field(default_factory=rollouts.RewardSpec)
    preset: str | None = None
    group_size: int = 8
    prompts_per_step: int | None = None
    sample_temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int | None = None
    prompts: int | None = 20_000
    reward: str = "verifier"
    teacher_reward_scale: float = 1.0
    dynamic_sampling: bool = False
    sampling_rounds: int = 4
    chunk_size: int | None = 512

    def __post_init__(self) -> None:
        from cascade_jax import generate

        validate.positive_int("group_size", self.group_size, "samples per prompt, e.g. 8")
        validate.optional_positive_int("prompts_per_step", self.prompts_per_step,
                                       "or None: config.data.batch_size // group_size")
        validate.optional_positive_int("max_new_tokens", self.max_new_tokens,
                                       "or None: what the row leaves after the prompt")
        validate.optional_positive_int("prompts", self.prompts, "or None: the whole split")
        validate.one_of("reward", self.reward, REWARDS,
                        "'teacher_logprob' is on-policy distillation as a reward")
        validate.positive_number("teacher_reward_scale", self.teacher_reward_scale)
        validate.boolean("dynamic_sampling", self.dynamic_sampling)
        validate.positive_int("sampling_rounds", self.sampling_rounds,
                              "rounds of sampling per step with dynamic_sampling, first included")
        validate.optional_positive_int("chunk_size", self.chunk_size,
                                       "or None: whole-sequence logits")
        validate.temperature("sample_temperature", self.sample_temperature)
        generate.SamplingParams(1, temperature=self.sample_temperature, top_p=self.top_p)
        if self.reward == "verifier" and self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} with reward='verifier': a group of "
                             "one always has advantage 0; use group_size >= 2 (DeepSeekMath "
                             "used 64, DAPO 16)")
        if self.reward == "teacher_logprob" and self.dynamic_sampling:
            raise ValueError("dynamic_sampling=True with reward='teacher_logprob': per-token "
                             "distillation rewards are never equal within a group; set "
                             "dynamic_sampling=False")
        if self.spec.aggregation == "group_token" and self.group_size < 2:
            raise ValueError(f"aggregation='group_token' with group_size={self.group_size}: "
                             "use group_size >= 2, or aggregation='token'")

    @property
    def uses_reference(self) -> bool:
        return self.spec.kl_beta > 0


OWN_FIELDS = tuple(f.name for f in dataclasses.fields(Settings)
                   if f.name not in ("spec", "rewards"))


def parse(block: Mapping[str, Any], key: str) -> Settings:
    """Settings from a flat block: `preset` (then its GRPOSpec fields overridden by any given),
    the reward fields, the rest."""
    validate.known_keys(key, block, (*OWN_FIELDS, *SPEC_FIELDS, *rollouts.REWARD_FIELDS))
    preset = block.get("preset")
    if preset is not None:
        validate.one_of(f"{key}.preset", preset, PRESETS,
                        "or None for GRPOSpec's defaults; fields given beside it override it")
    base = dataclasses.asdict(PRESETS[preset]) if preset is not None else {}
    spec = validate.construct(GRPOSpec, {**base, **{k: v for k, v in block.items()
                                                    if k in SPEC_FIELDS}}, key)
    rewards = validate.construct(rollouts.RewardSpec, {k: v for k, v in block.items()
                                                       if k in rollouts.REWARD_FIELDS}, key)
    own = {k: v for k, v in block.items() if k in OWN_FIELDS}
    return validate.construct(Settings, {**own, "spec": spec, "rewards": rewards}, key)


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the GRPO step (hashable)."""

    student: ModelConfig
    spec: GRPOSpec
    group_size: int
    teacher: ModelConfig | None = None  # set: reward='teacher_logprob'
    teacher_reward_scale: float = 1.0
    chunk_size: int | None = 512
    grad_accum: int = 1  # micro-batches of rows per update (one's activations live at a time)


def _is_schedule(x: Any) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def _hold_schedule(opt_state: Any, before: Any) -> Any:
    """`opt_state` with every `scale_by_schedule` counter as in `before`: the μ updates of
    one loop step share one learning rate and the schedule moves once per loop step."""
    return jax.tree.map(lambda new, old: old if _is_schedule(new) else new, opt_state, before,
                        is_leaf=_is_schedule)


def _advance_schedule(opt_state: Any) -> Any:
    """Every `scale_by_schedule` counter one step on (the loop step's single advance)."""
    return jax.tree.map(lambda s: optax.ScaleByScheduleState(count=s.count + 1)
                        if _is_schedule(s) else s, opt_state, is_leaf=_is_schedule)


def frozen_logprobs(scfg: StepConfig, frozen: Mapping[str, Any], batch: steps.Batch
                    ) -> tuple[jax.Array | None, jax.Array | None]:
    """(reference [B, L] or None, teacher [B, L] or None): target-aligned log-probs of the
    frozen models, under stop_gradient, `grad_accum` micro-batches at a time."""
    frozen = jax.lax.stop_gradient(frozen)
    models = {"reference": scfg.student, "teacher": scfg.teacher}

    def forward(micro: steps.Batch) -> dict[str, jax.Array]:
        return {name: posttrain.target_logprobs(models[name], params, micro,
                                                chunk_size=scfg.chunk_size)[0]
                for name, params in frozen.items()}

    out = (steps.scan_micro_batches(lambda micro: ((), forward(micro)), scfg.grad_accum,
                                    batch)[1] if frozen else {})
    return out.get("reference"), out.get("teacher")


def batch_terms(scfg: StepConfig, batch: steps.Batch) -> dict[str, jax.Array]:
    """What the loss needs from the whole batch before it is split: the per-row advantages
    ([B], group-normalised over whole groups; zeros when the teacher's log-probs are the
    reward), the counted-token weights (equal groups left out when skipped) and their
    aggregation coefficients, so any micro-batch's loss is its exact share of the batch's."""
    weights_BL = lm.next_token_targets(batch)[1].astype(jnp.float32)
    if scfg.teacher is None:
        adv = posttrain.group_advantages(batch["reward"][:, 0], scfg.group_size,
                                         scfg.spec.scale_by_std,
                                         skip_equal_groups=scfg.spec.skip_equal_groups)
        advantages_B, weights_BL = adv.advantages, weights_BL * adv.keep[:, None]
    else:
        advantages_B = jnp.zeros(weights_BL.shape[:1], jnp.float32)
    coef_BL = posttrain.aggregation_weights(weights_BL, scfg.spec.aggregation,
                                            max_len=scfg.spec.max_len,
                                            group_size=scfg.group_size)
    return {"advantages": advantages_B, "weights": weights_BL, "coefficients": coef_BL}


def loss_and_metrics(scfg: StepConfig, params: Any, batch: steps.Batch,
                     old_BL: jax.Array | None, ref_BL: jax.Array | None,
                     teacher_BL: jax.Array | None, *, first: jax.Array | bool = False,
                     terms: Mapping[str, jax.Array] | None = None
                     ) -> tuple[jax.Array, Any]:
    """(loss, (policy_loss metrics, old log-probs used)) of one update on `batch`: the whole
    batch's loss, or with `terms` (`batch_terms` of the whole batch, these rows' part) these
    rows' share of it.

    The first update (`old_BL` None, or `first` true) takes its own forward's log-probs as
    the old ones: the trainer's numbers, never the sampler's, and a ratio of exactly 1.
    """
    terms = batch_terms(scfg, batch) if terms is None else terms
    logp_BL, _ = posttrain.target_logprobs(scfg.student, params, batch,
                                           chunk_size=scfg.chunk_size)
    old_BL = logp_BL if old_BL is None else jnp.where(first, logp_BL, old_BL)
    old_BL = jax.lax.stop_gradient(old_BL)
    weights_BL = terms["weights"]
    if teacher_BL is None:
        advantages = terms["advantages"]
    else:
        advantages = scfg.teacher_reward_scale * jnp.where(weights_BL > 0,
                                                           teacher_BL - old_BL, 0.0)
    loss, metrics = posttrain.policy_loss(logp_BL, old_BL, ref_BL, advantages, weights_BL,
                                          scfg.spec, group_size=scfg.group_size,
                                          coefficients_BL=terms["coefficients"])
    return loss, (metrics, old_BL)


# policy_loss metrics that are means over counted tokens: summed over micro-batches as
# mean × count, then divided by the whole count; `loss` and `pg_loss` are already shares
TOKEN_MEANS = ("kl", "ratio_mean", "clip_fraction_low", "clip_fraction_high", "policy_drift")


def _micro_update(scfg: StepConfig, params: Any, micro: steps.Batch, first: jax.Array
                  ) -> tuple[tuple[Any, steps.Metrics], jax.Array]:
    """((gradient, metric sums), old log-probs used) of one micro-batch's share."""
    def loss_fn(p: Any) -> tuple[jax.Array, Any]:
        return loss_and_metrics(scfg, p, micro, micro["old_logprobs"],
                                micro.get("ref_logprobs"), micro.get("teacher_logprobs"),
                                first=first, terms=micro["terms"])

    (loss, (metrics, used_BL)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    sums = {"loss": loss, "pg_loss": metrics["pg_loss"], "count": metrics["count"],
            **{name: metrics[name] * metrics["count"] for name in TOKEN_MEANS}}
    return (grads, sums), used_BL


def train_step(scfg: StepConfig, optimizer: optax.GradientTransformation,
               state: steps.TrainState, frozen: Mapping[str, Any], batch: steps.Batch
               ) -> tuple[steps.TrainState, steps.Metrics]:
    """μ = `spec.mu` optimizer updates on one batch of rollouts, each the gradient of the
    whole batch's loss summed over `grad_accum` micro-batches; `state.step` + 1."""
    ref_BL, teacher_BL = frozen_logprobs(scfg, frozen, batch)
    full = dict(batch, terms=batch_terms(scfg, batch))
    if ref_BL is not None:
        full["ref_logprobs"] = ref_BL
    if teacher_BL is not None:
        full["teacher_logprobs"] = teacher_BL

    def update(carry: Any, u: jax.Array) -> tuple[Any, steps.Metrics]:
        state, old_BL = carry
        (grads, sums), used_BL = steps.scan_micro_batches(
            lambda micro: _micro_update(scfg, state.params, micro, u == 0), scfg.grad_accum,
            dict(full, old_logprobs=old_BL))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        metrics = {name: sums[name] / jnp.maximum(sums["count"], 1.0) for name in TOKEN_MEANS}
        metrics.update(loss=sums["loss"], pg_loss=sums["pg_loss"], count=sums["count"])
        new_state, metrics = steps.apply_grads(optimizer, state, grads, metrics)
        new_state = new_state.replace(opt_state=_hold_schedule(new_state.opt_state,
                                                               state.opt_state))
        return (new_state, used_BL), metrics

    zeros_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
    (new_state, old_BL), metrics_U = jax.lax.scan(update, (state, zeros_BL),
                                                  jnp.arange(scfg.spec.mu, dtype=jnp.int32))
    new_state = new_state.replace(step=state.step + 1,
                                  opt_state=_advance_schedule(new_state.opt_state))
    return new_state, step_metrics(metrics_U, batch, old_BL, teacher_BL, scfg.group_size)


def step_metrics(metrics_U: steps.Metrics, batch: steps.Batch, old_BL: jax.Array,
                 teacher_BL: jax.Array | None, group_size: int) -> steps.Metrics:
    """Per-update metrics [μ] -> the loop's `<name>_sum` + `count` (count = completion
    tokens). `loss`, `pg_loss`, `kl`: the first update's (the loss before this step moved the
    policy); ratio and clip statistics: the mean over the μ updates, over the tokens that
    entered the loss (`<name>_count`, which `loop.summarize` divides by); `final_loss`: the last
    update's; row means (reward, correct, well_formed, length, equal_groups) times count."""
    weights_BL = lm.next_token_targets(batch)[1]
    count = jnp.sum(weights_BL)
    rows = batch["tokens"].shape[0]

    def token_sum(x_BL: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(weights_BL > 0, x_BL * weights_BL, 0.0))

    rewards_R = batch["reward"][:, 0]
    equal_N = jnp.max(rewards_R.reshape(-1, group_size), axis=1) == jnp.min(
        rewards_R.reshape(-1, group_size), axis=1)
    out = {"loss_sum": metrics_U["loss"][0] * count,
           "final_loss_sum": metrics_U["loss"][-1] * count,
           "pg_loss_sum": metrics_U["pg_loss"][0] * count,
           "kl_sum": metrics_U["kl"][0] * count,
           "length_sum": count / rows * count,
           "equal_groups_sum": jnp.mean(equal_N.astype(jnp.float32)) * count,
           "sampler_mismatch_sum": token_sum(jnp.abs(old_BL - batch["sampler_logprobs"])),
           "grad_norm": jnp.max(metrics_U["grad_norm"]),
           "count": count}
    # token means over the tokens that entered the loss (groups skipped for equal rewards
    # have none), each with that count as its own denominator (`loop.summarize`)
    kept_U = metrics_U["count"]
    for name in ("ratio_mean", "clip_fraction_low", "clip_fraction_high", "policy_drift"):
        out[f"{name}_sum"] = jnp.mean(metrics_U[name] * kept_U)
        out[f"{name}_count"] = jnp.mean(kept_U)
    for name in ROW_FEATURES:
        out[f"{name}_sum"] = jnp.mean(batch[name][:, 0]) * count
    if teacher_BL is not None:
        out["reverse_kl_sum"] = token_sum(old_BL - teacher_BL)
    return out


@functools.lru_cache(maxsize=8)
def jit_train_step(scfg: StepConfig, optimizer: optax.GradientTransformation, mesh: Any,
                   frozen: tuple[str, ...]) -> Any:
    """`train_step` compiled for `mesh`: `(state, frozen, batch) -> (state, metrics)`, the
    state donated, the frozen params (`frozen` names: 'reference', 'teacher') not; built
    once per (step config, optimizer, mesh), as `generate` keeps its samplers."""
    shardings = {"reference": lambda: sharding.param_shardings(scfg.student, mesh),
                 "teacher": lambda: sharding.param_shardings(scfg.teacher, mesh)}
    return steps.jit_step(functools.partial(train_step, scfg, optimizer),
                          steps.model_state_shardings(scfg.student, optimizer, mesh), mesh,
                          frozen_shardings=({name: shardings[name]() for name in frozen},))


# ----------------------------------------------------------------------------- rollouts


def judged_rows(ctx: StageContext, source: rollouts.PromptSource, sampling: Any,
                roll: rollouts.Rollouts) -> dict[str, np.ndarray]:
    """The rollouts' rows with the verifier's rewards as [R, 1] features."""
    texts_R = [source.text(ctx.tokenizer, p) for p in roll.prompts]
    judged = rollouts.judge_with_verifier(ctx.task, texts_R, roll.texts, roll.lengths,
                                          sampling.max_new_tokens, ctx.settings.rewards)
    return {**roll.rows, "sampler_logprobs": roll.sampler_logprobs,
            "reward": rollouts.column(judged.reward),
            "correct": rollouts.column(judged.correct),
            "well_formed": rollouts.column(judged.well_formed)}


def informative_groups(reward_R: np.ndarray, group_size: int) -> np.ndarray:
    """[N] bool: groups whose rewards are not all equal (the ones with a learning signal)."""
    reward_NG = np.asarray(reward_R).reshape(-1, group_size)
    return reward_NG.max(axis=1) != reward_NG.min(axis=1)


def select_groups(rounds: list[dict[str, np.ndarray]], n_groups: int, group_size: int
                  ) -> dict[str, np.ndarray]:
    """DAPO's dynamic sampling: the first `n_groups` informative groups over the rounds in
    order, topped up with the first round's equal groups when there are too few."""
    chosen: list[tuple[int, int]] = []
    for r, rows in enumerate(rounds):
        useful = np.flatnonzero(informative_groups(rows["reward"][:, 0], group_size))
        chosen += [(r, int(g)) for g in useful]
    chosen = chosen[:n_groups]
    if len(chosen) < n_groups:
        equal = np.flatnonzero(~informative_groups(rounds[0]["reward"][:, 0], group_size))
        chosen += [(0, int(g)) for g in equal[:n_groups - len(chosen)]]
    return {k: np.concatenate([rounds[r][k][g * group_size:(g + 1) * group_size]
                               for r, g in chosen]) for k in rounds[0]}


# ----------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class GRPO:
    name: str = "grpo"
    loss_label: str = "GRPO policy loss"
    uses_teacher: bool = True  # only reward='teacher_logprob' trains on it
    needs_task: bool = True

    def teacher_used(self, settings: Settings) -> bool:
        return settings.reward == "teacher_logprob"

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        return parse(block, key)

    def build(self, ctx: StageContext) -> Built:
        from cascade_jax import data, prompts

        settings: Settings = ctx.settings
        where = f"stage {ctx.stage_name!r}"
        ctx.require_task('grpo')
        n_prompts = prompts_per_step(settings, ctx.data.batch_size, where)
        check_micro_batches(n_prompts * settings.group_size, ctx.grad_accum, where)
        teacher = None
        if settings.reward == "teacher_logprob":
            if ctx.teacher is None:
                raise ValueError(f"{where}: reward='teacher_logprob' needs the stage's teacher")
            teacher = ctx.teacher
            if teacher.cfg.vocab_size != ctx.student.vocab_size:
                raise ValueError(f"{where}: teacher vocab_size={teacher.cfg.vocab_size} differs "
                                 f"from the student's {ctx.student.vocab_size}; the per-token "
                                 "reward compares log-probs of the same token ids: use a "
                                 "teacher with the student's tokenizer")
        source = rollouts.prompt_source(ctx, settings.prompts, n_prompts)
        max_seq_len = min(ctx.student.max_seq_len,
                          teacher.cfg.max_seq_len if teacher else ctx.student.max_seq_len)
        sampling = rollouts.sampling_params(
            max_new_tokens=settings.max_new_tokens, temperature=settings.sample_temperature,
            top_p=settings.top_p, n=settings.group_size, seq_len=ctx.data.seq_len,
            max_seq_len=max_seq_len, longest_prompt=source.longest,
            eos=data.eos_id(ctx.tokenizer), key=f"{where}.grpo")
        settings.rewards.check_budget(sampling.max_new_tokens, f"{where}.grpo")
        spec = settings.spec
        if spec.aggregation == "constant" and spec.max_len is None:
            spec = dataclasses.replace(spec, max_len=sampling.max_new_tokens)  # Dr. GRPO's
        scfg = StepConfig(ctx.student, spec, settings.group_size,
                          teacher.cfg if teacher else None, settings.teacher_reward_scale,
                          settings.chunk_size, ctx.grad_accum)
        frozen = {}
        if settings.uses_reference:
            frozen["reference"] = rollouts.frozen_start(ctx)
        if teacher is not None:
            frozen["teacher"] = sharding.shard_like(
                teacher.params, sharding.param_shardings(teacher.cfg, ctx.mesh))
        shardings = steps.model_state_shardings(ctx.student, ctx.optimizer, ctx.mesh)
        step_fn = rollouts.WithFrozen(jit_train_step(scfg, ctx.optimizer, ctx.mesh,
                                                     tuple(sorted(frozen))), frozen)

        def make_state() -> steps.TrainState:
            if ctx.child_params is None:
                return steps.create_state(ctx.student, ctx.optimizer, ctx.rng, ctx.mesh)
            return steps.place_state(ctx.optimizer, ctx.child_params, shardings)

        def rollout_round(params: Any, batch: HostBatch, rng: jax.Array) -> HostBatch:
            everything = rollouts.global_rows(batch)
            roll = rollouts.sample_rollouts(ctx.student, params,
                                            prompts.row_prompts(everything), sampling,
                                            seq_len=ctx.data.seq_len, rng=rng, mesh=ctx.mesh,
                                            tokenizer=ctx.tokenizer)
            return judged_rows(ctx, source, sampling, roll)

        def prepare_batch(state: steps.TrainState, batch: HostBatch) -> HostBatch:
            step = int(jax.device_get(state.step))
            rng = jax.random.fold_in(ctx.rng, step)
            rounds = [rollout_round(state.params, batch, rng)]
            if settings.dynamic_sampling:
                while (len(rounds) < settings.sampling_rounds and sum(
                        int(informative_groups(r["reward"][:, 0], settings.group_size).sum())
                        for r in rounds) < n_prompts):
                    rounds.append(rollout_round(state.params, next(source.batches),
                                                jax.random.fold_in(rng, len(rounds))))
            rows = select_groups(rounds, n_prompts, settings.group_size)
            rows["sampling_rounds"] = np.full((len(rows["tokens"]), 1), len(rounds),
                                              np.float32)
            return rollouts.local_rows(rows, len(rows["tokens"]))

        return Built(step_fn=step_fn,
                     abstract_state=steps.abstract_state(ctx.optimizer,
                                                         model.param_shapes(ctx.student),
                                                         shardings),
                     make_state=make_state, batches=source.batches, prepare_batch=prepare_batch,
                     lineage={"grpo": lineage(settings, spec, n_prompts, sampling)})

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Settings,
                  *, optimizer: Any, batch_size: int, seq_len: int, grad_accum: int
                  ) -> aot.StepSpec:
        """The memory of one update: a train step on the rollout rows (plus the teacher's
        forward, as a distill step, when the teacher's log-probs are the reward). The μ
        updates run one after another and the reference's forward is one more frozen
        forward, so this is a lower bound of the step's memory, not of its time."""
        from cascade_jax.distill import losses
        from cascade_jax.distill import step as distill_step

        rows = prompts_per_step(settings, batch_size, "grpo") * settings.group_size
        check_micro_batches(rows, grad_accum, "grpo")
        if settings.reward == "teacher_logprob" and teacher is not None:
            dcfg = distill_step.DistillConfig(student=student, teacher=teacher,
                                              loss=losses.LossSpec(kind="reverse_kl"),
                                              grad_accum=grad_accum)
            return aot.StepSpec("distill", student, rows, seq_len, optimizer, dcfg)
        return aot.StepSpec("train", student, rows, seq_len, optimizer,
                            micro_batches=grad_accum)


def check_micro_batches(rows: int, grad_accum: int, where: str) -> None:
    """The step's rollout rows split into `grad_accum` equal micro-batches, said at build."""
    if rows % grad_accum:
        raise ValueError(f"{where}: grad_accum={grad_accum} does not divide the step's "
                         f"{rows} rollout rows (prompts_per_step × group_size); choose a "
                         f"divisor of {rows}")


def prompts_per_step(settings: Settings, batch_size: int, where: str) -> int:
    """The step's prompts: as set, or the run's batch of rows split into groups of G."""
    if settings.prompts_per_step is not None:
        return settings.prompts_per_step
    if batch_size % settings.group_size:
        raise ValueError(f"{where}: config.data.batch_size={batch_size} is not a multiple of "
                         f"group_size={settings.group_size}; set grpo.prompts_per_step")
    return batch_size // settings.group_size


def lineage(settings: Settings, spec: GRPOSpec, n_prompts: int, sampling: Any
            ) -> dict[str, Any]:
    own = {k: getattr(settings, k) for k in OWN_FIELDS}
    return {**own, "prompts_per_step": n_prompts, "max_new_tokens": sampling.max_new_tokens,
            "spec": dataclasses.asdict(spec), "rewards": dataclasses.asdict(settings.rewards)}
