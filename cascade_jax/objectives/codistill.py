"""`codistill`: the stages of a group train together, each on CE plus α·KL to its peers.

Every member is a stage of its own (its own parent pruning, target, optimizer, output
directory and results row); the stages naming one `group` are trained in one jitted step
(`distill.codistill`: deep mutual learning, Zhang et al. 2018, arXiv 1706.00384, with live
peers; codistillation, Anil et al. 2018, arXiv 1804.03235, with copies refreshed every k
steps):

    stages.child_depth = dict(parent='root', target=dict(n_layers=2), objective='codistill',
                              codistill=dict(group='pair', alpha=0.5, refresh_every=0))
    stages.child_width = dict(parent='root', target=dict(d_ff=48, d_model=24),
                              hidden_method='pca', objective='codistill',
                              codistill=dict(group='pair', alpha=0.5, refresh_every=0))

The cascade makes each member's child, hands all their contexts to `build_group`, runs the
joint state through the shared loop, then writes each member's params as its own stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from cascade_jax import aot, validate
from cascade_jax.config import ModelConfig
from cascade_jax.distill import codistill, losses
from cascade_jax.objectives.base import Built, GroupBuilt, StageContext


@dataclasses.dataclass(frozen=True)
class Settings:
    """group: the name shared by the stages trained together. alpha: loss = CE + alpha·D
    (0 = each member trains alone, on the same batches). refresh_every: 0 = the peers' live
    predictions; k = frozen copies of the peers refreshed every k steps. kind / temperature /
    beta / chunk_size: the divergence D(peers' mean prediction ‖ own), as `distill.LossSpec`."""

    group: str = ""
    alpha: float = 0.5
    refresh_every: int = 0
    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    chunk_size: int | None = 512

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group.isidentifier():
            raise ValueError(f"group={self.group!r} must name the group with an identifier, "
                             "the same in every stage trained together (e.g. group='pair')")
        validate.number("alpha", self.alpha, low=0.0,
                        hint="the weight of KL to the peers; 0 = cross-entropy alone")
        validate.non_negative_int("refresh_every", self.refresh_every,
                                  "0 = live peers; k = copies refreshed every k steps")
        losses.LossSpec(kind=self.kind, temperature=self.temperature, beta=self.beta,
                        chunk_size=self.chunk_size)  # checks the divergence's fields


@dataclasses.dataclass(frozen=True)
class Codistillation:
    name: str = "codistill"
    loss_label: str = "CE + α·KL to the peers (sum over the group)"
    uses_teacher: bool = False
    groups: bool = True

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Settings:
        if "group" not in block:
            raise ValueError(f"{key}.group is not set; name the group of stages trained "
                             f"together, e.g. --{key}.group=pair")
        return validate.construct(Settings, block, key)

    def check_group(self, stages: Sequence[Any]) -> None:
        """The members share one peer exchange (one state): the same `refresh_every`."""
        first = stages[0]
        for stage in stages[1:]:
            if stage.settings.refresh_every != first.settings.refresh_every:
                raise ValueError(
                    f"{stage.key}.{self.name}.refresh_every={stage.settings.refresh_every} but "
                    f"{first.key}.{self.name}.refresh_every={first.settings.refresh_every}; "
                    f"the stages of group {first.settings.group!r} share one exchange of "
                    "predictions: give them the same refresh_every")

    def build(self, ctx: StageContext) -> Built:
        raise ValueError(f"stage {ctx.stage_name!r}: objective 'codistill' trains the stages "
                         "of a group together (cascade.run does); a stage alone has no peers")

    def build_group(self, ctxs: Sequence[StageContext]) -> GroupBuilt:
        ccfg = group_config(ctxs)
        optimizers = tuple(ctx.optimizer for ctx in ctxs)
        mesh = ctxs[0].mesh
        shardings = codistill.state_shardings(ccfg, optimizers, mesh)

        def make_state() -> codistill.GroupState:
            return codistill.create_state(ccfg, optimizers, shardings,
                                          member_params=[ctx.child_params for ctx in ctxs],
                                          rngs=[ctx.rng for ctx in ctxs])

        built = Built(
            step_fn=codistill.jit_train_step(ccfg, optimizers, mesh, shardings),
            abstract_state=codistill.abstract_state(ccfg, optimizers, shardings),
            make_state=make_state, batches=ctxs[0].train_batches(),
            lineage={self.name: {ctx.stage_name: dataclasses.asdict(ctx.settings)
                                 for ctx in ctxs}})
        return GroupBuilt(built=built, member_params=tuple)

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Settings,
                  *, optimizer: Any, batch_size: int, seq_len: int, grad_accum: int
                  ) -> aot.StepSpec:
        """One member's share, planned as its CE train step: the joint step holds every
        member's state and activations at once (add the members' rows), plus N − 1 peer
        logit chunks per member."""
        return aot.StepSpec("train", student, batch_size, seq_len, optimizer,
                            micro_batches=grad_accum)


def group_config(ctxs: Sequence[StageContext]) -> codistill.CodistillConfig:
    """The joint step's static config from the members' contexts (in group order)."""
    members = tuple(codistill.Member(
        ctx.stage_name, ctx.student, alpha=ctx.settings.alpha, kind=ctx.settings.kind,
        temperature=ctx.settings.temperature, beta=ctx.settings.beta,
        chunk_size=ctx.settings.chunk_size) for ctx in ctxs)
    return codistill.CodistillConfig(members, refresh_every=ctxs[0].settings.refresh_every,
                                     grad_accum=ctxs[0].grad_accum)
