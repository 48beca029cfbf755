"""A character-level tokenizer for a task's alphabet, built locally (nothing to download).

It is a plain `tokenizers.Tokenizer` with the special-token conventions of the tokenizers
`data.train_tokenizer` makes (`<|pad|>` = 0, so 0 in `tokens` is always padding;
`<|endoftext|>` = 1, the EOS after every completion), so it works wherever a run's tokenizer
does (`data.eos_id`, packing, `tokenizer.json` files). One character is one token: a small
model then sees every digit of an arithmetic trace on its own.
"""

from __future__ import annotations

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

# The spellings of data.PAD_TOKEN / data.EOS_TOKEN (data.py pulls in grain and jax; tasks must
# not), checked equal in tests/test_tasks.py.
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"


def char_tokenizer(alphabet: str) -> tokenizers.Tokenizer:
    """Token ids: `<|pad|>` 0, `<|endoftext|>` 1, then the distinct characters of `alphabet`
    in sorted order. Encoding a character outside it is an error, never a silent unknown."""
    chars = sorted(set(alphabet))
    if not chars:
        raise ValueError("alphabet is empty; give the characters the task's text uses")
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([PAD_TOKEN, EOS_TOKEN])
    return tokenizer
