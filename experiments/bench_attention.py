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


def main(argv: list[str]) -> None:
    del argv
    if _XLA_FLAGS.value:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
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


if __name__ == "__main__":
    app.run(main)
