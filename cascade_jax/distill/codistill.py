"""Codistillation: N models trained together in one jitted, sharded step, each on its own
cross-entropy plus α·D(peers' averaged prediction ‖ its own).

Deep mutual learning (Zhang et al. 2018, arXiv 1706.00384) trains a cohort of students that
teach each other from their *current* predictions; codistillation (Anil et al. 2018, arXiv
1804.03235) does the same at scale, with each model reading its peers' predictions from copies
of their parameters exchanged only every k steps (cheap across pods, and the peers' targets
then change slowly). Both are one step here:

    loss_i = CE(model i, ground truth) + α_i · T² · D(p̄_{-i} ‖ p_i)
    p̄_{-i} = (1 / (N − 1)) Σ_{j ≠ i} softmax(z_j / T)       (`losses.mixture_distill_loss`)

* `refresh_every = 0` (live, DML): the peers are the other models' predictions in this very
  forward pass, under `stop_gradient`; each model is run once per (micro-)batch.
* `refresh_every = k > 0` (Anil et al.): frozen copies of all N models live in the train state
  (`GroupState.peers`), so a resumed run reads the same stale peers. At every step whose
  number is a multiple of k (0, k, 2k, ...) the copies are set to the current params before
  the step uses them; a step runs the N copies forward too (no gradients).

Why the mean of probabilities, not of log-probs: the `distill.losses` docstring (with forward
KL, the mixture's gradient equals the mean of the per-peer KL gradients). Loss = CE + α·D is
the fused loss's mix `a·D + (1 − a)·CE` with a = α / (1 + α), times (1 + α), so no [B, L, V]
pair is live with `chunk_size` set. Each model's logits are made once as a student and once
per peer (N² logit products per chunk instead of N): the price of never keeping them.

Every model keeps its own optimizer (its stage's learning rate, schedule, clipping, moments):
with α = 0 a model trains as it would alone (up to float rounding), and a member's slice of
the state (`member_states`) is an ordinary `steps.TrainState`. Letters: N = models in the group.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cascade_jax import lm, model, sharding, steps, validate
from cascade_jax.config import ModelConfig
from cascade_jax.distill import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a group: its name (metric prefix), shape, and how hard its peers pull.

    alpha: weight of the divergence to the peers (loss = CE + alpha·D; 0 = CE alone).
    kind / temperature / beta / chunk_size: the divergence, as in `losses.LossSpec`.
    """

    name: str
    cfg: ModelConfig
    alpha: float = 0.5
    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    chunk_size: int | None = 512

    def __post_init__(self) -> None:
        validate.string("name", self.name, allow_empty=False)
        validate.number(f"member {self.name!r} alpha", self.alpha, low=0.0,
                        hint="the weight of KL to the peers; 0 = cross-entropy alone")
        _ = self.spec  # validates kind, temperature, beta, chunk_size

    @property
    def spec(self) -> losses.LossSpec:
        """The fused loss's spec: its CE mix a = alpha / (1 + alpha) (times 1 + alpha below)."""
        return losses.LossSpec(kind=self.kind, temperature=self.temperature,
                               alpha=self.alpha / (1.0 + self.alpha), beta=self.beta,
                               chunk_size=self.chunk_size)


@dataclasses.dataclass(frozen=True)
class CodistillConfig:
    """Everything static about a group's step (hashable: it keys jit caches)."""

    members: tuple[Member, ...]
    refresh_every: int = 0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.members, tuple) or len(self.members) < 2:
            raise ValueError(f"a codistillation group needs a tuple of at least 2 members, got "
                             f"{self.members!r}")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names {names} repeat; each names its metrics")
        vocab = {m.name: m.cfg.vocab_size for m in self.members}
        if len(set(vocab.values())) != 1:
            raise ValueError(f"members' vocab_size differ ({vocab}); codistillation compares "
                             "predictions token by token: give every member one tokenizer")
        validate.non_negative_int("refresh_every", self.refresh_every,
                                  "0 = live peers; k = frozen copies refreshed every k steps")
        validate.positive_int("grad_accum", self.grad_accum, "1 = the whole batch at once")


@flax.struct.dataclass
class GroupState:
    """The joint train state: one entry per member in every tuple; `peers` holds the frozen
    copies (`refresh_every > 0`) or None (live peers)."""

    step: jax.Array
    params: tuple[Any, ...]
    opt_state: tuple[Any, ...]
    peers: tuple[Any, ...] | None


