"""What every experiments main shares."""

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

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

        print("joining the multi-host job: jax.distributed.initialize() waits until every "
              "process of the job has started", file=sys.stderr, flush=True)
        jax.distributed.initialize()


def last_line_is_the_cause(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Run `main`; on failure print the traceback, then the cause as the very last line
    (`error: ...`; a full disk as `no space left on <path>`), and exit 1 at once, so nothing a
    background thread prints at shutdown buries it."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:
            traceback.print_exc()
            print(f"error: {cause(error)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    return wrapped


def cause(error: BaseException) -> str:
    """One line saying what went wrong; a full disk anywhere in the chain says so first."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            where = current.filename or "the output directory"
            return f"no space left on {where}: free space there or choose another directory"
        current = current.__cause__ or current.__context__
    return f"{type(error).__name__}: {error}".splitlines()[0]


def matmul(dtype: str, n: int, chain: int = 1) -> Callable[[], Any]:
    """`chain` dependent square matmuls in `dtype` in one jitted call: the compute roofline
    benchmarks measure against (2·n³·chain FLOPs per call). On a GPU one 8192² product takes
    ~1.5 ms, so a single one per call measures dispatch and the host read too: chain several.
    JAX is imported here, so XLA flags can still be set before."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype)) / n**0.5  # keeps |x| ~1

    @jax.jit
    def product(x: jax.Array, y: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, chain, lambda _, acc: acc @ y, x)[0, 0]

    return lambda: product(a, b)


def torch_device(jax_backend: str) -> str | None:
    """Where the PyTorch peer of a benchmark runs: beside JAX on the same kind of device (CPU
    with CPU, CUDA with a GPU), or None when torch cannot reach that device (the peer is then
    left out rather than compared across devices)."""
    if jax_backend == "cpu":
        return "cpu"
    import torch

    return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else None
