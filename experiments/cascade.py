"""Run a cascade: `python -m experiments.cascade --config configs/tiny_cascade.py`.

Rerunning the same command resumes: finished stages are skipped, an interrupted one continues
from its last checkpoint. Override any value with `--config.<field>=...`.

`--seeds=0,1,2` runs the job once per seed (in `<workdir>/seed_<s>`) and writes
`<workdir>/spread.md`: every figure's mean and min–max over the seeds (`cascade_jax.spread`).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from cascade_jax import cascade, files, spread
from experiments.common import define_multihost_flag, last_line_is_the_cause, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_MULTIHOST = define_multihost_flag()
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_SEEDS = flags.DEFINE_list("seeds", [], "Run once per seed (in <workdir>/seed_<s>) and write "
                           "<workdir>/spread.md: mean and min–max of every figure.")
flags.mark_flags_as_required(["config"])


def seeded(config, seed: int):
    """`config` with `seed`, its run in `<workdir>/seed_<seed>`."""
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.seed = seed
        out.workdir = os.path.join(config.workdir, f"seed_{seed}")
    return out


def main(argv: list[str]) -> None:
    del argv
    start(_MULTIHOST.value)
    config = _CONFIG.value
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise ValueError(f"--seeds={','.join(_SEEDS.value)} must be integers, e.g. "
                         "--seeds=0,1,2") from None
    if not seeds:
        results = cascade.run(config, progress=_PROGRESS.value)
        print()
        print(cascade.results_markdown(results))
        print(f"results, plots and checkpoints: {os.path.abspath(config.workdir)}")
        return
    runs = {seed: cascade.run(seeded(config, seed), progress=_PROGRESS.value)
            for seed in seeds}
    table = spread.spread_markdown(runs)
    files.atomic_write(os.path.join(config.workdir, "spread.md"), lambda f: f.write(table.encode()))
    print()
    print(table)
    print(f"each seed's results: {os.path.abspath(config.workdir)}/seed_<s>; the spread: "
          "spread.md")


if __name__ == "__main__":
    app.run(last_line_is_the_cause(main))
