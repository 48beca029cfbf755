"""What every experiments main shares."""

from collections.abc import Callable
from typing import Any

from absl import flags, logging


def quiet_logging() -> None:
    """WARNING and above unless `--verbosity` was given: orbax logs every save at INFO."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def matmul(dtype: str, n: int) -> Callable[[], Any]:
    """One large square matmul in `dtype`: the compute roofline benchmarks measure against
    (2·n³ FLOPs per call). JAX is imported here, so XLA flags can still be set before."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    product = jax.jit(lambda x, y: x @ y)
    return lambda: product(a, b)[0, 0]
