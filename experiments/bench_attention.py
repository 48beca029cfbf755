"""Attention implementations side by side: `python -m experiments.bench_attention`.

Prints a markdown table: for each `ModelConfig.attention_impl` this backend can run ('xla':
our einsums; 'jax': `jax.nn.dot_product_attention` lowered by XLA; 'cudnn': cuDNN flash
attention, NVIDIA GPUs only), the jitted forward + backward of a whole model (`model.forward`,
mean-square loss of the logits, gradients for every param) on packed rows (`--segments` per
row, so the segment mask is live) at the same shapes and dtype: milliseconds per step, the
speed-up over 'xla', and the largest relative error of its logits and of its gradients against
'xla' on the same params and tokens (the parity proof for 'cudnn', which CI cannot run).
Steps are timed interleaved, medians reported. JAX is imported inside `main` so
`--xla_flags` can still be set.

Two more tables, on the attention alone (q, k, v → heads, forward + backward under a random
cotangent, packed segments and the window): blockwise attention (`model.attend_blocks`,
blocks of `--chunk`) with masked blocks skipped vs computing every block vs the full-square
`model.attend`, with each one's score-matmul FLOPs and its error against the full square; and
context parallelism (`--context` shards, on as many virtual CPU devices when the backend has
fewer) vs one device, with the keys/values/ids each device all-gathers.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from absl import app, flags

_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 2, "Rows.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_SEGMENTS = flags.DEFINE_integer("segments", 3, "Packed documents per row.")
_WINDOW = flags.DEFINE_integer("sliding_window", 0, "Attention window (0: full causal).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Hidden width.")
_LAYERS = flags.DEFINE_integer("n_layers", 2, "Depth.")
_HEADS = flags.DEFINE_integer("n_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("n_kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head width.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before JAX starts.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Block size of the blockwise attention rows.")
_CONTEXT = flags.DEFINE_integer("context", 8, "Context shards of the context-parallel rows "
                                "(0: no such rows).")


def _packed_segment_ids(batch: int, length: int, segments: int) -> Any:
    """[B, L] ids 1..segments in contiguous runs of (nearly) equal length."""
    import numpy as np

    run = -(-length // segments)
    return np.broadcast_to(1 + np.arange(length) // run, (batch, length)).astype(np.int32)


def _max_rel_err(ours: Any, reference: Any) -> float:
    import jax
    import numpy as np

    def one(a: Any, b: Any) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(one, ours, reference)))


def _median_ms(fns: dict[str, Any], *args: Any) -> dict[str, float]:
    """Median ms per call of each jitted fn, interleaved, after one warm-up call each."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(_STEPS.value):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _attention_rows(cfg: Any, segment_ids_BL: Any) -> None:
    """The block-skipping and context-parallel tables (module docstring)."""
    import functools

    import jax
    import numpy as np

    from cascade_jax import model, sharding

    rng = np.random.default_rng(1)
    batch, length, k, g, e = (_BATCH.value, _SEQ.value, cfg.n_kv_heads, cfg.n_groups,
                              cfg.head_dim)
    q = rng.normal(size=(batch, length, k, g, e)).astype(cfg.dtype)
    kv = rng.normal(size=(2, batch, length, k, e)).astype(cfg.dtype)
    cot = rng.normal(size=(batch, length, k, g, e)).astype(cfg.dtype)
    mask = model.SegmentMask(np.asarray(segment_ids_BL),
                             np.asarray(model.positions_from_segments(segment_ids_BL)))
    window, chunk = cfg.sliding_window, min(_CHUNK.value, length)

    def vjp(attention: Any) -> Any:
        def run(q, k, v):
            out, pullback = jax.vjp(attention, q, k, v)
            return out, pullback(cot)
        return jax.jit(run)

    full_square = vjp(lambda q, k, v: model.attend(q, k, v, model.segment_mask(mask, mask,
                                                                               window)))
    blockwise = {f"blocks of {chunk}, {'skipping' if skip else 'every block'}": vjp(
        functools.partial(model.attend_blocks, queries=mask, keys=mask, chunk=chunk,
                          sliding_window=window, skip=skip)) for skip in (True, False)}
    fns = {"full square": full_square, **blockwise}
    ms = _median_ms(fns, q, *kv)
    reference = jax.device_get(full_square(q, *kv))
    n = -(-length // chunk)
    pairs = {name: len(model.block_pairs(n, n, chunk, window, skip="skipping" in name))
             for name in blockwise}
    square_flops = 4.0 * batch * length**2 * cfg.n_heads * e  # q·kᵀ and p·v, forward
    print(f"\nattention alone, forward + backward, {batch}×{length}, blocks of {chunk}\n")
    print("| attention | ms | vs full square | score FLOPs (fwd) | max rel err vs full square |")
    print("|---|---|---|---|---|")
    for name in fns:
        flops = square_flops * (pairs[name] / n**2 if name in pairs else 1.0)
        err = _max_rel_err(jax.device_get(fns[name](q, *kv)), reference)
        print(f"| {name} | {ms[name]:.2f} | {ms['full square'] / ms[name]:.2f}× | "
              f"{flops / 1e9:.3g} G | {err:.1e} |")
    context = _CONTEXT.value
    if context < 2:
        return
    if length % context or jax.device_count() < context:
        print(f"\n(no context-parallel rows: seq_len={length} over {context} shards on "
              f"{jax.device_count()} devices)")
        return
    one = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: model.attention_heads(cfg, q, k, v, mask), q, k, v)[1](
            cot.reshape(batch, length, -1, e)))
    mesh = sharding.make_mesh(data=1, context=context, devices=jax.devices()[:context])
    split = jax.jit(sharding.traced_on_mesh(lambda q, k, v: jax.vjp(
        lambda q, k, v: model.attention_heads(cfg, q, k, v, mask), q, k, v)[1](
            cot.reshape(batch, length, -1, e)), mesh),
        in_shardings=sharding.batch_sharding(mesh))
    ms = _median_ms({"one device": one, f"context={context}": split}, q, *kv)
    err = _max_rel_err(jax.device_get(split(q, *kv)), jax.device_get(one(q, *kv)))
    gathered = (2 * k * e * np.dtype(cfg.dtype).itemsize + 2 * 4) * batch * length \
        * (context - 1) / context
    print(f"\ncontext parallelism ({context} virtual devices on this host: their time "
          "shares its cores), attention forward + backward\n")
    print("| run | ms | gathered MiB per device | max rel err of grads vs one device |")
    print("|---|---|---|---|")
    print(f"| one device | {ms['one device']:.2f} | – | – |")
    print(f"| context={context} | {ms[f'context={context}']:.2f} | {gathered / 2**20:.3g} | "
          f"{err:.1e} |")


