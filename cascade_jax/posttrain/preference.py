"""Preference losses on per-sequence log-prob sums: DPO and offset DPO.

Per pair p (chosen y_w, rejected y_l; log-probs summed over the completion's tokens, e.g. by
`posttrain.logprobs.sequence_logprob_sums`):

    h_p    = [log πθ(y_w) − log πref(y_w)] − [log πθ(y_l) − log πref(y_l)]
    loss_p = −log σ(β·h_p − Δ_p)

- DPO (Rafailov et al. 2023, arXiv 2305.18290): Δ = 0. Online DPO (Guo et al. 2024, arXiv
  2402.04792) is the same loss on pairs the current policy sampled and a judge ranked; the
  loss does not care where the pair came from.
- Offset DPO (Amini et al. 2024, arXiv 2402.10571): Δ = α·log(s_w − s_l) from the pair's
  scores, so the chosen must beat the rejected by a margin that grows with how much better it
  scored. α = 0 is DPO.

The reference's log-probs enter under `stop_gradient` (a frozen model; it never trains) and so
do the scores. `jax.nn.log_sigmoid` keeps the loss finite for any margin.

Metrics (under `stop_gradient`, means over the P pairs; `count` = P so callers can make the
codebase's (sum, count) pairs): `reward_accuracy` (fraction with chosen reward > rejected),
`margin` (chosen − rejected reward), `chosen_reward` / `rejected_reward` (the implicit rewards
β·(log πθ − log πref)), `chosen_logprob` / `rejected_logprob` (policy sums), and for offset DPO
`offset` (Δ) and `gap_clamped` (fraction of pairs whose score gap was raised to
`min_score_gap`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def _check_number(name: str, value: float, *, positive: bool, fix: str) -> None:
    """Plain Python numbers are checked; traced or array values pass (a caller sweeping β
    under jit owns its range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be a finite number "
                         f"{'> 0' if positive else '>= 0'}; {fix}")


def _check_pairs(**arrays: jax.Array) -> None:
    shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"per-pair inputs must all be [P] arrays of one length; got {shapes}")


def _preference(policy_chosen_P: jax.Array, policy_rejected_P: jax.Array,
                ref_chosen_P: jax.Array, ref_rejected_P: jax.Array, offset_P: jax.Array,
                beta: float) -> tuple[jax.Array, Metrics]:
    pc, pr = policy_chosen_P.astype(jnp.float32), policy_rejected_P.astype(jnp.float32)
    rc, rr = jax.lax.stop_gradient((ref_chosen_P.astype(jnp.float32),
                                    ref_rejected_P.astype(jnp.float32)))
    h_P = (pc - rc) - (pr - rr)
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * h_P - offset_P))
    chosen_P, rejected_P = jax.lax.stop_gradient((beta * (pc - rc), beta * (pr - rr)))
    metrics = {
        "reward_accuracy": jnp.mean((chosen_P > rejected_P).astype(jnp.float32)),
        "margin": jnp.mean(chosen_P - rejected_P),
        "chosen_reward": jnp.mean(chosen_P),
        "rejected_reward": jnp.mean(rejected_P),
        "chosen_logprob": jax.lax.stop_gradient(jnp.mean(pc)),
        "rejected_logprob": jax.lax.stop_gradient(jnp.mean(pr)),
        "count": jnp.asarray(h_P.shape[0], jnp.float32),
    }
    return loss, metrics


def dpo_loss(policy_chosen_P: jax.Array, policy_rejected_P: jax.Array,
             ref_chosen_P: jax.Array, ref_rejected_P: jax.Array, *, beta: float
             ) -> tuple[jax.Array, Metrics]:
    """(mean over pairs of −log σ(β·h), metrics): DPO on per-sequence log-prob sums [P].

    β is the strength of the implicit KL to the reference (0.1 is the usual start).
    """
    _check_number("beta", beta, positive=True, fix="try 0.1")
    _check_pairs(policy_chosen=policy_chosen_P, policy_rejected=policy_rejected_P,
                 ref_chosen=ref_chosen_P, ref_rejected=ref_rejected_P)
    return _preference(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P,
                       jnp.zeros((), jnp.float32), beta)


def _check_score_order(score_chosen_P: jax.Array, score_rejected_P: jax.Array) -> None:
    """A concrete pair scored *below* its rejected is a labelling error, refused by name;
    traced scores cannot be inspected and are clamped (see `odpo_loss`)."""
    if isinstance(score_chosen_P, jax.core.Tracer) or isinstance(score_rejected_P,
                                                                 jax.core.Tracer):
        return
    gap = np.asarray(score_chosen_P, np.float64) - np.asarray(score_rejected_P, np.float64)
    bad = np.flatnonzero(~(gap >= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"pair {i}: score_chosen={float(np.asarray(score_chosen_P)[i])!r} < "
            f"score_rejected={float(np.asarray(score_rejected_P)[i])!r} ({bad.size} such "
            "pairs); the chosen sequence must score at least as high: swap chosen and "
            "rejected for these pairs")


def odpo_loss(policy_chosen_P: jax.Array, policy_rejected_P: jax.Array,
              ref_chosen_P: jax.Array, ref_rejected_P: jax.Array,
              score_chosen_P: jax.Array, score_rejected_P: jax.Array, *, beta: float,
              alpha: float = 1.0, min_score_gap: float = 1e-3
              ) -> tuple[jax.Array, Metrics]:
    """Offset DPO: mean over pairs of −log σ(β·h − α·log(s_w − s_l)), and metrics.

    The offset needs s_w > s_l. Concrete scores with s_w < s_l raise ValueError (swap the
    pair); a tie, or any gap under jit, is raised to `min_score_gap` first, so a tie gets a
    large negative offset α·log(min_score_gap) (a weak push, the limit of a vanishing gap,
    never NaN). `gap_clamped` in the metrics counts such pairs. α = 0 is DPO exactly.
    """
    _check_number("beta", beta, positive=True, fix="try 0.1")
    _check_number("alpha", alpha, positive=False, fix="alpha=0 is plain DPO; the offset "
                  "paper uses alpha=1")
    _check_number("min_score_gap", min_score_gap, positive=True, fix="e.g. 1e-3 (below "
                  "the smallest score difference that should count)")
    _check_pairs(policy_chosen=policy_chosen_P, policy_rejected=policy_rejected_P,
                 ref_chosen=ref_chosen_P, ref_rejected=ref_rejected_P,
                 score_chosen=score_chosen_P, score_rejected=score_rejected_P)
    _check_score_order(score_chosen_P, score_rejected_P)
    gap_P = jax.lax.stop_gradient(jnp.asarray(score_chosen_P, jnp.float32)
                                  - jnp.asarray(score_rejected_P, jnp.float32))
    clamped_P = gap_P < min_score_gap
    offset_P = alpha * jnp.log(jnp.maximum(gap_P, min_score_gap))
    loss, metrics = _preference(policy_chosen_P, policy_rejected_P, ref_chosen_P,
                                ref_rejected_P, offset_P, beta)
    metrics["offset"] = jnp.mean(offset_P)
    metrics["gap_clamped"] = jnp.mean(clamped_P.astype(jnp.float32))
    return loss, metrics
