"""Test-wide setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

XLA reads the flag once, when jax initialises its backend, so it must be set before any test
module imports jax (nothing imported here imports jax). Single-device computations still run
on device 0.
"""

import hashlib
import os
import shutil
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole session, shared by the xdist workers (they inherit
# the controller's environment) and by the jobs tests start in subprocesses: the suite
# compiles the same tiny steps many times (every resumed or restarted run, every notebook), and
# a cache hit skips XLA's compile, the slow part of CPU tests. A fresh directory per session,
# so no run depends on an earlier one; entries are keyed by the computation, flags and jax
# version, so a hit runs exactly the executable a fresh compile would produce.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cascade_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"


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


def _tree_hash(path) -> str:
    """sha256 of every file name and byte under `path` (or of the file `path`)."""
    digest = hashlib.sha256()
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        digest.update(os.path.relpath(root, path).encode() + b"/\0")
        for name in sorted(files):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture
def tree_hash():
    """`tree_hash(path)`: a digest of every name and byte under `path`. Equal before and after
    a refused call proves the refusal wrote, moved and deleted nothing."""
    return _tree_hash


# The longest single tests (1-3 min each on 2 cores), started first: xdist hands tests out in
# collection order, and one of these collected last (test_notebooks, test_reasoning sort late)
# leaves the other worker idle while it finishes. None shares a module fixture with its
# neighbours, so moving them costs no extra setup.
LONGEST_FIRST = ("test_reasoning.py::test_sampling_stages_resume_bit_identically",
                 "test_notebooks.py::test_notebook_runs", "test_multihost.py::")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: everything else keeps its order
