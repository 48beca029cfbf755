"""Who owns a directory on disk, and who is writing into it right now.

A run directory belongs to one tool and one config: `claim` records both in `owner.json` and
refuses a directory that holds another tool's run (a cascade stage is not a `train` workdir),
another config's run, or files that no cascade_jax run wrote. `lock` keeps a second process
out while one works ("in use by pid N on host H"), and recognises the lock a killed process
left behind. Together they make the data-loss cases of a mistyped `--config.workdir` refusals
that change nothing on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cascade_jax import files

OWNER_FILE = "owner.json"
# Config fields that cannot change what a run computes: they may differ between restarts.
VOLATILE = ("workdir", "progress", "log_every", "eval_every")
LOCK_FILE = ".lock"


class WorkdirError(ValueError):
    """The directory belongs to someone else, or is in use; nothing was written."""


def identity(config: Mapping[str, Any], volatile: tuple[str, ...] = VOLATILE
             ) -> dict[str, Any]:
    """The part of a config that decides results (JSON-normalised; `volatile` keys dropped:
    progress, logging and evaluation cadence may change between restarts)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in volatile},
                                 sort_keys=True, default=str))


def read_owner(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, OWNER_FILE)
    return files.read_json(path) if os.path.exists(path) else None


def _describe(owner: Mapping[str, Any]) -> str:
    if owner.get("tool") == "cascade_stage":
        return f"stage {owner.get('stage')!r} of the cascade run in {owner.get('run')}"
    return f"a {owner.get('tool')} run"


def claim(directory: str, *, tool: str, config: Mapping[str, Any],
          legacy: Callable[[str], Mapping[str, Any] | None] | None = None,
          write: bool = True) -> None:
    """Make `directory` this run's, or accept it if it already is.

    `config` is the run's identity (see `identity`). An existing `owner.json` must name the
    same tool and identity; a directory without one must be empty (or missing), unless
    `legacy(directory)` recognises a run written before owner files existed and returns its
    identity. Refusals name what the directory holds and the way out; they write nothing.
    `write=False` (other hosts of a multi-host job) checks without writing.
    """
    owner = read_owner(directory)
    listing = sorted(set(os.listdir(directory)) - {LOCK_FILE}) if os.path.isdir(directory) else []
    if owner is None and listing:
        held = legacy(directory) if legacy is not None else None
        if held is None:
            raise WorkdirError(
                f"{directory} is not empty ({', '.join(listing[:5])}"
                f"{', ...' if len(listing) > 5 else ''}) and was not made by this tool ({tool}); "
                "choose a new or empty directory")
        owner = {"tool": tool, "config": dict(held)}
    if owner is not None:
        if owner.get("tool") != tool:
            raise WorkdirError(
                f"{directory} holds {_describe(owner)}, not a {tool} run; {tool} will not write "
                "into it: choose a new directory")
        if owner.get("config") != dict(config):
            held, wanted = owner.get("config") or {}, dict(config)
            changed = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise WorkdirError(
                f"{directory} holds a {tool} run of a different config (differs in {changed}); "
                "rerun with the same config to resume, or choose a new directory")
        if not os.path.exists(os.path.join(directory, OWNER_FILE)) and write:
            files.write_json(os.path.join(directory, OWNER_FILE), owner)
        return
    if write:
        os.makedirs(directory, exist_ok=True)
        files.write_json(os.path.join(directory, OWNER_FILE),
                         {"tool": tool, "config": dict(config)})


