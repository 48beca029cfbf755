"""One process of the multi-process distillation run that `test_multihost.py` launches.

    python tests/multihost_worker.py <process_id> <num_processes> <port> <out.npz>

Each process sees its own virtual CPU devices (the launcher sets
`--xla_force_host_platform_device_count`), joins the others through `jax.distributed` on
loopback with gloo CPU collectives, builds the global `data × fsdp × tensor` mesh, feeds only
its own rows of every batch, and runs `STEPS` distillation steps. Process 0 writes the losses
and the gathered final params. `run` is also what the test calls in a single process, so both
sides execute the same code.
"""

from __future__ import annotations

import itertools
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from cascade_jax import model, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses, step
from cascade_jax.prune.importance import params_fingerprint

STUDENT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=48)
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64)
# Everything the step can do at once: a wider, deeper teacher, hidden states through a
# projection, and gradient accumulation.
DCFG = step.DistillConfig(STUDENT, TEACHER, losses.LossSpec(chunk_size=8),
                          hidden=step.HiddenDistill((0, 2), 0.5), grad_accum=2)
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STEPS, ROWS, LENGTH = 3, 8, 16


def global_batch(step_index: int) -> dict[str, np.ndarray]:
    """The whole batch of one step (every process can make it; each feeds only its rows)."""
    rng = np.random.default_rng(step_index)
    tokens = rng.integers(0, STUDENT.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    segment_ids = np.ones((ROWS, LENGTH), np.int32)
    segment_ids[:, LENGTH // 2:] = 2
    segment_ids[::3, -3:] = 0
    positions = np.asarray(model.positions_from_segments(segment_ids), np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def process_rows(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
                 ) -> dict[str, np.ndarray]:
    """The rows of `batch` that this process's devices hold under the batch sharding."""
    rows = batch["tokens"].shape[0]
    indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((rows, 1))
    ranges = sorted({(index[0].start or 0, index[0].stop or rows) for index in indices.values()})
    for (_, stop), (start, _) in itertools.pairwise(ranges):
        if start != stop:
            raise AssertionError(f"this process's rows {ranges} are not contiguous")
    return {name: value[ranges[0][0]:ranges[-1][1]] for name, value in batch.items()}


def run(mesh: jax.sharding.Mesh) -> tuple[list[float], dict[str, np.ndarray], str]:
    """(loss per step, final student params gathered to host, flattened by key path, their
    `params_fingerprint` taken on the sharded params, which every process must agree on)."""
    optimizer = steps.make_optimizer(lr=1e-2, total_steps=10, warmup_steps=1)
    state = step.create_state(DCFG, optimizer, mesh, rng=jax.random.key(0))
    teacher = sharding.init_params(TEACHER, jax.random.key(1), mesh)
    step_fn = step.jit_train_step(DCFG, optimizer, mesh)
    losses_ = []
    for i in range(STEPS):
        local = process_rows(global_batch(i), mesh)
        state, metrics = step_fn(state, teacher, sharding.shard_batch(local, mesh))
        losses_.append(float(metrics["loss_sum"]) / float(metrics["count"]))
    fingerprint = params_fingerprint(state.params)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    return losses_, flat, fingerprint


def main(argv: list[str]) -> None:
    process_id, num_processes, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    try:
        mesh = sharding.make_mesh(**MESH)
        losses_, params, fingerprint = run(mesh)
        if jax.process_index() == 0:
            np.savez(out, losses=np.asarray(losses_), **{f"param:{k}": v
                                                          for k, v in params.items()})
        print(f"process {process_id}/{num_processes}: {jax.local_device_count()} local of "
              f"{jax.device_count()} devices, losses {losses_}, params fingerprint "
              f"{fingerprint}", flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
