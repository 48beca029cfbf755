"""Importance scores against a float64 numpy reference computed from the model's own sown
activations (`model.forward_with_intermediates`), planted structure, streaming, sharding,
the file round trip and the layer plot.

One tiny model, three padded batches of [4, 10]; each (aggregation, mesh) compiles once.
"""

import json
import os

import jax
import numpy as np
import pytest

from cascade_jax import model, plots, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.prune import importance
from cascade_jax.prune.importance import Importance, estimate_importance, params_fingerprint

# vocab/heads/d_ff divisible by tensor=2, d_model by fsdp=2; a window and tied embeddings so
# the scan path's mask and embedding are exercised too.
CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=24, sliding_window=6, tie_embeddings=True, norm_eps=1e-6)
B, L = 4, 10
ARRAYS = ("layer_block_influence", "layer_norm_ratio", "neuron", "head", "kv_group", "channel",
          "residual_cov", "n_tokens")


def _randomized_params(cfg, seed=0):
    """Random values everywhere, norm scales included (they init to 1 and could hide bugs)."""
    params = model.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [np.asarray(leaf + 0.3 * jax.random.normal(k, leaf.shape))
             for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _batch(rng, layouts):
    """A [B, L] batch; each row's layout is a list of segment lengths, the rest padding."""
    tokens = rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32)
    segment_ids = np.zeros((B, L), np.int32)
    for row, lengths in enumerate(layouts):
        start = 0
        for seg, length in enumerate(lengths, start=1):
            segment_ids[row, start:start + length] = seg
            start += length
    return importance.host_batch({"tokens": tokens, "segment_ids": segment_ids})


def _batches():
    rng = np.random.default_rng(0)
    return [
        _batch(rng, [[10], [4, 3], [], [7]]),     # packed row, padding tail, all-padding row
        _batch(rng, [[2, 8], [10], [1], [5, 5]]),  # a one-token sequence
        _batch(rng, [[9], [3], [10], [6, 2, 2]]),
    ]


@pytest.fixture(scope="module")
def params():
    return _randomized_params(CFG)


@pytest.fixture(scope="module")
def batches():
    return _batches()


@pytest.fixture(scope="module")
def activations(params, batches):
    """float64 copies of the model's own sown activations, per batch, with the valid mask."""
    fwd = jax.jit(lambda p, b: model.forward_with_intermediates(
        CFG, p, b["tokens"], b["segment_ids"], b["positions"])[1])
    return [({k: np.asarray(v, np.float64) for k, v in fwd(params, b).items()},
             b["segment_ids"] > 0) for b in batches]


@pytest.fixture(scope="module")
def default_scores(params, batches):
    return estimate_importance(CFG, params, batches, progress=False)


# ------------------------------------------------------------------ numpy float64 reference


def _reduce(values, how, axis=0):
    if how == "l2":
        return np.sqrt(np.sum(values ** 2, axis=axis))
    if how == "mean":
        return np.mean(values, axis=axis)
    return np.var(values, axis=axis)


def _reference(activations, batch_agg, seq_agg, neuron_method):
    """Row by row in float64: a sequence is a batch row's valid tokens; all-padding rows skip."""
    cos, ratio, act_abs, cov_rows = [], [], [], []
    seq = {"neuron": [], "head": [], "channel": []}
    for acts, valid in activations:
        for b in range(valid.shape[0]):
            v = valid[b]
            if not v.any():
                continue
            x_in, x_out = acts["block_in"][:, b, v], acts["block_out"][:, b, v]  # [N, T, D]
            n_in, n_out = np.linalg.norm(x_in, axis=-1), np.linalg.norm(x_out, axis=-1)
            cos.append(np.sum(x_in * x_out, -1) / (n_in * n_out))
            ratio.append(n_out / n_in)
            mlp = np.abs(acts["mlp_act"][:, b, v])                               # [N, T, F]
            act_abs.append(mlp)
            cov_rows += [acts["block_in"][:, b, v].reshape(-1, CFG.d_model),
                         acts["mlp_in"][:, b, v].reshape(-1, CFG.d_model)]
            seq["neuron"].append(_reduce(mlp, seq_agg, axis=1))
            heads = np.linalg.norm(acts["attn_heads"][:, b, v], axis=-1)        # [N, T, H]
            seq["head"].append(_reduce(heads, seq_agg, axis=1))
            seq["channel"].append(np.stack([
                _reduce(np.abs(acts[name][:, b, v]), seq_agg, axis=1)
                for name in ("attn_norm_out", "mlp_norm_out")]))                # [2, N, D]
    agg = {name: _reduce(np.stack(values), batch_agg) for name, values in seq.items()}
    cos, ratio = np.concatenate(cos, 1), np.concatenate(ratio, 1)
    n_tokens = cos.shape[1]
    neuron = (np.concatenate(act_abs, 1).mean(1) if neuron_method == "ministral"
              else agg["neuron"])
    x = np.concatenate(cov_rows)
    return {
        "layer_block_influence": 1 - cos.mean(1), "layer_norm_ratio": ratio.mean(1),
        "neuron": neuron, "head": agg["head"],
        "kv_group": agg["head"].reshape(CFG.n_layers, CFG.n_kv_heads, -1).sum(-1),
        "channel": agg["channel"].sum((0, 1)), "residual_cov": x.T @ x / len(x),
        "n_tokens": n_tokens,
    }


