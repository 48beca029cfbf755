"""Per-device memory and FLOPs of every step of a cascade, before launch, with no params made.

    python -m experiments.plan --config configs/ministral3.py --mesh.fsdp=64 \
        --config.data.seq_len=4096 --per_device_batch=1
    python -m experiments.plan --config configs/tiny_cascade.py --mesh.data=2 --mesh.fsdp=4
    python -m experiments.plan --config configs/ministral3.py:262144 --mesh.fsdp=16 \
        --mesh.context=8 --per_device_batch=1 --flops=false --stages=ministral_3b_long

For the root and every stage the step the cascade would run (the root's cross-entropy step, or
a forward pass when the root is loaded; each stage's distillation step, teacher + student, or
its cross-entropy step) is compiled ahead of time from abstract arguments carrying their
shardings (`cascade_jax.aot`), and XLA's per-device argument, output, temp and total bytes and
its FLOPs per step are printed as a markdown table, next to the analytic parameter count and
the per-device bytes of params + optimizer state (and teacher) from the shard shapes alone.

The mesh comes from `config.mesh`, overridden by `--mesh.data/fsdp/context/tensor`
(`context` splits each row's tokens: context parallelism). A -1 axis is
planned as 1: per-device figures depend on the data axis only through the per-device batch,
which `--per_device_batch` fixes (the global batch is then per_device_batch × data × fsdp; by
default it is `config.data.batch_size`). A context stage (`stages.<name>.context`) is planned
on its own rows: its seq_len, and its batch_size unless `--per_device_batch` is given. When
the mesh needs more devices than this process has, the plan reruns itself in a subprocess on
that many virtual CPU devices (`--xla_force_host_platform_device_count`): a CPU-compiled
estimate, as XLA:CPU fuses and schedules differently from TPU and GPU compilers (and may keep
bf16 intermediates in float32).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_dict, config_flags

from cascade_jax import aot, cascade, objectives, runconfig, sharding
from cascade_jax import steps as steps_lib
from experiments.common import last_line_is_the_cause, quiet_logging


def define_flags() -> None:
    """The command line; defined only when run as a script, so that tests (and other mains) can
    import `run` without clashing flag names."""
    config_flags.DEFINE_config_file("config", None, "Cascade config file.", lock_config=True)
    config_flags.DEFINE_config_dict(
        "mesh", ml_collections.ConfigDict({axis: config_dict.placeholder(int)
                                           for axis in sharding.MESH_AXES}),
        "Mesh sizes overriding config.mesh (--mesh.fsdp=64); -1 is planned as 1.")
    flags.DEFINE_integer("per_device_batch", None, "Rows per batch shard; the global batch is "
                         "this × data × fsdp (default: config.data.batch_size, global).")
    flags.DEFINE_bool("flops", True, "Count FLOPs exactly (1 + models small extra compiles "
                      "per step; see cascade_jax.aot).")
    flags.DEFINE_list("stages", None, "Plan only these ('root' and/or stage names).")
    flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")
    flags.DEFINE_integer("max_virtual_devices", MAX_VIRTUAL_DEVICES, "The most virtual CPU "
                         "devices the plan makes for a mesh larger than this process's.")
    flags.mark_flags_as_required(["config"])

GIB = 2.0**30
_SUBPROCESS_ENV = "CASCADE_JAX_PLAN_SUBPROCESS"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU makes every virtual device up front; far beyond a pod's size it takes minutes or hangs.
MAX_VIRTUAL_DEVICES = 4096


# --------------------------------------------------------------------------- the mesh


def mesh_sizes(config_mesh: dict[str, int], overrides: dict[str, int | None]) -> dict[str, int]:
    """`config.mesh` with the command line's overrides; -1 (fill) becomes 1 (module docstring)."""
    sizes = {axis: overrides.get(axis) if overrides.get(axis) is not None
             else config_mesh.get(axis, 1) for axis in sharding.MESH_AXES}
    bad = {axis: size for axis, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"mesh sizes {bad} must be >= 1 (or -1, planned as 1)")
    return {axis: 1 if size == -1 else size for axis, size in sizes.items()}


def check_device_budget(sizes: dict[str, int], available: int, budget: int) -> int:
    """The mesh's device count, if this process has that many devices or may make that many
    virtual ones (`budget`); else an error naming the mesh and the ways out, before any
    device is made."""
    n_devices = math.prod(sizes.values())
    if n_devices > max(available, budget):
        raise ValueError(f"mesh {sizes} needs {n_devices} devices; this process has "
                         f"{available} and makes at most --max_virtual_devices={budget} "
                         "virtual CPU devices: plan a smaller mesh (the data axis changes per-"
                         "device figures only through --per_device_batch, so --mesh.data=1 "
                         "plans the same rows), or raise --max_virtual_devices")
    return n_devices


