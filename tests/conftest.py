"""Test-wide setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

XLA reads the flag once, when jax initialises its backend, so it must be set before any test
module imports jax. Single-device computations still run on device 0.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
