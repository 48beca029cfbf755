"""The cascade: train or load a root, then for each stage prune a parent into a child, distill
a teacher into it, save, and let the child be the next stage's parent (Ministral 3, Minitron).

A run directory holds one sub-directory per stage and is the unit of resumption:

    <workdir>/cascade.json            the config this directory belongs to (never clobbered)
    <workdir>/root/                   checkpoints/, metrics.jsonl, tb/, result.json
    <workdir>/<stage>/stage.json      child config, prune record (kept indices), lineage
    <workdir>/<stage>/importance.npz  the parent's scores (one scoring, reusable)
    <workdir>/<stage>/checkpoints/    step 0 = the pruned child before training, then every N
    <workdir>/<group>_<objective>/    stages trained together (`codistill`): the joint state's
                                      checkpoints/ and metrics; each member's final state is
                                      then written as its own <stage>/checkpoints/
    <workdir>/results.{md,csv}, loss_curves.png, importance_<stage>.png
    <workdir>/task_accuracy.png       on a task run: pass@1 by generation per stage

Every stage writes its `result.json` last, so a rerun of the same command skips finished
stages and resumes an unfinished one from its last checkpoint (state and data position), and
ends with the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from cascade_jax import (
    checkpoint,
    data,
    evaluate,
    files,
    gguf,
    hf,
    loop,
    model,
    objectives,
    prune,
    rundir,
    sharding,
    steps,
    tasks,
    train,
)
from cascade_jax.config import ModelConfig, rope_scaling_from
from cascade_jax.metrics import MetricWriter, read_metrics
from cascade_jax.objectives import StageContext, Trained
from cascade_jax.runconfig import (
    ROOT,
    CascadeConfig,
    RootConfig,
    StageConfig,
    cascade_config,
)

__all__ = ["ROOT", "CascadeConfig", "StageConfig", "Trained", "child_model", "claim_workdir",
           "load_checkpoint_model", "plan_models", "positions_markdown", "results_csv",
           "results_markdown", "root_model", "run", "run_datasets", "stage_data",
           "write_report"]


# ------------------------------------------------------------------------ the run directory


def claim_workdir(directory: str, config: dict[str, Any]) -> None:
    """Make `directory` this cascade's run directory (`owner.json`, and the config as written
    in `cascade.json`), or accept it if it already holds this config's run.

    A directory holding a different config, another tool's run or unrelated files is refused
    untouched (`rundir.claim`); only the fields that cannot change results (progress,
    logging, evaluation cadence) may differ between restarts.
    """
    write = jax.process_index() == 0
    rundir.claim(directory, tool="cascade", config=rundir.identity(config),
                  legacy=_legacy_identity, write=write)
    path = os.path.join(directory, "cascade.json")
    if write and not os.path.exists(path):
        files.write_json(path, config)



def _legacy_identity(directory: str) -> dict[str, Any] | None:
    """A run written before owner files existed is recognised by its `cascade.json`."""
    path = os.path.join(directory, "cascade.json")
    return rundir.identity(files.read_json(path)) if os.path.exists(path) else None


def _restore_params(directory: str, cfg: ModelConfig, mesh: Mesh,
                    step: int | None = None) -> model.Params:
    target = steps.abstract_like(model.param_shapes(cfg), sharding.param_shardings(cfg, mesh))
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore({"params": target}, step=step, partial=True).state["params"]


def checkpoint_model_config(directory: str) -> ModelConfig:
    """The model config an Orbax checkpoint directory of cascade_jax records in its metadata."""
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
        metadata = ckpt.read_metadata()
    if "model" not in metadata:
        raise ValueError(f"{directory} has no 'model' config in its checkpoint metadata; "
                         "it was not written by cascade_jax")
    return ModelConfig.from_dict(metadata["model"])


def load_checkpoint_model(directory: str, mesh: Mesh, step: int | None = None
                          ) -> tuple[ModelConfig, model.Params]:
    """(config, params) of `step` (default the latest) in an Orbax checkpoint directory
    written by cascade_jax (its metadata holds the model config)."""
    cfg = checkpoint_model_config(directory)
    return cfg, _restore_params(directory, cfg, mesh, step)


# ---------------------------------------------------------------------- sizing, before work


# How a loaded root is *run* (not its shape): taken from `config.root.model` when it sets them,
# so a bf16, rematerialised 24B root is not run in the file's float32 without remat.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attention_chunk",
                  "attention_impl", "splash_interpret")


def with_runtime_settings(cfg: ModelConfig, root: RootConfig) -> ModelConfig:
    """`cfg` (read from the root's files) with the runtime fields `root.model` gives.

    Shape fields of `root.model` that disagree with the files are logged, not applied: the
    files are the model; `root.model` only describes it for `experiments.plan`.
    """
    given = dict(root.model or {})
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


def root_model(root: RootConfig, *, from_files: bool = True) -> ModelConfig:
    """The root's config: `root.model` for a scratch root; read from `root.path` (with
    `root.model`'s runtime fields) for a loaded one. `from_files=False` takes `root.model`
    as is when given (planning before the files exist)."""
    if root.kind == "scratch" or (not from_files and root.model):
        return ModelConfig.from_dict(root.model)
    if root.kind == "hf":
        return with_runtime_settings(hf.read_config(root.require_path()), root)
    return with_runtime_settings(checkpoint_model_config(root.require_path()), root)


def child_model(parent: ModelConfig, stage: StageConfig) -> ModelConfig:
    """The child's shape as the stage makes it, checked: the parent itself ('parent'), the
    target's shape ('random'), or what `prune.prune` returns ('pruned')."""
    if stage.init == "parent":
        return parent if stage.context is None else stage.context.child_config(parent)
    methods = dict(depth_method=stage.depth_method, head_method=stage.head_method,
                   hidden_method=stage.hidden_method)
    if stage.init == "random":  # no surgery: only the shape (and tying) matter
        methods = dict(init="random")
    try:
        return prune.child_config(parent, stage.target, **methods)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{stage.key}.target: {error}") from None


def plan_models(config: CascadeConfig, root: ModelConfig | None = None
                ) -> dict[str, ModelConfig]:
    """Every model the run will make or read, by name (stages, the root, teachers given as
    checkpoint paths), from configs alone: each stage's target checked against its parent
    and each teacher's vocabulary against its student's, in the first seconds of a run."""
    models = {ROOT: root if root is not None else root_model(config.root)}
    for stage in config.stages:
        models[stage.name] = child_model(models[stage.parent], stage)
        teacher = stage.teacher_name
        if teacher not in models:
            models[teacher] = checkpoint_model_config(teacher)
        if models[teacher].vocab_size != models[stage.name].vocab_size:
            raise ValueError(f"{stage.key}.teacher={stage.teacher!r} has vocab_size="
                             f"{models[teacher].vocab_size} but the child has "
                             f"{models[stage.name].vocab_size}; a teacher must share the "
                             "student's tokenizer")
        check_teacher_context(stage, models[teacher])
    return models


def stage_data(config: CascadeConfig, stage: StageConfig) -> data.DataConfig:
    """The rows a stage trains and evaluates on: the run's, or its context block's longer
    ones (the same source and tokenizer)."""
    return config.data if stage.context is None else stage.context.data(config.data)


def check_teacher_context(stage: StageConfig, teacher: ModelConfig) -> None:
    """A context stage whose objective learns from its teacher needs a teacher that takes its
    rows: targets beyond a teacher's context are its untrained extrapolation."""
    if stage.context is None or not objectives.trains_on_teacher(stage.objective,
                                                                 stage.settings):
        return
    key = f"{stage.context.key}.seq_len"
    if stage.context.seq_len > teacher.max_seq_len:
        raise ValueError(f"{key}={stage.context.seq_len} exceeds the teacher "
                         f"{stage.teacher_name!r}'s max_seq_len={teacher.max_seq_len}, and "
                         f"objective={stage.objective!r} learns from its predictions there; "
                         f"lower {key} to {teacher.max_seq_len}, or train with a teacher-free "
                         "objective (objective='ce')")


def _covers(cfg: ModelConfig, data_config: data.DataConfig) -> bool:
    return data_config.seq_len <= cfg.max_seq_len


def check_positions(cfg: ModelConfig, seq_len: int, name: str) -> None:
    """Packed rows put positions 0 .. seq_len - 1 through the model: no more than it takes."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"config.data.seq_len={seq_len} exceeds {name}'s max_seq_len="
                         f"{cfg.max_seq_len}; shorten the rows (--config.data.seq_len="
                         f"{cfg.max_seq_len}) or extend the model's context first")


# ------------------------------------------------------------------------------ the context


class _Run:
    """What every stage of one run shares."""

    def __init__(self, config: CascadeConfig, workdir: str, mesh: Mesh,
                 datasets: data.Datasets, progress: bool):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.datasets, self.progress = datasets, progress
        self.models: dict[str, Trained] = {}
        self._stage_datasets: dict[tuple[int, int], data.Datasets] = {}

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def stage_datasets(self, stage: StageConfig) -> data.Datasets:
        """The run's datasets, or a context stage's longer rows (built once per shape)."""
        rows = stage_data(self.config, stage)
        if rows is self.config.data:
            return self.datasets
        shape = (rows.seq_len, rows.batch_size)
        if shape not in self._stage_datasets:
            self._stage_datasets[shape] = run_datasets(self.config, seed=self.config.seed,
                                                       data_config=rows)
        return self._stage_datasets[shape]

    def evaluator(self, cfg: ModelConfig, teacher: Trained | None,
                  datasets: data.Datasets | None = None) -> loop.EvaluateFn:
        """Validation on the run's rows, or (`datasets`) a context stage's long rows, whose
        logits are then made a block of positions at a time even without a teacher."""
        cadence = self.config.cadence
        return evaluate.evaluator(
            cfg, self.mesh, lambda: iter((datasets or self.datasets).validation),
            max_batches=cadence.eval_batches or None,
            teacher_cfg=None if teacher is None else teacher.cfg,
            teacher_params=None if teacher is None else teacher.params,
            micro_batches=cadence.eval_micro_batches,
            chunk_size=None if datasets is None else evaluate.CHUNK)

    def fit(self, directory: str, built: objectives.Built, *, steps_: int,
            evaluate_fn: loop.EvaluateFn, metadata: dict[str, Any], save_initial: bool
            ) -> tuple[Any, int]:
        """(the final state, tokens seen) of `built` trained (or resumed) in `directory`."""
        cadence = self.config.cadence
        return loop.fit_with_checkpoints(
            directory, step_fn=built.step_fn, abstract_state=built.abstract_state,
            make_state=built.make_state, batches=built.batches, mesh=self.mesh,
            total_steps=steps_, evaluate_fn=evaluate_fn, metadata=metadata,
            log_every=cadence.log_every, eval_every=cadence.eval_every,
            checkpoint_every=cadence.checkpoint_every,
            keep_checkpoints=cadence.keep_checkpoints, save_initial=save_initial,
            progress=self.progress, prepare_batch=built.prepare_batch)

    def model(self, name: str) -> Trained:
        """A finished model by stage name, or from a checkpoint path (loaded once)."""
        if name not in self.models:
            cfg, params = load_checkpoint_model(name, self.mesh)
            self.models[name] = Trained(name, cfg, params, name, checkpoint.fingerprint(name))
        return self.models[name]


def _final_state_params(directory: str, cfg: ModelConfig, mesh: Mesh) -> model.Params:
    return _restore_params(os.path.join(directory, "checkpoints"), cfg, mesh)


def _result(stage: str, cfg: ModelConfig, tokens: int, wall_s: float, directory: str,
            baseline: bool, teacher: str | None, fingerprint: str,
            task_columns: dict[str, float]) -> dict[str, Any]:
    final = read_metrics(directory, "validation")[-1]
    return {"stage": stage, "baseline": baseline, "teacher": teacher or "",
            "fingerprint": fingerprint,
            "params": cfg.num_params(), "tokens": tokens,
            "validation_loss": final["loss"], "perplexity": final["perplexity"],
            "kl_to_teacher": final.get("kl_to_teacher", float("nan")),
            "top1_agreement": final.get("top1_agreement", float("nan")), **task_columns,
            "wall_s": wall_s}


def task_columns(run: _Run, cfg: ModelConfig, params: model.Params) -> dict[str, float]:
    """A task run's scores by generation (`evaluate.task_scores`) per evaluation split:
    `pass@1`, `well_formed`, `length` (+ `maj@k`, `pass@k`) on held-out problems, the same
    with `_harder` on the harder split. Empty without a task."""
    task_config = run.config.task
    if task_config is None:
        return {}
    out = {}
    for split in task_config.eval_splits():
        problems = task_config.task.make_problems(split, task_config.eval_problems,
                                                  seed=run.config.seed)
        scores = evaluate.task_scores(
            cfg, params, task_config.task, run.datasets.tokenizer, problems,
            samples=task_config.eval_samples, temperature=task_config.eval_temperature,
            rng=jax.random.key(run.config.seed + 7), mesh=run.mesh)
        suffix = "" if split == tasks.VALIDATION else f"_{split}"
        out.update({f"{name}{suffix}": value for name, value in scores.items()})
    return out


def model_columns(run: _Run, cfg: ModelConfig, params: model.Params) -> dict[str, Any]:
    """Every column a model's row gets beyond its validation figures: task scores
    (`task_columns`), the `config.report` figures (`report_columns`) and its greedy
    continuations of the report's prompts (a list: continuations.md, not the table)."""
    out: dict[str, Any] = {**task_columns(run, cfg, params),
                           **report_columns(run, cfg, params)}
    report = run.config.report
    if report.prompts:
        out["continuations"] = evaluate.greedy_continuations(
            cfg, params, run.datasets.tokenizer, report.prompts,
            max_new_tokens=report.max_new_tokens, mesh=run.mesh)
    return out


def report_columns(run: _Run, cfg: ModelConfig, params: model.Params) -> dict[str, float]:
    """Perplexity on every `data.eval_sources` domain, and forward KL / top-1 agreement to
    `report.kl_to` on the validation split and on each domain (`kl_to_<name>`,
    `<domain>_kl_to_<name>`, ...): every row compared with one reference, baselines
    included. The reference's own row (made before it is loaded) has no KL columns."""
    kl_to = run.config.report.kl_to
    reference = run.models.get(kl_to) if kl_to else None
    cadence = run.config.cadence
    out: dict[str, float] = {}
    domains = {"": run.datasets.validation, **run.datasets.eval_domains}
    for domain, dataset in domains.items():
        if not domain and reference is None:
            continue  # the validation split's own figures are already in the row
        scores = evaluate.evaluator(
            cfg, run.mesh, lambda dataset=dataset: iter(dataset),
            max_batches=cadence.eval_batches or None,
            teacher_cfg=None if reference is None else reference.cfg,
            teacher_params=None if reference is None else reference.params,
            micro_batches=cadence.eval_micro_batches)(params)
        prefix = f"{domain}_" if domain else ""
        if domain:
            out[f"{prefix}perplexity"] = scores["perplexity"]
        if reference is not None:
            out[f"{prefix}kl_to_{kl_to}"] = scores["kl_to_teacher"]
            out[f"{prefix}top1_to_{kl_to}"] = scores["top1_agreement"]
    return out


# -------------------------------------------------------------------------------- the root


def run_root(run: _Run, cfg: ModelConfig) -> dict[str, Any]:
    """Stage 0: train the root from scratch, or load it from Hugging Face / Orbax files."""
    root, directory = run.config.root, run.stage_dir(ROOT)
    result_path = os.path.join(directory, "result.json")
    start = time.perf_counter()
    if root.kind == "scratch":
        optimizer = steps.make_optimizer(total_steps=root.steps,
                                         **root.optim.optimizer_kwargs())
        shardings = steps.model_state_shardings(cfg, optimizer, run.mesh)

        def make_state() -> steps.TrainState:
            return steps.create_state(cfg, optimizer, jax.random.key(run.config.seed), run.mesh)

        if not os.path.exists(result_path):
            built = objectives.Built(
                step_fn=steps.jit_ce_train_step(cfg, optimizer, run.mesh),
                abstract_state=steps.abstract_state(optimizer, model.param_shapes(cfg),
                                                    shardings),
                make_state=make_state, batches=iter(run.datasets.train))
            _, tokens = run.fit(directory, built, steps_=root.steps,
                                evaluate_fn=run.evaluator(cfg, None),
                                metadata=_lineage(run, ROOT, cfg, parent=None,
                                                  extra={"kind": "scratch"}),
                                save_initial=False)
            params = _final_state_params(directory, cfg, run.mesh)
            _write_result(result_path, _result(ROOT, cfg, tokens, time.perf_counter() - start,
                                               directory, False, None,
                                               _checkpoint_fingerprint(directory),
                                               model_columns(run, cfg, params)))
        params = _final_state_params(directory, cfg, run.mesh)
        fingerprint = _checkpoint_fingerprint(directory)
    else:
        if root.kind == "hf":
            _, params = hf.load(root.path, dtype=cfg.param_dtype,
                                shardings=sharding.param_shardings(cfg, run.mesh),
                                check_finite=root.check_finite)
        else:
            _, params = load_checkpoint_model(root.path, run.mesh)
            params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
        fingerprint = (_hf_fingerprint(root.path) if root.kind == "hf"
                       else checkpoint.fingerprint(root.path))
        if not os.path.exists(result_path):
            scores = run.evaluator(cfg, None)(params)
            with MetricWriter(directory) as writer:
                writer.write(0, "validation", scores)
            _write_result(result_path, _result(ROOT, cfg, 0, time.perf_counter() - start,
                                               directory, False, None, fingerprint,
                                               model_columns(run, cfg, params)))
    result = files.read_json(result_path)
    _check_unchanged(ROOT, directory, result.get("fingerprint"), fingerprint)
    run.models[ROOT] = Trained(ROOT, cfg, params, directory, fingerprint)
    return result


def _checkpoint_fingerprint(directory: str) -> str:
    return checkpoint.fingerprint(os.path.join(directory, "checkpoints"))


def _hf_fingerprint(path: str) -> str:
    """A Hugging Face directory's identity: its config.json and its weight files' names and
    sizes (reading 24B of weights to hash them would cost minutes at every start); a GGUF
    file's: its first MiB (header and metadata) and size."""
    if gguf.is_gguf(path):
        with open(path, "rb") as f:
            head = f.read(2**20)
        return "gguf-" + hashlib.sha256(head + str(os.path.getsize(path)).encode()
                                        ).hexdigest()[:16]
    with open(os.path.join(path, hf.CONFIG_FILE), "rb") as f:
        parts = [f.read().decode("utf-8", "replace")]
    parts += sorted(f"{name}:{os.path.getsize(os.path.join(path, name))}"
                    for name in os.listdir(path) if name.endswith(".safetensors"))
    return "hf-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _check_unchanged(name: str, directory: str, recorded: str | None, current: str) -> None:
    """A finished model whose files changed afterwards would make its row (and every stage
    made from it) describe a model that no longer exists."""
    if recorded and recorded != current:
        raise rundir.WorkdirError(
            f"{name}'s model changed after its row was recorded (fingerprint {recorded} then, "
            f"{current} now); something wrote into {directory} or its source. Restore it, or "
            f"delete {directory} (and the stages made from it) to redo it")


def _write_result(path: str, result: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        files.write_json(path, result)


def _lineage(run: _Run, stage: str, cfg: ModelConfig, *, parent: Trained | None,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata saved with every checkpoint of a stage (tokens seen is added per step)."""
    return {"kind": "cascade_stage", "stage": stage, "model": cfg.to_dict(),
            "parent": None if parent is None else os.path.join(parent.directory, "checkpoints"),
            "config": run.config.raw, "code_revision": loop.code_revision(), **extra}


# ------------------------------------------------------------------------------- a stage


def run_datasets(config: CascadeConfig, *, seed: int,
                 data_config: data.DataConfig | None = None) -> data.Datasets:
    """The run's data: its task's prompt/completion batches when it has a `config.task`,
    else `config.data`'s text; `data_config` (a stage's rows) replaces `config.data`."""
    data_config = data_config or config.data
    if config.task is not None:
        return config.task.datasets(data_config, seed=seed)
    return data.datasets_from_config(data_config, seed=seed)


def _calibration_batches(run: _Run, stage_index: int) -> Iterator[dict[str, np.ndarray]]:
    """Training-split batches in an order of their own (never the validation split)."""
    return iter(run_datasets(run.config, seed=run.config.seed + 1000 + stage_index).train)


def _make_child(run: _Run, stage: StageConfig, stage_index: int, parent: Trained
                ) -> tuple[ModelConfig, model.Params | None, dict[str, Any]]:
    """(child config, child params or None for a random init, stage record)."""
    directory = run.stage_dir(stage.name)
    if stage.init == "random":
        return child_model(parent.cfg, stage), None, {"init": "random"}
    if stage.init == "parent":
        child_cfg = child_model(parent.cfg, stage)
        record: dict[str, Any] = {"init": "parent"}
        if stage.context is not None:
            record["context"] = _context_record(stage, parent.cfg, child_cfg)
            record["loss_by_position"] = _positions_before(run, stage, parent, child_cfg)
        return child_cfg, parent.params, record
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
    for name, array in out.record.arrays().items():  # PCA's rotation, for `export`'s map
        if jax.process_index() == 0:
            files.atomic_write(os.path.join(directory, out.record.array_file(name)),
                               lambda f, array=array: np.save(f, array))
    return out.cfg, out.params, {"init": "pruned", "importance": importance_path,
                                 "record": out.record.to_dict()}


def _open_stage(run: _Run, stage: StageConfig) -> tuple[Trained, Trained, dict[str, Trained]]:
    """(parent, teacher, what the stage consumes): the stage's directory marked as this run's,
    and a rerun whose parent or teacher changed underneath it refused (it would mix two
    different models)."""
    directory = run.stage_dir(stage.name)
    parent = run.models[stage.parent]
    teacher = run.model(stage.teacher_name)
    consumed = {"parent": parent, "teacher": teacher}
    if jax.process_index() == 0:
        rundir.mark_stage(directory, run=run.workdir, stage=stage.name)
    stage_path = os.path.join(directory, "stage.json")
    if os.path.exists(stage_path):
        _check_consumed(stage.name, directory, files.read_json(stage_path), consumed)
    return parent, teacher, consumed


def _child(run: _Run, stage: StageConfig, stage_index: int, parent: Trained,
           consumed: dict[str, Trained], *, started: bool, extra: dict[str, Any] | None = None
           ) -> tuple[ModelConfig, model.Params | None, dict[str, Any]]:
    """(child config, child params, stage record). Once training has `started` (its step 0
    holds the child) the record is read back and the parent is not pruned again."""
    stage_path = os.path.join(run.stage_dir(stage.name), "stage.json")
    if started:
        record = files.read_json(stage_path)
        return ModelConfig.from_dict(record["model"]), None, record
    child_cfg, child_params, record = _make_child(run, stage, stage_index, parent)
    record = {"model": child_cfg.to_dict(), "parent": stage.parent,
              "teacher": consumed["teacher"].name, "objective": stage.objective,
              "consumed": {role: {"name": m.name, "fingerprint": m.fingerprint}
                           for role, m in consumed.items()}, **(extra or {}), **record}
    _write_result(stage_path, record)
    return child_cfg, child_params, record


def _finish_stage(run: _Run, stage: StageConfig) -> dict[str, Any]:
    """A finished stage's row, its checkpoint checked against the row, its model loaded for
    the stages after it."""
    directory = run.stage_dir(stage.name)
    result = files.read_json(os.path.join(directory, "result.json"))
    fingerprint = _checkpoint_fingerprint(directory)
    _check_unchanged(stage.name, directory, result.get("fingerprint"), fingerprint)
    cfg = ModelConfig.from_dict(files.read_json(os.path.join(directory, "stage.json"))["model"])
    run.models[stage.name] = Trained(stage.name, cfg,
                                     _final_state_params(directory, cfg, run.mesh), directory,
                                     fingerprint)
    return result


def run_stage(run: _Run, stage: StageConfig, stage_index: int) -> dict[str, Any]:
    """Make the child, train it with the stage's objective, evaluate and record; resumable.

    The stage records the fingerprints of the parent and teacher it consumed; a rerun whose
    parent or teacher changed underneath it is refused (it would mix two different models)."""
    directory = run.stage_dir(stage.name)
    result_path = os.path.join(directory, "result.json")
    parent, teacher, consumed = _open_stage(run, stage)
    start = time.perf_counter()
    if not os.path.exists(result_path):
        started = checkpoint.latest_step(os.path.join(directory, "checkpoints")) is not None
        child_cfg, child_params, record = _child(run, stage, stage_index, parent, consumed,
                                                 started=started)
        tokens = _train_stage(run, stage, child_cfg, child_params, parent, teacher, record)
        trained = _final_state_params(directory, child_cfg, run.mesh)
        result = _result(stage.name, child_cfg, tokens, time.perf_counter() - start,
                         directory, stage.baseline, teacher.name,
                         _checkpoint_fingerprint(directory),
                         model_columns(run, child_cfg, trained))
        if stage.context is not None:
            result.update(_positions_after(run, stage, child_cfg, trained, record))
        _write_result(result_path, result)
    return _finish_stage(run, stage)


def _check_consumed(stage: str, directory: str, record: dict[str, Any],
                    consumed: dict[str, Trained]) -> None:
    for role, recorded in (record.get("consumed") or {}).items():
        now = consumed[role]
        if recorded.get("fingerprint") and recorded["fingerprint"] != now.fingerprint:
            raise rundir.WorkdirError(
                f"stage {stage!r}: its {role} {now.name!r} changed after {stage!r} was made from "
                f"it (fingerprint {recorded['fingerprint']} then, {now.fingerprint} now). Delete "
                f"{directory} to redo {stage!r} from the new {role}, or restore {now.name!r}")


def _context(run: _Run, stage: StageConfig, cfg: ModelConfig,
             child_params: model.Params | None, teacher: Trained, rng: jax.Array
             ) -> StageContext:
    """What the stage's objective builds its training from."""
    optimizer = steps.make_optimizer(total_steps=stage.steps, **stage.optim.optimizer_kwargs())
    datasets = run.stage_datasets(stage)  # a context stage's rows are its own length
    return StageContext(
        stage_name=stage.name, student=cfg, child_params=child_params,
        teacher=teacher if objectives.trains_on_teacher(stage.objective, stage.settings)
        else None, settings=stage.settings,
        mesh=run.mesh, optimizer=optimizer, rng=rng, grad_accum=stage.grad_accum,
        train_batches=lambda: iter(datasets.train),
        task=None if run.config.task is None else run.config.task.task,
        directory=run.stage_dir(stage.name), tokenizer=datasets.tokenizer,
        data=stage_data(run.config, stage), seed=run.config.seed)


def _train_stage(run: _Run, stage: StageConfig, cfg: ModelConfig,
                 child_params: model.Params | None, parent: Trained, teacher: Trained,
                 record: dict[str, Any]) -> int:
    datasets = run.stage_datasets(stage)
    built = objectives.get(stage.objective).build(
        _context(run, stage, cfg, child_params, teacher, jax.random.key(run.config.seed + 1)))
    metadata = _lineage(run, stage.name, cfg, parent=parent,
                        extra={"teacher": teacher.directory, "objective": stage.objective,
                               "importance": record.get("importance"),
                               "record": record.get("record"), "target": stage.target.to_dict(),
                               "context": record.get("context"), **built.lineage})
    # KL to a teacher is measured only on rows it takes (a context stage's may be longer).
    judge = teacher if _covers(teacher.cfg, stage_data(run.config, stage)) else None
    return run.fit(run.stage_dir(stage.name), built, steps_=stage.steps,
                   evaluate_fn=run.evaluator(cfg, judge, stage.context and datasets),
                   metadata=metadata, save_initial=True)[1]


# ------------------------------------------------------------------------- a group of stages


def run_group(run: _Run, members: list[tuple[int, StageConfig]]) -> list[dict[str, Any]]:
    """Stages trained together (a grouped objective, e.g. `codistill`): every member's child
    made as for a stage, one joint state trained in `<workdir>/<group>_<objective>/`, then each
    member's params written as its stage (checkpoint, `stage.json`, metrics, row).

    Resumable like a stage: finished members are skipped, the joint state resumes from its
    last checkpoint (data position and peers included), and a member whose row is missing is
    written from the joint state's final checkpoint without training again."""
    stages = [stage for _, stage in members]
    opened = [_open_stage(run, stage) for stage in stages]
    pending = [stage.name for stage in stages
               if not os.path.exists(os.path.join(run.stage_dir(stage.name), "result.json"))]
    if pending:
        start = time.perf_counter()
        joint_dir = run.stage_dir(stages[0].group_directory)
        started = checkpoint.latest_step(os.path.join(joint_dir, "checkpoints")) is not None
        children = [_child(run, stage, index, parent, consumed, started=started,
                           extra={"group": stage.group,
                                  "peers": [s.name for s in stages if s is not stage]})
                    for (index, stage), (parent, _, consumed) in zip(members, opened,
                                                                     strict=True)]
        group, state, tokens = _train_group(run, stages, children, [t for _, t, _ in opened],
                                            joint_dir)
        final = group.member_params(state.params)  # the state the last checkpoint holds
        for stage, (cfg, _, record), (parent, teacher, _), params in zip(
                stages, children, opened, final, strict=True):
            if stage.name in pending:
                _write_member(run, stage, cfg, params, record, parent, teacher, tokens,
                              time.perf_counter() - start, joint_dir, group.built.lineage)
    return [_finish_stage(run, stage) for stage in stages]


def _train_group(run: _Run, stages: list[StageConfig],
                 children: list[tuple[ModelConfig, model.Params | None, dict[str, Any]]],
                 teachers: list[Trained], joint_dir: str
                 ) -> tuple[objectives.GroupBuilt, Any, int]:
    """The joint training through the shared loop; each member evaluated against its own
    teacher under its name (`<stage>/loss`, ...). Returns (the group's build, the final joint
    state, tokens seen)."""
    first = stages[0]
    rng = jax.random.key(run.config.seed + 1)  # folded per member: random inits differ
    ctxs = [_context(run, stage, cfg, params, teacher, jax.random.fold_in(rng, i))
            for i, (stage, (cfg, params, _), teacher) in enumerate(zip(stages, children,
                                                                       teachers, strict=True))]
    group = objectives.get(first.objective).build_group(ctxs)
    evaluators = [run.evaluator(ctx.student, teacher) for ctx, teacher in zip(ctxs, teachers,
                                                                              strict=True)]

    def evaluate_fn(params: Any) -> dict[str, float]:
        scores = {}
        for stage, evaluate_, member in zip(stages, evaluators, group.member_params(params),
                                            strict=True):
            scores.update({f"{stage.name}/{k}": v for k, v in evaluate_(member).items()})
        return scores

    if jax.process_index() == 0:
        rundir.mark_stage(joint_dir, run=run.workdir, stage=first.group_directory)
    metadata = {"kind": "cascade_group", "group": first.group, "objective": first.objective,
                "members": {ctx.stage_name: ctx.student.to_dict() for ctx in ctxs},
                "parent": os.path.join(run.models[first.parent].directory, "checkpoints"),
                "config": run.config.raw, "code_revision": loop.code_revision(),
                **group.built.lineage}
    state, tokens = run.fit(joint_dir, group.built, steps_=first.steps,
                            evaluate_fn=evaluate_fn, metadata=metadata, save_initial=True)
    return group, state, tokens


def _write_member(run: _Run, stage: StageConfig, cfg: ModelConfig, params: model.Params,
                  record: dict[str, Any], parent: Trained, teacher: Trained, tokens: int,
                  wall_s: float, joint_dir: str, lineage: dict[str, Any]) -> None:
    """One member of a finished group as a stage: its params as the final checkpoint (lineage
    naming its peers; its optimizer state stays in the joint checkpoint), its metrics without
    the member prefix, its row (written last)."""
    directory = run.stage_dir(stage.name)
    checkpoints = os.path.join(directory, "checkpoints")
    if checkpoint.latest_step(checkpoints) != stage.steps:
        metadata = _lineage(run, stage.name, cfg, parent=parent, extra={
            "teacher": teacher.directory, "objective": stage.objective,
            "importance": record.get("importance"), "record": record.get("record"),
            "target": stage.target.to_dict(), "group": stage.group, "peers": record["peers"],
            "joint_checkpoints": os.path.join(joint_dir, "checkpoints"), **lineage})
        checkpoint.save(checkpoints, stage.steps, {"params": params},
                        metadata=dict(metadata, step=stage.steps, tokens_seen=tokens))
    _write_member_metrics(joint_dir, directory, stage.name)
    _write_result(os.path.join(directory, "result.json"),
                  _result(stage.name, cfg, tokens, wall_s, directory, stage.baseline,
                          teacher.name, _checkpoint_fingerprint(directory),
                          model_columns(run, cfg, params)))


def _write_member_metrics(joint_dir: str, directory: str, name: str) -> None:
    """The member's records of the joint `metrics.jsonl` (`<name>/<metric>`), unprefixed, as
    the member's own `metrics.jsonl` (rewritten whole: it is derived)."""
    prefix = f"{name}/"
    if jax.process_index() == 0 and os.path.exists(os.path.join(directory, "metrics.jsonl")):
        os.remove(os.path.join(directory, "metrics.jsonl"))
    with MetricWriter(directory) as writer:
        for record in read_metrics(joint_dir):
            scalars = {k.removeprefix(prefix): v for k, v in record.items()
                       if k.startswith(prefix)}
            if scalars:
                if "tokens" in record:
                    scalars.setdefault("tokens", record["tokens"])
                writer.write(record["step"], record["split"], scalars)


def _units(stages: tuple[StageConfig, ...]) -> list[list[tuple[int, StageConfig]]]:
    """(index, stage) in run order, one unit per stage trained alone or per group (whose
    members stand together, `runconfig.check_groups`)."""
    units: list[list[tuple[int, StageConfig]]] = []
    for index, stage in enumerate(stages):
        if stage.group is not None and units and units[-1][0][1].group == stage.group:
            units[-1].append((index, stage))
        else:
            units.append([(index, stage)])
    return units


# ----------------------------------------------------------------- context extension


def _context_record(stage: StageConfig, parent: ModelConfig, child: ModelConfig
                    ) -> dict[str, Any]:
    """What a context stage changed (lineage): the block, and each changed model field as
    [parent's, child's]."""
    before, after = parent.to_dict(), child.to_dict()
    return {**stage.context.to_dict(),
            "changed": {name: [before[name], after[name]] for name in after
                        if before[name] != after[name]}}


def _bucket_losses(run: _Run, stage: StageConfig, cfg: ModelConfig, params: model.Params,
                   edges: tuple[int, ...]) -> dict[str, list[float]]:
    cadence = run.config.cadence
    return evaluate.losses_by_position(
        cfg, params, iter(run.stage_datasets(stage).validation), edges, run.mesh,
        max_batches=cadence.eval_batches or None, micro_batches=cadence.eval_micro_batches)


def _positions_before(run: _Run, stage: StageConfig, parent: Trained, child_cfg: ModelConfig
                      ) -> dict[str, list[float]]:
    """Validation loss by position bucket on the stage's long rows before training: the
    parent as it is (its own RoPE, beyond the length it was trained at; run the child's way,
    e.g. its attention blocks) and the untrained child (the parent's weights, the new RoPE)."""
    edges = stage.context.bucket_edges(parent.cfg, child_cfg)
    parent_rope = child_cfg.replace(rope_theta=parent.cfg.rope_theta,
                                    rope_scaling=parent.cfg.rope_scaling,
                                    query_scale_beta=parent.cfg.query_scale_beta)
    as_parent = _bucket_losses(run, stage, parent_rope, parent.params, edges)
    as_child = (as_parent if parent_rope == child_cfg
                else _bucket_losses(run, stage, child_cfg, parent.params, edges))
    return {"edges": as_parent["edges"], "tokens": as_parent["tokens"],
            "parent": as_parent["loss"], "init": as_child["loss"]}


def _positions_after(run: _Run, stage: StageConfig, cfg: ModelConfig, params: model.Params,
                     record: dict[str, Any]) -> dict[str, Any]:
    """The result row's context columns: its row length and the bucketed losses before
    (from the stage record) and after training."""
    before = record["loss_by_position"]
    after = _bucket_losses(run, stage, cfg, params, tuple(before["edges"]))
    return {"seq_len": stage.context.seq_len,
            "loss_by_position": {**before, "trained": after["loss"]}}


# ----------------------------------------------------------------------------- the results


COLUMNS = ("stage", "baseline", "teacher", "params", "tokens", "validation_loss", "perplexity",
           "kl_to_teacher", "top1_agreement", "wall_s")


def columns(results: list[dict[str, Any]]) -> tuple[str, ...]:
    """The table's columns: `COLUMNS`, with a task run's scores by generation (pass@1, ...)
    before `wall_s`."""
    extra = [name for r in results for name, value in r.items()
             if name not in COLUMNS and name != "fingerprint"
             and not isinstance(value, dict | list)]  # per-bucket losses: positions.md
    extra = list(dict.fromkeys(extra))
    return (*COLUMNS[:-1], *extra, COLUMNS[-1])


def results_csv(results: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(results), extrasaction="ignore")
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
    names = columns(results)
    header = "| " + " | ".join(names) + " |"
    rule = "|" + "|".join("---" for _ in names) + "|"
    rows = ["| " + " | ".join(_cell(c, r.get(c, "")) for c in names) + " |" for r in results]
    return "\n".join([header, rule, *rows]) + "\n"


POSITION_ROWS = (("parent", "parent, its own RoPE"), ("init", "child untrained (new RoPE)"),
                 ("trained", "child trained"))


def positions_markdown(results: list[dict[str, Any]]) -> str:
    """Validation loss by position bucket of every context stage: the parent beyond its
    context, the child before and after training (nats/token; tokens counted per bucket)."""
    tables = []
    for r in results:
        found = r.get("loss_by_position")
        if not found:
            continue
        edges = found["edges"]
        names = [f"[{lo}, {hi})" for lo, hi in itertools.pairwise(edges)]
        lines = [f"{r['stage']} (rows of {r.get('seq_len', edges[-1])} tokens)", "",
                 "| model | " + " | ".join(names) + " |",
                 "|---|" + "|".join("---" for _ in names) + "|"]
        for key, label in POSITION_ROWS:
            if key in found:
                lines.append(f"| {label} | " + " | ".join(
                    "–" if v != v else f"{v:.3f}" for v in found[key]) + " |")
        lines.append("| tokens | " + " | ".join(f"{t:.0f}" for t in found["tokens"]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + ("\n" if tables else "")


def continuations_markdown(results: list[dict[str, Any]]) -> str:
    """Each model's greedy continuation of each report prompt, prompt by prompt."""
    rows = [r for r in results if r.get("continuations")]
    if not rows:
        return ""
    lines = []
    for i, prompt in enumerate(rows[0]["continuations"]):
        lines += [f"### {i + 1}. {prompt['prompt']!r}", ""]
        lines += [f"- **{r['stage']}**: {r['continuations'][i]['text']!r}" for r in rows]
        lines.append("")
    return "\n".join(lines)


def _loss_label(run_dir: str, name: str) -> str:
    """What a stage's training `loss` measures (its objective's label; the root's is CE)."""
    path = os.path.join(run_dir, name, "stage.json")
    if name == ROOT or not os.path.exists(path):
        return objectives.get("ce").loss_label
    objective = files.read_json(path).get("objective", "kd")
    return objectives.get(objective).loss_label if objective in objectives.names() else objective


def plot_loss_curves(run_dir: str, names: list[str]) -> Any:
    """One panel per kind of training objective (a CE loss and a KD divergence are not on
    one scale), and validation cross-entropy of every stage against its steps (the curve has a
    point every `eval_every` steps). A `matplotlib.figure.Figure`: no pyplot, no backend."""
    from matplotlib.figure import Figure

    labels = sorted({_loss_label(run_dir, name) for name in names})
    fig = Figure(figsize=(5.5 * (len(labels) + 1), 4))
    axes = fig.subplots(1, len(labels) + 1, squeeze=False)[0]
    train_axes, ax_val = dict(zip(labels, axes[:-1], strict=True)), axes[-1]
    for name in names:
        directory = os.path.join(run_dir, name)
        train_records = read_metrics(directory, "train")
        val_records = read_metrics(directory, "validation")
        train_axes[_loss_label(run_dir, name)].plot(
            [r["step"] for r in train_records], [r["loss"] for r in train_records], label=name)
        ax_val.plot([r["step"] for r in val_records], [r["loss"] for r in val_records],
                    marker="o", label=name)
    for label, ax in train_axes.items():
        ax.set(title=f"training objective: {label}", xlabel="step", ylabel="nats/token")
        ax.legend(fontsize="small")
    ax_val.set(title="validation cross-entropy", xlabel="step", ylabel="nats/token")
    ax_val.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_report(run_dir: str, results: list[dict[str, Any]]) -> None:
    """results.md / results.csv, loss_curves.png and importance_<stage>.png (process 0)."""
    if jax.process_index() != 0:
        return
    from matplotlib.figure import Figure

    from cascade_jax import plots

    markdown = results_markdown(results)
    files.atomic_write(os.path.join(run_dir, "results.md"), lambda f: f.write(markdown.encode()))
    table = results_csv(results)
    files.atomic_write(os.path.join(run_dir, "results.csv"), lambda f: f.write(table.encode()))
    continuations = continuations_markdown(results)
    if continuations:
        files.atomic_write(os.path.join(run_dir, "continuations.md"),
                           lambda f: f.write(continuations.encode()))
    positions = positions_markdown(results)
    if positions:
        files.atomic_write(os.path.join(run_dir, "positions.md"),
                           lambda f: f.write(positions.encode()))
    fig = plot_loss_curves(run_dir, [r["stage"] for r in results])
    files.atomic_write(os.path.join(run_dir, "loss_curves.png"),
                       lambda f: fig.savefig(f, format="png", dpi=110))
    if any("pass@1" in r for r in results):
        fig = Figure(figsize=(max(6, 1.1 * len(results)), 3.8), layout="constrained")
        plots.plot_task_accuracy(results, ax=fig.subplots())
        files.atomic_write(os.path.join(run_dir, "task_accuracy.png"),
                           lambda f: fig.savefig(f, format="png", dpi=110))
    for r in results:
        path = os.path.join(run_dir, r["stage"], "importance.npz")
        if os.path.exists(path):
            fig = Figure(figsize=(7, 3.5), layout="constrained")
            plots.plot_layer_importance(prune.Importance.load(path), ax=fig.subplots())
            fig.suptitle(f"layer importance of {r['stage']}'s parent")
            files.atomic_write(os.path.join(run_dir, f"importance_{r['stage']}.png"),
                               lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))


# ------------------------------------------------------------------------------ the entry


def run(config: CascadeConfig | ml_collections.ConfigDict, *, progress: bool = True
        ) -> list[dict[str, Any]]:
    """Run (or resume) every stage of `config` (see configs/tiny_cascade.py); returns the
    results table's rows, root first.

    Everything that can be checked from configs is checked before any work and before the run
    directory is claimed: the typed config, the mesh and batch splits, every stage's target
    against its parent, every teacher's vocabulary, the data and the tokenizer.
    """
    if not isinstance(config, CascadeConfig):
        config = cascade_config(config)
    if not config.workdir:
        raise ValueError("config.workdir is empty; set --config.workdir=<directory for the run>")
    workdir = os.path.abspath(config.workdir)
    mesh = sharding.make_mesh(**config.mesh.sizes())
    for micro in {1, config.cadence.eval_micro_batches, *(s.grad_accum for s in config.stages)}:
        sharding.check_batch_split(config.data.batch_size, mesh, micro, config.data.seq_len)
    for stage in config.stages:
        if stage.context is not None:
            rows = stage_data(config, stage)
            for micro in {1, config.cadence.eval_micro_batches, stage.grad_accum}:
                sharding.check_batch_split(rows.batch_size, mesh, micro, rows.seq_len)
    root_cfg = root_model(config.root)
    models = plan_models(config, root_cfg)
    for name, cfg in models.items():
        check_positions(cfg, config.data.seq_len, name)
    datasets = run_datasets(config, seed=config.seed)
    train.check_vocab(root_cfg, datasets.tokenizer.get_vocab_size(),
                      "config.root.model" if config.root.kind == "scratch" else config.root.path)
    for stage in config.stages:  # every JSONL a stage names, before the root trains
        objectives.check_files(stage.objective, stage.settings, datasets.tokenizer,
                               seq_len=stage_data(config, stage).seq_len,
                               vocab_size=models[stage.name].vocab_size, key=stage.key)
    with rundir.lock(workdir, enabled=jax.process_index() == 0):
        claim_workdir(workdir, config.raw)
        if jax.process_index() == 0:
            rundir.mark_stage(os.path.join(workdir, ROOT), run=workdir, stage=ROOT)
        run_state = _Run(config, workdir, mesh, datasets, progress)
        results = [run_root(run_state, root_cfg)]
        logging.info("root: %s", results[-1])
        for unit in _units(config.stages):
            if unit[0][1].group is None:
                results.append(run_stage(run_state, unit[0][1], unit[0][0]))
            else:
                results.extend(run_group(run_state, unit))
            for result in results[-len(unit):]:
                logging.info("%s: %s", result["stage"], result)
        write_report(workdir, results)
    return results