Optimizers = Sequence[optax.GradientTransformation]


# ----------------------------------------------------------------------------- the state


def member_states(state: GroupState) -> tuple[steps.TrainState, ...]:
    """Each member's own `TrainState` (step, its params, its optimizer state)."""
    return tuple(steps.TrainState(step=state.step, params=p, opt_state=o)
                 for p, o in zip(state.params, state.opt_state, strict=True))


def _check_optimizers(ccfg: CodistillConfig, optimizers: Optimizers) -> None:
    if len(optimizers) != len(ccfg.members):
        raise ValueError(f"{len(optimizers)} optimizers for {len(ccfg.members)} members; give "
                         "one per member (each keeps its own moments)")


def state_shardings(ccfg: CodistillConfig, optimizers: Optimizers, mesh: Mesh,
                    rules: Any = sharding.DEFAULT_RULES) -> GroupState:
    """Each member's params and moments sharded by its own logical axes; copies like params."""
    _check_optimizers(ccfg, optimizers)
    each = [steps.model_state_shardings(m.cfg, opt, mesh, rules)
            for m, opt in zip(ccfg.members, optimizers, strict=True)]
    params = tuple(s.params for s in each)
    return GroupState(step=sharding.replicated(mesh), params=params,
                      opt_state=tuple(s.opt_state for s in each),
                      peers=params if ccfg.refresh_every else None)


def abstract_state(ccfg: CodistillConfig, optimizers: Optimizers, shardings: GroupState
                   ) -> GroupState:
    """ShapeDtypeStructs of the joint state on `shardings` (`state_shardings`): the checkpoint
    restore target."""
    each = [steps.abstract_state(opt, model.param_shapes(m.cfg), s)
            for m, opt, s in zip(ccfg.members, optimizers, member_states(shardings), strict=True)]
    params = tuple(s.params for s in each)
    return GroupState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                      params=params, opt_state=tuple(s.opt_state for s in each),
                      peers=params if ccfg.refresh_every else None)


def create_state(ccfg: CodistillConfig, optimizers: Optimizers, shardings: GroupState, *,
                 member_params: Sequence[model.Params | None],
                 rngs: Sequence[jax.Array | None] | None = None) -> GroupState:
    """The joint state made straight into `shardings` (one compiled call): member i starts
    from `member_params[i]` (a pruned child) or, when None, a random init from `rngs[i]`; the
    copies (refresh_every > 0) equal the params, in buffers of their own (both are donated)."""
    _check_optimizers(ccfg, optimizers)
    rngs = list(rngs) if rngs is not None else [None] * len(ccfg.members)
    missing = [m.name for m, p, r in zip(ccfg.members, member_params, rngs, strict=True)
               if p is None and r is None]
    if missing:
        raise ValueError(f"members {missing} have neither params nor an rng to init from")

    def make(params_N: Sequence[Any], rngs_N: Sequence[Any]) -> GroupState:
        params = tuple(model.init(m.cfg, rng) if p is None else p
                       for m, p, rng in zip(ccfg.members, params_N, rngs_N, strict=True))
        return GroupState(
            step=jnp.zeros((), jnp.int32), params=params,
            opt_state=tuple(opt.init(p) for opt, p in zip(optimizers, params, strict=True)),
            peers=jax.tree.map(jnp.copy, params) if ccfg.refresh_every else None)

    return jax.jit(make, out_shardings=shardings)(tuple(member_params), rngs)


# ------------------------------------------------------------------------------ the loss


def _hidden_and_head(cfg: ModelConfig, params: model.Params, batch: Batch
                     ) -> tuple[jax.Array, jax.Array]:
    hidden_BLD = model.hidden_states(cfg, params, batch["tokens"], batch.get("segment_ids"),
                                     batch.get("positions"))
    return hidden_BLD, model.lm_head_weights(cfg, params)


