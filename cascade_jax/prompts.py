"""Prompt/completion data: a model is trained (and evaluated) on completions, never on prompts.

A pair is tokenized as `prompt tokens + completion tokens + EOS` and packed like any document
(`data.pack_examples`: segment ids, positions, the same batch contract), with one more [B, L]
int32 feature, `loss_mask`: 1 on the completion's tokens and its EOS, 0 on the prompt and on
padding. `lm.next_token_targets` counts a target only where the mask is 1 at the *target*, so
CE, the fused KD losses and evaluation all become completion-only with no change of their own;
the EOS is a target (the model learns to stop), the prompt's first token never is, and nothing
is predicted across two pairs packed into one row.

Sources of pairs:
- JSONL, one `{"prompt": ..., "completion": ...}` per line: `read_jsonl` + `encode_pairs`;
- token ids made in memory (a sampler's completions): `token_pairs`;
- a verifiable task (`cascade_jax.tasks`), traces or answers only: `task_datasets`, which a run
  with a `config.task` block (`TaskConfig`) uses as its data.

A pair longer than a row is an error, not a cut: a truncated completion would teach the model
to stop without its answer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from cascade_jax import data, tasks, validate
from cascade_jax.tasks import jsonl

LOSS_MASK = "loss_mask"
SOURCE = "task"  # config.data.source of a run whose data is its task's
CHARS = "chars"  # config.data.tokenizer: the character tokenizer of the task's alphabet


@dataclasses.dataclass(frozen=True)
class TokenPairs:
    """Prompt/completion pairs as token ids: pair i is `prompts[i]` then `completions[i]`
    (which ends in EOS). Indexing gives the example `data.pack_examples` packs."""

    prompts: data.TokenizedCorpus
    completions: data.TokenizedCorpus

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.completions):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.completions)} "
                             "completions; give one completion per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        prompt, completion = self.prompts[i], self.completions[i]
        return {"tokens": np.concatenate([prompt, completion]).astype(np.int32),
                LOSS_MASK: np.concatenate([np.zeros(prompt.size, np.int32),
                                           np.ones(completion.size, np.int32)])}

    def lengths(self) -> np.ndarray:
        """[N] tokens of each pair, EOS included."""
        return np.diff(self.prompts.offsets) + np.diff(self.completions.offsets)


def token_pairs(prompts: Sequence[Sequence[int] | np.ndarray],
                completions: Sequence[Sequence[int] | np.ndarray], *, eos_id: int
                ) -> TokenPairs:
    """Pairs from token ids (e.g. sampled completions): EOS is appended to every completion
    that does not already end in it."""
    ended = [np.asarray(c, np.int32).reshape(-1) for c in completions]
    ended = [c if c.size and c[-1] == eos_id else np.append(c, np.int32(eos_id)) for c in ended]
    return TokenPairs(data.TokenizedCorpus.from_documents(prompts),
                      data.TokenizedCorpus.from_documents(ended))


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) of every line of a `{"prompt", "completion"}` JSONL file."""
    return [(r["prompt"], r["completion"])
            for _, r in jsonl.read_records(path, required=("prompt", "completion"))]


def _encode(tokenizer: tokenizers.Tokenizer, texts: list[str], *, template: bool
            ) -> list[list[int]]:
    try:
        return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=template)]
    except Exception as error:  # the Rust side raises plain Exceptions
        raise ValueError(f"the tokenizer cannot encode this text ({error}); use a tokenizer "
                         "that covers every character (for a task's own alphabet: "
                         f"data.tokenizer={CHARS!r})") from None


def encode_prompts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Prompts as a model sees them before its completion: the tokenizer's template (a Llama
    tokenizer's BOS), without the EOS a template may append (the completion follows)."""
    eos = data.eos_id(tokenizer)
    encoded = _encode(tokenizer, list(texts), template=True)
    return [np.asarray(p[:-1] if p and p[-1] == eos else p, np.int32) for p in encoded]


