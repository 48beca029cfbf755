"""The two layers import in one direction: pure steps never pull in the loop's I/O stack."""

import subprocess
import sys

import pytest

HEAVY = ("orbax", "grain", "tensorboardX")


@pytest.mark.parametrize("module", ["cascade_jax.steps", "cascade_jax.distill.step",
                                    "cascade_jax.distill", "cascade_jax.objectives",
                                    "cascade_jax.aot"])
def test_step_modules_load_no_orbax_grain_or_tensorboard(module):
    """A fresh interpreter (this one has imported everything already)."""
    code = (f"import sys, {module}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"


def test_the_loop_does_use_them():
    """The check above can fail: the loop module does load orbax (checkpoints)."""
    code = "import sys, cascade_jax.loop; print('orbax' in {m.split('.')[0] for m in sys.modules})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"
