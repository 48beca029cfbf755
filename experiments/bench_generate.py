"""Greedy generation throughput: `python -m experiments.bench_generate`.

Prints a markdown table: our sampler (`generate.generate`: KV-cache prefill, then one jitted
`lax.while_loop` of decode steps) against `transformers` `generate` (`do_sample=False`, its
own KV cache) on the same weights (written with `hf.save`, read by
`AutoModelForCausalLM.from_pretrained`), the same prompts and the same number of new tokens.

Each side is timed twice per round: generating 1 token (the prefill, plus one greedy pick)
and generating all `--new_tokens`. Prefill tokens/s = prompt tokens / the first; decode
tokens/s = rows × (new_tokens - 1) / (the second - the first). Rounds are interleaved (ours,
theirs, ours, ...) so machine load hits both alike; medians are reported.

Decode is compared with its roofline, measured in the same run: per step it must read every
parameter once (the embedding table only as the tied LM head) and the cache of the tokens so
far (on average prompt + new_tokens / 2 per row), and compute 2 FLOPs per weight per row plus
attention; the roofline step time is max(bytes / read bandwidth, FLOPs / matmul peak), the
bandwidth from a jnp sum over `--bandwidth_mib` MiB, the peak from a jnp square matmul (the
best of all rounds for both: a ceiling is what the machine reached at least once).
`% of roofline` = roofline step time / measured step time. The weights are random with
1/sqrt(fan-in) scales (norms 1 ± 0.3), so the logits are peaked and greedy picks are stable;
the table says whether both sides picked the same tokens. XLA flags (`--xla_flags`) must be
set before JAX starts, so JAX and the library are imported inside `main`.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

from experiments.common import matmul, torch_device

_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Hidden width.")
_LAYERS = flags.DEFINE_integer("n_layers", 8, "Depth.")
_HEADS = flags.DEFINE_integer("n_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("n_kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head width.")
_D_FF = flags.DEFINE_integer("d_ff", 1536, "FFN width.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Greedy tokens generated per prompt.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "128"], "Rows per generate call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed interleaved rounds per batch size.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Matmul size for the compute peak.")
_BANDWIDTH_MIB = flags.DEFINE_integer("bandwidth_mib", 512, "Array size for the bandwidth.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before JAX starts.")


def _random_params(cfg: Any) -> Any:
    """Weights with 1/sqrt(fan-in) scales, N(0, 1) embeddings, norm scales 1 ± 0.3."""
    import jax

    from cascade_jax import model

    shapes = model.param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))

    def leaf(path: Any, shape: Any, key: jax.Array) -> jax.Array:
        name = path[-1].key
        noise = jax.random.normal(key, shape.shape, shape.dtype)
        if name == "scale":
            return 1.0 + 0.3 * noise
        if name == "embedding":
            return noise
        stacked = path[0].key == "layers"
        dims = shape.shape[1:] if stacked else shape.shape
        input_axes = 2 if name == "wo" else 1  # wo_HED reads H × E; the rest one axis
        return noise / math.sqrt(math.prod(dims[:input_axes]))

    return jax.tree.unflatten(treedef, [leaf(p, s, k) for (p, s), k in
                                        zip(leaves, keys, strict=True)])


def _read_bandwidth(mib: int) -> Callable[[], Any]:
    """A jnp sum over `mib` MiB of float32: the memory roofline (bytes read per call)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return lambda: total(x)


def _decode_step_cost(cfg: Any, rows: int, context: float) -> tuple[float, float]:
    """(bytes, FLOPs) one greedy decode step must read and compute at `context` cached
    tokens per row, float32."""
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    matmul_weights = cfg.n_layers * (d * e * (2 * h + 2 * k) + 3 * d * f) + d * cfg.vocab_size
    other_weights = cfg.n_layers * 2 * d + d + rows * d  # norms, the rows' embedding rows
    cache = 2 * cfg.n_layers * rows * context * k * e
    flops = rows * (2 * matmul_weights + 2 * 2 * cfg.n_layers * context * h * e)
    return 4 * (matmul_weights + other_weights + cache), flops


def _ours(cfg: Any, params: Any, prompts: Any) -> Callable[[int], Any]:
    from cascade_jax import generate

    def run(new_tokens: int) -> Any:
        return generate.generate(cfg, params, list(prompts),
                                 generate.SamplingParams(new_tokens, temperature=0)).tokens

    return run


