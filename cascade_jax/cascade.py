"""The cascade: train or load a root, then for each stage prune a parent into a child, distill
a teacher into it, save, and let the child be the next stage's parent (Ministral 3, Minitron).

A run directory holds one sub-directory per stage and is the unit of resumption:

    <workdir>/cascade.json            the config this directory belongs to (never clobbered)
    <workdir>/root/                   checkpoints/, metrics.jsonl, tb/, result.json
    <workdir>/<stage>/stage.json      child config, prune record (kept indices), lineage
    <workdir>/<stage>/importance.npz  the parent's scores (one scoring, reusable)
    <workdir>/<stage>/checkpoints/    step 0 = the pruned child before training, then every N
    <workdir>/results.{md,csv}, loss_curves.png, importance_<stage>.png

Every stage writes its `result.json` last, so a rerun of the same command skips finished
stages and resumes an unfinished one from its last checkpoint (state and data position), and
ends with the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from cascade_jax import checkpoint, data, evaluate, files, hf, model, prune, sharding, train
from cascade_jax.config import ModelConfig, rope_scaling_from
from cascade_jax.distill import losses
from cascade_jax.distill import step as distill_step
from cascade_jax.metrics import MetricWriter, read_metrics

ROOT = "root"
INITS = ("pruned", "random")
OBJECTIVES = ("kd", "ce")
ROOT_KINDS = ("scratch", "hf", "orbax")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One parent → child step of the cascade, as a config names it.

    parent: 'root' or an earlier stage, the model that is pruned.
    teacher: 'root' | 'parent' | an earlier stage | an Orbax checkpoint directory; the model
      distilled from (objective 'kd') and the one "KL to teacher" is measured against.
    init: 'pruned' (the parent pruned to `target`) or 'random' (the same shape from random
      init: the baseline pruning is compared with).
    objective: 'kd' (the `loss` spec) or 'ce' (next-token cross-entropy only, a baseline).
    grad_accum: micro-batches per step (the global batch is unchanged; activations of one
      micro-batch live at a time).
    baseline: a comparison row; it never changes what the main stages do.
    """

    name: str
    parent: str
    teacher: str
    target: prune.Target
    init: str = "pruned"
    objective: str = "kd"
    loss: losses.LossSpec = dataclasses.field(default_factory=losses.LossSpec)
    depth_method: str = "block_influence"
    head_method: str = "within_group"
    hidden_method: str | None = "channel"
    steps: int = 100
    optim: dict[str, float] = dataclasses.field(default_factory=dict)
    calib_batches: int = 8
    grad_accum: int = 1
    baseline: bool = False


def _stage_from_config(name: str, c: ml_collections.ConfigDict) -> Stage:
    known = {f.name for f in dataclasses.fields(Stage)} - {"name"}
    unknown = sorted(set(c.keys()) - known)
    if unknown:
        raise ValueError(f"stage {name!r} has unknown fields {unknown}; known: {sorted(known)}")
    fields = c.to_dict()
    fields["target"] = prune.Target(**fields.get("target", {}))
    fields["loss"] = losses.LossSpec(**fields.get("loss", {}))
    if "hidden_method" in fields and not fields["hidden_method"]:
        fields["hidden_method"] = None  # '' or None in a config: d_model stays
    return Stage(name=name, **fields)


