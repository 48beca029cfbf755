"""The decoder against an independent float64 numpy implementation, plus its side entry points
(hidden states, intermediates, remat, packing). Hugging Face parity lives in test_hf.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import model
from cascade_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12,
                  d_ff=56, rope_theta=5000.0, norm_eps=1e-6)


def _randomized_params(cfg, seed=0):
    """Random values everywhere, norm scales included (they init to 1 and could hide bugs)."""
    params = model.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape)
             for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _np_forward(cfg, params, tokens, segment_ids, positions):
    """float64 numpy reference written from the Llama/Mistral equations, loop over layers."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][tokens]
    length = tokens.shape[1]
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half) * 2.0 / cfg.head_dim)
    ang = positions[..., None] * inv_freq  # [B, L, E/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rope(t):
        t1, t2 = t[..., :half], t[..., half:]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    def norm(t, w):
        return t / np.sqrt(np.mean(t * t, -1, keepdims=True) + cfg.norm_eps) * w

    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = (j <= i)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if cfg.sliding_window is not None:
        mask &= (i - j < cfg.sliding_window)[None]
    lay = p["layers"]
    for n in range(cfg.n_layers):
        h = norm(x, lay["attn_norm"]["scale"][n])
        q = rope(np.einsum("bld,dhe->blhe", h, lay["attn"]["wq"][n]))
        k = rope(np.einsum("bld,dke->blke", h, lay["attn"]["wk"][n]))
        v = np.einsum("bld,dke->blke", h, lay["attn"]["wv"][n])
        heads = []
        for hh in range(cfg.n_heads):
            kv = hh // cfg.n_groups
            s = np.einsum("ble,bme->blm", q[:, :, hh], k[:, :, kv]) / np.sqrt(cfg.head_dim)
            s = np.where(mask, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            heads.append(np.einsum("blm,bme->ble", w, v[:, :, kv]))
        o = np.stack(heads, 2)
        x = x + np.einsum("blhe,hed->bld", o, lay["attn"]["wo"][n])
        h = norm(x, lay["mlp_norm"]["scale"][n])
        g = np.einsum("bld,df->blf", h, lay["mlp"]["w_gate"][n])
        u = np.einsum("bld,df->blf", h, lay["mlp"]["w_up"][n])
        x = x + np.einsum("blf,fd->bld", g / (1 + np.exp(-g)) * u, lay["mlp"]["w_down"][n])
    x = norm(x, p["final_norm"]["scale"])
    w_out = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ w_out


def _packed_inputs(rng, batch=2, length=14):
    tokens = rng.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[0, 5:11] = 2
    segment_ids[0, 11:] = 0  # padding tail
    positions = np.asarray(model.positions_from_segments(jnp.asarray(segment_ids)))
    return tokens, segment_ids, positions


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("changes", [
    {},
    {"tie_embeddings": True, "sliding_window": 3},
    {"attention_chunk": 7, "sliding_window": 5},   # two query blocks over packed segments
])
def test_forward_matches_numpy_reference(changes):
    cfg = CFG.replace(**changes)
    params = _randomized_params(cfg)
    tokens, segment_ids, positions = _packed_inputs(np.random.default_rng(0))
    ours = model.forward(cfg, params, tokens, segment_ids, positions)
    ref = _np_forward(cfg, params, tokens, segment_ids, positions)
    assert ours.dtype == jnp.float32 and ours.shape == (2, 14, cfg.vocab_size)
    valid = segment_ids > 0
    assert _rel_err(np.asarray(ours)[valid], ref[valid]) < 1e-5


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(model.positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_packed_rows_equal_separate_documents():
    params = _randomized_params(CFG)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, CFG.vocab_size, (1, 6)), rng.integers(0, CFG.vocab_size, (1, 5))
    packed = np.concatenate([doc_a, doc_b], 1)
    seg = np.array([[1] * 6 + [2] * 5])
    logits = model.forward(CFG, params, packed, seg)
    np.testing.assert_allclose(logits[:, :6], model.forward(CFG, params, doc_a), atol=2e-5)
    np.testing.assert_allclose(logits[:, 6:], model.forward(CFG, params, doc_b), atol=2e-5)


def test_hidden_states_times_lm_head_are_the_logits():
    params = _randomized_params(CFG)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 7))
    hidden = model.hidden_states(CFG, params, tokens)
    logits = jnp.einsum("BLD,DV->BLV", hidden, model.lm_head_weights(CFG, params))
    np.testing.assert_allclose(logits, model.forward(CFG, params, tokens), rtol=1e-5, atol=1e-5)


