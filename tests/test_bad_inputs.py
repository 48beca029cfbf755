"""Bad inputs, by the surface they come in through: each is refused with a message that names
the bad value or the file and says what to do, and where a file or a directory is involved,
the refusal leaves it byte for byte as it was (`tree_hash`).

The CLI's bad inputs (run directories, configs) are tested with the mains; the logits cache's
damaged rows in tests/test_logits_cache.py (they need a teacher pass). Shapes are tiny and
nothing here compiles more than a two-layer toy model.
"""

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models

from cascade_jax import data, files, hf, lm, logits_cache, model, prune, token_ids
from cascade_jax.config import ModelConfig
from cascade_jax.prune.importance import params_fingerprint

CFG = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                  d_ff=16)


def _refused(tree_hash, path, error, match, call, *args, **kwargs):
    """`call(*args, **kwargs)` raises `error` matching `match`, and `path` is unchanged."""
    before = tree_hash(path)
    with pytest.raises(error, match=match):
        call(*args, **kwargs)
    assert tree_hash(path) == before


def _write(path, content: bytes | str):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


@pytest.fixture
def tokenizer_file(tmp_path):
    """A 6-token word-level tokenizer.json with the built-in special tokens (EOS = 1)."""
    vocab = {data.PAD_TOKEN: 0, data.EOS_TOKEN: 1, "a": 2, "b": 3, "c": 4, "[UNK]": 5}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    path = str(tmp_path / "tok" / "tokenizer.json")
    os.makedirs(os.path.dirname(path))
    tokenizer.save(path)
    return path


def _from_config(tokenizer_file, source, **overrides):
    config = dict(source=source, tokenizer=tokenizer_file, seq_len=16, batch_size=2,
                  validation_percent=50) | overrides
    return data.datasets_from_config(config, seed=0)


# ================================================================================== files
# ------------------------------------------------------------------------------ JSON files


def test_damaged_json_names_the_file_the_line_and_what_writes_it(tmp_path, tree_hash):
    path = _write(tmp_path / "result.json", '{\n  "loss": 1.5,\n  "step": \n')
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" is not valid JSON: .* at line 4 column 1; the file is damaged"
             r" or was cut short, restore or rewrite it \(it is written by the cascade\)",
             files.read_json, path, "the cascade")


def test_missing_json_names_the_path_and_what_writes_it(tmp_path, tree_hash):
    path = str(tmp_path / "stage.json")
    _refused(tree_hash, tmp_path, FileNotFoundError,
             re.escape(path) + r" does not exist \(it is written by cascade.run\); check the "
             "path, or run what writes it first", files.read_json, path, "cascade.run")


def test_damaged_hf_config_json_names_it(tmp_path, tree_hash):
    path = _write(tmp_path / "config.json", '{"hidden_size": 8,, }')
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" is not valid JSON: .* line 1 column 19.*save_pretrained, "
             "or hf.save", hf.read_config, str(tmp_path))


def _hf_dir(tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    _write(root / hf.CONFIG_FILE, json.dumps(hf.config_to_hf(CFG)))
    return root


def test_damaged_safetensors_header_names_the_file(tmp_path, tree_hash):
    root = _hf_dir(tmp_path)
    weights = _write(root / hf.SINGLE_FILE, (10**12).to_bytes(8, "little") + b"{}")
    _refused(tree_hash, root, ValueError,
             re.escape(weights) + r" is not a readable safetensors file \(.*\): its header is "
             "damaged or the file was cut short; download or export it again",
             hf.load, str(root))


def test_safetensors_index_without_a_weight_map_names_it(tmp_path, tree_hash):
    root = _hf_dir(tmp_path)
    index = _write(root / hf.INDEX_FILE, json.dumps({"metadata": {}}))
    _refused(tree_hash, root, ValueError,
             re.escape(index) + " has no 'weight_map'; it is damaged: download or export",
             hf.load, str(root))


# --------------------------------------------------------------------------- tokenizer.json


def test_damaged_tokenizer_json_names_the_file(tmp_path, tree_hash, tokenizer_file):
    with open(tokenizer_file) as f:
        text = f.read()
    _write(tokenizer_file, text[: len(text) // 2])  # cut short
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(tokenizer_file) + r" is not a readable Hugging Face tokenizer.json "
             r"\(.*\); restore it, or save the tokenizer again",
             data.load_tokenizer, os.path.dirname(tokenizer_file))


# ----------------------------------------------------------------------- token files (.npy)


def test_a_token_file_that_is_not_numpy_names_the_file(tmp_path, tree_hash):
    path = _write(tmp_path / "tokens.npy", b"id,token\n1,2\n")
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" is not a readable numpy file .* restore or rewrite it",
             data.load_token_file, path)


def test_int64_ids_beyond_int32_are_refused_not_wrapped(tmp_path, tree_hash):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.array([5, 2**32 + 7, 3], np.int64))  # would wrap to 7 as int32
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r": token id 4294967303 at position 1 \(document 0\) is outside "
             r"\[0, 2147483648\), the range of int32 token ids; no vocabulary is that large",
             data.load_token_file, path)


