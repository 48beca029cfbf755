"""Distillation step throughput and MFU: `python -m experiments.bench_distill`.

Prints a markdown table: tokens/s of our jitted distill step (`distill.step.jit_train_step`:
frozen teacher forward, student forward + backward, fused forward-KL loss, AdamW with
warmup-cosine and clipping), the same step written with PyTorch + `transformers`
(`MistralForCausalLM` teacher under `no_grad`, student forward/backward on full logits,
forward KL, `torch.optim.AdamW`, gradient clipping) at the same shapes and dtype, their ratio,
and each one's MFU against the matmul peak measured in the same run (a large jnp matmul in
the compute dtype; on CPU ~210 GFLOP/s for float32 on 2 cores).

Model FLOPs per step (both sides do exactly this work): every matmul of the teacher forward
(1×) and of the student forward + backward (3×): q/k/v/o projections, SwiGLU, attention
scores and values over the full L × L (both implementations compute the masked square), and
the LM head. Norms, softmax, RoPE, the loss and the optimizer are not counted.

A third row times the step fed by the offline teacher cache (`logits_cache` top-k targets,
`--cache_k`, read back from disk; `distill.step.jit_train_step_cached`): the same student
work, no teacher forward, so its model FLOPs are the student's 3× alone; `vs JAX online` is its
speed-up over our online step. Below the table: the cache's bytes per token, how fast
`write_cache` ran the teacher over the batches (teacher forward + top-k + disk) and how fast
`cache_dataset` reads shuffled rows back (it must outpace the step).

Steps are timed interleaved (JAX, torch, JAX, ...) so machine load hits both alike; medians
are reported. The script runs unchanged on a GPU (`--dtype=bfloat16`; the device is JAX's
default backend); the PyTorch side runs on the same kind of device (CUDA beside a GPU) and is
left out where torch cannot reach it (`--torch=no` leaves it out always). XLA flags
(`--xla_flags`) must be set before JAX starts, so this module imports JAX and the library only
inside `main`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

from experiments.common import matmul, torch_device

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary (shared by both models).")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Hidden width of both models.")
_HEADS = flags.DEFINE_integer("n_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("n_kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head width.")
_T_LAYERS = flags.DEFINE_integer("teacher_layers", 8, "Teacher depth.")
_T_FF = flags.DEFINE_integer("teacher_ff", 1536, "Teacher FFN width.")
_S_LAYERS = flags.DEFINE_integer("student_layers", 4, "Student depth.")
_S_FF = flags.DEFINE_integer("student_ff", 1024, "Student FFN width.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Sequence chunk of the fused loss (0: unfused).")
_CACHE_K = flags.DEFINE_integer("cache_k", 64, "Top-k of the offline-cache row (0: no row).")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float32", ["float32", "bfloat16"],
                                 "Dtype of the cached teacher log-probs.")
_CACHE_BATCHES = flags.DEFINE_integer("cache_batches", 4, "Batches written to the cache.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per side.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side (compilation included).")
_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "yes", "no"],
                           "Time the PyTorch step (auto: when torch reaches JAX's device kind).")
_PEAK_N = flags.DEFINE_integer("peak_n", 0, "Matmul size for the peak (0: 2048 on CPU, "
                               "8192 on accelerators).")
_ATTENTION = flags.DEFINE_enum("attention_impl", "xla", ["xla", "jax", "cudnn"],
                               "ModelConfig.attention_impl of both models ('cudnn': GPUs).")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before JAX starts.")


def _forward_flops(cfg: Any, tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward over `tokens` tokens in rows of `seq_len` (see docstring)."""
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    projections = 2 * d * e * (2 * h + 2 * k)
    mlp = 2 * 3 * d * f
    attention = 2 * 2 * seq_len * h * e
    return tokens * (cfg.n_layers * (projections + mlp + attention) + 2 * d * cfg.vocab_size)


