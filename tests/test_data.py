"""Data pipelines against independent reconstructions: packed batches hold exactly the documents'
tokens, in order, once each; sharding partitions; state restores; sources and tokenizers."""

import collections
import itertools
import json
import os
import time

import numpy as np
import pytest
import tokenizers

from cascade_jax import data

L = 8  # seq_len for the packing tests: small enough that documents span several pieces


def make_docs(lengths):
    """Documents whose tokens are all distinct and name their document: doc i is
    i * 1000 + 1, i * 1000 + 2, ..., so any piece shows where it came from."""
    return [np.arange(1, n + 1, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)]


LENGTHS = [3, 8, 1, 20, 5, 9, 2, 16, 7, 4, 11, 6, 1, 13, 8, 3]
DOCS = make_docs(LENGTHS)


def take(dataset, n=None):
    it = iter(dataset)
    return list(it) if n is None else list(itertools.islice(it, n))


def pieces_of(batches):
    """Every segment of every row as a tuple of tokens, checking on the way that each is one
    contiguous run, that positions count 0, 1, ... within it, and that padding is all zeros."""
    pieces = []
    for batch in batches:
        assert set(batch) == {"tokens", "segment_ids", "positions"}
        for row_tokens, row_segments, row_positions in zip(
                batch["tokens"], batch["segment_ids"], batch["positions"], strict=True):
            pad = row_segments == 0
            assert not row_tokens[pad].any() and not row_positions[pad].any()
            ids = [s for s, _ in itertools.groupby(row_segments[~pad])]
            assert ids == list(range(1, len(ids) + 1))  # contiguous runs 1, 2, ...
            for s in ids:
                where = row_segments == s
                np.testing.assert_array_equal(row_positions[where], np.arange(where.sum()))
                pieces.append(tuple(int(t) for t in row_tokens[where]))
    return pieces


