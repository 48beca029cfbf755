"""The context-extension stage (`stages.<name>.context`): its config surface, the child it makes
(the parent with a new context and RoPE, nothing else), the loss by position bucket against a
numpy reference, and a tiny cascade that extends a root from 16 to 64 positions."""

import dataclasses
import itertools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cascade_jax import cascade, checkpoint, evaluate, model, runconfig, sharding, steps
from cascade_jax.config import ModelConfig, YarnRopeScaling
from experiments import plan

PARENT = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, d_ff=64, max_seq_len=16, tie_embeddings=True)
YARN = dict(kind="yarn", factor=4.0, original_max_position_embeddings=16)


def _stage(objective: str = "ce", **fields) -> dict:
    stage = dict(parent="root", teacher="root", init="parent", objective=objective, steps=2,
                 optim=dict(lr=3e-3, warmup_steps=1), calib_batches=1)
    if objective == "kd":
        stage["kd"] = dict(kind="forward_kl", chunk_size=16)
    stage.update(fields)
    return stage


def _cascade(workdir: str, corpus_dir: str, stages: dict, order: tuple[str, ...],
             root: ModelConfig = PARENT) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0,
        root=dict(kind="scratch", path="", model=root.to_dict(), steps=2,
                  optim=dict(lr=3e-3, warmup_steps=1)),
        data=dict(source=f"text:{corpus_dir}/*.py", tokenizer=f"{corpus_dir}/tokenizer.json",
                  seq_len=16, batch_size=8, cache_dir="", validation_percent=25),
        mesh=dict(data=-1, fsdp=1, tensor=1), stage_order=order, stages=stages,
        log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0))


# --------------------------------------------------------------------- the config surface


def test_a_context_block_parses_and_fills_its_defaults():
    stage = runconfig.stage_config("long", _stage(context=dict(max_seq_len=64,
                                                               rope_scaling=YARN)))
    ctx = stage.context
    assert ctx.seq_len == 64 and ctx.batch_size is None and ctx.key == "config.stages.long.context"
    assert ctx.rope_scaling == YarnRopeScaling(4.0, 16)
    assert ctx.data(runconfig.DataConfig(seq_len=16, batch_size=8)).seq_len == 64
    assert ctx.bucket_edges(PARENT, ctx.child_config(PARENT)) == (0, 16, 32, 64)
    assert runconfig.doubling_edges(128, 1000) == (0, 128, 256, 512, 1000)
    assert runconfig.stage_config("s", _stage()).context is None
    assert runconfig.stage_config("s", _stage(context={})).context is None
    assert json.loads(json.dumps(ctx.to_dict()))["rope_scaling"]["rope_type"] == "yarn"


@pytest.mark.parametrize("context, match", [
    (dict(seq_len=64), r"context\.max_seq_len is required"),
    (dict(max_seq_len=0), r"context\.max_seq_len=0 must be a positive integer"),
    (dict(max_seq_len=64, seq_len=128), r"context\.seq_len=128 must be .* \[2, 64\]"),
    (dict(max_seq_len=64, seq_len=1), r"context\.seq_len=1 must be"),
    (dict(max_seq_len=64, batch_size=0), r"context\.batch_size=0 must be a positive integer"),
    (dict(max_seq_len=64, rope_theta=-1.0), r"context\.rope_theta=-1\.0 must be"),
    (dict(max_seq_len=64, rope_scaling=dict(factor=4.0)), r"context\.rope_scaling=.* needs one"),
    (dict(max_seq_len=64, rope_scaling=dict(kind="ntk", factor=4.0)),
     r"context\.rope_scaling: .*rope_type='ntk'"),
    (dict(max_seq_len=64, rope_scaling=dict(kind="yarn", factor=4.0)),
     r"context\.rope_scaling: .*missing \['original_max_position_embeddings'\]"),
    (dict(max_seq_len=64, rope_scaling=dict(kind="none", factor=2.0)),
     r"context\.rope_scaling: kind='none' takes no other fields"),
    (dict(max_seq_len=64, query_scale_beta="big"), r"context\.query_scale_beta='big'"),
    (dict(max_seq_len=64, attention_chunk=24), r"context\.attention_chunk=24 does not divide"),
    (dict(max_seq_len=64, buckets=(0, 32, 16, 64)), r"context\.buckets=.* increasing"),
    (dict(max_seq_len=64, buckets=(0, 32)), r"context\.buckets=.* to the stage's seq_len=64"),
    (dict(max_seq_len=64, max_len=9), r"context\.max_len'\]; known fields"),
])
def test_bad_context_values_are_refused_by_key(context, match):
    """Every message names the key as typed on the command line."""
    with pytest.raises(ValueError, match=r"config\.stages\.s\." + match):
        runconfig.stage_config("s", _stage(context=context))


