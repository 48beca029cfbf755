"""Offline teacher targets: run the frozen teacher once, store sparse targets, distil from disk.

A big teacher costs as much per token as the student's forward and backward together; a
cascade distils several children from one teacher, and every epoch re-runs it. Caching its
per-position targets once makes each later step teacher-free (`distill.step.train_step_cached`).
The only module that uses tensorstore for teacher targets.

What is stored, per position (`mode`):
- 'topk'     the k likeliest tokens: indices and their log-probs at T = 1, normalised over the
  full vocabulary (`losses.top_k_teacher_targets`); the loss re-tempers and renormalises them
  over the k, which is exact on that support, so any temperature works later.
- 'sampled'  k i.i.d. draws from the tempered teacher and their log-probs
  (`losses.sample_teacher_targets`, Random-Sampling KD): unbiased forward KL, fixed to the
  temperature used when writing.

Layout of a cache directory (zarr v3, uncompressed, one array per field):

    tokens, segment_ids, positions   [n_rows, seq_len]     int32  the batches, as fed to it
    teacher_idx                      [n_rows, seq_len, k]  int32
    teacher_logprobs                 [n_rows, seq_len, k]  float32 or bfloat16
    hosts/<i>.json                   what host i wrote (its batch count, its tokens' checksum);
                                     deleted once host 0 has committed
    metadata.json                    teacher config, mode, k, T, shapes, fingerprint, complete,
                                     checksums ('crc32c')

The cached batches are self-contained: the distill step reads tokens and targets from here.
Row r of batch b is global row `b · rows_per_batch + r`. Each zarr chunk (one file) is one
host's rows of one batch, split into one-row inner chunks (zarr's `sharding_indexed` codec), so
hosts write whole files in parallel, never the same file, and a reader fetches single rows.

Commit: `metadata.json` is written last, by host 0, after every host has reported its rows
(`hosts/<i>.json`) and carries `"complete": true`. A directory without it (a crash, a run still
going) is never read as a cache: `open_cache` raises an error naming the path.

Reading: `cache_dataset` is a grain pipeline over rows (this host's strided share, shuffled by
seed each epoch, batched), so its iterator checkpoints like `data.make_lm_dataset`'s.

Integrity: every one-row inner chunk of every array carries a CRC-32C of its bytes (zarr's
`crc32c` codec, written with the row, checked by tensorstore on every read at memory speed),
and rows are stored even when they equal the fill value, so a missing chunk is an error, not
zeros. A flipped byte in a teacher-target file (which otherwise reads back silently, nats off)
or a lost file is an error naming the cache, the field, the rows and the file; teacher indices
outside [0, vocab) are refused when written and when read. Caches of format
`cascade_jax.logits_cache/1` (no checksums) are still read, unchecked, with a warning.

Paths are local directories or URLs tensorstore understands (`gs://bucket/dir`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from cascade_jax import chunks, files, model, sharding, token_ids
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses, step

Batch = dict[str, np.ndarray]

FORMAT = "cascade_jax.logits_cache/2"
_UNCHECKED_FORMAT = "cascade_jax.logits_cache/1"  # before per-row checksums: read, with a warning
CHECKSUMS = "crc32c"
MODES = losses.SPARSE_MODES
LOGPROB_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
TOKEN_FIELDS = ("tokens", "segment_ids", "positions")  # [n_rows, seq_len] int32
TARGET_FIELDS = step.CACHED_KEYS  # teacher_idx, teacher_logprobs: [n_rows, seq_len, k]
METADATA = "metadata.json"
_REWRITE = "write the cache again (write_cache(..., overwrite=True))"


# ------------------------------------------------------------------------------ description


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, read from (or about to be written as) its `metadata.json`."""

    path: str
    teacher: ModelConfig
    mode: str
    k: int
    temperature: float  # 'sampled': the draws' T; 'topk': 1.0 (log-probs at T = 1)
    seed: int  # 'sampled': the draws' PRNG seed
    logprob_dtype: str
    n_rows: int
    seq_len: int
    rows_per_batch: int  # global rows of one written batch (all hosts together)
    fingerprint: str
    teacher_id: str | None = None  # the caller's name for the teacher weights
    complete: bool = True
    checksums: str | None = CHECKSUMS  # None: an older cache whose rows are read unchecked

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["path"]
        return {"format": FORMAT, **fields, "vocab_size": self.vocab_size}

    @classmethod
    def from_json(cls, path: str, meta: Mapping[str, Any]) -> CacheInfo:
        source = _join(path, METADATA)
        if meta.get("format") not in (FORMAT, _UNCHECKED_FORMAT):
            raise ValueError(f"{source} has format {meta.get('format')!r}, this "
                             f"code reads {FORMAT!r}; write the cache again with this version")
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        fields = {name: meta[name] for name in names if name in meta}
        if meta["format"] == _UNCHECKED_FORMAT:
            warnings.warn(f"the logits cache at {path} predates per-row checksums: its rows "
                          "are read unchecked, so a damaged file goes unnoticed; write it "
                          "again to have them checked", stacklevel=3)
            fields["checksums"] = None
        try:
            fields["teacher"] = ModelConfig(**meta["teacher"])
            return cls(path=path, **fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source} is damaged ({type(e).__name__}: {e}); write the cache "
                             "again (write_cache(..., overwrite=True))") from e