def test_uint32_ids_beyond_int32_are_refused_not_wrapped(tmp_path, tree_hash):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.array([4, 1, 2**31 + 1], np.uint32))  # would wrap to a negative int32
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r": token id 2147483649 at position 2 \(document 1\)",
             data.load_token_file, path, eos_id=1)


def test_negative_ids_name_the_value_the_file_and_the_document(tmp_path, tree_hash):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.array([2, 1, 3, 1, 4, -3, 1], np.int32))
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r": token id -3 at position 5 \(document 2\) is outside the "
             r"vocabulary \[0, 6\); token ids are never negative",
             data.load_token_file, path, eos_id=1, vocab_size=6)


def test_float_token_files_are_refused(tmp_path, tree_hash):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.array([1.0, 2.5]))
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(repr(path)) + " holds a float64 array .*expected a 1-D integer token",
             data.load_token_file, path)


def test_an_empty_token_file_is_refused_by_name(tmp_path, tree_hash):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.zeros(0, np.int32))
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(repr(path)) + " holds no tokens; give a file with data",
             data.load_token_file, path)


def test_npz_without_offsets_names_the_file_and_the_arrays(tmp_path, tree_hash):
    path = str(tmp_path / "corpus.npz")
    np.savez(path, tokens=np.arange(4, dtype=np.int32))
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" lacks the arrays \['offsets'\] \(it has \['tokens'\]\).*"
             "rewrite it .*TokenizedCorpus.save", data.load_token_file, path)


def test_npz_with_a_damaged_member_names_the_file(tmp_path, tree_hash):
    path = str(tmp_path / "corpus.npz")
    data.TokenizedCorpus.from_documents([[2, 3, 1], [4, 1]]).save(path)
    with open(path, "r+b") as f:  # flip a byte of the tokens' data: its zip CRC no longer fits
        content = f.read()
        at = content.index(b"\x02\x00\x00\x00\x03\x00\x00\x00")
        f.seek(at)
        f.write(b"\x09")
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" is not a readable numpy file \(BadZipFile: Bad CRC-32",
             data.load_token_file, path)


def test_ids_beyond_the_tokenizer_vocabulary_name_the_value_and_the_file(
        tmp_path, tree_hash, tokenizer_file):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.array([2, 3, 1, 4, 9, 1], np.int64))
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r": token id 9 at position 4 \(document 1\) is outside the "
             r"vocabulary \[0, 6\); tokenize with the model's own tokenizer",
             _from_config, tokenizer_file, f"npy:{path}")


def test_a_glob_of_empty_documents_names_the_source(tmp_path, tree_hash, tokenizer_file):
    for i in range(3):
        _write(tmp_path / f"d{i}.txt", " \n" if i else "")
    source = f"text:{tmp_path}/*.txt"
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(f"every document of {source!r} is empty (3 documents); point the glob"),
             _from_config, tokenizer_file, source)


def test_a_corpus_shorter_than_one_row_names_the_source(tmp_path, tree_hash, tokenizer_file):
    path = str(tmp_path / "tokens.npy")
    np.save(path, np.tile(np.array([2, 3, 1], np.int32), 6))  # 6 documents, 18 tokens
    held_out = [data.is_validation(str(i), 50) for i in range(6)]
    assert any(held_out) and not all(held_out)  # both splits have documents
    train_tokens = 3 * held_out.count(False)
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(f"the train split of 'npy:{path}' has {train_tokens} tokens, fewer than "
                       "one row of seq_len=64; give more data or lower seq_len"),
             _from_config, tokenizer_file, f"npy:{path}", seq_len=64)


