"""The cascade runs its stages, resumes bit-identically after kill -9, and never clobbers."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal

import jax
import ml_collections
import numpy as np
import pytest

from cascade_jax import (
    cascade,
    checkpoint,
    hf,
    model,
    objectives,
    runconfig,
    sharding,
    steps,
    validate,
)
from cascade_jax.config import ModelConfig
from tests import killed_runs


def tiny_config(corpus_dir: str, workdir: str) -> ml_collections.ConfigDict:
    """A two-stage cascade that trains in seconds: root → child (KD) → grandchild (KD), plus
    a random-init CE baseline."""

    def stage(objective="kd", **fields):
        base = dict(parent="root", teacher="root", init="pruned", objective=objective,
                    target=dict(n_layers=None, d_model=None, d_ff=None, n_heads=None,
                                n_kv_heads=None),
                    steps=6, optim=dict(lr=3e-3, warmup_steps=1), calib_batches=2)
        if objective == "kd":
            base["kd"] = dict(kind="forward_kl", chunk_size=16)
        base.update(fields)
        return base

    return ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0,
        root=dict(kind="scratch", path="",
                  model=dict(vocab_size=320, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_seq_len=32, tie_embeddings=True),
                  steps=6, optim=dict(lr=3e-3, warmup_steps=1)),
        data=dict(source=f"text:{corpus_dir}/*.py", tokenizer=f"{corpus_dir}/tokenizer.json",
                  seq_len=32, batch_size=8, cache_dir="", validation_percent=25),
        mesh=dict(data=-1, fsdp=1, tensor=1),
        stage_order=("child", "grandchild", "child_random_ce"),
        stages=dict(
            child=stage(target=dict(n_layers=2, d_ff=48, n_heads=None, n_kv_heads=None,
                                    d_model=None)),
            grandchild=stage(parent="child",
                             target=dict(n_layers=1, d_model=24, d_ff=32, n_heads=None,
                                         n_kv_heads=None)),
            child_random_ce=stage(init="random", objective="ce", baseline=True,
                                  target=dict(n_layers=2, d_ff=48, n_heads=None,
                                              n_kv_heads=None, d_model=None))),
        log_every=2, eval_every=3, eval_batches=2, checkpoint_every=2, keep_checkpoints=10))


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory) -> tuple[str, list[dict]]:
    """One uninterrupted run, in this process."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, cascade.run(tiny_config(corpus_dir, workdir), progress=False)


def _final_params(workdir: str, stage: str):
    mesh = sharding.make_mesh(data=-1)
    _, params = cascade.load_checkpoint_model(os.path.join(workdir, stage, "checkpoints"), mesh)
    return params


