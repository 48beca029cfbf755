"""The distillation step: frozen teacher, exact gradient accumulation, sharded = one device,
hidden-state matching against numpy, bf16 compute with float32 masters, clear errors, NaN stop
through `loop.fit`, and KD beating CE-only training at matching a trained teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import lm, loop, model, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses, step
from cascade_jax.metrics import MetricWriter, read_metrics

STUDENT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=48)
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64)
SPEC = losses.LossSpec(chunk_size=8)
# Student layer i was teacher layer LAYER_MAP[i] (teacher layer 1 "pruned"); widths differ.
LAYER_MAP = (0, 2)
DCFG = step.DistillConfig(STUDENT, TEACHER, SPEC, hidden=step.HiddenDistill(LAYER_MAP, 0.5))


def _batch(seed, rows=8, length=16):
    """Random tokens, two packed documents per row and padding in some rows, so micro-batches
    hold different numbers of counted tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, STUDENT.vocab_size, (rows, length)).astype(np.int32)
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[:, length // 2:] = 2
    for row in range(0, rows, 3):
        segment_ids[row, length - 3 - row % 5:] = 0
    positions = np.asarray(model.positions_from_segments(segment_ids), np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _host(tree):
    """A numpy copy: survives donation, and feeds any mesh's jitted step without a re-init."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


@pytest.fixture(scope="module")
def optimizer():
    return steps.make_optimizer(lr=1e-2, total_steps=100, warmup_steps=2)


@pytest.fixture(scope="module")
def single(optimizer):
    """One-device mesh, teacher params, and a fresh student state (with projection) on host."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    teacher = sharding.init_params(TEACHER, jax.random.key(1), mesh)
    state = _host(step.create_state(DCFG, optimizer, mesh, rng=jax.random.key(0)))
    return mesh, teacher, state


@pytest.fixture(scope="module")
def single_step(single, optimizer):
    return step.jit_train_step(DCFG, optimizer, single[0])


@pytest.fixture(scope="module")
def whole_batch_grads(single):
    """Gradients of the loss SUM w.r.t. (student, teacher) on `_batch(1)`, and the metrics."""
    _, teacher, state = single
    both = jax.jit(jax.grad(functools.partial(step.loss_sum_and_metrics, DCFG),
                            argnums=(0, 1), has_aux=True))
    return both(state.params, teacher, _batch(1))


def _run(step_fn, state, teacher, mesh, seeds):
    losses_ = []
    for seed in seeds:
        state, metrics = step_fn(state, teacher, sharding.shard_batch(_batch(seed), mesh))
        losses_.append(float(metrics["loss_sum"] / metrics["count"]))
    return state, losses_


# ----------------------------------------------------------------------------- clear errors


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match="student vocab_size=64 differs from teacher "
                                         "vocab_size=80"):
        step.DistillConfig(STUDENT, TEACHER.replace(vocab_size=80))


def test_layer_map_must_name_one_existing_teacher_layer_per_student_layer():
    with pytest.raises(ValueError, match="layer_map has 3 entries but the student has "
                                         "n_layers=2"):
        step.DistillConfig(STUDENT, TEACHER, hidden=step.HiddenDistill((0, 1, 2)))
    with pytest.raises(ValueError, match=r"names teacher layer 3 but the teacher has "
                                         r"n_layers=3 \(indices 0..2\)"):
        step.DistillConfig(STUDENT, TEACHER, hidden=step.HiddenDistill((0, 3)))
    with pytest.raises(ValueError, match="must be a tuple of non-negative"):
        step.HiddenDistill([0, 1])
    with pytest.raises(ValueError, match="kind='l1' is not supported"):
        step.HiddenDistill((0, 1), kind="l1")
    with pytest.raises(ValueError, match="grad_accum=0 must be a positive integer"):
        step.DistillConfig(STUDENT, TEACHER, grad_accum=0)


def test_mesh_that_does_not_divide_the_teacher_is_named(optimizer):
    """The student (d_ff 48) fits a 3-way tensor axis; the wider teacher (d_ff 64) does not."""
    mesh = sharding.make_mesh(tensor=3, devices=jax.devices()[:3])
    rules = tuple((name, "tensor" if name == "mlp" else None if name != "batch" else axes)
                  for name, axes in sharding.DEFAULT_RULES)
    step.state_shardings(DCFG, optimizer, mesh, rules)  # the student alone is fine
    with pytest.raises(ValueError, match=r"layers/mlp/w_down has a dimension "
                                         r"of 64 sharded 3 ways over mesh axes \('tensor',\)"):
        step.jit_train_step(DCFG, optimizer, mesh, rules)


def test_batch_that_does_not_split_into_micro_batches_is_named():
    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC, grad_accum=3)
    params = model.param_shapes(STUDENT)
    with pytest.raises(ValueError, match="batch of 8 rows cannot be split into 3 equal micro-"):
        jax.eval_shape(functools.partial(step.compute_grads, dcfg), params,
                       model.param_shapes(TEACHER), _batch(0))