def documents_from(pieces):
    """Undo packing: pieces of a document sorted by their first token, concatenated."""
    by_doc = collections.defaultdict(list)
    for piece in pieces:
        by_doc[piece[0] // 1000].append(piece)
    return {d: np.concatenate(sorted(ps)) for d, ps in by_doc.items()}


def finite(docs=DOCS, **kwargs):
    args = dict(seq_len=L, batch_size=3, seed=0, shuffle=False, num_epochs=1, shard_index=0,
                shard_count=1) | kwargs
    return data.make_lm_dataset(docs, **args)


# ------------------------------------------------------------------------------------ packing


def test_piece_bounds_cut_documents_at_multiples_of_seq_len():
    corpus = data.TokenizedCorpus.from_documents(make_docs([3, 0, 8, 17]))
    starts, ends = data.piece_bounds(corpus.offsets, L)
    expected = []
    for offset, n in zip(corpus.offsets[:-1], [3, 0, 8, 17], strict=True):
        expected += [(offset + s, offset + min(s + L, n)) for s in range(0, n, L)]
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == expected


def test_packed_batches_hold_every_document_exactly_once_in_order():
    batches = take(finite())
    for batch in batches:
        for value in batch.values():
            assert value.dtype == np.int32 and value.shape == (3, L)
    pieces = pieces_of(batches)
    assert all(1 <= len(p) <= L for p in pieces)
    expected_pieces = sum(-(-n // L) for n in LENGTHS)
    assert len(pieces) == expected_pieces  # no piece duplicated or lost
    rebuilt = documents_from(pieces)
    assert sorted(rebuilt) == list(range(len(DOCS)))
    for d, doc in enumerate(DOCS):
        np.testing.assert_array_equal(rebuilt[d], doc)
    total = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert total == sum(LENGTHS)


def test_finite_stream_pads_its_last_batch_with_empty_rows():
    batches = take(finite(make_docs([L, L, L, L]), batch_size=3))  # four full rows
    assert len(batches) == 2
    last = batches[-1]
    assert (last["segment_ids"][0] > 0).all()
    for value in last.values():
        assert not value[1:].any()


def test_same_seed_same_batches_other_seed_other_order():
    def first(seed):
        return take(data.make_lm_dataset(DOCS, seq_len=L, batch_size=2, seed=seed,
                                         shard_index=0, shard_count=1), 6)

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))


def test_endless_stream_reshuffles_every_epoch():
    pieces = pieces_of(take(data.make_lm_dataset(
        make_docs([L] * 12), seq_len=L, batch_size=1, seed=0, shard_index=0, shard_count=1), 36))
    epochs = [pieces[i:i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # full rows: no epoch leakage
    assert epochs[0] != epochs[1] != epochs[2]


def test_endless_shards_partition_the_pieces():
    seen = []
    for shard in range(2):
        ds = data.make_lm_dataset(DOCS, seq_len=L, batch_size=2, seed=3, shard_index=shard,
                                  shard_count=2)
        seen.append(set(pieces_of(take(ds, 40))))  # several epochs of this shard
    all_pieces = set(pieces_of(take(finite())))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_pieces
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_finite_shards_take_disjoint_rows_and_the_same_number_of_batches():
    docs = make_docs([3, 8, 1, 5, 2, 7, 4, 6, 1, 8, 3, 2, 5])  # each fits in a row
    shards = [take(finite(docs, batch_size=2, shard_index=i, shard_count=2)) for i in range(2)]
    assert len(shards[0]) == len(shards[1])
    doc_sets = [set(documents_from(pieces_of(s))) for s in shards]
    assert not doc_sets[0] & doc_sets[1]  # documents here are shorter than a row
    assert doc_sets[0] | doc_sets[1] == set(range(len(docs)))


@pytest.mark.parametrize("num_epochs", [None, 1])
def test_iterator_state_restores_the_exact_continuation(num_epochs):
    ds = data.make_lm_dataset(DOCS, seq_len=L, batch_size=2, seed=7, num_epochs=num_epochs,
                              shard_index=0, shard_count=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    restored = iter(ds)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(2)], strict=True):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seq_len"):
        finite(seq_len=1)
    with pytest.raises(ValueError, match="num_epochs=0"):
        finite(num_epochs=0)
    with pytest.raises(ValueError, match="shard_index=2"):
        finite(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="shard 3 of 4"):
        data.make_lm_dataset(make_docs([5]), seq_len=L, batch_size=1, seed=0, shard_index=3,
                             shard_count=4)


def test_unigram_loss_matches_a_hand_count():
    train = data.TokenizedCorpus.from_documents([[1, 1, 2]])
    validation = data.TokenizedCorpus.from_documents([[2, 1, 1], [3, 2]])
    # targets: every token but each piece's first -> 1, 1, 2 ; counts (+1) over vocab 4: 1,3,2,1
    log_p = np.log(np.array([1, 3, 2, 1]) / 7)
    expected = -(2 * log_p[1] + log_p[2]) / 3
    assert data.unigram_loss(train, validation, seq_len=L, vocab_size=4) == pytest.approx(expected)


# ---------------------------------------------------------------------------------- tokenizers

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé too: λx. x → x\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i * i)  # squares\n",
] * 3


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    (root / "sub").mkdir()
    for i, text in enumerate(TEXTS):
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def small_tokenizer(text_dir):
    return data.train_tokenizer(sorted(str(p) for p in text_dir.rglob("*.txt")), vocab_size=300)


def test_trained_tokenizer_round_trips_and_reserves_pad_and_eos(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert tok.token_to_id(data.PAD_TOKEN) == data.PAD_ID == 0
    assert tok.token_to_id(data.EOS_TOKEN) == data.EOS_ID == 1
    assert data.eos_id(tok) == 1
    assert tok.get_vocab_size() <= 300
    for text in [*TEXTS, "unseen: zebra ☃ 12345\n\t\x00"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 0 not in ids and 1 not in ids
        assert tok.decode(ids) == text
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    for loaded in (data.load_tokenizer(path), data.load_tokenizer(str(tmp_path))):
        assert loaded.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    with pytest.raises(ValueError, match="no tokenizer at"):
        data.load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="vocab_size=100"):
        data.train_tokenizer([path], vocab_size=100)


def test_tokenize_appends_eos_to_every_document_once(small_tokenizer):
    corpus = data.tokenize(TEXTS[:3], small_tokenizer, chunk=2)  # chunk < len: several batches
    assert len(corpus) == 3
    for doc, text in zip([corpus[i] for i in range(3)], TEXTS[:3], strict=True):
        assert doc.dtype == np.int32 and doc[-1] == data.EOS_ID
        assert small_tokenizer.decode(doc[:-1].tolist()) == text
    templated = tokenizers.Tokenizer.from_str(small_tokenizer.to_str())
    templated.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"$A {data.EOS_TOKEN}", special_tokens=[(data.EOS_TOKEN, data.EOS_ID)])
    np.testing.assert_array_equal(data.tokenize(TEXTS[:3], templated).tokens, corpus.tokens)


