"""`grpo` and `preference`: each built step equals the `posttrain` math on the same rollouts,
old log-probs are the trainer's, the reference is frozen, and a few steps move a toy reward
and a preference margin the right way.

Cost: every sampler here has the same bucket (8 rows, 8 new tokens), so it compiles once; each
objective's step compiles once, in a module fixture that runs its steps and records them.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cascade_jax import (
    aot,
    data,
    model,
    objectives,
    posttrain,
    prompts,
    sharding,
    steps,
    tasks,
)
from cascade_jax.config import ModelConfig
from cascade_jax.objectives import StageContext, Trained, rollouts
from cascade_jax.objectives import grpo as grpo_objective
from cascade_jax.objectives import preference as preference_objective

TASK = tasks.ChainArithmetic(min_steps=1, max_steps=2)
TOKENIZER = tasks.char_tokenizer(TASK.alphabet)
EOS = data.eos_id(TOKENIZER)
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                  d_ff=64, max_seq_len=32, tie_embeddings=True)
SEQ_LEN, NEW = 32, 8
MESH = sharding.make_mesh(data=1, devices=jax.devices()[:1])
# 2 prompts × G = 4 (grpo) and 4 prompts × 2 (preference): one sampler bucket of 8 rows.
GRPO_BLOCK = dict(preset="grpo", group_size=4, prompts_per_step=2, max_new_tokens=NEW,
                  prompts=64, mu=2, kl_beta=0.1, aggregation="group_token",
                  overlong_buffer=NEW)  # reward: −length/NEW (+ well-formed, correct)
GRPO_STEPS = 10


@functools.cache
def _init(seed):
    """Model params by a jitted init (eager init costs seconds of small compiles)."""
    return _host(jax.jit(model.init, static_argnums=0)(CFG, jax.random.key(seed)))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@functools.cache
def _optimizer(lr):
    """One optimizer object per learning rate: builds with the same settings then share
    their compiled step (the step factories are cached by config, optimizer and mesh)."""
    return steps.make_optimizer(lr=lr, total_steps=100, warmup_steps=0)


def _context(name, block, *, teacher=None, lr=1e-2, seed=0, rng=5):
    objective = objectives.get(name)
    settings = objective.parse_settings(block, f"stages.t.{name}")
    return objective, StageContext(
        stage_name="t", student=CFG, child_params=_init(seed),
        teacher=teacher, settings=settings, mesh=MESH, optimizer=_optimizer(lr),
        rng=jax.random.key(rng), grad_accum=1, train_batches=lambda: iter(()), task=TASK,
        tokenizer=TOKENIZER, seed=0,
        data=data.DataConfig(source="task", tokenizer="chars", seq_len=SEQ_LEN, batch_size=8))


def _run(built, n_steps, *, corrupt_sampler_first=False):
    """Run `n_steps` loop steps; per step the params before it, its batch and metrics."""
    state = built.make_state()
    record = {"params": [], "prompts": [], "batches": [], "metrics": []}
    for step in range(n_steps):
        record["params"].append(_host(state.params))
        batch = next(built.batches)
        record["prompts"].append(batch)
        if built.prepare_batch is not None:
            batch = built.prepare_batch(state, batch)
        record["batches"].append(batch)
        fed = dict(batch)
        if corrupt_sampler_first and step == 0:  # if the step used these, the ratio would move
            fed["sampler_logprobs"] = batch["sampler_logprobs"] + 1.0
        state, metrics = built.step_fn(state, sharding.shard_batch(fed, MESH))
        record["metrics"].append({k: float(v) for k, v in jax.device_get(metrics).items()})
    record["state"] = state
    return record


@functools.cache
def _target_logprobs():
    return jax.jit(functools.partial(posttrain.target_logprobs, CFG))


def _logprobs(params, batch):
    rows = {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    return _target_logprobs()(params, rows)


def _completion_texts(batch):
    """What the verifier read: each row's completion tokens, cut before EOS."""
    mask = batch["loss_mask"] == 1
    tokens = np.zeros((len(mask), SEQ_LEN), np.int32)
    for r, (row, m) in enumerate(zip(batch["tokens"], mask, strict=True)):
        tokens[r, :m.sum()] = row[m]
    return prompts.decode_completions(TOKENIZER, tokens, mask.sum(axis=1))


