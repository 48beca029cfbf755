"""The distillation step: a frozen teacher's soft labels train a (pruned) student.

One stage of a cascade (Ministral 3, arXiv 2601.08584; Minitron, arXiv 2407.14679) distils a
child from a teacher with forward KL on logits. This module is that step and nothing else:

* `train_step(dcfg, optimizer, state, teacher_params, batch) -> (state, metrics)` is pure. The
  teacher is an argument, not state: it is never differentiated (`stop_gradient`), never given
  optimizer state, never changed. The student is a `steps.TrainState` (AdamW, warmup-cosine,
  clipping from `steps.make_optimizer`), so checkpoints and `loop.fit` work unchanged.
* Gradient accumulation over `grad_accum` micro-batches sums token-weighted losses and divides
  once by the whole batch's token count: k micro-batches give the gradient of one big batch.
* Mixed precision: `cfg.replace(dtype='bfloat16')` computes matmuls in bf16 while params (the
  float32 masters) and optimizer state stay float32; softmax, norms and losses are float32.
* `jit_train_step` compiles it for a `data × fsdp × tensor` mesh: student and teacher params
  sharded by their own logical axes, the batch over data × fsdp, the student state donated.
* Optional hidden-state distillation (`HiddenDistill`): after depth pruning student layer i is
  teacher layer `layer_map[i]`; their block outputs are matched, through a learned projection
  `[D_student, D_teacher]` when widths differ (Minitron: helps when depth is cut heavily).

Logits are never materialised whole: both models produce final hidden states and the fused,
sequence-chunked `losses.distill_loss` multiplies them by the heads chunk by chunk.

Offline distillation: `train_step_cached(dcfg, optimizer, state, batch)` and
`jit_train_step_cached` take no teacher at all; each batch carries the teacher's sparse targets
(`teacher_idx`, `teacher_logprobs` [B, L, k], from `logits_cache.cache_dataset`) and the
student is trained against them with the fused `losses.sparse_distill_loss`. Both steps share
gradient accumulation (`steps.accumulate_grads`) and the update (`steps.apply_grads`) with every
other objective.

Student params are the model's param tree, or `{'model': <tree>, 'proj': [D, T]}` when hidden
distillation needs a projection (`student_model_params` returns the model part either way).
Extra einsum letter here: T = the teacher's d_model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from cascade_jax import lm, model, sharding, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[steps.TrainState, model.Params, Batch], tuple[steps.TrainState, Metrics]]

HIDDEN_KINDS = ("mse", "cosine")
_PROJ_AXES = PartitionSpec("embed", None)  # [D_student, D_teacher]: D_student like the params


@dataclasses.dataclass(frozen=True)
class HiddenDistill:
    """Match student block outputs to teacher block outputs, layer by layer.

    `layer_map[i]` is the teacher layer that student layer i was kept from (the `kept` indices
    of depth pruning), so there is one entry per student layer. `kind='mse'` is the mean
    squared error per channel, `'cosine'` is 1 - cos; either is averaged over the mapped layers
    and counted tokens and added to the logit loss times `weight`.
    """

    layer_map: tuple[int, ...]
    weight: float = 1.0
    kind: str = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.layer_map, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in self.layer_map):
            raise ValueError(f"layer_map={self.layer_map!r} must be a tuple of non-negative "
                             "teacher layer indices, one per student layer (e.g. the `kept` "
                             "indices of depth pruning)")
        if not self.weight >= 0:
            raise ValueError(f"hidden-state weight={self.weight!r} must be >= 0")
        if self.kind not in HIDDEN_KINDS:
            raise ValueError(f"hidden-state kind={self.kind!r} is not supported; choose one "
                             f"of {list(HIDDEN_KINDS)}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Everything static about a distillation step (hashable, so it can key a jit cache).

    The teacher may be deeper and wider than the student; the vocabularies must be equal,
    since KD compares the two distributions token by token.
    """

    student: ModelConfig
    teacher: ModelConfig
    loss: losses.LossSpec = dataclasses.field(default_factory=losses.LossSpec)
    hidden: HiddenDistill | None = None
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.student.vocab_size != self.teacher.vocab_size:
            raise ValueError(
                f"student vocab_size={self.student.vocab_size} differs from teacher "
                f"vocab_size={self.teacher.vocab_size}: logit distillation compares the two "
                "distributions token by token, so both models need the same tokenizer; "
                "distil from a teacher with the student's vocabulary (or resize the student's "
                "embeddings and head to the teacher's)")
        validate.positive_int("grad_accum", self.grad_accum, "1 = no accumulation")
        if self.hidden is not None:
            layer_map, n_s, n_t = self.hidden.layer_map, self.student.n_layers, \
                self.teacher.n_layers
            if len(layer_map) != n_s:
                raise ValueError(f"layer_map has {len(layer_map)} entries but the student has "
                                 f"n_layers={n_s}; give one teacher layer per student layer")
            if max(layer_map) >= n_t:
                raise ValueError(f"layer_map={layer_map} names teacher layer {max(layer_map)} "
                                 f"but the teacher has n_layers={n_t} (indices 0..{n_t - 1})")

    @property
    def has_proj(self) -> bool:
        """A learned projection exists only for hidden distillation across different widths."""
        return self.hidden is not None and self.student.d_model != self.teacher.d_model


