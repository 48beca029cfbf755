"""`export`: a cascade stage out as a Hugging Face directory in its root's format. A cascade
starts from a tiny Mistral 3 wrapper (Ministral 3's YaRN text, a Pixtral tower), cuts the
width by channels, then by PCA (CE on the corpus: no task, no sampler to compile); the
grandchild comes out as the wrapper again (its projector mapped through both cuts) and as a
text model, each with parity in `transformers`."""

import copy
import json
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import torch
from hf_reference import TOL, hf_logits, random_tokens, randomize, rel_err
from transformers import (
    AutoModelForCausalLM,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralVisionConfig,
)

from cascade_jax import cascade, checkpoint, export, hf, model, rundir, sharding
from tests.test_cascade import tiny_config
from tests.test_hf_roots import (
    _VISION,
    WRAPPERS,
    _image_inputs,
    _load_wrapper,
    _logits,
    _projector,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir):
    """(workdir, root wrapper dir, its transformers model) after a root → child (channel cut
    to 32) → grandchild (PCA to 24) cascade of CE on the corpus; lr ~0, so each child is its
    parent's cut (the embeddings check the composed map exactly)."""
    torch.manual_seed(0)
    text = copy.deepcopy(WRAPPERS["ministral3_tied"])
    text.vocab_size = 320  # the corpus tokenizer's
    config = Mistral3Config(text_config=text, vision_config=PixtralVisionConfig(**_VISION),
                            tie_word_embeddings=True, attn_implementation="eager")
    root_model = Mistral3ForConditionalGeneration(config).eval()
    randomize(root_model, seed=4)
    root_dir = tmp_path_factory.mktemp("root")
    root_model.save_pretrained(root_dir)

    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(corpus_dir, workdir)
    cfg.root = ml_collections.ConfigDict(dict(kind="hf", path=str(root_dir)))
    cfg.eval_batches = 1
    stage = dict(cfg.stages.child_random_ce.to_dict(), init="pruned", baseline=False, steps=1,
                 calib_batches=1, optim=dict(lr=1e-12, warmup_steps=0))
    cfg.stages = ml_collections.ConfigDict(dict(
        child=dict(stage, target=dict(d_model=32), hidden_method="channel"),
        grandchild=dict(stage, parent="child", target=dict(d_model=24),
                        hidden_method="pca")))
    cfg.stage_order = ("child", "grandchild")
    cascade.run(cfg, progress=False)
    return workdir, root_dir, root_model


def _stage(workdir, name):
    return cascade.load_checkpoint_model(f"{workdir}/{name}/checkpoints",
                                         sharding.make_mesh(data=-1))


def test_the_map_composes_both_cuts(run):
    workdir, root_dir, _ = run
    _, root = hf.load(root_dir)
    m = export.hidden_map(workdir, "grandchild")
    assert m.shape == (48, 24)
    grandchild = _stage(workdir, "grandchild")[1]
    np.testing.assert_allclose(np.asarray(root["embed"]["embedding"]) @ m,
                               np.asarray(grandchild["embed"]["embedding"]), atol=1e-5)


