"""The run config, typed once at the boundary.

`experiments/` mains read an `ml_collections.ConfigDict` from `--config`; `train_run_config`
and `cascade_config` turn it into the frozen dataclasses below, and the library only ever sees
those. Every field is checked in `__post_init__` with the shared validators of
`cascade_jax.validate`, and every message names the key as the user types it on the command
line (`config.stages.child.grad_accum=True must be a positive integer`), before any work.

A stage's objective-specific settings live in a block named after the objective
(`stages.child.kd = dict(kind='forward_kl', ...)`), parsed and validated by that objective
(`cascade_jax.objectives`); the stage itself never looks inside.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping
from typing import Any

from cascade_jax import objectives, prompts, validate
from cascade_jax.config import ModelConfig, RopeScaling, rope_scaling_from
from cascade_jax.data import DataConfig
from cascade_jax.prompts import TaskConfig
from cascade_jax.prune import Target
from cascade_jax.prune import surgery as _surgery

ROOT = "root"
ROOT_KINDS = ("scratch", "hf", "orbax")
INITS = ("pruned", "random", "parent")
PARENT = "parent"  # teacher = the stage's parent
PLAIN_ROPE = "none"  # context.rope_scaling kind: the child drops the parent's scaling


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def as_dict(block: Any, key: str) -> dict[str, Any]:
    """A config block (ConfigDict, dict or None) as a plain dict."""
    if block is None:
        return {}
    if hasattr(block, "to_dict"):
        return block.to_dict()
    if isinstance(block, Mapping):
        return dict(block)
    raise ValueError(f"{key}={block!r} must be a block of fields (a dict)")


# ------------------------------------------------------------------------------ pieces


_MESH_FIELDS = ("data", "fsdp", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 fills one axis with the remaining devices. `context` splits each
    row's tokens (context parallelism, `sharding`)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    key: str = dataclasses.field(default="config.mesh", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _MESH_FIELDS:
            value = getattr(self, name)
            if value != -1:
                validate.positive_int(_key(self.key, name), value,
                                      "or -1 for the remaining devices")
        if [getattr(self, name) for name in _MESH_FIELDS].count(-1) > 1:
            raise ValueError(f"{self.key}: only one of data={self.data}, fsdp={self.fsdp}, "
                             f"context={self.context}, tensor={self.tensor} may be -1")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _MESH_FIELDS}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + warmup-cosine settings (`steps.make_optimizer`); the step count is the stage's."""

    lr: float | None = None  # required: a learning rate is never a silent default
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    key: str = dataclasses.field(default="config.optim", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        if self.lr is None:
            raise ValueError(f"{_key(k, 'lr')} is not set; give the peak learning rate, e.g. "
                             f"--{_key(k, 'lr')}=1e-4")
        validate.positive_number(_key(k, "lr"), self.lr)
        validate.non_negative_int(_key(k, "warmup_steps"), self.warmup_steps)
        validate.number(_key(k, "min_lr_ratio"), self.min_lr_ratio, low=0.0, high=1.0)
        validate.number(_key(k, "weight_decay"), self.weight_decay, low=0.0)
        for name in ("b1", "b2"):
            validate.number(_key(k, name), getattr(self, name), low=0.0, high=1.0,
                            high_open=True)
        validate.positive_number(_key(k, "eps"), self.eps)
        if self.clip_norm is not None:
            validate.positive_number(_key(k, "clip_norm"), self.clip_norm, "or None: no clipping")

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "key"}

    def check_steps(self, steps: int, steps_key: str) -> None:
        if steps <= self.warmup_steps:
            raise ValueError(f"{steps_key}={steps} must exceed {_key(self.key, 'warmup_steps')}"
                             f"={self.warmup_steps}")


def _optim(block: Any, key: str) -> OptimConfig:
    values = as_dict(block, key)
    validate.known_keys(key, values, [f.name for f in dataclasses.fields(OptimConfig)
                                      if f.name != "key"])
    return OptimConfig(**values, key=key)


def _mesh(block: Any, key: str = "config.mesh") -> MeshConfig:
    values = as_dict(block, key)
    validate.known_keys(key, values, _MESH_FIELDS)
    return MeshConfig(**values, key=key)