def _mean(metrics, name):
    return metrics[f"{name}_sum"] / metrics["count"]


# ----------------------------------------------------------------------------- grpo


@pytest.fixture(scope="module")
def grpo_run():
    objective, ctx = _context("grpo", GRPO_BLOCK)
    built = objective.build(ctx)
    record = _run(built, GRPO_STEPS, corrupt_sampler_first=True)
    return objective, ctx, built, record


def test_grpo_settings_presets_overrides_and_errors():
    grpo = objectives.get("grpo")
    settings = grpo.parse_settings(dict(preset="magistral", mu=2, epsilon_high=0.26),
                                   "stages.r.grpo")
    assert settings.spec == posttrain.GRPOSpec(**{**vars(posttrain.MAGISTRAL), "mu": 2,
                                                  "epsilon_high": 0.26})
    for block, message in [
            (dict(preset="ppo"), r"stages\.r\.grpo\.preset='ppo' is not one of"),
            (dict(group_size=1), r"stages\.r\.grpo: group_size=1 with reward='verifier'"),
            (dict(mu=0), r"stages\.r\.grpo: mu=0 must be a positive integer"),
            (dict(kl_beta=-1.0), r"kl_beta=-1.0 must be a finite number >= 0"),
            (dict(reward="judge"), r"reward='judge' is not one of"),
            (dict(reward="teacher_logprob", dynamic_sampling=True), "dynamic_sampling=False"),
            (dict(overlong_buffer=0), r"overlong_buffer=0 must be a positive integer"),
            (dict(top_k=5), r"unknown config field\(s\) \['stages\.r\.grpo\.top_k'\]")]:
        with pytest.raises(ValueError, match=message):
            grpo.parse_settings(block, "stages.r.grpo")
    optimizer = steps.make_optimizer(lr=1e-3, total_steps=10)
    spec = grpo.step_spec(CFG, None, settings, optimizer=optimizer, batch_size=16, seq_len=32,
                          grad_accum=1)
    assert isinstance(spec, aot.StepSpec) and (spec.kind, spec.batch_size) == ("train", 16)
    teacher_settings = grpo.parse_settings(dict(reward="teacher_logprob", group_size=2,
                                                prompts_per_step=3), "stages.r.grpo")
    spec = grpo.step_spec(CFG, CFG, teacher_settings, optimizer=optimizer, batch_size=16,
                          seq_len=32, grad_accum=1)
    assert (spec.kind, spec.batch_size, spec.distill.teacher) == ("distill", 6, CFG)
    # the teacher is handed to the step (and planned, and context-checked) only when used
    assert not objectives.trains_on_teacher("grpo", settings)
    assert objectives.trains_on_teacher("grpo", teacher_settings)
    preference = objectives.get("preference")
    assert not objectives.trains_on_teacher("preference", preference.parse_settings({}, "p"))
    assert objectives.trains_on_teacher("preference", preference.parse_settings(
        dict(judge="model"), "p"))
    assert objectives.trains_on_teacher("kd", None)
    with pytest.raises(ValueError, match=r"batch_size=6 is not a multiple of group_size=4"):
        grpo.step_spec(CFG, None, grpo.parse_settings(dict(group_size=4), "g"),
                       optimizer=optimizer, batch_size=6, seq_len=32, grad_accum=1)