# ------------------------------------------------------------------------ student parameters


def student_model_params(dcfg: DistillConfig, params: model.Params) -> model.Params:
    """The student's decoder params (what a child checkpoint keeps), without the projection."""
    return params["model"] if dcfg.has_proj else params


def init_proj(dcfg: DistillConfig, rng: jax.Array) -> jax.Array:
    """[D_student, D_teacher] float32, LeCun-normal: unit-variance outputs for unit inputs."""
    d_s, d_t = dcfg.student.d_model, dcfg.teacher.d_model
    return jax.random.normal(rng, (d_s, d_t), dcfg.student.weight_dtype) * d_s ** -0.5


def student_params(dcfg: DistillConfig, model_params: model.Params,
                   proj: jax.Array | None = None) -> model.Params:
    """The trainable tree: the decoder alone, or `{'model', 'proj'}` when a projection exists."""
    if not dcfg.has_proj:
        return model_params
    if proj is None:
        raise ValueError("this DistillConfig distils hidden states across widths "
                         f"{dcfg.student.d_model} -> {dcfg.teacher.d_model}; pass proj "
                         "(e.g. init_proj(dcfg, rng))")
    return {"model": model_params, "proj": proj}


def param_shapes(dcfg: DistillConfig) -> model.Params:
    """`ShapeDtypeStruct`s of the trainable tree (no allocation)."""
    shapes = model.param_shapes(dcfg.student)
    if not dcfg.has_proj:
        return shapes
    proj = jax.ShapeDtypeStruct((dcfg.student.d_model, dcfg.teacher.d_model),
                                dcfg.student.weight_dtype)
    return {"model": shapes, "proj": proj}


def param_shardings(dcfg: DistillConfig, mesh: Mesh,
                    rules: Any = sharding.DEFAULT_RULES) -> Any:
    """Shardings of the trainable tree, checked to divide every sharded dimension."""
    model_sh = sharding.param_shardings(dcfg.student, mesh, rules)
    if not dcfg.has_proj:
        return model_sh
    proj_sh = sharding.logical_to_sharding(_PROJ_AXES, mesh, rules)
    sharding.check_divisible({"proj": param_shapes(dcfg)["proj"]}, {"proj": proj_sh})
    return {"model": model_sh, "proj": proj_sh}


def state_shardings(dcfg: DistillConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Any = sharding.DEFAULT_RULES) -> steps.TrainState:
    """Shardings of the student's `TrainState` (moments sharded like their params)."""
    return steps.state_shardings(optimizer, param_shapes(dcfg),
                                 param_shardings(dcfg, mesh, rules), mesh)


def teacher_shardings(dcfg: DistillConfig, mesh: Mesh,
                      rules: Any = sharding.DEFAULT_RULES) -> Any:
    """The teacher is sharded by its own config's shapes (it may be wider and deeper)."""
    return sharding.param_shardings(dcfg.teacher, mesh, rules)