def bytes_per_token(info: CacheInfo) -> int:
    """Bytes on disk per cached position: k · (4 + 4 or 2) for the targets plus 12 for the
    token, segment id and position (int32 each); each row adds ~20 bytes per field on disk
    (its 16-byte entry in the file's chunk index and its 4-byte CRC-32C)."""
    return info.k * (4 + LOGPROB_DTYPES[info.logprob_dtype].itemsize) + 4 * len(TOKEN_FIELDS)


def check_distill_config(info: CacheInfo, dcfg: step.DistillConfig) -> None:
    """Raises if `dcfg` cannot train on this cache (vocabulary, hidden states, sampled T)."""
    if dcfg.student.vocab_size != info.vocab_size:
        raise ValueError(f"student vocab_size={dcfg.student.vocab_size} but the cache at "
                         f"{info.path} holds targets over the teacher's vocab_size="
                         f"{info.vocab_size}; the student needs the teacher's tokenizer")
    if dcfg.hidden is not None:
        raise ValueError("the cache holds no teacher hidden states; distil hidden states "
                         "online (step.train_step) or set DistillConfig(hidden=None)")
    if info.mode == "sampled":
        if dcfg.loss.kind != "forward_kl":
            raise ValueError(f"the cache at {info.path} holds sampled targets, which estimate "
                             f"forward KL only; got kind={dcfg.loss.kind!r}")
        if dcfg.loss.temperature != info.temperature:
            raise ValueError(f"the cache at {info.path} was sampled at temperature="
                             f"{info.temperature}, the loss uses temperature="
                             f"{dcfg.loss.temperature}; set LossSpec(temperature="
                             f"{info.temperature}) or write a cache at the new temperature")


# ------------------------------------------------------------------------ teacher targets


def teacher_targets(cfg: ModelConfig, params: model.Params, batch: Mapping[str, Any],
                    rng: jax.Array | None = None, *, k: int, mode: str = "topk",
                    temperature: float = 1.0, chunk_size: int = 512
                    ) -> tuple[jax.Array, jax.Array]:
    """(indices [B, L, k] int32, log-probs [B, L, k] float32) of the teacher on `batch`.

    Logits are made `chunk_size` positions at a time from the final hidden states (as the
    fused loss makes them), so only a [B, chunk, V] slice is ever live. `rng` is needed for
    'sampled' only.
    """
    if mode == "sampled" and rng is None:
        raise ValueError("mode='sampled' draws from the teacher; pass rng")
    hidden_BLD = model.hidden_states(cfg, params, batch["tokens"], batch.get("segment_ids"),
                                     batch.get("positions"))
    head_DV = model.lm_head_weights(cfg, params).astype(hidden_BLD.dtype)
    length = hidden_BLD.shape[1]
    chunk, n_chunks = chunks.count(length, chunk_size)
    hidden_nBCD = chunks.split(hidden_BLD, chunk)
    keys = jax.random.split(rng if rng is not None else jax.random.key(0), n_chunks)

    def one_chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h_BCD, key = args
        logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD, head_DV,
                                preferred_element_type=jnp.float32)
        if mode == "topk":
            return losses.top_k_teacher_targets(logits_BCV, k)
        return losses.sample_teacher_targets(logits_BCV, key, k, temperature=temperature)

    idx_nBCk, logprobs_nBCk = jax.lax.map(one_chunk, (hidden_nBCD, keys))
    return chunks.merge(idx_nBCk, length), chunks.merge(logprobs_nBCk, length)