def test_rewards_groups_and_pairs_host_side():
    spec = rollouts.RewardSpec(correct_reward=1.0, well_formed_reward=0.1, overlong_buffer=4,
                               overlong_penalty=0.5)
    # DAPO's soft overlong punishment: free up to 8 - 4 tokens, then linear to -0.5 at 8.
    np.testing.assert_allclose(rollouts.overlong_penalty(np.array([1, 4, 6, 8]), 8, spec),
                               [0.0, 0.0, -0.25, -0.5])
    judged = rollouts.judge_with_verifier(TASK, ["1+2=", "1+2=", "4*2="],
                                          ["1+2=3;#3", "#4", "4*2=8"], np.array([8, 2, 5]), 8,
                                          spec)
    np.testing.assert_allclose(judged.reward, [1.1 - 0.5, 0.1, -0.125])
    np.testing.assert_array_equal(judged.correct, [1, 0, 0])
    # dynamic sampling: informative groups first (rounds in order), then round 0's equal ones
    rounds = [{"reward": np.array([[1], [1], [0], [1]], np.float32), "id": np.arange(4)[:, None]},
              {"reward": np.array([[0], [0], [1], [0]], np.float32),
               "id": 10 + np.arange(4)[:, None]}]
    picked = grpo_objective.select_groups(rounds, 2, 2)
    assert picked["id"][:, 0].tolist() == [2, 3, 12, 13]
    picked = grpo_objective.select_groups(rounds[:1], 2, 2)
    assert picked["id"][:, 0].tolist() == [2, 3, 0, 1]
    chosen, rejected, tied = preference_objective.best_and_worst(
        np.array([[0.1, 1.1], [0.5, 0.5], [2.0, -1.0]]))
    assert (chosen.tolist(), rejected.tolist(), tied.tolist()) == (
        [1, 0, 0], [0, 1, 1], [False, True, False])


def test_grpo_same_rng_same_rollouts_one_sequence_per_row(grpo_run):
    _, ctx, built, record = grpo_run
    batch = record["batches"][1]
    state = steps.TrainState(step=jnp.asarray(1), params=record["params"][1], opt_state=None)
    prompt_batch = record["prompts"][1]
    again = built.prepare_batch(state, prompt_batch)
    assert sorted(again) == sorted(batch)
    for name, value in batch.items():
        assert value.ndim == 2 and value.shape[0] == 8, name  # rank 2: P(batch, None) shards
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    later = built.prepare_batch(steps.TrainState(jnp.asarray(2), record["params"][1], None),
                                prompt_batch)
    assert not np.array_equal(later["tokens"], batch["tokens"])  # the key follows the step
    # groups of G = 4 share their prompt; the loss mask covers each sampled completion only
    prompts_R = prompts.row_prompts(batch)
    for r, prompt in enumerate(prompts_R):
        np.testing.assert_array_equal(prompt, prompts_R[r - r % 4])
    texts = _completion_texts(batch)
    judged = rollouts.judge_with_verifier(
        TASK, [TOKENIZER.decode(p.tolist()) for p in prompts_R], texts,
        batch["loss_mask"].sum(axis=1), NEW, ctx.settings.rewards)
    np.testing.assert_allclose(batch["reward"][:, 0], judged.reward)  # the verifier's reward
    # the sampler's log-probs sit target-aligned, where the trainer's forward puts its own
    logp, weights = _logprobs(record["params"][1], batch)
    np.testing.assert_allclose(np.where(weights > 0, batch["sampler_logprobs"], 0), logp,
                               atol=2e-5)
    assert np.all(batch["sampler_logprobs"][weights == 0] == 0)


def _expected_grpo_loss(spec, params, reference, batch):
    logp, weights = _logprobs(params, batch)
    ref, _ = _logprobs(reference, batch)
    adv = posttrain.group_advantages(jnp.asarray(batch["reward"][:, 0]), 4, spec.scale_by_std,
                                     skip_equal_groups=spec.skip_equal_groups)
    loss, metrics = posttrain.policy_loss(logp, None, ref, adv.advantages,
                                          weights * adv.keep[:, None], spec, group_size=4)
    return float(loss), float(metrics["kl"]), float(jnp.sum(weights))