def test_eos_is_found_by_its_usual_names():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    assert data.eos_id(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))) == 2
    del vocab["</s>"]
    assert data.eos_id(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))) is None


# ------------------------------------------------------------------------------------ sources


def test_text_glob_gives_one_document_per_file_keyed_by_relative_path(text_dir):
    docs = data.text_file_documents(str(text_dir / "**" / "*.txt"))
    assert len(docs) == len(TEXTS)
    assert {d.key for d in docs} == {os.path.join("sub", f"doc{i:02d}.txt") if i % 2
                                     else f"doc{i:02d}.txt" for i in range(len(TEXTS))}
    assert sorted(d.text for d in docs) == sorted(TEXTS)


def test_empty_glob_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    for read in (data.text_file_documents, data.jsonl_documents):
        with pytest.raises(ValueError, match="no files match") as error:
            read(pattern)
        assert pattern in str(error.value) and "quote" in str(error.value)


def test_jsonl_glob_reads_the_configured_field(tmp_path):
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS[:3])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(lines[2] + "\n", encoding="utf-8")
    docs = data.jsonl_documents(str(tmp_path / "*.jsonl"), field="body")
    assert [d.text for d in docs] == TEXTS[:3]
    assert [d.key for d in docs] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]
    with pytest.raises(ValueError, match=r"a\.jsonl:1 has no string field 'text'"):
        data.jsonl_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "c.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:1 is not valid JSON"):
        data.jsonl_documents(str(tmp_path / "*.jsonl"), field="body")


def test_token_files_split_a_stream_at_eos_and_round_trip_npz(tmp_path):
    stream = np.array([5, 6, 1, 7, 1, 8, 9, 10], dtype=np.int64)
    np.save(tmp_path / "stream.npy", stream)
    corpus = data.load_token_file(str(tmp_path / "stream.npy"), eos_id=1)
    assert [corpus[i].tolist() for i in range(len(corpus))] == [[5, 6, 1], [7, 1], [8, 9, 10]]
    assert corpus.tokens.dtype == np.int32
    assert len(data.load_token_file(str(tmp_path / "stream.npy"))) == 1
    corpus.save(str(tmp_path / "corpus.npz"))
    again = data.load_token_file(str(tmp_path / "corpus.npz"))
    np.testing.assert_array_equal(again.tokens, corpus.tokens)
    np.testing.assert_array_equal(again.offsets, corpus.offsets)
    kept = corpus.select(np.array([True, False, True]))
    assert [kept[i].tolist() for i in range(2)] == [[5, 6, 1], [8, 9, 10]]
    with pytest.raises(ValueError, match="no pre-tokenized file"):
        data.load_token_file(str(tmp_path / "absent.npy"))


def test_split_depends_on_keys_only():
    docs = [data.TextDocument(f"file{i}.py", "x") for i in range(200)]
    train, validation = data.split_documents(docs, validation_percent=10)
    assert 5 <= len(validation) <= 40 and len(train) + len(validation) == 200
    _, reversed_validation = data.split_documents(docs[::-1], validation_percent=10)
    assert sorted(reversed_validation) == sorted(validation)