_STATIC = ("cfg", "k", "mode", "temperature", "chunk_size", "logprob_dtype")


def _targets_for_cache(cfg: ModelConfig, params: model.Params, batch: Mapping[str, Any],
                       rng: jax.Array, *, k: int, mode: str, temperature: float,
                       chunk_size: int, logprob_dtype: str) -> tuple[jax.Array, jax.Array]:
    """`teacher_targets` with the log-probs cast on device (bf16 halves the transfer)."""
    idx_BLk, logprobs_BLk = teacher_targets(cfg, params, batch, rng, k=k, mode=mode,
                                            temperature=temperature, chunk_size=chunk_size)
    return idx_BLk, logprobs_BLk.astype(LOGPROB_DTYPES[logprob_dtype])


# One compiled function per (teacher, k, ...) for the whole process, not one per write_cache.
_jit_targets = jax.jit(_targets_for_cache, static_argnames=_STATIC)


@functools.lru_cache(maxsize=8)
def _mesh_targets(cfg: ModelConfig, mesh: Mesh, k: int, mode: str, temperature: float,
                  chunk_size: int, logprob_dtype: str) -> Any:
    """The teacher pass compiled for `mesh` (once per process and arguments): params by
    their logical axes, rows over data × fsdp, targets back sharded like the rows."""
    rows = sharding.batch_sharding(mesh)
    static = dict(k=k, mode=mode, temperature=temperature, chunk_size=chunk_size,
                  logprob_dtype=logprob_dtype)
    targets = functools.partial(_targets_for_cache, cfg, **static)
    return jax.jit(sharding.traced_on_mesh(targets, mesh),
                   in_shardings=(sharding.param_shardings(cfg, mesh), rows,
                                 sharding.replicated(mesh)),
                   out_shardings=(rows, rows))


# ------------------------------------------------------------------------------- storage