def _data(block: Any, key: str = "config.data") -> DataConfig:
    values = as_dict(block, key)
    validate.known_keys(key, values, [f.name for f in dataclasses.fields(DataConfig)
                                      if f.name != "key"])
    return DataConfig(**values, key=key)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """What the results table adds for every model (the typed `config.report` block).

    kl_to: a model name ('root') whose forward KL and top-1 agreement every model gets, on
      the validation split and every `data.eval_sources` domain ('' = only the stage's own
      teacher, on the validation split).
    prompts: texts whose greedy continuations (`max_new_tokens` each) go into
      continuations.md: the same prompts for every model, to read beside the numbers.
    """

    kl_to: str = ""
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    key: str = dataclasses.field(default="config.report", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        validate.string(_key(k, "kl_to"), self.kl_to)
        if isinstance(self.prompts, str) or not all(
                isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"{_key(k, 'prompts')}={self.prompts!r} must be a list of "
                             "non-empty texts, or empty")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        validate.positive_int(_key(k, "max_new_tokens"), self.max_new_tokens)


def _report(block: Any, key: str = "config.report") -> ReportConfig:
    values = as_dict(block, key)
    validate.known_keys(key, values, [f.name for f in dataclasses.fields(ReportConfig)
                                      if f.name != "key"])
    return ReportConfig(**values, key=key)


def _task(block: Any, key: str = "config.task") -> TaskConfig | None:
    """The run's task, or None (an absent or empty block: the run trains on `config.data`)."""
    values = as_dict(block, key)
    return TaskConfig.from_block(values, key) if values else None


def check_task_data(task: TaskConfig | None, data: DataConfig) -> None:
    """A task and `data.source='task'` go together (neither may be silently ignored), and
    the task's character tokenizer exists only with a task."""
    source, tokenizer = f"{data.key}.source", f"{data.key}.tokenizer"
    if task is not None and data.source != prompts.SOURCE:
        raise ValueError(f"{task.key} is set but {source}={data.source!r}; set --{source}="
                         f"{prompts.SOURCE} to train on the task's prompt/completion data, or "
                         f"drop {task.key}")
    if task is None and data.source == prompts.SOURCE:
        raise ValueError(f"{source}={prompts.SOURCE!r} needs a config.task block, e.g. "
                         "config.task = dict(kind='chain_arithmetic', max_steps=4)")
    if task is None and data.tokenizer == prompts.CHARS:
        raise ValueError(f"{tokenizer}={prompts.CHARS!r} is the character tokenizer of a "
                         "task's alphabet and needs a config.task block; use 'builtin' or a "
                         "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often the loop logs, evaluates and checkpoints (in steps; 0 = only at the end)."""

    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    eval_micro_batches: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    key: str = dataclasses.field(default="config", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        validate.positive_int(_key(k, "log_every"), self.log_every)
        validate.non_negative_int(_key(k, "eval_every"), self.eval_every,
                                  "0 = evaluate only at the end")
        validate.non_negative_int(_key(k, "eval_batches"), self.eval_batches,
                                  "0 = the whole validation split")
        validate.positive_int(_key(k, "eval_micro_batches"), self.eval_micro_batches,
                              "1 = each evaluation batch at once")
        validate.non_negative_int(_key(k, "checkpoint_every"), self.checkpoint_every,
                                  "0 = checkpoint only at the end")
        validate.positive_int(_key(k, "keep_checkpoints"), self.keep_checkpoints)


_CADENCE_FIELDS = tuple(f.name for f in dataclasses.fields(Cadence) if f.name != "key")


def _cadence(config: Mapping[str, Any]) -> Cadence:
    return Cadence(**{name: config[name] for name in _CADENCE_FIELDS if name in config})


def model_config(block: Any, key: str) -> ModelConfig:
    return validate.construct(ModelConfig, as_dict(block, key), key)


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """A context-extension stage (`stages.<name>.context`): the child is its parent with a
    longer context and (optionally) a new RoPE, trained and evaluated on its own longer rows.
    Ministral 3 (arXiv 2601.08584) extends each size from 16k to 256k this way with YaRN
    (arXiv 2309.00071) and its query scale.

    max_seq_len: the child's context (the positions it takes); at least the parent's.
    seq_len: tokens per packed row of the stage's own data, built from config.data with this
      length (None: max_seq_len). batch_size: its global rows per step (None: config.data's).
    rope_theta, query_scale_beta, attention_chunk: the child's (None: the parent's);
      query_scale_beta=0 turns the query scale off.
    rope_scaling: a block with `kind` ('yarn', 'llama3', or 'none' for plain RoPE) and that
      kind's `ModelConfig.rope_scaling` fields; None: the parent's.
    buckets: the position-bucket edges (0, ..., seq_len) the stage reports validation loss by;
      None: doubling from the original length (the child's scaling's
      original_max_position_embeddings, else the parent's max_seq_len) up to seq_len.
    """

    max_seq_len: int
    seq_len: int | None = None
    batch_size: int | None = None
    rope_theta: float | None = None
    rope_scaling: RopeScaling | str | None = None
    query_scale_beta: float | None = None
    attention_chunk: int | None = None
    buckets: tuple[int, ...] | None = None
    key: str = dataclasses.field(default="context", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        validate.positive_int(_key(k, "max_seq_len"), self.max_seq_len)
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", self.max_seq_len)
        validate.number(_key(k, "seq_len"), self.seq_len, low=2, high=self.max_seq_len,
                        hint=f"rows no longer than {_key(k, 'max_seq_len')}")
        validate.positive_int(_key(k, "seq_len"), self.seq_len)
        validate.optional_positive_int(_key(k, "batch_size"), self.batch_size,
                                       "or None: config.data.batch_size")
        if self.rope_theta is not None:
            validate.positive_number(_key(k, "rope_theta"), self.rope_theta,
                                     "or None: the parent's")
        object.__setattr__(self, "rope_scaling", _context_scaling(self.rope_scaling,
                                                                  _key(k, "rope_scaling")))
        if self.query_scale_beta is not None:
            validate.number(_key(k, "query_scale_beta"), self.query_scale_beta,
                            hint="Ministral 3 uses 0.1; 0 turns it off; None: the parent's")
        validate.optional_positive_int(_key(k, "attention_chunk"), self.attention_chunk,
                                       "or None: the parent's")
        if self.attention_chunk is not None and self.seq_len % min(self.attention_chunk,
                                                                   self.seq_len):
            raise ValueError(f"{_key(k, 'attention_chunk')}={self.attention_chunk} does not "
                             f"divide {_key(k, 'seq_len')}={self.seq_len}; choose a divisor")
        if self.buckets is not None:
            object.__setattr__(self, "buckets", _bucket_edges(self.buckets, self.seq_len,
                                                              _key(k, "buckets")))

    def child_config(self, parent: ModelConfig) -> ModelConfig:
        """The child: `parent` with this block's context and RoPE, nothing else changed (the
        one function `cascade.plan_models` sizes and the stage trains)."""
        if self.max_seq_len < parent.max_seq_len:
            raise ValueError(f"{_key(self.key, 'max_seq_len')}={self.max_seq_len} is below the "
                             f"parent's max_seq_len={parent.max_seq_len}; a context stage "
                             "extends the context: raise it (or drop the context block)")
        changes: dict[str, Any] = {"max_seq_len": self.max_seq_len}
        for name in ("rope_theta", "attention_chunk"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        if self.rope_scaling is not None:
            changes["rope_scaling"] = None if self.rope_scaling == PLAIN_ROPE else self.rope_scaling
        if self.query_scale_beta is not None:
            changes["query_scale_beta"] = self.query_scale_beta or None
        try:
            return parent.replace(**changes)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.key}: {error}") from None

    def data(self, data: DataConfig) -> DataConfig:
        """The stage's rows: `data` at this block's row length (and batch size, if set)."""
        return dataclasses.replace(data, seq_len=self.seq_len,
                                   batch_size=self.batch_size or data.batch_size)

    def bucket_edges(self, parent: ModelConfig, child: ModelConfig) -> tuple[int, ...]:
        """`buckets`, or doubling from the length the parent's RoPE was made for."""
        if self.buckets is not None:
            return self.buckets
        scaling = child.rope_scaling
        first = (scaling.original_max_position_embeddings if scaling is not None
                 else parent.max_seq_len)
        return doubling_edges(first, self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lineage): the scaling as its tagged dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "key"}
        if isinstance(self.rope_scaling, RopeScaling):
            out["rope_scaling"] = self.rope_scaling.to_dict()
        if self.buckets is not None:
            out["buckets"] = list(self.buckets)
        return out


def doubling_edges(first: int, end: int) -> tuple[int, ...]:
    """(0, first, 2·first, 4·first, ..., end): position buckets that grow with the distance
    beyond a model's original context, the last one closed at `end`."""
    edges = [0]
    edge = first
    while edge < end:
        edges.append(edge)
        edge *= 2
    return (*edges, end)


def _context_scaling(value: Any, key: str) -> RopeScaling | str | None:
    """A context block's `rope_scaling`: None (the parent's), 'none' (plain RoPE) or a
    `RopeScaling` from a block tagged by `kind` (or `rope_type`, as `ModelConfig.to_dict`
    writes it)."""
    if value is None or value == PLAIN_ROPE or isinstance(value, RopeScaling):
        return value
    fields = as_dict(value, key)
    kinds = {fields.pop(name) for name in ("kind", "rope_type") if name in fields}
    if len(kinds) != 1:
        raise ValueError(f"{key}={value!r} needs one `kind`: 'yarn', 'llama3' or "
                         f"{PLAIN_ROPE!r} (plain RoPE), e.g. dict(kind='yarn', factor=8.0, "
                         "original_max_position_embeddings=128)")
    kind = kinds.pop()
    if kind == PLAIN_ROPE:
        if fields:
            raise ValueError(f"{key}: kind={PLAIN_ROPE!r} takes no other fields; got "
                             f"{sorted(fields)}")
        return PLAIN_ROPE
    try:
        return rope_scaling_from({"rope_type": kind, **fields})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: {error}") from None


def _bucket_edges(value: Any, seq_len: int, key: str) -> tuple[int, ...]:
    edges = tuple(value) if isinstance(value, list | tuple) else None
    ok = (edges is not None and len(edges) >= 2
          and all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
          and edges[0] == 0 and edges[-1] == seq_len
          and all(a < b for a, b in itertools.pairwise(edges)))
    if not ok:
        raise ValueError(f"{key}={value!r} must be increasing integer edges from 0 to the "
                         f"stage's seq_len={seq_len}, e.g. (0, 128, 256, 512, {seq_len}) if "
                         "those fit; or None for doubling from the original length")
    return edges


# ----------------------------------------------------------------- `experiments.train`


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """A root trained from scratch with next-token CE (`train.run`)."""

    workdir: str
    seed: int
    model: ModelConfig
    data: DataConfig
    mesh: MeshConfig
    optim: OptimConfig
    steps: int
    cadence: Cadence
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate.string("config.workdir", self.workdir, allow_empty=False)
        validate.non_negative_int("config.seed", self.seed)
        validate.positive_int("config.steps", self.steps)
        self.optim.check_steps(self.steps, "config.steps")


_TRAIN_FIELDS = ("workdir", "seed", "model", "data", "mesh", "optim", "steps", *_CADENCE_FIELDS)


def train_run_config(config: Any) -> TrainRunConfig:
    """The typed form of a `configs/tiny_teacher.py`-style ConfigDict."""
    values = as_dict(config, "config")
    validate.known_keys("config", values, _TRAIN_FIELDS)
    return TrainRunConfig(
        workdir=values.get("workdir", ""), seed=values.get("seed", 0),
        model=model_config(values.get("model"), "config.model"),
        data=_data(values.get("data")), mesh=_mesh(values.get("mesh")),
        optim=_optim(values.get("optim"), "config.optim"),
        steps=values.get("steps", 0), cadence=_cadence(values), raw=values)


# -------------------------------------------------------------------------- the cascade


@dataclasses.dataclass(frozen=True)
class RootConfig:
    """The cascade's root: trained from scratch ('scratch'), or read from Hugging Face ('hf':
    a directory, or a .gguf file) or cascade_jax Orbax ('orbax') files at `path`. For a loaded
    root, `model` only describes it (for `experiments.plan`) and says how to run it
    (`RUNTIME_FIELDS`)."""

    kind: str
    path: str = ""
    model: dict[str, Any] | None = None
    steps: int = 0
    optim: OptimConfig | None = None
    check_finite: bool = True  # refuse NaN/inf weights and FP8 scales of NaN, inf or 0
    key: str = dataclasses.field(default="config.root", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        validate.one_of(_key(k, "kind"), self.kind, ROOT_KINDS)
        validate.string(_key(k, "path"), self.path)
        validate.boolean(_key(k, "check_finite"), self.check_finite,
                         "False loads non-finite weights of an 'hf' root as they are")
        if self.kind == "scratch":
            if not self.model:
                raise ValueError(f"{_key(k, 'model')} is required for kind='scratch': the "
                                 "ModelConfig fields of the root to train")
            model_config(self.model, _key(k, "model"))
            validate.positive_int(_key(k, "steps"), self.steps)
            if self.optim is None:
                raise ValueError(f"{_key(k, 'optim')} is required for kind='scratch'")
            self.optim.check_steps(self.steps, _key(k, "steps"))
        elif self.model:
            validate.known_keys(_key(k, "model"), self.model,
                                [f.name for f in dataclasses.fields(ModelConfig)])

    def require_path(self) -> str:
        """The directory a loaded root is read from (checked only when it is read, so that
        `experiments.plan` works from `model` alone)."""
        if not self.path:
            raise ValueError(f"{_key(self.key, 'path')} is empty; kind={self.kind!r} reads the "
                             f"root from that directory: set --{_key(self.key, 'path')}=<dir>")
        if self.kind == "hf" and self.path.endswith(".gguf"):
            if not os.path.isfile(self.path):
                raise ValueError(f"{_key(self.key, 'path')}={self.path!r} is not a file")
        elif not os.path.isdir(self.path):
            raise ValueError(f"{_key(self.key, 'path')}={self.path!r} is not a directory")
        return self.path


def _root(block: Any, key: str = "config.root") -> RootConfig:
    values = as_dict(block, key)
    validate.known_keys(key, values, ("kind", "path", "model", "steps", "optim",
                                      "check_finite"))
    optim = values.get("optim")
    return RootConfig(kind=values.get("kind", "scratch"), path=values.get("path", ""),
                      model=as_dict(values.get("model"), _key(key, "model")) or None,
                      steps=values.get("steps", 0),
                      optim=None if optim is None else _optim(optim, _key(key, "optim")),
                      check_finite=values.get("check_finite", True), key=key)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage: how the child starts (`init`: the parent pruned to `target`, the same
    shape from random init, or the parent as is) × what it trains on (`objective`, with
    that objective's own validated `settings`).

    parent: 'root' or an earlier stage, the model pruned (or continued).
    teacher: 'root' | 'parent' | an earlier stage | an Orbax checkpoint directory; the model
      an objective learns from (when it uses one) and that "KL to teacher" is measured against.
    grad_accum: micro-batches per step (the global batch is unchanged).
    baseline: a comparison row; it never changes what the main stages do.
    context: with init='parent', a context extension (`ContextConfig`): new max_seq_len and
      RoPE, the stage's own longer rows, loss by position bucket before and after.
    """

    name: str
    parent: str
    teacher: str
    objective: str
    settings: Any
    target: Target = dataclasses.field(default_factory=Target)
    init: str = "pruned"
    depth_method: str = "block_influence"
    head_method: str = "within_group"
    hidden_method: str | None = "channel"
    steps: int = 100
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4))
    calib_batches: int = 8
    grad_accum: int = 1
    baseline: bool = False
    context: ContextConfig | None = None

    @property
    def key(self) -> str:
        return f"config.stages.{self.name}"

    def __post_init__(self) -> None:
        k = self.key
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == ROOT:
            raise ValueError(f"stage name {self.name!r} must be an identifier other than "
                             f"{ROOT!r}")
        validate.string(_key(k, "parent"), self.parent, allow_empty=False)
        validate.string(_key(k, "teacher"), self.teacher, allow_empty=False)
        validate.one_of(_key(k, "objective"), self.objective, objectives.names(),
                        "register new objectives with cascade_jax.objectives.register")
        validate.one_of(_key(k, "init"), self.init, INITS)
        validate.one_of(_key(k, "depth_method"), self.depth_method, _surgery.DEPTH_METHODS)
        validate.one_of(_key(k, "head_method"), self.head_method, _surgery.HEAD_METHODS)
        validate.one_of(_key(k, "hidden_method"), self.hidden_method,
                        (*_surgery.HIDDEN_METHODS, None))
        validate.positive_int(_key(k, "steps"), self.steps)
        self.optim.check_steps(self.steps, _key(k, "steps"))
        validate.positive_int(_key(k, "calib_batches"), self.calib_batches)
        validate.positive_int(_key(k, "grad_accum"), self.grad_accum,
                              "1 = the whole batch at once")
        validate.boolean(_key(k, "baseline"), self.baseline)
        for name, value in self.target.to_dict().items():
            if name == "tie_embeddings":
                if value is not None:
                    validate.boolean(_key(k, f"target.{name}"), value, "or None: as the parent")
            else:
                validate.optional_positive_int(_key(k, f"target.{name}"), value,
                                               "or None: the parent's")
        if self.init == "parent" and any(v is not None for v in self.target.to_dict().values()):
            raise ValueError(f"{_key(k, 'init')}='parent' continues the parent unchanged, but "
                             f"{_key(k, 'target')} asks for {self.target}; drop the target or "
                             "use init='pruned'")
        if self.context is not None and self.init != "parent":
            raise ValueError(f"{_key(k, 'context')} changes only the parent's context and RoPE "
                             f"and needs {_key(k, 'init')}='parent' (got {self.init!r}); prune "
                             "in an earlier stage and extend its child in the next")

    @property
    def teacher_name(self) -> str:
        return self.parent if self.teacher == PARENT else self.teacher

    @property
    def group(self) -> str | None:
        """The group this stage trains in with others (a grouped objective's `group`), or
        None when it trains alone."""
        return objectives.group_of(self.objective, self.settings)

    @property
    def group_directory(self) -> str | None:
        """Where its group keeps the joint state, under the run directory: `<group>_<objective>`."""
        return None if self.group is None else f"{self.group}_{self.objective}"


_STAGE_FIELDS = ("parent", "teacher", "objective", "target", "init", "depth_method",
                 "head_method", "hidden_method", "steps", "optim", "calib_batches",
                 "grad_accum", "baseline", "context")


def _context(block: Any, key: str) -> ContextConfig | None:
    """A stage's context block, or None (absent or empty: the parent's context)."""
    values = as_dict(block, key)
    if not values:
        return None
    validate.known_keys(key, values, [f.name for f in dataclasses.fields(ContextConfig)
                                      if f.name != "key"])
    if "max_seq_len" not in values:
        raise ValueError(f"{key}.max_seq_len is required: the child's context, e.g. "
                         f"--{key}.max_seq_len=1024")
    return ContextConfig(**values, key=key)


def stage_config(name: str, block: Any) -> StageConfig:
    """A stage from its config block; the objective's block (named after it) is parsed by the
    objective, and a block of another objective is refused (it would be silently ignored)."""
    key = f"config.stages.{name}"
    values = as_dict(block, key)
    objective_name = values.get("objective", "")
    validate.one_of(_key(key, "objective"), objective_name, objectives.names(),
                    "register new objectives with cascade_jax.objectives.register")
    other_blocks = sorted(set(values) & set(objectives.names()) - {objective_name})
    if other_blocks:
        raise ValueError(f"{key} has settings for {other_blocks} but its objective is "
                         f"{objective_name!r}; move them under {_key(key, objective_name)} or "
                         "drop them")
    validate.known_keys(key, values, (*_STAGE_FIELDS, objective_name))
    objective = objectives.get(objective_name)
    fields = {name_: values[name_] for name_ in _STAGE_FIELDS if name_ in values}
    fields["settings"] = objective.parse_settings(as_dict(values.get(objective_name),
                                                          _key(key, objective_name)),
                                                  _key(key, objective_name))
    fields["target"] = validate.construct(Target, {k: v for k, v in as_dict(
        values.get("target"), _key(key, "target")).items()}, _key(key, "target"))
    fields["optim"] = _optim(values.get("optim"), _key(key, "optim"))
    fields["context"] = _context(values.get("context"), _key(key, "context"))
    if fields.get("hidden_method") == "":
        fields["hidden_method"] = None  # '' in a config: d_model stays
    fields.setdefault("parent", ROOT)
    fields.setdefault("teacher", ROOT)
    return StageConfig(name=name, **fields)


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """A whole cascade run (`cascade.run`)."""

    workdir: str
    seed: int
    root: RootConfig
    data: DataConfig
    mesh: MeshConfig
    stages: tuple[StageConfig, ...]
    cadence: Cadence
    task: TaskConfig | None = None
    report: ReportConfig = ReportConfig()
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate.string("config.workdir", self.workdir)  # required by a run, not by a plan
        validate.non_negative_int("config.seed", self.seed)
        check_task_data(self.task, self.data)
        earlier = [ROOT]
        for stage in self.stages:
            needs_task = getattr(objectives.get(stage.objective), "needs_task", False)
            if needs_task and self.task is None:
                raise ValueError(f"{stage.key}.objective={stage.objective!r} trains on a "
                                 "task's completions, but the run has no config.task; add one "
                                 "(and config.data.source='task')")
            if stage.name in earlier:
                raise ValueError(f"stage name {stage.name!r} is used twice; names must be "
                                 f"unique and not {ROOT!r}")
            if stage.parent not in earlier:
                raise ValueError(f"{stage.key}.parent={stage.parent!r} is not 'root' or an "
                                 f"earlier stage; choose from {earlier}")
            if (stage.teacher not in [*earlier, PARENT]
                    and not os.path.isdir(stage.teacher)):
                raise ValueError(f"{stage.key}.teacher={stage.teacher!r} is neither 'parent', "
                                 f"one of {earlier}, nor an existing checkpoint directory")
            earlier.append(stage.name)
        check_groups(self.stages)
        if self.report.kl_to not in ("", *earlier):
            raise ValueError(f"{self.report.key}.kl_to={self.report.kl_to!r} is not 'root' or "
                             f"a stage: choose from {earlier}, or '' for none")

    def stage(self, name: str) -> StageConfig:
        return {s.name: s for s in self.stages}[name]


GROUP_SHARED = ("objective", "parent", "steps", "grad_accum")  # one joint step, one parent


def groups(stages: tuple[StageConfig, ...]) -> dict[str, list[StageConfig]]:
    """The stages of each group, in run order."""
    out: dict[str, list[StageConfig]] = {}
    for stage in stages:
        if stage.group is not None:
            out.setdefault(stage.group, []).append(stage)
    return out


def check_groups(stages: tuple[StageConfig, ...]) -> None:
    """Stages trained together stand one after another in `stage_order`, number two or more,
    and share what one joint step needs; their objective may check more (`check_group`)."""
    order = [s.name for s in stages]
    for group, members in groups(stages).items():
        first, names = members[0], [m.name for m in members]
        if len(members) < 2:
            raise ValueError(f"{first.key}.{first.objective}.group={group!r} names no other "
                             "stage; a group trains two or more stages together: give another "
                             f"stage group={group!r}, or train this one with objective='kd' "
                             "or 'ce'")
        span = order[order.index(names[0]):order.index(names[-1]) + 1]
        if span != names:
            between = [name for name in span if name not in names]
            raise ValueError(f"config.stage_order={order} must list the stages of group "
                             f"{group!r} ({names}) one after another, but {between} stand "
                             "between them; move them before or after the group")
        for stage in members[1:]:
            for field in GROUP_SHARED:
                mine, theirs = getattr(stage, field), getattr(first, field)
                if mine != theirs:
                    raise ValueError(f"{stage.key}.{field}={mine!r} but {first.key}.{field}="
                                     f"{theirs!r}; the stages of group {group!r} train in one "
                                     f"step from one parent: give them the same {field}")
        if first.group_directory in order or first.group_directory == ROOT:
            raise ValueError(f"group {group!r} keeps its joint state in <workdir>/"
                             f"{first.group_directory}, the directory of stage "
                             f"{first.group_directory!r}; rename the group or the stage")
        check = getattr(objectives.get(first.objective), "check_group", None)
        if check is not None:
            check(members)


_CASCADE_FIELDS = ("workdir", "seed", "root", "data", "task", "report", "mesh", "stage_order",
                   "stages",
                   *_CADENCE_FIELDS)


def cascade_config(config: Any) -> CascadeConfig:
    """The typed form of a `configs/tiny_cascade.py`-style ConfigDict; stages in
    `stage_order` (explicit, because a ConfigDict iterates its keys sorted, not as written)."""
    values = as_dict(config, "config")
    validate.known_keys("config", values, _CASCADE_FIELDS)
    stages_block = as_dict(values.get("stages"), "config.stages")
    order = list(values.get("stage_order") or ())
    if sorted(order) != sorted(stages_block):
        raise ValueError(f"config.stage_order={order} must list every stage in config.stages "
                         f"exactly once: {sorted(stages_block)}")
    return CascadeConfig(
        workdir=values.get("workdir", ""), seed=values.get("seed", 0),
        root=_root(values.get("root")), data=_data(values.get("data")),
        task=_task(values.get("task")), report=_report(values.get("report")),
        mesh=_mesh(values.get("mesh")),
        stages=tuple(stage_config(name, stages_block[name]) for name in order),
        cadence=_cadence(values), raw=values)
