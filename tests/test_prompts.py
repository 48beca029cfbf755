"""Prompt/completion data: completion-only masks, losses and evaluation on packed rows, task
datasets, the `config.task` block, and `sft` as a cascade stage."""

import json

import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import processors

from cascade_jax import cascade, data, lm, loop, model, prompts, runconfig, steps, tasks
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses

V, EOS, L = 32, data.EOS_ID, 16
RNG = np.random.default_rng(0)
# Two pairs (prompt, completion without EOS): 3 + 2 + EOS and 2 + 4 + EOS = 13 tokens <= L.
PAIRS = [(RNG.integers(2, V, 3), RNG.integers(2, V, 2)), (RNG.integers(2, V, 2),
                                                           RNG.integers(2, V, 4))]


def one_row(pairs=PAIRS):
    """The pairs packed (unshuffled, first fit) into a single [1, L] row."""
    token_pairs = prompts.token_pairs([p for p, _ in pairs], [c for _, c in pairs], eos_id=EOS)
    batches = list(prompts.pair_dataset(token_pairs, seq_len=L, batch_size=1, seed=0,
                                        shuffle=False, num_epochs=1, shard_index=0,
                                        shard_count=1))
    assert len(batches) == 1
    return batches[0]


def reference_layout(batch):
    """Independently of the code under test: where each pair sits in the row (by segment id,
    in packing order), the loss mask it must have, and the positions whose next-token target
    counts: from the prompt's last token to the token before the EOS."""
    mask = np.zeros(L, np.int32)
    counts = np.zeros(L, bool)
    for segment, (prompt, completion) in enumerate(PAIRS, start=1):
        start = int(np.flatnonzero(batch["segment_ids"][0] == segment)[0])
        p, c = len(prompt), len(completion) + 1  # + EOS
        np.testing.assert_array_equal(batch["tokens"][0, start:start + p + c],
                                      [*prompt, *completion, EOS])
        mask[start + p:start + p + c] = 1
        counts[start + p - 1:start + p + c - 1] = True
    return mask, counts


def test_two_pairs_in_one_row_mask_and_targets_match_a_numpy_reference():
    batch = one_row()
    mask, counts = reference_layout(batch)
    np.testing.assert_array_equal(batch["loss_mask"][0], mask)
    assert batch["loss_mask"].dtype == np.int32 and batch["loss_mask"].shape == (1, L)
    targets, weights = lm.next_token_targets(batch)
    np.testing.assert_array_equal(np.asarray(weights[0]), counts.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(targets[0, :-1]), batch["tokens"][0, 1:])
    # What the reference encodes, spelled out: the EOS of each pair is a target, the first
    # token of the next pair is not (nor any prompt token), and nothing in padding.
    eos_positions = np.flatnonzero((batch["tokens"][0] == EOS) & (batch["segment_ids"][0] > 0))
    assert counts[eos_positions - 1].all() and not counts[eos_positions[:-1]].any()
    assert loop.counted_tokens(batch) == sum(len(c) + 1 for _, c in PAIRS)