def test_grpo_step_is_policy_loss_with_the_trainers_old_logprobs_and_a_frozen_reference(
        grpo_run):
    _, ctx, built, record = grpo_run
    spec = ctx.settings.spec
    start = record["params"][0]
    for step in (0, 1):  # step 0: policy = reference (KL 0); step 1: the policy has moved
        metrics = record["metrics"][step]
        loss, kl, count = _expected_grpo_loss(spec, record["params"][step], start,
                                              record["batches"][step])
        assert metrics["count"] == count
        np.testing.assert_allclose(_mean(metrics, "loss"), loss, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(_mean(metrics, "kl"), kl, rtol=1e-4, atol=1e-7)
        # μ = 2: the second update sees a moved policy against the same old log-probs
        assert _mean(metrics, "policy_drift") != 0 and metrics["final_loss_sum"] != metrics[
            "loss_sum"]
    assert abs(_mean(record["metrics"][0], "kl")) < 1e-7 < _mean(record["metrics"][1], "kl")
    # step 0 was fed sampler log-probs off by +1: measured (mismatch 1), never in the ratio
    np.testing.assert_allclose(_mean(record["metrics"][0], "sampler_mismatch"), 1.0, rtol=1e-4)
    assert _mean(record["metrics"][1], "sampler_mismatch") < 1e-4
    # the frozen reference is the starting params, bit for bit, after every update
    reference = _host(built.step_fn.frozen["reference"])
    jax.tree.map(np.testing.assert_array_equal, reference, start)
    # one loop step = one state step and one schedule step, whatever μ (Adam counted μ)
    state = record["state"]
    counts = {type(s).__name__: int(s.count) for s in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState |
                                                       optax.ScaleByAdamState))
        if hasattr(s, "count")}
    assert int(state.step) == GRPO_STEPS
    assert counts == {"ScaleByScheduleState": GRPO_STEPS, "ScaleByAdamState": 2 * GRPO_STEPS}


def test_grpo_first_update_ratio_is_exactly_one_and_the_reference_gets_no_gradient(grpo_run):
    _, ctx, _, record = grpo_run
    scfg = grpo_objective.StepConfig(CFG, ctx.settings.spec, 4, chunk_size=16)
    batch = {k: jnp.asarray(v) for k, v in record["batches"][1].items()}
    params, reference = record["params"][1], record["params"][0]

    def loss(params, reference, old_BL):
        ref_BL, _ = grpo_objective.frozen_logprobs(scfg, {"reference": reference}, batch)
        value, (metrics, _) = grpo_objective.loss_and_metrics(scfg, params, batch, old_BL,
                                                              ref_BL, None, first=True)
        return value, metrics

    garbage = jnp.full(batch["tokens"].shape, -3.0)  # ignored at the first update
    (value, metrics), ref_grads = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))(
        params, reference, garbage)
    assert float(metrics["ratio_min"]) == 1.0 == float(metrics["ratio_max"])
    assert float(metrics["clip_fraction_low"]) == 0 == float(metrics["clip_fraction_high"])
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(ref_grads))
    np.testing.assert_allclose(float(value), _mean(record["metrics"][1], "loss"), rtol=2e-5)


