"""Checkpoints round-trip bit for bit, move between meshes, and fail loudly instead of lying."""

import gc
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from cascade_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _state(seed: int = 0) -> TrainState:
    """float32 (with NaN and -0.0), bfloat16 and int32 leaves, nested dicts, and the namedtuples,
    empty states and masked nodes of a clipped, masked adamw."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, 32)).astype(np.float32)  # > 1 KiB: its own data file on disk
    w[0, :2] = [np.nan, -0.0]
    params = {"w": jnp.asarray(w),
              "blocks": {"scale": jnp.asarray(rng.standard_normal(8), jnp.bfloat16),
                         "ids": jnp.arange(5, dtype=jnp.int32) + seed}}
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    return TrainState(step=jnp.int32(seed), params=params, opt_state=opt.init(params))


def _target(tree, sharding=None):
    """The abstract tree restore wants: each leaf's shape and dtype, on `sharding` (default:
    where the leaf lives now)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sharding or x.sharding), tree)


def _assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _dataset_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_round_trip_is_bit_identical(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(7, state)
    restored = checkpoint.restore(tmp_path, _target(state))
    assert restored.step == 7
    _assert_bit_identical(restored.state, state)
    # Real arrays work as a target too, and a target dtype different from the saved one casts.
    as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
    params = checkpoint.restore(tmp_path, {"params": as_f32}, partial=True).state["params"]
    assert params["blocks"]["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(params["blocks"]["scale"], as_f32["blocks"]["scale"])


def test_iterator_position_is_captured_when_save_returns(tmp_path):
    iterator = _dataset_iterator()
    for _ in range(5):
        next(iterator)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(), data_iterator=iterator)
        for _ in range(10):  # while the async save may still be writing
            next(iterator)
    fresh = _dataset_iterator()
    checkpoint.restore(tmp_path, _target(_state()), data_iterator=fresh)
    assert [next(fresh) for _ in range(3)] == [5, 6, 7]


def test_metadata_round_trip_and_non_json_metadata_is_refused(tmp_path):
    lineage = {"parent": "/runs/root/ckpt/400", "config": {"d_model": 64, "n_layers": [2, 3]},
               "tokens_seen": 123_456_789_012, "git": "2c85a69", "pruned": None, "kd": True}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(), metadata=lineage)
        ckpt.save(2, _state(), metadata={**lineage, "tokens_seen": 1})
        with pytest.raises(TypeError, match="JSON-serialisable"):
            ckpt.save(3, _state(), metadata={"scores": np.zeros(3)})
    assert checkpoint.read_metadata(tmp_path, step=1) == lineage
    assert checkpoint.read_metadata(tmp_path)["tokens_seen"] == 1
    assert checkpoint.restore(tmp_path, _target(_state()), step=1).metadata == lineage
    assert checkpoint.all_steps(tmp_path) == [1, 2]


def _check_restore_into_other_shardings(directory: str) -> None:
    """Saved from a 2×4 mesh; restored onto one device, and onto a 4×2 mesh with the same and
    with reversed partition specs. Needs 8 devices (a subprocess when the test has fewer)."""
    devices = np.array(jax.devices()[:8])
    mesh24 = Mesh(devices.reshape(2, 4), ("data", "model"))
    mesh42 = Mesh(devices.reshape(4, 2), ("data", "model"))
    values = {"w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16),
              "b": np.linspace(-1, 1, 8).astype(jnp.bfloat16), "n": np.int32(3)}
    specs = {"w": P("data", "model"), "b": P("model"), "n": P()}
    saved = {k: jax.device_put(v, NamedSharding(mesh24, specs[k])) for k, v in values.items()}
    assert saved["w"].addressable_shards[0].data.shape == (4, 4)
    checkpoint.save(directory, 1, saved)

    def on_mesh42(spec_of):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                        sharding=NamedSharding(mesh42, spec_of(specs[k])))
                for k, v in saved.items()}

    w_shard_shapes = {(8, 16): _target(saved, SingleDeviceSharding(jax.devices()[0])),
                      (2, 8): on_mesh42(lambda spec: spec),
                      (4, 4): on_mesh42(lambda spec: P(*reversed(spec)))}
    for w_shard_shape, target in w_shard_shapes.items():
        restored = checkpoint.restore(directory, target).state
        for name, array in restored.items():
            assert array.sharding == target[name].sharding, name
            np.testing.assert_array_equal(np.asarray(array), values[name])
        assert restored["w"].addressable_shards[0].data.shape == w_shard_shape


