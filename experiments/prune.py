"""Prune a Hugging Face Llama/Mistral checkpoint to a smaller shape, and save the child as one.

    python -m experiments.prune --hf_in=/ckpt/parent --hf_out=/ckpt/child \
        --calib='/data/calib/**/*.txt' --target.n_layers=34 --target.d_model=4096 \
        --target.d_ff=14336 --depth_method=norm_ratio --hidden_method=pca \
        --calib_batches=64 --seq_len=4096 --batch_size=8 --importance_out=/ckpt/parent.npz

What happens, in this order, so that a bad request fails before anything expensive:
1. `config.json` of `--hf_in` is read and the target and methods are checked against it
   (a target larger than the parent, d_model cut without a hidden method, a mesh that does not
   divide the shapes, an existing `--hf_out`), then the calibration files and the tokenizer.
2. The calibration text is tokenized with the parent's `tokenizer.json` (or `--tokenizer`) and
   packed into `--calib_batches` batches of `--batch_size` × `--seq_len` tokens
   (`cascade_jax.data`; one pass, shuffled by `--seed`, never repeated).
3. The weights are loaded onto a `data × fsdp × tensor` mesh (`--mesh.fsdp=8` shards them),
   scored (`prune.estimate_importance`), and cut (`prune.prune`).
4. The child is written with `cascade_jax.hf.save` (same architecture and token ids), with the
   parent's tokenizer files and `prune_record.json` (the kept indices; the PCA rotation in
   `prune_rotation.npy`). A Mistral 3 wrapper's child is its text model, or with
   `--keep_vision` the wrapper again (vision tensors carried over, the projector mapped by the
   prune's `hidden_map`; image processor files copied).
5. A before/after table: shapes, parameter counts, and cross-entropy and perplexity of parent
   and child on the calibration batches (in-sample, so only a sanity check; `--noeval` skips it).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from cascade_jax import data, hf, loop, model, prune, rundir, sharding, steps
from cascade_jax.config import ModelConfig
from cascade_jax.hf import carried_config, copy_tokenizer_files
from cascade_jax.prune import importance as importance_lib
from cascade_jax.prune import surgery
from cascade_jax.prune.target import PRUNABLE
from experiments.common import last_line_is_the_cause, quiet_logging

RECORD_FILE = "prune_record.json"
ROTATION_FILE = prune.PruneRecord.array_file("rotation")

def define_flags() -> None:
    """The command line; defined only when run as a script, so that tests (and other mains) can
    import `run` without clashing flag names."""
    flags.DEFINE_string("hf_in", None, "Parent: a Hugging Face Llama/Mistral directory.")
    flags.DEFINE_string("hf_out", None, "Where the child's Hugging Face directory goes.")
    flags.DEFINE_string("calib", None, "Glob of calibration text files ('**' recurses).")
    flags.DEFINE_string("tokenizer", None, "tokenizer.json (or its directory); default: the "
                        "one in --hf_in.")
    config_flags.DEFINE_config_dict(
        "target", ml_collections.ConfigDict({
            **{name: config_dict.placeholder(int) for name in PRUNABLE},
            "tie_embeddings": config_dict.placeholder(bool)}),
        "The child's shape (--target.d_ff=16384); unset dimensions keep the parent's. "
        "--target.tie_embeddings=true ties the child's head to its embedding.")
    flags.DEFINE_enum("depth_method", "block_influence", list(surgery.DEPTH_METHODS),
                      "Which layers to keep when n_layers shrinks.")
    flags.DEFINE_enum("head_method", "within_group", list(surgery.HEAD_METHODS),
                      "How query heads are cut (GQA-aware).")
    flags.DEFINE_enum("hidden_method", "channel", [*surgery.HIDDEN_METHODS, "none"],
                      "How d_model is cut: 'channel' (Minitron) or 'pca' (Ministral 3).")
    flags.DEFINE_string("aggregation", "l2_mean", "Importance aggregation over batch and "
                        "sequence (see cascade_jax.prune.importance).")
    flags.DEFINE_enum("neuron_method", "minitron", list(importance_lib.NEURON_METHODS),
                      "FFN neuron score.")
    flags.DEFINE_integer("calib_batches", 8, "Calibration batches to score on.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per calibration row.")
    flags.DEFINE_integer("batch_size", 8, "Rows per calibration batch (global).")
    flags.DEFINE_string("importance_out", None, "Also save the scores (.npz).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                      "Cast the weights on load (default: as stored); the child keeps it.")
    flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                      "Matmul dtype of the scoring and evaluation passes.")
    flags.DEFINE_bool("eval", True, "Report calibration loss of parent and child.")
    flags.DEFINE_integer("seed", 0, "Order of the calibration pieces.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --hf_out.")
    flags.DEFINE_bool("check_finite", True, "Refuse a parent with NaN/inf weights or FP8 "
                      "scales of NaN, inf or 0 (--nocheck_finite loads them as they are).")
    flags.DEFINE_bool("keep_vision", False, "A Mistral3ForConditionalGeneration parent: write "
                      "the child as that wrapper (vision tower and projector carried over) "
                      "instead of its text model alone.")
    config_flags.DEFINE_config_dict(
        "mesh", ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
        "Mesh sizes (--mesh.fsdp=8 shards the weights); -1 takes the remaining devices.")
    flags.mark_flags_as_required(["hf_in", "hf_out", "calib"])


# ------------------------------------------------------------------------------ checks


def check_request(cfg: ModelConfig, target: prune.Target, *, depth_method: str,
                  head_method: str, hidden_method: str | None) -> ModelConfig:
    """Everything knowable from config.json alone; returns the child's config.

    `prune.child_config` runs the checks `prune.prune` makes before touching a tensor, but
    from config.json alone, so the common mistakes fail in a second, before any weight loads.
    """
    child = prune.child_config(cfg, target, depth_method=depth_method,
                               head_method=head_method, hidden_method=hidden_method)
    if child == cfg:
        raise ValueError(f"target {target.to_dict()} removes nothing from the parent "
                         f"({cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
                         f"{cfg.n_heads}/{cfg.n_kv_heads} heads); set a smaller --target.*")
    return child


def check_batch(batch_size: int, seq_len: int, calib_batches: int, mesh: Any,
                max_seq_len: int | None = None) -> None:
    """The calibration batch must split over the mesh's batch shards, and its rows fit the
    parent's positions (`max_seq_len`: scores of positions it never saw are meaningless)."""
    if batch_size < 1 or seq_len < 2 or calib_batches < 1:
        raise ValueError(f"need batch_size >= 1, seq_len >= 2, calib_batches >= 1; got "
                         f"{batch_size}, {seq_len}, {calib_batches}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"--seq_len={seq_len} exceeds the parent's max_position_embeddings="
                         f"{max_seq_len}; score rows of at most --seq_len={max_seq_len}")
    sharding.check_batch_split(batch_size, mesh)


