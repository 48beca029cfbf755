"""What a stage objective is: the contract between `cascade` and one objective module.

A stage is (how the child starts) × (what it trains on). The cascade makes the child (pruned,
random or the parent as is), finds its teacher, and hands both to the stage's objective as a
`StageContext`; the objective returns a `Built`: its jitted step, the state it starts from
(fresh or restored), the batches it consumes, and how to read the child's decoder params back
out of its state. The cascade then runs the shared loop (`loop.fit_with_checkpoints`),
evaluates and records the stage, with no branch on which objective it was.

Objectives that train several stages together (`groups = True`, e.g. `codistill`) get every
member's context at once (`build_group(ctxs) -> GroupBuilt`): the cascade makes each member's
child as for any stage, drives the one joint state through the same loop, and writes each
member's params out as that member's stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import optax
from jax.sharding import Mesh

from cascade_jax import model, tasks
from cascade_jax.config import ModelConfig
from cascade_jax.steps import Batch, Metrics, TrainState

if TYPE_CHECKING:  # data pulls in grain; importing an objective must not
    import tokenizers

    from cascade_jax.data import DataConfig

HostBatch = dict[str, Any]


@dataclasses.dataclass
class Trained:
    """A finished model of the run: its config, params (sharded) and where it lives."""

    name: str
    cfg: ModelConfig
    params: model.Params
    directory: str
    fingerprint: str = ""  # identity of the files it was read from (`cascade`'s lineage check)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """Everything an objective may use to build its training.

    `child_params` is None for a random init (the objective initialises from `rng`).
    `train_batches()` makes the run's training iterator (packed batches, checkpointable): LM
    batches, or prompt/completion batches with a `loss_mask` when the run has a `task` (the
    `config.task` block; its problems and verifier are there for objectives that generate);
    `settings` is what the objective's own `parse_settings` returned for this stage.
    Objectives that make their own data (teacher samples, rollouts) also get the stage's
    `directory` (to keep that data next to its checkpoints), the run's `tokenizer`, its
    `data` config (row shape, global batch) and `seed`.
    """

    stage_name: str
    student: ModelConfig
    child_params: model.Params | None
    teacher: Trained | None
    settings: Any
    mesh: Mesh
    optimizer: optax.GradientTransformation
    rng: jax.Array
    grad_accum: int
    train_batches: Callable[[], Iterator[dict[str, Any]]]
    task: tasks.Task | None = None
    directory: str = ""
    tokenizer: tokenizers.Tokenizer | None = None
    data: DataConfig | None = None
    seed: int = 0


    def require_task(self, objective: str) -> None:
        """Objectives that sample a task's prompts need its task, tokenizer and row shape."""
        if self.task is None or self.data is None or self.tokenizer is None:
            raise ValueError(f"stage {self.stage_name!r}: objective {objective!r} samples a "
                             "task's prompts; give the run a config.task block")


@dataclasses.dataclass(frozen=True)
class Built:
    """An objective's training, ready for the loop.

    step_fn: `(state, host-sharded batch) -> (state, metric sums with `loss_sum` and `count`)`.
    abstract_state: ShapeDtypeStructs with shardings, the checkpoint restore target.
    make_state: the fresh state (only called when there is no checkpoint to resume).
    batches: the iterator the step consumes; its position is checkpointed with the state.
    model_params: state params -> the child's decoder params (what the next stage prunes).
    lineage: extra metadata saved with every checkpoint of the stage.
    prepare_batch: `(state, host batch) -> host batch`, run by the loop before each step on
      the current state: where an objective replaces the data by what a model generates
      now (on-policy distillation, rollouts). It must depend only on the state and the batch
      (its randomness keyed by `state.step`), so a resumed run prepares the same batches.
    """

    step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    abstract_state: TrainState
    make_state: Callable[[], TrainState]
    batches: Iterator[dict[str, Any]]
    model_params: Callable[[Any], model.Params] = lambda params: params
    lineage: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prepare_batch: Callable[[TrainState, HostBatch], HostBatch] | None = None


@dataclasses.dataclass(frozen=True)
class GroupBuilt:
    """A group's joint training, ready for the loop (objectives with `groups = True`).

    built: the joint step, state, batches and lineage, driven like any stage's `Built`.
    member_params: joint state params -> each member's decoder params, in the group's order
      (each is evaluated against its own stage's teacher, and saved as its stage's output).
    The step's metric sums of member `<stage>` are named `<stage>/<metric>_sum`; the cascade
    copies them into the member's own `metrics.jsonl` without the prefix.
    """

    built: Built
    member_params: Callable[[Any], Sequence[model.Params]]


class Objective(Protocol):
    """One stage objective. `name` is what configs write (`objective='kd'`) and the name of
    its settings block; `loss_label` says what its training `loss` measures (plots keep
    objectives with different labels on separate axes); `uses_teacher` tells the cascade
    whether the stage's teacher may be needed for training (it is always used to evaluate),
    and an optional `teacher_used(settings) -> bool` says whether these settings need it
    (`objectives.trains_on_teacher`); `needs_task` (optional, default False) makes a run
    without `config.task` fail at config time instead of at the stage.

    Grouped objectives (optional `groups = True`) also give their settings a `group: str`
    field, `build_group(ctxs) -> GroupBuilt` and, optionally, `check_group(stages)` (config-
    time checks across the members, after the cascade's own: two or more consecutive stages
    sharing parent, steps and grad_accum)."""

    name: str
    loss_label: str
    uses_teacher: bool

    def parse_settings(self, block: Mapping[str, Any], key: str) -> Any:
        """The validated settings from the stage's `<name>` config block (errors name `key`)."""
        ...

    def build(self, ctx: StageContext) -> Built:
        """The step, states and batches of a stage trained by this objective."""
        ...

    def step_spec(self, student: ModelConfig, teacher: ModelConfig | None, settings: Any, *,
                  optimizer: optax.GradientTransformation, batch_size: int, seq_len: int,
                  grad_accum: int) -> Any:
        """The `aot.StepSpec` of this objective's step, for planning memory before launch."""
        ...
