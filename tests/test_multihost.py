"""The distillation step across 2 processes (`jax.distributed` on loopback, gloo CPU
collectives, 4 virtual devices each) equals the same step in this one 8-device process.

Both sides run `multihost_worker.run` on a 2×2×2 mesh: a wider, deeper teacher, hidden-state
distillation through a projection, gradient accumulation over 2 micro-batches, 3 AdamW steps.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import multihost_worker
import numpy as np
import pytest

from cascade_jax import sharding

_HERE = os.path.dirname(os.path.abspath(__file__))
_TIMEOUT_S = 240  # generous: two processes compile on a shared 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(num_processes, devices_each, out, tmp_path):
    """Start the workers; on any failure or timeout kill them all and show their output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
               PYTHONPATH=os.pathsep.join([os.path.dirname(_HERE),
                                           os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    logs = [open(tmp_path / f"worker{i}.log", "w+")  # noqa: SIM115 (closed below)
            for i in range(num_processes)]
    procs = [subprocess.Popen([sys.executable, os.path.join(_HERE, "multihost_worker.py"),
                               str(i), str(num_processes), str(port), str(out)],
                              stdout=logs[i], stderr=subprocess.STDOUT, env=env)
             for i in range(num_processes)]
    try:
        codes = [proc.wait(timeout=_TIMEOUT_S) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = []
    for i, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- worker {i} ---\n{log.read()[-3000:]}")
        log.close()
    if codes is None:
        pytest.fail(f"workers did not finish in {_TIMEOUT_S} s\n" + "\n".join(output))
    if any(codes):
        pytest.fail(f"workers exited with {codes}\n" + "\n".join(output))
    return "\n".join(output)


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "multihost.npz"
    log = _launch(2, 4, out, tmp_path)
    assert "process 0/2: 4 local of 8 devices" in log
    assert "process 1/2: 4 local of 8 devices" in log
    fingerprints = re.findall(r"params fingerprint ([0-9a-f]{16})", log)
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # hosts agree

    assert len(jax.devices()) == 8  # the reference: the same mesh in this one process
    losses, params, _ = multihost_worker.run(sharding.make_mesh(**multihost_worker.MESH))
    result = np.load(out)
    # Tolerance: losses rtol 1e-5, params rtol 1e-4 / atol 1e-6 (gloo's all-reduce may add in
    # another order than the in-process one).
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    names = sorted(k[len("param:"):] for k in result.files if k.startswith("param:"))
    assert names == sorted(params)
    assert "['proj']" in names
    for name in names:
        np.testing.assert_allclose(result[f"param:{name}"], params[name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