def _ours(name: str) -> bool:
    """A file a previous `experiments.prune` run writes into its output directory."""
    return (hf.is_saved_file(name) or name == RECORD_FILE
            or (name.startswith("prune_") and name.endswith(".npy")))


def check_output(path: str, overwrite: bool, hf_in: str) -> None:
    """`--hf_out` must be new or empty; `--overwrite` replaces only a previous output of this
    tool (it has `prune_record.json` and nothing but the files we write), never the parent, a
    directory holding the parent, a run directory, or anything else."""
    rundir.check_output(path, flag="--hf_out", tool="experiments.prune", marker=RECORD_FILE,
                        ours=_ours, overwrite=overwrite,
                        protected={hf_in: "the parent's directory --hf_in"})


# ------------------------------------------------------------------------- calibration


def tokenizer_path(hf_in: str, tokenizer: str | None) -> str:
    return tokenizer or os.path.join(hf_in, "tokenizer.json")


def calibration_batches(pattern: str, tokenizer: Any, *, vocab_size: int, seq_len: int,
                        batch_size: int, calib_batches: int, seed: int
                        ) -> list[dict[str, np.ndarray]]:
    """Up to `calib_batches` packed batches from the text files matching `pattern`: one
    shuffled pass, so no document is scored twice."""
    documents = data.text_file_documents(pattern)
    corpus = data.tokenize([d.text for d in documents], tokenizer)
    top = int(corpus.tokens.max(initial=0))
    if top >= vocab_size:
        raise ValueError(f"the tokenizer produced id {top}, outside the model's vocab_size="
                         f"{vocab_size}; calibrate with the parent's own tokenizer")
    dataset = data.make_lm_dataset(corpus, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                   shuffle=True, num_epochs=1)
    batches = list(itertools.islice(iter(dataset), calib_batches))
    if len(batches) < calib_batches:
        logging.warning("the calibration text (%d tokens) fills only %d of the %d batches "
                        "asked for; scoring on those", corpus.num_tokens, len(batches),
                        calib_batches)
    return batches


