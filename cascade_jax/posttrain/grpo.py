"""GRPO and its variants: group advantages and the clipped policy loss, as pure functions.

Layout: one sampled sequence per row. Rewards are [R] with R = n_prompts × G, prompt-major
(prompt i's j-th sample is row i·G + j, as `generate.Completions` orders them). Token arrays
are [R, L]: the rows' log-probs under the current, old and reference policies and their
weights, all in one layout, e.g. the target-aligned [B, L] of `posttrain.logprobs.
target_logprobs` on prompt + completion rows with a `loss_mask` (so only completion tokens
count), given as is. Advantages are per sequence, [R], broadcast over each row's tokens.

Per counted token t of row i (ratio r = πθ/πold = exp(logp − old_logp)):

    ℓ_it = −min(r·A_i, clip(r, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_it
    k3_it = exp(ref − logp) − (ref − logp) − 1      (Schulman's unbiased, ≥ 0 KL estimator)

then aggregated (`GRPOSpec.aggregation`):

- 'sequence'     mean over each row's tokens, then over rows (GRPO, Shao et al. 2024, arXiv
                 2402.03300); rows with no counted token are left out.
- 'token'        Σ over all tokens / all counted tokens of the batch (DAPO, Yu et al. 2025,
                 arXiv 2503.14476): long answers weigh by their length.
- 'group_token'  Σ over a group's tokens / that group's counted tokens, then the mean over
                 groups (Magistral, arXiv 2506.10910, normalises by "the total length of
                 generations in each group"); needs `group_size`.
- 'constant'     Σ over all tokens / (R · max_len), a constant (Dr. GRPO, Liu et al. 2025,
                 arXiv 2503.20783), removing the length bias of both means above.

Clipping (PPO, Schulman et al. 2017, arXiv 1707.06347; DAPO's clip-higher ε_high > ε_low):
a token whose ratio left [1 − ε_low, 1 + ε_high] on the side its advantage pushes toward gets
zero gradient; on the other side it keeps the unclipped (pessimistic) term.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

AGGREGATIONS = ("sequence", "token", "group_token", "constant")
STD_SCALINGS = ("group", "batch", None)


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
    """What the GRPO loss does; hashable, so it can be a static argument of `jax.jit`.

    epsilon_low / epsilon_high: the clip range [1 − ε_low, 1 + ε_high] of the ratio.
    aggregation: 'sequence' | 'token' | 'group_token' | 'constant' (module docstring).
    scale_by_std: advantages centred per group, then divided by the std of the 'group' (GRPO),
      of the 'batch' of sequences given (Magistral's minibatch normalisation), or None
      (Dr. GRPO: centred only).
    kl_beta: weight of the k3 KL to the frozen reference (0: no reference needed).
    skip_equal_groups: groups whose G rewards are all equal carry no signal; True drops
      their tokens from the loss and the batch statistics (DAPO/Magistral), False keeps them
      at advantage 0 (they still count in the denominators, as in GRPO).
    mu: optimizer steps per batch of rollouts (μ = 1: on-policy, ratio ≡ 1 in value).
    max_len: the constant of 'constant' aggregation (the generation budget); None: the L of
      the token arrays given.
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    aggregation: str = "sequence"
    scale_by_std: str | None = "group"
    kl_beta: float = 0.0
    skip_equal_groups: bool = False
    mu: int = 1
    max_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("epsilon_low", "epsilon_high"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool)
                    and 0 < value < (1 if name == "epsilon_low" else math.inf)):
                bound = "in (0, 1) (the ratio's lower bound 1 − ε_low must stay > 0)" \
                    if name == "epsilon_low" else "> 0 and finite"
                raise ValueError(f"{name}={value!r} must be {bound}; 0.2 is PPO's value, "
                                 "DAPO raises epsilon_high to 0.28")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not known; choose from "
                             f"{list(AGGREGATIONS)}")
        if self.scale_by_std not in STD_SCALINGS:
            raise ValueError(f"scale_by_std={self.scale_by_std!r} is not known; choose from "
                             f"{list(STD_SCALINGS)}")
        if not (isinstance(self.kl_beta, int | float) and not isinstance(self.kl_beta, bool)
                and math.isfinite(self.kl_beta) and self.kl_beta >= 0):
            raise ValueError(f"kl_beta={self.kl_beta!r} must be a finite number >= 0 (0: no "
                             "KL term; DeepSeekMath used 0.04)")
        if not isinstance(self.skip_equal_groups, bool):
            raise ValueError(f"skip_equal_groups={self.skip_equal_groups!r} must be True or "
                             "False")
        if not isinstance(self.mu, int) or isinstance(self.mu, bool) or self.mu < 1:
            raise ValueError(f"mu={self.mu!r} must be a positive integer (optimizer steps "
                             "per rollout batch; 1 is on-policy)")
        if self.max_len is not None and (not isinstance(self.max_len, int)
                                         or isinstance(self.max_len, bool)
                                         or self.max_len < 1):
            raise ValueError(f"max_len={self.max_len!r} must be a positive integer (the "
                             "generation budget), or None for the token arrays' length")


