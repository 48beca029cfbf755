"""Checkpoints: a train-state pytree, a grain iterator and a JSON metadata dict, via Orbax.

The only module that imports orbax. It is generic over pytrees (no model import), so a cascade
stage saves whatever state it has and restores it into whatever sharding the next job uses.

What it adds on top of `orbax.checkpoint.CheckpointManager`:
- A step counts only once orbax has committed it (its `commit_success.txt` exists): orbax on a
  POSIX disk treats any directory named like a step as complete, so a half-copied or hand-made
  one would otherwise become the step a resume picks.
- Saving never replaces a complete step, and never writes a step older than the newest one
  already there (a resume would skip it); both raise `CheckpointError` naming the path.
- Restores go into an explicit target of `jax.ShapeDtypeStruct`s with shardings, checked
  against the saved shapes first, so a checkpoint written on one mesh loads onto another and a
  mismatch names the leaf.
- Every array leaf gets a 2×32-bit checksum at save time and is verified after restore:
  tensorstore decodes a chunk with a flipped byte to wrong numbers without complaint.
- Any failure to read a complete step becomes `CheckpointError` naming the step directory and
  the earlier steps to fall back on. Nothing is ever deleted on a failed restore.

Layout: `<directory>/<step>/{state, metadata, checksums, data}` (data only when an iterator was
saved). All writes go through orbax, which writes only on the hosts it should. Orbax stores a
typed PRNG key (`jax.random.key`) as its raw uint32 data, so keep `jax.random.key_data(key)` in
the state and wrap it back after restoring.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from cascade_jax import paths

PyTree = Any

_STATE, _METADATA, _CHECKSUMS, _DATA = "state", "metadata", "checksums", "data"
_COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
_CHECKSUM_ALGORITHM = "u32-sum+weighted-sum/v1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; the message names the path."""


class Restored(NamedTuple):
    """What `restore` returns: the step it read, the state in the target's shardings, the
    metadata dict saved with it."""

    step: int
    state: PyTree
    metadata: dict[str, Any]


# --- which step directories count ----------------------------------------------------------

def _is_committed(step_dir: epath.Path) -> bool:
    return (step_dir / _COMMIT_MARKER).exists()


@dataclasses.dataclass(frozen=True)
class _CommittedSteps(ocp.path.step.NameFormat[ocp.path.step.Metadata]):
    """Orbax's standard step names (`<dir>/<step>`), listing only committed steps.

    Orbax writes the commit marker before its final rename on POSIX and as the last write on
    GCS, so requiring it is safe for everything orbax wrote and rejects everything it did not
    finish.
    """

    base: Any = dataclasses.field(default_factory=ocp.path.step.standard_name_format)

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.path.step.Metadata]:
        return (m for m in self.base.find_all(base_path) if _is_committed(m.path))

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.path.step.Metadata:
        found = self.base.find_step(base_path, step)
        if not _is_committed(found.path):
            raise ValueError(f"step {step} at {found.path} has no {_COMMIT_MARKER}: incomplete")
        return found


_NAME_FORMAT = _CommittedSteps()


def _as_path(directory: epath.PathLike) -> epath.Path:
    """Absolute local paths (tensorstore resolves relative ones against its own cwd); cloud
    paths such as gs:// unchanged."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def all_steps(directory: epath.PathLike) -> list[int]:
    """Committed steps in `directory`, ascending; [] when it does not exist."""
    path = _as_path(directory)
    if not path.is_dir():
        return []
    return sorted(m.step for m in _NAME_FORMAT.find_all(path))


def latest_step(directory: epath.PathLike) -> int | None:
    """The newest committed step in `directory`, or None. Half-written steps never count."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


# --- leaf names, target checks, checksums ---------------------------------------------------

def _leaf_name(key_path: Any) -> str:
    """`a.b.0.c`, the way orbax names a leaf on disk, so a dataclass field and the dict key it
    was saved under get the same name. The checksum records of saved checkpoints are keyed by
    these names, so they keep orbax's '.' rather than `paths`' '/'."""
    return paths.path_str(key_path, sep=".")