def global_batch(config: runconfig.CascadeConfig, sizes: dict[str, int],
                 per_device_batch: int | None) -> int:
    if per_device_batch is None:
        return config.data.batch_size
    if per_device_batch < 1:
        raise ValueError(f"per_device_batch={per_device_batch} must be >= 1")
    return per_device_batch * math.prod(sizes[a] for a in sharding.BATCH_AXES)


# ------------------------------------------------------------------------ the steps


def stage_rows(stage: runconfig.StageConfig, batch_size: int, seq_len: int,
               fixed_batch: bool) -> tuple[int, int]:
    """(global batch, row length) of a stage's step: the run's, or a context stage's own rows
    (its batch_size too, unless `--per_device_batch` fixed the batch for every step)."""
    if stage.context is None:
        return batch_size, seq_len
    own_batch = stage.context.batch_size
    return (batch_size if fixed_batch or own_batch is None else own_batch,
            stage.context.seq_len)


def planned_steps(config: runconfig.CascadeConfig, batch_size: int, seq_len: int, *,
                  fixed_batch: bool = False) -> list[tuple[str, str, aot.StepSpec]]:
    """(name, teacher name, step) for the root and every stage, in run order. Shapes come from
    `cascade.plan_models` (the sizing and checks the cascade itself runs); each stage's step
    is its objective's own `step_spec`, on its own rows (`stage_rows`)."""
    root = config.root
    models = cascade.plan_models(config, cascade.root_model(root, from_files=False))
    if root.kind == "scratch":
        optimizer = steps_lib.make_optimizer(total_steps=root.steps,
                                             **root.optim.optimizer_kwargs())
        spec = aot.StepSpec("train", models[cascade.ROOT], batch_size, seq_len, optimizer)
    else:
        spec = aot.StepSpec("forward", models[cascade.ROOT], batch_size, seq_len,
                            micro_batches=config.cadence.eval_micro_batches)
    steps = [(cascade.ROOT, "", spec)]
    for stage in config.stages:
        objective = objectives.get(stage.objective)
        optimizer = steps_lib.make_optimizer(total_steps=stage.steps,
                                             **stage.optim.optimizer_kwargs())
        teacher = (stage.teacher_name if objectives.trains_on_teacher(stage.objective,
                                                                      stage.settings) else "")
        rows, length = stage_rows(stage, batch_size, seq_len, fixed_batch)
        steps.append((stage.name, teacher, objective.step_spec(
            models[stage.name], models[teacher] if teacher else None, stage.settings,
            optimizer=optimizer, batch_size=rows, seq_len=length,
            grad_accum=stage.grad_accum)))
    return steps


# ------------------------------------------------------------------------------ planning


def plan_step(name: str, teacher: str, spec: aot.StepSpec, mesh: jax.sharding.Mesh,
              count_flops: bool = True) -> dict[str, Any]:
    """One table row: analytic sizes, then XLA's memory and FLOPs of the compiled step."""
    analytic = aot.argument_bytes(spec, mesh)
    cost = aot.step_cost(spec, mesh)
    flops, flops_s = aot.exact_flops(spec, mesh) if count_flops else (math.nan, 0.0)
    memory = cost.memory
    return {
        "stage": name, "step": spec.kind, "teacher": teacher,
        "model": f"{spec.student.n_layers}/{spec.student.d_model}/{spec.student.d_ff}"
                 + (" tied" if spec.student.tie_embeddings else ""),
        "params": spec.student.num_params(),
        "teacher_params": spec.distill.teacher.num_params() if spec.distill else 0,
        "batch": f"{spec.batch_size}×{spec.seq_len}",
        "state_bytes": analytic["state"], "teacher_bytes": analytic.get("teacher", 0),
        "batch_bytes": analytic["batch"],
        "argument_bytes": memory.argument, "output_bytes": memory.output,
        "alias_bytes": memory.alias, "temp_bytes": memory.temp, "total_bytes": memory.total,
        "flops": flops,
        "analytic_flops": aot.analytic_flops(spec, mesh.size, sharding.context_shards(mesh)),
        "compile_s": cost.compile_s + flops_s,
    }


def run(config: runconfig.CascadeConfig | ml_collections.ConfigDict, sizes: dict[str, int], *,
        per_device_batch: int | None = None, count_flops: bool = True,
        only: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows for the root and every stage on a `sizes` mesh of this process's devices."""
    if not isinstance(config, runconfig.CascadeConfig):
        config = runconfig.cascade_config(config)
    n_devices = math.prod(sizes.values())
    if n_devices > jax.device_count():
        raise ValueError(f"mesh {sizes} needs {n_devices} devices but this process has "
                         f"{jax.device_count()}; run experiments.plan's main, which reruns "
                         "itself on that many virtual CPU devices")
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:n_devices])
    batch_size = global_batch(config, sizes, per_device_batch)
    steps = planned_steps(config, batch_size, config.data.seq_len,
                          fixed_batch=per_device_batch is not None)
    unknown = sorted(set(only or ()) - {name for name, _, _ in steps})
    if unknown:
        raise ValueError(f"--stages {unknown} are not in this config; choose from "
                         f"{[name for name, _, _ in steps]}")
    return [plan_step(name, teacher, spec, mesh, count_flops) for name, teacher, spec in steps
            if not only or name in only]