def numpy_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_ce_with_the_mask_equals_a_numpy_masked_nll():
    """Through the CE step's own sums (a tiny model), against float64 numpy on its logits."""
    batch = one_row()
    _, counts = reference_layout(batch)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32, max_seq_len=L)
    params = model.init(cfg, jax.random.key(0))
    sums = steps.ce_sums(cfg, params, batch)
    logits = model.forward(cfg, params, batch["tokens"], batch["segment_ids"],
                           batch["positions"])[0]
    logp = numpy_log_softmax(logits)
    positions = np.flatnonzero(counts)
    nll = -logp[positions, batch["tokens"][0, positions + 1]]
    assert float(sums["count"]) == len(positions)
    np.testing.assert_allclose(float(sums["loss_sum"]), nll.sum(), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_kd_with_the_mask_counts_only_completion_positions(chunk_size):
    batch = one_row()
    _, counts = reference_layout(batch)
    rng = np.random.default_rng(1)
    s_h, t_h = rng.normal(size=(1, L, 8)), rng.normal(size=(1, L, 12))
    s_w, t_w = rng.normal(size=(8, V)), rng.normal(size=(12, V))
    targets, weights = lm.next_token_targets(batch)
    spec = losses.LossSpec(kind="forward_kl", chunk_size=chunk_size)
    _, sums = losses.distill_loss(*(np.float32(x) for x in (s_h, s_w, t_h, t_w)), targets,
                                  weights, spec)
    log_s, log_t = numpy_log_softmax(s_h[0] @ s_w), numpy_log_softmax(t_h[0] @ t_w)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    assert float(sums["count"]) == counts.sum()
    np.testing.assert_allclose(float(sums["kd_sum"]), kl[counts].sum(), rtol=1e-5)
    # and nothing outside them: any teacher at the prompt positions gives the same sum
    t_h[0, ~counts] = rng.normal(size=((~counts).sum(), 12))
    _, again = losses.distill_loss(*(np.float32(x) for x in (s_h, s_w, t_h, t_w)), targets,
                                   weights, spec)
    np.testing.assert_allclose(float(again["kd_sum"]), float(sums["kd_sum"]), rtol=1e-6)


# ------------------------------------------------------------------------- text to batches


def template_tokenizer(alphabet: str) -> tokenizers.Tokenizer:
    """The char tokenizer with a Llama-like template: BOS before and EOS after every text."""
    tokenizer = tasks.char_tokenizer(alphabet)
    tokenizer.add_special_tokens(["<|bos|>"])
    bos = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|endoftext|>", special_tokens=[("<|bos|>", bos),
                                                          ("<|endoftext|>", EOS)])
    return tokenizer


@pytest.mark.parametrize("templated", [False, True])
def test_jsonl_pairs_pack_back_to_their_texts(tmp_path, templated):
    records = [{"prompt": f"Q{i}: {'ab' * i}?", "completion": f" {'c' * (i % 4)}#{i}"}
               for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    alphabet = "".join({c for r in records for c in r["prompt"] + r["completion"]})
    tokenizer = template_tokenizer(alphabet) if templated else tasks.char_tokenizer(alphabet)
    pairs = prompts.encode_pairs(prompts.read_jsonl(str(path)), tokenizer)
    seen = []
    for batch in prompts.pair_dataset(pairs, seq_len=48, batch_size=2, seed=0, shuffle=False,
                                      num_epochs=1, shard_index=0, shard_count=1):
        for row in range(2):
            for segment in set(batch["segment_ids"][row].tolist()) - {0}:
                where = batch["segment_ids"][row] == segment
                tokens, mask = batch["tokens"][row][where], batch["loss_mask"][row][where]
                assert tokens[-1] == EOS and mask[-1] == 1 and (tokens[:-1] != EOS).all()
                assert (np.diff(mask) >= 0).all()  # prompt, then completion
                seen.append((tokenizer.decode(tokens[mask == 0].tolist()),
                             tokenizer.decode(tokens[mask == 1].tolist()),
                             int(tokens[0] == tokenizer.token_to_id("<|bos|>"))))
    assert sorted(seen) == sorted((r["prompt"], r["completion"], int(templated))
                                  for r in records)


def test_token_pairs_append_eos_once():
    pairs = prompts.token_pairs([[5, 6], [7]], [[8], [9, EOS]], eos_id=EOS)
    np.testing.assert_array_equal(pairs[0]["tokens"], [5, 6, 8, EOS])
    np.testing.assert_array_equal(pairs[0]["loss_mask"], [0, 0, 1, 1])
    np.testing.assert_array_equal(pairs[1]["tokens"], [7, 9, EOS])
    np.testing.assert_array_equal(pairs.lengths(), [4, 3])


def test_a_pair_longer_than_a_row_is_an_error_not_a_cut():
    pairs = prompts.token_pairs([[5] * 10, [5]], [[6] * 6, [6]], eos_id=EOS)
    with pytest.raises(ValueError, match=r"1 of 2 .*longer than seq_len=16 .*17 tokens"):
        prompts.pair_dataset(pairs, seq_len=16, batch_size=1, seed=0)


def test_a_tokenizer_without_eos_is_refused():
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1},
                                                                 unk_token="[UNK]"))
    with pytest.raises(ValueError, match="no end-of-text token"):
        prompts.encode_pairs([("a", "a")], tokenizer)


