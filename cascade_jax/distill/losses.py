"""Knowledge-distillation losses: dense, fused-and-chunked over the sequence, and sparse.

What is computed, per counted token (weights from `lm.next_token_targets`: padding and packing
boundaries weigh 0), all in float32 whatever the compute dtype:

    loss = alpha * KD + (1 - alpha) * CE(student, ground truth)
    KD   = T² · D(p_T ‖ s_T),  p_T = softmax(z_teacher / T),  s_T = softmax(z_student / T)

T² keeps the gradient's scale independent of T (Hinton et al. 2015, arXiv 1503.02531); it is
applied to every divergence alike. The divergences D (`LossSpec.kind`):

- 'forward_kl'  KL(p‖s) = Σ p (log p − log s). Ministral 3 (arXiv 2601.08584) and Minitron
  (arXiv 2407.14679) distil with forward KL on logits alone, T = 1, alpha = 1 (the defaults).
- 'reverse_kl'  KL(s‖p).
- 'jsd'         generalized JSD(β) of GKD (Agarwal et al., arXiv 2306.13649), as TRL's
  `generalized_jsd_loss` and Liger Kernel's `LigerFusedLinearJSDLoss` define it:
  J(β) = β·KL(p‖m) + (1 − β)·KL(s‖m) with m = β·p + (1 − β)·s. J itself tends to 0 at both
  ends (m → s at β = 0, m → p at β = 1); TRL and Liger special-case β = 0 and 1 to forward
  and reverse KL, a jump. Near the ends J(β) ≈ β·KL(p‖s) and J(β) ≈ (1 − β)·KL(s‖p), so we
  return the *scaled* J(β) / (β(1 − β)): continuous on [0, 1], exactly forward KL at β = 0
  and reverse KL at β = 1, and 4·JS(p, s) at β = 0.5 (at most 4 ln 2). To compare with TRL or
  Liger at an interior β, multiply by β(1 − β).
- 'tvd'         total variation ½ Σ |p − s|.

Fused and chunked (`distill_loss`): Liger Kernel's "fused linear" idea (Hsu et al., arXiv
2410.10989: −85% memory at V = 128256) in JAX. Logits are made chunk by chunk over L from the
final hidden states and the [D, V] head weights inside a `lax.scan`. Under differentiation a
`custom_vjp` takes, in the same pass, the gradient w.r.t. each chunk's student logits
(`jax.vjp` of the chunk's loss) and turns it into the chunk's hidden-state gradient and a
float32 running sum of the head's gradient, so no [B, L, V] array is ever live and no logits
are made twice: 4 [B·L, D]×[D, V] matmuls, as many as the naive loss (a `jax.checkpoint`ed scan
would need 6). The primal (no-gradient) path is a plain scan. Only `loss` is differentiable
through the fused path (the metric sums come back under `stop_gradient`), and only in reverse
mode (`grad`, `vjp`; not `jvp`), like any `custom_vjp`.

Sparse teacher targets (`sparse_distill_loss`), for offline distillation from a cache:
- 'topk'     teacher top-k (indices, log-probs). The student is renormalised on the teacher's
  support: its logits are gathered at the teacher's indices *before* the log-softmax (the fix
  of MaxText issue #4056), and the teacher's k log-probs are renormalised the same way, so k = V
  gives the dense loss exactly. Top-k targets are biased (arXiv 2503.16870; Minitron: top-K ≤
  100 hurt).
- 'sampled'  Random-Sampling KD (Sparse Logit Sampling, Anshumann et al., ACL 2025, arXiv
  2503.16870): n tokens x_i drawn from the teacher p_T itself (the importance weights p/q are
  then all 1, weight 1/n per draw), with the student's log-softmax over the *full* vocabulary:
  KD = T²/n · Σ_i (log p_T(x_i) − log s_T(x_i)). Its expectation over the draws is exactly
  T²·KL(p_T‖s_T), and its gradient w.r.t. the student logits, T·(s_T − counts/n), has
  expectation T·(s_T − p_T), the dense gradient. Forward KL only (the estimator is linear in p).

Several teachers at once (`mixture_distill_loss`): the target is the arithmetic mean of the
teachers' tempered probabilities, p̄ = (1/n) Σ_j p_j, made chunk by chunk from each teacher's
hidden states and head inside the same fused scan (a running `logaddexp`: one extra
[B, chunk, V] is live per chunk however many teachers there are). Codistillation uses it with
the other models of a group as the teachers: Anil et al. 2018 (arXiv 1804.03235) distil each
model from the average of the other models' predictions. Why the mean of probabilities and
not of log-probs (a renormalised geometric mean, a product of experts): p̄ is the peers'
ensemble prediction and keeps every token any peer believes in, where the geometric mean
vanishes wherever a single peer does; and with forward KL its gradient w.r.t. the student
logits, T·(s_T − p̄), is exactly the mean of the per-teacher gradients T·(s_T − p_j), so
distilling from the mixture moves the student as deep mutual learning's average of per-peer
KLs does (Zhang et al. 2018, arXiv 1706.00384, with more than two students); the two values
differ only by a term free of the student.

Metrics are token-weighted sums (`loss_sum`, `kd_sum` (the configured divergence, T²
included), `ce_sum`, `top1_agreement_sum` (student argmax == teacher argmax), `count`), so
averages over chunks, hosts and steps weigh by tokens (MaxText's distillation_utils keeps
(sum, count) pairs the same way).

Targets and teacher indices outside [0, V) gather NaN (or, in [-V, 0), another token's value)
rather than fail; under `CASCADE_JAX_CHECK_IDS=1` every public loss refuses them by value
(`cascade_jax.token_ids`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cascade_jax import chunks, lm, token_ids

Metrics = dict[str, jax.Array]

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
SPARSE_MODES = ("topk", "sampled")
METRIC_NAMES = ("loss_sum", "kd_sum", "ce_sum", "top1_agreement_sum", "count")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What to minimise; hashable, so it can be a static argument of `jax.jit`.

    kind: 'forward_kl' | 'reverse_kl' | 'jsd' | 'tvd' (see the module docstring).
    temperature: KD on softmax(z / T), scaled by T² (Hinton).
    alpha: loss = alpha·KD + (1 − alpha)·CE on the ground truth.
    beta: JSD(β); β = 0 is forward KL, β = 1 reverse KL.
    chunk_size: positions of L per chunk of the fused loss; None = unfused (whole logits).
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    chunk_size: int | None = 512

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a known divergence; choose from "
                             f"{list(KINDS)}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0 "
                             "(1.0 is plain KD)")
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha={self.alpha!r} must be in [0, 1] (1.0 = KD only, "
                             "0.0 = cross-entropy only)")
        if not (isinstance(self.beta, int | float) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta={self.beta!r} must be in [0, 1] (0 = forward KL, "
                             "1 = reverse KL)")
        chunk = self.chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool)
                                  or chunk < 1):
            raise ValueError(f"chunk_size={chunk!r} must be a positive integer, or None for "
                             "the unfused loss")


# ------------------------------------------------------------------ per-token divergences


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p‖q) over the last axis from log-probs; 0·log 0 = 0 (and no NaN from −inf − −inf)."""
    p = jnp.exp(logp)
    return jnp.sum(p * jnp.where(p > 0, logp - logq, 0.0), axis=-1)


