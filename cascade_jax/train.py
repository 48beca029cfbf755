"""Training from scratch with next-token cross-entropy: the root teacher of a cascade and the
random-init baseline that distilled children are compared against.

The pieces are pure (`make_optimizer`, `train_step`, `eval_step`) and the jitted versions carry
explicit shardings over a `data × fsdp × tensor` mesh, so the same code runs on one CPU and on
a pod. `fit` is the loop: resumable from Orbax checkpoints, with progress and metric files.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.sharding import Mesh

from cascade_jax import checkpoint, data, files, lm, model, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.metrics import MetricWriter, read_metrics

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The optimizer itself is static and lives outside."""

    step: jax.Array
    params: model.Params
    opt_state: optax.OptState


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0,
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW on a linear-warmup + cosine schedule, with global-norm clipping.

    Weight decay skips vectors (norm scales): decaying them towards 0 fights the norm.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=lr * min_lr_ratio)
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1 and p.shape[-1] > 1)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
               params: model.Params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Any = sharding.DEFAULT_RULES) -> TrainState:
    """Shardings of a whole `TrainState`: optimizer moments are sharded like their params."""
    params_sharding = sharding.param_shardings(cfg, mesh, rules)
    abstract = jax.eval_shape(lambda p: init_state(cfg, optimizer, p), model.param_shapes(cfg))
    replicated = sharding.replicated(mesh)
    opt_sharding = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, params_sharding,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding)


def create_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array,
                 mesh: Mesh, rules: Any = sharding.DEFAULT_RULES) -> TrainState:
    """A fresh state initialised straight into its shards."""
    shardings = state_shardings(cfg, optimizer, mesh, rules)
    make = jax.jit(lambda r: init_state(cfg, optimizer, model.init(cfg, r)),
                   out_shardings=shardings)
    return make(rng)


def loss_and_metrics(cfg: ModelConfig, params: model.Params, batch: Batch
                     ) -> tuple[jax.Array, Metrics]:
    """Mean next-token NLL over counted tokens, plus its (sum, count) for exact averaging."""
    logits_BLV = model.forward(cfg, params, batch["tokens"], batch.get("segment_ids"),
                               batch.get("positions"))
    targets_BL, weights_BL = lm.next_token_targets(batch)
    nll_sum, count = lm.cross_entropy(logits_BLV, targets_BL, weights_BL)
    correct = lm.correct_top1(logits_BLV, targets_BL, weights_BL)
    loss = nll_sum / jnp.maximum(count, 1.0)
    return loss, {"loss_sum": nll_sum, "loss_count": count, "correct": correct}


def micro_batches(batch: Batch, k: int) -> Batch:
    """[B, L] -> [k, B/k, L], micro-batch j = rows j, j+k, ...

    Strided, not contiguous: with B sharded over devices, each device's rows feed every
    micro-batch, so splitting needs no data movement.
    """
    rows = batch["tokens"].shape[0]
    if rows % k:
        raise ValueError(f"batch of {rows} rows cannot be split into {k} equal micro-batches "
                         f"(grad_accum / micro_batches={k}); use a batch size that is a "
                         f"multiple of {k}")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(rows // k, k, *x.shape[1:]), 0, 1),
                        batch)


def sum_over_micro_batches(fn: Callable[[Batch], Any], k: int, batch: Batch) -> Any:
    """Σ `fn(micro-batch)` over `k` strided micro-batches, scanned so one micro-batch's
    activations live at a time; sums in float32 (at least). `k = 1` is `fn(batch)`."""
    if k == 1:
        return fn(batch)
    micro = micro_batches(batch, k)

    def add(acc: Any, micro_batch: Batch) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, acc, fn(micro_batch)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                         jax.eval_shape(fn, first))
    return jax.lax.scan(add, zeros, micro)[0]


