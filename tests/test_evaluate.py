"""Evaluation figures against numpy, and micro-batched evaluation equal to the whole batch."""

import jax
import numpy as np
import pytest

from cascade_jax import evaluate, lm, model, sharding, steps
from cascade_jax.config import ModelConfig

TEACHER = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64)
STUDENT = TEACHER.replace(n_layers=1, d_ff=32, tie_embeddings=True)


def _batch(seed, rows=4, length=16):
    rng = np.random.default_rng(seed)
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[0, 10:] = 2
    segment_ids[1, 12:] = 0  # padding
    return {"tokens": rng.integers(0, TEACHER.vocab_size, (rows, length)).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": np.asarray(model.positions_from_segments(segment_ids), np.int32)}


@pytest.fixture(scope="module")
def models():
    return model.init(STUDENT, jax.random.key(0)), model.init(TEACHER, jax.random.key(1))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_teacher_metric_sums_match_numpy(models):
    student, teacher = models
    batch = _batch(0)
    sums = evaluate.teacher_metric_sums(STUDENT, TEACHER, student, teacher, batch)
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    s_logp = _log_softmax(model.forward(STUDENT, student, *args))
    t_logp = _log_softmax(model.forward(TEACHER, teacher, *args))
    targets, weights = (np.asarray(a) for a in lm.next_token_targets(batch))
    nll = -np.take_along_axis(s_logp, targets[..., None], -1)[..., 0]
    kl = (np.exp(t_logp) * (t_logp - s_logp)).sum(-1)
    agree = s_logp.argmax(-1) == t_logp.argmax(-1)
    np.testing.assert_allclose(sums["loss_sum"], (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["kl_to_teacher_sum"], (kl * weights).sum(), rtol=1e-4)
    assert float(sums["top1_agreement_sum"]) == (agree * weights).sum()
    assert float(sums["count"]) == weights.sum()


def test_micro_batched_evaluation_equals_the_whole_batch(models):
    """4 rows as 2 micro-batches of 2 (split over 2 data-parallel devices) vs all at once."""
    student, teacher = models
    mesh = sharding.make_mesh(devices=jax.devices()[:2])
    batch = sharding.shard_batch(_batch(1), mesh)
    pairs = [
        (steps.jit_eval_sums(STUDENT, mesh)(student, batch),
         steps.jit_eval_sums(STUDENT, mesh, micro_batches=2)(student, batch)),
        (evaluate.jit_teacher_metric_sums(STUDENT, TEACHER, mesh)(student, teacher, batch),
         evaluate.jit_teacher_metric_sums(STUDENT, TEACHER, mesh, micro_batches=2)(
             student, teacher, batch)),
    ]
    for whole, micro in pairs:
        assert set(whole) == set(micro)
        for name in whole:
            np.testing.assert_allclose(micro[name], whole[name], rtol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="micro_batches=0 must be a positive integer"):
        steps.jit_eval_sums(STUDENT, mesh, micro_batches=0)