# ------------------------------------------------------------------------- frozen teacher


def test_teacher_gets_zero_gradient_and_is_bitwise_unchanged(single, single_step,
                                                             whole_batch_grads):
    _, teacher, state = single
    (student_grads, teacher_grads), _ = whole_batch_grads
    for leaf in jax.tree.leaves(teacher_grads):
        assert not np.any(np.asarray(leaf))  # exactly zero, every element
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(student_grads))

    before = _host(teacher)
    new_state, _ = single_step(state, teacher, _batch(0))
    after = jax.device_get(teacher)  # still readable: the teacher is not donated
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert int(new_state.step) == 1
    # no optimizer state for the teacher: Adam moments mirror the student's tree (and proj)
    mu = new_state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(new_state.params)
    assert mu["proj"].shape == (STUDENT.d_model, TEACHER.d_model)


def test_hidden_state_loss_matches_numpy(single, whole_batch_grads):
    """hidden_sum = Σ_tokens w · mean_layers mean_T (x_s P − x_t)², from the models' own block
    outputs in float64; the logit part equals the unfused reference on the models' logits."""
    _, teacher, state = single
    _, metrics = whole_batch_grads
    batch = _batch(1)
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    s_logits, s_inter = model.forward_with_intermediates(STUDENT, state.params["model"], *args,
                                                         names=("block_out",))
    t_logits, t_inter = model.forward_with_intermediates(TEACHER, teacher, *args,
                                                         names=("block_out",))
    s = np.asarray(s_inter["block_out"], np.float64) @ np.asarray(state.params["proj"],
                                                                  np.float64)
    t = np.asarray(t_inter["block_out"], np.float64)[list(LAYER_MAP)]
    targets, weights = lm.next_token_targets(batch)
    expected = (((s - t) ** 2).mean(-1).mean(0) * np.asarray(weights)).sum()
    np.testing.assert_allclose(metrics["hidden_sum"], expected, rtol=1e-5)
    _, reference = losses.distill_loss_from_logits(s_logits, t_logits, targets, weights, SPEC)
    np.testing.assert_allclose(metrics["kd_sum"], reference["kd_sum"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_sum"], reference["loss_sum"] + 0.5 * expected,
                               rtol=1e-5)
    assert metrics["count"] == reference["count"]


def test_cosine_hidden_loss_matches_numpy_and_ignores_scale():
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 3, 4, 6))
    proj = rng.normal(size=(6, 6))
    cosine = step.HiddenDistill((0, 1), kind="cosine")
    got = step._hidden_loss_BL(cosine, jnp.asarray(student, jnp.float32),
                               jnp.asarray(teacher, jnp.float32),
                               jnp.asarray(proj, jnp.float32), jnp.float32)
    s = student @ proj
    cos = (s * teacher).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(teacher, axis=-1)
    np.testing.assert_allclose(got, (1 - cos).mean(0), rtol=1e-5, atol=1e-6)
    scaled = step._hidden_loss_BL(cosine, jnp.asarray(3 * teacher, jnp.float32),
                                  jnp.asarray(teacher, jnp.float32), None, jnp.float32)
    np.testing.assert_allclose(scaled, 0.0, atol=1e-6)