def create_state(dcfg: DistillConfig, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                 rng: jax.Array, model_params: model.Params | None = None,
                 proj: jax.Array | None = None,
                 rules: Any = sharding.DEFAULT_RULES) -> steps.TrainState:
    """The student's state, placed into its shards.

    `model_params` is the pruned child (None: a random init from `rng`, the baseline that
    pruning is compared against); `proj` defaults to `init_proj(dcfg, rng)` when needed.
    """
    shardings = state_shardings(dcfg, optimizer, mesh, rules)
    init_rng, proj_rng = jax.random.split(rng)

    def make(model_params: model.Params | None, proj: jax.Array | None) -> steps.TrainState:
        if model_params is None:
            model_params = model.init(dcfg.student, init_rng)
        if dcfg.has_proj and proj is None:
            proj = init_proj(dcfg, proj_rng)
        return steps.init_state(optimizer, student_params(dcfg, model_params, proj))

    return jax.jit(make, out_shardings=shardings)(model_params, proj)


# -------------------------------------------------------------------------------- the loss


def _final_and_block_outputs(cfg: ModelConfig, params: model.Params, batch: Batch
                             ) -> tuple[jax.Array, jax.Array]:
    """(final-norm hidden [B, L, D], block outputs [N, B, L, D]) from one forward pass.

    `model.forward_with_intermediates` would also make the [B, L, V] logits, and re-applying
    the final norm to its last block output makes XLA's sharding propagation shard that
    gradient's D over fsdp (an "involuntary full rematerialization" on a mesh). So this
    runs the decoder without logits and reads the sown block outputs, as
    `forward_with_intermediates` does.
    """
    final_BLD, sown = model.Decoder(cfg).apply(
        {"params": params}, batch["tokens"], batch.get("segment_ids"), batch.get("positions"),
        logits=False, mutable=["intermediates"])
    return final_BLD, sown["intermediates"]["layers"]["block_out"][0]


def _hidden_loss_BL(hidden: HiddenDistill, student_NBLD: jax.Array, teacher_NBLT: jax.Array,
                    proj_DT: jax.Array | None, compute_dtype: Any) -> jax.Array:
    """Per-token hidden-state loss, averaged over the mapped layers, float32 [B, L]."""
    if proj_DT is not None:
        student_NBLT = jnp.einsum("NBLD,DT->NBLT", student_NBLD, proj_DT.astype(compute_dtype),
                                  preferred_element_type=jnp.float32)
    else:
        student_NBLT = student_NBLD.astype(jnp.float32)
    teacher_NBLT = teacher_NBLT.astype(jnp.float32)
    if hidden.kind == "mse":
        per_layer_NBL = jnp.mean(jnp.square(student_NBLT - teacher_NBLT), axis=-1)
    else:
        dot_NBL = jnp.sum(student_NBLT * teacher_NBLT, axis=-1)
        norms_NBL = (jnp.linalg.norm(student_NBLT, axis=-1)
                     * jnp.linalg.norm(teacher_NBLT, axis=-1))
        per_layer_NBL = 1.0 - dot_NBL / jnp.maximum(norms_NBL, 1e-6)
    return jnp.mean(per_layer_NBL, axis=0)


def _as_sum(loss: jax.Array, metrics: Metrics) -> tuple[jax.Array, Metrics]:
    """(mean loss, sums with `count`) -> (loss SUM to differentiate, the same sums)."""
    count = jax.lax.stop_gradient(metrics["count"])
    return loss * count, metrics  # the mean times its (constant) denominator: the weighted sum