def _assert_bit_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_stages_shrink_and_the_table_has_every_row(reference):
    workdir, results = reference
    assert [r["stage"] for r in results] == ["root", "child", "grandchild", "child_random_ce"]
    params = {r["stage"]: r["params"] for r in results}
    assert params["root"] > params["child"] > params["grandchild"]
    assert params["child"] == params["child_random_ce"]
    for r in results:
        assert np.isfinite(r["validation_loss"]) and r["tokens"] > 0
        assert np.isclose(r["perplexity"], np.exp(r["validation_loss"]))
    for r in results[1:]:
        assert r["kl_to_teacher"] >= 0 and 0 <= r["top1_agreement"] <= 1
    table = pathlib.Path(workdir, "results.md").read_text()
    assert all(f"| {r['stage']} |" in table for r in results)
    csv_rows = pathlib.Path(workdir, "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(results)
    assert pathlib.Path(workdir, "loss_curves.png").stat().st_size > 0
    assert pathlib.Path(workdir, "importance_child.png").stat().st_size > 0


def test_child_checkpoint_records_its_lineage(reference):
    workdir, _ = reference
    meta = checkpoint.read_metadata(os.path.join(workdir, "grandchild", "checkpoints"))
    assert meta["parent"] == os.path.join(workdir, "child", "checkpoints")
    assert meta["teacher"] == os.path.join(workdir, "root")
    assert meta["tokens_seen"] > 0 and meta["step"] == 6
    assert len(meta["record"]["layers"]) == 1 and meta["target"]["d_model"] == 24
    assert os.path.exists(meta["importance"])
    # Step 0 is the pruned child before any training: the parent's kept layers, sliced.
    assert checkpoint.all_steps(os.path.join(workdir, "grandchild", "checkpoints"))[-1] == 6


def test_pruned_step_zero_equals_surgery_on_the_parent(reference):
    """The child that training started from is exactly `prune.prune` of the finished parent."""
    from cascade_jax import prune

    workdir, _ = reference
    parent = _final_params(workdir, "root")
    root_cfg = ModelConfig.from_dict(checkpoint.read_metadata(
        os.path.join(workdir, "root", "checkpoints"))["model"])
    scores = prune.Importance.load(os.path.join(workdir, "child", "importance.npz"), root_cfg)
    out = prune.prune(root_cfg, parent, scores, prune.Target(n_layers=2, d_ff=48))
    with checkpoint.Checkpointer(os.path.join(workdir, "child", "checkpoints"),
                                 read_only=True) as ckpt:
        step0 = ckpt.restore({"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), out.params)},
            step=0,
            partial=True).state["params"]
    _assert_bit_identical(step0, out.params)


def test_killed_at_several_points_resumes_bit_identical(reference, corpus_dir, tmp_path):
    ref_dir, ref_results = reference
    workdir = str(tmp_path / "run")
    kills = [("root/checkpoints", 4, "after"),      # mid-root, after a committed save
             ("child/checkpoints", 0, "during"),    # pruned child's first save half-written
             ("grandchild/checkpoints", 4, "during")]
    for kill_dir, step, when in kills:
        assert killed_runs.run_in_subprocess(__file__, "tiny_config", (corpus_dir, workdir),
                                             kill_dir, step, when) == -signal.SIGKILL
    assert killed_runs.run_in_subprocess(__file__, "tiny_config", (corpus_dir, workdir)) == 0
    for stage in ("root", "child", "grandchild", "child_random_ce"):
        _assert_bit_identical(_final_params(workdir, stage), _final_params(ref_dir, stage))
    results = pathlib.Path(workdir, "results.csv").read_text().splitlines()
    assert len(results) == 1 + len(ref_results)


def test_an_existing_run_of_another_config_is_refused_untouched(reference, corpus_dir):
    workdir, _ = reference
    before = pathlib.Path(workdir, "cascade.json").read_bytes()
    config = tiny_config(corpus_dir, workdir)
    config.stages.child.steps = 7
    with pytest.raises(ValueError, match=r"different config .*stages"):
        cascade.run(config, progress=False)
    assert pathlib.Path(workdir, "cascade.json").read_bytes() == before


def test_rerunning_a_finished_run_changes_nothing(reference, corpus_dir):
    workdir, results = reference
    steps = checkpoint.all_steps(os.path.join(workdir, "child", "checkpoints"))
    again = cascade.run(tiny_config(corpus_dir, workdir), progress=False)
    assert [r["validation_loss"] for r in again] == [r["validation_loss"] for r in results]
    assert checkpoint.all_steps(os.path.join(workdir, "child", "checkpoints")) == steps


def test_a_corrupted_checkpoint_names_the_file_and_is_left_alone(reference, corpus_dir,
                                                                  tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference[0], workdir)
    checkpoints = os.path.join(workdir, "child", "checkpoints")
    step_dir = pathlib.Path(checkpoint.Checkpointer(checkpoints, read_only=True).step_dir(
        checkpoint.latest_step(checkpoints)))
    for path in (p for p in (step_dir / "state").rglob("*") if p.is_file()):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    snapshot = sorted(str(p) for p in pathlib.Path(workdir).rglob("*"))
    with pytest.raises(checkpoint.CheckpointError, match="child/checkpoints"):
        cascade.run(tiny_config(corpus_dir, workdir), progress=False)
    assert sorted(str(p) for p in pathlib.Path(workdir).rglob("*")) == snapshot


def test_restore_on_another_mesh_gives_the_same_forward(reference):
    """Saved from the 8-device data-parallel run; restored onto 1 device and onto 2×4."""
    workdir, _ = reference
    directory = os.path.join(workdir, "child", "checkpoints")
    cfg = ModelConfig.from_dict(checkpoint.read_metadata(directory)["model"])
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (8, 16), dtype=np.int32)
    outputs = []
    for mesh in (sharding.make_mesh(devices=jax.devices()[:1]),
                 sharding.make_mesh(data=2, fsdp=4)):
        _, params = cascade.load_checkpoint_model(directory, mesh)
        leaf = jax.tree.leaves(params)[0]
        assert leaf.sharding.mesh.devices.size == mesh.devices.size
        outputs.append(np.asarray(model.forward(cfg, params, tokens)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)


def test_bad_stage_configs_are_clear_errors(corpus_dir, tmp_path):
    config = tiny_config(corpus_dir, str(tmp_path))
    config.stages.grandchild.parent = "nope"
    with pytest.raises(ValueError, match="parent='nope'"):
        runconfig.cascade_config(config)
    config = tiny_config(corpus_dir, str(tmp_path))
    config.stage_order = ("grandchild", "child", "child_random_ce")
    with pytest.raises(ValueError, match="parent='child'"):
        runconfig.cascade_config(config)
    config = tiny_config(corpus_dir, str(tmp_path))
    config.stage_order = ("child",)
    with pytest.raises(ValueError, match="stage_order"):
        runconfig.cascade_config(config)
    config = tiny_config(corpus_dir, str(tmp_path))
    config.stages.child.grad_accum = 0
    with pytest.raises(ValueError, match="grad_accum=0 must be a positive integer"):
        runconfig.cascade_config(config)
    config = tiny_config(corpus_dir, str(tmp_path / "run"))
    config.stages.child.grad_accum = 2  # 4-row micro-batches over 8 data shards
    with pytest.raises(ValueError, match="batch_size=8 in grad_accum=2 micro-batches does not "
                                         "split over the 8 batch shards"):
        cascade.run(config, progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory is claimed


def test_an_hf_root_runs_with_the_configs_runtime_settings(reference, corpus_dir, tmp_path):
    """A root loaded from Hugging Face files takes dtype/remat from `root.model` (a bf16,
    rematerialised 24B root must not run in float32), its children inherit them, and a stage
    with grad_accum trains: the root's validation loss matches the float32 run to bf16
    precision."""
    workdir, results = reference
    root_cfg, root_params = cascade.load_checkpoint_model(
        os.path.join(workdir, "root", "checkpoints"), sharding.make_mesh(data=-1))
    hf.save(root_cfg, jax.device_get(root_params), tmp_path / "hf_root")

    config = tiny_config(corpus_dir, str(tmp_path / "run"))
    config.root = ml_collections.ConfigDict(dict(
        kind="hf", path=str(tmp_path / "hf_root"),
        model=dict(dtype="bfloat16", remat=True, d_model=4096)))  # d_model: logged, not used
    config.stage_order = ("child",)
    config.stages = ml_collections.ConfigDict(dict(child=config.stages.child.to_dict()))
    config.stages.child.grad_accum = 2
    config.data.batch_size = 16  # micro-batches of 8 rows: one per data shard
    hf_results = cascade.run(config, progress=False)

    child = ModelConfig.from_dict(
        checkpoint.read_metadata(str(tmp_path / "run" / "child" / "checkpoints"))["model"])
    assert (child.dtype, child.remat, child.d_model) == ("bfloat16", True, root_cfg.d_model)
    assert abs(hf_results[0]["validation_loss"] - results[0]["validation_loss"]) < 0.02
    assert hf_results[0]["params"] == results[0]["params"]
    assert np.isfinite(hf_results[1]["validation_loss"]) and hf_results[1]["tokens"] > 0


# ---------------------------------------------------------------- objectives as plug-ins


@dataclasses.dataclass(frozen=True)
class _ToySettings:
    scale: float = 1.0


class _ScaledCrossEntropy:
    """A toy objective defined only here: CE times `scale`, with a metric of its own."""

    name = "toy_scaled_ce"
    loss_label = "toy objective"
    uses_teacher = False

    def parse_settings(self, block, key):
        return validate.construct(_ToySettings, block, key)

    def build(self, ctx):
        cfg, optimizer, mesh, scale = ctx.student, ctx.optimizer, ctx.mesh, ctx.settings.scale

        def loss_sum(params, batch):
            sums = steps.ce_sums(cfg, params, batch)
            return scale * sums["loss_sum"], dict(sums, toy_sum=scale * sums["loss_sum"])

        def step(state, batch):
            grads, metrics = steps.accumulate_grads(loss_sum, ctx.grad_accum, state.params, batch)
            return steps.apply_grads(optimizer, state, grads, metrics)

        shardings = steps.model_state_shardings(cfg, optimizer, mesh)
        return objectives.Built(
            step_fn=steps.jit_step(step, shardings, mesh),
            abstract_state=steps.abstract_state(optimizer, model.param_shapes(cfg), shardings),
            make_state=lambda: steps.place_state(optimizer, ctx.child_params, shardings),
            batches=ctx.train_batches(), lineage={"toy_scale": scale})

    def step_spec(self, *args, **kwargs):
        raise NotImplementedError


def test_a_toy_objective_runs_as_a_stage_without_touching_cascade(reference, corpus_dir,
                                                                  tmp_path):
    """Registered here, configured by its own block, run by `cascade.run` on an Orbax root."""
    objectives.register(_ScaledCrossEntropy())
    try:
        config = tiny_config(corpus_dir, str(tmp_path / "run"))
        config.root = ml_collections.ConfigDict(dict(
            kind="orbax", path=os.path.join(reference[0], "root", "checkpoints")))
        config.stage_order = ("toy",)
        config.stages = ml_collections.ConfigDict(dict(toy=dict(
            parent="root", teacher="root", init="parent", objective="toy_scaled_ce",
            toy_scaled_ce=dict(scale=0.5), steps=3, optim=dict(lr=1e-3, warmup_steps=1))))
        results = cascade.run(config, progress=False)
    finally:
        objectives.unregister("toy_scaled_ce")
    assert [r["stage"] for r in results] == ["root", "toy"]
    assert results[1]["params"] == results[0]["params"]  # init='parent': the root as is
    stage_dir = tmp_path / "run" / "toy"
    assert json.loads((stage_dir / "stage.json").read_text())["objective"] == "toy_scaled_ce"
    train = [r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert train and all(r["toy"] == pytest.approx(0.5 * r["loss"]) for r in train)
    meta = checkpoint.read_metadata(str(stage_dir / "checkpoints"))
    assert meta["toy_scale"] == 0.5 and meta["objective"] == "toy_scaled_ce"
    assert "toy" not in pathlib.Path(cascade.__file__).read_text()


def test_runtime_settings_compare_rope_scaling_as_the_choice_it_becomes(caplog):
    """A config's Llama 3.1 4-tuple equals the files' tagged 'llama3' scaling (no warning);
    a different scaling is reported."""
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=4, d_ff=8, rope_scaling=(8.0, 1.0, 4.0, 8192))
    root = runconfig.RootConfig(kind="hf", path="hf_dir", model=dict(
        rope_scaling=(8.0, 1.0, 4.0, 8192), dtype="bfloat16"))
    with caplog.at_level("WARNING"):
        assert cascade.with_runtime_settings(cfg, root).dtype == "bfloat16"
    assert "disagrees" not in caplog.text
    root = runconfig.RootConfig(kind="hf", path="hf_dir", model=dict(rope_scaling=dict(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=8)))
    with caplog.at_level("WARNING"):
        assert cascade.with_runtime_settings(cfg, root).rope_scaling == cfg.rope_scaling
    assert "disagrees" in caplog.text and "rope_scaling" in caplog.text
