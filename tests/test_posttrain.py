"""Post-training math against float64 numpy: target log-probs (a tiny model's forward), chunked
against unchunked (value and gradient), per-sequence sums, DPO and offset DPO (the reference
gets no gradient), group advantages, every aggregation mode, clipping on the right side, the
k3 KL, and a softmax bandit that a few policy-gradient steps improve.

Shapes are tiny and the model is compiled a few times only, to keep the file fast on CPU.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import model
from cascade_jax.config import ModelConfig
from cascade_jax.posttrain import grpo, logprobs, preference
from cascade_jax.posttrain.grpo import GRPOSpec

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- references


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _np_targets_weights(tokens, segment_ids, loss_mask):
    """Position t predicts t+1 inside one non-padding segment, where the target is masked in."""
    tokens, seg, mask = (np.asarray(a) for a in (tokens, segment_ids, loss_mask))
    b, length = tokens.shape
    targets = np.zeros_like(tokens)
    weights = np.zeros((b, length))
    for i in range(b):
        for t in range(length - 1):
            targets[i, t] = tokens[i, t + 1]
            weights[i, t] = float(seg[i, t + 1] == seg[i, t] and seg[i, t + 1] != 0
                                  and mask[i, t + 1] != 0)
    return targets, weights


def _np_aggregate(x, w, aggregation, max_len=None, group_size=None):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if aggregation == "token":
        return (x * w).sum() / w.sum()
    if aggregation == "constant":
        return (x * w).sum() / (x.shape[0] * (max_len or x.shape[1]))
    if aggregation == "sequence":
        groups = [(x[i] * w[i]).sum() / w[i].sum() for i in range(x.shape[0]) if w[i].sum() > 0]
        return np.mean(groups)
    assert aggregation == "group_token"
    out = []
    for g in range(x.shape[0] // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        if w[rows].sum() > 0:
            out.append((x[rows] * w[rows]).sum() / w[rows].sum())
    return np.mean(out)


def _np_policy_loss(logp, old, ref, adv, w, spec, group_size=None):
    logp, old, ref, adv = (np.asarray(a, np.float64) for a in (logp, old, ref, adv))
    ratio = np.exp(logp - old)
    a = adv[:, None]
    pg = -np.minimum(ratio * a, np.clip(ratio, 1 - spec.epsilon_low, 1 + spec.epsilon_high) * a)
    d = ref - logp
    kl = np.exp(d) - d - 1
    per_token = pg + spec.kl_beta * kl
    return (_np_aggregate(per_token, w, spec.aggregation, spec.max_len, group_size),
            _np_aggregate(pg, w, spec.aggregation, spec.max_len, group_size), ratio, kl)


def _np_advantages(rewards, g, scale, skip, eps=1e-6):
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    centred = r - r.mean(1, keepdims=True)
    equal = r.max(1) == r.min(1)
    keep = np.repeat(~(equal & skip), g).reshape(r.shape).astype(np.float64)
    if scale == "group":
        a = centred / (r.std(1, keepdims=True) + eps)
    elif scale == "batch":
        kept = centred[keep > 0]
        a = (centred - kept.mean()) / (kept.std() + eps)
    else:
        a = centred
    a[equal] = 0.0
    return a.reshape(-1), keep.reshape(-1), equal


# ----------------------------------------------------------------------------- log-probs

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                  d_ff=32, max_seq_len=16)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.key(0))


def _packed_batch():
    """Two rows: row 0 packs a prompt/completion pair (segment 1) and a second pair (segment 2)
    then padding; row 1 holds one pair filling the row."""
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    mask = np.array([[0, 0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    tokens = RNG.integers(1, CFG.vocab_size, seg.shape).astype(np.int32) * (seg != 0)
    positions = np.zeros_like(seg)
    for i in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            positions[i, t] = positions[i, t - 1] + 1 if seg[i, t] == seg[i, t - 1] else 0
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "loss_mask": mask}


_target_logprobs = jax.jit(logprobs.target_logprobs, static_argnums=0,
                           static_argnames=("chunk_size", "temperature"))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_target_logprobs_equal_float64_log_softmax_of_forward(params, chunk_size):
    batch = _packed_batch()
    lp, w = _target_logprobs(CFG, params, batch, chunk_size=chunk_size)
    logits = model.forward(CFG, params, batch["tokens"], batch["segment_ids"],
                           batch["positions"])
    targets, weights = _np_targets_weights(batch["tokens"], batch["segment_ids"],
                                           batch["loss_mask"])
    expected = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(w), weights)
    np.testing.assert_allclose(np.asarray(lp), expected * weights, rtol=1e-5, atol=1e-5)
    assert lp.dtype == jnp.float32
    # Completion-only: a target counts exactly when it is a completion token (row 0: 2 + 2,
    # row 1: 6), never a prompt token, never across the packing boundary.
    assert weights.sum(1).tolist() == [4.0, 6.0]


def test_token_logprobs_chunked_equal_unchunked_value_and_gradient_with_temperature():
    b, length, d, v = 2, 7, 5, 11
    h = jnp.asarray(RNG.normal(size=(b, length, d)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(RNG.integers(0, v, (b, length)), jnp.int32)
    cot = jnp.asarray(RNG.normal(size=(b, length)), jnp.float32)
    temp = 1.7
    expected = np.take_along_axis(
        _np_log_softmax(np.einsum("bld,dv->blv", np.float64(h), np.float64(w)) / temp),
        np.asarray(targets)[..., None], -1)[..., 0]

    def run(chunk):
        def f(h, w):
            out = logprobs.token_logprobs_from_hidden(h, w, targets, chunk_size=chunk,
                                                      temperature=temp)
            return jnp.sum(out * cot), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
        return out, grads

    out_full, grads_full = run(None)
    out_chunk, grads_chunk = run(3)  # 7 = 3 + 3 + 1: the last chunk is padded
    np.testing.assert_allclose(np.asarray(out_full), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_chunk), np.asarray(out_full), rtol=1e-6,
                               atol=1e-6)
    for g_chunk, g_full in zip(grads_chunk, grads_full, strict=True):
        np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size=0"):
        logprobs.token_logprobs_from_hidden(h, w, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature=0"):
        logprobs.token_logprobs_from_hidden(h, w, targets, temperature=0)


def test_chunked_log_probs_never_hold_a_BLV_buffer():
    """Compiled memory of the gradient (compiled, never run): chunked temporaries stay far
    below one [B, L, V] float32 array, which the unchunked gradient needs at least once."""
    b, length, d, vocab = 1, 4096, 32, 8192
    blv_bytes = b * length * vocab * 4  # 128 MiB
    shapes = (jax.ShapeDtypeStruct((b, length, d), jnp.float32),
              jax.ShapeDtypeStruct((d, vocab), jnp.float32),
              jax.ShapeDtypeStruct((b, length), jnp.int32))

    def temp_bytes(chunk):
        def f(h, w, targets):
            return jnp.sum(logprobs.token_logprobs_from_hidden(h, w, targets, chunk_size=chunk))
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(None) >= blv_bytes
    assert temp_bytes(128) < blv_bytes / 8  # about two [B, 128, V] chunks


def test_sequence_ids_and_sums_per_packed_segment():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 3, 3]], np.int32)
    ids = np.asarray(logprobs.sequence_ids_from_segments(jnp.asarray(seg)))
    np.testing.assert_array_equal(ids, [[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, 4, 4]])
    lp = RNG.normal(size=seg.shape)
    w = (RNG.random(seg.shape) > 0.3).astype(np.float64) * (seg != 0)
    sums = logprobs.sequence_logprob_sums(jnp.asarray(lp, jnp.float32), jnp.asarray(w),
                                          jnp.asarray(ids), 6)
    expected = np.zeros(6)
    for s in range(5):
        expected[s] = (lp * w)[ids == s].sum()
    np.testing.assert_allclose(np.asarray(sums), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="n_sequences=0"):
        logprobs.sequence_logprob_sums(jnp.asarray(lp), jnp.asarray(w), jnp.asarray(ids), 0)


# ----------------------------------------------------------------------------- preference

P = 6


def _pairs():
    return [jnp.asarray(RNG.normal(size=P) * 3 - 10, jnp.float32) for _ in range(4)]


def _np_dpo(pc, pr, rc, rr, beta, offset=0.0):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    return -_np_log_sigmoid(beta * h - offset).mean(), beta * (pc - rc), beta * (pr - rr)


def test_dpo_loss_and_metrics_equal_float64():
    pc, pr, rc, rr = _pairs()
    loss, m = preference.dpo_loss(pc, pr, rc, rr, beta=0.3)
    expected, chosen, rejected = _np_dpo(pc, pr, rc, rr, 0.3)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(m["reward_accuracy"]), (chosen > rejected).mean())
    np.testing.assert_allclose(float(m["margin"]), (chosen - rejected).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["chosen_reward"]), chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rejected_reward"]), rejected.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["chosen_logprob"]), np.mean(pc), rtol=1e-6)
    np.testing.assert_allclose(float(m["rejected_logprob"]), np.mean(pr), rtol=1e-6)
    assert float(m["count"]) == P
    # Stable far out: a margin of 1e4 neither overflows nor gives NaN.
    big, _ = preference.dpo_loss(pc + 1e4, pr, rc, rr, beta=1.0)
    small, _ = preference.dpo_loss(pc - 1e4, pr, rc, rr, beta=1.0)
    assert float(big) == pytest.approx(0.0, abs=1e-6) and np.isfinite(float(small))


def test_odpo_equals_float64_and_dpo_at_alpha_zero():
    pc, pr, rc, rr = _pairs()
    sw = jnp.asarray(RNG.random(P) + 1.0, jnp.float32)
    sl = jnp.asarray(RNG.random(P) * 0.9, jnp.float32)
    loss, m = preference.odpo_loss(pc, pr, rc, rr, sw, sl, beta=0.2, alpha=0.7)
    offset = 0.7 * np.log(np.float64(sw) - np.float64(sl))
    expected, _, _ = _np_dpo(pc, pr, rc, rr, 0.2, offset)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m["offset"]), offset.mean(), rtol=1e-5)
    assert float(m["gap_clamped"]) == 0.0
    zero, _ = preference.odpo_loss(pc, pr, rc, rr, sw, sl, beta=0.2, alpha=0.0)
    dpo, _ = preference.dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert float(zero) == float(dpo)


def test_odpo_ties_are_clamped_and_reversed_pairs_refused():
    pc, pr, rc, rr = _pairs()
    s = jnp.ones(P)
    loss, m = preference.odpo_loss(pc, pr, rc, rr, s, s, beta=0.2, alpha=1.0,
                                   min_score_gap=1e-3)
    expected, _, _ = _np_dpo(pc, pr, rc, rr, 0.2, np.log(1e-3))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(m["gap_clamped"]) == 1.0
    reversed_pair = re.escape("pair 2: score_chosen=0.0 < score_rejected=1.0")
    with pytest.raises(ValueError, match=reversed_pair):
        preference.odpo_loss(pc, pr, rc, rr, s.at[2].set(0.0), s, beta=0.2)
    # Under jit the scores cannot be read: a reversed pair is clamped like a tie, never NaN.
    jitted = jax.jit(lambda sw, sl: preference.odpo_loss(pc, pr, rc, rr, sw, sl, beta=0.2))
    loss_jit, m_jit = jitted(s.at[2].set(0.0), s)
    assert np.isfinite(float(loss_jit)) and float(m_jit["gap_clamped"]) == 1.0
    with pytest.raises(ValueError, match="beta=0"):
        preference.dpo_loss(pc, pr, rc, rr, beta=0)
    with pytest.raises(ValueError, match="alpha=-1"):
        preference.odpo_loss(pc, pr, rc, rr, s, s, beta=0.1, alpha=-1)
    with pytest.raises(ValueError, match="one length"):
        preference.dpo_loss(pc, pr[:3], rc, rr, beta=0.1)


@pytest.mark.parametrize("offset", [False, True])
def test_preference_reference_gets_no_gradient(offset):
    pc, pr, rc, rr = _pairs()
    sw, sl = jnp.full(P, 2.0), jnp.full(P, 0.5)
    beta = 0.5

    def f(pc, pr, rc, rr):
        if offset:
            return preference.odpo_loss(pc, pr, rc, rr, sw, sl, beta=beta, alpha=1.0)[0]
        return preference.dpo_loss(pc, pr, rc, rr, beta=beta)[0]

    g_pc, g_pr, g_rc, g_rr = jax.grad(f, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    assert not np.any(np.asarray(g_rc)) and not np.any(np.asarray(g_rr))
    h = (np.float64(pc) - np.float64(rc)) - (np.float64(pr) - np.float64(rr))
    delta = np.log(1.5) if offset else 0.0
    expected = beta / P / (1 + np.exp(beta * h - delta))  # −d/dpc mean log σ(βh − Δ)
    np.testing.assert_allclose(np.asarray(g_pc), -expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_pr), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- GRPO spec


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon_low=1.0), "epsilon_low=1.0 must be in"),
    (dict(epsilon_high=0), "epsilon_high=0 must be > 0"),
    (dict(aggregation="mean"), "aggregation='mean' is not known"),
    (dict(scale_by_std="row"), "scale_by_std='row' is not known"),
    (dict(kl_beta=-0.1), "kl_beta=-0.1 must be"),
    (dict(skip_equal_groups=1), "skip_equal_groups=1 must be True or False"),
    (dict(mu=0), "mu=0 must be a positive integer"),
    (dict(max_len=0), "max_len=0 must be a positive integer"),
])
def test_grpo_spec_refuses_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOSpec(**kwargs)


def test_presets():
    m = grpo.MAGISTRAL
    assert (m.kl_beta, m.aggregation, m.scale_by_std, m.epsilon_low, m.epsilon_high,
            m.skip_equal_groups) == (0.0, "group_token", "batch", 0.2, 0.28, True)
    assert (grpo.GRPO.aggregation, grpo.GRPO.scale_by_std, grpo.GRPO.kl_beta) == (
        "sequence", "group", 0.04)
    assert (grpo.DR_GRPO.aggregation, grpo.DR_GRPO.scale_by_std) == ("constant", None)
    assert (grpo.DAPO.aggregation, grpo.DAPO.epsilon_high) == ("token", 0.28)
    hash(m)  # a static jit argument


# ----------------------------------------------------------------------------- advantages

G = 4
# Three groups of four: mixed, all equal (no signal), binary.
REWARDS = np.array([0.1, 0.7, 0.3, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", None])
@pytest.mark.parametrize("skip", [False, True])
def test_group_advantages_equal_float64(scale, skip):
    out = grpo.group_advantages(jnp.asarray(REWARDS), G, scale, skip_equal_groups=skip)
    a, keep, equal = _np_advantages(REWARDS, G, scale, skip)
    np.testing.assert_allclose(np.asarray(out.advantages), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.keep), keep)
    np.testing.assert_array_equal(np.asarray(out.equal_groups), equal)
    assert int(out.n_equal_groups) == 1
    assert not np.any(np.asarray(out.advantages)[4:8])  # the equal group: exactly 0
    if scale == "group":  # unit std within each informative group
        np.testing.assert_allclose(np.asarray(out.advantages)[8:].std(), 1.0, rtol=1e-5)


def test_group_advantages_refuse_partial_groups():
    with pytest.raises(ValueError, match="not whole groups of group_size=5"):
        grpo.group_advantages(jnp.asarray(REWARDS), 5, "group")
    with pytest.raises(ValueError, match="scale_by_std='std'"):
        grpo.group_advantages(jnp.asarray(REWARDS), G, "std")


# ----------------------------------------------------------------------------- policy loss

R, T = 8, 6


def _rollouts():
    """Two groups of four rows; row 3 has no counted token; log-ratios up to ±0.6 so some
    tokens clip on each side. Its own generator: the same rows whichever tests ran before."""
    rng = np.random.default_rng(11)
    logp = rng.normal(size=(R, T)) - 2.0
    old = logp + rng.uniform(-0.6, 0.6, (R, T))
    ref = logp + rng.uniform(-0.5, 0.5, (R, T))
    lengths = np.array([6, 3, 5, 0, 2, 6, 4, 1])
    w = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(size=R)
    return logp, old, ref, adv, w


@pytest.mark.parametrize("aggregation", ["sequence", "token", "group_token", "constant"])
def test_policy_loss_each_aggregation_equals_float64(aggregation):
    logp, old, ref, adv, w = _rollouts()
    spec = GRPOSpec(epsilon_low=0.2, epsilon_high=0.28, aggregation=aggregation, kl_beta=0.05,
                    max_len=10 if aggregation == "constant" else None)
    f32 = [jnp.asarray(a, jnp.float32) for a in (logp, old, ref, adv, w)]
    loss, m = grpo.policy_loss(*f32[:4], f32[4], spec, group_size=G)
    expected, pg, ratio, kl = _np_policy_loss(logp, old, ref, adv, w, spec, group_size=G)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m["pg_loss"]), pg, rtol=1e-5)
    counted = w > 0
    np.testing.assert_allclose(float(m["kl"]), kl[counted].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["ratio_mean"]), ratio[counted].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["ratio_max"]), ratio[counted].max(), rtol=1e-5)
    a = np.broadcast_to(adv[:, None], ratio.shape)
    low = ((a < 0) & (ratio < 0.8))[counted].mean()
    high = ((a > 0) & (ratio > 1.28))[counted].mean()
    np.testing.assert_allclose(float(m["clip_fraction_low"]), low, rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction_high"]), high, rtol=1e-6)
    assert low > 0 and high > 0  # the fixture exercises both sides
    np.testing.assert_allclose(float(m["policy_drift"]), (old - logp)[counted].mean(),
                               rtol=1e-5, atol=1e-6)
    assert float(m["count"]) == w.sum()


def test_constant_aggregation_defaults_to_the_arrays_length_and_token_differs():
    logp, old, ref, adv, w = _rollouts()
    f32 = [jnp.asarray(a, jnp.float32) for a in (logp, old, ref, adv, w)]
    loss, _ = grpo.policy_loss(*f32, grpo.DR_GRPO)
    expected, *_ = _np_policy_loss(logp, old, ref, adv, w, grpo.DR_GRPO)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # The modes really differ on ragged lengths (the point of having them).
    values = {agg: float(grpo.policy_loss(*f32, GRPOSpec(aggregation=agg), group_size=G)[0])
              for agg in grpo.AGGREGATIONS}
    assert len({round(v, 6) for v in values.values()}) == 4


def test_clipping_zero_gradient_outside_the_range_on_the_advantages_side():
    spec = GRPOSpec(epsilon_low=0.2, epsilon_high=0.28, aggregation="token")
    ratios = np.array([[0.5, 0.79, 1.0, 1.2, 1.27, 1.5],   # advantage +1
                       [0.5, 0.79, 1.0, 1.2, 1.27, 1.5]])  # advantage −1
    old = jnp.full((2, 6), -1.5)
    logp = old + jnp.log(jnp.asarray(ratios, jnp.float32))
    adv = jnp.array([1.0, -1.0])
    w = jnp.ones((2, 6))
    g = np.asarray(jax.grad(lambda lp: grpo.policy_loss(lp, old, None, adv, w, spec)[0])(logp))
    # A > 0: only a ratio above 1 + ε_high stops the push up (below 1 − ε_low it still pulls).
    assert np.all(g[0, :5] != 0) and g[0, 5] == 0
    # A < 0: only a ratio below 1 − ε_low stops the push down.
    assert np.all(g[1, :2] == 0) and np.all(g[1, 2:] != 0)
    # Inside the range the gradient is −A·r / n_tokens exactly.
    np.testing.assert_allclose(g[0, 2:5], -ratios[0, 2:5] / 12, rtol=1e-5)
    np.testing.assert_allclose(g[1, 2:], ratios[1, 2:] / 12, rtol=1e-5)


def test_on_policy_default_and_k3_kl():
    logp, _, ref, adv, w = _rollouts()
    lp, rf, a, ww = (jnp.asarray(x, jnp.float32) for x in (logp, ref, adv, w))
    spec = GRPOSpec(aggregation="token", kl_beta=0.1)
    loss_none, m = grpo.policy_loss(lp, None, rf, a, ww, spec)
    loss_same, _ = grpo.policy_loss(lp, lp, rf, a, ww, spec)
    assert float(loss_none) == float(loss_same) and float(m["ratio_mean"]) == 1.0
    # Gradient at ratio 1: −A per token (the REINFORCE gradient) + β·(1 − e^(ref − logp)).
    g = np.asarray(jax.grad(lambda x: grpo.policy_loss(x, None, rf, a, ww, spec)[0])(lp))
    expected = (-adv[:, None] + 0.1 * (1 - np.exp(ref - logp))) * w / w.sum()
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
    d = np.float64(ref) - np.float64(logp)
    k3 = np.asarray(grpo.k3_kl(lp, rf))
    np.testing.assert_allclose(k3, np.exp(d) - d - 1, rtol=1e-4, atol=1e-7)
    assert np.all(k3 >= 0) and float(jnp.max(jnp.abs(grpo.k3_kl(lp, lp)))) == 0.0
    with pytest.raises(ValueError, match=re.escape("kl_beta=0.1 needs ref_logprobs_BL")):
        grpo.policy_loss(lp, None, None, a, ww, spec)
    with pytest.raises(ValueError, match="needs group_size"):
        grpo.policy_loss(lp, None, None, a, ww, GRPOSpec(aggregation="group_token"))
    with pytest.raises(ValueError, match="one per row"):
        grpo.policy_loss(lp, None, None, a[:3], ww, grpo.DR_GRPO)


def test_skipped_groups_leave_loss_and_denominators():
    """keep (from group_advantages) times the weights: an equal group changes nothing."""
    logp, old, _, _, w = _rollouts()
    rewards = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # group 2 all equal
    adv = grpo.group_advantages(jnp.asarray(rewards), G, "batch", skip_equal_groups=True)
    lp, od = jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32)
    w_kept = jnp.asarray(w, jnp.float32) * adv.keep[:, None]
    loss, m = grpo.policy_loss(lp, od, None, adv.advantages, w_kept, grpo.MAGISTRAL,
                               group_size=G)
    only, _ = grpo.policy_loss(lp[:4], od[:4], None, adv.advantages[:4], w_kept[:4],
                               grpo.MAGISTRAL, group_size=G)
    np.testing.assert_allclose(float(loss), float(only), rtol=1e-6)
    assert float(m["count"]) == w[:4].sum()


# ----------------------------------------------------------------------------- bandit


def test_a_few_policy_gradient_steps_raise_a_bandits_expected_reward():
    """A softmax policy over 4 tokens, 8 prompts × G = 4 samples per step, rewards known:
    plain gradient steps on policy_loss (μ = 2 updates per rollout batch, old log-probs fixed)
    raise the expected reward."""
    reward_V = jnp.array([0.0, 0.2, 1.0, 0.5])
    spec = dataclasses.replace(grpo.MAGISTRAL, mu=2)

    def expected_reward(theta):
        return float(jax.nn.softmax(theta) @ reward_V)

    def loss_fn(theta, actions_R, old_R1, adv_R, keep_R):
        logp_R1 = jax.nn.log_softmax(theta)[actions_R][:, None]
        return grpo.policy_loss(logp_R1, old_R1, None, adv_R, keep_R[:, None], spec,
                                group_size=G)[0]

    grad_fn = jax.jit(jax.grad(loss_fn))
    theta = jnp.zeros(4)
    start = expected_reward(theta)
    key = jax.random.key(0)
    for _ in range(15):
        key, sub = jax.random.split(key)
        actions = jax.random.categorical(sub, theta, shape=(8 * G,))
        old = jax.nn.log_softmax(theta)[actions][:, None]
        adv = grpo.group_advantages(reward_V[actions], G, spec.scale_by_std,
                                    skip_equal_groups=spec.skip_equal_groups)
        for _ in range(spec.mu):
            theta = theta - 0.5 * grad_fn(theta, actions, old, adv.advantages, adv.keep)
    assert expected_reward(theta) > start + 0.3, (start, expected_reward(theta))
    assert int(jnp.argmax(theta)) == 2
