"""Run a cascade: `python -m experiments.cascade --config configs/tiny_cascade.py`.

Rerunning the same command resumes: finished stages are skipped, an interrupted one continues
from its last checkpoint. Override any value with `--config.<field>=...`.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from cascade_jax import cascade
from experiments.common import define_multihost_flag, last_line_is_the_cause, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_MULTIHOST = define_multihost_flag()
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    start(_MULTIHOST.value)
    results = cascade.run(_CONFIG.value, progress=_PROGRESS.value)
    print()
    print(cascade.results_markdown(results))
    print(f"results, plots and checkpoints: {os.path.abspath(_CONFIG.value.workdir)}")


if __name__ == "__main__":
    app.run(last_line_is_the_cause(main))