@pytest.mark.parametrize("kind", ["text", "jsonl", "npy"])
def test_datasets_from_config_for_each_source(kind, text_dir, small_tokenizer, tmp_path):
    tokenizer_path = str(tmp_path / "tokenizer.json")
    small_tokenizer.save(tokenizer_path)
    texts = [f"document {i}: " + TEXTS[i % 4] for i in range(24)]
    if kind == "text":
        for i, text in enumerate(texts):
            (tmp_path / f"d{i}.txt").write_text(text, encoding="utf-8")
        source, keys = f"text:{tmp_path}/*.txt", [f"d{i}.txt" for i in range(24)]
    elif kind == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                                          encoding="utf-8")
        source, keys = f"jsonl:{tmp_path}/*.jsonl", [f"d.jsonl:{i + 1}" for i in range(24)]
    else:
        np.save(tmp_path / "d.npy", data.tokenize(texts, small_tokenizer).tokens)
        source, keys = f"npy:{tmp_path}/d.npy", [str(i) for i in range(24)]
    held_out = [t for t, k in zip(texts, keys, strict=True) if data.is_validation(k, 50)]
    assert 0 < len(held_out) < len(texts)
    config = dict(source=source, tokenizer=tokenizer_path, seq_len=16, batch_size=4,
                  cache_dir=str(tmp_path), validation_percent=50)
    datasets = data.datasets_from_config(config, seed=0)
    assert datasets.tokenizer.get_vocab_size() == small_tokenizer.get_vocab_size()
    assert 0 < datasets.unigram_loss < np.log(300)
    train, validation = take(datasets.train, 3), take(datasets.validation)
    for batch in [*train, *validation]:
        assert batch["tokens"].shape == (4, 16)
    # The validation pass holds exactly the held-out documents' tokens, EOS after each.
    got = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in validation])
    want = data.tokenize(held_out, small_tokenizer).tokens
    np.testing.assert_array_equal(np.bincount(got, minlength=300), np.bincount(want, minlength=300))
    assert (got == data.EOS_ID).sum() == len(held_out)


def test_bad_sources_and_vocabularies_are_named(small_tokenizer, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    small_tokenizer.save(path)
    base = dict(tokenizer=path, seq_len=16, batch_size=4, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'csv:x' is not one of"):
        data.datasets_from_config(dict(base, source="csv:x"), seed=0)
    np.save(tmp_path / "big.npy", np.arange(5000, dtype=np.int32))  # EOS = 1 ends document 0
    with pytest.raises(ValueError, match=r"big\.npy: token id 300 at position 300 \(document "
                                         r"1\) is outside the vocabulary \[0, 300\)"):
        data.datasets_from_config(dict(base, source=f"npy:{tmp_path}/big.npy"), seed=0)


def test_global_batch_must_split_over_hosts(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert data._host_batch_size(8) == 4
    with pytest.raises(ValueError, match="batch_size=3 does not split over 2 hosts"):
        data._host_batch_size(3)


# ------------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_files_split_by_file():
    train = data.builtin_corpus_files("train")
    validation = data.builtin_corpus_files("validation")
    assert train and validation and not set(train) & set(validation)
    assert train == sorted(train) and all(f.endswith(".py") for f in train + validation)
    assert not any("site-packages" in f for f in train + validation)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.10
    assert any(f.endswith(os.path.join("", "json", "__init__.py")) for f in train + validation)
    with pytest.raises(ValueError, match="'test'"):
        data.builtin_corpus_files("test")


def test_builtin_tokenizer_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_JAX_CACHE", str(tmp_path))  # the env var picks the cache
    start = time.perf_counter()
    tokenizer = data.builtin_tokenizer()
    trained_s = time.perf_counter() - start
    assert tokenizer.get_vocab_size() == data.BUILTIN_VOCAB_SIZE
    assert data.eos_id(tokenizer) == 1 and tokenizer.token_to_id(data.PAD_TOKEN) == 0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".json")
    start = time.perf_counter()
    cached = data.builtin_tokenizer()
    assert time.perf_counter() - start < trained_s / 2
    assert cached.to_str() == tokenizer.to_str()
    code = "import os\n\ndef main():\n    return os.getcwd()\n"
    assert tokenizer.decode(tokenizer.encode(code).ids) == code
    assert len(tokenizer.encode(code).ids) < len(code) / 2  # learnt Python: ~3+ chars a token

    validation = data.builtin_corpus("validation", tokenizer)
    assert len(validation) == len(data.builtin_corpus_files("validation"))
    assert (validation.tokens[validation.offsets[1:] - 1] == data.EOS_ID).all()
    again = data.builtin_corpus("validation", tokenizer)
    np.testing.assert_array_equal(again.tokens, validation.tokens)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
