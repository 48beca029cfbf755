"""Surgery against independent references: every pruned child is compared with the *parent*
run with the removed parts silenced by hand (a block with zero wo and w_down is the identity
on the residual stream; a zero w_down row silences an FFN neuron; a zero wo row a head), with
a rotated parent (PCA), and with numpy loops over the kept indices (optimizer state).

One tiny model; `jit(model.forward)` compiles once per distinct child config (about ten).
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cascade_jax import model, paths, prune, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.prune.importance import Importance

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=32, norm_eps=1e-6)
TIED = CFG.replace(tie_embeddings=True)
_forward = jax.jit(model.forward, static_argnums=0)
_init = jax.jit(model.init, static_argnums=0)
_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)


def _logits(cfg, params, tokens=_TOKENS):
    return np.asarray(_forward(cfg, params, tokens))


def _randomized_params(cfg, seed=0):
    """Random values everywhere, norm scales included (they init to 1 and could hide bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + 0.3 * rng.normal(size=x.shape)).astype(x.dtype),
                        _init(cfg, jax.random.key(seed)))


def _scores(cfg, seed=0, **overrides):
    """An `Importance` with random scores (distinct, so top-k is unambiguous)."""
    rng = np.random.default_rng(seed)
    n, d = cfg.n_layers, cfg.d_model
    a = rng.normal(size=(d, d))
    arrays = {"layer_block_influence": rng.random(n), "layer_norm_ratio": rng.random(n),
              "neuron": rng.random((n, cfg.d_ff)), "head": rng.random((n, cfg.n_heads)),
              "kv_group": rng.random((n, cfg.n_kv_heads)), "channel": rng.random(d),
              "residual_cov": a @ a.T, "n_tokens": np.float32(100.0)}
    arrays.update(overrides)
    return Importance(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()},
                      model_config=cfg.to_dict())


def _copy(params):
    return jax.tree.map(np.array, params)


@pytest.fixture(scope="module")
def parent():
    params = _randomized_params(CFG)
    return params, _logits(CFG, params)


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nothing_removed_is_bit_identical(parent):
    params, logits = parent
    full = prune.Target(n_layers=4, d_model=16, d_ff=32, n_heads=4, n_kv_heads=2)
    for target in (prune.Target(), full):
        for hidden in ("channel", "pca"):
            out = prune.prune(CFG, params, _scores(CFG), target, hidden_method=hidden,
                              head_method="kv_groups")
            assert out.cfg == CFG
            _assert_same_tree(out.params, params)
    np.testing.assert_array_equal(_logits(out.cfg, out.params), logits)
    # Explicit keep-everything edits run the checked Takes and are still exact copies.
    s = prune.surgery
    for edit, index in ((s.keep_layers, range(4)), (s.keep_neurons, range(32)),
                        (s.keep_query_heads, range(4)), (s.keep_kv_groups, range(2)),
                        (s.keep_channels, range(16))):
        cfg, kept = edit(CFG, params, list(index))
        assert cfg == CFG
        _assert_same_tree(kept, params)


def test_dropping_a_layer_equals_skipping_its_block(parent):
    params, _ = parent
    for i in (0, 2):
        bi = np.full(4, 0.5)
        bi[i] = 0.01                                   # the least influential block
        out = prune.prune(CFG, params, _scores(CFG, layer_block_influence=bi),
                          prune.Target(n_layers=3))
        assert out.record.layers == [j for j in range(4) if j != i]
        skipped = _copy(params)
        skipped["layers"]["attn"]["wo"][i] = 0.0       # block i adds nothing to the residual
        skipped["layers"]["mlp"]["w_down"][i] = 0.0
        np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(CFG, skipped),
                                   rtol=1e-6, atol=1e-6)


def test_dropping_ffn_neurons_equals_zeroing_their_activations(parent):
    params, _ = parent
    scores = _scores(CFG, seed=1)
    out = prune.prune(CFG, params, scores, prune.Target(d_ff=20))
    masked = _copy(params)
    neuron = np.asarray(scores.neuron)
    for n in range(CFG.n_layers):
        kept = sorted(np.argsort(-neuron[n])[:20])
        assert out.record.neurons[n] == kept           # per layer, its own top 20, in order
        masked["layers"]["mlp"]["w_down"][n, np.setdiff1d(np.arange(32), kept)] = 0.0
    np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(CFG, masked),
                               rtol=1e-5, atol=1e-5)


