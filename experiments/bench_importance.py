"""Importance pass vs plain forward over the same tokens: `python -m experiments.bench_importance`.

Prints a markdown table (model shape, tokens per batch, plain forward ms/batch, importance
ms/batch, ratio). Both sides are fed the same host batches the same way (sharded with
`sharding.shard_batch` onto a `data × fsdp × tensor` mesh of all local devices), after a
warm-up that compiles them; each is timed `--repeats` times, interleaved, and the median is
reported (the minimum too, as shared machines are noisy). The forward is the jitted
`model.forward` (logits included); the importance pass is `prune.estimate_importance`
end to end, finalisation included. Runs unchanged on CPU, GPU or TPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags

from cascade_jax import model, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.prune import importance

_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Hidden width.")
_LAYERS = flags.DEFINE_integer("n_layers", 4, "Number of blocks.")
_HEADS = flags.DEFINE_integer("n_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("n_kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head width.")
_D_FF = flags.DEFINE_integer("d_ff", 768, "FFN width.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch (global).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches per timed pass.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed passes per side.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Mesh fsdp size (data takes the remaining devices).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Mesh tensor size.")
_AGGREGATION = flags.DEFINE_string("aggregation", "l2_mean", "Importance aggregation.")
_NEURON = flags.DEFINE_enum("neuron_method", "minitron", list(importance.NEURON_METHODS),
                            "FFN neuron score.")


def _timed(fn: Callable[[], object], repeats: int, other: Callable[[], object]
           ) -> tuple[list[float], list[float]]:
    """Seconds of `fn` and `other`, alternating, so load changes hit both alike."""
    mine, theirs = [], []
    for _ in range(repeats):
        for run, out in ((fn, mine), (other, theirs)):
            start = time.perf_counter()
            jax.block_until_ready(run())
            out.append(time.perf_counter() - start)
    return mine, theirs


def main(argv: list[str]) -> None:
    del argv
    cfg = ModelConfig(vocab_size=_VOCAB.value, d_model=_D_MODEL.value, n_layers=_LAYERS.value,
                      n_heads=_HEADS.value, n_kv_heads=_KV_HEADS.value,
                      head_dim=_HEAD_DIM.value, d_ff=_D_FF.value, dtype=_DTYPE.value,
                      max_seq_len=max(_SEQ.value, 1))
    mesh = sharding.make_mesh(data=-1, fsdp=_FSDP.value, tensor=_TENSOR.value)
    params = sharding.init_params(cfg, jax.random.key(0), mesh)
    rng = np.random.default_rng(0)
    batches = [importance.host_batch(rng.integers(0, cfg.vocab_size, (_BATCH.value, _SEQ.value)))
               for _ in range(_BATCHES.value)]
    forward = jax.jit(lambda p, b: model.forward(cfg, p, b["tokens"], b["segment_ids"],
                                                 b["positions"]),
                      in_shardings=(sharding.param_shardings(cfg, mesh),
                                    sharding.batch_sharding(mesh)))

    def forward_pass() -> jax.Array:
        out = None
        for batch in batches:
            out = forward(params, sharding.shard_batch(batch, mesh))
        return out

    def importance_pass() -> importance.Importance:
        return importance.estimate_importance(
            cfg, params, batches, mesh=mesh, aggregation=_AGGREGATION.value,
            neuron_method=_NEURON.value, progress=False)

    jax.block_until_ready(forward_pass())      # compile both before timing
    jax.block_until_ready(importance_pass())
    imp_s, fwd_s = _timed(importance_pass, _REPEATS.value, forward_pass)
    n = _BATCHES.value
    fwd_ms, imp_ms = statistics.median(fwd_s) / n * 1e3, statistics.median(imp_s) / n * 1e3
    best_fwd, best_imp = min(fwd_s) / n * 1e3, min(imp_s) / n * 1e3
    shape = (f"N={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads}/K={cfg.n_kv_heads}x"
             f"{cfg.head_dim} F={cfg.d_ff} V={cfg.vocab_size} {cfg.dtype} "
             f"({cfg.num_params() / 1e6:.1f}M params)")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, mesh "
          f"{dict(mesh.shape)}; {_REPEATS.value} interleaved passes of {n} batches\n")
    print("| model | tokens/batch | forward ms/batch | importance ms/batch | ratio "
          "| ratio (min/min) |")
    print("|---|---|---|---|---|---|")
    print(f"| {shape} | {_BATCH.value}×{_SEQ.value} | {fwd_ms:.1f} | {imp_ms:.1f} | "
          f"{imp_ms / fwd_ms:.2f} | {best_imp / best_fwd:.2f} |")


if __name__ == "__main__":
    app.run(main)