def _jax_step(student: Any, teacher: Any, batch: dict[str, Any]) -> Callable[[], Any]:
    """Our jitted step on a mesh of all local devices; returns a closure running one step."""
    import jax

    from cascade_jax import sharding, steps
    from cascade_jax.distill import losses, step

    dcfg = step.DistillConfig(student, teacher,
                              losses.LossSpec(chunk_size=_CHUNK.value or None))
    mesh = sharding.make_mesh(data=-1)
    optimizer = steps.make_optimizer(lr=1e-4, total_steps=10_000, warmup_steps=10)
    state = step.create_state(dcfg, optimizer, mesh, rng=jax.random.key(0))
    teacher_params = sharding.init_params(teacher, jax.random.key(1), mesh)
    step_fn = step.jit_train_step(dcfg, optimizer, mesh)
    sharded = sharding.shard_batch(batch, mesh)
    holder = {"state": state}

    def run() -> Any:
        holder["state"], metrics = step_fn(holder["state"], teacher_params, sharded)
        return metrics["loss_sum"]

    return run


def _cached_step(student: Any, teacher: Any, batch: dict[str, Any], directory: str
                 ) -> tuple[Callable[[], Any], str]:
    """The step fed by an offline top-k cache of `teacher`, written to `directory` first (the
    same batch `--cache_batches` times) and read back with `cache_dataset`; returns a closure
    running one step and a line describing the cache."""
    import jax

    from cascade_jax import logits_cache, sharding, steps
    from cascade_jax.distill import losses, step

    mesh = sharding.make_mesh(data=-1)
    teacher_params = sharding.init_params(teacher, jax.random.key(1), mesh)
    n, tokens = _CACHE_BATCHES.value, batch["tokens"].size
    logits_cache.write_cache(directory, teacher, teacher_params, [batch], k=_CACHE_K.value,
                             logprob_dtype=_CACHE_DTYPE.value, mesh=mesh, progress=False)
    start = time.perf_counter()  # the first write compiled the teacher pass; time a second
    info = logits_cache.write_cache(directory, teacher, teacher_params, [batch] * n,
                                    k=_CACHE_K.value, logprob_dtype=_CACHE_DTYPE.value,
                                    mesh=mesh, overwrite=True, progress=False)
    write_s = time.perf_counter() - start
    reader = iter(logits_cache.cache_dataset(info, global_batch_size=batch["tokens"].shape[0],
                                             seed=0))
    cached = next(reader)
    start = time.perf_counter()  # shuffled rows, after the first batch opened the arrays
    for _ in range(2 * n):
        next(reader)
    read_s = time.perf_counter() - start
    dcfg = step.DistillConfig(student, teacher,
                              losses.LossSpec(chunk_size=_CHUNK.value or None))
    optimizer = steps.make_optimizer(lr=1e-4, total_steps=10_000, warmup_steps=10)
    holder = {"state": step.create_state(dcfg, optimizer, mesh, rng=jax.random.key(0))}
    step_fn = step.jit_train_step_cached(dcfg, optimizer, mesh, mode=info.mode)
    sharded = sharding.shard_batch(cached, mesh)

    def run() -> Any:
        holder["state"], metrics = step_fn(holder["state"], sharded)
        return metrics["loss_sum"]

    note = (f"offline cache: top-{info.k} {info.logprob_dtype} log-probs + int32 indices, "
            f"{logits_cache.bytes_per_token(info)} bytes/token "
            f"({logits_cache.bytes_per_token(info) * 1e9 / 2**40:.2f} TiB per 1B tokens); "
            f"write_cache ran the teacher at {n * tokens / write_s:.0f} tokens/s "
            f"({n} batches, disk included); cache_dataset read {2 * n * tokens / read_s:.0f} "
            "tokens/s")
    return run, note