def main(argv: list[str]) -> None:
    del argv
    if _XLA_FLAGS.value:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
    flag = "--xla_force_host_platform_device_count"
    if _CONTEXT.value > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        # Only the CPU backend reads it: a GPU or TPU run keeps its own devices.
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"{flag}={_CONTEXT.value}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax import model
    from cascade_jax.config import ModelConfig

    base = ModelConfig(vocab_size=_VOCAB.value, d_model=_D_MODEL.value, n_layers=_LAYERS.value,
                       n_heads=_HEADS.value, n_kv_heads=_KV_HEADS.value,
                       head_dim=_HEAD_DIM.value, d_ff=4 * _D_MODEL.value,
                       max_seq_len=_SEQ.value, dtype=_DTYPE.value,
                       sliding_window=_WINDOW.value or None)
    impls = ["xla", "jax"] + (["cudnn"] if jax.default_backend() == "gpu"
                              and _DTYPE.value != "float32" else [])
    params = model.init(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens_BL = rng.integers(0, _VOCAB.value, (_BATCH.value, _SEQ.value)).astype(np.int32)
    segment_ids_BL = _packed_segment_ids(_BATCH.value, _SEQ.value, _SEGMENTS.value)

    def step_for(impl: str) -> Any:
        cfg = base.replace(attention_impl=impl)

        def loss(p: Any) -> tuple[jax.Array, jax.Array]:
            logits_BLV = model.forward(cfg, p, tokens_BL, segment_ids_BL)
            return jnp.mean(logits_BLV**2), logits_BLV

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    steps = {impl: step_for(impl) for impl in impls}
    outputs = {impl: jax.block_until_ready(step(params)) for impl, step in steps.items()}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(_STEPS.value):
        for impl, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params))
            times[impl].append(time.perf_counter() - start)
    median = {impl: statistics.median(values) for impl, values in times.items()}

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {_DTYPE.value}; "
          f"batch {_BATCH.value}×{_SEQ.value}, {_SEGMENTS.value} packed segments per row, "
          f"window {_WINDOW.value or 'none'}; {base.n_layers}L D={base.d_model} "
          f"H={base.n_heads}/K={base.n_kv_heads}×{base.head_dim} V={base.vocab_size}; "
          f"forward + backward; medians of {_STEPS.value} interleaved steps\n")
    print("| attention_impl | ms/step | vs xla | logits max rel err vs xla | "
          "grads max rel err vs xla |")
    print("|---|---|---|---|---|")
    (_, logits_ref), grads_ref = outputs["xla"]
    for impl in impls:
        (_, logits), grads = outputs[impl]
        print(f"| {impl} | {median[impl] * 1e3:.2f} | {median['xla'] / median[impl]:.2f}× | "
              f"{_max_rel_err(logits, logits_ref):.1e} | {_max_rel_err(grads, grads_ref):.1e} |")
    _attention_rows(base, segment_ids_BL)


if __name__ == "__main__":
    app.run(main)