def stages_from_config(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages in `config.stage_order`, checked: every parent and teacher exists earlier.

    The order is explicit because a ConfigDict iterates its keys sorted, not as written.
    """
    order, defined = list(config.stage_order), sorted(config.stages.keys())
    if sorted(order) != defined:
        raise ValueError(f"stage_order={order} must list every stage in config.stages exactly "
                         f"once: {defined}")
    stages: list[Stage] = []
    for name in order:
        stage = _stage_from_config(name, config.stages[name])
        earlier = [ROOT] + [s.name for s in stages]
        if name in earlier or not name.isidentifier():
            raise ValueError(f"stage name {name!r} must be a new identifier (not one of "
                             f"{earlier})")
        if stage.parent not in earlier:
            raise ValueError(f"stage {name!r}: parent={stage.parent!r} is not 'root' or an "
                             f"earlier stage; choose from {earlier}")
        if stage.teacher not in [*earlier, "parent"] and not os.path.isdir(stage.teacher):
            raise ValueError(f"stage {name!r}: teacher={stage.teacher!r} is neither 'parent', "
                             f"one of {earlier}, nor an existing checkpoint directory")
        if stage.init not in INITS or stage.objective not in OBJECTIVES:
            raise ValueError(f"stage {name!r}: init={stage.init!r} must be one of {INITS} and "
                             f"objective={stage.objective!r} one of {OBJECTIVES}")
        if stage.steps < 1:
            raise ValueError(f"stage {name!r}: steps={stage.steps} must be >= 1")
        if not isinstance(stage.grad_accum, int) or stage.grad_accum < 1:
            raise ValueError(f"stage {name!r}: grad_accum={stage.grad_accum!r} must be a "
                             "positive integer (1 = no accumulation)")
        stages.append(stage)
    return stages


def _teacher_name(stage: Stage) -> str:
    return stage.parent if stage.teacher == "parent" else stage.teacher


# ------------------------------------------------------------------------ the run directory


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Create `workdir` for `config`, or accept it if it already holds this config's run.

    A directory holding a different config is refused rather than clobbered; only the
    fields that cannot change results (progress, logging) may differ between restarts.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "cascade.json")
    wanted = _identity(config.to_dict())
    if os.path.exists(path):
        held = _identity(files.read_json(path))
        if held != wanted:
            changed = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise ValueError(
                f"{workdir} holds a cascade run of a different config (differs in {changed}); "
                "rerun with the same config to resume, or pass a new --config.workdir")
        return
    if jax.process_index() == 0:
        files.write_json(path, config.to_dict())


_VOLATILE = ("workdir", "progress", "log_every")


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE},
                                 sort_keys=True, default=str))


@dataclasses.dataclass
class Trained:
    """A finished model of the run: its config, params (sharded) and where it lives."""

    name: str
    cfg: ModelConfig
    params: model.Params
    directory: str


def _restore_params(directory: str, cfg: ModelConfig, mesh: Mesh) -> model.Params:
    target = train.abstract_like(model.param_shapes(cfg), sharding.param_shardings(cfg, mesh))
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore({"params": target}, partial=True).state["params"]


def load_checkpoint_model(directory: str, mesh: Mesh) -> tuple[ModelConfig, model.Params]:
    """(config, params) of the latest step in an Orbax checkpoint directory written by
    cascade_jax (its metadata holds the model config)."""
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        metadata = ckpt.read_metadata()
    if "model" not in metadata:
        raise ValueError(f"{directory} has no 'model' config in its checkpoint metadata; "
                         "it was not written by cascade_jax")
    cfg = ModelConfig.from_dict(metadata["model"])
    return cfg, _restore_params(directory, cfg, mesh)


# ------------------------------------------------------------------------------ the context


@dataclasses.dataclass
class _Run:
    """What every stage of one run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    datasets: data.Datasets
    models: dict[str, Trained]
    progress: bool

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def evaluator(self, cfg: ModelConfig, teacher: Trained | None
                  ) -> Callable[[model.Params], dict[str, float]]:
        return evaluate.evaluator(
            cfg, self.mesh, lambda: iter(self.datasets.validation),
            max_batches=self.config.eval_batches or None,
            teacher_cfg=None if teacher is None else teacher.cfg,
            teacher_params=None if teacher is None else teacher.params,
            micro_batches=self.config.get("eval_micro_batches", 1))

    def fit(self, directory: str, *, step_fn: Any, abstract_state: Any, make_state: Any,
            steps: int, evaluate_fn: Any, metadata: dict[str, Any], save_initial: bool
            ) -> int:
        c = self.config
        _, tokens = train.fit_with_checkpoints(
            directory, step_fn=step_fn, abstract_state=abstract_state, make_state=make_state,
            batches=iter(self.datasets.train), mesh=self.mesh, total_steps=steps,
            evaluate_fn=evaluate_fn, metadata=metadata, log_every=c.log_every,
            eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
            keep_checkpoints=c.keep_checkpoints, save_initial=save_initial,
            progress=self.progress)
        return tokens

    def model(self, name: str) -> Trained:
        """A finished model by stage name, or from a checkpoint path (loaded once)."""
        if name not in self.models:
            cfg, params = load_checkpoint_model(name, self.mesh)
            self.models[name] = Trained(name, cfg, params, name)
        return self.models[name]


def _optimizer(steps: int, optim: dict[str, float]) -> Any:
    return train.make_optimizer(total_steps=steps, **optim)


def _final_state_params(directory: str, cfg: ModelConfig, mesh: Mesh) -> model.Params:
    return _restore_params(os.path.join(directory, "checkpoints"), cfg, mesh)


def _result(stage: str, cfg: ModelConfig, tokens: int, wall_s: float, directory: str,
            baseline: bool, teacher: str | None) -> dict[str, Any]:
    final = read_metrics(directory, "validation")[-1]
    return {"stage": stage, "baseline": baseline, "teacher": teacher or "",
            "params": cfg.num_params(), "tokens": tokens,
            "validation_loss": final["loss"], "perplexity": final["perplexity"],
            "kl_to_teacher": final.get("kl", float("nan")),
            "top1_agreement": final.get("agree", float("nan")), "wall_s": wall_s}


# -------------------------------------------------------------------------------- the root


# How a loaded root is *run* (not its shape): taken from `config.root.model` when it sets them,
# so a bf16, rematerialised 24B root is not run in the file's float32 without remat.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attention_chunk")


def with_runtime_settings(cfg: ModelConfig, root: ml_collections.ConfigDict) -> ModelConfig:
    """`cfg` (read from the root's files) with the runtime fields `root.model` gives.

    Shape fields of `root.model` that disagree with the files are logged, not applied: the
    files are the model; `root.model` only describes it for `experiments.plan`.
    """
    block = root.get("model") or {}
    given = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
    changes = {name: given[name] for name in RUNTIME_FIELDS if given.get(name) is not None}
    stored = cfg.to_dict()
    differ = sorted(name for name, value in given.items()
                    if name not in RUNTIME_FIELDS and name in stored
                    and _disagrees(cfg, name, value))
    if differ:
        logging.warning("config.root.model disagrees with %s on %s; using the files' values",
                        root.path, {name: (given[name], stored[name]) for name in differ})
    return cfg.replace(**changes)


def _disagrees(cfg: ModelConfig, name: str, value: Any) -> bool:
    """Whether a `root.model` field differs from the files' config; RoPE scaling compared as
    the choice it becomes (Llama 3.1's old 4-tuple equals its tagged dict)."""
    if name == "rope_scaling":
        return rope_scaling_from(value) != cfg.rope_scaling
    return value != getattr(cfg, name)


def _root_config(run: _Run) -> ModelConfig:
    root = run.config.root
    if root.kind == "hf":
        return with_runtime_settings(hf.read_config(root.path), root)
    if root.kind == "orbax":
        with checkpoint.Checkpointer(root.path, read_only=True) as ckpt:
            return with_runtime_settings(ModelConfig.from_dict(ckpt.read_metadata()["model"]),
                                         root)
    return train.model_config_from(root, run.datasets.tokenizer.get_vocab_size())


def run_root(run: _Run) -> dict[str, Any]:
    """Stage 0: train the root from scratch, or load it from Hugging Face / Orbax files."""
    root, directory = run.config.root, run.stage_dir(ROOT)
    if root.kind not in ROOT_KINDS:
        raise ValueError(f"root.kind={root.kind!r} must be one of {ROOT_KINDS}")
    cfg = _root_config(run)
    result_path = os.path.join(directory, "result.json")
    start = time.perf_counter()
    if root.kind == "scratch":
        optimizer = _optimizer(root.steps, root.optim.to_dict())

        def make_state() -> train.TrainState:
            return train.create_state(cfg, optimizer, jax.random.key(run.config.seed), run.mesh)

        if not os.path.exists(result_path):
            tokens = run.fit(
                directory, step_fn=train.jit_train_step(cfg, optimizer, run.mesh),
                abstract_state=train.abstract_like(
                    jax.eval_shape(make_state), train.state_shardings(cfg, optimizer, run.mesh)),
                make_state=make_state, steps=root.steps, evaluate_fn=run.evaluator(cfg, None),
                metadata=_lineage(run, ROOT, cfg, parent=None, extra={"kind": "scratch"}),
                save_initial=False)
            _write_result(result_path, _result(ROOT, cfg, tokens, time.perf_counter() - start,
                                               directory, False, None))
        params = _final_state_params(directory, cfg, run.mesh)
    else:
        if root.kind == "hf":
            _, params = hf.load(root.path, dtype=cfg.param_dtype,
                                shardings=sharding.param_shardings(cfg, run.mesh))
        else:
            _, params = load_checkpoint_model(root.path, run.mesh)
            params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
        if not os.path.exists(result_path):
            os.makedirs(directory, exist_ok=True)
            scores = run.evaluator(cfg, None)(params)
            with MetricWriter(directory) as writer:
                writer.write(0, "validation", scores)
            _write_result(result_path, _result(ROOT, cfg, 0, time.perf_counter() - start,
                                               directory, False, None))
    run.models[ROOT] = Trained(ROOT, cfg, params, directory)
    return files.read_json(result_path)


def _write_result(path: str, result: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        files.write_json(path, result)


def _lineage(run: _Run, stage: str, cfg: ModelConfig, *, parent: Trained | None,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata saved with every checkpoint of a stage (tokens seen is added per step)."""
    return {"kind": "cascade_stage", "stage": stage, "model": cfg.to_dict(),
            "parent": None if parent is None else os.path.join(parent.directory, "checkpoints"),
            "config": run.config.to_dict(), "code_revision": train.code_revision(), **extra}


# ------------------------------------------------------------------------------- a stage


def _calibration_batches(run: _Run, stage_index: int) -> Iterator[dict[str, np.ndarray]]:
    """Training-split batches in an order of their own (never the validation split)."""
    calib = data.datasets_from_config(run.config.data,
                                      seed=run.config.seed + 1000 + stage_index)
    return iter(calib.train)


def _make_child(run: _Run, stage: Stage, stage_index: int, parent: Trained
                ) -> tuple[ModelConfig, model.Params | None, dict[str, Any]]:
    """(child config, child params or None for a random init, stage record)."""
    directory = run.stage_dir(stage.name)
    os.makedirs(directory, exist_ok=True)
    if stage.init == "random":
        child_cfg = stage.target.child_config(parent.cfg)
        return child_cfg, None, {"init": "random"}
    importance_path = os.path.join(directory, "importance.npz")
    if os.path.exists(importance_path):
        scores = prune.Importance.load(importance_path, parent.cfg)
    else:
        scores = prune.estimate_importance(
            parent.cfg, parent.params, _calibration_batches(run, stage_index), mesh=run.mesh,
            max_batches=stage.calib_batches, progress=run.progress)
        scores.save(importance_path)
    out = prune.prune(parent.cfg, parent.params, scores, stage.target,
                      depth_method=stage.depth_method, head_method=stage.head_method,
                      hidden_method=stage.hidden_method)
    return out.cfg, out.params, {"init": "pruned", "importance": importance_path,
                                 "record": out.record.to_dict()}


def run_stage(run: _Run, stage: Stage, stage_index: int) -> dict[str, Any]:
    """Prune (or init), train (KD or CE), evaluate and record one stage; resumable."""
    directory = run.stage_dir(stage.name)
    result_path = os.path.join(directory, "result.json")
    stage_path = os.path.join(directory, "stage.json")
    parent = run.models[stage.parent]
    teacher = run.model(_teacher_name(stage))
    start = time.perf_counter()
    if not os.path.exists(result_path):
        child_params = None
        if checkpoint.latest_step(os.path.join(directory, "checkpoints")) is not None:
            record = files.read_json(stage_path)  # step 0 at least holds the pruned child
            child_cfg = ModelConfig.from_dict(record["model"])
        else:
            child_cfg, child_params, record = _make_child(run, stage, stage_index, parent)
            record = {"model": child_cfg.to_dict(), "parent": stage.parent,
                      "teacher": teacher.name, **record}
            _write_result(stage_path, record)
        tokens = _train_stage(run, stage, child_cfg, child_params, parent, teacher, record)
        _write_result(result_path, _result(stage.name, child_cfg, tokens,
                                           time.perf_counter() - start, directory,
                                           stage.baseline, teacher.name))
    result = files.read_json(result_path)
    cfg = ModelConfig.from_dict(files.read_json(stage_path)["model"])
    run.models[stage.name] = Trained(stage.name, cfg,
                                     _final_state_params(directory, cfg, run.mesh), directory)
    return result


def _train_stage(run: _Run, stage: Stage, cfg: ModelConfig, child_params: model.Params | None,
                 parent: Trained, teacher: Trained, record: dict[str, Any]) -> int:
    optimizer = _optimizer(stage.steps, stage.optim)
    rng = jax.random.key(run.config.seed + 1)
    metadata = _lineage(run, stage.name, cfg, parent=parent,
                        extra={"teacher": teacher.directory,
                               "importance": record.get("importance"),
                               "record": record.get("record"), "target": stage.target.to_dict()})
    if stage.objective == "kd":
        dcfg = distill_step.DistillConfig(student=cfg, teacher=teacher.cfg, loss=stage.loss,
                                          grad_accum=stage.grad_accum)
        step_fn = distill_step.with_teacher(
            distill_step.jit_train_step(dcfg, optimizer, run.mesh), teacher.params)
        shardings = distill_step.state_shardings(dcfg, optimizer, run.mesh)

        def make_state() -> train.TrainState:
            return distill_step.create_state(dcfg, optimizer, run.mesh, rng=rng,
                                             model_params=child_params)
    else:
        step_fn = train.jit_train_step(cfg, optimizer, run.mesh, grad_accum=stage.grad_accum)
        shardings = train.state_shardings(cfg, optimizer, run.mesh)

        def make_state() -> train.TrainState:
            if child_params is None:
                return train.create_state(cfg, optimizer, rng, run.mesh)
            return jax.jit(lambda p: train.init_state(cfg, optimizer, p),
                           out_shardings=shardings)(child_params)

    abstract = train.abstract_like(
        jax.eval_shape(lambda: train.init_state(cfg, optimizer, model.param_shapes(cfg)))
        if stage.objective == "ce" else
        jax.eval_shape(lambda: train.init_state(cfg, optimizer, distill_step.param_shapes(dcfg))),
        shardings)
    return run.fit(run.stage_dir(stage.name), step_fn=step_fn, abstract_state=abstract,
                   make_state=make_state, steps=stage.steps,
                   evaluate_fn=run.evaluator(cfg, teacher), metadata=metadata,
                   save_initial=True)


# ----------------------------------------------------------------------------- the results


COLUMNS = ("stage", "baseline", "teacher", "params", "tokens", "validation_loss", "perplexity",
           "kl_to_teacher", "top1_agreement", "wall_s")


def results_csv(results: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    return out.getvalue()


def _cell(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "baseline" if value else ""
    if name == "params":
        return f"{value / 1e6:.2f}M"
    if name == "tokens":
        return f"{value / 1e6:.2f}M" if value else "0"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.1f}" if name == "wall_s" else f"{value:.3f}"
    return str(value)


def results_markdown(results: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(c, r.get(c, "")) for c in COLUMNS) + " |" for r in results]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_loss_curves(run_dir: str, names: list[str]) -> Any:
    """Training objective and validation cross-entropy of every stage against its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        directory = os.path.join(run_dir, name)
        train_records = read_metrics(directory, "train")
        val_records = read_metrics(directory, "validation")
        ax_train.plot([r["step"] for r in train_records], [r["loss"] for r in train_records],
                      label=name)
        ax_val.plot([r["step"] for r in val_records], [r["loss"] for r in val_records],
                    marker="o", label=name)
    ax_train.set(title="training objective (CE or KD)", xlabel="step", ylabel="nats/token")
    ax_val.set(title="validation cross-entropy", xlabel="step", ylabel="nats/token")
    ax_val.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_report(run_dir: str, results: list[dict[str, Any]]) -> None:
    """results.md / results.csv, loss_curves.png and importance_<stage>.png (process 0)."""
    if jax.process_index() != 0:
        return
    import matplotlib.pyplot as plt

    from cascade_jax import plots

    markdown = results_markdown(results)
    files.atomic_write(os.path.join(run_dir, "results.md"), lambda f: f.write(markdown.encode()))
    table = results_csv(results)
    files.atomic_write(os.path.join(run_dir, "results.csv"), lambda f: f.write(table.encode()))
    fig = plot_loss_curves(run_dir, [r["stage"] for r in results])
    fig.savefig(os.path.join(run_dir, "loss_curves.png"), dpi=110)
    plt.close(fig)
    for r in results:
        path = os.path.join(run_dir, r["stage"], "importance.npz")
        if os.path.exists(path):
            fig = plots.plot_layer_importance(prune.Importance.load(path))
            fig.suptitle(f"layer importance of {r['stage']}'s parent")
            fig.savefig(os.path.join(run_dir, f"importance_{r['stage']}.png"), dpi=110)
            plt.close(fig)


# ------------------------------------------------------------------------------ the entry


def run(config: ml_collections.ConfigDict, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) every stage of `config` (see configs/tiny_cascade.py); returns the
    results table's rows, root first."""
    workdir = os.path.abspath(config.workdir)
    stages = stages_from_config(config)
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    for micro in {1, config.get("eval_micro_batches", 1), *(s.grad_accum for s in stages)}:
        sharding.check_batch_split(config.data.batch_size, mesh, micro)
    claim_workdir(workdir, config)
    run_state = _Run(config=config, workdir=workdir, mesh=mesh,
                     datasets=data.datasets_from_config(config.data, seed=config.seed),
                     models={}, progress=progress)
    results = [run_root(run_state)]
    logging.info("root: %s", results[-1])
    for index, stage in enumerate(stages):
        results.append(run_stage(run_state, stage, index))
        logging.info("%s: %s", stage.name, results[-1])
    write_report(workdir, results)
    return results
