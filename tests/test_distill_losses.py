"""KD losses: every divergence against float64 numpy, JSD(β) limits, fused-chunked against
unfused (value and gradient), the teacher's zero gradient, top-k and sampled sparse targets,
the vocab check, and the compiled memory of the fused loss.

Shapes are tiny and jitted functions are shared across tests, to keep compiles few.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import lm, model
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses
from cascade_jax.distill.losses import LossSpec

B, L, D_S, D_T, V = 2, 10, 8, 12, 40


# ----------------------------------------------------------------------------- references


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_divergence(kind, lt, ls, beta):
    """Float64 D(p‖s) from log-probs; JSD(β) as TRL/Liger define it, divided by β(1 − β)."""
    p, q = np.exp(lt), np.exp(ls)
    forward = (p * (lt - ls)).sum(-1)
    reverse = (q * (ls - lt)).sum(-1)
    if kind == "forward_kl":
        return forward
    if kind == "reverse_kl":
        return reverse
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    assert kind == "jsd"
    if beta == 0.0:
        return forward
    if beta == 1.0:
        return reverse
    m = beta * p + (1 - beta) * q
    trl = beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)
    return trl / (beta * (1 - beta))


def _np_sums(s_logits, t_logits, targets, weights, spec):
    temp = spec.temperature
    kd = temp**2 * _np_divergence(spec.kind, _np_log_softmax(np.asarray(t_logits) / temp),
                                  _np_log_softmax(np.asarray(s_logits) / temp), spec.beta)
    ce = -np.take_along_axis(_np_log_softmax(s_logits), np.asarray(targets)[..., None],
                             -1)[..., 0]
    w = np.asarray(weights, np.float64)
    agree = np.asarray(s_logits).argmax(-1) == np.asarray(t_logits).argmax(-1)
    kd_sum, ce_sum = (kd * w).sum(), (ce * w).sum()
    return {"loss_sum": spec.alpha * kd_sum + (1 - spec.alpha) * ce_sum, "kd_sum": kd_sum,
            "ce_sum": ce_sum, "top1_agreement_sum": (agree * w).sum(), "count": w.sum()}


def _packed_targets(rng, batch, length, vocab):
    """Targets and weights of a packed, padded batch: two documents per row, padding at the end
    of row 0, so weights have zeros at a packing boundary and in the padding."""
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[:, length // 2:] = 2
    segment_ids[0, -3:] = 0
    targets, weights = lm.next_token_targets({"tokens": tokens, "segment_ids": segment_ids})
    assert 0 < float(weights.sum()) < batch * length - batch
    return targets, weights


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data():
    """Student/teacher hidden states and heads of different widths, one shared vocabulary."""
    rng = np.random.default_rng(0)
    s_h = rng.normal(size=(B, L, D_S)).astype(np.float32)
    s_w = (rng.normal(size=(D_S, V)) / np.sqrt(D_S)).astype(np.float32) * 2
    t_h = rng.normal(size=(B, L, D_T)).astype(np.float32)
    t_w = (rng.normal(size=(D_T, V)) / np.sqrt(D_T)).astype(np.float32) * 2
    targets, weights = _packed_targets(rng, B, L, V)
    return s_h, s_w, t_h, t_w, targets, weights


@functools.partial(jax.jit, static_argnames=("spec",))
def _dense_value_and_grads(s_h, s_w, t_h, t_w, targets, weights, spec):
    """(loss, metrics, grads w.r.t. student hidden, student head, teacher hidden, teacher head)."""
    def f(a, b, c, d):
        return losses.distill_loss(a, b, c, d, targets, weights, spec)
    (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(
        s_h, s_w, t_h, t_w)
    return loss, metrics, grads


@functools.partial(jax.jit, static_argnames=("spec", "mode"))
def _sparse_value_and_grads(s_h, s_w, idx, logprobs, targets, weights, spec, mode):
    def f(a, b):
        return losses.sparse_distill_loss(a, b, idx, logprobs, targets, weights, spec,
                                          mode=mode)
    (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(s_h, s_w)
    return loss, metrics, grads


def _assert_same(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "kl"}, ["kind='kl'", "forward_kl"]),
    ({"temperature": 0.0}, ["temperature=0.0"]),
    ({"temperature": float("inf")}, ["temperature=inf"]),
    ({"alpha": 1.5}, ["alpha=1.5"]),
    ({"beta": -0.1}, ["beta=-0.1"]),
    ({"chunk_size": 0}, ["chunk_size=0", "None"]),
])
def test_spec_rejects_bad_values_by_name(kwargs, words):
    with pytest.raises(ValueError) as err:
        LossSpec(**kwargs)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- dense, numpy


@pytest.mark.parametrize("kind, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                        ("jsd", 0.3), ("jsd", 0.5), ("tvd", 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_from_logits_matches_float64_numpy(kind, beta, temperature):
    rng = np.random.default_rng(1)
    t_logits = rng.normal(size=(2, 7, 13)).astype(np.float32) * 3
    s_logits = (t_logits + rng.normal(size=t_logits.shape) * 2).astype(np.float32)
    targets, weights = _packed_targets(rng, 2, 7, 13)
    spec = LossSpec(kind=kind, temperature=temperature, alpha=0.7, beta=beta)
    loss, metrics = losses.distill_loss_from_logits(s_logits, t_logits, targets, weights, spec)
    want = _np_sums(s_logits, t_logits, targets, weights, spec)
    assert want["top1_agreement_sum"] not in (0.0, want["count"])  # the agreement check can fail
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, want["loss_sum"] / want["count"], rtol=2e-5)


def test_forward_kl_gradient_matches_analytic_float64():
    """d/dz_s of alpha·T²·KL(p_T‖s_T) + (1 − alpha)·CE is alpha·T·(s_T − p_T) + (1 − alpha)·
    (softmax(z_s) − onehot), per counted token, over the count."""
    rng = np.random.default_rng(2)
    t_logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    s_logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    targets, weights = _packed_targets(rng, 2, 6, 9)
    spec = LossSpec(temperature=2.0, alpha=0.4)
    grad = jax.grad(lambda z: losses.distill_loss_from_logits(z, t_logits, targets, weights,
                                                              spec)[0])(s_logits)
    temp, w = 2.0, np.asarray(weights, np.float64)[..., None]
    s_t, p_t = np.exp(_np_log_softmax(s_logits / temp)), np.exp(_np_log_softmax(t_logits / temp))
    onehot = np.eye(9)[np.asarray(targets)]
    want = (0.4 * temp * (s_t - p_t) + 0.6 * (np.exp(_np_log_softmax(s_logits)) - onehot)) * w
    np.testing.assert_allclose(grad, want / w.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero(kind):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 4
    targets, weights = _packed_targets(rng, 2, 5, 11)
    for beta in (0.0, 0.3, 1.0):
        spec = LossSpec(kind=kind, temperature=1.7, beta=beta)
        _, metrics = losses.distill_loss_from_logits(logits, logits, targets, weights, spec)
        np.testing.assert_allclose(metrics["kd_sum"], 0.0, atol=1e-5)
        assert metrics["top1_agreement_sum"] == metrics["count"]


def test_jsd_limits_are_forward_and_reverse_kl_and_continuous():
    rng = np.random.default_rng(4)
    t = jax.nn.log_softmax(rng.normal(size=(6, 17)) * 2)
    s = jax.nn.log_softmax(rng.normal(size=(6, 17)) * 2)
    forward = losses.divergence("forward_kl", t, s)
    reverse = losses.divergence("reverse_kl", t, s)
    np.testing.assert_array_equal(losses.divergence("jsd", t, s, beta=0.0), forward)
    np.testing.assert_array_equal(losses.divergence("jsd", t, s, beta=1.0), reverse)
    assert np.all(np.abs(forward - reverse) > 1e-3)  # the two ends really differ
    # Scaled by 1/(β(1−β)), J(β) approaches the ends continuously (TRL's unscaled J → 0);
    # the gap is O(β), and float32 still matches float64 this close to the ends.
    t64, s64 = np.asarray(t, np.float64), np.asarray(s, np.float64)
    for beta, end in ((1e-4, forward), (1 - 1e-4, reverse)):
        near = losses.divergence("jsd", t, s, beta=beta)
        np.testing.assert_allclose(near, end, rtol=1e-2)
        np.testing.assert_allclose(near, _np_divergence("jsd", t64, s64, beta), rtol=1e-3)
    half = losses.divergence("jsd", t, s, beta=0.5)
    np.testing.assert_allclose(half, _np_divergence("jsd", t64, s64, 0.5), rtol=1e-5)
    assert np.all(half <= 4 * np.log(2) + 1e-6)


def test_no_counted_token_gives_zero_loss_and_finite_gradient():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(1, 4, 7)).astype(np.float32)
    zeros = np.zeros((1, 4), np.float32)
    targets = np.zeros((1, 4), np.int32)
    loss, grad = jax.value_and_grad(
        lambda z: losses.distill_loss_from_logits(z, logits * 2, targets, zeros, LossSpec())[0]
    )(logits)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


# ----------------------------------------------------------------------------- fused = unfused


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 10, 64])  # 3 does not divide L = 10
def test_fused_equals_unfused_value_and_gradient(data, chunk_size):
    base = LossSpec(kind="forward_kl", temperature=2.0, alpha=0.5, chunk_size=None)
    want = _dense_value_and_grads(*data, spec=base)
    got = _dense_value_and_grads(*data, spec=LossSpec(kind="forward_kl", temperature=2.0,
                                                      alpha=0.5, chunk_size=chunk_size))
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])
    _assert_same(got[2][:2], want[2][:2])
    assert np.abs(np.asarray(want[2][0])).sum() > 0  # there is a gradient to compare
    # The padded chunk and the zero-weight positions give no gradient to the hidden states.
    dead = np.asarray(data[5]) == 0
    assert np.all(np.asarray(got[2][0])[dead] == 0)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "tvd"])
def test_fused_equals_unfused_for_every_divergence(data, kind):
    want = _dense_value_and_grads(*data, spec=LossSpec(kind=kind, beta=0.3, temperature=1.5,
                                                       alpha=0.8, chunk_size=None))
    got = _dense_value_and_grads(*data, spec=LossSpec(kind=kind, beta=0.3, temperature=1.5,
                                                      alpha=0.8, chunk_size=3))
    _assert_same(got[:2], want[:2])
    _assert_same(got[2][:2], want[2][:2])


def test_dense_loss_matches_numpy_through_the_heads(data):
    s_h, s_w, t_h, t_w, targets, weights = data
    spec = LossSpec(kind="forward_kl", temperature=2.0, alpha=0.5, chunk_size=3)
    loss, metrics, _ = _dense_value_and_grads(*data, spec=spec)
    want = _np_sums(np.asarray(s_h, np.float64) @ s_w, np.asarray(t_h, np.float64) @ t_w,
                    targets, weights, spec)
    _assert_same({k: metrics[k] for k in want}, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, want["loss_sum"] / want["count"], rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_teacher_gets_exactly_zero_gradient(data, chunk_size):
    _, _, grads = _dense_value_and_grads(*data, spec=LossSpec(kind="jsd", alpha=0.5,
                                                              chunk_size=chunk_size))
    assert np.abs(np.asarray(grads[0])).sum() > 0
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


def test_bfloat16_fused_matches_unfused(data):
    s_h, s_w, t_h, t_w, targets, weights = data
    bf = (jnp.asarray(s_h, jnp.bfloat16), s_w, jnp.asarray(t_h, jnp.bfloat16), t_w, targets,
          weights)
    want = _dense_value_and_grads(*bf, spec=LossSpec(alpha=0.5, chunk_size=None))
    got = _dense_value_and_grads(*bf, spec=LossSpec(alpha=0.5, chunk_size=3))
    assert got[2][0].dtype == jnp.bfloat16 and got[2][1].dtype == jnp.float32
    _assert_same(got[:2], want[:2], rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 loss
    _assert_same(got[2][:2], want[2][:2], rtol=2e-2, atol=2e-3)
    # And the value is the float64 loss of the bf16-rounded inputs.
    ref = _np_sums(np.asarray(bf[0], np.float64) @ np.asarray(s_w.astype(jnp.bfloat16),
                                                                np.float64),
                   np.asarray(bf[2], np.float64) @ np.asarray(t_w.astype(jnp.bfloat16),
                                                              np.float64),
                   targets, weights, LossSpec(alpha=0.5))
    np.testing.assert_allclose(got[1]["loss_sum"], ref["loss_sum"], rtol=1e-4)


def test_fused_loss_on_model_hidden_states_equals_loss_on_model_logits():
    """Through the real decoder: a tied student and an untied, wider teacher."""
    student_cfg = ModelConfig(vocab_size=48, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              head_dim=8, d_ff=32, tie_embeddings=True)
    teacher_cfg = student_cfg.replace(d_model=24, n_layers=2, tie_embeddings=False)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 48, (2, 9)).astype(np.int32)
    segment_ids = np.array([[1] * 9, [1] * 5 + [2] * 3 + [0]], np.int32)
    targets, weights = lm.next_token_targets({"tokens": tokens, "segment_ids": segment_ids})
    spec = LossSpec(temperature=1.5, alpha=0.9, chunk_size=4)

    @jax.jit
    def both(s_params, t_params):
        def fused(p):
            return losses.distill_loss(
                model.hidden_states(student_cfg, p, tokens, segment_ids),
                model.lm_head_weights(student_cfg, p),
                model.hidden_states(teacher_cfg, t_params, tokens, segment_ids),
                model.lm_head_weights(teacher_cfg, t_params), targets, weights, spec)[0]

        def unfused(p):
            return losses.distill_loss_from_logits(
                model.forward(student_cfg, p, tokens, segment_ids),
                model.forward(teacher_cfg, t_params, tokens, segment_ids),
                targets, weights, spec)[0]
        return jax.value_and_grad(fused)(s_params), jax.value_and_grad(unfused)(s_params)

    got, want = both(model.init(student_cfg, jax.random.key(0)),
                     model.init(teacher_cfg, jax.random.key(1)))
    _assert_same(got, want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- errors


def test_vocab_mismatch_names_both_sizes(data):
    s_h, s_w, t_h, t_w, targets, weights = data
    t_w_bigger = np.concatenate([t_w, t_w[:, :1]], axis=1)
    for chunk_size in (None, 4):
        with pytest.raises(ValueError, match=r"student vocab V=40 != teacher vocab V=41"):
            losses.distill_loss(s_h, s_w, t_h, t_w_bigger, targets, weights,
                                LossSpec(chunk_size=chunk_size))
    with pytest.raises(ValueError, match=r"V=40 .* V=41"):
        losses.distill_loss_from_logits(np.zeros((B, L, 40)), np.zeros((B, L, 41)), targets,
                                        weights, LossSpec())


def test_shape_errors_say_what_to_pass(data):
    s_h, s_w, t_h, t_w, targets, weights = data
    with pytest.raises(ValueError, match="lm_head_weights"):
        losses.distill_loss(s_h, s_w.T, t_h, t_w, targets, weights, LossSpec())
    with pytest.raises(ValueError, match="next_token_targets"):
        losses.distill_loss(s_h, s_w, t_h, t_w, targets[:, :, None], weights, LossSpec())
    idx = np.zeros((B, L, 3), np.int32)
    with pytest.raises(ValueError, match="mode='gumbel'"):
        losses.sparse_distill_loss(s_h, s_w, idx, idx * 0.0, targets, weights, LossSpec(),
                                   mode="gumbel")
    with pytest.raises(ValueError, match="kind='jsd'"):
        losses.sparse_distill_loss(s_h, s_w, idx, idx * 0.0, targets, weights,
                                   LossSpec(kind="jsd"), mode="sampled")


# ----------------------------------------------------------------------------- top-k targets


@pytest.mark.parametrize("kind", losses.KINDS)
def test_top_k_with_the_whole_vocab_equals_dense(data, kind):
    s_h, s_w, t_h, t_w, targets, weights = data
    spec = LossSpec(kind=kind, beta=0.3, temperature=1.5, alpha=0.8, chunk_size=3)
    idx, logprobs = losses.top_k_teacher_targets(jnp.asarray(t_h) @ t_w, V)
    want = _dense_value_and_grads(*data, spec=spec)
    got = _sparse_value_and_grads(s_h, s_w, idx, logprobs, targets, weights, spec=spec,
                                  mode="topk")
    _assert_same(got[:2], want[:2], rtol=1e-5, atol=1e-5)
    _assert_same(got[2], want[2][:2], rtol=1e-4, atol=1e-6)


def test_top_k_renormalises_the_student_on_the_teachers_support():
    """Gather, then log-softmax (MaxText #4056): a student that equals the teacher on the
    teacher's top-k (up to a constant) has zero KD however wrong it is elsewhere, which the
    log-softmax-then-gather order would not give."""
    rng = np.random.default_rng(7)
    vocab, k, temp = 30, 5, 1.5
    t_logits = rng.normal(size=(1, 6, vocab)).astype(np.float32) * 3
    idx, logprobs = losses.top_k_teacher_targets(t_logits, k)
    np.testing.assert_array_equal(idx, np.argsort(-t_logits, -1)[..., :k])
    np.testing.assert_allclose(logprobs, np.take_along_axis(_np_log_softmax(t_logits),
                                                            np.asarray(idx), -1), rtol=1e-5)
    s_logits = rng.normal(size=t_logits.shape).astype(np.float32) * 5
    np.put_along_axis(s_logits, np.asarray(idx),
                      np.take_along_axis(t_logits, np.asarray(idx), -1) + 3.0, -1)
    eye = np.eye(vocab, dtype=np.float32)  # hidden = logits, head = identity
    targets, weights = np.zeros((1, 6), np.int32), np.ones((1, 6), np.float32)
    for kind in losses.KINDS:
        _, metrics = losses.sparse_distill_loss(s_logits, eye, idx, logprobs, targets, weights,
                                                LossSpec(kind=kind, temperature=temp,
                                                         chunk_size=4), mode="topk")
        np.testing.assert_allclose(metrics["kd_sum"], 0.0, atol=1e-5)
    wrong_ls = np.take_along_axis(_np_log_softmax(s_logits / temp), np.asarray(idx), -1)
    wrong_lt = _np_log_softmax(np.asarray(logprobs, np.float64) / temp)
    assert (np.exp(wrong_lt) * (wrong_lt - wrong_ls)).sum() > 0.5

    # Against float64 numpy on a student that differs on the support too.
    s_logits = rng.normal(size=t_logits.shape).astype(np.float32) * 2
    spec = LossSpec(kind="jsd", beta=0.3, temperature=temp, alpha=1.0, chunk_size=4)
    _, metrics = losses.sparse_distill_loss(s_logits, eye, idx, logprobs, targets, weights,
                                            spec, mode="topk")
    ls = _np_log_softmax(np.take_along_axis(s_logits, np.asarray(idx), -1) / temp)
    lt = _np_log_softmax(np.asarray(logprobs, np.float64) / temp)
    want = temp**2 * _np_divergence("jsd", lt, ls, 0.3).sum()
    np.testing.assert_allclose(metrics["kd_sum"], want, rtol=1e-5)


# ----------------------------------------------------------------------------- sampled targets


def test_sampler_draws_from_the_tempered_teacher():
    logits = np.array([[[2.0, 1.0, 0.0, -1.0, -3.0]]], np.float32)
    idx, logprobs = losses.sample_teacher_targets(logits, jax.random.key(0), 20000,
                                                  temperature=2.0)
    assert idx.shape == logprobs.shape == (1, 1, 20000) and idx.dtype == jnp.int32
    want = np.exp(_np_log_softmax(logits[0, 0] / 2.0))
    freq = np.bincount(np.asarray(idx).ravel(), minlength=5) / 20000
    np.testing.assert_allclose(freq, want, atol=0.015)  # > 4σ for 20000 draws
    np.testing.assert_allclose(logprobs, np.log(want)[np.asarray(idx)], rtol=1e-5)


def test_sampled_targets_are_unbiased_and_top_k_is_not():
    """Averaged over many draws, sampled KD (Sparse Logit Sampling) gives the dense forward-KL
    value and gradient; top-2 with the same storage is biased."""
    vocab, positions, n, temp = 6, 4096, 4, 1.5
    t_row = np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.0], np.float32)
    s_row = np.array([0.0, 1.0, -1.0, 2.0, 0.5, 1.0], np.float32)
    t_logits = np.broadcast_to(t_row, (1, positions, vocab))
    s_logits = np.broadcast_to(s_row, (1, positions, vocab)).copy()
    eye = np.eye(vocab, dtype=np.float32)  # hidden = logits, head = identity
    targets, weights = np.zeros((1, positions), np.int32), np.ones((1, positions), np.float32)
    spec = LossSpec(temperature=temp, chunk_size=1024)

    lt, ls = _np_log_softmax(t_row / temp), _np_log_softmax(s_row / temp)
    dense_value = temp**2 * (np.exp(lt) * (lt - ls)).sum()
    dense_grad = temp * (np.exp(ls) - np.exp(lt))  # d KD / d student logits, per position

    def mean_value_and_grad(idx, logprobs, mode):
        _, metrics, (g_h, _) = _sparse_value_and_grads(s_logits, eye, idx, logprobs, targets,
                                                       weights, spec=spec, mode=mode)
        # loss = mean over positions, so Σ_positions grad = mean per-position gradient
        return metrics["kd_sum"] / positions, np.asarray(g_h, np.float64).sum((0, 1))

    idx, logprobs = losses.sample_teacher_targets(t_logits, jax.random.key(1), n,
                                                  temperature=temp)
    value, grad = mean_value_and_grad(idx, logprobs, "sampled")
    np.testing.assert_allclose(value, dense_value, atol=0.03)  # σ ≈ 0.006 for 16384 draws
    np.testing.assert_allclose(grad, dense_grad, atol=0.02)    # σ ≤ 0.006 per entry

    idx, logprobs = losses.top_k_teacher_targets(t_logits, 2)
    _, biased_grad = mean_value_and_grad(idx, logprobs, "topk")
    assert np.abs(biased_grad - dense_grad).max() > 0.1


# ----------------------------------------------------------------------------- memory


def test_fused_loss_never_holds_a_BLV_buffer():
    """Compiled memory of value_and_grad: the fused loss's temporaries stay far below one
    [B, L, V] float32 array, while the naive loss needs several."""
    b, length, d, vocab = 1, 4096, 32, 8192
    blv_bytes = b * length * vocab * 4  # 128 MiB
    shapes = (jax.ShapeDtypeStruct((b, length, d), jnp.float32),
              jax.ShapeDtypeStruct((d, vocab), jnp.float32),
              jax.ShapeDtypeStruct((b, length, d), jnp.float32),
              jax.ShapeDtypeStruct((d, vocab), jnp.float32),
              jax.ShapeDtypeStruct((b, length), jnp.int32),
              jax.ShapeDtypeStruct((b, length), jnp.float32))

    def temp_bytes(spec):
        lowered = _dense_value_and_grads.lower(*shapes, spec=spec)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(LossSpec(alpha=0.5, chunk_size=32))
    naive = temp_bytes(LossSpec(alpha=0.5, chunk_size=None))
    assert naive >= 2 * blv_bytes
    assert fused < blv_bytes / 8, (fused, blv_bytes)
