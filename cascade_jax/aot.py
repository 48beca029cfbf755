"""Ahead-of-time cost of a step: per-device memory and FLOPs from XLA, with nothing allocated.

Whether a 24B teacher and a 14B student fit a pod is a question for the compiler, not for a
launch that dies after an hour of loading weights. Every step here is lowered from
`jax.ShapeDtypeStruct`s that carry their shardings and compiled; no parameter is ever made.

Memory is XLA's `memory_analysis()` of the partitioned (per-device) program. Its total is
argument + output − alias + temp: donated inputs (the student state) share their buffers with
the outputs that replace them.

FLOPs need care. `cost_analysis()` counts a while loop's body once, whatever its trip count
(measured: a 4-layer scanned model counts 1% more than a 2-layer one), and both the layer scan
and the fused loss's chunk scan are loops. So FLOPs are counted on variants of the step whose
loops run once: layers unrolled (`scan_unroll`), the loss in one chunk, no micro-batches.
Per-step FLOPs are affine in each model's depth (the layers are identical), so one compile with
every model at 1 layer and one more per model at 2 layers give the exact count at any depth:
F(N₁, N₂, …) = F(1, 1, …) + Σᵢ (Nᵢ − 1)·(F(…, 2ᵢ, …) − F(1, 1, …)). Rematerialisation is
kept, so recomputed forwards are counted: these are executed FLOPs, not model FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cascade_jax import model, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.distill import step as distill_step

BATCH_KEYS = ("tokens", "segment_ids", "positions")
STEP_KINDS = ("train", "distill", "forward")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one compiled program (XLA's `memory_analysis`)."""

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int

    @property
    def total(self) -> int:
        """Peak estimate: donated arguments are reused by the outputs they alias."""
        return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One step to cost: which kind, on which models, at which global batch shape.

    kind: 'train' (cross-entropy AdamW step of `student`), 'distill' (`distill_step.train_step`
    of `distill.student` from the frozen `distill.teacher`; `student` must be the same config)
    or 'forward' (`steps.eval_sums` of `student`, e.g. a root that is loaded, not trained).
    """

    kind: str
    student: ModelConfig
    batch_size: int
    seq_len: int
    optimizer: optax.GradientTransformation | None = None
    distill: distill_step.DistillConfig | None = None
    # Micro-batches of 'train' (grad_accum) and 'forward' (eval micro_batches); 'distill'
    # takes `distill.grad_accum`.
    micro_batches: int = 1
    # Positions per logits block of 'train' and 'forward' (`steps.ce_sums`); None: whole rows.
    loss_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"kind={self.kind!r} is unknown; choose one of {STEP_KINDS}")
        if self.kind == "distill" and (self.distill is None
                                       or self.distill.student != self.student):
            raise ValueError("kind='distill' needs distill=DistillConfig(student, teacher, ...) "
                             "with the same student config as StepSpec.student")
        if self.kind in ("train", "distill") and self.optimizer is None:
            raise ValueError(f"kind={self.kind!r} needs an optimizer (steps.make_optimizer)")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"batch_size={self.batch_size} and seq_len={self.seq_len} must be "
                             ">= 1 and >= 2")

    def models(self) -> dict[str, ModelConfig]:
        """The model configs whose depth the step's cost depends on."""
        if self.kind == "distill":
            return {"student": self.distill.student, "teacher": self.distill.teacher}
        return {"student": self.student}

    def with_models(self, models: Mapping[str, ModelConfig]) -> StepSpec:
        """The same step on other model configs (same keys as `models()`)."""
        if self.kind != "distill":
            return dataclasses.replace(self, student=models["student"])
        dcfg = dataclasses.replace(self.distill, student=models["student"],
                                   teacher=models["teacher"])
        return dataclasses.replace(self, student=dcfg.student, distill=dcfg)


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one compiled step costs per device."""

    memory: Memory
    flops: float             # XLA's count for the compiled program itself (loops counted once)
    compile_s: float


# ----------------------------------------------------------------------- abstract arguments


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int, micro_batches: int = 1
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The [B, L] int32 batch contract, split over data × fsdp (and L over context) like a
    real batch."""
    sharding.check_batch_split(batch_size, mesh, micro_batches, seq_len)
    where = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=where)
            for k in BATCH_KEYS}


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> model.Params:
    """`ShapeDtypeStruct`s of `cfg`'s params placed on their shardings."""
    return steps.abstract_like(model.param_shapes(cfg), sharding.param_shardings(cfg, mesh))


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> steps.TrainState:
    return steps.abstract_state(optimizer, model.param_shapes(cfg),
                                steps.model_state_shardings(cfg, optimizer, mesh))


def abstract_distill_state(dcfg: distill_step.DistillConfig,
                           optimizer: optax.GradientTransformation, mesh: Mesh
                           ) -> steps.TrainState:
    return steps.abstract_state(optimizer, distill_step.param_shapes(dcfg),
                                distill_step.state_shardings(dcfg, optimizer, mesh))


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (from shard shapes)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def step_and_args(spec: StepSpec, mesh: Mesh) -> tuple[Any, tuple[Any, ...]]:
    """(the jitted step exactly as training runs it, its abstract arguments)."""
    micro = spec.distill.grad_accum if spec.kind == "distill" else spec.micro_batches
    batch = abstract_batch(mesh, spec.batch_size, spec.seq_len, micro)
    if spec.kind == "train":
        return (steps.jit_ce_train_step(spec.student, spec.optimizer, mesh,
                                        grad_accum=spec.micro_batches,
                                        chunk_size=spec.loss_chunk),
                (abstract_train_state(spec.student, spec.optimizer, mesh), batch))
    if spec.kind == "distill":
        dcfg = spec.distill
        return (distill_step.jit_train_step(dcfg, spec.optimizer, mesh),
                (abstract_distill_state(dcfg, spec.optimizer, mesh),
                 abstract_params(dcfg.teacher, mesh), batch))
    return (steps.jit_eval_sums(spec.student, mesh, micro_batches=spec.micro_batches,
                                chunk_size=spec.loss_chunk),
            (abstract_params(spec.student, mesh), batch))


