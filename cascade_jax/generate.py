"""Batched sampling with a KV cache: `generate(cfg, params, prompts, SamplingParams)`.

Why this shape:
- Prompts are left-padded into P slots (a power of two, at least 16) and rows padded to a
  power of two, so a new batch of a similar size reuses the compiled code: the jitted
  prefill/decode pair is cached per (config, mesh, rows, P, sampling settings).
- One jitted prefill runs the prompts, fills the cache and samples the first token; one jitted
  `lax.while_loop` samples the rest, one token per row per step, and exits as soon as every
  row has stopped. Its state (cache and outputs) is donated, so XLA updates it in place.
- Row r's random stream depends only on (rng, r, step): a sample does not change with the
  bucket it ran in, with the other rows, or with the mesh.
- The returned log-probs are under the untempered model, whatever temperature, top-k or top-p
  chose the token: what policy-gradient and distillation losses compare against.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax import model, sharding
from cascade_jax.config import ModelConfig

MIN_PROMPT_BUCKET = 16


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to continue each prompt.

    Temperature first (0: greedy, which ignores top_k and top_p), then top-k (keep the k most
    likely tokens), then top-p (keep the smallest most-likely set whose mass reaches p, never
    fewer than the top token). `n` completions per prompt; a completion ends with the first
    of `stop_tokens` it samples (kept in the completion) or after `max_new_tokens`.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_count("max_new_tokens", self.max_new_tokens, 1)
        _check_count("n", self.n, 1)
        if (not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 "
                             "(0: greedy, 1: the model's own distribution)")
        if self.top_k is not None:
            try:
                _check_count("top_k", self.top_k, 1)
            except ValueError as error:
                raise ValueError(f"{error}, or None for no cut (top_k=1 is greedy)") from None
        if self.top_p is not None and (
                not isinstance(self.top_p, int | float) or isinstance(self.top_p, bool)
                or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (e.g. 0.95), or None "
                             "for no nucleus cut")
        try:
            stops = tuple(self.stop_tokens)
        except TypeError:
            stops = (self.stop_tokens,)
        if any(not isinstance(t, int | np.integer) or isinstance(t, bool) or t < 0
               for t in stops):
            raise ValueError(f"stop_tokens={self.stop_tokens!r} must be token ids "
                             "(non-negative integers), e.g. (tokenizer.eos_token_id,)")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))
        for name in ("max_new_tokens", "n", "top_k"):  # numpy integers in, plain ints kept
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))


class Completions(NamedTuple):
    """R = len(prompts) × n completions, prompt-major (prompt i's j-th is row i·n + j).

    Columns at or past a row's length are padding: token 0, log-prob 0.
    """

    tokens: np.ndarray    # [R, T] int32, T = max_new_tokens
    lengths: np.ndarray   # [R] int32: tokens generated, a stop token included
    logprobs: np.ndarray  # [R, T] float32: log p(token | prefix) under the untempered model


class _DecodeState(NamedTuple):
    cache: model.KVCache
    tokens_BT: jax.Array    # [B, T] int32
    logprobs_BT: jax.Array  # [B, T] float32
    lengths_B: jax.Array    # [B] int32
    done_B: jax.Array       # [B] bool: stopped, or a padding row of the bucket
    step: jax.Array         # [] int32: tokens sampled so far (the next fills column `step`)


# ----------------------------------------------------------------------------- sampling


def _sample_row(logits_V: jax.Array, key: jax.Array, sampling: SamplingParams) -> jax.Array:
    """One token from temperature-scaled logits, cut to top-k, then to the top-p nucleus."""
    scaled_V = logits_V / sampling.temperature
    nucleus = sampling.top_p is not None and sampling.top_p < 1
    if sampling.top_k is None and not nucleus:
        return jax.random.categorical(key, scaled_V)
    kept = logits_V.shape[-1] if sampling.top_k is None else min(sampling.top_k,
                                                                 logits_V.shape[-1])
    values_C, ids_C = jax.lax.top_k(scaled_V, kept)  # descending
    if nucleus:
        probs_C = jax.nn.softmax(values_C)
        mass_before_C = jnp.cumsum(probs_C) - probs_C
        values_C = jnp.where(mass_before_C < sampling.top_p, values_C, -jnp.inf)
    return ids_C[jax.random.categorical(key, values_C)]


def sample(logits_BV: jax.Array, keys_B: jax.Array, sampling: SamplingParams
           ) -> tuple[jax.Array, jax.Array]:
    """(tokens [B] int32, their log-probs [B] float32 under the untempered `logits_BV`), row b
    drawn with `keys_B[b]` (unused when greedy)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if sampling.temperature == 0:
        tokens_B = jnp.argmax(logits_BV, axis=-1)
    else:
        tokens_B = jax.vmap(functools.partial(_sample_row, sampling=sampling))(logits_BV, keys_B)
    tokens_B = tokens_B.astype(jnp.int32)
    logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]