def divergence(kind: str, teacher_logprobs: jax.Array, student_logprobs: jax.Array,
               beta: float = 0.5) -> jax.Array:
    """D(p_teacher ‖ p_student) per position, from normalised log-probs over the last axis.

    Unscaled (no T²). 'jsd' is the generalized JSD divided by β(1 − β) (module docstring).
    """
    lt = teacher_logprobs.astype(jnp.float32)
    ls = student_logprobs.astype(jnp.float32)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(ls, lt)
    if kind == "jsd":
        log_m = jnp.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return (beta * _kl(lt, log_m) + (1.0 - beta) * _kl(ls, log_m)) / (beta * (1.0 - beta))
    if kind == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(lt) - jnp.exp(ls)), axis=-1)
    raise ValueError(f"kind={kind!r} is not a known divergence; choose from {list(KINDS)}")


def _tempered_logprobs(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def mixture_logprobs(teacher_logits: Sequence[jax.Array], temperature: float = 1.0
                     ) -> jax.Array:
    """log((1/n) Σ_j softmax(z_j / T)) over the last axis: the log of the teachers' mean
    tempered probabilities (a running `logaddexp`, so two arrays of that shape are live)."""
    if not teacher_logits:
        raise ValueError("mixture_logprobs needs at least one teacher's logits")
    log_sum = _tempered_logprobs(teacher_logits[0], temperature)
    for logits in teacher_logits[1:]:
        log_sum = jnp.logaddexp(log_sum, _tempered_logprobs(logits, temperature))
    return log_sum - math.log(len(teacher_logits))


# ------------------------------------------------------------------ objectives on logits


@dataclasses.dataclass(frozen=True)
class _Objective:
    """Static (hashable) description of one loss: the spec and where the teacher's targets
    come from."""

    spec: LossSpec
    mode: str  # 'dense' | 'mixture' | 'topk' | 'sampled'


def _kd_per_token(objective: _Objective, s_logits_BLV: jax.Array, teacher: tuple[jax.Array, ...]
                  ) -> tuple[jax.Array, jax.Array]:
    """(KD per position [B, L] with T², the teacher's top token [B, L])."""
    spec, temp = objective.spec, objective.spec.temperature
    if objective.mode == "dense":
        (t_logits_BLV,) = teacher
        kd_BL = divergence(spec.kind, _tempered_logprobs(t_logits_BLV, temp),
                           _tempered_logprobs(s_logits_BLV, temp), spec.beta)
        return temp**2 * kd_BL, jnp.argmax(t_logits_BLV, axis=-1)
    if objective.mode == "mixture":  # the teachers' mean tempered probabilities, as log-probs
        (t_logprobs_BLV,) = teacher
        kd_BL = divergence(spec.kind, t_logprobs_BLV, _tempered_logprobs(s_logits_BLV, temp),
                           spec.beta)
        return temp**2 * kd_BL, jnp.argmax(t_logprobs_BLV, axis=-1)
    idx_BLk, t_logprobs_BLk = teacher
    top_BL = jnp.take_along_axis(idx_BLk, jnp.argmax(t_logprobs_BLk, axis=-1)[..., None],
                                 axis=-1)[..., 0]
    if objective.mode == "topk":
        # Gather first, then normalise over the teacher's support (MaxText #4056).
        s_support_BLk = jnp.take_along_axis(s_logits_BLV, idx_BLk, axis=-1)
        kd_BL = divergence(spec.kind, _tempered_logprobs(t_logprobs_BLk, temp),
                           _tempered_logprobs(s_support_BLk, temp), spec.beta)
        return temp**2 * kd_BL, top_BL
    # 'sampled': full-vocabulary student log-softmax, uniform weight 1/n per teacher draw.
    s_at_draws_BLk = jnp.take_along_axis(_tempered_logprobs(s_logits_BLV, temp), idx_BLk,
                                         axis=-1)
    kd_BL = jnp.mean(t_logprobs_BLk.astype(jnp.float32) - s_at_draws_BLk, axis=-1)
    return temp**2 * kd_BL, top_BL


def _objective_sums(objective: _Objective, s_logits_BLV: jax.Array,
                    teacher: tuple[jax.Array, ...], targets_BL: jax.Array,
                    weights_BL: jax.Array) -> Metrics:
    """Token-weighted sums of one objective over whatever [B, L] slice it is given."""
    teacher = jax.lax.stop_gradient(teacher)
    weights_BL = weights_BL.astype(jnp.float32)
    kd_BL, teacher_top_BL = _kd_per_token(objective, s_logits_BLV, teacher)
    alpha = objective.spec.alpha
    # With alpha = 1 the CE is a metric only; cutting its gradient saves a [B, L, V] scatter.
    ce_logits_BLV = jax.lax.stop_gradient(s_logits_BLV) if alpha == 1.0 else s_logits_BLV
    ce_sum, count = lm.cross_entropy(ce_logits_BLV, targets_BL, weights_BL)
    kd_sum = jnp.sum(kd_BL * weights_BL)
    return {
        "loss_sum": alpha * kd_sum + (1.0 - alpha) * ce_sum,
        "kd_sum": kd_sum,
        "ce_sum": ce_sum,
        "top1_agreement_sum": lm.correct_top1(s_logits_BLV, teacher_top_BL, weights_BL),
        "count": count,
    }


def _finish(sums: Metrics) -> tuple[jax.Array, Metrics]:
    """(mean loss over counted tokens, or 0 when nothing counts; the sums)."""
    count = sums["count"]
    loss = jnp.where(count > 0, sums["loss_sum"] / jnp.maximum(count, 1e-30), 0.0)
    return loss, sums


def _logits(hidden_BLD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """Float32 logits with the head cast to the hidden states' (compute) dtype, as the model's
    `unembed` does, so fused logits equal `model.forward`'s."""
    return jnp.einsum("BLD,DV->BLV", hidden_BLD, head_DV.astype(hidden_BLD.dtype),
                      preferred_element_type=jnp.float32)


# ------------------------------------------------------------------ fused, chunked engine


def _chunk_teacher(objective: _Objective, teacher_BC: tuple[jax.Array, ...],
                   teacher_shared: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The teacher's targets for one chunk: its logits when dense, the log of the teachers'
    mean tempered probabilities for a mixture, the sparse arrays as given."""
    if objective.mode == "dense":
        (t_h_BCD,), (t_w_DV,) = teacher_BC, teacher_shared
        return (_logits(t_h_BCD, t_w_DV),)
    if objective.mode == "mixture":
        return (mixture_logprobs([_logits(h_BCD, w_DV) for h_BCD, w_DV
                                  in zip(teacher_BC, teacher_shared, strict=True)],
                                 objective.spec.temperature),)
    return teacher_BC


def _scan_chunks(objective: _Objective, with_grads: bool, s_h_BLD: jax.Array,
                 s_w_DV: jax.Array, teacher_BL: tuple[jax.Array, ...],
                 teacher_shared: tuple[jax.Array, ...], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[Metrics, Any]:
    """Sums over all chunks; with `with_grads`, also d loss_sum / d (student hidden, head)."""
    length = targets_BL.shape[1]
    chunk, _ = chunks.count(length, objective.spec.chunk_size)
    xs = jax.tree.map(lambda x: chunks.split(x, chunk),
                      (s_h_BLD, teacher_BL, targets_BL, weights_BL.astype(jnp.float32)))
    # Cast the head once, not once per chunk (the model's `unembed` casts it the same way).
    w_DV = s_w_DV.astype(s_h_BLD.dtype)
    zero_sums = {name: jnp.zeros((), jnp.float32) for name in METRIC_NAMES}

    def chunk_inputs(x):
        h_BCD, teacher_BC, targets_BC, weights_BC = x
        teacher_BC = _chunk_teacher(objective, teacher_BC, teacher_shared)
        return h_BCD, _logits(h_BCD, w_DV), teacher_BC, targets_BC, weights_BC

    def add(acc, sums):
        return jax.tree.map(jnp.add, acc, sums)

    if not with_grads:
        def body(acc, x):
            _, s_logits_BCV, teacher_BC, targets_BC, weights_BC = chunk_inputs(x)
            return add(acc, _objective_sums(objective, s_logits_BCV, teacher_BC, targets_BC,
                                            weights_BC)), None

        sums, _ = jax.lax.scan(body, zero_sums, xs)
        return sums, None

    def grad_body(carry, x):
        acc, dw_DV = carry
        h_BCD, s_logits_BCV, teacher_BC, targets_BC, weights_BC = chunk_inputs(x)

        def loss_of_logits(logits_BCV):
            sums = _objective_sums(objective, logits_BCV, teacher_BC, targets_BC, weights_BC)
            return sums["loss_sum"], sums

        _, vjp_fn, sums = jax.vjp(loss_of_logits, s_logits_BCV, has_aux=True)
        (g_BCV,) = vjp_fn(jnp.ones((), jnp.float32))
        # The two matmuls of the logits' backward, with float32 accumulation across chunks.
        g_BCV = g_BCV.astype(h_BCD.dtype)
        dh_BCD = jnp.einsum("BCV,DV->BCD", g_BCV, w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("BCD,BCV->DV", h_BCD, g_BCV,
                                   preferred_element_type=jnp.float32)
        return (add(acc, sums), dw_DV), dh_BCD.astype(h_BCD.dtype)

    dw0_DV = jnp.zeros(s_w_DV.shape, jnp.float32)
    (sums, dw_DV), dh_nBCD = jax.lax.scan(grad_body, (zero_sums, dw0_DV), xs)
    dh_BLD = chunks.merge(dh_nBCD, length)
    return sums, (dh_BLD, dw_DV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(objective: _Objective, s_h_BLD: jax.Array, s_w_DV: jax.Array,
                teacher_BL: tuple[jax.Array, ...], teacher_shared: tuple[jax.Array, ...],
                targets_BL: jax.Array, weights_BL: jax.Array) -> Metrics:
    sums, _ = _scan_chunks(objective, False, s_h_BLD, s_w_DV, teacher_BL, teacher_shared,
                           targets_BL, weights_BL)
    return sums


def _fused_fwd(objective, s_h_BLD, s_w_DV, teacher_BL, teacher_shared, targets_BL,
               weights_BL):
    sums, grads = _scan_chunks(objective, True, s_h_BLD, s_w_DV, teacher_BL, teacher_shared,
                               targets_BL, weights_BL)
    dh_BLD, dw_DV = grads
    return sums, (dh_BLD, dw_DV.astype(s_w_DV.dtype))


def _fused_bwd(objective, residuals, cotangent: Metrics):
    dh_BLD, dw_DV = residuals  # gradients of loss_sum, in the dtypes of hidden and head
    g = cotangent["loss_sum"]  # only the loss is differentiable (metrics: stop_gradient)
    # The teacher, targets and weights get no gradient (None = symbolic zero).
    return ((g * dh_BLD).astype(dh_BLD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None,
            None, None)


_fused_sums.defvjp(_fused_fwd, _fused_bwd)


def _fused_loss(objective: _Objective, s_h_BLD: jax.Array, s_w_DV: jax.Array,
                teacher_BL: tuple[jax.Array, ...], teacher_shared: tuple[jax.Array, ...],
                targets_BL: jax.Array, weights_BL: jax.Array) -> tuple[jax.Array, Metrics]:
    teacher_BL, teacher_shared = jax.lax.stop_gradient((teacher_BL, teacher_shared))
    sums = _fused_sums(objective, s_h_BLD, s_w_DV, teacher_BL, teacher_shared, targets_BL,
                       weights_BL)
    sums = {name: v if name == "loss_sum" else jax.lax.stop_gradient(v)
            for name, v in sums.items()}
    return _finish(sums)


# ------------------------------------------------------------------ checks


def _check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student vocab V={student_vocab} != teacher vocab V={teacher_vocab}: logit "
            "distillation needs one shared tokenizer; give the student the teacher's "
            "tokenizer and vocab size (pad its embedding and head to V if needed)")


def _check_tokens(name: str, x: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
                  ) -> None:
    if targets_BL.shape != weights_BL.shape or targets_BL.ndim != 2:
        raise ValueError(f"targets {targets_BL.shape} and weights {weights_BL.shape} must both "
                         "be [B, L]; get them from lm.next_token_targets(batch)")
    if x.shape[:2] != targets_BL.shape:
        raise ValueError(f"{name} has leading shape {x.shape[:2]}, targets have "
                         f"{targets_BL.shape}; both must be [B, L] of the same batch")


def _check_head(name: str, hidden_BLD: jax.Array, head_DV: jax.Array) -> None:
    if head_DV.ndim != 2 or hidden_BLD.ndim != 3 or hidden_BLD.shape[-1] != head_DV.shape[0]:
        raise ValueError(
            f"{name} hidden {hidden_BLD.shape} and head {head_DV.shape} must be [B, L, D] and "
            "[D, V] with the same D; pass model.hidden_states(...) and "
            "model.lm_head_weights(cfg, params)")


# ------------------------------------------------------------------ public losses


def distill_loss_from_logits(student_logits_BLV: jax.Array, teacher_logits_BLV: jax.Array,
                             targets_BL: jax.Array, weights_BL: jax.Array, spec: LossSpec
                             ) -> tuple[jax.Array, Metrics]:
    """The unfused reference: (mean loss over counted tokens, token-weighted metric sums).

    Materialises both [B, L, V] logits; `distill_loss` gives the same value and gradient
    without them. The teacher is under `stop_gradient`.
    """
    _check_vocab(student_logits_BLV.shape[-1], teacher_logits_BLV.shape[-1])
    _check_tokens("student logits", student_logits_BLV, targets_BL, weights_BL)
    _check_tokens("teacher logits", teacher_logits_BLV, targets_BL, weights_BL)
    token_ids.maybe_check(targets_BL, student_logits_BLV.shape[-1], where="targets")
    return _finish(_objective_sums(_Objective(spec, "dense"), student_logits_BLV,
                                   (teacher_logits_BLV,), targets_BL, weights_BL))


def distill_loss(student_hidden_BLD: jax.Array, student_head_DV: jax.Array,
                 teacher_hidden_BLD: jax.Array, teacher_head_DV: jax.Array,
                 targets_BL: jax.Array, weights_BL: jax.Array, spec: LossSpec
                 ) -> tuple[jax.Array, Metrics]:
    """(mean loss over counted tokens, token-weighted metric sums), fused with both LM heads.

    Hidden states are the final-norm outputs (`model.hidden_states`) in the compute dtype;
    heads are `model.lm_head_weights` ([D, V], cast to the hidden dtype as the model does).
    With `spec.chunk_size`, logits exist one [B, chunk, V] slice at a time (L is padded to a
    multiple of the chunk internally, the padding weighs 0); None computes whole logits.
    Student and teacher may differ in D, not in V.
    """
    _check_head("student", student_hidden_BLD, student_head_DV)
    _check_head("teacher", teacher_hidden_BLD, teacher_head_DV)
    _check_vocab(student_head_DV.shape[-1], teacher_head_DV.shape[-1])
    _check_tokens("student hidden", student_hidden_BLD, targets_BL, weights_BL)
    _check_tokens("teacher hidden", teacher_hidden_BLD, targets_BL, weights_BL)
    token_ids.maybe_check(targets_BL, student_head_DV.shape[-1], where="targets")
    teacher_hidden_BLD, teacher_head_DV = jax.lax.stop_gradient(
        (teacher_hidden_BLD, teacher_head_DV))
    if spec.chunk_size is None:
        return distill_loss_from_logits(_logits(student_hidden_BLD, student_head_DV),
                                        _logits(teacher_hidden_BLD, teacher_head_DV),
                                        targets_BL, weights_BL, spec)
    return _fused_loss(_Objective(spec, "dense"), student_hidden_BLD, student_head_DV,
                       (teacher_hidden_BLD,), (teacher_head_DV.astype(teacher_hidden_BLD.dtype),),
                       targets_BL, weights_BL)


def mixture_distill_loss(student_hidden_BLD: jax.Array, student_head_DV: jax.Array,
                         teacher_hiddens: Sequence[jax.Array], teacher_heads: Sequence[jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, spec: LossSpec
                         ) -> tuple[jax.Array, Metrics]:
    """`distill_loss` against the arithmetic mean of n teachers' tempered probabilities.

    `teacher_hiddens[j]` [B, L, D_j] and `teacher_heads[j]` [D_j, V] are teacher j's final
    hidden states and head (the teachers may differ in D, not in V); all are under
    `stop_gradient`. Fused and chunked like `distill_loss` (no [B, L, V] pair live with
    `spec.chunk_size`); with one teacher it is `distill_loss`. `top1_agreement_sum` compares
    with the mixture's argmax. Why the mean of probabilities: the module docstring.
    """
    teacher_hiddens, teacher_heads = tuple(teacher_hiddens), tuple(teacher_heads)
    if not teacher_hiddens or len(teacher_hiddens) != len(teacher_heads):
        raise ValueError(f"{len(teacher_hiddens)} teacher hidden states and "
                         f"{len(teacher_heads)} heads: give one head per teacher, at least one")
    _check_head("student", student_hidden_BLD, student_head_DV)
    _check_tokens("student hidden", student_hidden_BLD, targets_BL, weights_BL)
    for j, (hidden_BLD, head_DV) in enumerate(zip(teacher_hiddens, teacher_heads, strict=True)):
        _check_head(f"teacher {j}", hidden_BLD, head_DV)
        _check_vocab(student_head_DV.shape[-1], head_DV.shape[-1])
        _check_tokens(f"teacher {j} hidden", hidden_BLD, targets_BL, weights_BL)
    token_ids.maybe_check(targets_BL, student_head_DV.shape[-1], where="targets")
    teacher_hiddens, teacher_heads = jax.lax.stop_gradient((teacher_hiddens, teacher_heads))
    objective = _Objective(spec, "mixture")
    if spec.chunk_size is None:
        teacher = (mixture_logprobs([_logits(h, w) for h, w in zip(teacher_hiddens,
                                                                   teacher_heads, strict=True)],
                                    spec.temperature),)
        return _finish(_objective_sums(objective, _logits(student_hidden_BLD, student_head_DV),
                                       teacher, targets_BL, weights_BL))
    heads = tuple(w.astype(h.dtype) for h, w in zip(teacher_hiddens, teacher_heads, strict=True))
    return _fused_loss(objective, student_hidden_BLD, student_head_DV, teacher_hiddens, heads,
                       targets_BL, weights_BL)


def sparse_distill_loss(student_hidden_BLD: jax.Array, student_head_DV: jax.Array,
                        teacher_idx_BLk: jax.Array, teacher_logprobs_BLk: jax.Array,
                        targets_BL: jax.Array, weights_BL: jax.Array, spec: LossSpec, *,
                        mode: str = "topk") -> tuple[jax.Array, Metrics]:
    """`distill_loss` against offline sparse teacher targets (same outputs, same chunking).

    mode='topk': (indices, log-probs) from `top_k_teacher_targets` (log-probs at T = 1; they
      are re-tempered and renormalised over the k entries here), any `spec.kind`.
    mode='sampled': draws from `sample_teacher_targets` made at `temperature=spec.temperature`
      (log-probs of the tempered teacher); forward KL only; unbiased (module docstring).
    `top1_agreement_sum` compares with the most probable of the k teacher tokens.
    """
    if mode not in SPARSE_MODES:
        raise ValueError(f"mode={mode!r} is not a sparse target mode; choose from "
                         f"{list(SPARSE_MODES)}")
    if mode == "sampled" and spec.kind != "forward_kl":
        raise ValueError(f"mode='sampled' estimates forward KL only (unbiased because it is "
                         f"linear in the teacher's probabilities), got kind={spec.kind!r}; "
                         "use kind='forward_kl' or mode='topk'")
    _check_head("student", student_hidden_BLD, student_head_DV)
    _check_tokens("student hidden", student_hidden_BLD, targets_BL, weights_BL)
    _check_tokens("teacher indices", teacher_idx_BLk, targets_BL, weights_BL)
    if teacher_idx_BLk.shape != teacher_logprobs_BLk.shape:
        raise ValueError(f"teacher indices {teacher_idx_BLk.shape} and log-probs "
                         f"{teacher_logprobs_BLk.shape} must have the same [B, L, k] shape")
    vocab = student_head_DV.shape[-1]
    token_ids.maybe_check(targets_BL, vocab, where="targets")
    token_ids.maybe_check(teacher_idx_BLk, vocab, where="teacher indices")
    if teacher_idx_BLk.shape[-1] > vocab:
        raise ValueError(f"k={teacher_idx_BLk.shape[-1]} teacher targets exceed the student "
                         f"vocab V={vocab}; the cache must come from a teacher with the same V")
    teacher = jax.lax.stop_gradient((teacher_idx_BLk, teacher_logprobs_BLk))
    objective = _Objective(spec, mode)
    if spec.chunk_size is None:
        return _finish(_objective_sums(objective, _logits(student_hidden_BLD, student_head_DV),
                                       teacher, targets_BL, weights_BL))
    return _fused_loss(objective, student_hidden_BLD, student_head_DV, teacher, (),
                       targets_BL, weights_BL)


# ------------------------------------------------------------------ sparse targets


def top_k_teacher_targets(teacher_logits_BLV: jax.Array, k: int
                          ) -> tuple[jax.Array, jax.Array]:
    """(indices [B, L, k] int32, log-probs [B, L, k] float32 at T = 1) of the k likeliest tokens.

    Log-probs are normalised over the full vocabulary (what an offline cache stores);
    `sparse_distill_loss(mode='topk')` renormalises them over the k kept.
    """
    if not 1 <= k <= teacher_logits_BLV.shape[-1]:
        raise ValueError(f"k={k} must be in [1, V={teacher_logits_BLV.shape[-1]}]")
    logits = teacher_logits_BLV.astype(jnp.float32)
    top_logits_BLk, idx_BLk = jax.lax.top_k(logits, k)
    return idx_BLk.astype(jnp.int32), top_logits_BLk - jax.nn.logsumexp(logits, axis=-1,
                                                                         keepdims=True)


def sample_teacher_targets(teacher_logits_BLV: jax.Array, rng: jax.Array, n_samples: int, *,
                           temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(indices [B, L, n] int32, log p_T at them [B, L, n] float32): n i.i.d. draws per
    position from the tempered teacher p_T = softmax(z / T), with replacement.

    The proposal is p_T itself, so every draw weighs 1/n (Random-Sampling KD, arXiv
    2503.16870); the log-probs make the KL *value* estimable too. Use with
    `sparse_distill_loss(mode='sampled')` at the same temperature.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1 (the paper uses about 12)")
    logprobs_BLV = _tempered_logprobs(teacher_logits_BLV, temperature)
    idx_nBL = jax.random.categorical(rng, logprobs_BLV, axis=-1,
                                     shape=(n_samples, *logprobs_BLV.shape[:-1]))
    idx_BLn = jnp.moveaxis(idx_nBL, 0, -1).astype(jnp.int32)
    return idx_BLn, jnp.take_along_axis(logprobs_BLV, idx_BLn, axis=-1)
