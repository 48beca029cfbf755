"""Writing files so that a crash or a kill never leaves half of one behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


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


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