def loss_sum_and_metrics(dcfg: DistillConfig, params: model.Params, teacher_params: model.Params,
                         batch: Batch) -> tuple[jax.Array, Metrics]:
    """(token-weighted loss SUM to differentiate, metrics as sums) for one (micro-)batch.

    A sum rather than a mean so micro-batches add up exactly; `compute_grads` divides by the
    total token count once. The metrics carry `count` (= tokens counted) for `loop.fit`.
    """
    teacher_params = jax.lax.stop_gradient(teacher_params)
    targets_BL, weights_BL = lm.next_token_targets(batch)
    student_model = student_model_params(dcfg, params)
    if dcfg.hidden is None:
        student_BLD = model.hidden_states(dcfg.student, student_model, batch["tokens"],
                                          batch.get("segment_ids"), batch.get("positions"))
        teacher_BLT = model.hidden_states(dcfg.teacher, teacher_params, batch["tokens"],
                                          batch.get("segment_ids"), batch.get("positions"))
    else:
        student_BLD, student_NBLD = _final_and_block_outputs(dcfg.student, student_model, batch)
        teacher_BLT, teacher_all_NBLT = _final_and_block_outputs(dcfg.teacher, teacher_params,
                                                                 batch)
    objective, metrics = _as_sum(*losses.distill_loss(
        student_BLD, model.lm_head_weights(dcfg.student, student_model),
        teacher_BLT, model.lm_head_weights(dcfg.teacher, teacher_params),
        targets_BL, weights_BL, dcfg.loss))
    if dcfg.hidden is not None:
        teacher_NBLT = teacher_all_NBLT[jnp.asarray(dcfg.hidden.layer_map)]
        proj_DT = params["proj"] if dcfg.has_proj else None
        hidden_BL = _hidden_loss_BL(dcfg.hidden, student_NBLD, teacher_NBLT, proj_DT,
                                    dcfg.student.compute_dtype)
        hidden_sum = jnp.sum(hidden_BL * weights_BL)
        objective = objective + dcfg.hidden.weight * hidden_sum
        metrics["hidden_sum"] = hidden_sum
        metrics["loss_sum"] = metrics["loss_sum"] + dcfg.hidden.weight * hidden_sum
    return objective, metrics


def compute_grads(dcfg: DistillConfig, params: model.Params, teacher_params: model.Params,
                  batch: Batch) -> tuple[model.Params, Metrics]:
    """Gradient of the token-weighted mean loss over the whole batch, and summed metrics.

    With `grad_accum = k` the batch is scanned as k micro-batches (activations of one at a
    time); gradients and metrics are summed in float32 and divided by the total count once.
    """
    def loss_fn(params: model.Params, micro_batch: Batch) -> tuple[jax.Array, Metrics]:
        return loss_sum_and_metrics(dcfg, params, teacher_params, micro_batch)

    return steps.accumulate_grads(loss_fn, dcfg.grad_accum, params, batch)


# -------------------------------------------------------------------------------- the step


def train_step(dcfg: DistillConfig, optimizer: optax.GradientTransformation,
               state: steps.TrainState, teacher_params: model.Params, batch: Batch
               ) -> tuple[steps.TrainState, Metrics]:
    """One optimizer step of the student; the teacher is read, never written."""
    grads, metrics = compute_grads(dcfg, state.params, teacher_params, batch)
    return steps.apply_grads(optimizer, state, grads, metrics)


def jit_train_step(dcfg: DistillConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules: Any = sharding.DEFAULT_RULES) -> StepFn:
    """`train_step` compiled for `mesh`: `(state, teacher_params, batch) -> (state, metrics)`.

    Student state and teacher params are sharded by their own logical axes (a mesh that does
    not divide a sharded dimension fails here, naming the param); the batch is split over
    data × fsdp; the incoming student state is donated, the teacher is not.
    """
    return steps.jit_step(functools.partial(train_step, dcfg, optimizer),
                          state_shardings(dcfg, optimizer, mesh, rules), mesh,
                          frozen_shardings=(teacher_shardings(dcfg, mesh, rules),), rules=rules)


def with_teacher(step_fn: StepFn, teacher_params: model.Params
                 ) -> Callable[[steps.TrainState, Batch], tuple[steps.TrainState, Metrics]]:
    """`(state, batch) -> (state, metrics)` with the teacher bound: what `loop.fit` drives."""

    def step(state: steps.TrainState, batch: Batch) -> tuple[steps.TrainState, Metrics]:
        return step_fn(state, teacher_params, batch)

    return step


