"""Parameter paths: one spelling, '/'-joined keys like `"layers/attn/wq"`.

Surgery, the Hugging Face table, sharding errors and checkpoint checks all name params; they
name them the same way, so a path read in one error can be pasted into another call:

    flat = paths.flatten(params)           # {"embed/embedding": ..., "layers/attn/wq": ...}
    params = paths.unflatten(flat)         # the nested dicts again
    wq = paths.tree_get(params, "layers/attn/wq")   # KeyError says "did you mean ...?"
    names = {paths.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

Param trees are nested dicts (`Mapping`s) of leaves; anything that is not a `Mapping` (an
array, a `ShapeDtypeStruct`, a `PartitionSpec`, a `Sharding`) is a leaf.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jax import tree_util

SEP = "/"


class PathError(KeyError):
    """A path that is not in the tree; the message lists the closest paths that are."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _check_key(key: Any, prefix: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key {key!r} under {prefix or 'the root'!r} is a "
                        f"{type(key).__name__}; param tree keys must be str")
    if not key or SEP in key:
        raise ValueError(f"key {key!r} under {prefix or 'the root'!r} is empty or contains "
                         f"{SEP!r}, so its path would be ambiguous; rename it")
    return key


def _walk(tree: Mapping[str, Any], prefix: str = "", inner: bool = False
          ) -> Iterator[tuple[str, Any]]:
    """(path, node) for every leaf, depth first in key order; with `inner`, subtrees too."""
    for key, node in tree.items():
        path = prefix + _check_key(key, prefix)
        if isinstance(node, Mapping):
            if inner:
                yield path, node
            yield from _walk(node, path + SEP, inner)
        else:
            yield path, node


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`{path: leaf}` of a nested-dict tree, so an edit can address any tensor by name.

    Empty subtrees have no leaves and vanish (as in `jax.tree.leaves`).
    """
    return dict(_walk(tree))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dicts of a `{path: leaf}` dict: `flatten`'s inverse."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split(SEP)
        node = tree
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} goes through "
                                 f"{SEP.join(parents[:depth + 1])!r}, which is a leaf; a "
                                 "path cannot be both a leaf and a subtree")
        if last in node:
            raise ValueError(f"path {path!r} is a leaf, but other paths run through it; a "
                             "path cannot be both a leaf and a subtree")
        node[last] = leaf
    return tree


def _key_str(key: Any) -> str:
    """One entry of a jax key path as a path component."""
    if isinstance(key, tree_util.DictKey | tree_util.FlattenedIndexKey):
        return str(key.key)
    if isinstance(key, tree_util.GetAttrKey):
        return key.name
    if isinstance(key, tree_util.SequenceKey):
        return str(key.idx)
    return str(key)


def path_str(key_path: Sequence[Any], *, sep: str = SEP) -> str:
    """A `jax.tree_util` key path (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey) as a
    path: `(DictKey('layers'), DictKey('attn'), DictKey('wq'))` -> `'layers/attn/wq'`.

    For any pytree (a train state's fields, list indices), where `flatten` only walks dicts.
    `sep` exists for names already written with another separator (the checkpoint's
    '.'-joined checksum records); new names use '/'.
    """
    return sep.join(_key_str(key) for key in key_path)


def tree_get(tree: Mapping[str, Any], path: str) -> Any:
    """The leaf or subtree at `path`; a missing path raises a `KeyError` that names it and
    suggests the closest existing paths (a typo should cost one read of the message)."""
    node: Any = tree
    for key in path.split(SEP):
        if not isinstance(node, Mapping) or key not in node:
            raise PathError(_not_found(tree, path))
        node = node[key]
    return node


def _not_found(tree: Mapping[str, Any], path: str) -> str:
    known = [p for p, _ in _walk(tree, inner=True)]
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
    if not close:
        leaves = [p for p, _ in _walk(tree)]
        return f"no path {path!r} in the tree; its leaves include {leaves[:4]}"
    also = f" (also close: {', '.join(map(repr, close[1:]))})" if close[1:] else ""
    return f"no path {path!r} in the tree; did you mean {close[0]!r}?{also}"