def _assert_scores_close(ours, ref, rtol=2e-5, scale_atol=2e-6):
    """Each array to `rtol`, plus `scale_atol` × its largest entry (float32 rounding of sums
    that cancel, e.g. off-diagonal covariance entries, is relative to the array's scale)."""
    for name in ARRAYS:
        got = getattr(ours, name) if isinstance(ours, Importance) else ours[name]
        want = np.asarray(getattr(ref, name) if isinstance(ref, Importance) else ref[name],
                          np.float64)
        assert np.asarray(got).dtype == np.float32, name
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                                   atol=scale_atol * np.max(np.abs(want)), err_msg=name)


@pytest.mark.parametrize("aggregation,neuron_method", [
    ("l2_mean", "minitron"),
    ("mean_mean", "ministral"),
    ("var_var", "minitron"),
    (("l2", "l2"), "minitron"),
])
def test_every_score_matches_float64_reference(params, batches, activations, default_scores,
                                               aggregation, neuron_method):
    if aggregation == "l2_mean":
        scores = default_scores
    else:
        scores = estimate_importance(CFG, params, batches, aggregation=aggregation,
                                     neuron_method=neuron_method, progress=False)
    pair = importance.AGGREGATIONS.get(aggregation, aggregation)
    ref = _reference(activations, *pair, neuron_method)
    # padding is not counted: 24 + 31 + 32 non-padding tokens, 11 non-empty rows
    assert ref["n_tokens"] == 87 == sum(np.count_nonzero(b["segment_ids"]) for b in batches)
    assert scores.method == {"aggregation": list(pair), "neuron_method": neuron_method,
                             "n_sequences": 11, "n_batches": 3}
    _assert_scores_close(scores, ref)


def test_planted_structure_is_found(params, batches):
    planted = jax.tree.map(np.array, params)
    lay = planted["layers"]
    lay["attn"]["wo"][1] = 0.0          # layer 1 becomes the identity
    lay["mlp"]["w_down"][1] = 0.0
    lay["mlp"]["w_gate"][0, :, 5] = 0.0  # SiLU(0) = 0: neuron 5 of layer 0 is dead
    lay["mlp"]["w_up"][2, :, 7] = 0.0    # neuron 7 of layer 2 is dead
    lay["attn"]["wv"][0, :, 1] = 0.0     # KV head 1 of layer 0: query heads 2, 3 output 0
    lay["attn_norm"]["scale"][:, 9] = 0.0  # channel 9 is zero after every norm
    lay["mlp_norm"]["scale"][:, 9] = 0.0
    for method in ("minitron", "ministral"):
        scores = estimate_importance(CFG, planted, batches, neuron_method=method,
                                     progress=False)
        influence = np.asarray(scores.layer_block_influence)
        assert np.argmin(influence) == 1 and abs(influence[1]) < 1e-6
        assert np.min(np.delete(influence, 1)) > 1e-2
        np.testing.assert_allclose(scores.layer_norm_ratio[1], 1.0, rtol=1e-6)
        neuron = np.asarray(scores.neuron)
        assert neuron[0, 5] == 0 and neuron[2, 7] == 0
        assert np.count_nonzero(neuron == 0) == 2
    head = np.asarray(scores.head)
    np.testing.assert_array_equal(head[0, 2:], 0.0)
    assert np.all(np.delete(head.ravel(), [2, 3]) > 0)
    assert scores.kv_group[0, 1] == 0 and scores.kv_group[0, 0] > 0
    channel = np.asarray(scores.channel)
    assert channel[9] == 0 and np.all(np.delete(channel, 9) > 0)


@pytest.mark.parametrize("aggregation", ["l2_mean", "var_var"])
def test_three_batches_equal_one_pass_over_their_concatenation(params, batches, default_scores,
                                                                 aggregation):
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    one = estimate_importance(CFG, params, [whole], aggregation=aggregation, progress=False)
    streamed = default_scores if aggregation == "l2_mean" else estimate_importance(
        CFG, params, batches, aggregation=aggregation, progress=False)
    _assert_scores_close(streamed, one, rtol=1e-5)


def test_sharded_scores_equal_single_device(params, batches, default_scores):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = sharding.shard_like(params, sharding.param_shardings(CFG, mesh))
    wq = sharded_params["layers"]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.shape[2] == 2
    sharded = estimate_importance(CFG, sharded_params, batches, mesh=mesh, progress=False)
    # same math, different reduction order across devices: float32 rounding only
    _assert_scores_close(sharded, default_scores, rtol=1e-5)
    # but the params' fingerprint is exact: the same on any layout
    assert sharded.params_fingerprint == default_scores.params_fingerprint