def test_dropping_query_heads_within_groups_equals_masking_them(parent):
    params, _ = parent
    scores = _scores(CFG, seed=2)
    out = prune.prune(CFG, params, scores, prune.Target(n_heads=2),
                      head_method="within_group")
    assert (out.cfg.n_heads, out.cfg.n_kv_heads) == (2, 2)
    masked = _copy(params)
    head = np.asarray(scores.head)
    for n in range(CFG.n_layers):
        kept = [2 * k + int(np.argmax(head[n, 2 * k:2 * k + 2])) for k in range(2)]
        assert out.record.query_heads[n] == kept       # the best head of each KV group
        masked["layers"]["attn"]["wo"][n, np.setdiff1d(np.arange(4), kept)] = 0.0
    np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(CFG, masked),
                               rtol=1e-5, atol=1e-5)


def test_dropping_kv_groups_equals_masking_their_query_heads(parent):
    params, _ = parent
    scores = _scores(CFG, seed=3)
    out = prune.prune(CFG, params, scores, prune.Target(n_kv_heads=1), head_method="kv_groups")
    assert (out.cfg.n_heads, out.cfg.n_kv_heads) == (2, 1)
    masked = _copy(params)
    for n in range(CFG.n_layers):
        group = int(np.argmax(np.asarray(scores.kv_group)[n]))
        assert out.record.kv_heads[n] == [group]
        assert out.record.query_heads[n] == [2 * group, 2 * group + 1]
        masked["layers"]["attn"]["wo"][n, 2 * (1 - group):2 * (1 - group) + 2] = 0.0
    np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(CFG, masked),
                               rtol=1e-5, atol=1e-5)


# Qwen2's q/k/v biases and Qwen3's q/k norms in one parent: both must follow (or stay out of)
# every edit.
QWEN = CFG.replace(qkv_bias=True, qk_norm=True)
_QWEN_EXTRAS = ("bq", "bk", "bv", "q_norm", "k_norm")


@pytest.fixture(scope="module")
def qwen_parent():
    params = _randomized_params(QWEN, seed=11)
    return params, _logits(QWEN, params)


def test_qwen_heads_prune_with_their_biases(qwen_parent):
    """Removed heads equal the parent with them masked; the kept heads keep their own biases
    (a wrong bias row would change the logits) and the shared q/k norm scales stay whole."""
    params, logits = qwen_parent
    surgery = prune.surgery
    for edit, index in ((surgery.keep_query_heads, range(4)), (surgery.keep_kv_groups, range(2)),
                        (surgery.keep_layers, range(4))):
        cfg, kept = edit(QWEN, params, list(index))
        assert cfg == QWEN
        _assert_same_tree(kept, params)
    attn = params["layers"]["attn"]
    within = prune.prune(QWEN, params, _scores(QWEN, seed=2), prune.Target(n_heads=2))
    groups = prune.prune(QWEN, params, _scores(QWEN, seed=3), prune.Target(n_kv_heads=1),
                         head_method="kv_groups")
    for out in (within, groups):
        masked = _copy(params)
        for n in range(CFG.n_layers):
            heads, kv = out.record.query_heads[n], out.record.kv_heads
            masked["layers"]["attn"]["wo"][n, np.setdiff1d(np.arange(4), heads)] = 0.0
            child = {name: np.asarray(out.params["layers"]["attn"][name][n])
                     for name in _QWEN_EXTRAS}
            np.testing.assert_array_equal(child["bq"], attn["bq"][n, heads])
            kv_kept = kv[n] if kv else [0, 1]
            for name in ("bk", "bv"):
                np.testing.assert_array_equal(child[name], attn[name][n, kv_kept])
            for name in ("q_norm", "k_norm"):
                np.testing.assert_array_equal(child[name], attn[name][n])
        np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(QWEN, masked),
                                   rtol=1e-5, atol=1e-5)
    assert np.abs(_logits(QWEN, masked) - logits).max() > 1e-2  # the masking mattered


