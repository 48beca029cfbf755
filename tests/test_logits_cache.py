"""The offline teacher cache and the step it feeds: exact round trip, incomplete caches refused
with the path named, disjoint per-host rows, a deterministic checkpointable grain reader, and
the proof that matters: with top-k over the whole vocabulary (k = V) the cached step IS the
online step, in loss and in updated params."""

import functools
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from cascade_jax import logits_cache, loop, model, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses, step
from cascade_jax.metrics import MetricWriter, read_metrics

STUDENT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=48)
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64)
SPEC = losses.LossSpec(chunk_size=8)  # L = 16: two chunks, in the cache writer and the loss
ROWS, LENGTH, N_BATCHES = 8, 16, 3
V = STUDENT.vocab_size
_STATIC = ("cfg", "k", "mode", "temperature", "chunk_size")


def _batch(seed, rows=ROWS, length=LENGTH):
    """Random tokens, two packed documents per row and padding in some rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (rows, length)).astype(np.int32)
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[:, length // 2:] = 2
    for row in range(0, rows, 3):
        segment_ids[row, length - 3 - row % 5:] = 0
    tokens[segment_ids == 0] = 0
    positions = np.asarray(model.positions_from_segments(segment_ids), np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


BATCHES = [_batch(seed) for seed in range(N_BATCHES)]


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _write(path, teacher, batches=BATCHES, **kwargs):
    kwargs = {"k": V, "chunk_size": 8, "progress": False, **kwargs}
    return logits_cache.write_cache(str(path), TEACHER, teacher, batches, **kwargs)


@pytest.fixture(scope="module")
def teacher():
    return model.init(TEACHER, jax.random.key(1))


@pytest.fixture(scope="module")
def full_cache(teacher, tmp_path_factory):
    """Top-k over the whole vocabulary (k = V), float32."""
    return _write(tmp_path_factory.mktemp("cache") / "full", teacher)


@pytest.fixture(scope="module")
def optimizer():
    return steps.make_optimizer(lr=1e-2, total_steps=100, warmup_steps=2)


# ------------------------------------------------------------------------ writing, reading


def test_round_trip_gives_back_exactly_what_was_written(teacher, full_cache):
    info = logits_cache.open_cache(full_cache.path)
    assert info == full_cache and info.complete
    assert (info.n_rows, info.seq_len, info.k, info.mode) == (N_BATCHES * ROWS, LENGTH, V, "topk")
    assert info.teacher == TEACHER and info.vocab_size == V and len(info.fingerprint) == 16
    rows = logits_cache.read_rows(info, 0, info.n_rows)
    targets = jax.jit(logits_cache.teacher_targets, static_argnames=_STATIC)
    for b, batch in enumerate(BATCHES):
        got = {name: value[b * ROWS:(b + 1) * ROWS] for name, value in rows.items()}
        for name in logits_cache.TOKEN_FIELDS:
            np.testing.assert_array_equal(got[name], batch[name])
        idx, logprobs = targets(TEACHER, teacher, batch, k=V, chunk_size=8)
        np.testing.assert_array_equal(got["teacher_idx"], idx)
        np.testing.assert_array_equal(got["teacher_logprobs"], logprobs)
        assert got["teacher_idx"].dtype == np.int32
        assert got["teacher_logprobs"].dtype == np.float32
    # and they are the teacher's log-softmax, sorted: a sanity check of what was exact above
    logits = model.forward(TEACHER, teacher, *BATCHES[0].values())
    expected_idx, expected_lp = losses.top_k_teacher_targets(logits, V)
    np.testing.assert_array_equal(rows["teacher_idx"][:ROWS], expected_idx)
    np.testing.assert_allclose(rows["teacher_logprobs"][:ROWS], expected_lp, atol=1e-5)


def test_bfloat16_targets_and_bytes_per_token(teacher, tmp_path):
    info = _write(tmp_path / "bf16", teacher, k=8, logprob_dtype="bfloat16")
    rows = logits_cache.read_rows(info, 0, ROWS)
    idx, logprobs = losses.top_k_teacher_targets(
        model.forward(TEACHER, teacher, *BATCHES[0].values()), 8)
    assert rows["teacher_logprobs"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(rows["teacher_idx"], idx)
    np.testing.assert_allclose(rows["teacher_logprobs"].astype(np.float32), logprobs,
                               rtol=1e-2)  # bf16: 8 mantissa bits
    assert logits_cache.bytes_per_token(info) == 8 * (4 + 2) + 3 * 4
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(info.path)
                  for f in fs if "/c/" in os.path.join(d, f) + "/")
    payload = info.n_rows * info.seq_len * logits_cache.bytes_per_token(info)
    per_row = 5 * (16 + 4)  # each field's row: its chunk-index entry and its CRC-32C
    overhead = info.n_rows * per_row
    assert payload + overhead <= on_disk <= 1.01 * (payload + overhead)


def test_stops_at_max_batches_or_when_the_batches_run_out(teacher, tmp_path):
    """A generator has no len(): max_batches is required; fewer batches trim the arrays."""
    with pytest.raises(ValueError, match="pass max_batches=N"):
        _write(tmp_path / "a", teacher, batches=iter(BATCHES))
    pulled = []

    def counting():
        for b in BATCHES:
            pulled.append(b)
            yield b

    info = _write(tmp_path / "b", teacher, batches=counting(), max_batches=2)
    assert info.n_rows == 2 * ROWS and len(pulled) == 2  # never pulls a batch it won't use
    info = _write(tmp_path / "c", teacher, batches=iter(BATCHES[:2]), max_batches=5)
    assert info.n_rows == 2 * ROWS
    rows = logits_cache.read_rows(info, 0, info.n_rows)
    np.testing.assert_array_equal(rows["tokens"][ROWS:], BATCHES[1]["tokens"])


# --------------------------------------------------------------------- incomplete caches


def test_incomplete_cache_is_a_clear_error_naming_the_path(teacher, tmp_path):
    path = str(tmp_path / "crashed")

    def crashing():
        yield BATCHES[0]
        raise RuntimeError("preempted")

    with pytest.raises(RuntimeError, match="preempted"):
        _write(path, teacher, batches=crashing(), max_batches=3)
    with pytest.raises(ValueError, match=f"logits cache at {path} is incomplete .*complete="
                                         "false"):
        logits_cache.open_cache(path)
    with pytest.raises(ValueError, match="is incomplete"):
        logits_cache.cache_dataset(path, global_batch_size=ROWS, seed=0)
    os.remove(os.path.join(path, "metadata.json"))  # killed before host 0 wrote anything
    with pytest.raises(ValueError, match=f"logits cache at {path} is incomplete \\(no "
                                         "metadata.json\\)"):
        logits_cache.open_cache(path)
    with pytest.raises(ValueError, match=f"no logits cache at {tmp_path}/nothing"):
        logits_cache.open_cache(str(tmp_path / "nothing"))
    # a crashed cache is rewritten in place, with no overwrite=True needed
    info = _write(path, teacher, batches=BATCHES[:1])
    assert logits_cache.open_cache(path).n_rows == info.n_rows == ROWS


def test_a_complete_cache_is_not_overwritten_by_accident(teacher, full_cache):
    with pytest.raises(ValueError, match=r"already holds a complete logits cache.*"
                                         r"overwrite=True"):
        _write(full_cache.path, teacher)


# ------------------------------------------------------------------------- damaged caches


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def small_cache(teacher, tmp_path):
    """Two batches, top-8, float32: file c/1/0/0 of each field holds rows [8, 16)."""
    return _write(tmp_path / "small", teacher, batches=BATCHES[:2], k=8)


def test_flipped_bytes_in_a_target_chunk_are_an_error_naming_file_and_rows(small_cache,
                                                                            tree_hash):
    """Without the per-row CRC-32C these rows read back silently, a few nats off."""
    chunk = os.path.join(small_cache.path, "teacher_logprobs", "c", "1", "0", "0")
    _flip_byte(chunk, 4 * LENGTH * 8 + 4 + 2)  # inside row 9 (row 1 of the file's 8)
    before = tree_hash(small_cache.path)
    clean = logits_cache.read_rows(small_cache, 0, ROWS)  # the other file is intact
    assert clean["teacher_logprobs"].shape == (ROWS, LENGTH, 8)
    message = (f"logits cache at {small_cache.path} is corrupt: 'teacher_logprobs' rows "
               r"\[8, 16\) .*" + chunk + r".*write_cache\(..., overwrite=True\)")
    with pytest.raises(ValueError, match=message):
        logits_cache.read_rows(small_cache, ROWS, 2 * ROWS)
    source = logits_cache.CacheSource(small_cache)
    assert source[8]["tokens"].shape == (LENGTH,)  # row 8 is intact: rows are checked alone
    with pytest.raises(ValueError, match=r"'teacher_logprobs' rows \[9, 10\) .*Digest"):
        source[9]
    batches = logits_cache.cache_dataset(small_cache, global_batch_size=2 * ROWS, seed=0,
                                         num_epochs=1, shard_index=0, shard_count=1)
    with pytest.raises(Exception, match="is corrupt"):  # grain may wrap it
        list(batches)
    assert tree_hash(small_cache.path) == before


def test_a_lost_chunk_file_is_an_error_not_zeros(small_cache, tree_hash):
    os.remove(os.path.join(small_cache.path, "teacher_idx", "c", "0", "0", "0"))
    before = tree_hash(small_cache.path)
    with pytest.raises(ValueError, match=r"'teacher_idx' rows \[0, 1\) .*missing"):
        logits_cache.CacheSource(small_cache)[0]
    assert tree_hash(small_cache.path) == before


def test_padding_rows_are_stored_so_they_read_back(teacher, tmp_path):
    """All-zero rows equal zarr's fill value; they must be written, or a strict read (one that
    refuses lost rows) would take them for lost."""
    batch = {k: v.copy() for k, v in BATCHES[0].items()}
    batch["segment_ids"][-1] = 0
    batch["tokens"][-1] = 0
    batch["positions"][-1] = 0
    info = _write(tmp_path / "padded", teacher, batches=[batch], k=4)
    rows = logits_cache.read_rows(info, 0, ROWS)
    assert not rows["segment_ids"][-1].any() and not rows["positions"][-1].any()


def test_a_cache_of_the_format_before_checksums_reads_with_a_warning(small_cache):
    meta_path = os.path.join(small_cache.path, "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["format"] = "cascade_jax.logits_cache/1"
    del meta["checksums"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="predates per-row checksums.*write it again"):
        info = logits_cache.open_cache(small_cache.path)
    assert info.checksums is None
    np.testing.assert_array_equal(logits_cache.read_rows(info, 0, ROWS)["tokens"],
                                  BATCHES[0]["tokens"])


# ---------------------------------------------------------------------------- many hosts


def test_host_row_ranges():
    # 2 hosts × 4 rows: batch 0 is rows 0-3 (host 0) and 4-7 (host 1), batch 1 rows 8-15
    assert logits_cache.host_row_range(0, 4, 0, 2) == (0, 4)
    assert logits_cache.host_row_range(0, 4, 1, 2) == (4, 8)
    assert logits_cache.host_row_range(1, 4, 0, 2) == (8, 12)
    assert logits_cache.host_row_range(2, 4, 1, 2) == (20, 24)


def test_simulated_hosts_write_disjoint_rows_and_host_0_commits(teacher, full_cache,
                                                                tmp_path):
    """Host i feeds rows [4i, 4i + 4) of every global batch; host 1 runs first (it must not
    make the cache readable), host 0 last (it checks host 1's report and commits)."""
    path = tmp_path / "hosts"
    half = ROWS // 2
    per_host = [[{k: v[i * half:(i + 1) * half] for k, v in b.items()} for b in BATCHES]
                for i in range(2)]
    pending = _write(path, teacher, batches=per_host[1], process_index=1, process_count=2)
    assert not pending.complete
    with pytest.raises(ValueError, match="is incomplete"):
        logits_cache.open_cache(str(path))
    info = _write(path, teacher, batches=per_host[0], process_index=0, process_count=2)
    assert info.complete and info.n_rows == N_BATCHES * ROWS and info.rows_per_batch == ROWS
    assert info.fingerprint == full_cache.fingerprint  # same teacher, tokens and layout
    rows = logits_cache.read_rows(info, 0, info.n_rows)
    reference = logits_cache.read_rows(full_cache, 0, full_cache.n_rows)
    np.testing.assert_array_equal(rows["tokens"], np.concatenate([b["tokens"]
                                                                  for b in BATCHES]))
    np.testing.assert_array_equal(rows["teacher_idx"], reference["teacher_idx"])
    np.testing.assert_allclose(rows["teacher_logprobs"], reference["teacher_logprobs"],
                               rtol=1e-6, atol=1e-6)
    # Overwritten with the same settings while host 1 dies: its report from the run above
    # must not vouch for it.
    with pytest.raises(ValueError, match="host 1 of 2 did not finish writing its rows"):
        _write(path, teacher, batches=per_host[0], process_index=0, process_count=2,
               overwrite=True)


def test_host_0_refuses_to_commit_without_every_host(teacher, tmp_path):
    path = tmp_path / "missing_host"
    half = [{k: v[:ROWS // 2] for k, v in b.items()} for b in BATCHES[:1]]
    with pytest.raises(ValueError, match="host 1 of 2 did not finish writing its rows"):
        _write(path, teacher, batches=half, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="is incomplete"):
        logits_cache.open_cache(str(path))


# -------------------------------------------------------------------------------- reading


def _epoch(dataset):
    return list(dataset)


def test_dataset_one_pass_in_order_equals_the_cache(full_cache):
    dataset = logits_cache.cache_dataset(full_cache.path, global_batch_size=ROWS, seed=0,
                                         shuffle=False, num_epochs=1)
    batches = _epoch(dataset)
    assert len(batches) == N_BATCHES
    rows = logits_cache.read_rows(full_cache, 0, full_cache.n_rows)
    for b, batch in enumerate(batches):
        assert sorted(batch) == sorted([*logits_cache.TOKEN_FIELDS,
                                        *logits_cache.TARGET_FIELDS])
        for name, value in batch.items():
            np.testing.assert_array_equal(value, rows[name][b * ROWS:(b + 1) * ROWS])
    assert batches[0]["teacher_idx"].shape == (ROWS, LENGTH, V)


def test_dataset_is_deterministic_sharded_and_checkpointable(full_cache):
    def make(seed, **kwargs):
        return logits_cache.cache_dataset(full_cache, global_batch_size=4, seed=seed,
                                          **kwargs)

    def first_tokens(dataset, n):
        it = iter(dataset)
        return [next(it)["tokens"] for _ in range(n)]

    a, b, c = first_tokens(make(3), 8), first_tokens(make(3), 8), first_tokens(make(4), 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # one epoch = 6 batches of 4: every row exactly once, in shuffled order
    rows = logits_cache.read_rows(full_cache, 0, full_cache.n_rows)["tokens"]
    epoch = np.concatenate(a[:6])
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, rows))
    assert not np.array_equal(epoch, rows)
    # 2 hosts: disjoint halves (2 rows per host per global batch of 4), together every row
    hosts = [np.concatenate([b["tokens"] for b in _epoch(make(3, num_epochs=1, shard_index=i,
                                                              shard_count=2))])
             for i in range(2)]
    assert all(h.shape == (N_BATCHES * ROWS // 2, LENGTH) for h in hosts)
    assert sorted(map(bytes, np.concatenate(hosts))) == sorted(map(bytes, rows))
    # resume: a fresh iterator set to a saved state continues exactly where the first was
    it = iter(make(5))
    for _ in range(7):  # across the epoch boundary
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(make(5))
    resumed.set_state(state)
    for want in expected:
        jax.tree.map(np.testing.assert_array_equal, next(resumed), want)
    with pytest.raises(ValueError, match="global_batch_size=5 does not split over 2 hosts"):
        logits_cache.cache_dataset(full_cache, global_batch_size=5, seed=0, shard_index=0,
                                   shard_count=2)


# ------------------------------------------------------------------ the cached step itself


def _without_targets(batch):
    return {k: v for k, v in batch.items() if k not in step.CACHED_KEYS}


def test_k_equals_vocab_cached_step_equals_online_step(teacher, full_cache, optimizer):
    """3 AdamW steps with grad_accum = 2, float32, from one init over the cache's batches:
    online (`jit_train_step`, teacher forward in the step) vs cached (`jit_train_step_cached`,
    top-k with k = V). Tolerances: every metric rtol 1e-5; params rtol 1e-4 / atol 1e-6, as
    the sharded-vs-single test (the same sums in another order: the teacher's k = V entries
    come sorted by probability, not by token id)."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC, grad_accum=2)
    logits_cache.check_distill_config(full_cache, dcfg)
    state0 = _host(step.create_state(dcfg, optimizer, mesh, rng=jax.random.key(0)))
    online, cached = step.jit_train_step(dcfg, optimizer, mesh), \
        step.jit_train_step_cached(dcfg, optimizer, mesh)
    state_on, state_c = state0, _host(state0)
    batches = _epoch(logits_cache.cache_dataset(full_cache, global_batch_size=ROWS, seed=0,
                                                shuffle=False, num_epochs=1))
    for batch in batches:
        state_on, m_on = online(state_on, teacher, _without_targets(batch))
        state_c, m_c = cached(state_c, batch)
        assert sorted(m_c) == sorted(m_on)
        for name in m_on:
            np.testing.assert_allclose(m_c[name], m_on[name], rtol=1e-5, err_msg=name)
    assert int(state_c.step) == N_BATCHES
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state_c.params), jax.device_get(state_on.params))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                         jax.device_get(state_c.params), state0.params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # the steps did change every param


def test_k_equals_vocab_matches_any_divergence_and_temperature(teacher, full_cache):
    """Loss sum and gradient at one point for JSD(0.3), T = 2, half CE: the same identity."""
    spec = losses.LossSpec(kind="jsd", beta=0.3, temperature=2.0, alpha=0.5, chunk_size=8)
    dcfg = step.DistillConfig(STUDENT, TEACHER, spec)
    params = model.init(STUDENT, jax.random.key(3))
    batch = logits_cache.read_rows(full_cache, ROWS, 2 * ROWS)
    online = jax.jit(jax.grad(functools.partial(step.loss_sum_and_metrics, dcfg),
                              has_aux=True))(params, teacher, _without_targets(batch))
    cached = jax.jit(jax.grad(functools.partial(step.cached_loss_sum_and_metrics, dcfg),
                              has_aux=True))(params, batch)
    for name, value in online[1].items():
        np.testing.assert_allclose(cached[1][name], value, rtol=1e-5, err_msg=name)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(online[0]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
                 cached[0], online[0])


def test_sharded_cache_and_cached_step_equal_one_device(teacher, full_cache, optimizer,
                                                        tmp_path):
    """Teacher pass on a 2×2×2 mesh writes the same targets; the cached step on that mesh
    gives the one-device losses (rtol 1e-5) and params (rtol 1e-4, atol 1e-6)."""
    mesh8 = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    placed = sharding.shard_like(teacher, sharding.param_shardings(TEACHER, mesh8))
    info = _write(tmp_path / "mesh", placed, batches=BATCHES[:2], mesh=mesh8)
    rows = logits_cache.read_rows(info, 0, info.n_rows)
    reference = logits_cache.read_rows(full_cache, 0, info.n_rows)
    np.testing.assert_array_equal(rows["teacher_idx"], reference["teacher_idx"])
    np.testing.assert_allclose(rows["teacher_logprobs"], reference["teacher_logprobs"],
                               rtol=1e-5, atol=1e-5)

    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC)
    mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
    state0 = _host(step.create_state(dcfg, optimizer, mesh1, rng=jax.random.key(0)))
    results = []
    for mesh in (mesh1, mesh8):
        state = sharding.shard_like(_host(state0),
                                    step.state_shardings(dcfg, optimizer, mesh))
        step_fn, seen = step.jit_train_step_cached(dcfg, optimizer, mesh), []
        for b in range(2):
            batch = {k: v[b * ROWS:(b + 1) * ROWS] for k, v in rows.items()}
            state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
            seen.append(float(metrics["loss_sum"] / metrics["count"]))
        results.append((seen, jax.device_get(state.params)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[1][1], results[0][1])


def test_fit_drives_the_cached_step_from_the_dataset(full_cache, optimizer, tmp_path):
    """The end-to-end path: cache_dataset's iterator -> loop.fit -> jit_train_step_cached."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC)
    state = step.create_state(dcfg, optimizer, mesh, rng=jax.random.key(0))
    batches = iter(logits_cache.cache_dataset(full_cache, global_batch_size=ROWS, seed=1))
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        state, tokens = loop.fit(step.jit_train_step_cached(dcfg, optimizer, mesh), state,
                                  batches, mesh=mesh, total_steps=4, writer=writer,
                                  log_every=2, progress=False)
    assert int(state.step) == 4
    assert 0.5 * 4 * ROWS * LENGTH < tokens < 4 * ROWS * LENGTH  # non-padding tokens
    logged = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in logged] == [2, 4] and logged[-1]["loss"] < logged[0]["loss"]


def test_sampled_targets_are_teacher_draws_and_train(teacher, optimizer, tmp_path):
    info = _write(tmp_path / "sampled", teacher, batches=BATCHES[:1], k=4, mode="sampled",
                  temperature=2.0, seed=7)
    assert (info.mode, info.temperature, info.seed) == ("sampled", 2.0, 7)
    rows = logits_cache.read_rows(info, 0, ROWS)
    logits = np.asarray(model.forward(TEACHER, teacher, *BATCHES[0].values()), np.float64)
    tempered = logits / 2.0
    log_p = tempered - np.log(np.exp(tempered).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        rows["teacher_logprobs"], np.take_along_axis(log_p, rows["teacher_idx"], -1),
        atol=1e-5)
    assert len(np.unique(rows["teacher_idx"])) > 4  # draws, not one token repeated

    dcfg = step.DistillConfig(STUDENT, TEACHER, losses.LossSpec(temperature=2.0, chunk_size=8))
    logits_cache.check_distill_config(info, dcfg)
    with pytest.raises(ValueError, match=r"sampled at temperature=2\.0, the loss uses "
                                         r"temperature=1\.0"):
        logits_cache.check_distill_config(info, step.DistillConfig(STUDENT, TEACHER, SPEC))
    with pytest.raises(ValueError, match="forward KL only"):
        logits_cache.check_distill_config(info, step.DistillConfig(
            STUDENT, TEACHER, losses.LossSpec(kind="tvd", temperature=2.0)))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state = step.create_state(dcfg, optimizer, mesh, rng=jax.random.key(0))
    state, metrics = step.jit_train_step_cached(dcfg, optimizer, mesh, mode="sampled")(
        state, rows)
    assert np.isfinite(float(metrics["loss_sum"])) and float(metrics["grad_norm"]) > 0


# --------------------------------------------------------------------------- clear errors


def test_clear_errors(teacher, full_cache, optimizer, tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    hidden = step.DistillConfig(STUDENT, TEACHER, SPEC, hidden=step.HiddenDistill((0, 2)))
    with pytest.raises(ValueError, match="holds no teacher hidden states"):
        step.jit_train_step_cached(hidden, optimizer, mesh)
    with pytest.raises(ValueError, match="holds no teacher hidden states"):
        logits_cache.check_distill_config(full_cache, hidden)
    dcfg = step.DistillConfig(STUDENT, TEACHER, SPEC)
    with pytest.raises(ValueError, match=r"batch has no \['teacher_idx', 'teacher_logprobs'\]"):
        jax.eval_shape(functools.partial(step.compute_grads_cached, dcfg),
                       model.param_shapes(STUDENT), BATCHES[0])
    with pytest.raises(ValueError, match="mode='dense'; choose the cache's mode"):
        step.jit_train_step_cached(dcfg, optimizer, mesh, mode="dense")
    wide = step.DistillConfig(STUDENT.replace(vocab_size=80), TEACHER.replace(vocab_size=80))
    with pytest.raises(ValueError, match="student vocab_size=80 but the cache"):
        logits_cache.check_distill_config(full_cache, wide)
    for kwargs, message in [({"k": V + 1}, "k=65 must be in \\[1, vocab_size=64\\]"),
                            ({"mode": "dense"}, "mode='dense'; choose from"),
                            ({"temperature": 2.0}, "temperature=2.0 with mode='topk'"),
                            ({"logprob_dtype": "float16"}, "logprob_dtype='float16'")]:
        with pytest.raises(ValueError, match=message):
            _write(tmp_path / "bad", teacher, **kwargs)
    with pytest.raises(ValueError, match="nothing to cache"):
        _write(tmp_path / "empty", teacher, batches=[])
