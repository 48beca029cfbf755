"""Stage objectives as plug-ins, looked up by name.

    objective = objectives.get("kd")           # what `stages.<name>.objective` names
    objectives.register(MyObjective())         # a new one: its module, this line, its tests

Built in: `ce` (next-token cross-entropy on the run's data), `kd` (soft-label distillation
from the stage's teacher, the fused loss of `cascade_jax.distill`), `sft` (cross-entropy on
the completions of the run's task), `seq_kd` (cross-entropy on the teacher's sampled,
optionally verified completions), `on_policy` (GKD: the fused KD loss on sequences the
student samples during training), `grpo` (group-relative policy optimisation on the task's
verifier or a teacher's per-token log-probs), `preference` (online / offline / offset DPO
against the stage's frozen starting params; judged by the verifier or a judge model,
`objectives.judge`) and `codistill` (the stages of a group trained
together in one step, each on CE plus α·KL to its peers' mean prediction). See
`objectives.base` for the contract; `cascade.py` never branches on an objective.
"""

from __future__ import annotations

from typing import Any

from cascade_jax.objectives.base import Built, GroupBuilt, Objective, StageContext, Trained

_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective, *, replace: bool = False) -> Objective:
    """Make `objective` available to configs under `objective.name`."""
    name = objective.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"objective name {name!r} must be an identifier (it names a config "
                         "block)")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not objective:
        raise ValueError(f"an objective named {name!r} is already registered "
                         f"({type(_REGISTRY[name]).__name__}); pick another name or pass "
                         "replace=True")
    _REGISTRY[name] = objective
    return objective


def unregister(name: str) -> None:
    """Remove a registered objective (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"objective={name!r} is not registered; choose one of {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def _register_builtins() -> None:
    from cascade_jax.objectives import (
        ce,
        codistill,
        grpo,
        kd,
        on_policy,
        preference,
        seq_kd,
        sft,
    )

    register(ce.CrossEntropy())
    register(kd.SoftLabelKD())
    register(sft.SupervisedFineTuning())
    register(seq_kd.SequenceKD())
    register(on_policy.OnPolicyKD())
    register(grpo.GRPO())
    register(preference.Preference())
    register(codistill.Codistillation())


def trains_on_teacher(objective_name: str, settings: object) -> bool:
    """Whether a stage's training step learns from its teacher: the objective's
    `teacher_used(settings)` when it has one (grpo only with reward='teacher_logprob',
    preference only with judge='model'), else its `uses_teacher`. Decides whether the
    objective is handed the teacher, whether `experiments.plan` counts it in the step, and
    whether a context stage's teacher must take the longer rows."""
    objective = get(objective_name)
    teacher_used = getattr(objective, "teacher_used", None)
    return objective.uses_teacher if teacher_used is None else bool(teacher_used(settings))


def check_files(objective_name: str, settings: object, tokenizer: Any, *, seq_len: int,
                vocab_size: int, key: str) -> None:
    """Open and validate every file a stage's settings name (a seq_kd or preference JSONL),
    against the run's tokenizer and the student's vocabulary, before any stage trains: the
    objective's optional `check_files(settings, tokenizer, seq_len=..., vocab_size=...)`.
    Errors are prefixed with `key`."""
    check = getattr(get(objective_name), "check_files", None)
    if check is None:
        return
    try:
        check(settings, tokenizer, seq_len=seq_len, vocab_size=vocab_size)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from error


def group_of(objective_name: str, settings: object) -> str | None:
    """The group a stage trains in (its settings' `group` when its objective has
    `groups = True`), or None: a stage trained alone."""
    if not getattr(get(objective_name), "groups", False):
        return None
    return settings.group


_register_builtins()

__all__ = ["Built", "GroupBuilt", "Objective", "StageContext", "Trained", "check_files", "get",
           "group_of",
           "names", "register", "trains_on_teacher", "unregister"]