def _as_url(path: str) -> str:
    """Absolute local paths (tensorstore resolves relative ones against its own cwd); URLs
    such as gs://bucket/dir unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def _kvstore(path: str) -> dict[str, Any]:
    """A tensorstore kvstore spec for the directory `path` (local or URL)."""
    url = _as_url(path)
    if "://" in url:
        return ts.KvStore.Spec(url.rstrip("/") + "/").to_json()
    return {"driver": "file", "path": url.rstrip("/") + "/"}


def _open_kv(path: str) -> ts.KvStore:
    return ts.KvStore.open(_kvstore(path)).result()


def _read_json(kv: ts.KvStore, key: str) -> Any:
    found = kv.read(key).result()
    if found.state != "value":
        return None
    return files.parse_json(found.value, kv.url.removeprefix("file://") + key,
                            written_by="logits_cache.write_cache")


def _write_json(kv: ts.KvStore, key: str, obj: Any) -> None:
    """Atomic per key (the file kvstore writes a temporary file and renames it)."""
    kv.write(key, json.dumps(obj, indent=2).encode()).result()


def _field_layout(info: CacheInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """{field: (shape, zarr data type)}."""
    rows, length = info.n_rows, info.seq_len
    layout = {name: ((rows, length), "int32") for name in TOKEN_FIELDS}
    layout["teacher_idx"] = ((rows, length, info.k), "int32")
    layout["teacher_logprobs"] = ((rows, length, info.k), info.logprob_dtype)
    return layout


def _array_kvstore(path: str, name: str) -> dict[str, Any]:
    kvstore = _kvstore(path)
    kvstore["path"] = kvstore["path"] + name + "/"
    return kvstore


def _array_spec(path: str, name: str, shape: tuple[int, ...], dtype: str,
                rows_per_file: int) -> dict[str, Any]:
    """zarr v3: one file per `rows_per_file` rows (one host's rows of one batch), inside it
    one-row chunks that a reader fetches alone, each with its CRC-32C; all-zero rows (padding)
    are stored too, so that a reader can treat every absent row as lost."""
    little = [{"name": "bytes", "configuration": {"endian": "little"}}]
    checksum = [{"name": CHECKSUMS}]
    return {
        "driver": "zarr3",
        "kvstore": _array_kvstore(path, name),
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [rows_per_file, *shape[1:]]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, *shape[1:]], "codecs": [*little, *checksum],
                "index_codecs": [*little, *checksum]}}],
        },
    }


def _open_arrays(info: CacheInfo, host_rows: int, *, create: bool) -> dict[str, ts.TensorStore]:
    """Opens (or creates, when `create`) every array, checked against `info`'s shapes."""
    stores = {}
    for name, (shape, dtype) in _field_layout(info).items():
        if create:
            spec = _array_spec(info.path, name, shape, dtype, host_rows)
            stores[name] = ts.open(spec, create=True, open=True).result()
            continue
        spec = {"driver": "zarr3", "kvstore": _array_kvstore(info.path, name),
                "fill_missing_data_reads": info.checksums is None}
        try:
            store = ts.open(spec, open=True, read=True).result()
        except ValueError as e:
            raise ValueError(f"the logits cache at {info.path} lacks a readable array "
                             f"{name!r} ({e}); write the cache again") from e
        if tuple(store.shape) != shape:
            raise ValueError(f"array {name!r} of the logits cache at {info.path} has shape "
                             f"{tuple(store.shape)}, its metadata says {shape}; the cache is "
                             "damaged: write it again")
        stores[name] = store
    return stores


def _delete_arrays(path: str) -> None:
    """Removes every array of a cache (before writing one of a different shape)."""
    kv = _open_kv(path)
    for name in (*TOKEN_FIELDS, *TARGET_FIELDS):
        kv.delete_range(ts.KvStore.KeyRange(name + "/", name + "0")).result()


# -------------------------------------------------------------------------------- writing


def host_row_range(batch_index: int, host_rows: int, process_index: int, process_count: int
                   ) -> tuple[int, int]:
    """[start, stop) of the global rows that host `process_index` writes for one batch.

    Host i holds rows [i·b, (i+1)·b) of each global batch of `process_count`·b rows, the
    layout `sharding.shard_batch` (`make_array_from_process_local_data`) and
    `data.make_lm_dataset` use.
    """
    start = (batch_index * process_count + process_index) * host_rows
    return start, start + host_rows


def _with_defaults(batch: Mapping[str, Any], index: int, vocab_size: int) -> Batch:
    """The batch contract's three int32 arrays; segment ids and positions filled if absent.
    Token ids are checked against the teacher's vocabulary before the cast."""
    token_ids.check(batch["tokens"], vocab_size,
                    where=f"tokens of batch {index} given to write_cache")
    tokens = np.asarray(batch["tokens"], np.int32)
    segment_ids = batch.get("segment_ids")
    segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids,
                                                                               np.int32)
    positions = batch.get("positions")
    if positions is None:
        positions = np.asarray(model.positions_from_segments(segment_ids))
    return {"tokens": tokens, "segment_ids": segment_ids,
            "positions": np.asarray(positions, np.int32)}


def _planned_batches(batches: Iterable[Any], max_batches: int | None) -> int:
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if length is None and max_batches is None:
        raise ValueError("the batches have no len(); pass max_batches=N (how many batches to "
                         "cache): the arrays' shape is fixed before hosts write in parallel")
    planned = min(n for n in (length, max_batches) if n is not None)
    if planned < 1:
        raise ValueError(f"nothing to cache: max_batches={max_batches}, len(batches)={length}")
    return planned


