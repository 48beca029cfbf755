"""A finished stage of a cascade run as a Hugging Face directory, in its root's format.

A run keeps its models as Orbax checkpoints (`<workdir>/<stage>/checkpoints`). `export` writes
one of them for `transformers`: text-only (`*ForCausalLM`, the root's family when it can say
the child, with the root's token ids and tokenizer files), or, when the root is a Mistral 3
wrapper (`Mistral3ForConditionalGeneration`: Mistral Small 3.1, Ministral 3), as that wrapper
again, so a child of a child of the 24B still takes images. The projector's output must then
be mapped into the stage's residual basis: `hidden_map` composes the map of every prune on
the way down from the root (channel cuts, PCA rotations, the residual rescale; a stage made
from its parent unchanged adds none), read from each stage's checkpoint metadata and the
`prune_rotation.npy` the cascade writes beside a PCA stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cascade_jax import checkpoint, hf, prune, sharding

ROOT = "root"


def _metadata(workdir: str, stage: str) -> dict[str, Any]:
    directory = os.path.join(workdir, stage, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} does not exist: stage {stage!r} of the run in {workdir} "
                         "has no checkpoints (is the name right, and has the stage run?)")
    return checkpoint.read_metadata(directory)


def _stage_map(workdir: str, stage: str, meta: dict[str, Any]) -> np.ndarray | None:
    """[D_parent, D_stage] of one stage, or None for a stage that does not come from its
    parent's weights (a random init)."""
    init = meta["config"]["stages"][stage].get("init", "pruned")
    if init == "parent":
        d = int(meta["model"]["d_model"])
        return np.eye(d, dtype=np.float32)
    if init != "pruned":
        return None
    record = meta["record"]
    rotation = None
    if record.get("rotation") is not None:
        path = os.path.join(workdir, stage, prune.PruneRecord.array_file("rotation"))
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: stage {stage!r} was pruned with PCA and its "
                             "rotation is needed to map the vision projector; it is written "
                             "by the cascade since this version (rerun the stage to make it)")
        rotation = np.load(path)
    return prune.surgery.hidden_map(int(record["parent_config"]["d_model"]),
                                    channels=record.get("channels"), rotation=rotation)


def hidden_map(workdir: str, stage: str) -> np.ndarray:
    """[D_root, D_stage] float32: root residual @ it = the stage's, the product of the maps of
    every stage from the root down to `stage` (`prune.surgery.hidden_map` of each)."""
    maps, name = [], stage
    while name != ROOT:
        meta = _metadata(workdir, name)
        one = _stage_map(workdir, name, meta)
        if one is None:
            raise ValueError(f"stage {name!r} (on the way from the root to {stage!r}) was "
                             f"initialised {meta['config']['stages'][name].get('init')!r}, "
                             "not from its parent's "
                             "weights: its residual basis is its own and no map to the root's "
                             "exists; export it text-only (vision=False)")
        maps.append(one)
        name = meta["config"]["stages"][name]["parent"]
    composed = maps[-1] if maps else None
    for one in reversed(maps[:-1]):
        composed = composed @ one
    if composed is None:
        raise ValueError(f"stage {stage!r} is the root itself: export the root's own files")
    return composed.astype(np.float32)


def _root_directory(meta: dict[str, Any]) -> str | None:
    root = meta["config"]["root"]
    return root["path"] if root.get("kind") == "hf" else None


def _text_architecture(cfg: Any, root_config: dict[str, Any] | None) -> str | None:
    """The root's class when the child is plain (Llama stays Llama); else the family the
    child's features need (`hf.default_architecture`)."""
    if root_config is None or hf.default_architecture(cfg) != "MistralForCausalLM":
        return None
    return hf.text_architecture(root_config)


def export(workdir: str, stage: str, path: str | os.PathLike[str], *,
           vision: bool | None = None, overwrite: bool = False) -> Path:
    """Write stage `stage` of the cascade run in `workdir` as a Hugging Face directory at
    `path` (atomic, as `hf.save`); returns it.

    vision: None writes the root's format (the wrapper, with the vision tower and projector,
    when the root is a Mistral 3 wrapper; else text-only); False text-only; True insists on
    the wrapper. The root's tokenizer files (and, for the wrapper, its image processor's) are
    copied beside the weights when the root is a Hugging Face directory.
    """
    from cascade_jax import cascade

    meta = _metadata(workdir, stage)
    root_dir = _root_directory(meta)
    root_config = hf.config_dict(root_dir) if root_dir is not None else None
    wrapper = root_config is not None and hf.is_wrapper(root_config)
    if vision and not wrapper:
        raise ValueError(f"vision=True needs a run whose root is a {hf.WRAPPER} directory; the "
                         f"root of {workdir} is {root_dir or 'not a Hugging Face directory'}: "
                         "export text-only (vision=None or False)")
    vision = wrapper if vision is None else vision
    mesh = sharding.make_mesh(data=-1)
    cfg, params = cascade.load_checkpoint_model(os.path.join(workdir, stage, "checkpoints"),
                                                mesh)
    if vision:
        out = hf.save(cfg, params, path, overwrite=overwrite, vision_from=root_dir,
                      hidden_map=hidden_map(workdir, stage))
    else:
        out = hf.save(cfg, params, path, overwrite=overwrite,
                      architecture=_text_architecture(cfg, root_config),
                      extra_config=hf.carried_config(root_dir) if root_dir else None)
    if root_dir is not None:
        hf.copy_tokenizer_files(root_dir, None, out, processor=vision)
    return out
