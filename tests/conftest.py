"""Test-wide setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

XLA reads the flag once, when jax initialises its backend, so it must be set before any test
module imports jax (nothing imported here imports jax). Single-device computations still run
on device 0.
"""

import os
import shutil

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """Real text: 40 of this Python's own stdlib modules, with a 320-token BPE trained on
    them (`tokenizer.json` beside them). Shared by the tests that run whole jobs."""
    from cascade_jax import data

    directory = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(sorted(data.builtin_corpus_files("train"))[:40]):
        shutil.copy(path, directory / f"m{i:02d}.py")
    tokenizer = data.train_tokenizer([str(p) for p in sorted(directory.glob("*.py"))],
                                     vocab_size=320)
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)