def _check_args(teacher_cfg: ModelConfig, *, k: int, mode: str, temperature: float,
                logprob_dtype: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose from {list(MODES)}")
    if not 1 <= k <= teacher_cfg.vocab_size:
        raise ValueError(f"k={k} must be in [1, vocab_size={teacher_cfg.vocab_size}]")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype={logprob_dtype!r}; choose from "
                         f"{list(LOGPROB_DTYPES)}")
    if mode == "topk" and temperature != 1.0:
        raise ValueError(f"temperature={temperature} with mode='topk': top-k log-probs are "
                         "stored at T = 1 and the loss re-tempers them exactly; leave "
                         "temperature=1.0 (it matters only for mode='sampled')")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts], sort_keys=True).encode()).hexdigest()[:16]


def _rows_checksum(tokens_BL: np.ndarray, first_row: int) -> int:
    """Σ over rows of a hash of (global row index, its tokens), mod 2⁶⁴: hosts add their
    parts, so the cache's fingerprint does not depend on how many hosts wrote it."""
    total = 0
    for offset, row in enumerate(tokens_BL):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8,
                                 key=(first_row + offset).to_bytes(8, "little"))
        total += int.from_bytes(digest.digest(), "little")
    return total % 2**64


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _prepare(info: CacheInfo, host_rows: int, *, overwrite: bool, process_index: int
             ) -> dict[str, ts.TensorStore]:
    """Refuses to replace a complete cache unless `overwrite`; host 0 marks the directory
    incomplete and (re)creates arrays of another shape; then every host opens them."""
    kv = _open_kv(info.path)
    existing = _read_json(kv, METADATA)
    if existing is not None and existing.get("complete") and not overwrite:
        raise ValueError(f"{info.path} already holds a complete logits cache (fingerprint "
                         f"{existing.get('fingerprint')}); read it with open_cache, pass "
                         "overwrite=True, or choose another path")
    if process_index == 0:
        _write_json(kv, METADATA, info.to_json())  # complete: false until every host is done
        try:
            _open_arrays(info, host_rows, create=True)
        except ValueError:  # arrays of another shape or dtype from an earlier cache
            _delete_arrays(info.path)
    _barrier("logits_cache.prepare")
    return _open_arrays(info, host_rows, create=True)


def _write_batch(stores: Mapping[str, ts.TensorStore], vocab_size: int, start: int,
                 batch: Batch, targets: tuple[Any, Any]) -> list[ts.Future]:
    """Starts writing one host's rows of one batch (waiting for its targets to be computed);
    the futures finish once it is on disk. Indices outside the vocabulary are refused."""
    idx_BLk, logprobs_BLk = targets
    fields = dict(batch, teacher_idx=np.asarray(idx_BLk),
                  teacher_logprobs=np.asarray(logprobs_BLk))
    stop = start + batch["tokens"].shape[0]
    token_ids.check(fields["teacher_idx"], vocab_size,
                    where=f"teacher indices for rows [{start}, {stop})",
                    fix="the teacher's params have another vocab_size than teacher_cfg: "
                    "pass the config the params were made with")
    return [stores[name][start:stop].write(value) for name, value in fields.items()]


def _commit(info: CacheInfo, n_batches: int, process_count: int, kv: ts.KvStore,
            stores: Mapping[str, ts.TensorStore]) -> CacheInfo:
    """Host 0, once every host is done: checks their reports, trims unwritten rows, and writes
    the metadata with complete = true (the one write that makes the cache readable)."""
    reports = [_read_json(kv, f"hosts/{i}.json") for i in range(process_count)]
    for i, report in enumerate(reports):
        if report is None or report["run"] != info.fingerprint:
            raise ValueError(f"host {i} of {process_count} did not finish writing its rows of "
                             f"the logits cache at {info.path}; the cache stays incomplete: "
                             "run write_cache again on every host")
        if report["n_batches"] != n_batches:
            raise ValueError(f"host {i} wrote {report['n_batches']} batches, host 0 wrote "
                             f"{n_batches}; every host must feed the same number of batches")
    n_rows = n_batches * info.rows_per_batch
    if n_rows < info.n_rows:  # the batches ran out before max_batches: drop the empty rows
        for store in stores.values():
            store.resize(exclusive_max=[n_rows, *store.shape[1:]],
                         resize_metadata_only=True).result()
    tokens = sum(r["tokens_checksum"] for r in reports) % 2**64
    content = _fingerprint(info.fingerprint, tokens)
    info = dataclasses.replace(info, n_rows=n_rows, fingerprint=content, complete=True)
    _write_json(kv, METADATA, info.to_json())
    # Consumed: left behind, they would vouch for a host that dies while this cache is
    # overwritten with the same settings (the same run fingerprint).
    kv.delete_range(ts.KvStore.KeyRange("hosts/", "hosts0")).result()
    return info