def _row_keys(rng: jax.Array, rows: int, step: jax.Array) -> jax.Array:
    """Row r's key at `step`: fold_in(fold_in(rng, r), step), whatever else is in the batch."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, r), step))(
        jnp.arange(rows, dtype=jnp.int32))


def _record(state: _DecodeState, logits_BV: jax.Array, rng: jax.Array,
            sampling: SamplingParams) -> _DecodeState:
    """Sample column `step` from `logits_BV` for the rows still running; stop rows that
    sampled a stop token."""
    tokens_B, logprobs_B = sample(logits_BV, _row_keys(rng, logits_BV.shape[0], state.step),
                                  sampling)
    live_B = ~state.done_B
    done_B = state.done_B
    if sampling.stop_tokens:
        done_B = done_B | jnp.isin(tokens_B, jnp.asarray(sampling.stop_tokens, jnp.int32))
    return state._replace(
        tokens_BT=state.tokens_BT.at[:, state.step].set(jnp.where(live_B, tokens_B, 0)),
        logprobs_BT=state.logprobs_BT.at[:, state.step].set(jnp.where(live_B, logprobs_B, 0.0)),
        lengths_B=state.lengths_B + live_B.astype(jnp.int32),
        done_B=done_B,
        step=state.step + 1)


# ----------------------------------------------------------------------------- compiled pair


class _Sampler(NamedTuple):
    prefill: Callable[..., _DecodeState]  # (params, tokens_BP, start_B, live_B, rng) -> state
    decode: Callable[..., _DecodeState]   # (params, state [donated], rng) -> state
    param_shardings: object = None        # where params must live (with a mesh)


def _state_shardings(mesh: Mesh) -> _DecodeState:
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    scalar = sharding.replicated(mesh)
    kv = sharding.logical_to_sharding(PartitionSpec(*model.CACHE_AXES), mesh)
    cache = model.KVCache(kv, kv, rows, scalar)
    table = sharding.batch_sharding(mesh)
    return _DecodeState(cache, table, table, rows, rows, scalar)


@functools.lru_cache(maxsize=64)
def _sampler(cfg: ModelConfig, mesh: Mesh | None, rows: int, prompt_len: int,
             sampling: SamplingParams) -> _Sampler:
    """The jitted prefill and decode loop for one bucket (built once per key, compiled once)."""
    if mesh is not None and sharding.context_shards(mesh) > 1:
        raise ValueError(f"generation does not split rows over the context axis (mesh "
                         f"{dict(mesh.shape)}): the KV cache and decode keep each row on one "
                         "device. Sample on a mesh with context=1 (e.g. the same devices as "
                         "data × fsdp), and train long rows with context > 1")
    new_tokens = sampling.max_new_tokens
    cache_len = prompt_len + new_tokens - 1  # the last sampled token never enters the cache

    def prefill(params: model.Params, tokens_BP: jax.Array, start_B: jax.Array,
                live_B: jax.Array, rng: jax.Array) -> _DecodeState:
        logits_BV, cache = model.prefill(cfg, params, tokens_BP, start_B, cache_len)
        empty = _DecodeState(cache, jnp.zeros((rows, new_tokens), jnp.int32),
                             jnp.zeros((rows, new_tokens), jnp.float32),
                             jnp.zeros((rows,), jnp.int32), ~live_B, jnp.zeros((), jnp.int32))
        return _record(empty, logits_BV, rng, sampling)

    def decode(params: model.Params, state: _DecodeState, rng: jax.Array) -> _DecodeState:
        def running(state: _DecodeState) -> jax.Array:
            return (state.step < new_tokens) & ~jnp.all(state.done_B)

        def step(state: _DecodeState) -> _DecodeState:
            last_B = jax.lax.dynamic_index_in_dim(state.tokens_BT, state.step - 1, axis=1,
                                                  keepdims=False)
            logits_BV, cache = model.decode_step(cfg, params, state.cache, last_B)
            return _record(state._replace(cache=cache), logits_BV, rng, sampling)

        return jax.lax.while_loop(running, step, state)

    if mesh is None:
        return _Sampler(jax.jit(prefill), jax.jit(decode, donate_argnums=1))
    params_sh = sharding.param_shardings(cfg, mesh)
    rows_sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    state_sh = _state_shardings(mesh)
    scalar = sharding.replicated(mesh)
    return _Sampler(
        jax.jit(sharding.traced_on_mesh(prefill, mesh),
                in_shardings=(params_sh, sharding.batch_sharding(mesh), rows_sh, rows_sh,
                              scalar),
                out_shardings=state_sh),
        jax.jit(sharding.traced_on_mesh(decode, mesh), in_shardings=(params_sh, state_sh, scalar),
                out_shardings=state_sh, donate_argnums=1),
        params_sh)


# ----------------------------------------------------------------------------- host side


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _row_bucket(rows: int, mesh: Mesh | None) -> int:
    """A power of two >= rows, rounded up to split evenly over the mesh's batch shards."""
    ways = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    bucket = _next_power_of_two(max(rows, ways))
    return -(-bucket // ways) * ways


def prompt_bucket(longest: int) -> int:
    """Prompt slots for a batch whose longest prompt has `longest` tokens."""
    return max(MIN_PROMPT_BUCKET, _next_power_of_two(longest))


def _checked_prompts(cfg: ModelConfig, prompts: Sequence[np.ndarray],
                     sampling: SamplingParams) -> list[np.ndarray]:
    """Prompts as int32 arrays, each checked: 1-D, non-empty, in the vocabulary, and short
    enough that prompt + max_new_tokens fits in cfg.max_seq_len."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass a list of 1-D token arrays")
    out = []
    budget = cfg.max_seq_len - sampling.max_new_tokens
    for i, prompt in enumerate(prompts):
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompts[{i}] has shape {prompt.shape} and dtype {prompt.dtype}; "
                             "each prompt must be a non-empty 1-D array of token ids")
        bad = prompt[(prompt < 0) | (prompt >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"prompts[{i}] holds token {int(bad[0])}, outside the vocabulary "
                             f"[0, {cfg.vocab_size}); tokenize with this model's tokenizer")
        if len(prompt) > budget:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens: with max_new_tokens="
                f"{sampling.max_new_tokens} that is {len(prompt) + sampling.max_new_tokens} "
                f"positions, beyond cfg.max_seq_len={cfg.max_seq_len}; shorten the prompt to "
                f"{max(budget, 0)} tokens or lower max_new_tokens")
        out.append(prompt.astype(np.int32))
    bad_stops = [t for t in sampling.stop_tokens if t >= cfg.vocab_size]
    if bad_stops:
        raise ValueError(f"stop_tokens {bad_stops} are outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    return out


def _left_pad(rows: list[np.ndarray], batch: int, prompt_len: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_BP, start_B, live_B): each row right-aligned at the last slot; the bucket's
    filler rows hold one token and start done."""
    tokens_BP = np.zeros((batch, prompt_len), np.int32)
    start_B = np.full((batch,), prompt_len - 1, np.int32)
    for b, row in enumerate(rows):
        tokens_BP[b, prompt_len - len(row):] = row
        start_B[b] = prompt_len - len(row)
    return tokens_BP, start_B, np.arange(batch) < len(rows)


def _bucketed(cfg: ModelConfig, prompts: Sequence[np.ndarray], sampling: SamplingParams,
              mesh: Mesh | None, prompt_len: int | None
              ) -> tuple[list[np.ndarray], int, int]:
    """(rows: each checked prompt `sampling.n` times, row bucket, prompt slots): the shapes
    of one compiled call. `prompt_len` (None: `prompt_bucket` of the longest) fixes the
    slots, so calls whose longest prompt varies still share one compiled function."""
    checked = _checked_prompts(cfg, prompts, sampling)
    rows = [prompt for prompt in checked for _ in range(sampling.n)]
    longest = max(len(row) for row in rows)
    if prompt_len is None:
        prompt_len = prompt_bucket(longest)
    elif not isinstance(prompt_len, int | np.integer) or isinstance(prompt_len, bool) or (
            prompt_len < longest):
        raise ValueError(f"prompt_len={prompt_len!r} is shorter than the longest prompt "
                         f"({longest} tokens); give at least {longest}, or None for a bucket")
    return rows, _row_bucket(len(rows), mesh), int(prompt_len)


def generate(cfg: ModelConfig, params: model.Params, prompts: Sequence[np.ndarray],
             sampling: SamplingParams, *, rng: jax.Array | None = None,
             mesh: Mesh | None = None, prompt_len: int | None = None) -> Completions:
    """`sampling.n` completions of every prompt (1-D token arrays of any lengths).

    `rng` is required unless greedy (temperature 0); the same rng gives the same completions.
    With `mesh`, params are placed by `sharding.param_shardings`, rows split over
    data × fsdp and the cache's KV heads over tensor. `prompt_len`: the prompt slots (at
    least the longest prompt; None: a power of two), fixed to keep one compiled sampler.
    """
    if rng is None:
        if sampling.temperature > 0:
            raise ValueError(f"temperature={sampling.temperature} samples: pass "
                             "rng=jax.random.key(seed) (or temperature=0 for greedy)")
        rng = jax.random.key(0)  # unused by greedy decoding
    rows, batch, prompt_len = _bucketed(cfg, prompts, sampling, mesh, prompt_len)
    sampler = _sampler(cfg, mesh, batch, prompt_len, dataclasses.replace(sampling, n=1))
    if mesh is not None:
        params = sharding.shard_like(params, sampler.param_shardings)
    state = sampler.prefill(params, *_left_pad(rows, batch, prompt_len), rng)
    if sampling.max_new_tokens > 1:  # prefill sampled the first token
        state = sampler.decode(params, state, rng)
    count = len(rows)
    return Completions(tokens=_to_host(state.tokens_BT)[:count],
                       lengths=_to_host(state.lengths_B)[:count],
                       logprobs=_to_host(state.logprobs_BT)[:count])


@functools.lru_cache(maxsize=16)
def _scorer(cfg: ModelConfig, mesh: Mesh | None, rows: int, prompt_len: int,
            token_ids: tuple[int, ...]) -> tuple[Callable[..., jax.Array], object]:
    """(jitted `(params, tokens_BP, start_B) -> [B, T]` log-probs of `token_ids` after each
    left-padded prompt, where params must live)."""
    def score(params: model.Params, tokens_BP: jax.Array, start_B: jax.Array) -> jax.Array:
        logits_BV, _ = model.prefill(cfg, params, tokens_BP, start_B, prompt_len)
        logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        return logprobs_BV[:, jnp.asarray(token_ids, jnp.int32)]

    if mesh is None:
        return jax.jit(score), None
    params_sh = sharding.param_shardings(cfg, mesh)
    return jax.jit(sharding.traced_on_mesh(score, mesh),
                   in_shardings=(params_sh, sharding.batch_sharding(mesh),
                                 NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))),
                   out_shardings=sharding.replicated(mesh)), params_sh


def next_token_logprobs(cfg: ModelConfig, params: model.Params, prompts: Sequence[np.ndarray],
                        token_ids: Sequence[int], *, mesh: Mesh | None = None,
                        prompt_len: int | None = None) -> np.ndarray:
    """[R, T] float32: log p(token_ids[t] | prompt r) under the model, one prefill and no
    sampling (e.g. a judge's verdict tokens at its cue). Prompts are checked and bucketed
    as by `generate` (`prompt_len` alike)."""
    ids = tuple(int(t) for t in token_ids)
    if not ids or any(not 0 <= t < cfg.vocab_size for t in ids):
        raise ValueError(f"token_ids={list(token_ids)} must be ids in [0, {cfg.vocab_size})")
    rows, batch, prompt_len = _bucketed(cfg, prompts, SamplingParams(1), mesh, prompt_len)
    score, params_sh = _scorer(cfg, mesh, batch, prompt_len, ids)
    if mesh is not None:
        params = sharding.shard_like(params, params_sh)
    tokens_BP, start_B, _ = _left_pad(rows, batch, prompt_len)
    return _to_host(score(params, tokens_BP, start_B))[:len(rows)]


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host: rows split over several processes are gathered first
    (every process called `generate` with the same prompts, so each gets every row)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