def test_grpo_steps_raise_the_mean_reward(grpo_run):
    """Toy reward: −length/8 (DAPO's length shaping with the whole budget as buffer) plus
    well-formed and correct bonuses; the untrained policy rambles, GRPO learns to stop."""
    record = grpo_run[3]
    rewards = [_mean(m, "reward") for m in record["metrics"]]
    lengths = [_mean(m, "length") for m in record["metrics"]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert np.mean(lengths[-3:]) < np.mean(lengths[:3]) - 1.5, lengths
    assert all(_mean(m, "equal_groups") <= 1 for m in record["metrics"])


def test_grpo_teacher_logprob_reward_is_the_per_token_reverse_kl():
    teacher = Trained("root", CFG, _init(1), "root", "fp")
    objective, ctx = _context("grpo", dict(reward="teacher_logprob", group_size=2,
                                           prompts_per_step=4, max_new_tokens=NEW, prompts=64,
                                           aggregation="token", teacher_reward_scale=0.5),
                              teacher=teacher)
    built = objective.build(ctx)
    assert sorted(built.step_fn.frozen) == ["teacher"]  # kl_beta = 0: no reference forward
    record = _run(built, 1)
    batch, metrics = record["batches"][0], record["metrics"][0]
    logp, weights = _logprobs(record["params"][0], batch)
    teacher_lp, _ = _logprobs(_host(teacher.params), batch)
    # ratio 1 and A_t = 0.5·(teacher − old): the 'token' loss is 0.5·mean(log π − log π_T)
    diff = np.asarray(logp - teacher_lp)[np.asarray(weights) > 0]
    np.testing.assert_allclose(_mean(metrics, "loss"), 0.5 * diff.mean(), rtol=2e-5)
    np.testing.assert_allclose(_mean(metrics, "reverse_kl"), diff.mean(), rtol=2e-5)
    # the same through policy_loss with [B, L] advantages
    loss, _ = posttrain.policy_loss(logp, None, None, 0.5 * (teacher_lp - logp), weights,
                                    ctx.settings.spec)
    np.testing.assert_allclose(float(loss), 0.5 * diff.mean(), rtol=2e-5)


@pytest.mark.parametrize("variant", ["reference", "teacher_reward"])
def test_grpo_micro_batched_step_equals_the_whole_batch_step(grpo_run, variant):
    """grad_accum = 2 (strided rows: no micro-batch holds a whole group) gives the update of
    the whole batch: advantages and aggregation weights come from the whole batch first, and
    the frozen forwards run per micro-batch. μ = 2, so the second update's old log-probs are
    reassembled from the micro-batches too."""
    _, ctx, _, record = grpo_run
    batch = {k: jnp.asarray(v) for k, v in record["batches"][1].items()}
    params = record["params"][1]
    base = grpo_objective.StepConfig(CFG, ctx.settings.spec, 4, chunk_size=8)
    frozen = {"reference": _init(0)}
    if variant == "teacher_reward":
        base = dataclasses.replace(base, spec=dataclasses.replace(
            posttrain.DAPO, mu=2), teacher=CFG, teacher_reward_scale=0.5)
        frozen = {"teacher": _init(1)}
    optimizer = optax.sgd(1.0)  # the params move by the gradients themselves (no Adam
    # normalisation magnifying float32 rounding of near-zero gradients)
    state = steps.TrainState(step=jnp.asarray(0), params=params,
                             opt_state=optimizer.init(params))
    out = {}
    for k in (1, 2):
        step = jax.jit(functools.partial(grpo_objective.train_step,
                                         dataclasses.replace(base, grad_accum=k), optimizer))
        out[k] = _host(step(state, frozen, batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 out[2][0].params, out[1][0].params)
    for name, value in out[1][1].items():  # float32 sums in another order (sampler_mismatch
        # is ~5e-6 in all: |old − sampler| of the same model)
        np.testing.assert_allclose(out[2][1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    # a rebuilt stage (a resume) reuses the compiled step: one per (config, optimizer, mesh)
    assert objectives.get("grpo").build(ctx).step_fn.step is grpo_run[2].step_fn.step
    with pytest.raises(ValueError, match=r"grad_accum=3 does not divide the step's 8 rollout "
                                         r"rows"):
        objectives.get("grpo").build(dataclasses.replace(ctx, grad_accum=3))


def test_grpo_dynamic_sampling_draws_more_prompts_until_groups_differ():
    # correct answers only: the untrained policy never is, so every group is equal
    block = dict(group_size=4, prompts_per_step=2, max_new_tokens=NEW, prompts=64,
                 well_formed_reward=0.0, dynamic_sampling=True, sampling_rounds=3)
    objective, ctx = _context("grpo", block)
    built = objective.build(ctx)
    state = built.make_state()
    first = next(built.batches)
    batch = built.prepare_batch(state, first)
    assert np.all(batch["reward"] == 0) and np.all(batch["sampling_rounds"] == 3)
    fresh = rollouts.prompt_source(ctx, 64, 2).batches  # the same prompts from the start
    skipped = [next(fresh) for _ in range(4)]
    np.testing.assert_array_equal(skipped[0]["tokens"], first["tokens"])
    np.testing.assert_array_equal(next(built.batches)["tokens"], skipped[3]["tokens"])
    plain = objective.build(_context("grpo", {**block, "dynamic_sampling": False})[1])
    np.testing.assert_array_equal(plain.prepare_batch(state, first)["tokens"],
                                  batch["tokens"])  # short of groups: round 0's rows


# ----------------------------------------------------------------------------- preference


# online and offline share this step config (and so one compiled step)
ODPO_BLOCK = dict(loss="odpo", alpha=0.5, beta=0.1, pairs_per_step=4)


@pytest.fixture(scope="module")
def online_run():
    objective, ctx = _context("preference", {**ODPO_BLOCK, "max_new_tokens": NEW, "prompts": 64,
                                             "overlong_buffer": NEW})
    built = objective.build(ctx)
    return ctx, built, _run(built, 2)


def _pair_sums(params, batch):
    """(chosen [P], rejected [P]) log-prob sums by an independent forward."""
    both = {k: np.concatenate([batch[k], batch["rejected_" + k]])
            for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    logp, _ = _logprobs(params, both)
    sums = np.asarray(logp).sum(axis=1)
    return sums[:len(sums) // 2], sums[len(sums) // 2:]


def test_online_odpo_pairs_best_vs_worst_and_the_step_is_odpo_loss(online_run):
    _, built, record = online_run
    for step in (0, 1):
        batch, metrics = record["batches"][step], record["metrics"][step]
        weight = batch["pair_weight"][:, 0]
        assert np.all(batch["score_chosen"] >= batch["score_rejected"])
        np.testing.assert_array_equal(weight == 0,
                                      batch["score_chosen"][:, 0] == batch["score_rejected"][:, 0])
        used = weight > 0
        assert used.any()
        policy = _pair_sums(record["params"][step], batch)
        reference = _pair_sums(record["params"][0], batch)
        loss, expected = posttrain.odpo_loss(
            *(jnp.asarray(x[used]) for x in (*policy, *reference)),
            jnp.asarray(batch["score_chosen"][used, 0]),
            jnp.asarray(batch["score_rejected"][used, 0]), beta=0.1, alpha=0.5)
        assert metrics["count"] == 4 and _mean(metrics, "tied") == np.mean(~used)
        np.testing.assert_allclose(_mean(metrics, "loss"), float(loss), rtol=2e-5)
        for name in ("margin", "reward_accuracy", "chosen_logprob", "offset"):
            np.testing.assert_allclose(_mean(metrics, name), float(expected[name]), rtol=1e-4,
                                       atol=1e-6)
    assert abs(_mean(record["metrics"][0], "margin")) < 1e-6  # the policy starts as the reference
    jax.tree.map(np.testing.assert_array_equal, _host(built.step_fn.frozen),
                 record["params"][0])
    # the pairs are the current policy's samples of the batch's prompts, same key same pairs
    again = built.prepare_batch(steps.TrainState(jnp.asarray(1), record["params"][1], None),
                                record["prompts"][1])
    for name, value in record["batches"][1].items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def _pairs_file(path, n=8):
    problems = TASK.make_problems("train", n, 3)
    lines = [{"prompt": p.prompt, "chosen": p.completion,
              "rejected": p.completion.replace("#", "#1"), "score_chosen": 1.0 + i / n,
              "score_rejected": 0.0} for i, p in enumerate(problems)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def test_offline_odpo_steps_raise_the_margin_and_the_step_is_odpo_loss(tmp_path, online_run):
    _pairs_file(tmp_path / "pairs.jsonl")
    objective, ctx = _context("preference", {**ODPO_BLOCK,
                                             "source": str(tmp_path / "pairs.jsonl")})
    built = objective.build(ctx)
    assert built.prepare_batch is None and built.step_fn.step is online_run[1].step_fn.step
    record = _run(built, 6)
    batch = record["batches"][1]
    loss, _ = posttrain.odpo_loss(*(jnp.asarray(x) for x in (
        *_pair_sums(record["params"][1], batch), *_pair_sums(record["params"][0], batch),
        batch["score_chosen"][:, 0], batch["score_rejected"][:, 0])), beta=0.1, alpha=0.5)
    np.testing.assert_allclose(_mean(record["metrics"][1], "loss"), float(loss), rtol=2e-5)
    margins = [_mean(m, "margin") for m in record["metrics"]]
    assert abs(margins[0]) < 1e-6 and margins[-1] > 0.1 and margins[-1] > margins[2], margins
    assert _mean(record["metrics"][-1], "reward_accuracy") == 1.0


def test_dpo_pair_losses_weighted_are_dpo_loss_on_the_trained_pairs():
    """loss='dpo' through the step's per-pair path: tied pairs (weight 0) leave the mean."""
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(size=5) * 3, jnp.float32) for _ in range(4))
    weight = np.array([1, 0, 1, 1, 0], np.float32)
    batch = {"pair_weight": weight[:, None], "score_chosen": np.zeros((5, 1), np.float32),
             "score_rejected": np.zeros((5, 1), np.float32)}
    scfg = preference_objective.StepConfig(CFG, loss="dpo", beta=0.2)
    loss_P, metrics_P = preference_objective.pair_losses(scfg, (pc, pr), (rc, rr),
                                                         batch["score_chosen"][:, 0],
                                                         batch["score_rejected"][:, 0])
    used = weight > 0
    expected, metrics = posttrain.dpo_loss(pc[used], pr[used], rc[used], rr[used], beta=0.2)
    np.testing.assert_allclose(np.sum(weight * loss_P) / weight.sum(), float(expected),
                               rtol=1e-6)
    np.testing.assert_allclose(np.sum(weight * metrics_P["margin"]) / weight.sum(),
                               float(metrics["margin"]), rtol=1e-5)


def test_offline_pairs_are_refused_by_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = _pairs_file(path, 3)
    read = functools.partial(preference_objective.read_offline_pairs, str(path), TOKENIZER,
                             seq_len=SEQ_LEN)
    assert len(read(need_scores=True)) == 3
    lines[1]["score_chosen"] = -1.0
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: score_chosen=-1.0 < score_rejected"):
        read(need_scores=False)
    del lines[1]["score_chosen"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2 has no numeric score_chosen"):
        read(need_scores=True)
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: prompt \+ chosen is \d+ tokens"):
        preference_objective.read_offline_pairs(str(path), TOKENIZER, seq_len=8,
                                                need_scores=False)
    preference = objectives.get("preference")
    for block, message in [(dict(loss="ipo"), r"loss='ipo' is not one of"),
                           (dict(samples_per_prompt=1), r"samples_per_prompt=1: a preference"),
                           (dict(judge="gpt"),
                            r"judge='gpt' is not one of \['model', 'verifier'\]"),
                           (dict(beta=0.0), r"beta=0.0 must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            preference.parse_settings(block, "stages.i.preference")
    spec = preference.step_spec(CFG, None, preference.parse_settings({}, "p"),
                                optimizer=steps.make_optimizer(lr=1e-3, total_steps=10),
                                batch_size=8, seq_len=32, grad_accum=2)
    assert (spec.kind, spec.batch_size, spec.micro_batches) == ("train", 16, 2)


def test_metrics_with_their_own_count_are_averaged_over_it():
    """GRPO's ratio statistics count only the tokens that entered the loss: a step whose
    groups were all skipped (0 such tokens) must not pull their mean towards 0."""
    from cascade_jax import loop

    # step 1: 30 completion tokens, 10 entered the loss with ratio 1.0; step 2: all skipped
    totals = {"loss_sum": 6.0, "count": 60.0, "ratio_mean_sum": 10.0 * 1.0 + 0.0,
              "ratio_mean_count": 10.0 + 0.0}
    summary = loop.summarize(totals)
    assert summary["ratio_mean"] == 1.0
    assert summary["loss"] == 0.1 and summary["tokens"] == 60.0
    assert "ratio_mean_count" not in summary