def loss_sums(ccfg: CodistillConfig, params_N: Sequence[model.Params],
              peers_N: Sequence[model.Params] | None, batch: Batch
              ) -> tuple[jax.Array, Metrics]:
    """(Σ_i loss_i as a token SUM to differentiate, metric sums) for one (micro-)batch.

    `peers_N` None: the peers are the models' own forward (live); else the frozen copies.
    Metrics: `<name>/loss_sum` (CE + α·D), `<name>/ce_sum`, `<name>/kd_sum` (D, T² included),
    `<name>/top1_agreement_sum` (with the peers' mixture) per member; `loss_sum` (the total),
    `ce_sum` (the members' mean CE, so the loop's perplexity is their geometric mean), `count`.
    """
    targets_BL, weights_BL = lm.next_token_targets(batch)
    own = [_hidden_and_head(m.cfg, p, batch) for m, p in zip(ccfg.members, params_N,
                                                             strict=True)]
    if peers_N is None:
        peers = jax.lax.stop_gradient(own)
    else:
        peers = [_hidden_and_head(m.cfg, q, batch) for m, q in
                 zip(ccfg.members, jax.lax.stop_gradient(tuple(peers_N)), strict=True)]
    total, ce_total, metrics = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {}
    for i, member in enumerate(ccfg.members):
        others = [peers[j] for j in range(len(ccfg.members)) if j != i]
        _, sums = losses.mixture_distill_loss(*own[i], [h for h, _ in others],
                                              [w for _, w in others], targets_BL, weights_BL,
                                              member.spec)
        loss_i = (1.0 + member.alpha) * sums["loss_sum"]  # = CE + alpha·D
        total = total + loss_i
        ce_total = ce_total + sums["ce_sum"]
        metrics.update({f"{member.name}/loss_sum": jax.lax.stop_gradient(loss_i),
                        f"{member.name}/ce_sum": sums["ce_sum"],
                        f"{member.name}/kd_sum": sums["kd_sum"],
                        f"{member.name}/top1_agreement_sum": sums["top1_agreement_sum"]})
    metrics.update(loss_sum=jax.lax.stop_gradient(total),
                   ce_sum=ce_total / len(ccfg.members), count=sums["count"])
    return total, metrics


def refreshed_peers(refresh_every: int, step: jax.Array, params: tuple[Any, ...],
                    peers: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The copies a step reads: the current params at steps 0, k, 2k, ..., else as they were."""
    if not refresh_every:
        return None
    refresh = step % refresh_every == 0
    return jax.tree.map(lambda p, q: jnp.where(refresh, p, q), params, peers)


# ------------------------------------------------------------------------------ the step


def train_step(ccfg: CodistillConfig, optimizers: Optimizers, state: GroupState, batch: Batch
               ) -> tuple[GroupState, Metrics]:
    """One optimizer step of every member; `grad_norm` is the group's, `<name>/grad_norm`
    each member's (clipping is per member, by its own optimizer)."""
    peers = refreshed_peers(ccfg.refresh_every, state.step, state.params, state.peers)
    loss_fn = functools.partial(_loss_of_params, ccfg, peers)
    grads_N, metrics = steps.accumulate_grads(loss_fn, ccfg.grad_accum, state.params, batch)
    updated = []
    for member, opt, member_state, grads in zip(ccfg.members, optimizers, member_states(state),
                                                grads_N, strict=True):
        new_state, extra = steps.apply_grads(opt, member_state, grads, {})
        metrics[f"{member.name}/grad_norm"] = extra["grad_norm"]
        updated.append(new_state)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.square(metrics[f"{m.name}/grad_norm"])
                                        for m in ccfg.members))
    return GroupState(step=state.step + 1, params=tuple(s.params for s in updated),
                      opt_state=tuple(s.opt_state for s in updated), peers=peers), metrics


def _loss_of_params(ccfg: CodistillConfig, peers: tuple[Any, ...] | None,
                    params: tuple[Any, ...], batch: Batch) -> tuple[jax.Array, Metrics]:
    return loss_sums(ccfg, params, peers, batch)


def jit_train_step(ccfg: CodistillConfig, optimizers: Optimizers, mesh: Mesh,
                   shardings: GroupState | None = None, rules: Any = sharding.DEFAULT_RULES
                   ) -> steps.StepFn:
    """`train_step` compiled for `mesh`: `(state, batch) -> (state, metrics)`, the joint state
    sharded member by member (`shardings`, default `state_shardings`) and donated, the batch
    split over data × fsdp."""
    optimizers = tuple(optimizers)
    if shardings is None:
        shardings = state_shardings(ccfg, optimizers, mesh, rules)
    return steps.jit_step(functools.partial(train_step, ccfg, optimizers), shardings, mesh,
                          rules=rules)
