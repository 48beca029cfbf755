"""Context parallelism (a `context` mesh axis splitting each row's tokens) and blockwise
attention with causal block skipping.

Proofs: on 8 virtual CPU devices, attention with the sequence split 4 ways (keys, values,
segment ids and positions all-gathered in one `shard_map`) equals one device, forward and
gradients w.r.t. q, k and v under non-uniform random cotangents, with packed segments, a
sliding window, blocks that do not divide the shard, in index order and in a shuffled order;
a whole-model CE step and a KD step with context=4 equal context=1 (loss and every gradient
leaf). Blockwise attention, skipping or not, equals a float64 numpy reference, and so does
Pallas splash attention in interpret mode, forward and backward.
"""

import functools

import jax
import numpy as np
import pytest

from cascade_jax import lm, model, sharding, steps
from cascade_jax.config import ModelConfig, YarnRopeScaling
from cascade_jax.distill import losses
from cascade_jax.distill import step as distill_step

B, L, K, G, E = 2, 32, 2, 2, 8
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=K * G, n_kv_heads=K,
                  head_dim=E, d_ff=48, max_seq_len=L, sliding_window=11,
                  rope_scaling=YarnRopeScaling(4.0, 8), query_scale_beta=0.1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_trees_close(ours, reference, rtol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours),
                            jax.tree.leaves(reference), strict=True):
        assert _rel(a, b) <= rtol, (jax.tree_util.keystr(path), _rel(a, b))


def _packed(rng, rows=B, length=L):
    """Segment ids 1..3 in runs of random length, some padding (0) at the end of row 0."""
    cuts = np.sort(rng.choice(np.arange(1, length), size=(rows, 2), replace=True), axis=1)
    idx = np.arange(length)
    seg = 1 + (idx[None] >= cuts[:, :1]) + (idx[None] >= cuts[:, 1:])
    seg[0, -5:] = 0
    return seg.astype(np.int32), np.asarray(model.positions_from_segments(seg), np.int32)


def _numpy_attention(q, k, v, seg, pos, window):
    """float64 reference: [B, L, K, G, E] out, mask from positions and segments."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("BLKGE,BMKE->BKLGM", q, k) / np.sqrt(q.shape[-1])
    allowed = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        allowed &= pos[:, :, None] - pos[:, None, :] < window
    s = np.where(allowed[:, None, :, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("BKLGM,BMKE->BLKGE", p, v)


def _numpy_attention_vjp(q, k, v, seg, pos, window, d_out):
    """float64 reference gradients (dq, dk, dv) of `_numpy_attention` under `d_out`."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    scale = 1 / np.sqrt(q.shape[-1])
    allowed = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        allowed &= pos[:, :, None] - pos[:, None, :] < window
    s = np.where(allowed[:, None, :, None, :], np.einsum("BLKGE,BMKE->BKLGM", q, k) * scale,
                 -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = np.einsum("BKLGM,BLKGE->BMKE", p, d_out)
    dp = np.einsum("BLKGE,BMKE->BKLGM", d_out, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
    return (np.einsum("BKLGM,BMKE->BLKGE", ds, k), np.einsum("BKLGM,BLKGE->BMKE", ds, q), dv)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, L, K, G, E)).astype(np.float32)
    k, v = (rng.normal(size=(B, L, K, E)).astype(np.float32) for _ in range(2))
    cotangent = rng.normal(size=(B, L, K * G, E)).astype(np.float32)  # non-uniform
    seg, pos = _packed(rng)
    return q, k, v, cotangent, seg, pos


