"""Codistillation: the joint step's loss is each model's own loss (numpy, one model at a time),
α = 0 is the model's solo CE run, sharded equals one device, frozen copies refresh exactly
every k steps, and a two-member group runs as cascade stages, skips and resumes.

The unit tests' pair is the cascade test's pair (the root's two pruned children, with the
same settings and mesh), so the cascade reuses the sharded test's compiled step from the
session's compilation cache (the file runs in about a minute on a busy 2-core CPU).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cascade_jax import (
    cascade,
    checkpoint,
    model,
    paths,
    prune,
    runconfig,
    sharding,
    steps,
    tasks,
)
from cascade_jax.config import ModelConfig
from cascade_jax.distill import codistill, losses

V, L, B = 32, 16, 8
ROOT = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=64, max_seq_len=L, tie_embeddings=False)
DEEP = prune.child_config(ROOT, prune.Target(n_layers=1))            # cut in depth
WIDE = prune.child_config(ROOT, prune.Target(d_ff=32, n_heads=2))    # cut in width
TIED = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                   d_ff=32, max_seq_len=L, tie_embeddings=True)
# The pair as the cascade test configures it: "deep" not pulled (α = 0), "wide" pulled toward
# deep's copy (α = 1), copies refreshed every 3 steps; each its own optimizer.
ALPHAS, REFRESH, STEPS = (0.0, 1.0), 3, 4
OPTIMS = (dict(lr=3e-3, warmup_steps=0), dict(lr=3e-3, warmup_steps=0, clip_norm=0.5))


def _batch(seed: int) -> dict[str, np.ndarray]:
    """Two packed documents per row, padding at the end of some rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[:, 10:] = 2
    segment_ids[::3, 13:] = 0
    positions = np.asarray(model.positions_from_segments(segment_ids), np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _group(alphas=ALPHAS, cfgs=(DEEP, WIDE), names=("deep", "wide"), refresh_every=REFRESH):
    members = tuple(codistill.Member(name, cfg, alpha=a, chunk_size=8)
                    for name, cfg, a in zip(names, cfgs, alphas, strict=True))
    return codistill.CodistillConfig(members, refresh_every=refresh_every)


def _random_params(cfg: ModelConfig, seed: int):
    """Random weights from numpy (the model's own init compiles for seconds): norm scales
    near 1, the rest N(0, 0.2²)."""
    rng = np.random.default_rng(seed)
    return paths.unflatten({
        name: ((1.0 if name.endswith("scale") else 0.0)
               + rng.normal(0, 0.1 if name.endswith("scale") else 0.2, s.shape)
               ).astype(np.float32)
        for name, s in paths.flatten(model.param_shapes(cfg)).items()})


def _init(cfgs, seed=0):
    return tuple(_random_params(cfg, seed + i) for i, cfg in enumerate(cfgs))


_jit_forward = jax.jit(model.forward, static_argnums=0)


def _numpy_logprobs(cfg, params, batch):
    logits = np.asarray(_jit_forward(cfg, params, batch["tokens"], batch["segment_ids"],
                                     batch["positions"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _numpy_sums(names, cfgs, alphas, params, peers, batch):
    """Per model, computed alone in float64 from `model.forward`'s logits: Σ_t w_t CE_t,
    Σ_t w_t KL(mean of the peers' probabilities ‖ own)_t and CE + α·KL; and Σ_t w_t."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    weights = np.zeros((B, L))
    weights[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    targets = np.zeros((B, L), np.int64)
    targets[:, :-1] = tokens[:, 1:]
    own = [_numpy_logprobs(c, p, batch) for c, p in zip(cfgs, params, strict=True)]
    peer = [_numpy_logprobs(c, p, batch) for c, p in zip(cfgs, peers, strict=True)]
    out = {}
    for i, (name, alpha) in enumerate(zip(names, alphas, strict=True)):
        mean = np.mean([np.exp(peer[j]) for j in range(len(cfgs)) if j != i], axis=0)
        kl = np.sum(mean * (np.log(mean) - own[i]), axis=-1)
        ce = -np.take_along_axis(own[i], targets[..., None], -1)[..., 0]
        out[f"{name}/ce_sum"], out[f"{name}/kd_sum"] = np.sum(weights * ce), np.sum(weights * kl)
        out[f"{name}/loss_sum"] = out[f"{name}/ce_sum"] + alpha * out[f"{name}/kd_sum"]
    out["loss_sum"] = sum(out[f"{name}/loss_sum"] for name in names)
    out["count"] = weights.sum()
    return out


def _assert_sums(got, want):
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=2e-5, atol=1e-5, err_msg=name)


def test_joint_loss_equals_each_models_loss_computed_alone():
    """Three models of three shapes (tied and untied heads), live peers (each model's target:
    the mean of the other two's probabilities), the fused loss in two chunks."""
    names, cfgs, alphas = ("a", "b", "c"), (DEEP, WIDE, TIED), (0.5, 2.0, 0.0)
    params, batch = _init(cfgs), _batch(0)
    ccfg = _group(alphas, cfgs, names, refresh_every=0)
    _, got = jax.jit(codistill.loss_sums, static_argnums=0)(ccfg, params, None, batch)
    _assert_sums(got, _numpy_sums(names, cfgs, alphas, params, params, batch))


def test_kl_to_the_peers_mean_moves_a_model_as_the_mean_of_per_peer_kls():
    """Why the mean of probabilities: with forward KL its gradient w.r.t. the student logits is
    the average of the per-peer KL gradients (deep mutual learning's loss for > 2 students).
    And the fused mixture loss equals the unfused one in value and gradient."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 2, 5, V)), jnp.float32)  # student, two peers
    hidden = [jnp.asarray(rng.normal(size=(2, 12, d)), jnp.float32) for d in (8, 8, 4)]
    heads = [jnp.asarray(rng.normal(size=(d, V)), jnp.float32) for d in (8, 8, 4)]
    targets = jnp.asarray(rng.integers(0, V, (2, 12)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 12)), jnp.float32)
    temp = 2.0

    def to_mixture(z):
        mix = losses.mixture_logprobs([logits[1], logits[2]], temp)
        return jnp.sum(losses.divergence("forward_kl", mix, jax.nn.log_softmax(z / temp)))

    def per_peer(z):
        own = jax.nn.log_softmax(z / temp)
        return 0.5 * sum(jnp.sum(losses.divergence("forward_kl",
                                                   jax.nn.log_softmax(p / temp), own))
                         for p in (logits[1], logits[2]))

    def mixture(h, w, chunk_size):
        spec = losses.LossSpec(alpha=0.3, temperature=temp, chunk_size=chunk_size)
        return losses.mixture_distill_loss(h, w, hidden[1:], heads[1:], targets, weights,
                                           spec)[0]

    @jax.jit
    def everything():
        fused, whole = (jax.value_and_grad(mixture, argnums=(0, 1))(hidden[0], heads[0], c)
                        for c in (5, None))
        return jax.grad(to_mixture)(logits[0]), jax.grad(per_peer)(logits[0]), fused, whole

    mixture_grad, per_peer_grad, fused, whole = everything()
    np.testing.assert_allclose(mixture_grad, per_peer_grad, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fused,
                 whole)


def _run(ccfg, optimizers, mesh, params, seeds):
    """Steps of the jitted joint step from `params`: the host state after each, the metrics."""
    shardings = codistill.state_shardings(ccfg, optimizers, mesh)
    state = codistill.create_state(ccfg, optimizers, shardings, member_params=params)
    step_fn = codistill.jit_train_step(ccfg, optimizers, mesh, shardings)
    history, metrics = [], []
    for seed in seeds:
        state, m = step_fn(state, sharding.shard_batch(_batch(seed), mesh))
        history.append(_host(state))
        metrics.append({k: float(v) for k, v in m.items()})
    return history, metrics


@pytest.fixture(scope="module")
def refreshed():
    """Five one-device steps of the pair (deep α = 0, wide α = 1), copies refreshed every 3
    steps, each model with its own optimizer (wide clips harder)."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    ccfg, params = _group(), _init((DEEP, WIDE))
    optimizers = tuple(steps.make_optimizer(total_steps=STEPS, **o) for o in OPTIMS)
    history, metrics = _run(ccfg, optimizers, mesh, params, range(5))
    return ccfg, optimizers, params, history, metrics


def test_with_alpha_zero_a_model_trains_as_its_solo_ce_run(refreshed):
    """deep (α = 0) after 5 steps equals deep trained alone with CE on the same batches,
    although wide is pulled toward it: nothing reaches a model through its peers' targets."""
    _, optimizers, params, history, _ = refreshed
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    solo = steps.jit_ce_train_step(DEEP, optimizers[0], mesh)
    state = steps.init_state(optimizers[0], params[0])
    for seed in range(5):
        state, _ = solo(state, sharding.shard_batch(_batch(seed), mesh))
    # float tolerance: the fused loss sums chunks in another order than whole-logit CE, and
    # AdamW turns a rounding difference in a near-zero gradient into up to lr·(a fraction)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 history[-1].params[0], _host(state.params))


def test_refreshed_copies_update_exactly_every_k_steps(refreshed):
    _, _, params, history, metrics = refreshed
    # After step s (1-based) the copies hold the params of step k·⌊(s−1)/k⌋: the initial
    # ones after steps 1-3, those after step 3 after steps 4-5.
    began = [params] + [h.params for h in history]
    for s, state in enumerate(history, start=1):
        jax.tree.map(np.testing.assert_array_equal, state.peers,
                     began[REFRESH * ((s - 1) // REFRESH)])
    assert int(history[-1].step) == 5
    # step 3 read stale copies (the initial params) while the models had moved: its loss is
    # each model's loss against those copies, computed alone
    _assert_sums(metrics[2], _numpy_sums(("deep", "wide"), (DEEP, WIDE), ALPHAS, began[2],
                                         params, _batch(2)))
    assert not np.allclose(began[2][1]["lm_head"]["kernel"], params[1]["lm_head"]["kernel"])


def test_sharded_step_equals_one_device(refreshed):
    """The same 3 steps on a data=2 × fsdp=2 × tensor=2 mesh: losses, params and copies."""
    ccfg, optimizers, params, history, metrics = refreshed
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, sharded_metrics = _run(ccfg, optimizers, mesh, params, range(3))
    for one, many in zip(metrics[:3], sharded_metrics, strict=True):
        for name in ("loss_sum", "deep/ce_sum", "wide/kd_sum", "wide/loss_sum", "count"):
            np.testing.assert_allclose(many[name], one[name], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 sharded[-1], history[2])


# ---------------------------------------------------------------------- as cascade stages


def _cascade_config(workdir: str, root: str, data: str, tokenizer: str
                    ) -> ml_collections.ConfigDict:
    """An Orbax root and the pair of the unit tests: one child cut in depth, one in width,
    trained as a group on the unit tests' 2 × 2 × 2 mesh."""

    def member(alpha, optim, **target):
        return dict(parent="root", teacher="root", init="pruned", objective="codistill",
                    codistill=dict(group="pair", alpha=alpha, refresh_every=REFRESH,
                                   chunk_size=8),
                    target=target, steps=STEPS, optim=optim, calib_batches=1)

    return ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0, root=dict(kind="orbax", path=root),
        data=dict(source=f"npy:{data}", tokenizer=tokenizer, seq_len=L, batch_size=B,
                  validation_percent=25),
        mesh=dict(data=2, fsdp=2, tensor=2), stage_order=("deep", "wide"),
        stages=dict(deep=member(ALPHAS[0], OPTIMS[0], n_layers=1),
                    wide=member(ALPHAS[1], OPTIMS[1], d_ff=32, n_heads=2)),
        log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2, keep_checkpoints=5))


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A root checkpoint (random init, cascade metadata), a character tokenizer with V ids and
    a token stream of short documents."""
    directory = tmp_path_factory.mktemp("codistill_inputs")
    tokenizer = tasks.char_tokenizer("abcdefghijklmnopqrstuvwxyz0123")
    assert tokenizer.get_vocab_size() == V
    tokenizer.save(str(directory / "tokenizer.json"))
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.append(rng.integers(2, 2 + 6, rng.integers(10, 30)) + i % 20, 1)
                             for i in range(300)]).astype(np.int32)
    np.save(directory / "tokens.npy", stream)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)  # as the run restores it
    params = sharding.shard_like(_random_params(ROOT, 7), sharding.param_shardings(ROOT, mesh))
    checkpoint.save(directory / "root", 0, {"params": params}, metadata={"model": ROOT.to_dict()})
    return str(directory / "root"), str(directory / "tokens.npy"), str(directory /
                                                                      "tokenizer.json")


def _member_params(workdir, name):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    return _host(cascade.load_checkpoint_model(os.path.join(workdir, name, "checkpoints"),
                                               mesh)[1])


def test_a_pair_trains_as_two_stages_skips_and_resumes_to_the_same_params(run_inputs,
                                                                          tmp_path):
    workdir = tmp_path / "run"
    config = _cascade_config(str(workdir), *run_inputs)
    results = cascade.run(config, progress=False)
    assert [r["stage"] for r in results] == ["root", "deep", "wide"]
    assert results[1]["params"] != results[2]["params"] < results[0]["params"]
    for r in results[1:]:
        assert np.isfinite(r["validation_loss"]) and r["kl_to_teacher"] >= 0
        assert r["tokens"] == results[1]["tokens"] > 0
    meta = checkpoint.read_metadata(str(workdir / "wide" / "checkpoints"))
    assert (meta["peers"], meta["group"], meta["step"]) == (["deep"], "pair", 4)
    assert meta["model"]["d_ff"] == 32 and meta["objective"] == "codistill"
    assert json.loads((workdir / "deep" / "stage.json").read_text())["peers"] == ["wide"]
    joint = [json.loads(line) for line in
             (workdir / "pair_codistill" / "metrics.jsonl").read_text().splitlines()]
    assert {"deep/ce", "deep/kd", "wide/ce", "wide/kd"} <= set(joint[0])
    own = [json.loads(line) for line in
           (workdir / "deep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in own if r["split"] == "train"] == [1, 2, 3, 4]
    assert own[0]["loss"] == pytest.approx(joint[0]["deep/loss"])
    wide = _member_params(str(workdir), "wide")

    # killed after the joint step-2 checkpoint, before wide was written (deep was): the rerun
    # leaves deep alone, resumes the joint state (its step 3 reads the copies saved at step
    # 2, taken at step 0) and writes wide, the same model to the bit
    deep_row = (workdir / "deep" / "result.json").read_bytes()
    deep_fingerprint = checkpoint.fingerprint(str(workdir / "deep" / "checkpoints"))
    shutil.rmtree(workdir / "pair_codistill" / "checkpoints" / "4")
    (workdir / "wide" / "result.json").unlink()
    shutil.rmtree(workdir / "wide" / "checkpoints")
    resumed = cascade.run(config, progress=False)
    assert (workdir / "deep" / "result.json").read_bytes() == deep_row
    assert checkpoint.fingerprint(str(workdir / "deep" / "checkpoints")) == deep_fingerprint
    assert checkpoint.all_steps(str(workdir / "pair_codistill" / "checkpoints")) == [0, 2, 4]
    jax.tree.map(np.testing.assert_array_equal, _member_params(str(workdir), "wide"), wide)
    for x, y in zip(results, resumed, strict=True):
        assert {k: v for k, v in x.items() if k != "wall_s"} == {
            k: v for k, v in y.items() if k != "wall_s"}


def test_group_settings_are_checked_at_config_time_naming_the_keys(run_inputs, tmp_path):
    def bad(edit, message):
        config = _cascade_config(str(tmp_path), *run_inputs)
        edit(config)
        with pytest.raises(ValueError, match=message):
            runconfig.cascade_config(config)

    def alone(c):
        c.stage_order = ("deep",)
        del c.stages["wide"]

    def between(c):
        c.stages.mid = dict(parent="root", objective="ce", steps=2,
                            optim=dict(lr=1e-3, warmup_steps=1))
        c.stage_order = ("deep", "mid", "wide")

    bad(alone, r"config.stages.deep.codistill.group='pair' names no other stage")
    bad(between, r"must list the stages of group 'pair' \(\['deep', 'wide'\]\) one after "
                 r"another, but \['mid'\] stand between them")
    bad(lambda c: setattr(c.stages.wide, "steps", 5),
        r"config.stages.wide.steps=5 but config.stages.deep.steps=4")
    bad(lambda c: setattr(c.stages.wide.codistill, "refresh_every", 0),
        r"config.stages.wide.codistill.refresh_every=0 but "
        r"config.stages.deep.codistill.refresh_every=3")
    bad(lambda c: setattr(c.stages.wide.codistill, "alpha", -1.0),
        r"config.stages.wide.codistill: alpha=-1.0 must be a finite number >= 0")
    bad(lambda c: c.stages.wide.codistill.__delitem__("group"),
        r"config.stages.wide.codistill.group is not set")

    def clash(c):
        c.stages.pair_codistill = dict(parent="root", objective="ce", steps=4,
                                       optim=dict(lr=1e-3, warmup_steps=1))
        c.stage_order = ("deep", "wide", "pair_codistill")

    bad(clash, r"group 'pair' keeps its joint state in <workdir>/pair_codistill")