# ------------------------------------------------------------------------ importance files


def _scores(cfg=CFG, fingerprint=None):
    n, d = cfg.n_layers, cfg.d_model
    rng = np.random.default_rng(0)
    arrays = {"layer_block_influence": rng.random(n), "layer_norm_ratio": rng.random(n),
              "neuron": rng.random((n, cfg.d_ff)), "head": rng.random((n, cfg.n_heads)),
              "kv_group": rng.random((n, cfg.n_kv_heads)), "channel": rng.random(d),
              "residual_cov": np.eye(d), "n_tokens": 10.0}
    return prune.Importance(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()},
                            model_config=cfg.to_dict(), params_fingerprint=fingerprint)


def test_a_missing_importance_file_names_the_path_and_what_writes_it(tmp_path, tree_hash):
    path = str(tmp_path / "importance.npz")
    _refused(tree_hash, tmp_path, FileNotFoundError,
             re.escape(path) + r" does not exist \(it is written by Importance.save, with the "
             "scores of prune.estimate_importance\\)", prune.Importance.load, path)


def test_a_damaged_importance_file_names_it(tmp_path, tree_hash):
    path = str(tmp_path / "importance.npz")
    _scores(fingerprint="0" * 16).save(path)
    with open(path, "r+b") as f:
        f.truncate(300)  # cut short
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(path) + r" is not a readable numpy file .*Importance.save",
             prune.Importance.load, path)


def test_an_importance_file_without_a_fingerprint_loads_with_a_warning(tmp_path, tree_hash):
    path = str(tmp_path / "importance.npz")
    _scores(fingerprint=None).save(path)  # as files written before fingerprints existed
    before = tree_hash(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(path) + " holds no params fingerprint.*"
                      "re-score and save"):
        scores = prune.Importance.load(path, CFG)
    assert scores.params_fingerprint is None and tree_hash(tmp_path) == before


# ------------------------------------------------------------------------- logits caches


def test_damaged_cache_metadata_names_the_file(tmp_path, tree_hash):
    os.makedirs(tmp_path / "cache")
    meta = _write(tmp_path / "cache" / "metadata.json", '{"format": "cascade_jax.logits')
    _refused(tree_hash, tmp_path, ValueError,
             re.escape(meta) + r" is not valid JSON: .*rewrite it \(it is written by "
             r"logits_cache.write_cache\)", logits_cache.open_cache, str(tmp_path / "cache"))


def test_cache_writing_refuses_tokens_beyond_the_teacher_vocabulary_before_writing(
        tmp_path, tree_hash):
    batch = {"tokens": np.array([[1, 2, 3, 16]], np.int32)}
    _refused(tree_hash, tmp_path, ValueError,
             r"tokens of batch 0 given to write_cache: token id 16 at index \(0, 3\) is outside "
             r"the vocabulary \[0, 16\); tokenize with the model's own tokenizer",
             logits_cache.write_cache, str(tmp_path / "cache"), CFG, {}, [batch], k=2,
             progress=False)
    assert not os.path.exists(tmp_path / "cache")


# ==================================================================================== API
# -------------------------------------------------------------------- token ids in memory


def test_in_memory_documents_name_the_negative_id_and_its_document():
    with pytest.raises(ValueError, match=r"documents: token id -1 at position 4 \(document 1\) "
                                         r"is outside \[0, 2147483648\), the range of int32 "
                                         "token ids; token ids are never negative"):
        data.TokenizedCorpus.from_documents([[3, 4, 1], [5, -1]])


def test_in_memory_int64_ids_beyond_int32_are_refused_not_wrapped():
    with pytest.raises(ValueError, match=r"token id 2147483648 at position 1 \(document 0\)"):
        data.TokenizedCorpus.from_documents([np.array([1, 2**31], np.int64)])
    mixed = data.TokenizedCorpus.from_documents([np.array([7], np.uint64), [1, 2]])
    assert mixed.tokens.dtype == np.int32 and mixed.tokens.tolist() == [7, 1, 2]