def _attention_vjp(cfg: ModelConfig):
    """(out, dq, dk, dv) of `model`'s attention under a random cotangent."""
    def run(q, k, v, seg, pos, cotangent):
        out, pullback = jax.vjp(lambda q, k, v: model.attention_heads(
            cfg, q, k, v, model.SegmentMask(seg, pos)), q, k, v)
        return (out, *pullback(cotangent))
    return run


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("order", ["index", "shuffled"])
def test_context_parallel_attention_equals_one_device(qkv, chunk, order):
    q, k, v, cotangent, seg, pos = qkv
    perm = (np.arange(L) if order == "index" else
            np.random.default_rng(1).permutation(L))
    take = functools.partial(np.take, indices=perm, axis=1)
    cfg = CFG.replace(attention_chunk=chunk)
    one = jax.jit(_attention_vjp(cfg))(q, k, v, seg, pos, cotangent)  # rows in index order
    mesh = sharding.make_mesh(data=1, fsdp=2, context=4)
    rows = sharding.batch_sharding(mesh)
    split = jax.jit(sharding.traced_on_mesh(_attention_vjp(cfg), mesh), in_shardings=rows,
                    out_shardings=rows)(*map(take, (q, k, v, seg, pos, cotangent)))
    assert split[0].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context")
    _assert_trees_close(split, [take(np.asarray(x)) for x in one], 1e-5)
    want = _numpy_attention(q, k, v, seg, pos, CFG.sliding_window)
    assert _rel(one[0], want.reshape(one[0].shape)) < 1e-5


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [4, 5])
def test_block_skipping_equals_the_full_square_and_float64(qkv, window, chunk):
    """Blocks of 4 (divides L) and 5 (does not): skipped or not, the same forward and
    gradients as the full-square softmax, which equals numpy in float64."""
    q, k, v, cotangent, seg, pos = qkv
    mask = model.SegmentMask(seg, pos)
    cot = cotangent.reshape(q.shape)

    def vjp(fn):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(cot))

    full = jax.jit(lambda: vjp(lambda q, k, v: model.attend(
        q, k, v, model.segment_mask(mask, mask, window))))()
    for skip in (True, False):
        blocks = jax.jit(lambda skip=skip: vjp(lambda q, k, v: model.attend_blocks(
            q, k, v, mask, mask, chunk, window, skip)))()
        _assert_trees_close(blocks, full, 1e-5)
    assert _rel(full[0], _numpy_attention(q, k, v, seg, pos, window)) < 1e-5
    n = -(-L // chunk)
    kept = len(model.block_pairs(n, n, chunk, window, skip=True))
    assert kept == (n * (n + 1) // 2 if window is None else
                    sum(1 for i in range(n) for j in range(i + 1)
                        if (j + 1) * chunk - 1 > i * chunk - window))
    assert kept < n * n


# ----------------------------------------------------------------- whole steps, context=4 vs 1


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    seg, pos = _packed(rng, 4, L)
    tokens = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def _value_and_grad_on(mesh, loss_fn, cfgs, *args):
    """loss_fn(*params, batch) and its gradient w.r.t. the first params, compiled for `mesh`
    (params of each of `cfgs` on their shardings, the batch on the batch sharding)."""
    shardings = (*(sharding.param_shardings(c, mesh) for c in cfgs),
                 sharding.batch_sharding(mesh))
    fn = jax.jit(sharding.traced_on_mesh(jax.value_and_grad(loss_fn), mesh),
                 in_shardings=shardings)
    return fn(*args)


@pytest.fixture(scope="module")
def meshes():
    return (sharding.make_mesh(devices=jax.devices()[:1]),
            sharding.make_mesh(data=1, fsdp=2, context=4))


def test_a_ce_step_with_context_4_on_balanced_rows_equals_context_1(meshes):
    """context=4 on rows in dual-chunk-swap order (`lm.balance_rows`: targets and positions
    made first, reordered with the tokens) vs context=1 on the rows as packed."""
    cfg = CFG.replace(attention_chunk=4)
    params = model.init(cfg, jax.random.key(0))
    batch = _batch(1)
    balanced = lm.balance_rows(batch, 4)

    def loss(p, b):
        sums = steps.ce_sums(cfg, p, b, chunk_size=8)
        return sums["loss_sum"] / sums["count"]

    one = _value_and_grad_on(meshes[0], loss, (cfg,), params, batch)
    split = _value_and_grad_on(meshes[1], loss, (cfg,), params, balanced)
    wq = sharding.param_shardings(cfg, meshes[1])["layers"]["attn"]["wq"]
    assert wq.spec[1] == ("fsdp", "context")  # params split over fsdp × context, not copied
    _assert_trees_close(split, one, 1e-5)


def test_a_kd_step_with_context_4_equals_context_1(meshes):
    teacher_cfg = CFG.replace(n_layers=3, d_ff=64)
    dcfg = distill_step.DistillConfig(CFG, teacher_cfg, losses.LossSpec(chunk_size=8))
    student = model.init(CFG, jax.random.key(0))
    teacher = model.init(teacher_cfg, jax.random.key(1))
    batch = _batch(2)

    def loss(p, t, b):
        total, metrics = distill_step.loss_sum_and_metrics(dcfg, p, t, b)
        return total / metrics["count"]

    one, split = (_value_and_grad_on(mesh, loss, (CFG, teacher_cfg), student, teacher, batch)
                  for mesh in meshes)
    _assert_trees_close(split, one, 1e-5)


def test_the_sampler_and_a_row_that_does_not_split_are_refused(meshes):
    from cascade_jax import generate

    with pytest.raises(ValueError, match=r"generation does not split rows over the context "
                                         r"axis.*context=1"):
        generate._sampler(CFG, meshes[1], 2, 8, generate.SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"seq_len=30 tokens do not split over the 4 context "
                                         r"shards.*multiple of 4"):
        sharding.check_batch_split(2, meshes[1], seq_len=30)


def test_balanced_rows_swap_chunks_and_carry_their_targets():
    """Shard d of 4 holds chunks d and 7 − d of 8; positions, targets and weights are made
    before the reorder; shards=1 is the identity; a length that does not split is refused."""
    assert lm.dual_chunk_swap(16, 4).tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11,
                                                  6, 7, 8, 9]
    batch = _batch(3)
    order = lm.dual_chunk_swap(L, 4)
    balanced = lm.balance_rows({k: v for k, v in batch.items() if k != "positions"}, 4)
    targets, weights = (np.asarray(x) for x in lm.next_token_targets(batch))
    np.testing.assert_array_equal(balanced["positions"], batch["positions"][:, order])
    np.testing.assert_array_equal(balanced["targets"], targets[:, order])
    np.testing.assert_array_equal(balanced["target_weights"], weights[:, order])
    np.testing.assert_array_equal(lm.next_token_targets(balanced)[0], targets[:, order])
    one = lm.balance_rows(batch, 1)
    np.testing.assert_array_equal(one["tokens"], batch["tokens"])
    mesh = sharding.make_mesh(data=1, fsdp=2, context=4)
    placed = sharding.shard_batch(batch, mesh, balance=True)
    np.testing.assert_array_equal(placed["tokens"], batch["tokens"][:, order])
    with pytest.raises(ValueError, match=r"seq_len=30 does not split into 8 equal chunks"):
        lm.dual_chunk_swap(30, 4)


