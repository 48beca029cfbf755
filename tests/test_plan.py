"""experiments.plan and cascade_jax.aot on a tiny cascade and a 2 × 2 × 2 mesh of the 8 test
devices: XLA's per-device argument bytes agree with sizes worked out by hand from the sharding
rules, FLOPs are positive, grow with the batch, and equal a fully unrolled compile's count.
"""

import math
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
from ml_collections.config_dict import placeholder

from cascade_jax import aot, cascade, runconfig, sharding
from cascade_jax.config import ModelConfig
from experiments import plan

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
ROOT = dict(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
            d_ff=128, tie_embeddings=False, max_seq_len=32)


def _stage(objective: str = "kd", **fields) -> ml_collections.ConfigDict:
    stage = dict(parent="root", teacher="root", init="pruned", objective=objective,
                 target={name: placeholder(int) for name in
                         ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads")},
                 depth_method="block_influence", head_method="within_group",
                 hidden_method="channel", steps=10, optim=dict(lr=1e-3, warmup_steps=1),
                 calib_batches=2, baseline=False)
    if objective == "kd":
        stage["kd"] = dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=16)
    stage.update(fields)
    return ml_collections.ConfigDict(stage)


def tiny_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.root = ml_collections.ConfigDict(dict(kind="scratch", path="", model=ROOT, steps=10,
                                                 optim=dict(lr=1e-3, warmup_steps=1)))
    config.data = ml_collections.ConfigDict(dict(source="builtin", tokenizer="builtin",
                                                 seq_len=32, batch_size=8, cache_dir=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.stage_order = ("child", "child_ce")
    config.stages = ml_collections.ConfigDict()
    config.stages.child = _stage(target=dict(n_layers=2, d_ff=64))
    config.stages.child_ce = _stage(target=dict(d_model=32), objective="ce")
    return config


def hand_param_bytes(cfg: ModelConfig) -> float:
    """float32 bytes of one device's params on MESH, from the rules by hand: every matrix is
    split over fsdp (its d_model axis) and tensor (vocab, heads or d_ff): 4 ways; the norm
    scales only over fsdp: 2 ways."""
    norms = cfg.d_model * (2 * cfg.n_layers + 1)
    return 4.0 * ((cfg.num_params() - norms) / 4 + norms / 2)


@pytest.fixture(scope="module")
def rows():
    """Root (cross-entropy step) and child (distillation step), compiled and counted once."""
    return {row["stage"]: row for row in plan.run(tiny_config(), MESH, only=["root", "child"])}


def test_argument_bytes_match_the_sharded_sizes(rows):
    config = tiny_config()
    root_cfg = ModelConfig(**ROOT)
    child_cfg = root_cfg.replace(n_layers=2, d_ff=64)
    batch_bytes = 3 * 4 * config.data.batch_size * config.data.seq_len / 4  # over data × fsdp
    for name, student, teacher in (("root", root_cfg, None), ("child", child_cfg, root_cfg)):
        row = rows[name]
        # Params, then AdamW's two moments like them (+ a few replicated scalars).
        assert row["state_bytes"] == pytest.approx(3 * hand_param_bytes(student), abs=64)
        assert row["teacher_bytes"] == (hand_param_bytes(teacher) if teacher else 0)
        assert row["batch_bytes"] == batch_bytes
        analytic = row["state_bytes"] + row["teacher_bytes"] + row["batch_bytes"]
        assert row["argument_bytes"] == pytest.approx(analytic, rel=1e-3), name  # exact today
        assert row["params"] == student.num_params()
        # The donated student state comes back as the output, in the same buffers.
        assert row["output_bytes"] >= row["alias_bytes"] >= row["state_bytes"] - 64
        assert row["total_bytes"] == (row["argument_bytes"] + row["output_bytes"]
                                      - row["alias_bytes"] + row["temp_bytes"])
        assert row["temp_bytes"] > 0
    assert rows["child"]["step"] == "distill" and rows["root"]["step"] == "train"
    steps = {name: spec for name, _, spec in
             plan.planned_steps(runconfig.cascade_config(tiny_config()), 8, 32)}
    assert steps["child_ce"].kind == "train" and steps["child_ce"].student.d_model == 32


def test_flops_are_positive_and_near_the_textbook_count(rows):
    for row in rows.values():
        assert row["flops"] > 0
        assert 0.5 < row["flops"] / row["analytic_flops"] < 2.0, row["stage"]


def test_flops_grow_with_the_batch(rows):
    one = plan.run(tiny_config(), MESH, per_device_batch=1, only=["root"])[0]
    two = rows["root"]  # config.data.batch_size = 8 = 2 per device
    assert one["batch"] == "4×32" and two["batch"] == "8×32"  # per device × data × fsdp
    assert 1.8 < two["flops"] / one["flops"] < 2.05


def test_exact_flops_equal_a_fully_unrolled_compile(rows):
    """Extrapolating over depth from 1- and 2-layer compiles gives the count of the step with
    every loop unrolled (which XLA counts right), at the real depths."""
    spec = {name: spec for name, _, spec in
            plan.planned_steps(runconfig.cascade_config(tiny_config()), 8, 32)}["child"]
    mesh = sharding.make_mesh(**MESH)
    flops = rows["child"]["flops"]  # aot.exact_flops
    depths = {name: cfg.n_layers for name, cfg in spec.models().items()}
    unrolled = aot.step_cost(aot.counting_variant(spec, depths), mesh).flops
    assert flops == pytest.approx(unrolled, rel=1e-3)
    scanned = aot.step_cost(spec, mesh).flops  # a scan's body counted once: far too few
    assert scanned < 0.8 * flops


def test_mesh_and_batch_resolution():
    assert plan.mesh_sizes({"data": -1, "fsdp": 64, "tensor": 1},
                           {"data": None, "fsdp": None, "tensor": 2}) == {
        "data": 1, "fsdp": 64, "context": 1, "tensor": 2}
    with pytest.raises(ValueError, match="must be >= 1"):
        plan.mesh_sizes({"data": 0, "fsdp": 1, "tensor": 1}, {})
    config = runconfig.cascade_config(tiny_config())
    assert plan.global_batch(config, {"data": 2, "fsdp": 4, "tensor": 2}, 3) == 24
    assert plan.global_batch(config, {"data": 2, "fsdp": 4, "tensor": 2}, None) == 8
    with pytest.raises(ValueError, match="does not split over the 8 batch shards"):
        aot.abstract_batch(sharding.make_mesh(1, 8, 1), 12, 32)
    env = plan._subprocess_env(64)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].count("--xla_force_host_platform_device_count") == 1
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=64")


def test_child_shapes_follow_prune():
    """A PCA cut of d_model unties a tied parent (as prune.prune does); a bad target is named."""
    parent = ModelConfig(**{**ROOT, "tie_embeddings": True})
    stage = runconfig.stage_config("s", _stage(target=dict(d_model=32), hidden_method="pca"))
    assert cascade.child_model(parent, stage).tie_embeddings is False
    stage = runconfig.stage_config("s", _stage(target=dict(d_model=32)))
    assert cascade.child_model(parent, stage).tie_embeddings is True
    stage = runconfig.stage_config("s", _stage(target=dict(d_ff=4096)))
    with pytest.raises(ValueError, match=r"config\.stages\.s\.target: .*exceeds the parent's "
                                         r"d_ff=128"):
        cascade.child_model(parent, stage)


def test_configs_of_the_published_recipes_plan_their_shapes():
    """The Ministral 3 and Minitron configs give the published child sizes (no compile)."""
    from configs import ministral3, minitron_llama31

    for module, want in ((ministral3, {"root": 23.57, "ministral_14b": 13.51,
                                       "ministral_14b_long": 13.51, "ministral_8b": 8.49,
                                       "ministral_8b_long": 8.49, "ministral_3b": 3.43,
                                       "ministral_3b_long": 3.43}),
                         (minitron_llama31, {"root": 8.03, "minitron_4b_width": 4.51,
                                             "minitron_4b_depth": 4.54})):
        steps = plan.planned_steps(runconfig.cascade_config(module.get_config()), 64, 128)
        got = {name: round(spec.student.num_params() / 1e9, 2) for name, _, spec in steps}
        assert got == want
        assert all(teacher in ("", "root") for _, teacher, _ in steps)
        assert all(math.isclose(spec.distill.loss.temperature, 1.0) for _, _, spec in steps
                   if spec.distill)
    tied = {name: spec.student.tie_embeddings
            for name, _, spec in plan.planned_steps(
                runconfig.cascade_config(ministral3.get_config()), 64, 128)}
    assert tied == {"root": False, "ministral_14b": False, "ministral_14b_long": False,
                    "ministral_8b": False, "ministral_8b_long": False, "ministral_3b": True,
                    "ministral_3b_long": True}  # the published 3B is tied, its parents are not


def test_ministral3_context_stages_follow_the_released_rope():
    """Each size's context stage: the released RoPE (θ 1e9 for the 14B, 1e6 for the 8B and 3B,
    YaRN ×16 over 16384, query scale β 0.1) at 262144 positions, on its own rows (KD from the
    root on the root's 131072; `:262144` trains on 262144 with CE)."""
    from configs import ministral3

    config = runconfig.cascade_config(ministral3.get_config())
    models = cascade.plan_models(config, cascade.root_model(config.root, from_files=False))
    for name, theta in (("ministral_14b", 1e9), ("ministral_8b", 1e6), ("ministral_3b", 1e6)):
        long = models[f"{name}_long"]
        assert long.rope_theta == theta and long.max_seq_len == 262144
        assert (long.rope_scaling.factor, long.rope_scaling.original_max_position_embeddings,
                long.rope_scaling.attention_scale, long.query_scale_beta) == (16.0, 16384, 1.0,
                                                                              0.1)
        assert long.replace(rope_theta=1e9, rope_scaling=None, query_scale_beta=None,
                            max_seq_len=131072, attention_chunk=2048) == models[name]
        assert models[name].rope_scaling is None  # the 16k cascade keeps the root's RoPE
    steps = {n: spec for n, _, spec in plan.planned_steps(config, 256, 16384)}
    assert (steps["ministral_8b_long"].kind, steps["ministral_8b_long"].seq_len,
            steps["ministral_8b_long"].batch_size) == ("distill", 131072, 64)
    long_rows = runconfig.cascade_config(ministral3.get_config("262144"))
    assert {s.objective for s in long_rows.stages if s.context} == {"ce"}


def test_a_ministral3_context_stage_plans_at_262k_on_an_abstract_mesh():
    """The 3B's context step at 262144 tokens a row, one row per device on fsdp=8: compiled
    from abstract shapes, nothing allocated. Neither a whole [L, L] mask (64 GiB a row:
    attention blocks build their own rows) nor [L, V] float32 logits (128 GiB: `ce.chunk_size`)
    is among the temporaries, which measure 158 GiB (linear in L: see the README)."""
    from configs import ministral3

    row = plan.run(ministral3.get_config("262144"), {"data": 1, "fsdp": 8, "tensor": 1},
                   per_device_batch=1, count_flops=False, only=["ministral_3b_long"])[0]
    assert row["batch"] == "8×262144" and row["step"] == "train"
    assert row["params"] == 3_429_006_336
    assert row["argument_bytes"] == pytest.approx(row["state_bytes"] + row["batch_bytes"],
                                                  rel=1e-3)
    assert 0 < row["temp_bytes"] < 200 * 2**30


def test_a_mesh_beyond_the_virtual_device_budget_is_refused_before_any_device(tmp_path):
    sizes = {"data": 1, "fsdp": 100_000, "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 100000 devices; this process has 8 and makes "
                                         r"at most --max_virtual_devices=4096"):
        plan.check_device_budget(sizes, 8, 4096)
    assert plan.check_device_budget({"data": 2, "fsdp": 64, "tensor": 1}, 8, 4096) == 128
    done = subprocess.run([sys.executable, "-m", "experiments.plan",
                           "--config=configs/tiny_cascade.py", "--mesh.fsdp=100000"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "needs 100000 devices" in done.stderr.strip().splitlines()[-1]
    assert "rerunning" not in done.stdout + done.stderr


def test_context_parallelism_cuts_a_262k_step_per_device_and_skipping_its_flops():
    """A Ministral-3-shaped 3B context step (1 layer, attention blocks of 2048) at 262144
    tokens a row, 2 rows: on fsdp=2 × context=4 each device holds a quarter of each row's
    activations and a quarter of the weights that fsdp=2 alone leaves it, so far less memory
    per device; the analytic FLOPs count only the blocks attention computes (128·129/2 of
    128² at context=1, where causal blocks are skipped)."""
    import dataclasses

    from configs import ministral3

    config = runconfig.cascade_config(ministral3.get_config("262144"))
    spec = {n: s for n, _, s in plan.planned_steps(config, 2, 262144)}["ministral_3b_long"]
    student = spec.student.replace(n_layers=1, attention_chunk=2048)
    spec = dataclasses.replace(spec.with_models({"student": student}), batch_size=2)
    rows = {context: plan.plan_step("3b", "", spec, sharding.make_mesh(
        data=1, fsdp=2, context=context, devices=jax.devices()[:2 * context]), False)
        for context in (1, 4)}
    assert rows[4]["total_bytes"] < 0.5 * rows[1]["total_bytes"], rows
    assert rows[4]["state_bytes"] == pytest.approx(rows[1]["state_bytes"] / 4, rel=0.01)
    full = aot.forward_flops_per_token(student.replace(attention_chunk=None), 262144)
    skipped = aot.forward_flops_per_token(student, 262144)
    attention = 4.0 * 262144 * student.n_heads * student.head_dim
    assert full - skipped == pytest.approx(attention * (1 - 128 * 129 / 2 / 128**2), rel=1e-6)
    assert aot.forward_flops_per_token(student, 262144, context=4) == full  # no skipping yet
