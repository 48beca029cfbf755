"""Train a decoder from scratch: `python -m experiments.train --config configs/tiny_teacher.py`.

Any config value can be overridden on the command line (`--config.steps=50`). Restarting with
the same workdir resumes from its last checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from cascade_jax import train
from experiments.common import define_multihost_flag, last_line_is_the_cause, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_MULTIHOST = define_multihost_flag()
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    start(_MULTIHOST.value)
    summary = train.run(_CONFIG.value)
    print(train.format_summary(summary))


if __name__ == "__main__":
    app.run(last_line_is_the_cause(main))