def _named_leaves(tree: PyTree) -> dict[str, Any]:
    """Leaves keyed by `_leaf_name`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_leaf_name(path): leaf for path, leaf in leaves}


def _abstract_target(target: PyTree) -> PyTree:
    """Arrays become their ShapeDtypeStruct; a ShapeDtypeStruct must carry a sharding, because
    orbax silently restores one without a sharding as a host numpy array."""

    def convert(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"target leaf {_leaf_name(path)} {leaf.shape} {leaf.dtype} has no "
                "sharding; pass jax.ShapeDtypeStruct(shape, dtype, sharding=...), e.g. "
                "jax.sharding.SingleDeviceSharding(jax.devices()[0]) or a NamedSharding")
        return leaf

    return jax.tree_util.tree_map_with_path(convert, target)


def _check_target(target: PyTree, saved: PyTree, where: str, partial: bool) -> None:
    """Compares leaf names and shapes with the saved tree and lists every difference."""
    wanted, have = _named_leaves(target), _named_leaves(saved)
    problems = [f"{name}: not in the checkpoint" for name in wanted if name not in have]
    if not partial:
        problems += [f"{name}: in the checkpoint but not in the target"
                     for name in have if name not in wanted]
    for name, leaf in wanted.items():
        old = getattr(have.get(name), "shape", None)
        new = getattr(leaf, "shape", None)
        if old is not None and new is not None and tuple(old) != tuple(new):
            problems.append(f"{name}: target shape {tuple(new)} but saved {tuple(old)}")
    if problems:
        shown = "\n  ".join(problems[:12] + ([f"... {len(problems) - 12} more"]
                                              if len(problems) > 12 else []))
        hint = "" if partial else "; pass partial=True to restore only the target's leaves"
        raise ValueError(f"target does not match the checkpoint at {where}:\n  {shown}\n"
                         f"build the target from the config saved with it{hint}")


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[sum, index-weighted sum] of the leaf's raw words mod 2**32. Integer sums are exact in
    any reduction order, so the result does not depend on the sharding; odd weights make any
    single changed or moved word change the second sum."""
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis, size in enumerate(words.shape):
        index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    weights = index * np.uint32(2) + np.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * weights, dtype=jnp.uint32)])


_checksum_leaves = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def _checksummable(leaf: Any) -> bool:
    """jax arrays of whole-byte numeric types (host numpy leaves could lose bits on the way
    to the device when x64 is off; typed PRNG keys have no bits to look at)."""
    if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
        return False
    dtype = np.dtype(leaf.dtype)
    return dtype == np.bool_ or (dtype.kind in "fiu" and dtype.itemsize in (1, 2, 4, 8)
                                  and jax.dtypes.itemsize_bits(dtype) == 8 * dtype.itemsize)


def _checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """{leaf name: {shape, dtype, sum}} for every array leaf. One jit per set of devices, since
    one computation cannot take arrays living on different devices."""
    leaves = {name: leaf for name, leaf in _named_leaves(tree).items() if _checksummable(leaf)}
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, leaf in leaves.items():
        groups[frozenset(leaf.sharding.device_set)].append(name)
    out = {}
    for names in groups.values():
        sums = jax.device_get(_checksum_leaves([leaves[n] for n in names]))
        for name, value in zip(names, sums, strict=True):
            leaf = leaves[name]
            out[name] = {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype)),
                         "sum": [int(v) for v in value]}
    return out


def _mismatched_checksums(state: PyTree, saved: Mapping[str, Any]) -> list[str]:
    """Names of restored leaves whose checksum differs; leaves restored with another dtype or
    absent from the record cannot be compared and are skipped."""
    record = saved.get("leaves", {})
    comparable = {name: leaf for name, leaf in _named_leaves(state).items()
                  if name in record and _checksummable(leaf)
                  and record[name]["dtype"] == str(np.dtype(leaf.dtype))}
    now = _checksums(comparable)
    return [name for name in comparable if now[name]["sum"] != record[name]["sum"]]


