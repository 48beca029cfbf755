"""Pure, jit-able step pieces that every objective shares: the train state, the one optimizer
update, gradient accumulation over micro-batches, state shardings, and the next-token (CE)
step and evaluation sums.

This layer imports neither orbax, grain nor tensorboard (`tests/test_imports.py` checks): a
step can be traced, compiled, benchmarked or planned ahead of time (`aot`) without the loop.
The loop that drives steps (checkpoint cadence, evaluation cadence, metrics files, NaN stop,
progress) lives in `cascade_jax.loop`.

Metrics are token-weighted sums named `<name>_sum` plus the token `count`, so averages over
micro-batches, hosts and steps are exact; `loop.summarize` turns them into means. Every
objective's step ends in `apply_grads`, and every state's shardings come from
`state_shardings`, so CE, KD and every later objective share one update and one layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import einops
import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cascade_jax import lm, model, sharding, validate
from cascade_jax.config import ModelConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[..., tuple["TrainState", Metrics]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The optimizer itself is static and lives outside."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0,
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW on a linear-warmup + cosine schedule, with global-norm clipping.

    Weight decay skips vectors (norm scales): decaying them towards 0 fights the norm.
    """
    validate.positive_int("total_steps", total_steps)
    validate.non_negative_int("warmup_steps", warmup_steps)
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")
    validate.positive_number("lr", lr)
    validate.number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=lr * min_lr_ratio)
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1 and p.shape[-1] > 1)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def init_state(optimizer: optax.GradientTransformation, params: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def state_shardings(optimizer: optax.GradientTransformation, param_shapes: Any,
                    param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings of a whole `TrainState` over any trainable tree: optimizer moments are
    sharded like their params, counters replicated."""
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, param_shapes)
    opt_sharding = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_sharding)


def model_state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh, rules: Any = sharding.DEFAULT_RULES) -> TrainState:
    """`state_shardings` of a decoder's own params."""
    return state_shardings(optimizer, model.param_shapes(cfg),
                           sharding.param_shardings(cfg, mesh, rules), mesh)


def abstract_state(optimizer: optax.GradientTransformation, param_shapes: Any,
                   shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs of a state placed on `shardings`: a checkpoint restore target."""
    shapes = jax.eval_shape(lambda p: init_state(optimizer, p), param_shapes)
    return abstract_like(shapes, shardings)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract) placed on `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def place_state(optimizer: optax.GradientTransformation, params: Any,
                shardings: TrainState) -> TrainState:
    """A fresh state around existing params (a pruned child), placed into its shards."""
    return jax.jit(functools.partial(init_state, optimizer), out_shardings=shardings)(params)


def create_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array,
                 mesh: Mesh, rules: Any = sharding.DEFAULT_RULES) -> TrainState:
    """A fresh state of a randomly initialised decoder, made straight into its shards."""
    shardings = model_state_shardings(cfg, optimizer, mesh, rules)
    make = jax.jit(lambda r: init_state(optimizer, model.init(cfg, r)), out_shardings=shardings)
    return make(rng)


# ------------------------------------------------------------------ micro-batches, gradients


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
    return jax.tree.map(lambda x: einops.rearrange(x, "(b k) ... -> k b ...", k=k), batch)


def scan_micro_batches(fn: Callable[[Batch], tuple[Any, Any]], k: int, batch: Batch
                       ) -> tuple[Any, Any]:
    """`fn(micro-batch) -> (summed, rows)` over `k` strided micro-batches, scanned so one
    micro-batch's activations live at a time: (Σ `summed`, in float32 at least; `rows`, each
    micro-batch's [B/k, ...] outputs put back in the batch's row order)."""
    micro = micro_batches(batch, k)

    def add(acc: Any, micro_batch: Batch) -> tuple[Any, Any]:
        summed, rows = fn(micro_batch)
        return jax.tree.map(jnp.add, acc, summed), rows

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                         jax.eval_shape(fn, first)[0])
    total, rows_k = jax.lax.scan(add, zeros, micro)
    return total, jax.tree.map(lambda x: einops.rearrange(x, "k b ... -> (b k) ..."), rows_k)


def sum_over_micro_batches(fn: Callable[[Batch], Any], k: int, batch: Batch) -> Any:
    """Σ `fn(micro-batch)` over `k` strided micro-batches (`scan_micro_batches`); `k = 1` is
    `fn(batch)`."""
    if k == 1:
        return fn(batch)
    return scan_micro_batches(lambda micro_batch: (fn(micro_batch), ()), k, batch)[0]


def accumulate_grads(loss_fn: Callable[[Any, Batch], tuple[jax.Array, Metrics]],
                     grad_accum: int, params: Any, batch: Batch) -> tuple[Any, Metrics]:
    """Gradient of the token-weighted mean of `loss_fn` over the whole batch.

    `loss_fn(params, micro_batch)` returns (loss SUM, metric sums with `count`); the batch is
    scanned as `grad_accum` micro-batches (one micro-batch's activations live at a time) and
    the summed gradient is divided once by the whole batch's count: k micro-batches give the
    gradient of one big batch.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    grad_sums, metrics = sum_over_micro_batches(functools.partial(grad_fn, params), grad_accum,
                                                batch)
    denominator = jnp.maximum(metrics["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sums, params)
    return grads, metrics


def apply_grads(optimizer: optax.GradientTransformation, state: TrainState, grads: Any,
                metrics: Metrics) -> tuple[TrainState, Metrics]:
    """The optimizer update every objective's step ends with; `grad_norm` joins the metrics."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_step(step: StepFn, state_sharding: TrainState, mesh: Mesh, *,
             frozen_shardings: tuple[Any, ...] = (), rules: Any = sharding.DEFAULT_RULES
             ) -> StepFn:
    """`step(state, *frozen, batch) -> (state, metrics)` compiled for `mesh`.

    The state is sharded by `state_sharding` and donated; frozen inputs (a teacher's params)
    by `frozen_shardings`, never donated; the batch is split over data × fsdp; metrics come
    back replicated.
    """
    return jax.jit(sharding.traced_on_mesh(step, mesh, rules),
                   in_shardings=(state_sharding, *frozen_shardings,
                                 sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,))


# --------------------------------------------------------------------- next-token (CE) step


def ce_sums(cfg: ModelConfig, params: model.Params, batch: Batch,
            chunk_size: int | None = None) -> Metrics:
    """Token-weighted sums of the next-token objective: `loss_sum` (NLL), `accuracy_sum`
    (top-1 hits) and `count` (tokens counted). With `chunk_size` the logits exist one block
    of positions at a time (`lm.chunked_nll_and_hits`): what long rows need."""
    args = (batch["tokens"], batch.get("segment_ids"), batch.get("positions"))
    targets_BL, weights_BL = lm.next_token_targets(batch)
    if chunk_size is not None:
        nll_BL, hits_BL = lm.chunked_nll_and_hits(
            model.hidden_states(cfg, params, *args), model.lm_head_weights(cfg, params),
            targets_BL, chunk_size)
        return {"loss_sum": jnp.sum(jnp.where(weights_BL > 0, nll_BL, 0.0) * weights_BL),
                "accuracy_sum": jnp.sum(hits_BL * weights_BL), "count": jnp.sum(weights_BL)}
    logits_BLV = model.forward(cfg, params, *args)
    nll_sum, count = lm.cross_entropy(logits_BLV, targets_BL, weights_BL)
    return {"loss_sum": nll_sum,
            "accuracy_sum": lm.correct_top1(logits_BLV, targets_BL, weights_BL),
            "count": count}


def _ce_loss_sum(cfg: ModelConfig, params: model.Params, batch: Batch,
                 chunk_size: int | None = None) -> tuple[jax.Array, Metrics]:
    """The NLL *sum* (with metric sums): what `accumulate_grads` differentiates."""
    sums = ce_sums(cfg, params, batch, chunk_size)
    return sums["loss_sum"], sums


def ce_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
                  batch: Batch, grad_accum: int = 1, chunk_size: int | None = None
                  ) -> tuple[TrainState, Metrics]:
    """One AdamW step of next-token cross-entropy on one global batch."""
    grads, metrics = accumulate_grads(
        functools.partial(_ce_loss_sum, cfg, chunk_size=chunk_size), grad_accum,
        state.params, batch)
    return apply_grads(optimizer, state, grads, metrics)


def jit_ce_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                      rules: Any = sharding.DEFAULT_RULES, *, grad_accum: int = 1,
                      chunk_size: int | None = None
                      ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`ce_train_step` compiled for `mesh`; the incoming state's buffers are donated."""
    validate.positive_int("grad_accum", grad_accum, "1 = the whole batch at once")
    validate.optional_positive_int("chunk_size", chunk_size, "or None: whole-row logits")
    step = functools.partial(ce_train_step, cfg, optimizer, grad_accum=grad_accum,
                             chunk_size=chunk_size)
    return jit_step(step, model_state_shardings(cfg, optimizer, mesh, rules), mesh, rules=rules)


def eval_sums(cfg: ModelConfig, params: model.Params, batch: Batch,
              micro_batches: int = 1, chunk_size: int | None = None) -> Metrics:
    """`ce_sums` over the batch (scanned as `micro_batches` when memory asks for it)."""
    return sum_over_micro_batches(functools.partial(ce_sums, cfg, params, chunk_size=chunk_size),
                                  micro_batches, batch)


def jit_eval_sums(cfg: ModelConfig, mesh: Mesh, rules: Any = sharding.DEFAULT_RULES, *,
                  micro_batches: int = 1, chunk_size: int | None = None
                  ) -> Callable[[model.Params, Batch], Metrics]:
    validate.positive_int("micro_batches", micro_batches, "1 = the whole batch at once")
    validate.optional_positive_int("chunk_size", chunk_size, "or None: whole-row logits")
    step = functools.partial(eval_sums, cfg, micro_batches=micro_batches, chunk_size=chunk_size)
    return jax.jit(sharding.traced_on_mesh(step, mesh, rules),
                   in_shardings=(sharding.param_shardings(cfg, mesh, rules),
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
