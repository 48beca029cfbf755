"""Meshes, logical→mesh axis rules, and sharded placement of params and batches.

The model names axes logically (`embed`, `heads`, `mlp`, ...); this module alone decides which
mesh axis each maps to, so the same model runs on one CPU or a TPU pod. The mesh always has
the four axes `data × fsdp × context × tensor` (any may be 1): data parallelism, parameter
sharding (ZeRO-3 style, over `embed`), context parallelism (each row's tokens split over
`context`; attention all-gathers keys and values, `model.context_parallel`) and tensor
parallelism (heads, FFN, vocab). Params shard over fsdp and context together, so adding
context devices never replicates a weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cascade_jax import lm, model, paths
from cascade_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"

# Logical axis → mesh axis (or None: replicated). `batch`/`length` are activations' axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", CONTEXT_AXIS),
    ("layers", None),
    ("embed", ("fsdp", CONTEXT_AXIS)),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # The residual stream's d_model between blocks stays whole: sharding it like the `embed`
    # params (over fsdp) would make XLA gather the batch instead of the weights (ZeRO-3 wants
    # the opposite), with [B, L, ...] temporaries that grow with the fsdp axis.
    ("activation_embed", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *, context: int = 1) -> Mesh:
    """A `data × fsdp × context × tensor` mesh; one size may be -1 to take all remaining
    devices.

    The default is pure data parallelism over every device (`make_mesh()` works anywhere);
    set `data` explicitly when another axis should take the remainder.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    bad = {name: size for name, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1 (or -1 to fill), got {bad}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}: "
                             f"{len(devices)} is not a multiple of {known}")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; "
                         f"make data*fsdp*context*tensor == {len(devices)} or set one axis to -1")
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: XLA's sharding propagation fills in activations from the params and batch.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def traced_on_mesh(fn: Callable[..., Any], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Callable[..., Any]:
    """`fn` whose tracing sees `mesh` and `rules` as context, for `jax.jit` to compile.

    The model pins its activations with logical constraints (`nn.with_logical_constraint`);
    those are no-ops unless a mesh and logical rules are in context while jit traces, so
    every step compiled for a mesh wraps its function with this.
    """
    @functools.wraps(fn)
    def on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)
    return on_mesh


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Map a pytree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`, leaving out a
    context axis of size 1 (so a mesh with context=1 gives the specs it gave before that
    axis existed)."""
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, _without_unit_axes(s.spec, mesh)),
                        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _without_unit_axes(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    def kept(axes: Any) -> Any:
        if axes is None:
            return None
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
                      if a != CONTEXT_AXIS or context_shards(mesh) > 1)
        return None if not names else names[0] if len(names) == 1 else names

    return PartitionSpec(*(kept(axes) for axes in spec))


def param_shardings(cfg: ModelConfig, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """`NamedSharding` of every param, checked to divide the param shapes."""
    shardings = logical_to_sharding(model.param_logical_axes(cfg), mesh, rules)
    check_divisible(model.param_shapes(cfg), shardings)
    return shardings


def check_divisible(shapes: Any, shardings: Any) -> None:
    """Fail early, naming the param, when a mesh axis does not divide the dimension it shards.

    XLA would otherwise pad silently or fail deep inside compilation.
    """
    problems = []
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                       sharding_tree_leaves(shardings),
                                       strict=True):
        mesh_shape = sharding.mesh.shape
        for dim, axes in zip(shape.shape, sharding.spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh_shape[a] for a in axes)
            if dim % ways:
                problems.append(f"{paths.path_str(path)} has a dimension of {dim} "
                                f"sharded {ways} ways over mesh axes {axes}")
    if problems:
        raise ValueError("mesh does not divide the sharded dimensions: " + "; ".join(problems)
                         + ". Choose mesh sizes that divide these dimensions, or map the "
                         "logical axis to None in the sharding rules.")


def sharding_tree_leaves(shardings: Any) -> list[NamedSharding]:
    return jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def check_batch_split(batch_size: int, mesh: Mesh, grad_accum: int = 1,
                      seq_len: int | None = None) -> None:
    """Fail early unless every micro-batch (batch_size / grad_accum rows) splits evenly over
    the mesh's batch shards (data × fsdp), and rows of `seq_len` tokens over its context
    shards; XLA would otherwise pad or replicate silently."""
    shards = context_shards(mesh)
    if seq_len is not None and seq_len % shards:
        raise ValueError(f"rows of seq_len={seq_len} tokens do not split over the {shards} "
                         f"context shards of mesh {dict(mesh.shape)}; use a seq_len that is a "
                         f"multiple of {shards}, or a smaller mesh.context")
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size < 1 or batch_size % (grad_accum * ways):
        what = (f"global batch_size={batch_size}" if grad_accum == 1 else
                f"global batch_size={batch_size} in grad_accum={grad_accum} micro-batches")
        raise ValueError(f"{what} does not split over the {ways} batch shards (data × fsdp) of "
                         f"mesh {dict(mesh.shape)}; use a batch_size that is a multiple of "
                         f"{grad_accum * ways}, or fewer data/fsdp devices")


def context_shards(mesh: Mesh) -> int:
    """How many pieces each row's tokens are split into (the mesh's context axis)."""
    return dict(mesh.shape).get(CONTEXT_AXIS, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, L, ...] batches: B split over data × fsdp, L over context (whole when context=1)."""
    length = CONTEXT_AXIS if context_shards(mesh) > 1 else None
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, length))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> model.Params:
    """Initialise params directly into their shards: no host ever holds the whole model."""
    shardings = param_shardings(cfg, mesh, rules)
    return jax.jit(model.init, static_argnums=0, out_shardings=shardings)(cfg, rng)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, balance: bool = False
                ) -> dict[str, jax.Array]:
    """Turn this host's slice of the global batch into global arrays sharded over the batch axes
    (and their length over the context axis).

    Each process passes its own rows (the data pipeline shards by `jax.process_index()`).
    `balance`: reorder each row for the mesh's context shards first (`lm.balance_rows`).
    """
    if balance:
        batch = lm.balance_rows(batch, context_shards(mesh))
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in batch.items()}


def shard_like(tree: Any, shardings: Any) -> Any:
    """Place (or reshard) every leaf of `tree` onto the matching sharding."""
    return jax.tree.map(jax.device_put, tree, shardings)