def write_cache(path: str, teacher_cfg: ModelConfig, teacher_params: model.Params,
                batches: Iterable[Mapping[str, Any]], *, k: int, mode: str = "topk",
                temperature: float = 1.0, seed: int = 0, logprob_dtype: str = "float32",
                mesh: Mesh | None = None, max_batches: int | None = None,
                chunk_size: int = 512, teacher_id: str | None = None,
                overwrite: bool = False, process_index: int | None = None,
                process_count: int | None = None, progress: bool = True) -> CacheInfo:
    """Runs the frozen teacher over `batches` once and stores its sparse targets at `path`.

    `batches` are this host's [b, L] batches (the batch contract of `data`), the same number
    on every host; at most `max_batches` are cached (required when `batches` has no len()).
    With `mesh`, the teacher runs sharded over it (params already placed by
    `sharding.init_params`/`shard_like`, every host in lockstep); without, each host runs it
    on its own rows and local device. Host i writes only rows `host_row_range(b, b_rows, i,
    n)`; `process_index`/`process_count` default to JAX's (explicit values simulate hosts).
    `teacher_id` (e.g. the teacher checkpoint's path and step) goes into the fingerprint.
    Returns the cache's `CacheInfo`; `complete` is false only on a simulated host other than
    0, whose rows wait for host 0 to commit.
    """
    _check_args(teacher_cfg, k=k, mode=mode, temperature=temperature,
                logprob_dtype=logprob_dtype)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                         f"{process_count})")
    planned = _planned_batches(batches, max_batches)
    iterator = iter(batches)
    try:
        first = _with_defaults(next(iterator), 0, teacher_cfg.vocab_size)
    except StopIteration:
        raise ValueError("batches is empty: nothing to cache") from None
    host_rows, seq_len = first["tokens"].shape
    static = dict(k=k, mode=mode, temperature=float(temperature), chunk_size=chunk_size,
                  logprob_dtype=logprob_dtype)
    info = CacheInfo(
        path=_as_url(path), teacher=teacher_cfg, mode=mode, k=k, temperature=float(temperature),
        seed=seed, logprob_dtype=logprob_dtype, n_rows=planned * host_rows * process_count,
        seq_len=seq_len, rows_per_batch=host_rows * process_count, teacher_id=teacher_id,
        complete=False, fingerprint="")
    info = dataclasses.replace(info, fingerprint=_fingerprint(info.to_json()))
    stores = _prepare(info, host_rows, overwrite=overwrite, process_index=process_index)

    targets = _targets_fn(teacher_cfg, teacher_params, mesh, process_index, **static)
    bar = tqdm.tqdm(total=planned, disable=not progress or process_index != 0,
                    desc="teacher cache", unit="batch", dynamic_ncols=True)
    with bar:
        n_batches, checksum = _stream_to_disk(
            stores, teacher_cfg.vocab_size,
            _numbered(first, iterator, planned, teacher_cfg.vocab_size), targets,
            lambda index: host_row_range(index, host_rows, process_index, process_count)[0],
            seed, bar)

    kv = _open_kv(info.path)
    _write_json(kv, f"hosts/{process_index}.json", {
        "run": info.fingerprint, "n_batches": n_batches, "tokens_checksum": checksum})
    _barrier("logits_cache.written")
    if process_index == 0:
        info = _commit(info, n_batches, process_count, kv, stores)
    _barrier("logits_cache.committed")
    return open_cache(info.path) if info.complete or jax.process_count() > 1 else info


