"""What every experiments main shares."""

from absl import flags, logging


def quiet_logging() -> None:
    """WARNING and above unless `--verbosity` was given: orbax logs every save at INFO."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def define_multihost_flag() -> flags.FlagHolder[bool]:
    """`--multihost`: the mains that run on a pod's devices (cascade, train) join the job."""
    return flags.DEFINE_bool("multihost", False,
                             "Call jax.distributed.initialize() first (TPU pods, SLURM).")


def start(multihost: bool) -> None:
    """Quiet logging, then `jax.distributed.initialize()` when asked (before any device use)."""
    quiet_logging()
    if multihost:
        import jax

        jax.distributed.initialize()