def encode_completions(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]
                       ) -> list[np.ndarray]:
    """Completions as they follow a prompt: no template (no BOS), no EOS yet."""
    return [np.asarray(ids, np.int32) for ids in _encode(tokenizer, list(texts), template=False)]


def decode_completions(tokenizer: tokenizers.Tokenizer, tokens_RT: np.ndarray,
                       lengths_R: np.ndarray) -> list[str]:
    """The text of sampled completions (`generate.Completions` rows), each cut before its
    first EOS: what a verifier judges."""
    eos = data.eos_id(tokenizer)
    out = []
    for row, length in zip(np.asarray(tokens_RT), np.asarray(lengths_R), strict=True):
        ids = row[:int(length)].tolist()
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
        out.append(tokenizer.decode(ids))
    return out


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: tokenizers.Tokenizer
                 ) -> TokenPairs:
    """Tokenize (prompt, completion) texts with the run's tokenizer. The prompt gets the
    tokenizer's template (a Llama tokenizer's BOS; an EOS the template appends is dropped),
    the completion none; EOS follows the completion."""
    eos = data.eos_id(tokenizer)
    if eos is None:
        raise ValueError(f"the tokenizer has no end-of-text token (none of "
                         f"{list(data.EOS_CANDIDATES)}); completions must end in one, so the "
                         "model learns to stop")
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
    return token_pairs(prompts, encode_completions(tokenizer, [c for _, c in pairs]),
                       eos_id=eos)


def check_pairs_fit(pairs: TokenPairs, seq_len: int) -> None:
    """Every pair fits a row whole: a truncated completion would teach the model to stop
    without its answer."""
    lengths = pairs.lengths()
    too_long = lengths > seq_len
    if too_long.any():
        raise ValueError(f"{int(too_long.sum())} of {len(pairs)} prompt/completion pairs are "
                         f"longer than seq_len={seq_len} (the longest has {int(lengths.max())} "
                         "tokens, EOS included); raise seq_len (and max_seq_len) or drop them: "
                         "a pair is never cut")


def pair_dataset(pairs: TokenPairs, *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None
                 ) -> grain.IterDataset:
    """Packed [batch_size, seq_len] batches of whole pairs with their `loss_mask`; sharding,
    epochs and iterator state as `data.make_lm_dataset` (`batch_size` is rows per host)."""
    check_pairs_fit(pairs, seq_len)
    return data.pack_examples(grain.MapDataset.source(pairs), seq_len=seq_len,
                              batch_size=batch_size, seed=seed, extra=(LOSS_MASK,),
                              shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
                              shard_count=shard_count)


def _pair_row(example: dict[str, np.ndarray], *, seq_len: int) -> dict[str, np.ndarray]:
    """One pair alone in a row of `seq_len`: the batch contract (`segment_ids` 1 on the pair,
    `positions` from 0) with its `loss_mask`, padding after it."""
    n = example["tokens"].size
    pad = (0, seq_len - n)
    return {"tokens": np.pad(example["tokens"], pad),
            "segment_ids": np.pad(np.ones(n, np.int32), pad),
            "positions": np.pad(np.arange(n, dtype=np.int32), pad),
            LOSS_MASK: np.pad(example[LOSS_MASK], pad)}


def pair_rows(pairs: TokenPairs, *, seq_len: int, batch_size: int, seed: int,
              shard_index: int | None = None, shard_count: int | None = None
              ) -> grain.IterDataset:
    """Endless shuffled [batch_size, seq_len] batches with *one pair per row* (not packed):
    what objectives that replace a row's completion by a sampled one need (on-policy
    distillation, rollouts), since every row then has one prompt at its start and the batch
    always holds `batch_size` prompts (one compiled sampler). `batch_size` is rows per host;
    hosts read disjoint pairs; the iterator's position is checkpointable like `pair_dataset`'s.
    """
    data._check_rows(seq_len, batch_size)
    check_pairs_fit(pairs, seq_len)
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    examples = grain.MapDataset.source(pairs)[shard_index::shard_count]
    if len(examples) == 0:
        raise ValueError(f"no pairs for host {shard_index} of {shard_count}: {len(pairs)} pairs "
                         "in all; give more problems or run on fewer hosts")
    return (examples.shuffle(seed).repeat(None)
            .map(functools.partial(_pair_row, seq_len=seq_len))
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            .batch(batch_size, drop_remainder=True))