# ---------------------------------------------------------------------------- task datasets


TASK = tasks.ChainArithmetic(min_steps=1, max_steps=2)
TOKENIZER = tasks.char_tokenizer(TASK.alphabet)


def segments(batches):
    """(prompt, completion) texts of every packed segment, in order."""
    out = []
    for batch in batches:
        for row, ids in enumerate(batch["segment_ids"]):
            for segment in sorted(set(ids.tolist()) - {0}):
                where = ids == segment
                tokens, mask = batch["tokens"][row][where], batch["loss_mask"][row][where]
                out.append((TOKENIZER.decode(tokens[mask == 0].tolist()),
                            TOKENIZER.decode(tokens[mask == 1].tolist())))
    return out


@pytest.mark.parametrize("answers_only", [False, True])
def test_task_datasets(answers_only):
    def make(seed):
        return prompts.task_datasets(TASK, TOKENIZER, seq_len=32, batch_size=4, seed=seed,
                                     n_train=20, n_validation=12, answers_only=answers_only)

    datasets = make(0)
    validation = segments(datasets.validation)
    expected = TASK.make_problems("validation", 12, seed=0)
    if answers_only:
        expected = [tasks.answers_only(p) for p in expected]
    assert sorted(validation) == sorted((p.prompt, p.completion) for p in expected)
    assert all(TASK.score(p, c).correct for p, c in validation)
    train = segments(b for b, _ in zip(datasets.train, range(30), strict=False))
    assert len(train) > 20  # endless: more than one pass over 20 problems
    assert {p for p, _ in train} == {p.prompt for p in TASK.make_problems("train", 20, 0)}
    assert not {p for p, _ in train} & {p for p, _ in validation}
    if answers_only:
        assert all(len(c) == 2 for _, c in train)
    first = next(iter(make(0).train))
    assert all(np.array_equal(first[k], next(iter(datasets.train))[k]) for k in first)
    assert 0 < datasets.unigram_loss < np.log(TOKENIZER.get_vocab_size())


def test_an_empty_split_is_named(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "1?", "answer": "1"}) + "\n")
    task = tasks.JsonlTask(str(path))
    with pytest.raises(ValueError, match=r"task 'jsonl' has no '(train|validation)' problems"):
        prompts.task_datasets(task, tasks.char_tokenizer(task.alphabet), seq_len=8,
                              batch_size=1, seed=0, n_train=None, n_validation=None)


# ---------------------------------------------------------------------- the config block


def task_config(workdir: str = "", **task) -> ml_collections.ConfigDict:
    """A cascade on the task that trains in seconds: a root from scratch on the task, then a
    pruned child trained with `sft`."""
    return ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0,
        root=dict(kind="scratch",
                  model=dict(vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=8, d_ff=64, max_seq_len=32, tie_embeddings=True),
                  steps=3, optim=dict(lr=3e-3, warmup_steps=1)),
        data=dict(source="task", tokenizer="chars", seq_len=32, batch_size=8),
        task=dict(kind="chain_arithmetic", min_steps=1, max_steps=2, n_train=64,
                  n_validation=16, eval_problems=8) | task,
        mesh=dict(data=-1),
        stage_order=("child",),
        stages=dict(child=dict(parent="root", teacher="root", init="pruned",
                               target=dict(n_layers=1), objective="sft", sft={}, steps=3,
                               optim=dict(lr=3e-3, warmup_steps=1), calib_batches=1)),
        log_every=1, eval_every=0, eval_batches=2, checkpoint_every=0, keep_checkpoints=1))


