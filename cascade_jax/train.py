"""Training from scratch with next-token cross-entropy: the root teacher of a cascade and the
random-init baseline that distilled children are compared against.

The pieces are pure (`make_optimizer`, `train_step`, `eval_step`) and the jitted versions carry
explicit shardings over a `data × fsdp × tensor` mesh, so the same code runs on one CPU and on
a pod. `fit` is the loop: resumable from Orbax checkpoints, with progress and metric files.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from cascade_jax import lm, model, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.metrics import MetricWriter

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


def train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               batch: Batch) -> tuple[TrainState, Metrics]:
    """One AdamW step on one global batch."""
    grad_fn = jax.value_and_grad(functools.partial(loss_and_metrics, cfg), has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(cfg: ModelConfig, params: model.Params, batch: Batch) -> Metrics:
    return loss_and_metrics(cfg, params, batch)[1]


def jit_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules: Any = sharding.DEFAULT_RULES
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` compiled for `mesh`; the incoming state's buffers are donated."""
    state_sh = state_shardings(cfg, optimizer, mesh, rules)
    return jax.jit(functools.partial(train_step, cfg, optimizer),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def jit_eval_step(cfg: ModelConfig, mesh: Mesh, rules: Any = sharding.DEFAULT_RULES
                  ) -> Callable[[model.Params, Batch], Metrics]:
    return jax.jit(functools.partial(eval_step, cfg),
                   in_shardings=(sharding.param_shardings(cfg, mesh, rules),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Turn accumulated (sum, count) metrics into means: loss, perplexity, accuracy."""
    count = max(totals.get("loss_count", 0.0), 1.0)
    loss = totals.get("loss_sum", 0.0) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "accuracy": totals.get("correct", 0.0) / count, "tokens": totals.get("loss_count", 0.0)}


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
            summary.update(grad_norm=values["grad_norm"],
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
