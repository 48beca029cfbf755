"""Training pieces: the objective against numpy, the optimizer, a sharded step against one
device, and the loop's behaviour (loss falls, NaN stops before saving, metrics files)."""

import json
import struct

import jax
import numpy as np
import optax
import pytest

from cascade_jax import lm, loop, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.metrics import MetricWriter, read_metrics

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, tie_embeddings=True)


def _pattern_batch(seed, batch=8, length=16):
    """Rows of a repeating 4-token motif, two packed documents each: easy to learn."""
    rng = np.random.default_rng(seed)
    motifs = rng.integers(2, CFG.vocab_size, (batch, 4))
    tokens = np.tile(motifs, (1, length // 4)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[:, length // 2:] = 2
    positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


def test_next_token_targets_respect_segments_and_padding():
    batch = {"tokens": np.array([[5, 6, 7, 8, 9, 0]]),
             "segment_ids": np.array([[1, 1, 2, 2, 2, 0]])}
    targets, weights = lm.next_token_targets(batch)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 0, 1, 1, 0, 0]])


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    weights = rng.integers(0, 2, (2, 5)).astype(np.float32)
    total, count = lm.cross_entropy(logits, targets, weights)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(total, (nll * weights).sum(), rtol=1e-5)
    assert count == weights.sum()
    correct = lm.correct_top1(logits, targets, weights)
    assert correct == ((logits.argmax(-1) == targets) * weights).sum()


def test_optimizer_warms_up_then_decays_and_skips_decay_on_norms():
    opt = steps.make_optimizer(lr=1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1,
                               weight_decay=0.5, clip_norm=None)
    params = {"w": np.ones((2, 2), np.float32), "scale": np.ones((2,), np.float32)}
    zero_grads = jax.tree.map(np.zeros_like, params)
    state = opt.init(params)
    updates, _ = opt.update(zero_grads, state, params)
    # zero gradient: only weight decay moves params; lr at step 0 of warmup is 0
    assert float(np.abs(updates["w"]).max()) == 0.0
    for _ in range(2):
        updates, state = opt.update(zero_grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    with pytest.raises(ValueError, match="total_steps=5 must exceed warmup_steps=5"):
        steps.make_optimizer(lr=1.0, total_steps=5, warmup_steps=5)


@pytest.fixture(scope="module")
def optimizer():
    return steps.make_optimizer(lr=1e-2, total_steps=100, warmup_steps=5)


def _run_steps(optimizer, mesh, n_steps, grad_accum=1):
    state = steps.create_state(CFG, optimizer, jax.random.key(0), mesh)
    step_fn = steps.jit_ce_train_step(CFG, optimizer, mesh, grad_accum=grad_accum)
    losses = []
    for i in range(n_steps):
        state, metrics = step_fn(state, sharding.shard_batch(_pattern_batch(i % 3), mesh))
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return state, losses


def test_sharded_steps_equal_single_device(optimizer):
    single, single_losses = _run_steps(optimizer, sharding.make_mesh(devices=jax.devices()[:1]),
                                       n_steps=5)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, sharded_losses = _run_steps(optimizer, mesh, n_steps=5)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    mu = sharded.opt_state[1][0].mu["layers"]["mlp"]["w_up"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(sharded.params), jax.device_get(single.params))
    assert int(sharded.step) == 5


def test_grad_accumulation_equals_the_whole_batch_step(optimizer):
    """4 micro-batches of 2 rows (sharded over 2 data-parallel devices) vs one step on all 8
    rows on one device: the same token-weighted mean gradient, so the same training."""
    whole, whole_losses = _run_steps(optimizer, sharding.make_mesh(devices=jax.devices()[:1]),
                                     n_steps=3)
    accumulated, accumulated_losses = _run_steps(
        optimizer, sharding.make_mesh(data=2, devices=jax.devices()[:2]), n_steps=3, grad_accum=4)
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(accumulated.params), jax.device_get(whole.params))
    with pytest.raises(ValueError, match="grad_accum=0 must be a positive integer"):
        steps.jit_ce_train_step(CFG, optimizer, sharding.make_mesh(devices=jax.devices()[:1]),
                             grad_accum=0)


def test_fit_loss_falls_and_writes_metrics(optimizer, tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state = steps.create_state(CFG, optimizer, jax.random.key(0), mesh)
    batches = (_pattern_batch(i % 3) for i in range(10**6))
    saved = []
    with MetricWriter(str(tmp_path)) as writer:
        state, tokens = loop.fit(
            steps.jit_ce_train_step(CFG, optimizer, mesh), state, batches, mesh=mesh,
            total_steps=40, writer=writer, log_every=10, eval_every=20,
            evaluate_fn=lambda p: {"loss": 0.0}, checkpoint_every=20,
            save_fn=lambda step, s, t: saved.append((step, t)), progress=False)
    assert tokens == 40 * 8 * 16
    assert saved == [(20, 20 * 128), (40, 40 * 128)]
    logged = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    assert [r["step"] for r in read_metrics(str(tmp_path), "validation")] == [20, 40]
    assert _tensorboard_tags(tmp_path / "tb") >= {"train/loss", "validation/loss"}


def test_nan_loss_stops_with_the_step_and_saves_nothing(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = steps.make_optimizer(lr=1e-2, total_steps=10, warmup_steps=1)
    state = steps.create_state(CFG, opt, jax.random.key(0), mesh)
    poisoned = jax.tree.map(lambda p: p * np.nan, state.params)
    state = state.replace(params=poisoned)
    saved = []
    with MetricWriter(str(tmp_path), tensorboard=False) as writer, pytest.raises(
            loop.NonFiniteLossError, match="loss is nan at step 1; stopped without saving"):
        loop.fit(steps.jit_ce_train_step(CFG, opt, mesh), state,
                  iter([_pattern_batch(0)] * 10), mesh=mesh, total_steps=10, writer=writer,
                  checkpoint_every=1, save_fn=lambda *a: saved.append(a), progress=False)
    assert saved == []


def _tensorboard_tags(directory):
    """Scalar tags in TensorBoard event files, parsed from the TFRecord framing by hand."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.iterdir():
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_metric_records_are_json_lines(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(3, "train", {"loss": np.float32(1.5)})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 3, "split": "train", "loss": 1.5}


def test_optimizer_state_sharding_follows_params():
    opt = optax.adamw(1e-3)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    shardings = steps.model_state_shardings(CFG, opt, mesh)
    assert shardings.opt_state[0].mu["layers"]["attn"]["wq"].spec == \
        shardings.params["layers"]["attn"]["wq"].spec
    assert shardings.opt_state[0].count.spec == jax.sharding.PartitionSpec()