def test_in_memory_float_documents_are_refused_by_index():
    with pytest.raises(ValueError, match=r"documents, document 1 holds float64 values; token "
                                         "ids must be integers"):
        data.TokenizedCorpus.from_documents([[1, 2], [0.5]])


def test_check_token_ids_names_the_value_the_document_and_where():
    corpus = data.TokenizedCorpus.from_documents([[1, 2], [3, 40, 5]])
    data.check_token_ids(corpus, 41, where="unused")  # in range: nothing to say
    with pytest.raises(ValueError, match=r"data of stage 'child': token id 40 at position 3 "
                                         r"\(document 1\) is outside the vocabulary \[0, 32\); "
                                         "tokenize with the model's own tokenizer"):
        data.check_token_ids(corpus, 32, where="data of stage 'child'")


def test_calibration_tokens_beyond_the_vocabulary_are_named():
    with pytest.raises(ValueError, match=r"calibration batch tokens: token id 99 at index "
                                         r"\(1, 0\) is outside the vocabulary \[0, 16\)"):
        prune.estimate_importance(CFG, {}, [np.array([[1, 2], [99, 3]])], progress=False)


# ----------------------------------------------------------- token ids inside the model


def _random_params(seed):
    """Params of CFG's shapes without compiling an init (eval_shape, then numpy)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        model.param_shapes(CFG))


@pytest.fixture(scope="module")
def params():
    return _random_params(0)


def test_model_check_tokens_names_the_id_and_its_index(params):
    model.check_tokens(CFG, jnp.array([[0, 15]]))
    with pytest.raises(ValueError, match=r"tokens: token id 16 at index \(0, 1\) is outside "
                                         r"the vocabulary \[0, 16\); tokenize with"):
        model.check_tokens(CFG, np.array([[3, 16]]))


def test_forward_under_the_debug_switch_names_the_bad_id_inside_jit(params, monkeypatch):
    forward = jax.jit(model.forward, static_argnums=0)
    bad = jnp.array([[1, -2, 3]])
    assert jnp.isfinite(forward(CFG, params, bad)).all()  # the silent wrap, unchecked
    monkeypatch.setenv(token_ids.ENV_VAR, "1")
    checked = jax.jit(lambda p, t: model.forward(CFG, p, t))  # traced with the switch on
    with pytest.raises(Exception, match=r"tokens \(inside jit\): token id -2 at index "
                                        r"\(0, 1\) is outside the vocabulary \[0, 16\)"):
        jax.block_until_ready(checked(params, bad))


def test_cross_entropy_targets_are_checked_under_the_switch():
    logits = jnp.zeros((1, 2, CFG.vocab_size))
    targets, weights = jnp.array([[3, 17]]), jnp.ones((1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jnp.isnan(lm.cross_entropy(logits, targets, weights)[0])  # NaN, no culprit
    with token_ids.checking(), pytest.raises(ValueError, match=r"targets: token id 17 at "
                                                               r"index \(0, 1\)"):
        lm.cross_entropy(logits, targets, weights)


# ---------------------------------------------------------------- scores and the params


def test_prune_refuses_scores_of_another_model_of_the_same_shape(params):
    other = _random_params(1)
    scores = _scores(fingerprint=params_fingerprint(other))
    target = prune.Target(d_ff=8)
    with pytest.raises(ValueError, match=(
            rf"computed on params with fingerprint {scores.params_fingerprint}, but the params "
            rf"given have fingerprint {params_fingerprint(params)}: .*Re-score these params "
            r"with prune.estimate_importance.* or pass check_fingerprint=False")):
        prune.prune(CFG, params, scores, target)
    out = prune.prune(CFG, params, scores, target, check_fingerprint=False)  # knowingly
    assert out.cfg.d_ff == 8
    assert prune.prune(CFG, other, scores, target).cfg.d_ff == 8  # their own params pass


# ------------------------------------------------- config.json types, weights, FP8 scales


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' must be True or False"),
    ({"vocab_size": "16"}, r"vocab_size='16' must be a positive integer"),
    ({"num_hidden_layers": 2.0}, r"num_hidden_layers=2.0 must be a positive integer"),
    ({"rms_norm_eps": float("nan")}, r"rms_norm_eps=nan must be a finite number > 0"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": "4"}},
     r"rope_parameters factor='4' must be a finite number"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "truncate": "false", "original_max_position_embeddings": 512}},
     r"rope_parameters truncate='false' must be True or False"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0.5,
                          "original_max_position_embeddings": 512}},
     r"must have factor >= 1 \(as transformers requires\)"),
])
def test_hf_config_json_values_are_typed_and_in_range(tmp_path, tree_hash, change, message):
    root = _hf_dir(tmp_path)
    config = json.loads((root / hf.CONFIG_FILE).read_text())
    _write(root / hf.CONFIG_FILE, json.dumps({**config, **change}))
    _refused(tree_hash, root, ValueError, message, hf.read_config, str(root))


def _saved(tmp_path, change=None):
    """CFG saved as an HF directory, with `change(tensors)` applied to its safetensors."""
    from safetensors.numpy import load_file, save_file

    root = hf.save(CFG, _random_params(0), tmp_path / "hf")
    if change is not None:
        tensors = load_file(root / hf.SINGLE_FILE)
        change(tensors)
        save_file(tensors, str(root / hf.SINGLE_FILE), metadata={"format": "pt"})
    return root


def test_non_finite_weights_are_refused_naming_the_tensor_unless_allowed(tmp_path, tree_hash):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 2] = np.nan

    root = _saved(tmp_path, poison)
    _refused(tree_hash, root, ValueError,
             rf"{re.escape(str(root))}: layers/mlp/w_up \(block .*\) holds a non-finite value: "
             r"nan at index \(1, 2, 3\); the file is damaged.*check_finite=False",
             hf.load, str(root))
    _, params = hf.load(str(root), check_finite=False)  # the opt-out: as stored
    assert np.isnan(np.asarray(params["layers"]["mlp"]["w_up"])).sum() == 1


@pytest.mark.parametrize("scale, shown", [(np.nan, "nan"), (0.0, "0.0")])
def test_fp8_scales_of_nan_or_zero_are_refused_naming_them(tmp_path, tree_hash, scale, shown):
    import ml_dtypes

    name = "model.layers.0.self_attn.q_proj.weight"

    def quantize(tensors):
        tensors[name] = tensors[name].astype(ml_dtypes.float8_e4m3fn)
        tensors[name + "_scale_inv"] = np.asarray(scale, np.float32)

    root = _saved(tmp_path, quantize)
    config = json.loads((root / hf.CONFIG_FILE).read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None,
                                     "activation_scheme": "dynamic"}
    _write(root / hf.CONFIG_FILE, json.dumps(config))
    _refused(tree_hash, root, ValueError,
             rf"{re.escape(name)}_scale_inv holds NaN, infinite or 0 scales \(a 0 would zero "
             rf"its weights\): {shown}", hf.load, str(root))
    hf.load(str(root), check_finite=False)  # the opt-out reads it as stored


# ------------------------------------------------------- checkpoint steps, calibration rows


@pytest.mark.parametrize("step", [-1, 2.0, True])
def test_a_checkpoint_step_that_could_never_be_listed_is_refused(tmp_path, step):
    from cascade_jax import checkpoint

    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"step={step!r} must be a non-negative integer"):
        checkpoint.save(str(tmp_path / "ckpt"), step, {"x": np.zeros(2, np.float32)})
    assert checkpoint.all_steps(tmp_path / "ckpt") == []
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_calibration_rows_longer_than_the_parents_positions_are_refused():
    from cascade_jax import sharding
    from experiments import prune as prune_main

    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"--seq_len=64 exceeds the parent's "
                                         r"max_position_embeddings=32; score rows of at most "
                                         r"--seq_len=32"):
        prune_main.check_batch(8, 64, 1, mesh, 32)
    prune_main.check_batch(8, 32, 1, mesh, 32)


def test_the_roots_finite_check_opt_out_is_a_boolean():
    from cascade_jax import runconfig

    with pytest.raises(ValueError, match=r"config.root.check_finite='no' must be True or False"):
        runconfig._root({"kind": "hf", "path": "x", "check_finite": "no"})
    assert not runconfig._root({"kind": "hf", "path": "x", "check_finite": False}).check_finite
