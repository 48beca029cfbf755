"""Token ids outside the vocabulary: caught where data enters, and on request inside the model.

What happens to an unchecked bad id (measured on this JAX; `tests/test_model.py` holds it to
that): the embedding lookup is `jnp.take(..., mode='fill')` and the losses gather with
`take_along_axis`, so

- an id in [-V, 0) wraps around like a numpy index and reads row V + id: finite logits and
  losses that are silently WRONG;
- an id >= V or < -V reads the fill value, NaN: the logits of its whole row (attention
  multiplies masked values by 0, and 0 · NaN = NaN) and the loss turn NaN.

Neither names the token that caused it, so ids are checked where they enter the library
(`data.check_token_ids`, token files, the logits cache), and the model and the losses check
the arrays they are given when `CASCADE_JAX_CHECK_IDS=1` is set (or inside `checking()`):

    CASCADE_JAX_CHECK_IDS=1 python -m experiments.train ...    # or, in code:
    with token_ids.checking():
        logits = model.forward(cfg, params, tokens)    # ValueError naming the bad id

The switch is read when a function is traced: a jitted function compiled without it keeps
running unchecked. Under `jit` the check is a `jax.debug.callback` (a host round trip per
call, hence off by default) and the error surfaces as a `JaxRuntimeError` carrying the
message; on concrete arrays it is a plain host-side `ValueError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

ENV_VAR = "CASCADE_JAX_CHECK_IDS"
INT32_LIMIT = 2**31  # ids are stored as int32; larger ones would wrap if cast

_override: list[bool] = []


def enabled() -> bool:
    """Whether the model and losses check ids: the innermost `checking()`, else the env var."""
    if _override:
        return _override[-1]
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def checking(on: bool = True) -> Iterator[None]:
    """Turn the in-model id checks on (or off) for the functions traced inside the block."""
    _override.append(on)
    try:
        yield
    finally:
        _override.pop()


def check(ids: Any, vocab_size: int | None, *, where: str,
          offsets: np.ndarray | None = None, fix: str = "") -> None:
    """Raise ValueError unless every id lies in [0, vocab_size) ([0, 2³¹) without a vocab).

    Works on any integer dtype without casting it (so nothing wraps before it is looked at);
    the message names `where`, the first bad value, its position and, given `offsets` (a
    corpus's document boundaries), the document holding it; `fix` replaces the default advice.
    """
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where} holds {ids.dtype} values; token ids must be integers: "
                         "tokenize the text, or load ids saved with an integer dtype")
    limit = INT32_LIMIT if vocab_size is None else min(int(vocab_size), INT32_LIMIT)
    if int(ids.min()) >= 0 and int(ids.max()) < limit:
        return
    flat = ids.reshape(-1)
    bad = flat < 0
    bad |= flat >= limit
    position = int(np.argmax(bad))
    raise ValueError(_message(int(flat[position]), position, ids.shape, vocab_size, where,
                              offsets, fix))


def _message(value: int, position: int, shape: tuple[int, ...], vocab_size: int | None,
             where: str, offsets: np.ndarray | None, fix: str) -> str:
    index = tuple(int(i) for i in np.unravel_index(position, shape))
    at = f"position {position}" if len(shape) == 1 else f"index {index}"
    if offsets is not None:
        document = int(np.searchsorted(offsets, position, side="right")) - 1
        at += f" (document {document})"
    vocab = (f"the vocabulary [0, {vocab_size})" if vocab_size is not None
             else f"[0, {INT32_LIMIT}), the range of int32 token ids")
    return (f"{where}: token id {value} at {at} is outside {vocab}; "
            f"{fix or _default_fix(value, vocab_size)}")


def _default_fix(value: int, vocab_size: int | None) -> str:
    if value < 0:
        return ("token ids are never negative: the data is damaged or was saved with another "
                "dtype; re-tokenize it")
    if vocab_size is None or value < vocab_size:
        return "no vocabulary is that large: the data is damaged or is not token ids"
    return "tokenize with the model's own tokenizer, or use a model whose vocab_size covers it"


def check_in_graph(ids: Any, vocab_size: int, *, where: str) -> None:
    """`check`, also on traced arrays: under `jit` as a `jax.debug.callback` that raises on the
    host when the step runs (positions are then within the shard the callback sees)."""
    import jax  # here, not at import: data.py imports this module without starting JAX

    if not isinstance(ids, jax.core.Tracer):
        check(np.asarray(ids), vocab_size, where=where)
        return

    def on_host(values: Any) -> None:
        check(np.asarray(values), vocab_size, where=f"{where} (inside jit)")

    jax.debug.callback(on_host, ids)


def maybe_check(ids: Any, vocab_size: int, *, where: str) -> None:
    """`check_in_graph` when `enabled()`; otherwise nothing is traced and nothing costs."""
    if enabled():
        check_in_graph(ids, vocab_size, where=where)


__all__ = ["ENV_VAR", "INT32_LIMIT", "check", "check_in_graph", "checking", "enabled",
           "maybe_check"]