def test_qwen_hidden_cuts_leave_biases_and_qk_norms_alone(qwen_parent):
    """Biases are added after the projection and q/k norms act per head, so neither a PCA
    rotation (exact at full width) nor a channel cut touches them."""
    params, logits = qwen_parent
    rotation = prune.surgery.pca_rotation(_scores(QWEN).residual_cov, CFG.d_model)
    cfg, rotated = prune.surgery.rotate_hidden(QWEN, params, rotation)
    assert cfg == QWEN
    np.testing.assert_allclose(_logits(cfg, rotated), logits, rtol=1e-4, atol=1e-4)
    _, cut = prune.surgery.keep_channels(QWEN, params, list(range(12)))
    for child in (rotated, cut):
        for name in _QWEN_EXTRAS:
            np.testing.assert_array_equal(child["layers"]["attn"][name],
                                          params["layers"]["attn"][name])


def test_pca_at_full_width_is_the_parent(parent):
    params, logits = parent
    q = prune.surgery.pca_rotation(_scores(CFG).residual_cov, CFG.d_model)
    cfg, rotated = prune.surgery.rotate_hidden(CFG, params, q)
    assert cfg == CFG
    assert not np.allclose(rotated["layers"]["attn"]["wq"], params["layers"]["attn"]["wq"])
    np.testing.assert_allclose(_logits(cfg, rotated), logits, rtol=1e-4, atol=1e-4)
    # Tied embeddings: the final norm folds into a new head, so the child is untied.
    tied = _randomized_params(TIED, seed=5)
    cfg, rotated = prune.surgery.rotate_hidden(TIED, tied, q)
    assert cfg == CFG and "lm_head" in rotated
    np.testing.assert_allclose(_logits(cfg, rotated), _logits(TIED, tied), rtol=1e-4, atol=1e-4)


def _low_rank_parent(seed=0):
    """A parent whose residual stream has a decaying spectrum in a random basis: every matrix
    that writes the residual is followed by M = R diag(0.6^j) Rᵀ."""
    params = _randomized_params(CFG, seed)
    r, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(16, 16)))
    m = (r * 0.6 ** np.arange(16)) @ r.T
    for module, name in (("embed", "embedding"), ("attn", "wo"), ("mlp", "w_down")):
        node = params[module] if module == "embed" else params["layers"][module]
        node[name] = (node[name] @ m).astype(np.float32)
    return params


def test_pca_truncation_error_falls_with_width():
    params = _low_rank_parent()
    rng = np.random.default_rng(1)
    calib = jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32)
    held_out = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    _, acts = jax.jit(model.forward_with_intermediates, static_argnums=(0, 5))(
        CFG, params, calib, None, None, ("block_in", "mlp_in"))
    x = np.concatenate([np.asarray(acts[k]).astype(np.float64).reshape(-1, 16) for k in acts])
    scores = _scores(CFG, residual_cov=x.T @ x / len(x))   # E[x xᵀ] at both norm inputs
    reference = _logits(CFG, params, held_out)

    def error(cfg, child):
        return (np.linalg.norm(_logits(cfg, child, held_out) - reference)
                / np.linalg.norm(reference))

    errors = []
    for width in (4, 8, 12):
        out = prune.prune(CFG, params, scores, prune.Target(d_model=width), hidden_method="pca")
        assert out.cfg.d_model == width and out.record.rotation.shape == (16, width)
        errors.append(error(out.cfg, out.params))
    full_q = prune.surgery.pca_rotation(x.T @ x, 16)
    errors.append(error(*prune.surgery.rotate_hidden(CFG, params, full_q)))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-4 and errors[1] < 0.7, errors   # full width: float32 rounding
    # The principal directions matter: a random orthonormal basis of the same width is worse.
    random_q, _ = np.linalg.qr(rng.normal(size=(16, 8)))
    cfg, child = prune.surgery.rotate_hidden(CFG, params, random_q)
    assert error(cfg, child) > 1.5 * errors[1]