def _json_copy(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A deep copy through JSON: fails now, not in the async writer, and later edits to the
    caller's dict do not leak into the checkpoint."""
    try:
        return json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save, restore, handler in (
            (_STATE, ocp.args.PyTreeSave, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler),
            (_METADATA, ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
            (_CHECKSUMS, ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
            (_DATA, grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointRestore,
             grain_checkpoint.CheckpointHandler)):
        registry.add(item, save, handler)
        registry.add(item, restore, handler)
    return registry


# --- the checkpointer -----------------------------------------------------------------------


class _ReadOnlyNotice(logging.Filter):
    """Orbax warns "Given directory is read only" every time a manager is opened with
    `read_only=True`, which is exactly how we read a parent or teacher on purpose (every stage
    of a cascade does); drop that one record, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Given directory is read only=%s"


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


class Checkpointer:
    """Saves and restores the steps of one run directory. Call on every host; orbax decides
    who writes. Use as a context manager, or call `close()`: saves are asynchronous.

    `max_to_keep=None` keeps every step; older steps are removed only after a newer one has
    committed. `save_interval_steps` skips steps that are not multiples of it (orbax still
    saves the first step of a run and a step where a preemption was signalled).
    `read_only=True` never creates, writes or deletes anything, e.g. to load a teacher from its
    parent's directory.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True,
                 read_only: bool = False) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1, or None to keep all")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
        self._directory = _as_path(directory)
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(
                None if read_only else max_to_keep),
            step_name_format=_NAME_FORMAT,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options,
                                              handler_registry=_handler_registry())

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def step_dir(self, step: int) -> epath.Path:
        """Where `step` lives (or would)."""
        return self._directory / _NAME_FORMAT.build_name(step)

    def all_steps(self) -> list[int]:
        """Committed steps, plus one whose asynchronous save is still in flight."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Like `all_steps()[-1]`; `wait_until_finished()` first for what is on disk."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, *, data_iterator: Any = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position, and `metadata`) as `step`.

        Returns False when `save_interval_steps` skips the step (never with `force=True`).
        Arrays and the iterator state are captured before it returns, so the caller may donate
        the state or advance the iterator right away. Raises `CheckpointError` if the step
        already exists or an older step than one already saved is asked for.
        """
        if self._read_only:
            raise CheckpointError(f"{self._directory} was opened read_only; not saving step "
                                  f"{step}")
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise CheckpointError(f"step={step!r} must be a non-negative integer: a step saved "
                                  f"under another name in {self._directory} could never be "
                                  "listed or restored")
        self._refuse_to_overwrite(step)
        if not force and not self._manager.should_save(step):
            return False
        items = {_STATE: ocp.args.PyTreeSave(state),
                 _METADATA: ocp.args.JsonSave(_json_copy(metadata)),
                 _CHECKSUMS: ocp.args.JsonSave({"algorithm": _CHECKSUM_ALGORITHM,
                                                "leaves": _checksums(state)})}
        if data_iterator is not None:
            items[_DATA] = grain_checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    def _refuse_to_overwrite(self, step: int) -> None:
        steps = self.all_steps()
        path = self.step_dir(step)
        if step in steps or path.exists():
            state = "" if step in steps else f" (incomplete: no {_COMMIT_MARKER})"
            raise CheckpointError(
                f"refusing to overwrite step {step}: {path} already exists{state}; save under "
                "a new step number or into a new directory")
        later = [s for s in steps if s > step]
        if later:
            raise CheckpointError(
                f"refusing to save step {step} into {self._directory}: it already holds later "
                f"steps {later}, so a resume would skip step {step}; remove those step "
                "directories or save into a new directory")

    def _resolve_step(self, step: int | None) -> int:
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step is not None and step in steps:
            return step
        wanted = "no complete checkpoint" if step is None else f"no complete step {step}"
        raise CheckpointError(f"{self._directory} holds {wanted}; complete steps: {steps} "
                              f"(half-written steps lack {_COMMIT_MARKER} and are ignored)")

    def _read_failure(self, step: int, error: Exception) -> CheckpointError:
        earlier = [s for s in self.all_steps() if s < step]
        way_out = (f"restore an earlier step with step={earlier[-1]} (complete: {earlier})"
                   if earlier else "there is no earlier step to fall back on")
        root, seen = error, {id(error)}  # orbax wraps tensorstore's error, which names the file
        while (inner := root.__cause__ or root.__context__) is not None and id(inner) not in seen:
            root = inner
            seen.add(id(inner))
        first_line = (str(root).strip().splitlines() or [""])[0][:300]
        return CheckpointError(
            f"cannot restore step {step} from {self.step_dir(step)}: it is truncated or "
            f"corrupted ({type(root).__name__}: {first_line}). Nothing was deleted; "
            f"{way_out}.")

    def _saved_tree(self, step: int) -> PyTree:
        return self._manager.item_metadata(step)[_STATE].tree

    def abstract_state(self, step: int | None = None) -> PyTree:
        """The saved state as nested dicts/lists of unsharded `jax.ShapeDtypeStruct`s: what
        is there, before a target is built (attach shardings before restoring into it)."""
        step = self._resolve_step(step)
        try:
            tree = self._saved_tree(step)
        except Exception as e:
            raise self._read_failure(step, e) from e
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)

    def restore(self, target: PyTree, *, step: int | None = None, data_iterator: Any = None,
                partial: bool = False, verify: bool = True) -> Restored:
        """Reads `step` (default: the latest complete one) into `target`'s structure, shapes,
        dtypes and shardings.

        `target` holds `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` or arrays (their
        sharding is used); a different dtype casts. `partial=True` reads only the target's
        leaves, e.g. `{'params': ...}` out of a full train state. `data_iterator` is set in
        place to the saved position. Raises `ValueError` when the target does not match,
        `CheckpointError` when the checkpoint cannot be read or fails its checksums.
        """
        step = self._resolve_step(step)
        where = str(self.step_dir(step))
        abstract = _abstract_target(target)
        try:
            saved_tree = self._saved_tree(step)
        except Exception as e:
            raise self._read_failure(step, e) from e
        _check_target(abstract, saved_tree, where, partial)
        has_checksums = (self.step_dir(step) / _CHECKSUMS).exists()
        if data_iterator is not None and not (self.step_dir(step) / _DATA).exists():
            raise ValueError(f"{where} holds no data iterator state (it was saved without "
                             "data_iterator=); restore without data_iterator")
        items = {_STATE: ocp.args.PyTreeRestore(
                     abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                     partial_restore=partial),
                 _METADATA: ocp.args.JsonRestore()}
        if verify and has_checksums:
            items[_CHECKSUMS] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items[_DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._read_failure(step, e) from e
        if verify and has_checksums:
            bad = _mismatched_checksums(restored[_STATE], restored[_CHECKSUMS])
            if bad:
                raise self._read_failure(step, ValueError(f"checksum mismatch in {bad}"))
        return Restored(step, restored[_STATE], restored[_METADATA])

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata dict saved with `step` (default: the latest complete step)."""
        step = self._resolve_step(step)
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[_METADATA]
        except Exception as e:
            raise self._read_failure(step, e) from e

    def read_checksums(self, step: int | None = None) -> dict[str, Any]:
        """The per-leaf checksums saved with `step` (default: the latest complete step)."""
        step = self._resolve_step(step)
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(**{_CHECKSUMS: ocp.args.JsonRestore()}))[_CHECKSUMS]
        except Exception as e:
            raise self._read_failure(step, e) from e

    def wait_until_finished(self) -> None:
        """Blocks until every started save has committed; re-raises a failed save's error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and deletions, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- one-shot helpers -----------------------------------------------------------------------

def save(directory: epath.PathLike, step: int, state: PyTree, *, data_iterator: Any = None,
         metadata: Mapping[str, Any] | None = None) -> None:
    """Writes one step and waits for it to commit; keeps every other step in `directory`."""
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        ckpt.save(step, state, data_iterator=data_iterator, metadata=metadata, force=True)


def restore(directory: epath.PathLike, target: PyTree, *, step: int | None = None,
            data_iterator: Any = None, partial: bool = False) -> Restored:
    """`Checkpointer.restore` on a read-only view of `directory`."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore(target, step=step, data_iterator=data_iterator, partial=partial)


def read_metadata(directory: epath.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata dict of `step` (default: the latest complete step) in `directory`."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.read_metadata(step)


def fingerprint(directory: epath.PathLike, step: int | None = None) -> str:
    """A short identity of a complete step's contents (default the latest; its step number
    and the checksums of every leaf, computed when it was saved): what a later stage records
    of the parent it consumed, to notice when that parent changed underneath it."""
    with Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory} holds no complete checkpoint to fingerprint")
        sums = ckpt.read_checksums(step)
    digest = hashlib.sha256(json.dumps([step, sums], sort_keys=True).encode()).hexdigest()
    return f"step{step}-{digest[:16]}"


def abstract_state(directory: epath.PathLike, step: int | None = None) -> PyTree:
    """`Checkpointer.abstract_state` on a read-only view of `directory`."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.abstract_state(step)