# ------------------------------------------------------------------ accumulation and sharding


def test_grad_accumulation_equals_one_step_on_the_whole_batch(single, whole_batch_grads):
    """k = 4 micro-batches with unequal token counts vs the whole batch: the same gradient
    (and so the same step: the update is a function of the gradient alone) and metrics.

    Tolerance: rtol 1e-5 on metrics; gradients rtol 1e-4 with atol 1e-6 × max |g| (float32
    sums in a different order, with cancellation in small entries).
    """
    _, teacher, state = single
    batch = _batch(1)
    (whole_sum_grads, _), whole_metrics = whole_batch_grads
    whole = jax.tree.map(lambda g: g / whole_metrics["count"], whole_sum_grads)
    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC, DCFG.hidden, grad_accum=4)
    accum, accum_metrics = jax.jit(functools.partial(step.compute_grads, dcfg))(
        state.params, teacher, batch)
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(accum_metrics[name], value, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(whole))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
                 accum, whole)
    # a plain mean of per-micro-batch means would differ: the counts are unequal
    counts = [float(lm.next_token_targets({k: v[j::4] for k, v in batch.items()})[1].sum())
              for j in range(4)]
    assert len(set(counts)) > 1


def test_sharded_step_equals_single_device(single, single_step, optimizer):
    """3 AdamW steps on a 2×2×2 mesh vs one device: losses rtol 1e-5, params rtol 1e-4 /
    atol 1e-6 (the reduction order differs across shards)."""
    mesh1, teacher1, state0 = single
    state1, losses1 = _run(single_step, state0, teacher1, mesh1, range(3))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    teacher = sharding.shard_like(_host(teacher1), step.teacher_shardings(DCFG, mesh))
    # the pruned-child path: given decoder params and projection, placed into their shards
    placed = step.create_state(DCFG, optimizer, mesh, rng=jax.random.key(9),
                               model_params=step.student_model_params(DCFG, state0.params),
                               proj=state0.params["proj"])
    jax.tree.map(np.testing.assert_array_equal, _host(placed), state0)
    state, losses8 = _run(step.jit_train_step(DCFG, optimizer, mesh), placed, teacher, mesh,
                          range(3))
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(state1.params))
    spec = jax.sharding.PartitionSpec
    assert state.params["model"]["layers"]["mlp"]["w_up"].sharding.spec == \
        spec(None, "fsdp", "tensor")
    assert state.params["proj"].sharding.spec == spec("fsdp", None)
    assert teacher["layers"]["attn"]["wq"].sharding.spec == spec(None, "fsdp", "tensor", None)


# --------------------------------------------------------------------------------- numerics


def test_bf16_compute_keeps_float32_masters_and_close_loss(single, optimizer,
                                                           whole_batch_grads):
    """bf16 matmuls, float32 params / moments / loss; loss within 2e-2 relative of float32."""
    mesh, teacher, state = single
    bf16 = step.DistillConfig(STUDENT.replace(dtype="bfloat16"),
                              TEACHER.replace(dtype="bfloat16"), SPEC, DCFG.hidden)
    new_state, metrics = step.jit_train_step(bf16, optimizer, mesh)(state, teacher, _batch(1))
    for leaf in jax.tree.leaves((new_state.params, new_state.opt_state[1][0].mu)):
        assert leaf.dtype == jnp.float32
    assert metrics["loss_sum"].dtype == jnp.float32
    reference = whole_batch_grads[1]  # float32, same params, same batch
    np.testing.assert_allclose(metrics["loss_sum"], reference["loss_sum"], rtol=2e-2)
    assert metrics["loss_sum"] != reference["loss_sum"]  # it did compute in bf16
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_nan_loss_stops_fit_with_the_step_and_saves_nothing(single, single_step, tmp_path):
    mesh, teacher, state = single
    state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    saved = []
    with MetricWriter(str(tmp_path), tensorboard=False) as writer, pytest.raises(
            loop.NonFiniteLossError, match="loss is nan at step 1; stopped without saving"):
        loop.fit(step.with_teacher(single_step, teacher), state, iter([_batch(0)] * 5),
                  mesh=mesh, total_steps=5, writer=writer, checkpoint_every=1,
                  save_fn=lambda *a: saved.append(a), progress=False)
    assert saved == []