def argument_bytes(spec: StepSpec, mesh: Mesh) -> dict[str, int]:
    """Per-device bytes of the step's inputs by the sharding arithmetic alone (no compile):
    'state' (params + optimizer state + step, or params for 'forward'), 'teacher', 'batch'."""
    _, args = step_and_args(spec, mesh)
    names = ("state", "teacher", "batch") if spec.kind == "distill" else ("state", "batch")
    return dict(zip(names, (shard_bytes(a) for a in args), strict=True))


# -------------------------------------------------------------------------------- compiling


def compile_cost(jitted: Any, *args: Any) -> Cost:
    """Lower and compile `jitted` on abstract `args`; XLA's per-device memory and FLOPs."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = Memory(argument=int(stats.argument_size_in_bytes),
                    output=int(stats.output_size_in_bytes),
                    alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
                    generated_code=int(stats.generated_code_size_in_bytes))
    return Cost(memory=memory, flops=_flops(compiled.cost_analysis()), compile_s=seconds)


def _flops(analysis: Any) -> float:
    """`cost_analysis()` is a dict (a list of one dict in older jax)."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def step_cost(spec: StepSpec, mesh: Mesh) -> Cost:
    """The compiled step exactly as training runs it (scanned layers, chunked loss)."""
    return compile_cost(*_flatten(step_and_args(spec, mesh)))


def _flatten(pair: tuple[Any, tuple[Any, ...]]) -> tuple[Any, ...]:
    jitted, args = pair
    return (jitted, *args)


def counting_variant(spec: StepSpec, depths: Mapping[str, int]) -> StepSpec:
    """`spec` with every loop run once: layers unrolled at the given depths, one loss chunk,
    no micro-batches (see the module docstring)."""
    models = {name: cfg.replace(n_layers=depths[name], scan_unroll=True)
              for name, cfg in spec.models().items()}
    out = spec.with_models(models)
    if out.kind == "distill":
        loss = dataclasses.replace(out.distill.loss, chunk_size=max(spec.seq_len,
                                                                    out.distill.loss.chunk_size
                                                                    or 1))
        out = dataclasses.replace(out, distill=dataclasses.replace(out.distill, loss=loss,
                                                                   grad_accum=1))
    return dataclasses.replace(out, micro_batches=1)


def exact_flops(spec: StepSpec, mesh: Mesh,
                compile_fn: Callable[[StepSpec, Mesh], Cost] = step_cost
                ) -> tuple[float, float]:
    """(per-device FLOPs of one step, seconds spent compiling), counted exactly by
    extrapolating over depth from 1 + (number of models) small compiles (module docstring)."""
    if spec.kind == "distill" and spec.distill.hidden is not None:
        raise ValueError("FLOP counting does not support hidden-state distillation (its layer "
                         "map fixes the depths); count the step with hidden=None")
    models = spec.models()
    ones = dict.fromkeys(models, 1)
    base = compile_fn(counting_variant(spec, ones), mesh)
    flops, seconds = base.flops, base.compile_s
    for name, cfg in models.items():
        two = compile_fn(counting_variant(spec, {**ones, name: 2}), mesh)
        flops += (cfg.n_layers - 1) * (two.flops - base.flops)
        seconds += two.compile_s
    return flops, seconds


# ---------------------------------------------------------------------------- cross-checks


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every layer's and the LM head (the
    embedding lookup is a gather, not a matmul)."""
    return cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1) \
        - cfg.d_model * (2 * cfg.n_layers + 1)


def attention_fraction(cfg: ModelConfig, seq_len: int, context: int = 1) -> float:
    """The share of the [L, L] score square attention computes: 1 for the whole square
    (attention_chunk None, or a fused kernel), the kept (query block, key block) pairs of
    `model.block_pairs` with blocks (causal and window skipping), under context parallelism
    (`context` > 1) each shard's queries against every key (no skipping)."""
    if cfg.attention_impl != "xla" or cfg.attention_chunk is None:
        return 1.0
    chunk = min(cfg.attention_chunk, seq_len)
    n = -(-seq_len // chunk)
    if context > 1:
        return 1.0
    return len(model.block_pairs(n, n, chunk, cfg.sliding_window, skip=True)) / n**2


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, context: int = 1) -> float:
    """2·(matmul weights) + the attention scores and mixing, 4·N·L·H·E times the share of
    the score square computed (`attention_fraction`: blocks above the diagonal skipped)."""
    attention = 4.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 2.0 * matmul_params(cfg) + attention * attention_fraction(cfg, seq_len, context)


def analytic_flops(spec: StepSpec, n_devices: int, context: int = 1) -> float:
    """Textbook per-device FLOPs of the step, if the work split evenly over `n_devices`
    (`context` of them splitting each row): a trained model costs 3 forwards (4 with remat),
    a frozen teacher or eval one."""
    tokens = spec.batch_size * spec.seq_len
    student = forward_flops_per_token(spec.student, spec.seq_len, context)
    passes = 1 if spec.kind == "forward" else 4 if spec.student.remat else 3
    total = passes * student
    if spec.kind == "distill":
        total += forward_flops_per_token(spec.distill.teacher, spec.seq_len, context)
    return total * tokens / n_devices