def row_prompts(batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The prompt at the start of each row of a `pair_rows` batch (its tokens before the
    first completion token)."""
    mask_BL, tokens_BL = np.asarray(batch[LOSS_MASK]), np.asarray(batch["tokens"])
    starts = np.argmax(mask_BL != 0, axis=1)
    if not (mask_BL != 0).any(axis=1).all() or (starts == 0).any():
        raise ValueError("a row has no prompt followed by a completion; row_prompts reads "
                         "batches made by prompts.pair_rows")
    return [tokens_BL[r, :start] for r, start in enumerate(starts)]


def completion_rows(prompts_R: Sequence[np.ndarray], completions_RT: np.ndarray,
                    lengths_R: np.ndarray, *, seq_len: int) -> dict[str, np.ndarray]:
    """A `pair_rows`-shaped batch from prompts and their sampled completions
    (`generate.Completions`): one pair per row, the loss mask on the completion, which keeps
    its stop token when it sampled one (and has none when it ran out of tokens). Built with
    whole-batch masks (a GRPO step turns hundreds of rollouts into rows on the host)."""
    completions_RT, lengths_R = np.asarray(completions_RT), np.asarray(lengths_R, np.int64)
    prompt_R = np.fromiter((p.size for p in prompts_R), np.int64, len(prompts_R))
    end_R = prompt_R + lengths_R
    if (end_R > seq_len).any():
        r = int(np.argmax(end_R > seq_len))
        raise ValueError(f"row {r}: prompt ({prompt_R[r]}) + completion ({lengths_R[r]}) "
                         f"tokens exceed seq_len={seq_len}; lower max_new_tokens or raise "
                         "seq_len")
    tokens_RL = np.zeros((len(prompt_R), seq_len), np.int32)
    for r, prompt in enumerate(prompts_R):
        tokens_RL[r, :prompt_R[r]] = prompt
        tokens_RL[r, prompt_R[r]:end_R[r]] = completions_RT[r, :lengths_R[r]]
    index_L = np.arange(seq_len)
    in_pair_RL = index_L < end_R[:, None]
    return {"tokens": tokens_RL, "segment_ids": in_pair_RL.astype(np.int32),
            "positions": np.where(in_pair_RL, index_L, 0).astype(np.int32),
            LOSS_MASK: (in_pair_RL & (index_L >= prompt_R[:, None])).astype(np.int32)}


def completion_unigram_loss(train: TokenPairs, validation: TokenPairs, vocab_size: int
                            ) -> float:
    """Nats per counted validation target (every completion token and EOS) of add-one
    smoothed unigram frequencies of the training completions: the floor a model must beat."""
    counts = np.bincount(train.completions.tokens, minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-log_p[validation.completions.tokens].mean())


def task_datasets(task: tasks.Task, tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                  batch_size: int, seed: int, n_train: int | None,
                  n_validation: int | None = 512, answers_only: bool = False
                  ) -> data.Datasets:
    """A run's data from a task: `n_train` training problems (endless, shuffled) and
    `n_validation` held-out ones (one pass), as prompt/completion batches; `batch_size` is
    global (split over hosts). `answers_only` strips the traces from both."""

    def pairs(split: str, n: int | None) -> TokenPairs:
        problems = task.make_problems(split, n, seed)
        if not problems:
            raise ValueError(f"task {task.name!r} has no {split!r} problems; give it more "
                             "problems (a JSONL task holds out held_out_percent of its prompts)")
        if answers_only:
            problems = [tasks.answers_only(p, task.answer_pattern) for p in problems]
        return encode_pairs([(p.prompt, p.completion) for p in problems], tokenizer)

    train, validation = pairs(tasks.TRAIN, n_train), pairs(tasks.VALIDATION, n_validation)
    common = dict(seq_len=seq_len, batch_size=data._host_batch_size(batch_size), seed=seed)
    return data.Datasets(
        train=pair_dataset(train, shuffle=True, num_epochs=None, **common),
        validation=pair_dataset(validation, shuffle=False, num_epochs=1, **common),
        tokenizer=tokenizer,
        unigram_loss=completion_unigram_loss(train, validation, tokenizer.get_vocab_size()))


# ------------------------------------------------------------------------ the config block


_DATA_FIELDS = ("n_train", "n_validation", "answers_only", "eval_problems", "eval_samples",
                "eval_temperature")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The run's task (the typed `config.task` block). With it the run's data is the task's
    prompt/completion data (`config.data.source='task'`; `seq_len` and `batch_size` still come
    from `config.data`), so every stage's batches carry a `loss_mask`.

        config.task = dict(kind='chain_arithmetic', min_steps=2, max_steps=4, harder_steps=2,
                           n_train=20000, n_validation=512, answers_only=False)
        config.task = dict(kind='jsonl', path='mine.jsonl', answer_pattern=r'#(\\S+)\\s*$',
                           n_train=None, n_validation=None)      # None: the whole split

    `kind` picks the task (`tasks.KINDS`); its other fields are the task's own. Every model
    of the run is also scored by generation (`evaluate.task_scores`) on `eval_problems`
    held-out problems of each evaluation split ('validation', and 'harder' where the task has
    it): greedy pass@1 always, maj@k / pass@k with `eval_samples` = k > 1 drawn at
    `eval_temperature`.
    """

    task: tasks.Task
    n_train: int | None = 20_000
    n_validation: int | None = 512
    answers_only: bool = False
    eval_problems: int | None = 256
    eval_samples: int = 1
    eval_temperature: float = 1.0
    key: str = dataclasses.field(default="config.task", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        validate.optional_positive_int(f"{k}.n_train", self.n_train, "or None: the whole split")
        validate.optional_positive_int(f"{k}.n_validation", self.n_validation,
                                       "or None: the whole split")
        validate.boolean(f"{k}.answers_only", self.answers_only)
        validate.optional_positive_int(f"{k}.eval_problems", self.eval_problems,
                                       "or None: the whole split")
        validate.positive_int(f"{k}.eval_samples", self.eval_samples)
        validate.number(f"{k}.eval_temperature", self.eval_temperature, low=0.0,
                        hint="0 is greedy")

    def eval_splits(self) -> tuple[str, ...]:
        """The splits models are scored on by generation."""
        return tuple(s for s in (tasks.VALIDATION, tasks.HARDER) if s in self.task.splits)

    @classmethod
    def from_block(cls, block: Mapping[str, Any], key: str = "config.task") -> TaskConfig:
        """From the config block: `kind`, the data fields, and the task's own fields."""
        fields = dict(block)
        kind = fields.pop("kind", "")
        common = {name: fields.pop(name) for name in _DATA_FIELDS if name in fields}
        return cls(task=tasks.make(kind, fields, key), **common, key=key)

    def tokenizer(self, data_config: data.DataConfig) -> tokenizers.Tokenizer:
        """`config.data.tokenizer`: 'chars' (the task's alphabet), 'builtin' or a file."""
        if data_config.tokenizer == CHARS:
            return tasks.char_tokenizer(self.task.alphabet)
        if data_config.tokenizer == "builtin":
            return data.builtin_tokenizer(data_config.cache_dir or None)
        return data.load_tokenizer(data_config.tokenizer)

    def datasets(self, data_config: data.DataConfig, *, seed: int) -> data.Datasets:
        return task_datasets(self.task, self.tokenizer(data_config),
                             seq_len=data_config.seq_len, batch_size=data_config.batch_size,
                             seed=seed, n_train=self.n_train, n_validation=self.n_validation,
                             answers_only=self.answers_only)