# ----------------------------------------------------------------- KD beats CE at matching


_VOCAB, _LEN, _ROWS = 64, 32, 16
_TINY = ModelConfig(vocab_size=_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, tie_embeddings=True)


def _markov_batches(seed):
    """An order-1 Markov source with peaked but spread transitions (entropy ~2 nats), so the
    teacher's soft labels carry more than the sampled next token does."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(_VOCAB, _VOCAB)) * 2.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    rng = np.random.default_rng(seed)
    while True:
        tokens = np.empty((_ROWS, _LEN), np.int32)
        tokens[:, 0] = rng.integers(0, _VOCAB, _ROWS)
        for t in range(1, _LEN):
            u = rng.random(_ROWS)[:, None]
            tokens[:, t] = np.minimum((u > cumulative[tokens[:, t - 1]]).sum(-1), _VOCAB - 1)
        ones = np.ones_like(tokens)
        yield {"tokens": tokens, "segment_ids": ones,
               "positions": np.broadcast_to(np.arange(_LEN, dtype=np.int32), tokens.shape)}


def _kl_to_teacher(forward, teacher, student, batch):
    """Mean KL(teacher ‖ student) per counted token, in float64 numpy."""
    def logprobs(params):
        x = np.asarray(forward(params, batch["tokens"]), np.float64)
        x -= x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lt, ls = logprobs(teacher), logprobs(student)
    weights = np.asarray(lm.next_token_targets(batch)[1])
    return float(((np.exp(lt) * (lt - ls)).sum(-1) * weights).sum() / weights.sum())


def test_distilled_student_matches_teacher_better_than_ce_student(tmp_path):
    """Teacher: 150 CE steps on the Markov source. Two students from the same init see the
    same 200 batches: KD (forward KL, alpha = 1, driven by `loop.fit`) vs CE only."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = steps.make_optimizer(lr=1e-2, total_steps=200, warmup_steps=10)
    ce_step = steps.jit_ce_train_step(_TINY, opt, mesh)  # the teacher's and the CE student's

    def fresh(seed):
        return _host(steps.init_state(opt, sharding.init_params(
            _TINY, jax.random.key(seed), mesh)))

    teacher_state, source = fresh(10), _markov_batches(1)
    for _ in range(150):
        teacher_state, _ = ce_step(teacher_state, next(source))
    teacher = teacher_state.params

    student_batches = list(zip(range(200), _markov_batches(2), strict=False))
    ce_state = kd_state = fresh(20)  # the same init for both students
    for _, batch in student_batches:
        ce_state, _ = ce_step(ce_state, batch)

    dcfg = step.DistillConfig(_TINY, _TINY, losses.LossSpec(chunk_size=16))
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        kd_state, tokens = loop.fit(
            step.with_teacher(step.jit_train_step(dcfg, opt, mesh), teacher), kd_state,
            (batch for _, batch in student_batches), mesh=mesh, total_steps=200,
            writer=writer, log_every=50, progress=False)
    assert tokens == 200 * _ROWS * _LEN
    logged = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in logged] == [50, 100, 150, 200]
    assert logged[-1]["loss"] < logged[0]["loss"]

    forward = jax.jit(lambda p, t: model.forward(_TINY, p, t))
    held_out = next(_markov_batches(3))
    kl_kd = _kl_to_teacher(forward, teacher, kd_state.params, held_out)
    kl_ce = _kl_to_teacher(forward, teacher, ce_state.params, held_out)
    assert kl_kd < 0.5 * kl_ce, (kl_kd, kl_ce)