def _theirs(hf_model: Any, prompts: Any) -> Callable[[int], Any]:
    import torch

    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=hf_model.device)
    attention_mask = torch.ones_like(input_ids)

    def run(new_tokens: int) -> Any:
        with torch.no_grad():
            out = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, input_ids.shape[1]:].cpu().numpy()  # a host read: waits for CUDA

    return run


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    if _XLA_FLAGS.value:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
    import jax
    import numpy as np
    import torch
    import transformers

    from cascade_jax import hf
    from cascade_jax.config import ModelConfig

    prompt_len, new_tokens = _PROMPT.value, _NEW.value
    cfg = ModelConfig(vocab_size=_VOCAB.value, d_model=_D_MODEL.value, n_layers=_LAYERS.value,
                      n_heads=_HEADS.value, n_kv_heads=_KV_HEADS.value,
                      head_dim=_HEAD_DIM.value, d_ff=_D_FF.value,
                      max_seq_len=prompt_len + new_tokens)
    params = _random_params(cfg)
    with tempfile.TemporaryDirectory() as directory:
        path = hf.save(cfg, params, os.path.join(directory, "model"))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval()  # transformers' default attention (sdpa)
    device = torch_device(jax.default_backend())
    if device is None:
        raise ValueError(f"PyTorch cannot reach JAX's {jax.default_backend()} device: the "
                         "transformers side would run elsewhere; install a torch build for it")
    hf_model = hf_model.to(device)

    chain = 1 if jax.default_backend() == "cpu" else 16  # ≥ 20 ms per timed call off-CPU
    peak_fn = matmul("float32", _PEAK_N.value, chain)
    bandwidth_fn = _read_bandwidth(_BANDWIDTH_MIB.value)
    rows_rng = np.random.default_rng(0)
    table = []
    peaks, bandwidths = [], []
    for batch in (int(b) for b in _BATCHES.value):
        prompts = rows_rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
        sides = {"cascade_jax": _ours(cfg, params, prompts), "transformers": _theirs(hf_model,
                                                                                    prompts)}
        tokens = {name: run(new_tokens) for name, run in sides.items()}  # warm-up, compile
        for run in sides.values():
            run(1)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(_REPEATS.value):
            float(peak_fn())
            peaks.append(2 * _PEAK_N.value**3 * chain / _timed(lambda: float(peak_fn())))
            bandwidths.append(_BANDWIDTH_MIB.value * 2**20 / _timed(lambda: float(bandwidth_fn())))
            for name, run in sides.items():
                for count in (1, new_tokens):
                    times.setdefault((name, count), []).append(
                        _timed(lambda run=run, count=count: run(count)))
        median = {key: statistics.median(values) for key, values in times.items()}
        same_rows = int(np.sum(np.all(tokens["cascade_jax"] == tokens["transformers"], axis=1)))
        table.append((batch, median, same_rows))
        print(f"batch {batch} done: " + ", ".join(f"{name} {count} tokens {seconds:.2f} s"
                                                  for (name, count), seconds in median.items()),
              file=sys.stderr, flush=True)

    peak, bandwidth = max(peaks), max(bandwidths)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), torch "
          f"{torch.__version__} on {device} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}; float32; N={cfg.n_layers} D={cfg.d_model} "
          f"H={cfg.n_heads}/K={cfg.n_kv_heads}×{cfg.head_dim} F={cfg.d_ff} V={cfg.vocab_size} "
          f"({cfg.num_params() / 1e6:.1f}M params); prompts {prompt_len} tokens, "
          f"{new_tokens} new tokens, greedy; measured: jnp {_PEAK_N.value}² matmul "
          f"{peak / 1e9:.0f} GFLOP/s, jnp sum over {_BANDWIDTH_MIB.value} MiB "
          f"{bandwidth / 1e9:.1f} GB/s (both the best of {_REPEATS.value} rounds); times: "
          f"medians of {_REPEATS.value} interleaved rounds\n")
    print("| batch | side | prefill ms | prefill tokens/s | decode ms/step | decode tokens/s "
          "| decode vs transformers | roofline ms/step | % of roofline | greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, median, same_rows in table:
        step_bytes, step_flops = _decode_step_cost(cfg, batch, prompt_len + new_tokens / 2)
        roofline = max(step_bytes / bandwidth, step_flops / peak)
        bound = "memory" if step_bytes / bandwidth >= step_flops / peak else "compute"
        decode = {name: (median[(name, new_tokens)] - median[(name, 1)]) / (new_tokens - 1)
                  for name in ("cascade_jax", "transformers")}
        same = (f"identical ({same_rows}/{batch} rows)" if same_rows == batch else
                f"{same_rows}/{batch} rows identical")
        for name in ("cascade_jax", "transformers"):
            prefill = median[(name, 1)]
            print(f"| {batch} | {name} | {prefill * 1e3:.1f} | "
                  f"{batch * prompt_len / prefill:.0f} | {decode[name] * 1e3:.2f} | "
                  f"{batch / decode[name]:.0f} | "
                  f"{decode['transformers'] / decode[name]:.2f}× | {roofline * 1e3:.2f} "
                  f"({bound}) | {roofline / decode[name]:.0%} | {same} |")


if __name__ == "__main__":
    app.run(main)