def mark_stage(directory: str, *, run: str, stage: str) -> None:
    """Record that `directory` is a stage of the cascade run in `run` (so no other tool
    adopts it)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, OWNER_FILE)
    if not os.path.exists(path):
        files.write_json(path, {"tool": "cascade_stage", "run": run, "stage": stage})


def _owning_run(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """(directory, owner record) of the nearest run directory that is or holds `path`."""
    for directory in (path, *path.parents):
        if (directory / OWNER_FILE).is_file():
            return directory, read_owner(str(directory)) or {}
    return None


def check_output(path: str | os.PathLike[str], *, flag: str, tool: str, marker: str,
                 ours: Callable[[str], bool], overwrite: bool,
                 protected: Mapping[str, str] | None = None) -> None:
    """An output directory a tool may write (or, with `overwrite`, replace): new or empty, or
    a previous output of this tool (it holds `marker` and only names `ours` accepts). Never
    a `protected` path (`{path: what it is}`), a directory holding or inside one, nor a
    directory inside a run (an `owner.json` at or above it). Refusals name the path and
    what owns it; they write nothing."""
    out = Path(path).resolve()
    for other, what in (protected or {}).items():
        held = Path(other).resolve()
        if out == held or held in out.parents or out in held.parents:
            raise WorkdirError(f"{flag}={path} is, holds or lies inside {what} ({other}); "
                               f"{tool} never writes over it: choose a directory outside it")
    owning = _owning_run(out)
    if owning is not None:
        raise WorkdirError(f"{flag}={path} is or lies inside {owning[0]}, which holds "
                           f"{_describe(owning[1])}; {tool} never writes into a run: choose a "
                           "directory outside it")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise FileExistsError(f"{flag}={path} is a file; choose a directory path")
    if not overwrite:
        raise FileExistsError(f"{flag}={path} exists and is not empty; pass --overwrite to "
                              f"replace a previous {tool} output, or choose a new directory")
    foreign = sorted(p.name for p in out.iterdir() if not ours(p.name))
    if not (out / marker).exists() or foreign:
        why = (f"it holds files this tool never writes ({', '.join(foreign[:5])})" if foreign
               else f"it has no {marker}, so it is not an {tool} output")
        raise FileExistsError(f"--overwrite refuses {flag}={path}: {why}; choose a new "
                              "directory or empty it yourself")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take(path: str) -> bool:
    """Create the lock file atomically; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    return True


# How long a lock file may stay unreadable before it is refused: `_take` writes its few bytes
# right after creating it, so only a file no lock of ours will ever finish stays torn longer.
_TORN_S = 2.0


def _holder(path: str) -> dict[str, Any]:
    """The lock's {"pid", "host", "since"}; an error naming `path` when it is no lock this
    module wrote (a directory, unreadable, empty, another format)."""
    try:
        holder = files.read_json(path, "rundir.lock")
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is not a readable cascade_jax lock ({e}); if no run is "
                           f"using {os.path.dirname(path)}, delete {path} and rerun") from e
    if not (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
            and not isinstance(holder.get("pid"), bool) and isinstance(holder.get("host"), str)
            and isinstance(holder.get("since", 0), int | float)):
        raise WorkdirError(f"{path} is not a cascade_jax lock (it holds {str(holder)[:80]!r}, "
                           'not {"pid": <int>, "host": <str>, "since": <time>}); if no run is '
                           f"using {os.path.dirname(path)}, delete {path} and rerun")
    return holder


@contextlib.contextmanager
def lock(directory: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold `directory/.lock` for the duration: a second process is refused with the owner's
    pid and host; a lock whose process is gone (same host, pid not alive: a kill -9) is taken
    over; a lock file that is not one (a directory, unreadable, empty or of another format,
    after `_TORN_S` seconds to finish being written) is refused naming it, never waited on.
    `enabled=False` (non-zero processes of one job) does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    torn_since = None
    while not _take(path):
        if os.path.isdir(path):
            raise WorkdirError(f"{path} is a directory, so it is not a cascade_jax lock: "
                               "remove it and rerun")
        try:
            holder = _holder(path)
        except WorkdirError:
            if not os.path.lexists(path):
                continue  # released this instant: take it
            torn_since = time.monotonic() if torn_since is None else torn_since
            if time.monotonic() - torn_since > _TORN_S:
                raise
            time.sleep(0.05)  # being written this instant: look again
            continue
        host, pid = holder["host"], holder["pid"]
        if host == socket.gethostname() and not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its process is gone
            continue
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        raise WorkdirError(
            f"{directory} is in use by pid {pid} on {host} (since {since}); wait for that run "
            f"to finish, or, if it is gone, delete {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if _holder(path)["pid"] == os.getpid():
                os.unlink(path)