TargetsFn = Callable[[Batch, jax.Array], tuple[Any, Any]]


def _targets_fn(cfg: ModelConfig, params: model.Params, mesh: Mesh | None,
                process_index: int, **static: Any) -> TargetsFn:
    """`(host batch, key) -> (indices, log-probs)` of this host's rows, still on device."""
    if mesh is None:
        def local(batch: Batch, key: jax.Array) -> tuple[Any, Any]:
            key = jax.random.fold_in(key, process_index)  # hosts draw independently
            return _jit_targets(cfg, params, batch, key, **static)

        return local
    mesh_fn = _mesh_targets(cfg, mesh, **static)
    rows = PartitionSpec(sharding.BATCH_AXES)

    def sharded(batch: Batch, key: jax.Array) -> tuple[Any, Any]:
        out = mesh_fn(params, sharding.shard_batch(batch, mesh), key)
        return multihost_utils.global_array_to_host_local_array(out, mesh, (rows, rows))

    return sharded


def _stream_to_disk(stores: Mapping[str, ts.TensorStore], vocab_size: int,
                    batches: Iterator[tuple[int, Batch]], targets: TargetsFn,
                    first_row: Callable[[int], int], seed: int, bar: tqdm.tqdm
                    ) -> tuple[int, int]:
    """Teacher pass and writes, overlapped: batch i's targets are fetched and written while
    batch i + 1 computes; at most 2 batches' writes are in flight. Returns (batches written,
    the rows' checksum)."""
    checksum, n_batches, shape = 0, 0, None
    in_flight: collections.deque[list[ts.Future]] = collections.deque()
    pending = None
    started = time.perf_counter()
    for index, batch in batches:
        shape = shape or batch["tokens"].shape
        if batch["tokens"].shape != shape:
            raise ValueError(f"batch {index} has shape {batch['tokens'].shape}, the first had "
                             f"{shape}; every batch must have the same shape")
        out = targets(batch, jax.random.fold_in(jax.random.key(seed), index))
        if pending is not None:
            in_flight.append(_write_batch(stores, vocab_size, *pending))
        pending = (first_row(index), batch, out)
        checksum = (checksum + _rows_checksum(batch["tokens"], first_row(index))) % 2**64
        while len(in_flight) > 2:
            _wait(in_flight.popleft())
        n_batches = index + 1
        bar.update(1)
        tokens = n_batches * batch["tokens"].size
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    if pending is not None:
        in_flight.append(_write_batch(stores, vocab_size, *pending))
    for futures in in_flight:
        _wait(futures)
    return n_batches, checksum


def _numbered(first: Batch, rest: Iterator[Mapping[str, Any]], limit: int, vocab_size: int
              ) -> Iterator[tuple[int, Batch]]:
    """(index, batch) for at most `limit` batches, never pulling one more from `rest`."""
    yield 0, first
    for index, batch in enumerate(itertools.islice(rest, limit - 1), start=1):
        yield index, _with_defaults(batch, index, vocab_size)


def _wait(futures: list[ts.Future]) -> None:
    for future in futures:
        future.result()


# -------------------------------------------------------------------------------- reading


def open_cache(path: str) -> CacheInfo:
    """The `CacheInfo` of the complete cache at `path`; a clear error for anything else."""
    url = _as_url(path)
    meta = _read_json(_open_kv(url), METADATA)
    if meta is None:
        has_arrays = _read_json(_open_kv(url), "tokens/zarr.json") is not None
        if has_arrays:
            raise ValueError(f"the logits cache at {url} is incomplete (no {METADATA}): its "
                             "writing was interrupted; run write_cache again (overwrite=True)")
        raise ValueError(f"no logits cache at {url}; write one with "
                         "logits_cache.write_cache(path, teacher_cfg, teacher_params, batches, "
                         "k=...)")
    if not meta.get("complete"):
        raise ValueError(f"the logits cache at {url} is incomplete ({METADATA} says complete="
                         "false): its writing was interrupted or is still running; wait for "
                         "it, or run write_cache again with overwrite=True")
    return CacheInfo.from_json(url, meta)


