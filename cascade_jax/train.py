"""Training a decoder from scratch with next-token cross-entropy: the root teacher of a
cascade (`python -m experiments.train --config configs/tiny_teacher.py`).

`run(TrainRunConfig)` is the whole job: data, sharded state, the CE step (`cascade_jax.steps`)
driven by the shared loop (`cascade_jax.loop`), resumable from Orbax checkpoints, with metric
files and a summary. The step pieces it uses are re-exported here under their historical names
(`train.make_optimizer`, `train.TrainState`, `train.jit_train_step`, ...) for code written
against them; new code imports `cascade_jax.steps` and `cascade_jax.loop`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from cascade_jax import checkpoint, data, files, loop, model, runconfig, rundir, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.loop import (  # noqa: F401  (re-exported: the historical train.* names)
    NonFiniteLossError,
    code_revision,
    evaluate,
    fit,
    fit_with_checkpoints,
    summarize,
)
from cascade_jax.metrics import read_metrics
from cascade_jax.steps import (  # noqa: F401  (re-exported: the historical train.* names)
    TrainState,
    abstract_like,
    accumulate_grads,
    create_state,
    make_optimizer,
    micro_batches,
    sum_over_micro_batches,
)

jit_train_step = steps.jit_ce_train_step
jit_eval_step = steps.jit_eval_sums
train_step = steps.ce_train_step
state_shardings = steps.model_state_shardings


def check_vocab(cfg: ModelConfig, vocab_size: int, key: str) -> None:
    """The model must have a row for every id the tokenizer can produce (`key`: the config
    key of the model, or the directory a loaded one came from)."""
    if cfg.vocab_size < vocab_size:
        fix = (f"set --{key}.vocab_size={vocab_size}" if key.startswith("config.")
               else "use the tokenizer that model was trained with")
        raise ValueError(f"{key}.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size}); {fix}")


def run(config: runconfig.TrainRunConfig | ml_collections.ConfigDict) -> dict[str, Any]:
    """Train from scratch as `config` says (see configs/tiny_teacher.py); resume if possible.

    Writes to `config.workdir`: `checkpoints/<step>` (state, data position, lineage),
    `metrics.jsonl`, `tb/`, and `summary.json` with the final validation figures and the
    unigram baseline they should beat.
    """
    if not isinstance(config, runconfig.TrainRunConfig):
        config = runconfig.train_run_config(config)
    workdir = os.path.abspath(config.workdir)
    mesh = sharding.make_mesh(**config.mesh.sizes())
    datasets = data.datasets_from_config(config.data, seed=config.seed)
    cfg = config.model
    check_vocab(cfg, datasets.tokenizer.get_vocab_size(), "config.model")
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds "
                         f"config.model.max_seq_len={cfg.max_seq_len}; shorten the rows or "
                         "raise max_seq_len")
    optimizer = steps.make_optimizer(total_steps=config.steps,
                                     **config.optim.optimizer_kwargs())
    shardings = steps.model_state_shardings(cfg, optimizer, mesh)
    with rundir.lock(workdir, enabled=jax.process_index() == 0):
        rundir.claim(workdir, tool="train", config=rundir.identity(config.raw),
                     legacy=_legacy_identity, write=jax.process_index() == 0)
        tokens_seen = _fit(config, workdir, mesh, datasets, optimizer, shardings)
    final = read_metrics(workdir, "validation")[-1]
    summary = {
        "workdir": workdir, "steps": config.steps, "params": cfg.num_params(),
        "tokens_seen": tokens_seen, "validation_loss": final["loss"],
        "validation_perplexity": final["perplexity"], "validation_accuracy": final["accuracy"],
        "unigram_loss": datasets.unigram_loss,
    }
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _legacy_identity(directory: str) -> dict[str, Any] | None:
    """A train run written before owner files existed: its checkpoints say kind 'train'."""
    ckpt_dir = os.path.join(directory, "checkpoints")
    if checkpoint.latest_step(ckpt_dir) is None:
        return None
    metadata = checkpoint.read_metadata(ckpt_dir)
    if metadata.get("kind") != "train":
        return None
    return rundir.identity(metadata.get("config") or {})


def _fit(config: runconfig.TrainRunConfig, workdir: str, mesh: Any, datasets: data.Datasets,
         optimizer: Any, shardings: steps.TrainState) -> int:
    cfg, cadence = config.model, config.cadence
    eval_fn = steps.jit_eval_sums(cfg, mesh)

    def evaluate_fn(params: model.Params) -> dict[str, float]:
        return loop.evaluate(eval_fn, params, iter(datasets.validation), mesh,
                             max_batches=cadence.eval_batches or None)

    def make_state() -> steps.TrainState:
        return steps.create_state(cfg, optimizer, jax.random.key(config.seed), mesh)

    _, tokens_seen = loop.fit_with_checkpoints(
        workdir, step_fn=steps.jit_ce_train_step(cfg, optimizer, mesh),
        abstract_state=steps.abstract_state(optimizer, model.param_shapes(cfg), shardings),
        make_state=make_state, batches=iter(datasets.train), mesh=mesh,
        total_steps=config.steps, evaluate_fn=evaluate_fn,
        metadata={"kind": "train", "model": cfg.to_dict(), "config": config.raw,
                  "code_revision": loop.code_revision()},
        log_every=cadence.log_every, eval_every=cadence.eval_every,
        checkpoint_every=cadence.checkpoint_every, keep_checkpoints=cadence.keep_checkpoints)
    return tokens_seen


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join(f"{name:>24}: {value:.4g}" if isinstance(value, float)
                     else f"{name:>24}: {value}" for name, value in summary.items())
