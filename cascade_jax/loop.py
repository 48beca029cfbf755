"""The training loop around any objective's jitted step: checkpoint cadence, evaluation
cadence, metric files, the non-finite stop and progress.

It drives a `(state, batch) -> (state, metrics)` function and knows nothing of what the step
optimises: CE, soft-label KD and every later objective run through the same `fit`. The pure
step pieces live in `cascade_jax.steps`.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh

from cascade_jax import checkpoint, sharding
from cascade_jax.metrics import MetricWriter
from cascade_jax.steps import Batch, Metrics, TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvaluateFn = Callable[[Any], dict[str, float]]
HostBatch = dict[str, np.ndarray]
PrepareFn = Callable[[TrainState, HostBatch], HostBatch]


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Accumulated metric sums -> per-token means.

    Every `<name>_sum` becomes `<name>` (loss, ce, kd, accuracy, kl_to_teacher,
    top1_agreement, hidden, ...) divided by `count`, or by `<name>_count` when the metric
    counts other items than the step's tokens (e.g. GRPO's ratio statistics, over the tokens
    of the groups that entered the loss only); perplexity is exp of the cross-entropy (`ce`
    when the loss is a KD objective, else `loss`); `tokens` is the count.
    """
    count = max(totals.get("count", 0.0), 1.0)

    def denominator(name: str) -> float:
        own = totals.get(name.removesuffix("_sum") + "_count")
        return count if own is None else max(own, 1.0)

    out = {name.removesuffix("_sum"): value / denominator(name)
           for name, value in totals.items() if name.endswith("_sum")}
    out.setdefault("loss", 0.0)
    out["perplexity"] = math.exp(min(out.get("ce", out["loss"]), 80.0))
    out["tokens"] = totals.get("count", 0.0)
    return out


def counted_tokens(batch: HostBatch) -> int:
    """Tokens a batch trains on, for `tokens_seen`: its completion tokens when it has a
    `loss_mask` (prompt/completion data), else every non-padding token."""
    return int(np.count_nonzero(batch.get("loss_mask", batch["segment_ids"])))


def evaluate(step_fn: Callable[[Any, Batch], Metrics], params: Any,
             batches: Iterable[HostBatch], mesh: Mesh, max_batches: int | None = None
             ) -> dict[str, float]:
    """Token-weighted means of `step_fn`'s metric sums over a finite stream of host batches."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        metrics = step_fn(params, sharding.shard_batch(batch, mesh))
        for name, value in jax.device_get(metrics).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return summarize(totals)


class NonFiniteLossError(FloatingPointError):
    """Raised instead of saving a checkpoint once the loss, the gradient norm or the updated
    parameters are NaN or infinite: a non-finite state is never written."""


def _stop(step: int, quantity: str, value: float, last_saved: int | None) -> None:
    where = (f"the last good checkpoint is step {last_saved} (verified finite)"
             if last_saved is not None else "no checkpoint was written")
    raise NonFiniteLossError(
        f"training {quantity} is {value} at step {step}; stopped without saving ({where}). "
        "Lower the learning rate, raise warmup, or check the data for empty batches.")


def _check_finite(step: int, values: dict[str, float], last_saved: int | None) -> None:
    """The loss (before this step's update) and the gradient norm (of this step's update)."""
    loss = values["loss_sum"] / max(values["count"], 1.0)
    if not math.isfinite(loss):
        _stop(step, "loss", loss, last_saved)
    grad_norm = values.get("grad_norm", 0.0)
    if not math.isfinite(grad_norm):
        _stop(step, "gradient norm", grad_norm, last_saved)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                                if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


def _check_params_finite(step: int, state: TrainState, last_saved: int | None) -> None:
    """The state about to be saved: a finite loss and gradient norm can still step into a
    non-finite parameter (an overflowing update)."""
    if not bool(_all_finite(state.params)):
        _stop(step, "parameters after the update", math.nan, last_saved)


def fit(step_fn: StepFn, state: TrainState, batches: Iterator[HostBatch], *, mesh: Mesh,
        total_steps: int, writer: MetricWriter, log_every: int = 10, eval_every: int = 0,
        evaluate_fn: EvaluateFn | None = None, checkpoint_every: int = 0,
        save_fn: Callable[[int, TrainState, int], None] | None = None,
        tokens_seen: int = 0, progress: bool = True,
        prepare_batch: PrepareFn | None = None) -> tuple[TrainState, int]:
    """Run steps until `state.step == total_steps`; returns (state, tokens seen).

    Metrics are fetched one step late, so the host never waits for the device between steps.
    `save_fn(step, state, tokens_seen)` runs every `checkpoint_every` steps and at the end;
    `evaluate_fn(params)` every `eval_every` steps and at the end; `prepare_batch(state,
    batch)` (on-policy objectives) turns each host batch into the one trained on, given the
    state about to be updated.
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
        _check_finite(step, values, last_saved)
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
        if prepare_batch is not None:
            batch = prepare_batch(state, batch)
        n_tokens = counted_tokens(batch) * jax.process_count()
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
            _check_params_finite(step, state, last_saved)
            save_fn(step, state, tokens_seen)
            last_saved = step
    if pending is not None:
        drain(*pending)
    bar.close()
    return state, tokens_seen


def fit_with_checkpoints(workdir: str, *, step_fn: StepFn, abstract_state: TrainState,
                         make_state: Callable[[], TrainState],
                         batches: Iterator[HostBatch], mesh: Mesh, total_steps: int,
                         evaluate_fn: EvaluateFn | None, metadata: dict[str, Any],
                         log_every: int = 10, eval_every: int = 0, checkpoint_every: int = 0,
                         keep_checkpoints: int = 2, save_initial: bool = False,
                         progress: bool = True, prepare_batch: PrepareFn | None = None
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
                       save_fn=save_fn, tokens_seen=tokens_seen, progress=progress,
                       prepare_batch=prepare_batch)


def code_revision() -> str:
    """The git commit of the code that produced a checkpoint (lineage), or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