def _torch_step(student: Any, teacher: Any, batch: dict[str, Any],
                device: str) -> Callable[[], Any]:
    """The same step in PyTorch + transformers, written the way a PyTorch user would."""
    import torch
    import transformers

    from cascade_jax import hf

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[student.dtype]

    def build(cfg: Any) -> Any:
        config = transformers.MistralConfig(**hf.config_to_hf(cfg))
        config._attn_implementation = "sdpa"
        return transformers.MistralForCausalLM(config).to(device=device, dtype=dtype)

    teacher_model, student_model = build(teacher).eval(), build(student).train()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
    weights = torch.ones(tokens.shape, dtype=torch.float32, device=device)
    weights[:, -1] = 0.0  # the last position has no next token (as lm.next_token_targets)

    def run() -> Any:
        with torch.no_grad():
            teacher_logits = teacher_model(input_ids=tokens).logits.float()
        student_logits = student_model(input_ids=tokens).logits.float()
        t_logp = torch.log_softmax(teacher_logits, dim=-1)
        s_logp = torch.log_softmax(student_logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        loss = (kl * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return run


def main(argv: list[str]) -> None:
    del argv
    if _XLA_FLAGS.value:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
    import jax
    import numpy as np

    from cascade_jax.config import ModelConfig

    shared = {"vocab_size": _VOCAB.value, "d_model": _D_MODEL.value, "n_heads": _HEADS.value,
              "n_kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value,
              "max_seq_len": _SEQ.value, "dtype": _DTYPE.value,
              "attention_impl": _ATTENTION.value}
    teacher = ModelConfig(n_layers=_T_LAYERS.value, d_ff=_T_FF.value, **shared)
    student = ModelConfig(n_layers=_S_LAYERS.value, d_ff=_S_FF.value, **shared)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, _VOCAB.value, (_BATCH.value, _SEQ.value), np.int32)}
    batch["segment_ids"] = np.ones_like(batch["tokens"])
    batch["positions"] = np.broadcast_to(np.arange(_SEQ.value, dtype=np.int32),
                                         batch["tokens"].shape).copy()
    tokens = _BATCH.value * _SEQ.value
    flops = (_forward_flops(teacher, tokens, _SEQ.value)
             + 3 * _forward_flops(student, tokens, _SEQ.value))

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    peak_n = _PEAK_N.value or (2048 if on_cpu else 8192)
    chain = 1 if on_cpu else 16  # ≥ 20 ms of matmuls per timed call off-CPU
    online = "cascade_jax (jit)"
    sides: dict[str, Callable[[], Any]] = {
        "matmul": matmul(_DTYPE.value, peak_n, chain),
        online: _jax_step(student, teacher, batch),
    }
    side_flops = {online: flops}
    cache_note = ""
    if _CACHE_K.value:
        cached = f"cascade_jax offline top-{_CACHE_K.value} cache (jit)"
        with tempfile.TemporaryDirectory() as directory:
            sides[cached], cache_note = _cached_step(student, teacher, batch,
                                                     os.path.join(directory, "cache"))
        side_flops[cached] = 3 * _forward_flops(student, tokens, _SEQ.value)
    device = torch_device(backend) if _TORCH.value != "no" else None
    if _TORCH.value == "yes" and device is None:
        raise ValueError(f"--torch=yes but PyTorch cannot reach JAX's {backend} device; "
                         "install a torch build for it or pass --torch=auto")
    if device is not None:
        sides["PyTorch + transformers"] = _torch_step(student, teacher, batch, device)
        side_flops["PyTorch + transformers"] = flops

    def timed(run: Callable[[], Any]) -> float:
        start = time.perf_counter()
        float(run())  # a host read: waits for JAX's async dispatch and for CUDA
        return time.perf_counter() - start

    for run in sides.values():
        for _ in range(_WARMUP.value):
            timed(run)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(_STEPS.value):  # interleaved rounds: load changes hit every side alike
        for name, run in sides.items():
            times[name].append(timed(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    peak = 2 * peak_n**3 * chain / median.pop("matmul")

    print(f"device: {jax.devices()[0].device_kind} ×{jax.device_count()} ({backend}); "
          f"{_DTYPE.value}; attention {_ATTENTION.value}; batch {_BATCH.value}×{_SEQ.value}; "
          "teacher "
          f"{teacher.n_layers}L F={teacher.d_ff}, student {student.n_layers}L F={student.d_ff}, "
          f"D={_D_MODEL.value} H={_HEADS.value}/K={_KV_HEADS.value}×{_HEAD_DIM.value} "
          f"V={_VOCAB.value}; {flops / 1e9:.1f} model GFLOP/step; jnp {peak_n}² matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; medians of {_STEPS.value} interleaved rounds; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print("| step | ms/step | tokens/s | vs PyTorch | vs JAX online | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    reference = median.get("PyTorch + transformers")
    for name, seconds in median.items():
        ratio = f"{reference / seconds:.2f}×" if reference else "n/a"
        vs_online = f"{median[online] / seconds:.2f}×"
        work = side_flops[name]
        print(f"| {name} | {seconds * 1e3:.0f} | {tokens / seconds:.0f} | {ratio} | "
              f"{vs_online} | {work / seconds / 1e9:.0f} | {work / seconds / peak:.0%} |")
    if cache_note:
        print(f"\n{cache_note}")


if __name__ == "__main__":
    app.run(main)