# ------------------------------------------------------------ the step fed by a teacher cache

CACHED_KEYS = ("teacher_idx", "teacher_logprobs")  # [B, L, k]; see `logits_cache`


def _check_cached_config(dcfg: DistillConfig, mode: str) -> None:
    if mode not in losses.SPARSE_MODES:
        raise ValueError(f"mode={mode!r}; choose the cache's mode, one of "
                         f"{list(losses.SPARSE_MODES)}")
    if dcfg.hidden is not None:
        raise ValueError("a logits cache holds no teacher hidden states; set "
                         "DistillConfig(hidden=None) or distil online with train_step")


def _check_cached_batch(batch: Batch) -> None:
    missing = [name for name in CACHED_KEYS if name not in batch]
    if missing:
        raise ValueError(f"batch has no {missing} (it has {sorted(batch)}); feed batches from "
                         "logits_cache.cache_dataset, or use train_step with teacher params")


def cached_loss_sum_and_metrics(dcfg: DistillConfig, params: model.Params, batch: Batch, *,
                                mode: str = "topk") -> tuple[jax.Array, Metrics]:
    """`loss_sum_and_metrics` against the batch's cached sparse teacher targets.

    The student's logits are made chunk by chunk from its hidden states and head inside the
    fused `losses.sparse_distill_loss` (no [B, L, V] live when `dcfg.loss.chunk_size` is
    set); `dcfg.teacher` is not used. With top-k targets and k = V this equals the online
    loss (forward KL, any divergence or temperature): the teacher's distribution is whole.
    """
    _check_cached_config(dcfg, mode)
    _check_cached_batch(batch)
    targets_BL, weights_BL = lm.next_token_targets(batch)
    student_model = student_model_params(dcfg, params)
    student_BLD = model.hidden_states(dcfg.student, student_model, batch["tokens"],
                                      batch.get("segment_ids"), batch.get("positions"))
    return _as_sum(*losses.sparse_distill_loss(
        student_BLD, model.lm_head_weights(dcfg.student, student_model),
        batch["teacher_idx"], batch["teacher_logprobs"], targets_BL, weights_BL, dcfg.loss,
        mode=mode))


def compute_grads_cached(dcfg: DistillConfig, params: model.Params, batch: Batch, *,
                         mode: str = "topk") -> tuple[model.Params, Metrics]:
    """`compute_grads` (same accumulation over `dcfg.grad_accum`) with cached targets."""
    loss_fn = functools.partial(cached_loss_sum_and_metrics, dcfg, mode=mode)
    return steps.accumulate_grads(loss_fn, dcfg.grad_accum, params, batch)


def train_step_cached(dcfg: DistillConfig, optimizer: optax.GradientTransformation,
                      state: steps.TrainState, batch: Batch, *, mode: str = "topk"
                      ) -> tuple[steps.TrainState, Metrics]:
    """One optimizer step of the student on a batch carrying its teacher targets (`mode`:
    'topk' or 'sampled', the cache's `CacheInfo.mode`); no teacher params at all."""
    grads, metrics = compute_grads_cached(dcfg, state.params, batch, mode=mode)
    return steps.apply_grads(optimizer, state, grads, metrics)


def jit_train_step_cached(dcfg: DistillConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh, rules: Any = sharding.DEFAULT_RULES, *,
                          mode: str = "topk"
                          ) -> Callable[[steps.TrainState, Batch],
                                        tuple[steps.TrainState, Metrics]]:
    """`train_step_cached` compiled for `mesh`: `(state, batch) -> (state, metrics)`, what
    `loop.fit` drives. The batch (targets [B, L, k] included) is split over data × fsdp;
    the incoming state is donated."""
    _check_cached_config(dcfg, mode)
    return steps.jit_step(functools.partial(train_step_cached, dcfg, optimizer, mode=mode),
                          state_shardings(dcfg, optimizer, mesh, rules), mesh, rules=rules)