# ------------------------------------------------------------------------------- output


_COLUMNS = (
    ("stage", "stage"), ("step", "step"), ("model", "N/D/F"), ("params", "params"),
    ("teacher", "teacher"), ("batch", "global batch"),
    ("state_bytes", "params+opt GiB (analytic)"), ("teacher_bytes", "teacher GiB (analytic)"),
    ("argument_bytes", "argument GiB"), ("output_bytes", "output GiB"),
    ("temp_bytes", "temp GiB"), ("total_bytes", "total GiB"),
    ("flops", "TFLOP/step"), ("analytic_flops", "analytic TFLOP"), ("compile_s", "compile s"),
)


def _cell(key: str, value: Any) -> str:
    if key.endswith("_bytes"):
        return "–" if not value else f"{value / GIB:.3g}" if value >= 2**20 else "<0.001"
    if key.endswith("flops"):
        return "–" if value != value else f"{value / 1e12:.3g}"
    if key == "params":
        return f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"
    if key == "compile_s":
        return f"{value:.0f}"
    return str(value) or "–"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(k, row[k]) for k, _ in _COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def describe(sizes: dict[str, int]) -> str:
    """What the figures are: device kind, mesh, and how to read the columns."""
    platform = jax.devices()[0].platform
    where = (f"CPU-compiled estimate on {jax.device_count()} virtual host devices (XLA:CPU "
             "fuses and schedules differently from TPU/GPU compilers)" if platform == "cpu"
             else f"compiled for {jax.device_count()} {platform} devices")
    return "\n".join([
        f"Per-device figures, {where}; mesh data={sizes['data']} fsdp={sizes['fsdp']} "
        f"context={sizes['context']} tensor={sizes['tensor']}.",
        "total = argument + output − donated (aliased) + temp. params+opt: params, AdamW "
        "moments and step from the shard shapes alone (argument ≈ params+opt + teacher + "
        "batch).",
        "TFLOP/step: XLA's count per device, exact over depth (aot.exact_flops; remat "
        "recompute included; blockwise attention's loop over block pairs counted once); "
        "analytic: 2·weights + attention per token and forward (masked blocks skipped with "
        "attention_chunk, none under context > 1), ×3 trained (×4 with remat), ×1 for a "
        "frozen teacher, split evenly over devices.",
    ])


# --------------------------------------------------------------------------------- main


def _subprocess_env(n_devices: int) -> dict[str, str]:
    xla_flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "JAX_PLATFORMS": "cpu", _SUBPROCESS_ENV: "1",
            "XLA_FLAGS": f"{xla_flags} {_DEVICE_COUNT_FLAG}={n_devices}".strip(),
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH"))
                                          if p)}


def main(argv: list[str]) -> None:
    del argv
    quiet_logging()
    f = flags.FLAGS
    config = runconfig.cascade_config(f.config)  # every config error before any device exists
    sizes = mesh_sizes(config.mesh.sizes(), f.mesh.to_dict())
    n_devices = check_device_budget(sizes, jax.device_count(), f.max_virtual_devices)
    if n_devices > jax.device_count():
        if os.environ.get(_SUBPROCESS_ENV):
            raise RuntimeError(f"still {jax.device_count()} devices for a {n_devices}-device "
                               "mesh after setting XLA_FLAGS; is XLA_FLAGS overridden?")
        print(f"mesh needs {n_devices} devices, this process has {jax.device_count()}: "
              f"rerunning on {n_devices} virtual CPU devices and waiting for it (a large model "
              "takes 10–60 s a compile, several compiles a stage)", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "experiments.plan", *sys.argv[1:]],
                              env=_subprocess_env(n_devices), check=False)
        sys.exit(done.returncode)
    start = time.perf_counter()
    rows = run(config, sizes, per_device_batch=f.per_device_batch, count_flops=f.flops,
               only=f.stages)
    print(describe(sizes))
    print()
    print(markdown_table(rows))
    print(f"\n{len(rows)} steps planned in {time.perf_counter() - start:.0f} s")
    if f.json_out:
        with open(f.json_out, "w", encoding="utf-8") as out:
            json.dump({"mesh": sizes, "platform": jax.devices()[0].platform, "rows": rows},
                      out, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(last_line_is_the_cause(main))