# GRPO as DeepSeekMath ran it: per-sequence means, group std scaling, β = 0.04, one update per
# exploration batch; ε = 0.2 is PPO's (the paper does not state its ε).
GRPO = GRPOSpec(epsilon_low=0.2, epsilon_high=0.2, aggregation="sequence",
                scale_by_std="group", kl_beta=0.04, skip_equal_groups=False, mu=1)
# Dr. GRPO: no std scaling, a constant denominator, no KL.
DR_GRPO = GRPOSpec(epsilon_low=0.2, epsilon_high=0.2, aggregation="constant",
                   scale_by_std=None, kl_beta=0.0, skip_equal_groups=False, mu=1)
# DAPO: clip-higher (0.2 / 0.28), token-level loss over the batch, no KL, dynamic sampling
# (groups of equal rewards dropped).
DAPO = GRPOSpec(epsilon_low=0.2, epsilon_high=0.28, aggregation="token",
                scale_by_std="group", kl_beta=0.0, skip_equal_groups=True, mu=1)
# Magistral: no KL, loss normalised by each group's total length, advantages centred per group
# and normalised over the minibatch, clip-higher (ε_high tuned in [0.26, 0.28]; 0.28 here, as
# DAPO), groups of equal rewards filtered out.
MAGISTRAL = GRPOSpec(epsilon_low=0.2, epsilon_high=0.28, aggregation="group_token",
                     scale_by_std="batch", kl_beta=0.0, skip_equal_groups=True, mu=1)


class Advantages(NamedTuple):
    """What `group_advantages` returns.

    advantages: [R] float32 per-sequence advantage (0 for every sequence of an equal group).
    keep: [R] float32, 0 for the sequences of skipped equal groups, else 1: multiply the
      token weights by `keep[:, None]` so skipped groups leave the loss's denominators too.
    equal_groups: [R // G] bool, the groups whose rewards are all equal.
    n_equal_groups: [] int32, their count (a metric: the groups that carried no signal).
    """

    advantages: jax.Array
    keep: jax.Array
    equal_groups: jax.Array
    n_equal_groups: jax.Array


