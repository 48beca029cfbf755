"""experiments.prune end to end: a random-weight `MistralForCausalLM` and a BPE tokenizer trained
here are scored on text files, pruned, and saved; `transformers` then reads the child and its
logits must equal ours (max |ours - theirs| / max |theirs| ≤ 1e-4, float32, eager attention).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import TOL, randomize, rel_err
from transformers import (
    AutoModelForCausalLM,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PixtralVisionConfig,
)

from cascade_jax import data, hf, model, prune
from experiments import prune as prune_main

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "every",
         "house", "near", "old", "trees", "and", "rivers", "flow", "under", "bridges", "where",
         "children", "play", "games", "of", "chess", "at", "noon"]
PARENT = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
              max_position_embeddings=64, rope_theta=1e6, sliding_window=None,
              tie_word_embeddings=False, attn_implementation="eager")
MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # the 8 test devices: a sharded load and pass


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(parent HF directory with a tokenizer.json, calibration glob)."""
    root = tmp_path_factory.mktemp("prune_cli")
    text_dir = root / "text"
    text_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        words = rng.choice(WORDS, size=300)
        (text_dir / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    tokenizer = data.train_tokenizer(sorted(str(p) for p in text_dir.glob("*.txt")),
                                     vocab_size=300)
    torch.manual_seed(0)
    hf_model = MistralForCausalLM(MistralConfig(**PARENT)).eval()
    randomize(hf_model, seed=0)
    directory = root / "parent"
    hf_model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, str(text_dir / "*.txt")


RECIPES = {  # name -> (target, methods, mesh)
    # Ministral 3's methods: norm-ratio depth, PCA hidden, heads thinned inside each group.
    "pca": (prune.Target(n_layers=3, d_model=48, d_ff=96, n_heads=2),
            dict(depth_method="norm_ratio", head_method="within_group", hidden_method="pca"),
            MESH),
    # Minitron's: a contiguous block of layers, hidden channels, whole KV groups (one KV head
    # left, so the child cannot be split over tensor=2: the mesh is 2 × 4 × 1).
    "channel": (prune.Target(n_layers=2, d_model=32, n_kv_heads=1),
                dict(depth_method="contiguous", head_method="kv_groups",
                     hidden_method="channel"),
                {"data": 2, "fsdp": 4, "tensor": 1}),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_child_loads_in_transformers_with_our_logits(parent, tmp_path, recipe):
    hf_in, calib = parent
    target, methods, mesh = RECIPES[recipe]
    out = tmp_path / "child"
    summary = prune_main.run(str(hf_in), str(out), calib, target, calib_batches=3, seq_len=32,
                             batch_size=mesh["data"] * mesh["fsdp"],
                             importance_out=str(tmp_path / "scores.npz"), mesh_sizes=mesh,
                             progress=False, **methods)

    parent_cfg = hf.read_config(hf_in)
    want = target.resolve(parent_cfg)
    if methods["head_method"] == "kv_groups":
        want["n_heads"] = want["n_kv_heads"] * parent_cfg.n_groups
    cfg, params = hf.load(out)
    assert {name: getattr(cfg, name) for name in want} == want
    assert summary["child"]["d_ff"] == want["d_ff"]
    assert summary["child_params"] == cfg.num_params() < summary["parent_params"]
    assert np.isfinite(summary["parent_loss"]) and np.isfinite(summary["child_loss"])
    assert summary["calib_batches"] == 3 and summary["calib_tokens"] > 0

    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    assert reloaded.config.num_hidden_layers == want["n_layers"]
    assert reloaded.config.hidden_size == want["d_model"]
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    with torch.no_grad():
        theirs = reloaded(torch.from_numpy(tokens).long()).logits.float().numpy()
    err = rel_err(model.forward(cfg, params, jnp.asarray(tokens)), theirs)
    print(f"\n[{recipe}] child logits vs transformers: max relative error {err:.2e}")
    assert err <= TOL

    # The tokenizer and the lineage travel with the child; the scores match the parent.
    assert (out / "tokenizer.json").read_bytes() == (hf_in / "tokenizer.json").read_bytes()
    record = json.loads((out / prune_main.RECORD_FILE).read_text())
    assert len(record["layers"]) == want["n_layers"]
    assert record["parent_path"] == os.path.abspath(hf_in)
    assert (out / prune_main.ROTATION_FILE).exists() == (recipe == "pca")
    prune.Importance.load(tmp_path / "scores.npz", parent_cfg)
    table = prune_main.summary_table(summary)
    assert "calibration perplexity" in table and f"| d_model | 64 | {want['d_model']} |" in table


def test_target_bigger_than_parent_fails_before_any_work(parent, tmp_path, monkeypatch):
    hf_in, calib = parent

    def never(*args, **kwargs):
        raise AssertionError("the request should have been refused before this")

    monkeypatch.setattr(hf, "load", never)
    monkeypatch.setattr(prune, "estimate_importance", never)
    monkeypatch.setattr(data, "text_file_documents", never)
    with pytest.raises(ValueError, match=r"Target d_ff=1000 exceeds the parent's d_ff=128"):
        prune_main.run(str(hf_in), str(tmp_path / "child"), calib, prune.Target(d_ff=1000),
                       mesh_sizes=MESH)
    with pytest.raises(ValueError, match=r"d_model=32 < 64 but hidden_method=None cannot prune"):
        prune_main.run(str(hf_in), str(tmp_path / "child"), calib,
                       prune.Target(d_model=32), hidden_method=None, mesh_sizes=MESH)
    with pytest.raises(ValueError, match=r"--seq_len=512 exceeds the parent's "
                                         r"max_position_embeddings=64"):
        prune_main.run(str(hf_in), str(tmp_path / "child"), calib, prune.Target(d_ff=64),
                       mesh_sizes=MESH)
    with pytest.raises(ValueError, match=r"is, holds or lies inside the parent.s directory"):
        prune_main.run(str(hf_in), str(hf_in), calib, prune.Target(d_ff=64), mesh_sizes=MESH,
                       seq_len=32)
    with pytest.raises(ValueError, match="layers/attn/wk has a dimension of 1 sharded 2 ways"):
        # the child must fit the mesh too
        prune_main.run(str(hf_in), str(tmp_path / "child"), calib,
                       prune.Target(n_kv_heads=1), head_method="kv_groups", mesh_sizes=MESH,
                       seq_len=32)
    assert not (tmp_path / "child").exists()


def test_cli_reports_a_bad_target(parent, tmp_path):
    """The absl main: `--target.*` flags reach the check, and the message reaches the user."""
    hf_in, calib = parent
    done = subprocess.run(
        [sys.executable, "-m", "experiments.prune", f"--hf_in={hf_in}",
         f"--hf_out={tmp_path / 'child'}", f"--calib={calib}", "--target.n_layers=9"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode != 0
    assert "Target n_layers=9 exceeds the parent's n_layers=4" in done.stderr
    assert not (tmp_path / "child").exists()


def test_a_wrapper_parent_gives_its_text_family_and_token_ids(tmp_path):
    """A Mistral 3 wrapper's child is written as its text model, with the text model's ids."""
    wrapper = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
               "text_config": {"model_type": "ministral3", "bos_token_id": 1, "eos_token_id": 2,
                               "pad_token_id": 11}}
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(wrapper))
    assert prune_main.architecture(str(tmp_path)) == "Ministral3ForCausalLM"
    assert prune_main.carried_config(str(tmp_path)) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}


def test_keep_vision_writes_the_wrapper_again(parent, tmp_path):
    """--keep_vision: a wrapper parent's PCA child is the wrapper again (vision carried, the
    projector mapped), which transformers reads with no missing key and runs on an image; a
    text parent is refused before any work."""
    text_dir, calib = parent
    with pytest.raises(ValueError, match="--keep_vision needs a Mistral3ForConditionalGeneration"):
        prune_main.run(str(text_dir), str(tmp_path / "no"), calib, prune.Target(d_ff=64),
                       keep_vision=True, seq_len=32)
    text = MistralConfig(**{k: v for k, v in PARENT.items() if k != "attn_implementation"})
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=16, patch_size=4)
    torch.manual_seed(0)
    wrapper = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    randomize(wrapper, seed=1)
    hf_in, out = tmp_path / "wrapper", tmp_path / "child"
    wrapper.save_pretrained(hf_in)
    shutil.copyfile(text_dir / "tokenizer.json", hf_in / "tokenizer.json")
    (hf_in / "preprocessor_config.json").write_text("{}")
    summary = prune_main.run(str(hf_in), str(out), calib, prune.Target(n_layers=3, d_model=48),
                             hidden_method="pca", calib_batches=1, seq_len=16, batch_size=8,
                             evaluate=False, progress=False, keep_vision=True)
    assert "preprocessor_config.json" in summary["tokenizer_files"]
    child, info = Mistral3ForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert child.config.text_config.hidden_size == 48
    ids = torch.tensor([[5, 6] + [wrapper.config.image_token_index] * 4 + [7, 8]])
    with torch.no_grad():
        logits = child.eval()(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16),
                              image_sizes=torch.tensor([[16, 16]])).logits
    assert logits.shape == (1, 8, PARENT["vocab_size"]) and torch.isfinite(logits).all()
