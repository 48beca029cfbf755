"""Where one GRPO iteration's time goes: `python -m experiments.bench_grpo`.

Builds the `grpo` objective exactly as a cascade stage does (the built-in reasoning task,
character tokens, the tiny reasoning root's shape by default), then times `--iterations`
loop iterations after a warm-up one (which compiles), split into:

- sampling: `generate.generate` (prefill + the decode `while_loop`), timed inside the
  objective's own `prepare_batch` by wrapping the sampler;
- host: the rest of `prepare_batch` (prompt rows, decoding completions, the verifier,
  building the rollout batch), i.e. everything that is not sampling or a jitted step;
- update: the jitted step (the trainer's own old log-probs, the frozen reference's log-probs
  when `kl_beta > 0`, advantages and μ optimizer updates), measured to `block_until_ready`;
- of which log-probs: one jitted `posttrain.target_logprobs` forward on the same batch, timed
  apart (the step makes one per model it reads, plus one per update).

Rollout tokens/s (rows × mean completion length / sampling time) is printed beside a direct
`generate` call on the same prompts and sampling settings, outside the objective (what
`experiments.bench_generate` measures, at these shapes). The policy is random, so completions
run to `--max_new_tokens` unless they sample EOS: the cost of a rollout at its budget.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from absl import app, flags

from experiments.common import last_line_is_the_cause

_D_MODEL = flags.DEFINE_integer("d_model", 128, "Hidden width.")
_LAYERS = flags.DEFINE_integer("n_layers", 4, "Depth.")
_HEADS = flags.DEFINE_integer("n_heads", 4, "Query heads (as many KV heads).")
_D_FF = flags.DEFINE_integer("d_ff", 512, "FFN width.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Row length (prompt + completion).")
_GROUP = flags.DEFINE_integer("group_size", 8, "G samples per prompt.")
_PROMPTS = flags.DEFINE_integer("prompts_per_step", 8, "Prompts per iteration.")
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Sampling budget per completion.")
_MU = flags.DEFINE_integer("mu", 2, "Optimizer updates per batch of rollouts.")
_KL = flags.DEFINE_float("kl_beta", 0.0, "Weight of the k3 KL to the reference (0: none).")
_ITERATIONS = flags.DEFINE_integer("iterations", 5, "Timed iterations after the warm-up.")


def _build(directory: str) -> tuple[Any, Any, Any]:
    """(objective's Built, StageContext, task tokenizer) for a fresh `grpo` stage."""
    import jax

    from cascade_jax import data, model, objectives, sharding, steps, tasks
    from cascade_jax.config import ModelConfig
    from cascade_jax.objectives import StageContext, Trained

    task = tasks.ChainArithmetic(min_steps=2, max_steps=4)
    tokenizer = tasks.char_tokenizer(task.alphabet)
    head_dim = _D_MODEL.value // _HEADS.value
    cfg = ModelConfig(vocab_size=24, d_model=_D_MODEL.value, n_layers=_LAYERS.value,
                      n_heads=_HEADS.value, n_kv_heads=_HEADS.value, head_dim=head_dim,
                      d_ff=_D_FF.value, max_seq_len=_SEQ.value, tie_embeddings=True)
    params = model.init(cfg, jax.random.key(0))
    objective = objectives.get("grpo")
    settings = objective.parse_settings(dict(
        preset="magistral", group_size=_GROUP.value, prompts_per_step=_PROMPTS.value,
        max_new_tokens=_NEW.value, mu=_MU.value, kl_beta=_KL.value), "bench.grpo")
    rows = _GROUP.value * _PROMPTS.value
    ctx = StageContext(
        stage_name="bench", student=cfg, child_params=params,
        teacher=Trained("root", cfg, params, directory, "bench"), settings=settings,
        mesh=sharding.make_mesh(data=-1),
        optimizer=steps.make_optimizer(lr=1e-4, total_steps=100, warmup_steps=1),
        rng=jax.random.key(1), grad_accum=1, train_batches=lambda: iter(()), task=task,
        directory=directory, tokenizer=tokenizer, seed=0,
        data=data.DataConfig(source="task", tokenizer="chars", seq_len=_SEQ.value,
                             batch_size=rows))
    return objective.build(ctx), ctx, tokenizer


@last_line_is_the_cause
def main(argv: list[str]) -> None:
    del argv
    import jax
    import numpy as np

    from cascade_jax import generate, posttrain, prompts, sharding

    sampled: list[float] = []
    real_generate = generate.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = real_generate(*args, **kwargs)  # returns host arrays: already finished
        sampled.append(time.perf_counter() - start)
        return out

    generate.generate = timed_generate
    logprobs = jax.jit(posttrain.target_logprobs, static_argnums=0)
    with tempfile.TemporaryDirectory() as directory:
        built, ctx, _ = _build(directory)
        state = built.make_state()
        times: dict[str, list[float]] = {}
        lengths = []
        for i in range(_ITERATIONS.value + 1):
            batch = next(built.batches)
            sampled.clear()
            start = time.perf_counter()
            prepared = built.prepare_batch(state, batch)
            prepare_s = time.perf_counter() - start
            device_batch = sharding.shard_batch(prepared, ctx.mesh)
            start = time.perf_counter()
            state, metrics = built.step_fn(state, device_batch)
            jax.block_until_ready(metrics)
            update_s = time.perf_counter() - start
            model_batch = {k: device_batch[k] for k in ("tokens", "segment_ids", "positions",
                                                        "loss_mask")}
            jax.block_until_ready(logprobs(ctx.student, state.params, model_batch))
            start = time.perf_counter()
            jax.block_until_ready(logprobs(ctx.student, state.params, model_batch))
            logprob_s = time.perf_counter() - start
            if i == 0:
                continue  # compiles
            times.setdefault("sampling", []).append(sum(sampled))
            times.setdefault("host", []).append(prepare_s - sum(sampled))
            times.setdefault("update", []).append(update_s)
            times.setdefault("logprobs", []).append(logprob_s)
            lengths.append(float(np.asarray(prepared["loss_mask"]).sum(axis=1).mean()))

        rows = len(prepared["tokens"])
        prompts_R = prompts.row_prompts(batch)
        sampling = generate.SamplingParams(_NEW.value, temperature=1.0, n=_GROUP.value,
                                           stop_tokens=(1,))
        direct = []
        for r in range(_ITERATIONS.value + 1):
            start = time.perf_counter()
            out = real_generate(ctx.student, state.params, prompts_R, sampling,
                                rng=jax.random.key(r), mesh=ctx.mesh)
            if r:
                direct.append((time.perf_counter() - start, float(out.lengths.mean())))
    generate.generate = real_generate

    median = {k: statistics.median(v) for k, v in times.items()}
    total = median["sampling"] + median["host"] + median["update"]
    length = statistics.median(lengths)
    direct_s, direct_len = (statistics.median(x) for x in zip(*direct, strict=True))
    cfg = ctx.student
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); float32; "
          f"N={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads} F={cfg.d_ff} V={cfg.vocab_size} "
          f"({cfg.num_params() / 1e6:.2f}M params); {_PROMPTS.value} prompts × G="
          f"{_GROUP.value} = {rows} rows of {_SEQ.value}; ≤ {_NEW.value} new tokens; "
          f"μ={_MU.value}; kl_beta={_KL.value}; medians of {_ITERATIONS.value} iterations "
          "after a compiling one\n")
    print("| part of one iteration | ms | share |")
    print("|---|---|---|")
    for name, label in (("sampling", "sampling (generate)"),
                        ("host", "host: prompts, decode, verifier, rows"),
                        ("update", f"jitted step (old log-probs + {_MU.value} updates)")):
        print(f"| {label} | {1e3 * median[name]:.1f} | {median[name] / total:.1%} |")
    print(f"| *of which one log-prob forward (timed apart)* | {1e3 * median['logprobs']:.1f} | "
          f"{median['logprobs'] / total:.1%} |")
    print(f"| **iteration** | **{1e3 * total:.1f}** | 100% |\n")
    print("| rollout | rows | mean completion tokens | s | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| inside grpo's prepare_batch | {rows} | {length:.1f} | {median['sampling']:.3f} | "
          f"{rows * length / median['sampling']:.0f} |")
    print(f"| generate called directly (same prompts, settings) | {rows} | {direct_len:.1f} | "
          f"{direct_s:.3f} | {rows * direct_len / direct_s:.0f} |")


if __name__ == "__main__":
    app.run(main)