def _check_group_size(n_rows: int, group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (samples per "
                         "prompt)")
    if n_rows % group_size:
        raise ValueError(f"{n_rows} rows are not whole groups of group_size={group_size}; "
                         "give every prompt's G samples, prompt-major")


def group_advantages(rewards_R: jax.Array, group_size: int, scale_by_std: str | None, *,
                     skip_equal_groups: bool = False, eps: float = 1e-6) -> Advantages:
    """Per-sequence advantages from rewards [R] (prompt-major groups of `group_size`).

    A = r − mean(group); then ÷ (std(group) + eps) for 'group', or ((A − mean) ÷ (std + eps)
    over the kept sequences of the batch) for 'batch'; None leaves A centred. Stds are
    population stds (ddof 0). A group whose rewards are all exactly equal gets A = 0 in every
    mode; with `skip_equal_groups` it is also left out of the 'batch' statistics and marked
    in `keep`. For 'batch', pass the rewards of one optimizer minibatch (whole groups).
    """
    if scale_by_std not in STD_SCALINGS:
        raise ValueError(f"scale_by_std={scale_by_std!r} is not known; choose from "
                         f"{list(STD_SCALINGS)}")
    rewards_R = jnp.asarray(rewards_R, jnp.float32)
    if rewards_R.ndim != 1:
        raise ValueError(f"rewards must be [R] (one per sequence); got shape "
                         f"{rewards_R.shape}")
    _check_group_size(rewards_R.shape[0], group_size)
    rewards_NG = rewards_R.reshape(-1, group_size)
    centred_NG = rewards_NG - jnp.mean(rewards_NG, axis=1, keepdims=True)
    equal_N = jnp.max(rewards_NG, axis=1) == jnp.min(rewards_NG, axis=1)
    keep_NG = jnp.broadcast_to(~(equal_N[:, None] & skip_equal_groups), rewards_NG.shape)
    keep_NG = keep_NG.astype(jnp.float32)
    if scale_by_std == "group":
        advantages_NG = centred_NG / (jnp.std(rewards_NG, axis=1, keepdims=True) + eps)
    elif scale_by_std == "batch":
        n = jnp.maximum(jnp.sum(keep_NG), 1.0)
        mean = jnp.sum(centred_NG * keep_NG) / n
        std = jnp.sqrt(jnp.sum(jnp.square(centred_NG - mean) * keep_NG) / n)
        advantages_NG = (centred_NG - mean) / (std + eps)
    else:
        advantages_NG = centred_NG
    advantages_NG = jnp.where(equal_N[:, None], 0.0, advantages_NG)
    return Advantages(advantages_NG.reshape(-1), keep_NG.reshape(-1), equal_N,
                      jnp.sum(equal_N).astype(jnp.int32))


def k3_kl(logprobs_BL: jax.Array, ref_logprobs_BL: jax.Array) -> jax.Array:
    """[B, L] k3 estimate of KL(πθ‖πref) at the sampled tokens: e^d − d − 1, d = ref − logp.

    Unbiased for samples from πθ and never negative (Schulman 2020, "Approximating KL
    divergence"; the KL term of GRPO).
    """
    d_BL = ref_logprobs_BL - logprobs_BL
    return jnp.exp(d_BL) - d_BL - 1.0


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / jnp.maximum(den, 1e-30)


def aggregation_weights(weights_BL: jax.Array, aggregation: str, *,
                        max_len: int | None = None, group_size: int | None = None
                        ) -> jax.Array:
    """[B, L] coefficients c with `aggregate(x) = Σ c·x` over the counted tokens: every
    aggregation is linear in the per-token values with weights fixed by the token counts
    alone. Computed once for a whole batch, they make the loss a plain sum over its rows, so
    micro-batches of any rows add up to the whole batch's loss (GRPO's `grad_accum`)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not known; choose from "
                         f"{list(AGGREGATIONS)}")
    w_BL = jnp.where(weights_BL > 0, weights_BL.astype(jnp.float32), 0.0)
    if aggregation == "token":
        return _safe_div(w_BL, jnp.sum(w_BL))
    if aggregation == "constant":
        rows, length = w_BL.shape
        return w_BL / (rows * (max_len or length))
    if aggregation == "sequence":
        counts_B = jnp.sum(w_BL, axis=1)
    else:
        if group_size is None:
            raise ValueError("aggregation='group_token' needs group_size (samples per prompt) "
                             "to find the groups")
        _check_group_size(w_BL.shape[0], group_size)
        counts_N = jnp.sum(w_BL.reshape(-1, group_size * w_BL.shape[1]), axis=1)
        counts_B = jnp.repeat(counts_N, group_size)
    present = jnp.sum((counts_B > 0).astype(jnp.float32)) / (
        1 if aggregation == "sequence" else group_size)
    return _safe_div(w_BL, counts_B[:, None] * present)


def aggregate(x_BL: jax.Array, weights_BL: jax.Array, aggregation: str, *,
              max_len: int | None = None, group_size: int | None = None) -> jax.Array:
    """The scalar that `aggregation` makes of per-token values (module docstring)."""
    return _weighted_sum(x_BL, aggregation_weights(weights_BL, aggregation, max_len=max_len,
                                                   group_size=group_size))


def _weighted_sum(x_BL: jax.Array, coef_BL: jax.Array) -> jax.Array:
    """Σ c·x over the counted tokens (uncounted positions may hold inf or NaN padding)."""
    return jnp.sum(jnp.where(coef_BL > 0, x_BL * coef_BL, 0.0))


def policy_loss(logprobs_BL: jax.Array, old_logprobs_BL: jax.Array | None,
                ref_logprobs_BL: jax.Array | None, advantages_B: jax.Array,
                weights_BL: jax.Array, spec: GRPOSpec, *, group_size: int | None = None,
                coefficients_BL: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """(loss, metrics): the clipped surrogate (+ β·k3 KL) aggregated as `spec` says.

    logprobs_BL: the current policy's, differentiable. old_logprobs_BL: the policy that
    sampled, as the trainer's own forward computed it before the first of the μ updates
    (never the sampler's, so no sampler/trainer mismatch enters the ratio); None means
    on-policy (μ = 1): `stop_gradient(logprobs_BL)`, ratio 1. ref_logprobs_BL: the frozen
    reference's, needed only when `spec.kl_beta > 0`. Old and reference log-probs enter
    under `stop_gradient`. advantages_B: [B], one per sequence (GRPO), or [B, L], one per
    token (on-policy distillation's per-token reward, Thinking Machines 2025: each sampled
    token's own reverse-KL estimate). weights_BL: 1 on counted (completion) tokens, times
    `Advantages.keep` when equal groups are skipped. group_size: for 'group_token'.
    coefficients_BL: these rows' `aggregation_weights` computed on the whole batch they
    belong to; given, the loss and `pg_loss` are these rows' share of the whole batch's (sums
    over micro-batches give the whole), instead of the aggregate of these rows alone.

    Metrics (means over counted tokens, under stop_gradient; `count` = counted tokens):
    `pg_loss` (the clipped term, aggregated like the loss), `kl` (k3 mean; 0 without a
    reference), `ratio_mean`, `ratio_min`, `ratio_max`, `clip_fraction_low` (A < 0 and
    r < 1 − ε_low: zero gradient), `clip_fraction_high` (A > 0 and r > 1 + ε_high),
    `policy_drift` (mean old − new log-prob: the k1 KL(old‖new) estimate).
    """
    if not isinstance(spec, GRPOSpec):
        raise ValueError(f"spec={spec!r} must be a GRPOSpec (e.g. grpo.MAGISTRAL)")
    shapes = {"logprobs": logprobs_BL.shape, "weights": weights_BL.shape}
    if old_logprobs_BL is not None:
        shapes["old_logprobs"] = old_logprobs_BL.shape
    if ref_logprobs_BL is not None:
        shapes["ref_logprobs"] = ref_logprobs_BL.shape
    if len(set(shapes.values())) != 1 or len(logprobs_BL.shape) != 2:
        raise ValueError(f"token arrays must share one [B, L] shape; got {shapes}")
    if advantages_B.shape not in (logprobs_BL.shape[:1], logprobs_BL.shape):
        raise ValueError(f"advantages {advantages_B.shape} must be [B] = "
                         f"{logprobs_BL.shape[:1]}, one per row (sequence), or [B, L] = "
                         f"{logprobs_BL.shape}, one per token")
    if spec.kl_beta > 0 and ref_logprobs_BL is None:
        raise ValueError(f"kl_beta={spec.kl_beta} needs ref_logprobs_BL (the frozen "
                         "reference's log-probs); pass them, or set kl_beta=0")

    logp_BL = logprobs_BL.astype(jnp.float32)
    old_BL = logp_BL if old_logprobs_BL is None else old_logprobs_BL.astype(jnp.float32)
    old_BL = jax.lax.stop_gradient(old_BL)
    adv_B1 = jax.lax.stop_gradient(advantages_B.astype(jnp.float32))
    if adv_B1.ndim == 1:
        adv_B1 = adv_B1[:, None]  # [B, 1], or [B, L] per-token advantages as given
    w_BL = weights_BL.astype(jnp.float32)

    counted_BL = w_BL > 0
    # Uncounted positions may hold anything (padding): a ratio of 1 there keeps exp finite,
    # so no 0·inf reaches the gradient.
    ratio_BL = jnp.exp(jnp.where(counted_BL, logp_BL - old_BL, 0.0))
    clipped_BL = jnp.clip(ratio_BL, 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high)
    pg_BL = -jnp.minimum(ratio_BL * adv_B1, clipped_BL * adv_B1)
    per_token_BL = pg_BL
    kl_BL = jnp.zeros_like(logp_BL)
    if ref_logprobs_BL is not None:
        ref_BL = jax.lax.stop_gradient(ref_logprobs_BL.astype(jnp.float32))
        kl_BL = k3_kl(logp_BL, jnp.where(counted_BL, ref_BL, logp_BL))
        if spec.kl_beta > 0:
            per_token_BL = pg_BL + spec.kl_beta * kl_BL

    coef_BL = coefficients_BL if coefficients_BL is not None else aggregation_weights(
        w_BL, spec.aggregation, max_len=spec.max_len, group_size=group_size)

    def agg(x_BL: jax.Array) -> jax.Array:
        return _weighted_sum(x_BL, coef_BL)

    loss = agg(per_token_BL)
    count = jnp.sum(w_BL)

    def token_mean(x_BL: jax.Array) -> jax.Array:
        return _safe_div(jnp.sum(jnp.where(counted_BL, x_BL * w_BL, 0.0)), count)

    low_BL = (adv_B1 < 0) & (ratio_BL < 1.0 - spec.epsilon_low)
    high_BL = (adv_B1 > 0) & (ratio_BL > 1.0 + spec.epsilon_high)
    metrics = jax.lax.stop_gradient({
        "pg_loss": agg(pg_BL),
        "kl": token_mean(kl_BL),
        "ratio_mean": token_mean(ratio_BL),
        "ratio_min": jnp.min(jnp.where(counted_BL, ratio_BL, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(counted_BL, ratio_BL, -jnp.inf)),
        "clip_fraction_low": token_mean(low_BL.astype(jnp.float32)),
        "clip_fraction_high": token_mean(high_BL.astype(jnp.float32)),
        "policy_drift": token_mean(old_BL - logp_BL),
        "count": count,
    })
    return loss, metrics