def test_intermediates_are_consistent_with_the_residual_stream():
    params = _randomized_params(CFG)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 7))
    logits, acts = model.forward_with_intermediates(CFG, params, tokens)
    np.testing.assert_array_equal(logits, model.forward(CFG, params, tokens))
    n, d, f, h, e = CFG.n_layers, CFG.d_model, CFG.d_ff, CFG.n_heads, CFG.head_dim
    assert acts["block_in"].shape == (n, 2, 7, d)
    assert acts["attn_heads"].shape == (n, 2, 7, h, e)
    assert acts["mlp_act"].shape == (n, 2, 7, f)
    lay = params["layers"]
    # block i's output is block i+1's input; the embedding is block 0's input
    np.testing.assert_array_equal(acts["block_out"][:-1], acts["block_in"][1:])
    np.testing.assert_allclose(acts["block_in"][0], params["embed"]["embedding"][tokens])
    # residual updates are exactly the projections of the sown activations
    attn_out = jnp.einsum("NBLHE,NHED->NBLD", acts["attn_heads"], lay["attn"]["wo"])
    np.testing.assert_allclose(acts["mlp_in"] - acts["block_in"], attn_out, atol=1e-4)
    mlp_out = jnp.einsum("NBLF,NFD->NBLD", acts["mlp_act"], lay["mlp"]["w_down"])
    np.testing.assert_allclose(acts["block_out"] - acts["mlp_in"], mlp_out, atol=1e-4)
    only = model.forward_with_intermediates(CFG, params, tokens, names=("mlp_act",))[1]
    assert list(only) == ["mlp_act"]
    with pytest.raises(ValueError, match="unknown intermediates \\['mlp_out'\\]"):
        model.forward_with_intermediates(CFG, params, tokens, names=("mlp_out",))


def test_remat_changes_neither_value_nor_gradient():
    params = _randomized_params(CFG)
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 7))

    def loss(cfg, p):
        return jnp.mean(model.forward(cfg, p, tokens) ** 2)

    plain = jax.value_and_grad(lambda p: loss(CFG, p))(params)
    remat = jax.value_and_grad(lambda p: loss(CFG.replace(remat=True), p))(params)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), plain[1],
                 remat[1])


def test_attention_in_query_blocks_changes_neither_value_nor_gradient():
    """Blocks of 2 queries (a checkpointed lax.map) vs all 8 at once, with two packed
    documents: the same softmax over the same keys, so the same value and gradient."""
    params = _randomized_params(CFG)
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 8))
    segment_ids = np.array([[1] * 5 + [2] * 3, [1] * 8])

    def loss(cfg, p):
        return jnp.mean(model.forward(cfg, p, tokens, segment_ids) ** 2)

    whole = jax.jit(jax.value_and_grad(lambda p: loss(CFG, p)))(params)
    blocks = jax.jit(jax.value_and_grad(lambda p: loss(CFG.replace(attention_chunk=2), p)))(
        params)
    np.testing.assert_allclose(whole[0], blocks[0], rtol=1e-6)
    # float32 sums fused in another order: atol 1e-5 against gradients up to ~2 (mean ~3e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), whole[1],
                 blocks[1])
    with pytest.raises(ValueError, match="attention_chunk=3 does not divide the sequence "
                                         "length 8"):
        model.forward(CFG.replace(attention_chunk=3), params, tokens)
    with pytest.raises(ValueError, match="attention_chunk=0 must be None"):
        CFG.replace(attention_chunk=0)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = CFG.replace(dtype="bfloat16")
    params = model.init(cfg, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 7))
    low = model.forward(cfg, params, tokens)
    assert low.dtype == jnp.float32
    full = model.forward(CFG, params, tokens)
    assert _rel_err(low, np.asarray(full, np.float64)) < 5e-2


def test_param_tree_and_logical_axes_agree():
    shapes = model.param_shapes(CFG)
    axes = model.param_logical_axes(CFG)
    for shape, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)), strict=True):
        assert len(shape.shape) == len(spec)
    assert sum(s.size for s in jax.tree.leaves(shapes)) == CFG.num_params()


def test_out_of_vocabulary_ids_are_nan_or_silently_wrapped_as_documented():
    """What `model.check_tokens` documents for unchecked ids: >= V (or < -V) reads NaN,
    [-V, 0) wraps to row V + id (finite and wrong), so data must be checked where it enters."""
    cfg = CFG.replace(n_layers=1)
    params = model.init(cfg, jax.random.key(0))
    forward = jax.jit(model.forward, static_argnums=0)
    v = cfg.vocab_size

    def logits_with(token):
        return forward(cfg, params, jnp.array([[3, token, 5]]))

    for beyond in (v, v + 7, -v - 1):  # the whole row, earlier positions too: the masked
        assert jnp.isnan(logits_with(beyond)).all()  # attention weight is 0, and 0 · NaN = NaN
    np.testing.assert_array_equal(logits_with(-1), logits_with(v - 1))  # wrapped, no error
    np.testing.assert_array_equal(logits_with(-v), logits_with(0))
