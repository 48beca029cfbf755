"""Reading and writing the library's files: writes are atomic (a crash or a kill never leaves
half a file behind), and every read error names the file, what is wrong with it and what
writes it, instead of a bare parser message with no path."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

# What numpy raises for a file that is not (or no longer) a well-formed .npy/.npz: a bad zip
# directory or member CRC, a short read, a bad header, pickled data we refuse to load.
_NUMPY_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """`write(binary file)` into a temporary file beside `path`, then rename it into place:
    readers (and other hosts sharing the directory) see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _written_by(written_by: str) -> str:
    return f" (it is written by {written_by})" if written_by else ""


def require_file(path: str, written_by: str = "") -> str:
    """`path` if it is a file; else FileNotFoundError naming it and what writes it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist{_written_by(written_by)}; check the "
                                "path, or run what writes it first")
    return path


def parse_json(text: str | bytes, source: str, written_by: str = "") -> Any:
    """`json.loads(text)`, a parse error becoming a ValueError that names `source`, the line
    and the column (a bare JSONDecodeError says neither which file nor what to do)."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e}); the file is damaged, restore or "
                         f"rewrite it{_written_by(written_by)}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}; the file is damaged or was cut short, restore or "
                         f"rewrite it{_written_by(written_by)}") from e


def read_json(path: str, written_by: str = "") -> Any:
    """The JSON at `path`; a missing or unparsable file is an error naming `path`."""
    with open(require_file(path, written_by), "rb") as f:
        return parse_json(f.read(), path, written_by)


def _numpy_error(path: str, error: BaseException, written_by: str) -> ValueError:
    return ValueError(f"{path} is not a readable numpy file ({type(error).__name__}: {error}); "
                      f"the file is damaged, cut short or of another format: restore or "
                      f"rewrite it{_written_by(written_by)}")


def read_npz(path: str, names: tuple[str, ...], written_by: str = "") -> dict[str, np.ndarray]:
    """The arrays `names` of the `.npz` at `path`, read whole (so a damaged member fails here,
    naming the file, and not later); a missing array is an error naming it and the file."""
    require_file(path, written_by)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise ValueError("a single .npy array, not an .npz archive")
        with loaded as npz:
            found = sorted(npz.files)
            arrays = {name: npz[name] for name in names if name in found}
    except _NUMPY_ERRORS as e:
        raise _numpy_error(path, e, written_by) from e
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing} (it has {found}); it is not the "
                         f"file expected here, or of an older format: rewrite it"
                         f"{_written_by(written_by)}")
    return arrays


def read_npy(path: str, written_by: str = "", *, mmap: bool = True) -> np.ndarray:
    """The array in the `.npy` at `path` (memory-mapped by default); errors name the file."""
    require_file(path, written_by)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except _NUMPY_ERRORS as e:
        raise _numpy_error(path, e, written_by) from e
    if not isinstance(array, np.ndarray):
        array.close()  # an .npz given where a .npy was expected
        raise ValueError(f"{path} is an .npz archive, a single .npy array was expected here")
    return array
