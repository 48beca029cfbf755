"""A cascade run in a child process, SIGKILLed at one checkpoint save: what the resume tests
survive. `kill -9` is the one interruption nothing in the process can clean up after, so a
run that resumes from it bit-identically resumes from any crash, preemption or OOM kill."""

from __future__ import annotations

import os
import pathlib
import runpy
import signal
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(test_file: str, config_fn: str, args: tuple[Any, ...], kill_dir: str = "",
        kill_step: int = -1, kill_when: str = "") -> None:
    """(In the child.) Run the cascade `config_fn(*args)` of `test_file` builds; SIGKILL this
    process at the save of `kill_step` in the checkpoint directory ending in `kill_dir`,
    'during' it (half written) or 'after' it has committed."""
    from cascade_jax import cascade, checkpoint

    if kill_dir:
        original = checkpoint.Checkpointer.save

        def save(self, step, state, **kwargs):
            saved = original(self, step, state, **kwargs)
            if step == kill_step and str(self.directory).endswith(kill_dir):
                if kill_when == "after":
                    self.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            return saved

        checkpoint.Checkpointer.save = save
    cascade.run(runpy.run_path(test_file)[config_fn](*args), progress=False)


def run_in_subprocess(test_file: str, config_fn: str, args: tuple[Any, ...],
                      kill_dir: str = "", kill_step: int = -1, kill_when: str = "") -> int:
    """`run` in a fresh interpreter; its return code (0, or -SIGKILL when it was killed).
    Anything else fails the test with the child's output."""
    code = ("from tests import killed_runs; killed_runs.run"
            f"({test_file!r}, {config_fn!r}, {args!r}, {kill_dir!r}, {kill_step!r}, "
            f"{kill_when!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(done.stdout[-3000:] + done.stderr[-3000:])
    return done.returncode