def test_channels_in_permuted_order_are_exact(parent):
    params, logits = parent
    perm = np.random.default_rng(0).permutation(16)
    cfg, child = prune.surgery.keep_channels(CFG, params, perm)
    assert cfg == CFG
    np.testing.assert_array_equal(child["embed"]["embedding"],
                                  params["embed"]["embedding"][:, perm])
    # Exact math; float32 sums over D in another order round differently (logits ~ 1).
    np.testing.assert_allclose(_logits(cfg, child), logits, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_removing_silent_channels_is_exact(cfg):
    """Channels that are zero in every tensor carry nothing; removing them must change nothing,
    which needs the RMS rescale (the child's norm would otherwise divide by 12, not 16)."""
    params = _randomized_params(cfg, seed=7)
    silent = np.array([1, 6, 7, 13])
    for path, axes in prune.surgery.layout(cfg).items():
        node = params
        *parents, leaf = path.split("/")
        for key in parents:
            node = node[key]
        index = [slice(None)] * node[leaf].ndim
        index[axes.index("embed")] = silent
        node[leaf][tuple(index)] = 0.0
    channel = np.ones(16)
    channel[silent] = 0.0
    out = prune.prune(cfg, params, _scores(cfg, channel=channel), prune.Target(d_model=12))
    assert out.record.channels == [c for c in range(16) if c not in silent]
    # Float32 rounding of the rescale (logits ~ 4); without it the error is ~3.
    np.testing.assert_allclose(_logits(out.cfg, out.params), _logits(cfg, params),
                               rtol=1e-5, atol=5e-5)


def _untied_with_head_equal_to_embedding(seed):
    """An untied parent whose head is Eᵀ and whose final norm scale is uniform: the same
    function as a tied model, so tying it (and a PCA cut of it) has an exact reference."""
    params = _randomized_params(CFG, seed)
    params["lm_head"]["kernel"] = np.array(params["embed"]["embedding"].T)
    params["final_norm"]["scale"] = np.full(16, 1.3, np.float32)
    return params


def test_untying_is_exact_and_tying_a_head_equal_to_the_embedding_is_too():
    tied = _randomized_params(TIED, seed=3)
    untied = prune.prune(TIED, tied, _scores(TIED), prune.Target(d_ff=24, tie_embeddings=False))
    assert not untied.cfg.tie_embeddings and untied.record.untied_embeddings
    np.testing.assert_array_equal(untied.params["lm_head"]["kernel"],
                                  tied["embed"]["embedding"].T)
    same_shape_tied = prune.prune(TIED, tied, _scores(TIED), prune.Target(d_ff=24))
    np.testing.assert_allclose(_logits(untied.cfg, untied.params),
                               _logits(same_shape_tied.cfg, same_shape_tied.params),
                               rtol=1e-6, atol=1e-6)

    params = _untied_with_head_equal_to_embedding(seed=4)
    silent = np.array([2, 9])  # zero channels, so the channel cut below is exact as well
    params["embed"]["embedding"][:, silent] = 0.0
    params["lm_head"]["kernel"][silent] = 0.0
    for node in (params["layers"]["attn"]["wo"], params["layers"]["mlp"]["w_down"]):
        node[..., silent] = 0.0
    reference = _logits(CFG, params)
    channel = np.ones(16)
    channel[silent] = 0.0
    for target in (prune.Target(tie_embeddings=True),
                   prune.Target(d_model=14, tie_embeddings=True)):
        out = prune.prune(CFG, params, _scores(CFG, channel=channel), target)
        assert out.cfg.tie_embeddings and "lm_head" not in out.params
        assert out.record.tied_embeddings
        assert out.cfg.num_params() == CFG.replace(d_model=out.cfg.d_model).num_params() - (
            CFG.vocab_size * out.cfg.d_model)
        np.testing.assert_allclose(_logits(out.cfg, out.params), reference,
                                   rtol=1e-5, atol=5e-5)


def test_tying_after_a_pca_cut_restores_the_final_norm_in_the_rotated_basis():
    """With a uniform final norm scale the diagonal rotated scale is exact, so the tied PCA
    child computes what the untied PCA child computes (whose head holds the folded scale)."""
    params = _untied_with_head_equal_to_embedding(seed=6)
    scores = _scores(CFG)
    untied = prune.prune(CFG, params, scores, prune.Target(d_model=10), hidden_method="pca")
    tied = prune.prune(CFG, params, scores, prune.Target(d_model=10, tie_embeddings=True),
                       hidden_method="pca")
    assert not untied.cfg.tie_embeddings and tied.cfg.tie_embeddings
    assert "lm_head" not in tied.params
    np.testing.assert_allclose(_logits(tied.cfg, tied.params),
                               _logits(untied.cfg, untied.params), rtol=1e-4, atol=1e-4)
    # A non-uniform scale comes back as its diagonal in the rotated basis.
    params["final_norm"]["scale"] = np.linspace(0.5, 2.0, 16).astype(np.float32)
    tied = prune.prune(CFG, params, scores, prune.Target(d_model=10, tie_embeddings=True),
                       hidden_method="pca")
    q, c2 = tied.record.rotation.astype(np.float64), 10 / 16
    np.testing.assert_allclose(tied.params["final_norm"]["scale"],
                               (q * q).T @ np.linspace(0.5, 2.0, 16) / c2, rtol=1e-5)


def _expected_slice(path, x, record):
    """numpy loop reference: the parent entries a pruned tensor must hold, from the record."""
    layers, heads, neurons, channels = (record.layers, record.query_heads, record.neurons,
                                        record.channels)
    if path == ("embed", "embedding"):
        return x[:, channels]
    if path == ("final_norm", "scale"):
        return x[channels]
    if path == ("lm_head", "kernel"):
        return x[channels]
    rows = []
    for i, n in enumerate(layers):
        w = x[n]
        if path[-1] in ("scale",):
            w = w[channels]
        elif path[-1] == "wq":
            w = w[channels][:, heads[i]]
        elif path[-1] in ("wk", "wv"):
            w = w[channels]
        elif path[-1] == "wo":
            w = w[heads[i]][..., channels]
        elif path[-1] in ("w_gate", "w_up"):
            w = w[channels][:, neurons[i]]
        elif path[-1] == "w_down":
            w = w[neurons[i]][:, channels]
        rows.append(w)
    return np.stack(rows)


def test_optimizer_state_is_pruned_in_lockstep(parent):
    params, _ = parent
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-3, weight_decay=0.1,
                                        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    rng = np.random.default_rng(9)
    state = optax.tree_utils.tree_map_params(                          # random mu, nu
        optimizer, lambda p: rng.random(p.shape, np.float32), optimizer.init(params))
    target = prune.Target(n_layers=3, d_model=12, d_ff=20, n_heads=2)
    out = prune.prune(CFG, params, _scores(CFG, seed=4), target, opt_state=state,
                      optimizer=optimizer)
    adam = out.opt_state[1][0]
    parent_adam = state[1][0]
    for moment in ("mu", "nu"):
        child, original = getattr(adam, moment), getattr(parent_adam, moment)
        assert jax.tree.map(np.shape, child) == jax.tree.map(np.shape, out.params)
        for (path, got), want in zip(
                jax.tree_util.tree_flatten_with_path(child)[0], jax.tree.leaves(original),
                strict=True):
            keys = tuple(k.key for k in path)
            np.testing.assert_array_equal(np.asarray(got),
                                          _expected_slice(keys, np.asarray(want), out.record))
    assert int(adam.count) == int(parent_adam.count)
    # Without the optimizer, param copies are found by structure: the same result.
    again = prune.prune(CFG, params, _scores(CFG, seed=4), target, opt_state=state)
    _assert_same_tree(again.opt_state, out.opt_state)


def test_sharded_params_prune_like_single_device(parent):
    params, _ = parent
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sharding.shard_like(params, sharding.param_shardings(CFG, mesh))
    target = prune.Target(n_layers=3, d_ff=16, d_model=12)
    want = prune.prune(CFG, params, _scores(CFG), target)
    got = prune.prune(CFG, sharded, _scores(CFG), target)
    _assert_same_tree(got.params, want.params)


def test_depth_methods_pick_the_documented_layers(parent):
    bi = np.array([0.9, 0.1, 0.2, 0.8])
    ratio = np.array([0.3, 0.9, 0.1, 0.5])
    scores = _scores(CFG, layer_block_influence=bi, layer_norm_ratio=ratio)
    assert prune.surgery.select_layers(scores, 2, "block_influence").tolist() == [0, 3]
    assert prune.surgery.select_layers(scores, 2, "norm_ratio").tolist() == [1, 3]
    # Contiguous: the run of two blocks with the least summed influence is [1, 2].
    assert prune.surgery.select_layers(scores, 2, "contiguous").tolist() == [0, 3]
    assert prune.surgery.select_layers(scores, 3, "contiguous").tolist() == [0, 2, 3]
    out = prune.prune(CFG, parent[0], None, prune.Target(),
                      depth_method=[0, 2])
    assert out.cfg.n_layers == 2 and out.record.layers == [0, 2]


def test_record_is_json_and_keeps_the_rotation_as_an_array(parent):
    params, _ = parent
    out = prune.prune(CFG, params, _scores(CFG), prune.Target(n_layers=3, d_ff=16, d_model=8),
                      hidden_method="pca", depth_method="norm_ratio")
    record = json.loads(json.dumps(out.record.to_dict()))
    assert record["child_config"] == out.cfg.to_dict()
    assert record["parent_config"] == CFG.to_dict()
    assert record["rotation"]["shape"] == [16, 8]
    assert record["methods"]["depth_method"] == "norm_ratio"
    assert record["residual_scale"] == pytest.approx(np.sqrt(8 / 16))
    q = out.record.arrays()["rotation"]
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)
    assert out.record.untied_embeddings is False
    # A tied parent's PCA child gets its own head (the folded final norm), and says so.
    tied = prune.prune(TIED, _randomized_params(TIED), _scores(TIED), prune.Target(d_model=8),
                       hidden_method="pca")
    assert not tied.cfg.tie_embeddings and tied.record.untied_embeddings
    assert tied.params["lm_head"]["kernel"].shape == (8, 64)


