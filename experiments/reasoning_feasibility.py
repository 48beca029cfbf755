"""Can a ~1M-parameter model learn the built-in reasoning task, and do the traces matter?

    python -m experiments.reasoning_feasibility            # ~10 min on a 2-core CPU

Trains the same model (4 layers, d_model 128, character tokenizer) twice from the same
initialisation with the `sft` objective (cross-entropy on completions) for the same number
of steps on the same batch shape: once on step-by-step traces (`3+5=8;8*2=6;6-7=9;#9`), once
on answers only (`#9`). Each then greedy-decodes held-out problems of the training lengths
(2–4 steps) and of the harder split (5–6 steps: positions and chains never trained on), judged
by the task's verifier. Prints a markdown table, per split and per number of steps.

Equal steps are not equal problems: an answers-only example is shorter, so more of them pack
into a row (the table's `problems seen` says how many). Generation here is a plain greedy loop
over `model.forward` (the whole prefix recomputed per token); it will move to
`cascade_jax.generate` when the KV-cache sampler lands.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from absl import app, flags

from experiments.common import last_line_is_the_cause, quiet_logging

_STEPS = flags.DEFINE_integer("steps", 1500, "Optimizer steps of each model.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Packed rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (warmup, then cosine to 10%).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.")
_N_TRAIN = flags.DEFINE_integer("n_train", 50_000, "Training problems (2-4 steps).")
_N_EVAL = flags.DEFINE_integer("n_eval", 500, "Problems per evaluation split.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the problems, the batches and the init.")
_MODES = flags.DEFINE_list("modes", ["traces", "answers_only"], "What to train on.")


def model_config(vocab_size: int, max_seq_len: int) -> Any:
    from cascade_jax.config import ModelConfig

    return ModelConfig(vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                       head_dim=32, d_ff=512, max_seq_len=max_seq_len, tie_embeddings=True)


def train(cfg: Any, task: Any, tokenizer: Any, *, answers_only: bool) -> tuple[Any, dict]:
    """Params after `--steps` of `sft` on traces or answers, and what training saw."""
    import jax

    from cascade_jax import loop, objectives, prompts, sharding, steps
    from cascade_jax.objectives import StageContext

    mesh = sharding.make_mesh(data=-1)
    datasets = prompts.task_datasets(task, tokenizer, seq_len=_SEQ.value,
                                     batch_size=_BATCH.value, seed=_SEED.value,
                                     n_train=_N_TRAIN.value, answers_only=answers_only)
    optimizer = steps.make_optimizer(lr=_LR.value, total_steps=_STEPS.value,
                                     warmup_steps=_WARMUP.value)
    sft = objectives.get("sft")
    built = sft.build(StageContext(
        stage_name="sft", student=cfg, child_params=None, teacher=None,
        settings=sft.parse_settings({}, "sft"), mesh=mesh, optimizer=optimizer,
        rng=jax.random.key(_SEED.value), grad_accum=1,
        train_batches=lambda: iter(datasets.train), task=task))
    state, batches = built.make_state(), built.batches
    start, cpu, tokens, problems, losses = time.perf_counter(), time.process_time(), 0, 0, []
    for step in range(1, _STEPS.value + 1):
        batch = next(batches)
        tokens += loop.counted_tokens(batch)
        problems += int(sum(len(set(row[row > 0].tolist())) for row in batch["segment_ids"]))
        state, metrics = built.step_fn(state, sharding.shard_batch(batch, mesh))
        if step % 100 == 0 or step == _STEPS.value:
            loss = float(metrics["loss_sum"] / metrics["count"])
            losses.append(loss)
            print(f"  {'answers' if answers_only else 'traces'} step {step}: loss {loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return state.params, {"train_s": time.perf_counter() - start, "tokens": tokens,
                          "cpu_s": time.process_time() - cpu, "problems": problems,
                          "final_loss": losses[-1]}


def greedy_completions(cfg: Any, params: Any, tokenizer: Any, prompts_: list[str],
                       max_new: int, rows: int = 256) -> list[str]:
    """Greedy completions of `prompts_`, cut at EOS. Prompts are left-padded to one length
    (padding is segment 0, so real tokens never attend to it, and positions restart at each
    prompt's first token); one jitted forward over the whole buffer per new token."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax import data, model

    encoded = [tokenizer.encode(p).ids for p in prompts_]
    width = max(map(len, encoded))
    total = width + max_new

    @jax.jit
    def next_token(tokens_RT: jax.Array, segment_ids_RT: jax.Array, column: jax.Array
                   ) -> jax.Array:
        logits_RTV = model.forward(cfg, params, tokens_RT, segment_ids_RT)
        return jnp.argmax(logits_RTV[:, column - 1], axis=-1).astype(jnp.int32)

    out, rows = [], min(rows, len(encoded))
    for first in range(0, len(encoded), rows):
        chunk = encoded[first:first + rows]
        tokens = np.zeros((rows, total), np.int32)  # a fixed shape: one compilation
        segments = np.zeros((rows, total), np.int32)
        for r, ids in enumerate(chunk):
            tokens[r, width - len(ids):width] = ids
            segments[r, width - len(ids):] = 1
        done = np.zeros(rows, bool)
        done[len(chunk):] = True
        for column in range(width, total):
            new = np.asarray(next_token(tokens, segments, column))
            tokens[:, column] = np.where(done, 0, new)
            done |= new == data.EOS_ID
            if done.all():
                break
        for r in range(len(chunk)):
            generated = tokens[r, width:].tolist()
            end = generated.index(data.EOS_ID) if data.EOS_ID in generated else len(generated)
            out.append(tokenizer.decode(generated[:end]))
    return out


def evaluate(cfg: Any, params: Any, task: Any, tokenizer: Any, split: str) -> dict[str, Any]:
    problems = task.make_problems(split, _N_EVAL.value, seed=_SEED.value)
    max_new = max(len(p.completion) for p in problems) + 1 + 8  # EOS, and room to ramble
    start = time.perf_counter()
    completions = greedy_completions(cfg, params, tokenizer, [p.prompt for p in problems],
                                     max_new)
    scores = [task.score(p.prompt, c) for p, c in zip(problems, completions, strict=True)]
    by_steps = collections.defaultdict(list)
    for p, s in zip(problems, scores, strict=True):
        by_steps[p.steps].append(s.correct)
    return {"accuracy": sum(s.correct for s in scores) / len(scores),
            "well_formed": sum(s.well_formed for s in scores) / len(scores),
            "by_steps": {k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
            "length": sum(map(len, completions)) / len(completions),
            "eval_s": time.perf_counter() - start, "example": (problems[0], completions[0])}


def majority_baseline(task: Any, split: str) -> float:
    """Accuracy of always answering the most common answer of the split (no model)."""
    answers = collections.Counter(p.answer for p in
                                  task.make_problems(split, _N_EVAL.value, seed=_SEED.value))
    return answers.most_common(1)[0][1] / sum(answers.values())


def main(argv: list[str]) -> None:
    del argv
    quiet_logging()
    from cascade_jax import tasks

    task = tasks.ChainArithmetic(min_steps=2, max_steps=4, harder_steps=2)
    tokenizer = tasks.char_tokenizer(task.alphabet)
    cfg = model_config(tokenizer.get_vocab_size(), max_seq_len=_SEQ.value)
    print(f"model: {cfg.num_params() / 1e6:.2f}M parameters, vocab {cfg.vocab_size}; "
          f"{_STEPS.value} steps of {_BATCH.value} x {_SEQ.value} tokens, lr {_LR.value}")
    header = ("| trained on | split (steps) | problems seen | train s (CPU s) | final loss "
              "| accuracy | by steps | well formed | mean chars |")
    rows = [header, "|" + "---|" * 9]
    for mode in _MODES.value:
        params, seen = train(cfg, task, tokenizer, answers_only=mode == "answers_only")
        for split in ("validation", "harder"):
            low, high = task.step_range(split)
            result = evaluate(cfg, params, task, tokenizer, split)
            problem, completion = result["example"]
            print(f"  {mode} {split}: {problem.prompt} -> {completion!r} "
                  f"(reference {problem.completion!r}); {result['eval_s']:.0f} s")
            by_steps = ", ".join(f"{k}: {v:.2f}" for k, v in result["by_steps"].items())
            rows.append(f"| {mode} | {split} ({low}–{high}) | {seen['problems']} | "
                        f"{seen['train_s']:.0f} ({seen['cpu_s']:.0f}) | "
                        f"{seen['final_loss']:.4f} | "
                        f"{result['accuracy']:.3f} | {by_steps} | {result['well_formed']:.3f} | "
                        f"{result['length']:.1f} |")
    print()
    print("\n".join(rows))
    print(f"\nmajority-answer baseline (no model): validation "
          f"{majority_baseline(task, 'validation'):.3f}, harder "
          f"{majority_baseline(task, 'harder'):.3f}; {_N_EVAL.value} problems per split")


if __name__ == "__main__":
    app.run(last_line_is_the_cause(main))
