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

Export writes only what it owns: never the run's directory, a stage, a checkpoint, the root,
or a directory it did not write (`export.json` names the writer and records the stage, step
and fingerprint the export came from); `overwrite` replaces only a previous export. An
unfinished stage (no `result.json`) is exported only when its step is named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cascade_jax import checkpoint, files, hf, prune, rundir, sharding

ROOT = "root"
# Written last into every export: what wrote it, and the stage, step and fingerprint it holds.
EXPORT_FILE = "export.json"
TOOL = "cascade_jax.export"


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


def _ours(name: str) -> bool:
    return hf.is_saved_file(name) or name == EXPORT_FILE


def check_output(workdir: str, path: str | os.PathLike[str], overwrite: bool,
                 root_path: str | None = None) -> None:
    """`path` may be written: not the run, a stage, a checkpoint or the root (nor inside or
    holding one), and new, empty or (with `overwrite`) a previous export; refusals change
    nothing on disk."""
    protected = {workdir: "the cascade run's directory --workdir"}
    if root_path is not None:  # a Hugging Face directory or an Orbax checkpoint
        protected[root_path] = "the run's root model"
    rundir.check_output(path, flag="--out", tool=TOOL, marker=EXPORT_FILE, ours=_ours,
                        overwrite=overwrite, protected=protected)


def source_step(workdir: str, stage: str, step: int | None = None) -> tuple[int, bool]:
    """(the checkpoint step to export, whether the stage is finished). A finished stage (its
    `result.json` written) exports its last step; an unfinished one only a step named."""
    directory = os.path.join(workdir, stage, "checkpoints")
    steps = checkpoint.all_steps(directory)
    finished = os.path.isfile(os.path.join(workdir, stage, "result.json"))
    if step is None:
        if not finished:
            newest = f"its newest checkpoint is step {steps[-1]}" if steps else "no checkpoint"
            raise ValueError(f"stage {stage!r} of the run in {workdir} is unfinished (no "
                             f"result.json; {newest}): rerun the cascade to finish it, or "
                             "export an intermediate checkpoint on purpose with --step=<step> "
                             f"(one of {steps})")
        if not steps:
            raise ValueError(f"{directory} holds no complete checkpoint; rerun the stage")
        return steps[-1], True
    if isinstance(step, bool) or not isinstance(step, int) or step not in steps:
        raise ValueError(f"step={step!r} is not a complete checkpoint of stage {stage!r} in "
                         f"{directory}; its complete steps are {steps}")
    return step, finished and step == steps[-1]


def export(workdir: str, stage: str, path: str | os.PathLike[str], *,
           vision: bool | None = None, overwrite: bool = False,
           step: int | None = None) -> Path:
    """Write stage `stage` of the cascade run in `workdir` as a Hugging Face directory at
    `path` (atomic, as `hf.save`); returns it.

    vision: None writes the root's format (the wrapper, with the vision tower and projector,
    when the root is a Mistral 3 wrapper; else text-only); False text-only; True insists on
    the wrapper. The root's tokenizer files (and, for the wrapper, its image processor's) are
    copied beside the weights when the root is a Hugging Face directory.

    `path` must be new, empty or (with `overwrite`) a previous export (`check_output`); an
    unfinished stage needs `step`. `export.json` records the source (`source_step`).
    """
    from cascade_jax import cascade

    workdir = os.path.abspath(workdir)
    meta = _metadata(workdir, stage)
    root_dir = _root_directory(meta)
    check_output(workdir, path, overwrite, meta["config"]["root"].get("path") or None)
    step, finished = source_step(workdir, stage, step)
    root_config = hf.config_dict(root_dir) if root_dir is not None else None
    wrapper = root_config is not None and hf.is_wrapper(root_config)
    if vision and not wrapper:
        raise ValueError(f"vision=True needs a run whose root is a {hf.WRAPPER} directory; the "
                         f"root of {workdir} is {root_dir or 'not a Hugging Face directory'}: "
                         "export text-only (vision=None or False)")
    vision = wrapper if vision is None else vision
    mesh = sharding.make_mesh(data=-1)
    directory = os.path.join(workdir, stage, "checkpoints")
    cfg, params = cascade.load_checkpoint_model(directory, mesh, step)
    if vision:
        out = hf.save(cfg, params, path, overwrite=overwrite, vision_from=root_dir,
                      hidden_map=hidden_map(workdir, stage))
    else:
        out = hf.save(cfg, params, path, overwrite=overwrite,
                      architecture=_text_architecture(cfg, root_config),
                      extra_config=hf.carried_config(root_dir) if root_dir else None)
    if root_dir is not None:
        hf.copy_tokenizer_files(root_dir, None, out, processor=vision)
    files.write_json(os.path.join(out, EXPORT_FILE), {
        "tool": TOOL, "workdir": workdir, "stage": stage, "step": step,
        "finished": finished, "fingerprint": checkpoint.fingerprint(directory, step)})
    return out