# ------------------------------------------------------------------------- splash (Pallas)


def test_splash_in_interpret_mode_equals_float64_numpy_forward_and_backward():
    """Pallas splash attention (CPU: interpret mode, as `splash_interpret` asks) with two
    packed segments and padding, a window of 40 and GQA (2 KV heads × 2 groups), blocks of
    128: forward and dq, dk, dv under a random cotangent against float64 numpy."""
    rng = np.random.default_rng(4)
    length, e = 256, 64
    cfg = ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=K * G, n_kv_heads=K,
                      head_dim=e, d_ff=8, sliding_window=40, attention_impl="splash",
                      splash_interpret=True, attention_chunk=128)
    q = rng.normal(size=(1, length, K, G, e)).astype(np.float32)
    k, v = (rng.normal(size=(1, length, K, e)).astype(np.float32) for _ in range(2))
    d_out = rng.normal(size=q.shape).astype(np.float32)
    seg = np.array([[1] * 100 + [2] * 150 + [0] * 6], np.int32)
    pos = np.asarray(model.positions_from_segments(seg))
    out, pullback = jax.vjp(lambda q, k, v: model.attention_heads(
        cfg, q, k, v, model.SegmentMask(seg, pos)), q, k, v)
    grads = pullback(d_out.reshape(out.shape))
    assert _rel(out.reshape(q.shape), _numpy_attention(q, k, v, seg, pos, 40)) < 1e-5
    for ours, want in zip(grads, _numpy_attention_vjp(q, k, v, seg, pos, 40, d_out),
                          strict=True):
        assert _rel(ours, want) < 1e-5


def test_splash_refuses_shapes_that_do_not_tile_and_a_backend_without_it():
    cfg = CFG.replace(attention_impl="splash", splash_interpret=True)
    q = np.zeros((1, 200, K, G, E), np.float32)
    kv = np.zeros((1, 200, K, E), np.float32)
    seg = np.ones((1, 200), np.int32)
    with pytest.raises(ValueError, match=r"attention_impl='splash' needs blocks of a multiple "
                                         r"of 128 tokens that divide the length 200; "
                                         r"attention_chunk=None gives 200: use a length"):
        model.splash_attention(cfg, q, kv, kv, seg)
    with pytest.raises(ValueError, match=r"divide the length 256; attention_chunk=384 .*"
                                         r"one of \[128, 256\]"):
        model.splash_block(cfg.replace(attention_chunk=384), 256)
    with pytest.raises(ValueError, match=r"attention_chunk=100 is splash attention's block "
                                         r"size and must be a multiple of 128"):
        cfg.replace(attention_chunk=100)
    with pytest.raises(ValueError, match=r"the backend is 'cpu'; use attention_impl='xla'.*"
                                         r"splash_interpret=True"):
        model.splash_attention(cfg.replace(splash_interpret=False), q, kv, kv, seg)