def test_hidden_map_takes_the_parent_embedding_to_the_childs(parent):
    """`record.hidden_map()` is the basis change the surgery applied to every residual writer,
    so a vector written into the parent's residual (an image embedding) maps with it; two
    stages compose by matrix product."""
    params, _ = parent
    embedding = np.asarray(params["embed"]["embedding"], np.float64)
    first = None
    for hidden in ("channel", "pca"):
        out = prune.prune(CFG, params, _scores(CFG), prune.Target(n_layers=3, d_model=12),
                          hidden_method=hidden)
        m = out.record.hidden_map()
        assert m.shape == (16, 12) and m.dtype == np.float32
        np.testing.assert_allclose(embedding @ m, out.params["embed"]["embedding"],
                                   rtol=1e-5, atol=1e-6)
        if hidden == "channel":
            assert np.count_nonzero(m) == 12 and first is None
            first = out
    assert np.array_equal(prune.prune(CFG, params, None, prune.Target()).record.hidden_map(),
                          np.eye(16, dtype=np.float32))
    second = prune.prune(first.cfg, first.params, _scores(first.cfg), prune.Target(d_model=8),
                         hidden_method="pca")
    np.testing.assert_allclose(embedding @ (first.record.hidden_map()
                                            @ second.record.hidden_map()),
                               second.params["embed"]["embedding"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        prune.surgery.hidden_map(16, channels=[0], rotation=np.eye(16))


def test_take_works_on_public_paths(parent):
    """`take` on `paths.flatten(params)` with `layout(cfg)`, nothing private: keeping FFN
    neurons by hand equals `keep_neurons`, and the tensors it touches are checked."""
    params, _ = parent
    s = prune.surgery
    flat = paths.flatten(params)
    kept = s.take(flat, s.layout(CFG), s.Take("mlp", np.arange(0, 32, 2), count=3))
    assert kept["layers/mlp/w_down"].shape == (4, 16, 16)          # [N, F', D]
    assert kept["embed/embedding"] is flat["embed/embedding"]      # no 'mlp' axis: untouched
    _assert_same_tree(paths.unflatten(kept), s.keep_neurons(CFG, params, range(0, 32, 2))[1])
    with pytest.raises(s.SurgeryError, match="touched 3 tensors"):
        s.take(flat, s.layout(CFG), s.Take("mlp", np.arange(4), count=2))


def test_paths_flatten_round_trips_and_agrees_with_jax_key_paths(parent):
    params, _ = parent
    flat = paths.flatten(params)
    by_jax = {paths.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat.keys() == by_jax.keys() == prune.surgery.layout(CFG).keys()
    assert all(flat[p] is by_jax[p] for p in flat)
    assert "layers/attn/wq" in flat
    _assert_same_tree(paths.unflatten(flat), params)
    key_path = (jax.tree_util.GetAttrKey("opt_state"), jax.tree_util.SequenceKey(1),
                jax.tree_util.FlattenedIndexKey(0), jax.tree_util.DictKey("mu"))
    assert paths.path_str(key_path) == "opt_state/1/0/mu"


def test_paths_tree_get_names_the_closest_path(parent):
    params, _ = parent
    assert paths.tree_get(params, "layers/attn/wq") is params["layers"]["attn"]["wq"]
    assert paths.tree_get(params, "layers/mlp") is params["layers"]["mlp"]
    with pytest.raises(KeyError, match="no path 'layers/atn/wq' in the tree; did you mean "
                                       "'layers/attn/wq'"):
        paths.tree_get(params, "layers/atn/wq")
    with pytest.raises(KeyError, match="leaves include"):
        paths.tree_get(params, "xyz")
    with pytest.raises(ValueError, match="both a leaf and a subtree"):
        paths.unflatten({"a": 1, "a/b": 2})


def test_edits_check_the_tensors_they_touch(parent):
    params, _ = parent
    with pytest.raises(ValueError, match="listed group by group"):
        prune.surgery.keep_query_heads(CFG, params, [0, 1])        # two heads from KV group 0
    with pytest.raises(ValueError, match="repeated"):
        prune.surgery.keep_neurons(CFG, params, [3, 3])


@pytest.mark.parametrize(("target", "kwargs", "match"), [
    (prune.Target(n_layers=5), {}, "exceeds the parent's n_layers=4"),
    (prune.Target(n_heads=3), {}, "n_heads=3 is not a multiple of n_kv_heads=2"),
    (prune.Target(n_heads=3), {"head_method": "kv_groups"}, "whole KV groups"),
    (prune.Target(n_kv_heads=1), {}, "use head_method='kv_groups'"),
    (prune.Target(d_model=8), {"hidden_method": None}, "hidden_method=None cannot prune"),
    (prune.Target(d_model=8), {"hidden_method": "pca", "opt_state": ()}, "cannot carry"),
    (prune.Target(), {"depth_method": "loss"}, "depth_method='loss' is unknown"),
    (prune.Target(n_layers=3), {"depth_method": [0, 1]}, "make them agree"),
    (prune.Target(d_ff=0), {}, "positive integer"),
    (prune.Target(tie_embeddings="yes"), {}, "tie_embeddings='yes' must be True, False"),
    (prune.Target(tie_embeddings=True), {"opt_state": ()}, "tying changes"),
])
def test_bad_targets_fail_before_touching_params(target, kwargs, match):
    # params=None: any work on the params would fail differently, so these checks come first.
    with pytest.raises(ValueError, match=match):
        prune.prune(CFG, None, _scores(CFG), target, **kwargs)


def test_scores_of_another_model_shape_are_refused():
    other = _scores(CFG.replace(d_ff=64))
    with pytest.raises(ValueError, match="d_ff: scores 64 vs model 32"):
        prune.prune(CFG, None, other, prune.Target(d_ff=16))
    with pytest.raises(ValueError, match="needs importance scores"):
        prune.prune(CFG, None, None, prune.Target(d_ff=16))


def test_scores_from_the_estimator_drive_a_full_prune(parent):
    """The real estimator's output is accepted as is (shapes, config check) by every method."""
    params, _ = parent
    calib = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    scores = prune.estimate_importance(CFG, params, [calib], progress=False)
    target = prune.Target(n_layers=3, d_model=8, d_ff=16, n_heads=2)
    for hidden in ("channel", "pca"):
        out = prune.prune(CFG, params, scores, target, hidden_method=hidden,
                          depth_method="norm_ratio")
        assert out.cfg == CFG.replace(n_layers=3, d_model=8, d_ff=16, n_heads=2)
        assert np.isfinite(_logits(out.cfg, out.params)).all()