class CacheSource:
    """grain `RandomAccessDataSource` over the rows of a cache: row i -> {field: array}.

    Arrays are opened lazily and reopened after pickling, so grain worker processes each get
    their own tensorstore handles.
    """

    def __init__(self, info: CacheInfo):
        self.info = info
        self._stores: dict[str, ts.TensorStore] | None = None

    def __len__(self) -> int:
        return self.info.n_rows

    def __getitem__(self, row: int) -> Batch:
        if not 0 <= row < self.info.n_rows:
            raise IndexError(f"row {row} is outside the cache's {self.info.n_rows} rows")
        if self._stores is None:
            self._stores = _open_arrays(self.info, 1, create=False)
        rows = _read_rows(self.info, self._stores, int(row), int(row) + 1)
        return {name: value[0] for name, value in rows.items()}

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info, "_stores": None}

    def __repr__(self) -> str:
        return f"CacheSource({self.info.path!r}, rows={self.info.n_rows})"


def read_rows(info: CacheInfo, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every field, in one read each (tests, inspection)."""
    return _read_rows(info, _open_arrays(info, 1, create=False), start, stop)


def _read_rows(info: CacheInfo, stores: Mapping[str, ts.TensorStore], start: int, stop: int
               ) -> Batch:
    """Rows [start, stop) of every field, each row's checksum verified by tensorstore as it
    is read; a damaged or lost row, or a teacher index outside the vocabulary, is an error
    naming the cache, the field, the rows and the file."""
    reads = {name: store[start:stop].read() for name, store in stores.items()}
    rows = {}
    for name, future in reads.items():
        try:
            rows[name] = future.result()
        except ValueError as e:
            raise ValueError(f"the logits cache at {info.path} is corrupt: {name!r} rows "
                             f"[{start}, {stop}) cannot be read back intact ({e}); "
                             f"{_REWRITE}") from e
    token_ids.check(rows["teacher_idx"], info.vocab_size,
                    where=f"the logits cache at {info.path} is corrupt: 'teacher_idx' rows "
                    f"[{start}, {stop})", fix=_REWRITE)
    return rows


def cache_dataset(path: str | CacheInfo, *, global_batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  read_threads: int = 16) -> grain.IterDataset:
    """This host's batches from a cache: dicts of `tokens`, `segment_ids`, `positions` [b, L]
    int32 and `teacher_idx`, `teacher_logprobs` [b, L, k], b = global_batch_size / hosts.

    Host i reads rows i, i + n, i + 2n, ... (shards default to JAX's process index and
    count), shuffled by `seed` afresh each epoch; `num_epochs=None` repeats forever. A last
    partial batch is dropped, so every host yields the same number of batches. Deterministic
    given `seed`; `iter(dataset)` has `get_state()`/`set_state()` for checkpoints.
    """
    info = path if isinstance(path, CacheInfo) else open_cache(path)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} does not split over "
                         f"{shard_count} hosts; use a multiple of {shard_count}")
    host_batch = global_batch_size // shard_count
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; use a positive count, or None for endless")
    rows = grain.MapDataset.source(CacheSource(info))[shard_index::shard_count]
    if len(rows) < host_batch:
        raise ValueError(f"the cache at {info.path} has {len(rows)} rows for host "
                         f"{shard_index} of {shard_count}, fewer than one batch of "
                         f"{host_batch}; cache more batches or lower the batch size")
    if shuffle:
        rows = rows.shuffle(seed)
    stream = rows.repeat(num_epochs).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads,
                          prefetch_buffer_size=max(2 * host_batch, read_threads)))
    return stream.batch(host_batch, drop_remainder=True)


__all__ = [
    "FORMAT",
    "LOGPROB_DTYPES",
    "MODES",
    "CacheInfo",
    "CacheSource",
    "bytes_per_token",
    "cache_dataset",
    "check_distill_config",
    "host_row_range",
    "open_cache",
    "read_rows",
    "teacher_targets",
    "write_cache",
]
