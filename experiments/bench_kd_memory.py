"""KD loss memory and time: fused-and-chunked `distill_loss` against the naive loss.

    python -m experiments.bench_kd_memory                       # V=131072, L=4096, B=1, D=512
    python -m experiments.bench_kd_memory --length=1024 --chunk_sizes=512,256,128

Both variants compute `value_and_grad` of the same forward-KL loss w.r.t. the student's hidden
states and LM head. Naive materialises both [B, L, V] float32 logits (`chunk_size=None`);
fused makes them one [B, chunk, V] slice at a time. Memory is XLA's compiled memory analysis
(`jit(f).lower(...).compile().memory_analysis()`: temporaries, i.e. what the loss needs beyond
its inputs and outputs), so it is known without running. A variant is timed only when its
arguments + outputs + temporaries fit in `--max_run_gib` (default: 60% of the free host memory
on CPU, of the accelerator's memory limit otherwise). Runs unchanged on CPU, GPU and TPU.
Aim (issue #4): fused ≤ 10% of naive memory at ≤ 1.2× naive time.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from cascade_jax.distill import losses

_VOCAB = flags.DEFINE_integer("vocab", 131072, "Vocabulary size V (Ministral 3 / Mistral: 131072).")
_LENGTH = flags.DEFINE_integer("length", 4096, "Sequence length L.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Student d_model D.")
_TEACHER_D = flags.DEFINE_integer("teacher_d_model", 0, "Teacher d_model (0: same as student).")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["512", "256"], "Fused chunk sizes over L.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of hidden states.")
_KIND = flags.DEFINE_enum("kind", "forward_kl", list(losses.KINDS), "Divergence.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per variant (after one warm-up call).")
_MAX_RUN_GIB = flags.DEFINE_float("max_run_gib", 0.0,
                                  "Time a variant only if it needs at most this much memory "
                                  "(0: 60% of free host memory on CPU, of the device limit "
                                  "elsewhere).")

_GIB = 2**30


def _run_budget_bytes() -> int:
    if _MAX_RUN_GIB.value > 0:
        return int(_MAX_RUN_GIB.value * _GIB)
    device = jax.devices()[0]
    if device.platform == "cpu":
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(0.6 * free)
    stats = device.memory_stats() or {}
    return int(0.6 * stats.get("bytes_limit", 16 * _GIB))


def _loss_and_grads(spec: losses.LossSpec):
    def step(s_h, s_w, t_h, t_w, targets, weights):
        def loss(h, w):
            return losses.distill_loss(h, w, t_h, t_w, targets, weights, spec)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(s_h, s_w)
    return step


def _inputs(dtype: jnp.dtype, rng: jax.Array) -> tuple[jax.Array, ...]:
    b, length, v = _BATCH.value, _LENGTH.value, _VOCAB.value
    d_s, d_t = _D_MODEL.value, _TEACHER_D.value or _D_MODEL.value
    k = jax.random.split(rng, 5)
    return (jax.random.normal(k[0], (b, length, d_s), dtype),
            jax.random.normal(k[1], (d_s, v), jnp.float32) * d_s**-0.5,
            jax.random.normal(k[2], (b, length, d_t), dtype),
            jax.random.normal(k[3], (d_t, v), jnp.float32) * d_t**-0.5,
            jax.random.randint(k[4], (b, length), 0, v, jnp.int32),
            jnp.ones((b, length), jnp.float32))


def _measure(spec: losses.LossSpec, dtype: jnp.dtype, budget: int) -> dict[str, float | None]:
    abstract = jax.eval_shape(lambda: _inputs(dtype, jax.random.key(0)))
    compiled = jax.jit(_loss_and_grads(spec)).lower(*abstract).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes
    total = temp + mem.argument_size_in_bytes + mem.output_size_in_bytes
    seconds = None
    if total <= budget:
        args = jax.jit(lambda: _inputs(dtype, jax.random.key(0)))()
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(_STEPS.value):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        del args
    return {"temp": temp, "total": total, "seconds": seconds}


def _fmt_ratio(x: float | None, ref: float | None) -> str:
    return "n/a" if x is None or not ref else f"{x / ref:.3f}"


def main(argv: list[str]) -> None:
    del argv
    budget = _run_budget_bytes()
    b, length, v, d = _BATCH.value, _LENGTH.value, _VOCAB.value, _D_MODEL.value
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
          f"B={b} L={length} V={v} D_student={d} D_teacher={_TEACHER_D.value or d}; "
          f"kind={_KIND.value}; one [B, L, V] float32 array = {b * length * v * 4 / _GIB:.2f} "
          f"GiB; timing budget {budget / _GIB:.1f} GiB\n")
    print("| variant | dtype | peak temp bytes | temp GiB | time/step (s) | memory / naive "
          "| time / naive |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name in _DTYPES.value:
        dtype = jnp.dtype(dtype_name)
        naive = _measure(losses.LossSpec(kind=_KIND.value, chunk_size=None), dtype, budget)
        rows = [("naive", naive)]
        for chunk in _CHUNKS.value:
            spec = losses.LossSpec(kind=_KIND.value, chunk_size=int(chunk))
            rows.append((f"fused chunk={chunk}", _measure(spec, dtype, budget)))
        for name, r in rows:
            secs = "not run (too big)" if r["seconds"] is None else f"{r['seconds']:.3f}"
            print(f"| {name} | {dtype_name} | {r['temp']:,} | {r['temp'] / _GIB:.2f} | {secs} "
                  f"| {_fmt_ratio(r['temp'], naive['temp'])} "
                  f"| {_fmt_ratio(r['seconds'], naive['seconds'])} |", flush=True)


if __name__ == "__main__":
    app.run(main)
