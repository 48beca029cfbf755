"""The decoder against an independent float64 numpy implementation, plus its side entry points
(hidden states, intermediates, remat, packing). Hugging Face parity lives in test_hf.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import model
from cascade_jax.config import ModelConfig, YarnRopeScaling

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
    inv_freq, attention = _np_rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ang = positions[..., None] * inv_freq  # [B, L, E/2]
    cos, sin = attention * np.cos(ang)[:, :, None], attention * np.sin(ang)[:, :, None]
    q_scale = np.ones(positions.shape)[:, :, None, None]
    if cfg.query_scale_beta is not None:
        original = cfg.rope_scaling.original_max_position_embeddings
        q_scale = _np_query_scale(positions, cfg.query_scale_beta, original)[:, :, None, None]

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
        attn = {name: w[n] for name, w in lay["attn"].items()}
        q = np.einsum("bld,dhe->blhe", h, attn["wq"]) + attn.get("bq", 0.0)
        k = np.einsum("bld,dke->blke", h, attn["wk"]) + attn.get("bk", 0.0)
        v = np.einsum("bld,dke->blke", h, attn["wv"]) + attn.get("bv", 0.0)
        if cfg.qk_norm:
            q, k = norm(q, attn["q_norm"]), norm(k, attn["k_norm"])
        q, k = rope(q) * q_scale, rope(k)
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


def _np_rope(head_dim, theta, scaling):
    """float64 RoPE inverse frequencies and the cos/sin factor; YaRN written from the paper
    (arXiv 2309.00071: "NTK-by-parts" and the attention scale) with transformers' options."""
    extrapolated = theta ** -(np.arange(0, head_dim, 2) / head_dim)
    if scaling is None:
        return extrapolated, 1.0
    assert isinstance(scaling, YarnRopeScaling)
    # The frequency index d at which the wavelength 2π θ^(2d/E) fits r times in the original
    # context L: solve L / (2π θ^(2d/E)) = r for d.
    def index(r):
        return head_dim * np.log(scaling.original_max_position_embeddings / (2 * np.pi * r)) / (
            2 * np.log(theta))

    low, high = index(scaling.beta_fast), index(scaling.beta_slow)
    if scaling.truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    high = high + 0.001 if low == high else high
    interpolated_share = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
    inv_freq = (extrapolated / scaling.factor * interpolated_share
                + extrapolated * (1 - interpolated_share))

    def mscale(m):
        return 1.0 if scaling.factor <= 1 else 0.1 * m * np.log(scaling.factor) + 1.0

    if scaling.attention_factor is not None:
        attention = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention = mscale(scaling.mscale) / mscale(scaling.mscale_all_dim)
    else:
        attention = mscale(1.0)
    return inv_freq, attention


def _np_query_scale(positions, beta, original):
    return 1.0 + beta * np.log(1.0 + np.floor(np.asarray(positions, np.float64) / original))


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
    # jax.nn.dot_product_attention: the plumbing attention_impl='cudnn' shares (GPU only).
    {"attention_impl": "jax", "sliding_window": 5, "n_kv_heads": 1},
    # Qwen2 biases, Qwen3 q/k norms, YaRN and Ministral 3's query scale (original length 4,
    # so positions 0-10 of the packed rows see scales 1, 1 + β log 2, 1 + β log 3).
    {"qkv_bias": True, "qk_norm": True, "query_scale_beta": 0.3,
     "rope_scaling": YarnRopeScaling(4.0, 4, beta_fast=2.0, beta_slow=0.05, mscale=1.0,
                                     mscale_all_dim=0.5)},
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


@pytest.mark.parametrize("scaling", [
    # Ministral 3's released setting (attention scale 1: mscale == mscale_all_dim).
    YarnRopeScaling(16.0, 16384, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    # Qwen3's long-context recipe: no mscales, so the scale is 0.1 ln(factor) + 1.
    YarnRopeScaling(4.0, 32768),
    # Untruncated ramp, an explicit attention factor.
    YarnRopeScaling(8.0, 4096, beta_fast=16.0, beta_slow=2.0, truncate=False,
                    attention_factor=1.25),
    # Only mscale set (mscale_all_dim None): the plain mscale(factor) rule.
    YarnRopeScaling(2.0, 64, mscale=0.7),
    # A factor of 1 scales nothing (below 1 is refused, as transformers does); a ramp of zero
    # width (low == high) is guarded.
    YarnRopeScaling(1.0, 8, beta_fast=1.0, beta_slow=0.9),
], ids=["ministral3", "qwen3", "untruncated", "mscale_only", "degenerate"])
def test_yarn_frequencies_and_attention_scale_match_float64_numpy(scaling):
    for head_dim, theta in ((128, 1e6), (16, 1e4)):
        want_inv_freq, want_scale = _np_rope(head_dim, theta, scaling)
        got = np.asarray(model.rope_frequencies(head_dim, theta, scaling), np.float64)
        np.testing.assert_allclose(got, want_inv_freq, rtol=2e-6)
        assert model.rope_attention_scale(scaling) == pytest.approx(want_scale, rel=1e-12)
        cos, sin = model.rope_tables(jnp.array([[3]]), head_dim, theta, scaling)
        np.testing.assert_allclose(np.hypot(cos, sin), want_scale, rtol=1e-6)
    if scaling.factor > 1:  # both bands occur at head_dim 128: the rule is not a no-op
        plain = np.asarray(model.rope_frequencies(128, 1e6))
        got = np.asarray(model.rope_frequencies(128, 1e6, scaling))
        assert np.isclose(got, plain).any() and np.isclose(got, plain / scaling.factor).any()


def test_query_scale_matches_float64_numpy():
    positions = np.array([[0, 1, 16383, 16384, 16385, 32767, 32768, 49152, 262143]])
    for beta, original in ((0.1, 16384), (0.7, 3)):
        got = model.query_scale(jnp.asarray(positions), beta, original)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, _np_query_scale(positions, beta, original), rtol=1e-6)
    np.testing.assert_array_equal(model.query_scale(jnp.asarray(positions[:, :3]), 0.1, 16384),
                                  1.0)


def test_packed_segments_restart_the_query_scale():
    """A second document's query scale starts again at position 0, as if it were alone (the
    logits of packed rows against transformers: test_hf's ministral3 case)."""
    cfg = CFG.replace(rope_scaling=YarnRopeScaling(2.0, 4), query_scale_beta=0.5)
    segment_ids = np.array([[1] * 6 + [2] * 9])
    tables = model.position_tables(cfg, model.positions_from_segments(jnp.asarray(segment_ids)))
    restarted = np.r_[np.arange(6), np.arange(9)][None]
    np.testing.assert_allclose(tables.query_scale_BL, _np_query_scale(restarted, 0.5, 4),
                               rtol=1e-6)
    assert model.position_tables(CFG, jnp.asarray(restarted)).query_scale_BL is None


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
    """Blocks of 2 queries × 2 keys (flash attention, masked blocks skipped) vs all 8 at once,
    with two packed documents: the same softmax over the same keys, so the same value and
    gradient."""
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
    # A block size that does not divide the length: the last block is padded, same values.
    np.testing.assert_allclose(model.forward(CFG.replace(attention_chunk=3), params, tokens),
                               model.forward(CFG, params, tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_chunk=0 must be None"):
        CFG.replace(attention_chunk=0)


def test_attention_impl_is_checked_with_the_fix_named():
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
        CFG.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        CFG.replace(attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_chunk=4 needs attention_impl='xla'"):
        CFG.replace(attention_impl="jax", attention_chunk=4)


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