def test_context_needs_init_parent_and_the_child_must_make_sense():
    with pytest.raises(ValueError, match=r"config\.stages\.s\.context .* needs "
                                         r"config\.stages\.s\.init='parent' \(got 'pruned'\)"):
        runconfig.stage_config("s", _stage(init="pruned", context=dict(max_seq_len=64)))
    short = runconfig.stage_config("s", _stage(context=dict(max_seq_len=8)))
    with pytest.raises(ValueError, match=r"context\.max_seq_len=8 is below the parent's "
                                         r"max_seq_len=16"):
        cascade.child_model(PARENT, short)
    plain_with_scale = runconfig.stage_config("s", _stage(context=dict(
        max_seq_len=64, query_scale_beta=0.1)))
    with pytest.raises(ValueError, match=r"config\.stages\.s\.context: query_scale_beta=0\.1 "
                                         r"needs rope_scaling"):
        cascade.child_model(PARENT, plain_with_scale)


def test_a_teacher_shorter_than_the_rows_is_refused_when_the_objective_learns_from_it(tmp_path):
    stages = {"long": _stage("kd", context=dict(max_seq_len=64, rope_scaling=YARN))}
    config = runconfig.cascade_config(_cascade(str(tmp_path), "/nowhere", stages, ("long",)))
    with pytest.raises(ValueError, match=r"config\.stages\.long\.context\.seq_len=64 exceeds the "
                                         r"teacher 'root''s max_seq_len=16.*objective='ce'"):
        cascade.plan_models(config)
    stages["long"]["context"]["seq_len"] = 16  # rows the teacher takes: fine
    cascade.plan_models(runconfig.cascade_config(_cascade(str(tmp_path), "/nowhere", stages,
                                                          ("long",))))


# ------------------------------------------------------------------------ the child config


def test_the_child_is_the_parent_with_only_its_rope_and_context_changed(tmp_path):
    context = dict(max_seq_len=64, rope_theta=5e5, rope_scaling=YARN, query_scale_beta=0.1,
                   seq_len=32, batch_size=4, attention_chunk=16)
    stages = {"long": _stage(context=context),
              "small": _stage(parent="long", init="pruned", target=dict(n_layers=1)),
              "plain": _stage(parent="long", context=dict(max_seq_len=64,
                                                          rope_scaling=dict(kind="none"),
                                                          query_scale_beta=0.0))}
    config = runconfig.cascade_config(_cascade(str(tmp_path), "/nowhere", stages,
                                               ("long", "small", "plain")))
    models = cascade.plan_models(config)
    before, after = dataclasses.asdict(PARENT), dataclasses.asdict(models["long"])
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"max_seq_len", "rope_theta", "rope_scaling", "query_scale_beta",
                       "attention_chunk"}
    assert models["long"].rope_scaling == YarnRopeScaling(4.0, 16)
    # A child of a context stage inherits its RoPE and context; 'none' goes back to plain.
    assert models["small"] == models["long"].replace(n_layers=1)
    assert models["plain"] == models["long"].replace(rope_scaling=None, query_scale_beta=None)
    # experiments.plan sizes the stage on its own rows (its batch, unless fixed per device).
    specs = {name: spec for name, _, spec in plan.planned_steps(config, 8, 16)}
    assert (specs["long"].batch_size, specs["long"].seq_len) == (4, 32)
    assert (specs["plain"].batch_size, specs["plain"].seq_len) == (8, 64)
    assert (specs["small"].batch_size, specs["small"].seq_len) == (8, 16)
    assert specs["long"].student == models["long"]
    fixed = {name: spec for name, _, spec in plan.planned_steps(config, 2, 16, fixed_batch=True)}
    assert (fixed["long"].batch_size, fixed["long"].seq_len) == (2, 32)