def calibration_loss(cfg: ModelConfig, params: model.Params, batches: Sequence[Any],
                     mesh: Any) -> dict[str, float]:
    """Cross-entropy and perplexity on `batches`, params placed on `cfg`'s shardings."""
    params = sharding.shard_like(params, sharding.param_shardings(cfg, mesh))
    return loop.evaluate(steps.jit_eval_sums(cfg, mesh), params, batches, mesh)


# ------------------------------------------------------------------------------ output


def _hf_config(hf_in: str) -> dict[str, Any]:
    """The parent's config.json as a dict (a GGUF parent's: what its metadata implies); a
    damaged one is an error naming it."""
    return hf.config_dict(hf_in)


def architecture(hf_in: str) -> str:
    """The parent's architecture name, so the child loads as the same class (a Mistral 3
    wrapper's child as its text model's class)."""
    source = hf_in if hf_in.endswith(".gguf") else os.path.join(hf_in, hf.CONFIG_FILE)
    return hf.text_architecture(_hf_config(hf_in), source=source)


def write_record(hf_out: str, record: prune.PruneRecord, extra: dict[str, Any]) -> None:
    """The lineage: kept indices, methods, parent; the rotation as .npy when PCA was used."""
    Path(hf_out, RECORD_FILE).write_text(
        json.dumps({**record.to_dict(), **extra}, indent=2, default=str) + "\n",
        encoding="utf-8")
    for name, array in record.arrays().items():
        np.save(Path(hf_out) / record.array_file(name), array)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: parent vs child shapes, parameters and calibration loss."""
    parent, child = summary["parent"], summary["child"]
    rows = [("params", _fmt_params(summary["parent_params"]),
             _fmt_params(summary["child_params"]))]
    rows += [(name, str(parent[name]), str(child[name]))
             for name in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim",
                          "vocab_size", "tie_embeddings")]
    for key in ("loss", "perplexity"):
        if f"parent_{key}" in summary:
            rows.append((f"calibration {key}", f"{summary[f'parent_{key}']:.4f}",
                         f"{summary[f'child_{key}']:.4f}"))
    lines = ["| | parent | child |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- run


def run(hf_in: str, hf_out: str, calib: str, target: prune.Target, *,
        tokenizer: str | None = None, depth_method: str = "block_influence",
        head_method: str = "within_group", hidden_method: str | None = "channel",
        aggregation: str = "l2_mean", neuron_method: str = "minitron", calib_batches: int = 8,
        seq_len: int = 512, batch_size: int = 8, importance_out: str | None = None,
        dtype: str | None = None, compute_dtype: str = "float32", evaluate: bool = True,
        seed: int = 0, mesh_sizes: dict[str, int] | None = None, overwrite: bool = False,
        progress: bool = True, keep_vision: bool = False, check_finite: bool = True
        ) -> dict[str, Any]:
    """Score, prune and save (module docstring); returns what the table shows, and more."""
    cfg = hf.read_config(hf_in).replace(dtype=compute_dtype)
    child_cfg = check_request(cfg, target, depth_method=depth_method, head_method=head_method,
                              hidden_method=hidden_method)
    mesh = sharding.make_mesh(**(mesh_sizes or {"data": -1}))
    check_batch(batch_size, seq_len, calib_batches, mesh, cfg.max_seq_len)
    shardings = sharding.param_shardings(cfg, mesh)
    sharding.param_shardings(child_cfg, mesh)  # the child must fit the mesh too
    check_output(hf_out, overwrite, hf_in)
    if keep_vision and not hf.is_wrapper(_hf_config(hf_in)):
        raise ValueError(f"--keep_vision needs a {hf.WRAPPER} parent; --hf_in={hf_in} is a "
                         "text model: drop --keep_vision")
    tok = data.load_tokenizer(tokenizer_path(hf_in, tokenizer))
    batches = calibration_batches(calib, tok, vocab_size=cfg.vocab_size, seq_len=seq_len,
                                  batch_size=batch_size, calib_batches=calib_batches, seed=seed)

    start = time.perf_counter()
    loaded_cfg, params = hf.load(hf_in, dtype=dtype, shardings=shardings,
                                 check_finite=check_finite)
    cfg = loaded_cfg.replace(dtype=compute_dtype)
    load_s, start = time.perf_counter() - start, time.perf_counter()
    scores = prune.estimate_importance(cfg, params, iter(batches), mesh=mesh,
                                       aggregation=aggregation, neuron_method=neuron_method,
                                       progress=progress)
    if importance_out:
        scores.save(importance_out)
    importance_s, start = time.perf_counter() - start, time.perf_counter()
    out = prune.prune(cfg, params, scores, target, depth_method=depth_method,
                      head_method=head_method, hidden_method=hidden_method)
    prune_s = time.perf_counter() - start

    summary: dict[str, Any] = {
        "hf_in": hf_in, "hf_out": hf_out, "parent": cfg.to_dict(), "child": out.cfg.to_dict(),
        "parent_params": cfg.num_params(), "child_params": out.cfg.num_params(),
        "calib_batches": len(batches),
        "calib_tokens": int(sum(np.count_nonzero(b["segment_ids"]) for b in batches)),
        "load_s": load_s, "importance_s": importance_s, "prune_s": prune_s,
    }
    if evaluate:
        before = calibration_loss(cfg, params, batches, mesh)
        after = calibration_loss(out.cfg, out.params, batches, mesh)
        summary.update(parent_loss=before["loss"], parent_perplexity=before["perplexity"],
                       child_loss=after["loss"], child_perplexity=after["perplexity"])

    start = time.perf_counter()
    # A wrapper child keeps the parent's config.json, token ids included.
    as_wrapper = (dict(vision_from=hf_in, hidden_map=out.record.hidden_map()) if keep_vision
                  else dict(extra_config=carried_config(hf_in)))
    hf.save(out.cfg, out.params, hf_out, architecture=architecture(hf_in),
            overwrite=overwrite, **as_wrapper)
    summary["tokenizer_files"] = copy_tokenizer_files(hf_in, tokenizer, hf_out,
                                                      processor=keep_vision)
    write_record(hf_out, out.record, {
        "parent_path": os.path.abspath(hf_in), "calibration": calib,
        "calib_batches": len(batches), "batch_size": batch_size, "seq_len": seq_len,
        "aggregation": aggregation, "neuron_method": neuron_method,
        "importance": os.path.abspath(importance_out) if importance_out else None})
    summary["save_s"] = time.perf_counter() - start
    return summary


def main(argv: list[str]) -> None:
    del argv
    quiet_logging()
    f = flags.FLAGS
    summary = run(
        f.hf_in, f.hf_out, f.calib, prune.Target(**f.target.to_dict()), tokenizer=f.tokenizer,
        depth_method=f.depth_method, head_method=f.head_method,
        hidden_method=None if f.hidden_method == "none" else f.hidden_method,
        aggregation=f.aggregation, neuron_method=f.neuron_method,
        calib_batches=f.calib_batches, seq_len=f.seq_len, batch_size=f.batch_size,
        importance_out=f.importance_out, dtype=f.dtype, compute_dtype=f.compute_dtype,
        evaluate=f.eval, seed=f.seed, mesh_sizes=f.mesh.to_dict(), overwrite=f.overwrite,
        keep_vision=f.keep_vision, check_finite=f.check_finite)
    print(summary_table(summary))
    print(f"\n{summary['calib_batches']} calibration batches, {summary['calib_tokens']:,} "
          f"tokens; load {summary['load_s']:.1f} s, importance {summary['importance_s']:.1f} s, "
          f"prune {summary['prune_s']:.1f} s, save {summary['save_s']:.1f} s")
    print(f"child written to {summary['hf_out']} (tokenizer files: "
          f"{', '.join(summary['tokenizer_files']) or 'none'})")


if __name__ == "__main__":
    define_flags()
    app.run(last_line_is_the_cause(main))