def test_the_task_block_is_typed_and_its_errors_name_the_key():
    config = runconfig.cascade_config(task_config(answers_only=True))
    assert config.task.task == tasks.ChainArithmetic(min_steps=1, max_steps=2)
    assert (config.task.n_train, config.task.answers_only) == (64, True)
    bad = [
        (dict(max_steps=0), r"config.task: max_steps=0 must be a positive integer"),
        (dict(kind="maths"), r"config.task.kind='maths' is not one of"),
        (dict(n_train=0), r"config.task.n_train=0 must be a positive integer"),
        (dict(answers_only="yes"), r"config.task.answers_only='yes' must be True or False"),
        (dict(path="x.jsonl"), r"unknown config field\(s\) \['config.task.path'\]"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            runconfig.cascade_config(task_config(**fields))
    no_task = task_config()
    del no_task["task"]
    with pytest.raises(ValueError, match=r"config.data.source='task' needs a config.task"):
        runconfig.cascade_config(no_task)
    no_task.data.source, no_task.data.tokenizer = "builtin", "builtin"
    with pytest.raises(ValueError, match=r"config.stages.child.objective='sft' trains on a "
                                         r"task's completions, but the run has no config.task"):
        runconfig.cascade_config(no_task)
    no_task.data.tokenizer = "chars"
    with pytest.raises(ValueError, match=r"config.data.tokenizer='chars' is the character"):
        runconfig.cascade_config(no_task)
    stale = task_config()
    stale.data.source = "builtin"
    with pytest.raises(ValueError, match=r"config.task is set but config.data.source='builtin'"):
        runconfig.cascade_config(stale)


def test_a_jsonl_task_block(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}?", "answer": str(i)}) + "\n"
                            for i in range(40)))
    config = task_config(kind="jsonl", path=str(path), n_train=None, n_validation=None)
    del config.task["min_steps"], config.task["max_steps"]
    typed = runconfig.cascade_config(config)
    datasets = cascade.run_datasets(typed, seed=0)
    assert typed.task.task.alphabet == "#0123456789?"
    held_out = typed.task.task.make_problems("validation", None, 0)
    assert sum(int(b["loss_mask"].sum()) for b in datasets.validation) == sum(
        len(p.completion) + 1 for p in held_out)  # every problem once, EOS included




def test_completion_rows_put_each_pair_alone_in_its_row_with_the_mask_on_the_completion():
    prompts_R = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    completions_RT = np.array([[1, 2, 3, 4], [11, 12, 0, 0], [13, 14, 15, 16]])
    lengths_R = np.array([2, 0, 4])  # row 1 sampled nothing, row 2 used its whole budget
    rows = prompts.completion_rows(prompts_R, completions_RT, lengths_R, seq_len=7)
    np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 1, 2, 0, 0], [8, 0, 0, 0, 0, 0, 0],
                                                   [9, 10, 13, 14, 15, 16, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 1, 0, 0],
                                                        [1, 0, 0, 0, 0, 0, 0],
                                                        [1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 0, 0],
                                                      [0, 0, 0, 0, 0, 0, 0],
                                                      [0, 1, 2, 3, 4, 5, 0]])
    np.testing.assert_array_equal(rows[prompts.LOSS_MASK], [[0, 0, 0, 1, 1, 0, 0],
                                                            [0, 0, 0, 0, 0, 0, 0],
                                                            [0, 0, 1, 1, 1, 1, 0]])
    assert all(v.dtype == np.int32 for v in rows.values())
    with pytest.raises(ValueError, match=r"row 2: prompt \(2\) \+ completion \(4\) tokens "
                                         r"exceed seq_len=5"):
        prompts.completion_rows(prompts_R, completions_RT, lengths_R, seq_len=5)