def accumulate_grads(loss_fn: Callable[[model.Params, Batch], tuple[jax.Array, Metrics]],
                      grad_accum: int, params: model.Params, batch: Batch
                      ) -> tuple[model.Params, Metrics]:
    """Gradient of the token-weighted mean of `loss_fn` (a loss SUM and metric sums) over the
    whole batch, scanning `grad_accum` micro-batches (one micro-batch's activations live at a
    time); shared by the CE step here and the online and cached distill steps."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    grad_sums, metrics = sum_over_micro_batches(functools.partial(grad_fn, params), grad_accum,
                                                batch)
    denominator = jnp.maximum(metrics["loss_count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, params)
    return grads, metrics


def _loss_sum_and_metrics(cfg: ModelConfig, params: model.Params, batch: Batch
                          ) -> tuple[jax.Array, Metrics]:
    """The NLL *sum* (with metric sums): what `accumulate_grads` differentiates."""
    _, metrics = loss_and_metrics(cfg, params, batch)
    return metrics["loss_sum"], metrics


def train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               batch: Batch, grad_accum: int = 1) -> tuple[TrainState, Metrics]:
    """One AdamW step on one global batch (scanned as `grad_accum` micro-batches)."""
    grads, metrics = accumulate_grads(functools.partial(_loss_sum_and_metrics, cfg), grad_accum,
                                      state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(cfg: ModelConfig, params: model.Params, batch: Batch,
              micro_batches: int = 1) -> Metrics:
    """Metric sums over the batch (scanned as `micro_batches` when memory asks for it)."""
    return sum_over_micro_batches(lambda b: loss_and_metrics(cfg, params, b)[1], micro_batches,
                                  batch)


def jit_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules: Any = sharding.DEFAULT_RULES, *, grad_accum: int = 1
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` compiled for `mesh`; the incoming state's buffers are donated."""
    _check_positive("grad_accum", grad_accum)
    state_sh = state_shardings(cfg, optimizer, mesh, rules)
    step = functools.partial(train_step, cfg, optimizer, grad_accum=grad_accum)
    return jax.jit(sharding.traced_on_mesh(step, mesh, rules),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (1 = the whole batch "
                         "at once)")


def jit_eval_step(cfg: ModelConfig, mesh: Mesh, rules: Any = sharding.DEFAULT_RULES, *,
                  micro_batches: int = 1) -> Callable[[model.Params, Batch], Metrics]:
    _check_positive("micro_batches", micro_batches)
    step = functools.partial(eval_step, cfg, micro_batches=micro_batches)
    return jax.jit(sharding.traced_on_mesh(step, mesh, rules),
                   in_shardings=(sharding.param_shardings(cfg, mesh, rules),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Turn accumulated (sum, count) metrics into per-token means.

    Every `<name>_sum` becomes `<name>` (loss, ce, kd, kl, agree, hidden, ...), `correct`
    becomes `accuracy`; perplexity is exp of the cross-entropy (`ce` when the loss is a KD
    objective, else `loss`). Works for the CE step, the distill step and `evaluate`.
    """
    count = max(totals.get("loss_count", 0.0), 1.0)
    out = {name.removesuffix("_sum"): value / count for name, value in totals.items()
           if name.endswith("_sum")}
    out.setdefault("loss", 0.0)
    out["perplexity"] = math.exp(min(out.get("ce", out["loss"]), 80.0))
    if "correct" in totals:
        out["accuracy"] = totals["correct"] / count
    out["tokens"] = totals.get("loss_count", 0.0)
    return out


def evaluate(step_fn: Callable[[model.Params, Batch], Metrics], params: model.Params,
             batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
             max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted loss/perplexity/accuracy over a finite stream of host batches."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        metrics = step_fn(params, sharding.shard_batch(batch, mesh))
        for name, value in jax.device_get(metrics).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return summarize(totals)


class NonFiniteLossError(FloatingPointError):
    """Raised instead of saving a checkpoint once the loss is NaN or infinite."""


def _check_finite(step: int, loss: float, last_saved: int | None) -> None:
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is step {last_saved}" if last_saved is not None
                 else "no checkpoint was written")
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step}; stopped without saving ({where}). "
            "Lower the learning rate, raise warmup, or check the data for empty batches.")


def fit(step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]], state: TrainState,
        batches: Iterator[dict[str, np.ndarray]], *, mesh: Mesh, total_steps: int,
        writer: MetricWriter, log_every: int = 10, eval_every: int = 0,
        evaluate_fn: Callable[[model.Params], dict[str, float]] | None = None,
        checkpoint_every: int = 0,
        save_fn: Callable[[int, TrainState, int], None] | None = None,
        tokens_seen: int = 0, progress: bool = True) -> tuple[TrainState, int]:
    """Run steps until `state.step == total_steps`; returns (state, tokens seen).

    Metrics are fetched one step late, so the host never waits for the device between steps.
    `save_fn(step, state, tokens_seen)` runs every `checkpoint_every` steps and at the end;
    `evaluate_fn(params)` every `eval_every` steps and at the end.
    """
    start = int(jax.device_get(state.step))
    bar = tqdm.tqdm(total=total_steps, initial=start, disable=not progress or
                    jax.process_index() != 0, desc="train", unit="step", dynamic_ncols=True)
    last_saved = start if start else None
    pending: tuple[int, Metrics] | None = None
    totals: dict[str, float] = {}
    window_start, window_tokens = time.perf_counter(), 0

    def drain(step: int, metrics: Metrics) -> None:
        nonlocal window_start, window_tokens
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, values["loss_sum"] / max(values["loss_count"], 1.0), last_saved)
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
        if step % log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            summary = summarize(totals)
            summary.update(grad_norm=values.get("grad_norm", math.nan),
                           tokens_per_s=window_tokens / max(elapsed, 1e-9))
            writer.write(step, "train", summary)
            bar.set_postfix(loss=f"{summary['loss']:.3f}",
                            tok_s=f"{summary['tokens_per_s']:.0f}")
            totals.clear()
            window_start, window_tokens = time.perf_counter(), 0

    for step in range(start + 1, total_steps + 1):
        batch = next(batches)
        n_tokens = int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()
        state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
        tokens_seen += n_tokens
        window_tokens += n_tokens
        if pending is not None:
            drain(*pending)
        pending = (step, metrics)
        bar.update(1)
        at_end = step == total_steps
        if (eval_every and step % eval_every == 0) or at_end or (
                checkpoint_every and step % checkpoint_every == 0):
            drain(*pending)  # never evaluate or save a state whose loss was not checked
            pending = None
        if evaluate_fn is not None and ((eval_every and step % eval_every == 0) or at_end):
            writer.write(step, "validation", evaluate_fn(state.params))
        if save_fn is not None and ((checkpoint_every and step % checkpoint_every == 0)
                                    or at_end):
            save_fn(step, state, tokens_seen)
            last_saved = step
    if pending is not None:
        drain(*pending)
    bar.close()
    return state, tokens_seen


# ------------------------------------------------------------------ the config-driven entry point


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The run's `ModelConfig`, checked against the tokenizer it will be fed."""
    cfg = ModelConfig(**config.model.to_dict())
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size}); set --config.model.vocab_size={vocab_size}")
    return cfg


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract) placed on `shardings`: a restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def fit_with_checkpoints(workdir: str, *, step_fn: Callable[[TrainState, Batch],
                                                            tuple[TrainState, Metrics]],
                         abstract_state: TrainState, make_state: Callable[[], TrainState],
                         batches: Iterator[dict[str, np.ndarray]], mesh: Mesh,
                         total_steps: int,
                         evaluate_fn: Callable[[model.Params], dict[str, float]] | None,
                         metadata: dict[str, Any], log_every: int = 10, eval_every: int = 0,
                         checkpoint_every: int = 0, keep_checkpoints: int = 2,
                         save_initial: bool = False, progress: bool = True
                         ) -> tuple[TrainState, int]:
    """`fit` that resumes from, and saves to, `workdir/checkpoints` (state + data position).

    Resuming restores into `abstract_state` (ShapeDtypeStructs carrying the shardings), so a
    run continues on whatever mesh it is restarted on; `make_state()` runs only on a fresh
    start. `save_initial` writes step 0 first (a pruned child is then never pruned twice).
    Each save's metadata is `metadata` plus the step and tokens seen (the lineage record).
    Returns (final state, tokens seen).
    """
    # Steps already in a checkpoint are skipped, so `batches` must be the iterator the
    # checkpoints hold the position of (it is restored in place).
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=keep_checkpoints) as ckpt:
        if ckpt.latest_step() is not None:
            restored = ckpt.restore(abstract_state, data_iterator=batches)
            state, tokens_seen = restored.state, int(restored.metadata["tokens_seen"])
            logging.info("resumed from %s at step %d", ckpt.directory, restored.step)
        else:
            state, tokens_seen = make_state(), 0
            if save_initial:
                ckpt.save(0, state, data_iterator=batches,
                          metadata=dict(metadata, step=0, tokens_seen=0))

        def save_fn(step: int, state: TrainState, tokens: int) -> None:
            ckpt.save(step, state, data_iterator=batches,
                      metadata=dict(metadata, step=step, tokens_seen=tokens))

        with MetricWriter(workdir) as writer:
            return fit(step_fn, state, batches, mesh=mesh, total_steps=total_steps,
                       writer=writer, log_every=log_every, eval_every=eval_every,
                       evaluate_fn=evaluate_fn, checkpoint_every=checkpoint_every,
                       save_fn=save_fn, tokens_seen=tokens_seen, progress=progress)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train from scratch as `config` says (see configs/tiny_teacher.py); resume if possible.

    Writes to `config.workdir`: `checkpoints/<step>` (state, data position, lineage),
    `metrics.jsonl`, `tb/`, and `summary.json` with the final validation figures and the
    unigram baseline they should beat.
    """
    workdir = os.path.abspath(config.workdir)
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    datasets = data.datasets_from_config(config.data, seed=config.seed)
    cfg = model_config_from(config, datasets.tokenizer.get_vocab_size())
    optimizer = make_optimizer(total_steps=config.steps, **config.optim.to_dict())
    eval_fn = jit_eval_step(cfg, mesh)

    def evaluate_fn(params: model.Params) -> dict[str, float]:
        return evaluate(eval_fn, params, iter(datasets.validation), mesh,
                        max_batches=config.eval_batches or None)

    def make_state() -> TrainState:
        return create_state(cfg, optimizer, jax.random.key(config.seed), mesh)

    _, tokens_seen = fit_with_checkpoints(
        workdir, step_fn=jit_train_step(cfg, optimizer, mesh),
        abstract_state=abstract_like(jax.eval_shape(make_state),
                                     state_shardings(cfg, optimizer, mesh)),
        make_state=make_state, batches=iter(datasets.train), mesh=mesh,
        total_steps=config.steps, evaluate_fn=evaluate_fn,
        metadata={"kind": "train", "model": cfg.to_dict(), "config": config.to_dict(),
                  "code_revision": code_revision()},
        log_every=config.log_every, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints)
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


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join(f"{name:>24}: {value:.4g}" if isinstance(value, float)
                     else f"{name:>24}: {value}" for name, value in summary.items())


def code_revision() -> str:
    """The git commit of the code that produced a checkpoint (lineage), or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