def test_restore_into_other_shardings(tmp_path):
    if len(jax.devices()) >= 8:
        _check_restore_into_other_shardings(str(tmp_path))
        return
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = (f"import runpy; runpy.run_path({__file__!r})"
            f"['_check_restore_into_other_shardings']({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_half_written_steps_are_ignored(tmp_path):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step))
    # Killed before orbax's final rename: the step still sits in its tmp directory.
    (tmp_path / "3").rename(tmp_path / "3.orbax-checkpoint-tmp")
    # Written in place but never committed (GCS-style), and an empty stray directory.
    shutil.copytree(tmp_path / "2", tmp_path / "4")
    (tmp_path / "4" / "commit_success.txt").unlink()
    (tmp_path / "5").mkdir()

    assert checkpoint.latest_step(tmp_path) == 2
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(_target(_state()))
        assert restored.step == 2
        _assert_bit_identical(restored.state, _state(2))
        for step in (4, 5):
            with pytest.raises(checkpoint.CheckpointError,
                               match=rf"{tmp_path / str(step)} already exists \(incomplete"):
                ckpt.save(step, _state())
        assert ckpt.save(3, _state(3))  # the stale tmp directory is replaced, not an obstacle
    assert checkpoint.latest_step(tmp_path) == 3


def test_existing_steps_are_never_overwritten(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
    before = _files(tmp_path)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path / '2'} already exists"):
            ckpt.save(2, _state(9))
        with pytest.raises(checkpoint.CheckpointError, match=r"later steps \[1, 2\]"):
            ckpt.save(0, _state(9), force=True)
    with (checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt,
          pytest.raises(checkpoint.CheckpointError, match="read_only")):
        ckpt.save(3, _state(9))
    assert _files(tmp_path) == before


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# When one array read fails, orbax abandons its sibling reads, whose errors then surface as
# "exception ignored in coroutine" noise at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, pathlib.Path.unlink])
def test_damaged_step_fails_clearly_and_deletes_nothing(tmp_path, damage):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
    data_files = (tmp_path / "2" / "state").glob("ocdbt.process_*/d/*")
    damage(max(data_files, key=lambda p: p.stat().st_size))  # the 4 KiB `w`, no other leaf
    before = _files(tmp_path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"step 2 from {tmp_path / '2'}.*restore an earlier step with step=1"):
        checkpoint.restore(tmp_path, _target(_state()))
    gc.collect()  # those abandoned reads, while this test's warning filter applies
    assert _files(tmp_path) == before
    _assert_bit_identical(checkpoint.restore(tmp_path, _target(_state()), step=1).state,
                          _state(1))


def test_max_to_keep_and_save_interval(tmp_path):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.save(step, _state())]
        assert ckpt.save(9, _state(), force=True)
    assert saved == [1, 2, 4, 6]  # orbax always saves a run's first step
    assert checkpoint.all_steps(tmp_path) == [6, 9]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "9"]


def test_targets_that_do_not_fit_are_named(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, 1, state)
    wrong = _target(state).replace(step=jax.ShapeDtypeStruct((2,), jnp.int32,
                                                             sharding=state.step.sharding))
    with pytest.raises(ValueError, match=r"step: target shape \(2,\) but saved \(\)"):
        checkpoint.restore(tmp_path, wrong)
    with pytest.raises(ValueError, match=r"opt_state\.1\.0\.count: in the checkpoint but not"):
        checkpoint.restore(tmp_path, {"params": _target(state.params)})
    with pytest.raises(ValueError, match=r"leaf params\.w \(32, 32\) float32 has no sharding"):
        checkpoint.restore(tmp_path, {"params": {"w": jax.ShapeDtypeStruct((32, 32),
                                                                          jnp.float32)}},
                           partial=True)
    with pytest.raises(ValueError, match="holds no data iterator state"):
        checkpoint.restore(tmp_path, _target(state), data_iterator=_dataset_iterator())
    assert jax.tree.map(lambda s: s.shape, checkpoint.abstract_state(tmp_path)["params"]) == {
        "w": (32, 32), "blocks": {"scale": (8,), "ids": (5,)}}
    assert checkpoint.latest_step(tmp_path / "missing") is None
    with pytest.raises(checkpoint.CheckpointError, match=r"complete steps: \[1\]"):
        checkpoint.read_metadata(tmp_path, step=5)