def test_the_grandchild_exports_as_the_wrapper_and_as_text(run, tmp_path):
    workdir, root_dir, root_model = run
    cfg, params = _stage(workdir, "grandchild")
    tokens = random_tokens(5, (2, 12)) % 320
    ours = model.forward(cfg, params, tokens)

    wrapper = export.export(workdir, "grandchild", tmp_path / "wrapper")
    loaded = _load_wrapper(wrapper)
    err = rel_err(ours, hf_logits(loaded, tokens))
    print(f"\n[export] grandchild as the wrapper, text max relative error {err:.2e}")
    assert err <= TOL
    logits = _logits(loaded, _image_inputs(root_model))
    assert np.isfinite(logits).all() and logits.shape[-1] == cfg.vocab_size
    m = export.hidden_map(workdir, "grandchild")
    parent, child = _projector(root_dir), _projector(wrapper)
    units = [int(np.flatnonzero((parent["linear_1.weight"] == row).all(axis=1))[0])
             for row in child["linear_1.weight"]]
    np.testing.assert_allclose(child["linear_2.weight"],
                               m.T @ parent["linear_2.weight"][:, units], rtol=1e-5, atol=1e-7)

    text = export.export(workdir, "grandchild", tmp_path / "text", vision=False)
    assert hf.read_config(text) == cfg
    loaded = AutoModelForCausalLM.from_pretrained(text, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "Ministral3ForCausalLM"  # YaRN + the query scale
    assert rel_err(ours, hf_logits(loaded, tokens)) <= TOL


def test_bad_exports_are_refused_naming_the_fix(run, tmp_path):
    workdir, _, _ = run
    with pytest.raises(ValueError, match=r"stage 'nephew' .* has no checkpoints"):
        export.export(workdir, "nephew", tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--out=.*taken exists and is not empty"):
        export.export(workdir, "child", tmp_path / "taken", vision=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_export_records_its_source_and_replaces_only_a_previous_export(run, tmp_path):
    workdir, _, _ = run
    out = export.export(workdir, "child", tmp_path / "out", vision=False)
    record = json.loads((out / export.EXPORT_FILE).read_text())
    directory = f"{workdir}/child/checkpoints"
    assert record == {"tool": export.TOOL, "workdir": workdir, "stage": "child",
                      "step": checkpoint.latest_step(directory), "finished": True,
                      "fingerprint": checkpoint.fingerprint(directory)}
    with pytest.raises(FileExistsError, match="pass --overwrite to replace a previous"):
        export.export(workdir, "child", out, vision=False)
    export.export(workdir, "grandchild", out, vision=False, overwrite=True)
    assert json.loads((out / export.EXPORT_FILE).read_text())["stage"] == "grandchild"


def test_export_never_writes_over_the_run_a_stage_a_checkpoint_or_foreign_files(
        run, tmp_path, tree_hash):
    """The three data-loss cases of `--overwrite` (the run's own workdir, a stage, a directory
    of unrelated files), a checkpoint and another run's stage: refused, nothing changed."""
    workdir, root_dir, _ = run
    other_stage = tmp_path / "other_run" / "child"
    other_stage.mkdir(parents=True)
    rundir.mark_stage(str(other_stage), run=str(other_stage.parent), stage="child")
    (other_stage / "result.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.json").write_text("{}")
    before = {p: tree_hash(p) for p in (workdir, root_dir, tmp_path)}
    for out, owner in (
            (workdir, rf"is, holds or lies inside the cascade run's directory --workdir "
                      rf"\({workdir}\)"),
            (f"{workdir}/child", "is, holds or lies inside the cascade run's directory"),
            (f"{workdir}/child/checkpoints", "is, holds or lies inside the cascade run's"),
            (root_dir, r"is, holds or lies inside the run's root model"),
            (other_stage, rf"{other_stage}, which holds stage 'child' of the cascade run in "),
            (other_stage / "checkpoints", r"which holds stage 'child' of the cascade run"),
            (mine, r"holds files this tool never writes \(thesis.tex\)")):
        with pytest.raises((ValueError, FileExistsError), match=rf"--out={out}.*{owner}"):
            export.export(workdir, "grandchild", out, vision=False, overwrite=True)
    assert {p: tree_hash(p) for p in (workdir, root_dir, tmp_path)} == before


def test_the_cli_refuses_the_runs_own_workdir_naming_it(run, tree_hash):
    workdir, _, _ = run
    before = tree_hash(workdir)
    done = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}",
                           "--stage=child", f"--out={workdir}", "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: WorkdirError: --out={workdir} is, holds or lies inside the cascade run's "
        f"directory --workdir ({workdir}); cascade_jax.export never writes over it: choose a "
        "directory outside it")
    assert tree_hash(workdir) == before


def test_an_unfinished_stage_is_exported_only_by_step(run, tmp_path):
    workdir, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    (copy / "grandchild" / "result.json").unlink()
    steps = checkpoint.all_steps(copy / "grandchild" / "checkpoints")
    with pytest.raises(ValueError, match=rf"stage 'grandchild' of the run in {copy} is "
                                         rf"unfinished .*newest checkpoint is step {steps[-1]}"
                                         r".*--step=<step>"):
        export.export(str(copy), "grandchild", tmp_path / "out", vision=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"step=7 is not a complete checkpoint .* complete "
                                         rf"steps are {re.escape(str(steps))}"):
        export.export(str(copy), "grandchild", tmp_path / "out", vision=False, step=7)
    out = export.export(str(copy), "grandchild", tmp_path / "out", vision=False, step=steps[0])
    record = json.loads((out / export.EXPORT_FILE).read_text())
    assert (record["step"], record["finished"]) == (steps[0], False)
    assert record["fingerprint"] == checkpoint.fingerprint(
        copy / "grandchild" / "checkpoints", steps[0])