# ------------------------------------------------------------- loss by position bucket


def _packed_batch(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    """Rows of 1-3 packed segments, then padding, with positions restarting per segment."""
    tokens = rng.integers(1, PARENT.vocab_size, (batch, length))
    segments = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, length - 4), size=b % 3, replace=False))
        bounds = [0, *cuts, length - 3 * (b % 2)]
        for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            segments[b, lo:hi] = s + 1
    positions = np.asarray(model.positions_from_segments(jnp.asarray(segments)))
    return {"tokens": np.where(segments > 0, tokens, 0).astype(np.int32),
            "segment_ids": segments, "positions": np.where(segments > 0, positions, 0)}


_forward = jax.jit(model.forward, static_argnums=0)
_init = jax.jit(model.init, static_argnums=0)  # eager init of the scanned layers: seconds


def _reference(cfg: ModelConfig, params, batch, edges) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL in float64 numpy, summed per bucket of the predicting position."""
    logits = np.asarray(_forward(cfg, params, batch["tokens"], batch["segment_ids"],
                                 batch["positions"]), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    seg, tok, pos = batch["segment_ids"], batch["tokens"], batch["positions"]
    loss, count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    for b in range(tok.shape[0]):
        for t in range(tok.shape[1] - 1):
            if seg[b, t] == 0 or seg[b, t + 1] != seg[b, t]:
                continue
            k = np.searchsorted(edges, pos[b, t], side="right") - 1
            if k < len(edges) - 1:
                loss[k] -= logp[b, t, tok[b, t + 1]]
                count[k] += 1
    return loss, count


def test_bucketed_loss_equals_a_per_position_numpy_reference():
    cfg = PARENT.replace(max_seq_len=64, rope_scaling=YarnRopeScaling(4.0, 16))
    params = _init(cfg, jax.random.key(0))
    batch = _packed_batch(np.random.default_rng(0), 4, 48)
    edges = (0, 4, 16, 40)  # positions >= 40 fall in no bucket
    want_loss, want_count = _reference(cfg, params, batch, edges)
    got = jax.jit(lambda p, b: [evaluate.position_loss_sums(cfg, p, b, edges, chunk_size=c)
                                for c in (None, 16)])(params, batch)
    for sums in got:  # whole-row logits, and 16 positions at a time
        np.testing.assert_array_equal(np.asarray(sums["count_K"]), want_count)
        np.testing.assert_allclose(np.asarray(sums["loss_sum_K"]), want_loss, rtol=1e-5)
    one_hot = evaluate.position_buckets(jnp.asarray(batch["positions"]), edges)
    np.testing.assert_array_equal(one_hot.sum(-1), batch["positions"] < 40)
    # Over a stream of batches, on a mesh, in micro-batches: means per bucket.
    mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    batches = [batch, _packed_batch(np.random.default_rng(1), 4, 48)]
    out = evaluate.losses_by_position(cfg, params, batches, edges, mesh, micro_batches=2)
    sums = [(want_loss, want_count), _reference(cfg, params, batches[1], edges)]
    want = sum(s[0] for s in sums) / sum(s[1] for s in sums)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5)
    assert out["edges"] == list(edges) and out["tokens"] == list(sum(s[1] for s in sums))
    empty = evaluate.losses_by_position(cfg, params, [batch], edges, mesh, max_batches=0)
    assert all(np.isnan(empty["loss"])) and empty["tokens"] == [0.0, 0.0, 0.0]


def test_chunked_cross_entropy_gives_the_whole_rows_value_and_gradient():
    """`ce.chunk_size` (long rows: no [B, L, V] float32) changes neither the CE sums nor their
    gradient; a bad chunk is refused by key."""
    cfg = PARENT.replace(n_layers=1)
    params = _init(cfg, jax.random.key(2))
    batch = _packed_batch(np.random.default_rng(3), 2, 24)

    @jax.jit
    def both(p):  # 24 positions in blocks of 5: the last one padded
        return [jax.value_and_grad(lambda q, c=c: steps.ce_sums(cfg, q, batch, c)["loss_sum"])(p)
                for c in (None, 5)] + [steps.ce_sums(cfg, p, batch, c) for c in (None, 5)]

    whole, chunked, sums, chunked_sums = both(params)
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), whole[1],
                 chunked[1])
    assert float(sums["accuracy_sum"]) == float(chunked_sums["accuracy_sum"])
    assert runconfig.stage_config("s", _stage(ce=dict(chunk_size=512))).settings.chunk_size == 512
    with pytest.raises(ValueError, match=r"config\.stages\.s\.ce: chunk_size=0 must be a "
                                         r"positive integer"):
        runconfig.stage_config("s", _stage(ce=dict(chunk_size=0)))


def test_query_blocks_build_their_mask_rows_in_the_block_with_the_same_result():
    """At long context the [B, L, L] mask is never made whole (`model.SegmentMask`): blocks of
    4 queries over packed segments and a window give the whole-mask value and gradient."""
    cfg = PARENT.replace(max_seq_len=64, sliding_window=6, n_layers=1)
    params = _init(cfg, jax.random.key(1))
    batch = _packed_batch(np.random.default_rng(2), 2, 16)

    def loss(c: ModelConfig, p) -> jax.Array:
        return jnp.mean(model.forward(c, p, batch["tokens"], batch["segment_ids"]) ** 2)

    whole = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
    blocks = jax.jit(jax.value_and_grad(lambda p: loss(cfg.replace(attention_chunk=4), p)))(
        params)
    np.testing.assert_allclose(whole[0], blocks[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), whole[1],
                 blocks[1])
    rows = model.mask_block(jnp.asarray(batch["segment_ids"][:, 4:8]),
                            jnp.asarray(batch["segment_ids"]), 4, 6)
    np.testing.assert_array_equal(rows, model.attention_mask(batch["segment_ids"], 6)[:, 4:8])


# ------------------------------------------------------------------------ a tiny cascade


def test_a_tiny_cascade_extends_its_root_and_records_the_buckets(corpus_dir, tmp_path):
    workdir = str(tmp_path / "run")
    root = PARENT.replace(n_layers=1)
    stages = {"long": _stage(context=dict(max_seq_len=64, rope_scaling=YARN))}
    results = cascade.run(_cascade(workdir, corpus_dir, stages, ("long",), root),
                          progress=False)
    row = results[1]
    assert row["stage"] == "long" and row["seq_len"] == 64
    assert 0 < row["tokens"] <= 2 * 8 * 64  # 2 steps of the run's 8 rows, 64 tokens each
    found = row["loss_by_position"]
    assert found["edges"] == [0, 16, 32, 64]
    for key in ("parent", "init", "trained"):
        assert len(found[key]) == 3 and all(np.isfinite(found[key])), key
    assert all(t > 0 for t in found["tokens"])
    assert found["parent"] != found["init"]  # the same weights under another RoPE
    assert np.isnan(row["kl_to_teacher"])  # the 16-position root never sees the 64-token rows
    record = json.loads(pathlib.Path(workdir, "long", "stage.json").read_text())
    assert record["context"]["changed"] == {
        "max_seq_len": [16, 64], "rope_scaling": [None, YarnRopeScaling(4.0, 16).to_dict()]}
    assert record["loss_by_position"]["parent"] == found["parent"]
    assert ModelConfig.from_dict(record["model"]) == root.replace(
        max_seq_len=64, rope_scaling=YarnRopeScaling(4.0, 16))
    meta = checkpoint.read_metadata(os.path.join(workdir, "long", "checkpoints"))
    assert meta["context"]["seq_len"] == 64 and meta["model"]["max_seq_len"] == 64
    table = pathlib.Path(workdir, "positions.md").read_text()
    assert "long (rows of 64 tokens)" in table and "| [32, 64) |" in table
    assert "loss_by_position" not in pathlib.Path(workdir, "results.md").read_text()