def test_params_fingerprint_tells_values_apart_and_ignores_layout(params):
    fingerprint = params_fingerprint(params)
    assert len(fingerprint) == 16 and fingerprint == params_fingerprint(params)
    assert params_fingerprint(jax.tree.map(np.asarray, params)) == fingerprint  # host arrays
    other = _randomized_params(CFG, seed=1)
    assert params_fingerprint(other) != fingerprint  # same shapes, other values
    nudged = jax.tree.map(np.array, params)  # a copy
    nudged["final_norm"]["scale"][-1] += 1e-3
    assert params_fingerprint(nudged) != fingerprint  # one sampled element moved


def test_bfloat16_compute_accumulates_float32_close_to_float32(params, batches,
                                                              default_scores):
    low = estimate_importance(CFG.replace(dtype="bfloat16"), params, batches, progress=False)
    assert low.n_tokens == default_scores.n_tokens == 87  # float32 counts, exact
    _assert_scores_close(low, default_scores, rtol=5e-2, scale_atol=2e-2)


def test_plain_token_arrays_and_max_batches(params):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, CFG.vocab_size, (B, L)) for _ in range(3)]

    def endless():
        while True:
            yield from arrays

    stream = endless()
    from_arrays = estimate_importance(CFG, params, stream, max_batches=2, progress=False)
    assert next(stream) is arrays[2]  # a third batch was not pulled and dropped
    as_dicts = [{"tokens": a, "segment_ids": np.ones((B, L), np.int32),
                 "positions": np.tile(np.arange(L), (B, 1))} for a in arrays[:2]]
    _assert_scores_close(from_arrays, estimate_importance(CFG, params, as_dicts,
                                                          progress=False), rtol=0, scale_atol=0)
    assert from_arrays.n_tokens == 2 * B * L and from_arrays.method["n_batches"] == 2


def test_bad_arguments_are_named(params, batches):
    with pytest.raises(ValueError, match="aggregation='l2_max' is unknown"):
        estimate_importance(CFG, params, batches, aggregation="l2_max")
    with pytest.raises(ValueError, match=r"aggregation=\('l2', 'max'\) must be"):
        estimate_importance(CFG, params, batches, aggregation=("l2", "max"))
    with pytest.raises(ValueError, match="neuron_method='wanda' is unknown"):
        estimate_importance(CFG, params, batches, neuron_method="wanda")
    with pytest.raises(ValueError, match="no calibration tokens"):
        estimate_importance(CFG, params, [], progress=False)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        estimate_importance(CFG, params, [np.zeros(5, np.int32)], progress=False)


def test_save_load_round_trip_and_shape_check(default_scores, tmp_path):
    path = tmp_path / "scores" / "importance.npz"
    default_scores.save(path)
    assert os.listdir(path.parent) == ["importance.npz"]  # the temp file was renamed away
    loaded = Importance.load(path, CFG)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(default_scores, name))
    assert loaded.model_config == CFG.to_dict() and loaded.method == default_scores.method
    default_scores.save(path)  # overwriting is allowed (same scores, new file)

    loaded.check_matches(CFG.replace(dtype="bfloat16", remat=True))  # numerics don't matter
    with pytest.raises(ValueError, match=r"\(n_layers: scores 3 vs model 2; d_ff: scores 24 vs "
                                         r"model 32\). Re-run prune.estimate_importance"):
        loaded.check_matches(CFG.replace(d_ff=32, n_layers=2))
    with pytest.raises(ValueError, match="n_heads: scores 4 vs model 8"):
        Importance.load(path, CFG.replace(n_heads=8, n_kv_heads=2))

    assert loaded.params_fingerprint == default_scores.params_fingerprint is not None
    bad = tmp_path / "not_scores.npz"
    np.savez(bad, neuron=np.zeros(3))
    with pytest.raises(ValueError, match=r"not_scores\.npz lacks the arrays \['__meta__'"):
        Importance.load(bad)
    with np.load(path) as data:  # arrays that contradict their own config are caught
        arrays = {k: data[k] for k in data.files}
    arrays["neuron"] = arrays["neuron"][:, :5]
    np.savez(bad, **arrays)
    meta = json.loads(str(arrays["__meta__"]))
    assert meta["model_config"]["d_ff"] == 24
    with pytest.raises(ValueError, match=r"neuron \(3, 5\) != \(3, 24\)"):
        Importance.load(bad)


def test_layer_plot_renders_the_scores(default_scores, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.plot_layer_importance(default_scores)
    influence_ax, ratio_ax = fig.axes
    np.testing.assert_array_equal(influence_ax.lines[0].get_ydata(),
                                  default_scores.layer_block_influence)
    np.testing.assert_array_equal(ratio_ax.lines[0].get_ydata(),
                                  default_scores.layer_norm_ratio)
    np.testing.assert_array_equal(influence_ax.lines[0].get_xdata(), np.arange(CFG.n_layers))
    out = tmp_path / "layers.png"
    fig.savefig(out)
    assert out.stat().st_size > 10_000

    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    assert plots.plot_layer_importance(default_scores, ax=ax) is ax.figure
    plt.close("all")
