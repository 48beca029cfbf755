"""Hugging Face interop against `transformers` itself (the reference nobody here wrote).

Parity metric, used everywhere below: max |ours - theirs| / max |theirs| over all logits,
float32, eager attention; it must be ≤ 1e-4. Checked after import (HF → ours) and after export
(ours → HF), plus packing, sharded files, bf16, loading onto a device mesh, and bad input.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import TOL, hf_logits, random_tokens, randomize, rel_err
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Ministral3Config,
    Ministral3ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from cascade_jax import hf, model, prune
from cascade_jax.config import Llama3RopeScaling, ModelConfig, YarnRopeScaling

REPO = Path(__file__).resolve().parents[1]
_COMMON = dict(vocab_size=128, num_hidden_layers=2, intermediate_size=96, rms_norm_eps=1e-5,
               max_position_embeddings=64, attn_implementation="eager")
# name: (transformers config class, model class, config kwargs, the ModelConfig fields that
# load must read from it).
CASES = {
    # GQA, head_dim 16 != 48 / 4, untied, and a sliding window shorter than the sequence.
    "mistral_gqa_untied": (MistralConfig, MistralForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, rope_theta=1e6, sliding_window=6),
        dict(rope_theta=1e6, sliding_window=6, tie_embeddings=False)),
    # Tied embeddings, Llama 3's rope_theta, 4 query heads per KV head.
    "llama_tied_theta500k": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        tie_word_embeddings=True, rope_theta=500000.0),
        dict(rope_theta=500000.0, tie_embeddings=True)),
    # Llama 3.1's 'llama3' RoPE scaling, with an original length short enough (16) that the
    # scaled, smoothed and kept frequency bands all occur in head_dim 16.
    "llama31_rope_scaling": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, rope_theta=500000.0, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16)),
        dict(rope_theta=500000.0, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16))),
    # Plain multi-head attention (n_kv_heads == n_heads), default head_dim.
    "llama_mha": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=False, rope_theta=10000.0),
        dict(rope_theta=10000.0, head_dim=16)),
    # Ministral 3: YaRN and the query scale with an original length of 8, so both act inside
    # 12 tokens; betas chosen so the ramp lies inside head_dim 16 (both bands occur), and
    # mscale != mscale_all_dim so the attention scale is not 1.
    "ministral3_yarn": (Ministral3Config, Ministral3ForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, max_position_embeddings=32, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
            beta_fast=2.0, beta_slow=0.02, mscale=1.0, mscale_all_dim=0.5,
            llama_4_scaling_beta=0.4)),
        dict(rope_theta=10000.0, query_scale_beta=0.4, rope_scaling=YarnRopeScaling(
            4.0, 8, beta_fast=2.0, beta_slow=0.02, mscale=1.0, mscale_all_dim=0.5))),
    # Qwen2/2.5: q/k/v biases, tied (the small Qwen2.5 models are), head_dim = 48 / 4.
    "qwen2_bias_tied": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=1e6),
        dict(rope_theta=1e6, qkv_bias=True, head_dim=12, tie_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim 16 != 48 / 4, and YaRN without truncation and with
    # an explicit attention factor (Qwen3's long-context setting, with a short original).
    "qwen3_qk_norm_yarn": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, max_position_embeddings=16, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=8,
            beta_fast=4.0, beta_slow=0.05, truncate=False, attention_factor=1.3)),
        dict(qk_norm=True, rope_scaling=YarnRopeScaling(
            2.0, 8, beta_fast=4.0, beta_slow=0.05, truncate=False, attention_factor=1.3))),
}


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    """(case name, random-weight HF model, its save_pretrained directory)."""
    config_cls, model_cls, kwargs, _ = CASES[request.param]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**_COMMON, **kwargs})).eval()
    randomize(hf_model, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, directory


def _without(cfg: ModelConfig) -> list[ModelConfig]:
    """`cfg` with each of its RoPE scaling and query scale removed: what the case's parity must
    depend on (else the short sequences would not exercise them)."""
    out = []
    if cfg.query_scale_beta is not None:
        out.append(cfg.replace(query_scale_beta=None))
    if cfg.rope_scaling is not None:
        out.append(cfg.replace(rope_scaling=None, query_scale_beta=None))
    return out


def test_import_matches_transformers(reference):
    name, hf_model, directory = reference
    cfg, params = hf.load(directory)
    hf_cfg = hf_model.config
    assert (cfg.n_heads, cfg.n_kv_heads) == (
        hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
    expected = {"sliding_window": None, "rope_scaling": None, "query_scale_beta": None,
                "qkv_bias": False, "qk_norm": False, "head_dim": 16, **CASES[name][3]}
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    assert ("lm_head" in params) != cfg.tie_embeddings
    assert jax.tree.structure(params) == jax.tree.structure(model.param_shapes(cfg))
    tokens = random_tokens(1)
    theirs = hf_logits(hf_model, tokens)
    err = rel_err(model.forward(cfg, params, jnp.asarray(tokens)), theirs)
    print(f"\n[{name}] import max relative error {err:.2e}")
    assert err <= TOL
    for ablated in _without(cfg):
        assert rel_err(model.forward(ablated, params, jnp.asarray(tokens)), theirs) > 100 * TOL


def test_export_matches_transformers(reference, tmp_path):
    name, hf_model, directory = reference
    cfg, params = hf.load(directory)
    architecture = type(hf_model).__name__
    # One case exports as several files, so transformers also reads our index.
    shard_bytes = 20_000 if name == "mistral_gqa_untied" else hf.DEFAULT_MAX_SHARD_BYTES
    out = hf.save(cfg, params, tmp_path / "export", architecture=architecture,
                  max_shard_bytes=shard_bytes)
    assert (out / hf.INDEX_FILE).exists() == (name == "mistral_gqa_untied")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    original = hf_model.state_dict()
    again = reloaded.state_dict()
    assert sorted(again) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key
    tokens = random_tokens(2)
    err = rel_err(model.forward(cfg, params, jnp.asarray(tokens)), hf_logits(reloaded, tokens))
    print(f"\n[{name}] export max relative error {err:.2e}")
    assert err <= TOL


def test_packed_segments_match_separate_documents(reference):
    """[docA, docB] in one row with segment ids = HF on each document alone: proves the packing
    mask and the positions restarting at each document, for RoPE and the query scale (docB is
    longer than the window)."""
    name, hf_model, directory = reference
    cfg, params = hf.load(directory)
    # Both documents run past the Ministral 3 case's original length 8.
    doc_a, doc_b = random_tokens(3, (1, 9)), random_tokens(4, (1, 11))
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segment_ids = np.array([[1] * 9 + [2] * 11], np.int32)
    ours = model.forward(cfg, params, jnp.asarray(packed), jnp.asarray(segment_ids))
    theirs = np.concatenate([hf_logits(hf_model, doc_a), hf_logits(hf_model, doc_b)], axis=1)
    err = rel_err(ours, theirs)
    print(f"\n[{name}] packed max relative error {err:.2e}")
    assert err <= TOL


def test_pruned_child_exports_with_parity(reference, tmp_path):
    """A child with KV groups (with one KV head: query heads) and half the FFN removed is
    written as the parent's family and read back by transformers: the surgery leaves every
    family's extras (biases, q/k norms, RoPE scaling, query scale) in a loadable state."""
    name, hf_model, directory = reference
    cfg, params = hf.load(directory)
    if cfg.n_kv_heads > 1:
        cfg_c, child = prune.surgery.keep_kv_groups(cfg, params, [[1], [0]][:cfg.n_layers])
    else:
        cfg_c, child = prune.surgery.keep_query_heads(cfg, params, [1, 2])
    cfg_c, child = prune.surgery.keep_neurons(cfg_c, child, np.arange(0, cfg.d_ff, 2))
    out = hf.save(cfg_c, child, tmp_path / "child", architecture=type(hf_model).__name__)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.num_key_value_heads == cfg_c.n_kv_heads
    tokens = random_tokens(6)
    err = rel_err(model.forward(cfg_c, child, jnp.asarray(tokens)), hf_logits(reloaded, tokens))
    print(f"\n[{name}] pruned child export max relative error {err:.2e}")
    assert err <= TOL


# ----------------------------------------------------------------------------- format


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=48, rope_theta=1e6, sliding_window=8)


def _random_params(cfg: ModelConfig, seed: int = 0):
    params = model.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [
        (leaf + 0.3 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)])


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small untied Mistral checkpoint written by hf.save, and its params."""
    params = _random_params(CFG)
    return hf.save(CFG, params, tmp_path_factory.mktemp("saved") / "ckpt"), params


_YARN = YarnRopeScaling(16.0, 16384, mscale=1.0, mscale_all_dim=1.0)


def test_config_round_trip():
    plain = CFG.replace(sliding_window=None)
    for cfg, arch in ((CFG, "MistralForCausalLM"),
                      (plain.replace(tie_embeddings=True, param_dtype="bfloat16"),
                       "LlamaForCausalLM"),
                      (CFG.replace(rope_scaling=_YARN, query_scale_beta=0.1),
                       "Ministral3ForCausalLM"),
                      (plain.replace(rope_scaling=_YARN), "Ministral3ForCausalLM"),
                      (CFG.replace(qkv_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),
                      (plain.replace(qk_norm=True, rope_scaling=_YARN), "Qwen3ForCausalLM")):
        if arch != "LlamaForCausalLM":  # Mistral expresses a Llama config too
            assert hf.default_architecture(cfg) == arch
        assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(cfg, arch)))) == cfg


@pytest.mark.parametrize("architecture, change, culprit", [
    ("LlamaForCausalLM", {}, "sliding_window=8"),
    ("MistralForCausalLM", {"qkv_bias": True}, "qkv_bias=True"),
    ("Qwen2ForCausalLM", {}, "qkv_bias=False"),
    ("Qwen3ForCausalLM", {"qk_norm": True, "qkv_bias": True}, "qkv_bias=True"),
    ("MistralForCausalLM", {"rope_scaling": _YARN, "query_scale_beta": 0.1},
     "query_scale_beta=0.1"),
    ("Ministral3ForCausalLM", {}, "rope_scaling=None"),
    ("Mistral3ForConditionalGeneration", {}, "its text family"),
])
def test_configs_a_family_cannot_express_are_refused_on_save(architecture, change, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        hf.config_to_hf(CFG.replace(**change), architecture)


def test_qwen_sliding_window_keys():
    """Qwen's `sliding_window` is inert unless `use_sliding_window` (Qwen2.5 releases ship
    131072 with the flag off); with it, `max_window_layers` decides which layers slide."""
    qwen = {**hf.config_to_hf(CFG.replace(sliding_window=None, qkv_bias=True)),
            "sliding_window": 4096, "max_window_layers": 28}
    qwen.pop("layer_types")
    assert hf.config_from_hf(qwen).sliding_window is None
    assert hf.config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 0}
                             ).sliding_window == 4096
    assert hf.config_from_hf({**qwen, "use_sliding_window": True}).sliding_window is None
    with pytest.raises(ValueError, match="max_window_layers=1 < num_hidden_layers=2") as info:
        hf.config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1},
                          source="qwen/config.json")
    assert "qwen/config.json" in str(info.value) and "use_sliding_window=false" in str(info.value)


def test_config_from_transformers_4_keys():
    """transformers 4.x wrote `rope_theta`/`torch_dtype` at top level; `head_dim` may be null
    (meaning hidden_size / num_attention_heads); Llama ignores a `sliding_window` key."""
    cfg = hf.config_from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": None,
        "intermediate_size": 48, "rope_theta": 500000.0, "rope_scaling": None,
        "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "sliding_window": 4096})
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.rope_theta, cfg.param_dtype, cfg.sliding_window
            ) == (8, 4, 500000.0, "bfloat16", None)


@pytest.mark.parametrize("change, culprit", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}},
     "dynamic"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method='gptq'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     "weight_block_size"),
    ({"architectures": ["Ministral3ForCausalLM"], "model_type": "ministral3",
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 8}}, "llama_4_scaling_beta"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True},
     "attention_bias"),
    ({"architectures": ["Mistral3ForConditionalGeneration"],
      "text_config": {"model_type": "llama"}}, "text_config.model_type='llama'"),
    ({"architectures": ["Mistral3ForConditionalGeneration"],
      "text_config": {"model_type": "mistral", "vocab_size": 64}},
     r"\(text_config\): required key 'hidden_size'"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"dtype": "int8", "torch_dtype": "int8"}, "int8"),
])
def test_unsupported_config_is_a_clear_error(change, culprit):
    bad = {**hf.config_to_hf(CFG), **change}
    with pytest.raises(ValueError, match=culprit) as info:
        hf.config_from_hf(bad, source="some/dir/config.json")
    assert "some/dir/config.json" in str(info.value)


def test_sharded_files_round_trip(tmp_path):
    params = _random_params(CFG)
    out = hf.save(CFG, params, tmp_path / "sharded", max_shard_bytes=8_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    assert not (out / hf.SINGLE_FILE).exists()
    cfg, loaded = hf.load(out)
    assert cfg == CFG
    _assert_same(loaded, params)


def test_bfloat16_round_trip(tmp_path):
    cfg = CFG.replace(param_dtype="bfloat16")
    params = _random_params(cfg)
    out = hf.save(cfg, params, tmp_path / "bf16", architecture="MistralForCausalLM")
    with safe_open(str(out / hf.SINGLE_FILE), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    loaded_cfg, loaded = hf.load(out)
    assert loaded_cfg == cfg
    _assert_same(loaded, params)
    cfg32, params32 = hf.load(out, dtype="float32")
    assert cfg32.param_dtype == "float32"
    _assert_same(params32, jax.tree.map(lambda a: a.astype(jnp.float32), params))
    # transformers reads our bf16 bytes as the same numbers.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    tokens = random_tokens(5, vocab=cfg.vocab_size)
    err = rel_err(model.forward(cfg32, params32, jnp.asarray(tokens)),
                  hf_logits(reloaded, tokens))
    print(f"\n[bf16 weights, float32 compute] export max relative error {err:.2e}")
    assert err <= TOL


# One axis sharded per leaf, chosen to hit every read path: HF rows (heads), HF columns
# (d_model, d_ff), a split head_dim (an inner axis of a flattened HF axis), the layer axis,
# the vocab, and replication. Run in this process, or in a child with 8 CPU devices.
_SHARDED_LOAD_CHECK = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cascade_jax import hf

def check(path):
    _, whole = hf.load(path)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    specs = {
        "embed": {"embedding": P("x", None)},
        "final_norm": {"scale": P()},
        "lm_head": {"kernel": P(None, "x")},
        "layers": {
            "attn_norm": {"scale": P("x", None)},
            "attn": {"wq": P(None, None, None, "x"), "wk": P(None, None, "x", None),
                     "wv": P(None, "x", None, None), "wo": P(None, "x", None, None)},
            "mlp_norm": {"scale": P(None, "x")},
            "mlp": {"w_gate": P(None, "x", None), "w_up": P(None, None, "x"),
                    "w_down": P(None, "x", None)},
        },
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    _, sharded = hf.load(path, shardings=shardings)
    for want, got, sharding in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded),
                                   jax.tree.leaves(shardings), strict=True):
        want = np.asarray(want)
        assert got.sharding == sharding, (got.sharding, sharding)
        assert np.array_equal(np.asarray(got), want)
        for shard in got.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), want[shard.index])
            if sharding.spec != P():  # each device holds half, not a full copy
                assert shard.data.size * 2 == want.size
    print("sharded load ok on", len(jax.devices()), "devices")

if __name__ == "__main__":
    check(sys.argv[1])
"""


def test_load_onto_a_sharding(saved):
    path, _ = saved
    if len(jax.devices()) >= 2:
        namespace = {"__name__": "sharded_load_check"}
        exec(compile(_SHARDED_LOAD_CHECK, "sharded_load_check", "exec"), namespace)
        namespace["check"](path)
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", _SHARDED_LOAD_CHECK, str(path)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_slices_read_only_the_needed_rows_and_columns():
    """A shard of wo_HED (heads split) reads just its HF columns, not the whole o_proj."""
    requested = []

    class Recorder:
        def __getitem__(self, index):
            requested.append(index)
            return np.zeros((index[0].stop - index[0].start, index[1].stop - index[1].start))

    wo = next(t for t in hf._TENSORS if t.path == "layers/attn/wo")
    block = hf._read_block(Recorder(), wo, (4, 16, 32), [(2, 4), (0, 16), (0, 32)])
    assert block.shape == (2, 16, 32)
    assert requested == [(slice(0, 32), slice(32, 64))]  # all D rows, columns of heads 2..3


# ----------------------------------------------------------------------------- bad input


def _copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "copy"))


def test_missing_tensor_is_a_clear_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    tensors = load_file(path / hf.SINGLE_FILE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'"
                       ) as info:
        hf.load(path)
    assert "model.safetensors" in str(info.value)


def test_unsupported_architecture_is_a_clear_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        hf.load(path)
    message = str(info.value)
    assert str(path / hf.CONFIG_FILE) in message and "MistralForCausalLM" in message


def test_shape_mismatch_is_a_clear_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config["num_key_value_heads"] = 1  # the file holds 2 KV heads
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight in "
                       r"model.safetensors has shape \(32, 32\), config.json implies \(16, 32\)"):
        hf.load(path)


def test_params_shape_mismatch_on_save(tmp_path):
    params = _random_params(CFG)
    with pytest.raises(ValueError, match=r"layers/mlp/w_up has shape \(2, 32, 48\), cfg "
                                         r"implies \(2, 32, 40\)"):
        hf.save(CFG.replace(d_ff=40), params, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_unless_asked(saved, tmp_path):
    params = saved[1]
    target = _copy(saved, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        hf.save(CFG, params, target)
    assert str(target) in str(info.value)
    other = _random_params(CFG, seed=7)
    hf.save(CFG, other, target, overwrite=True)
    _assert_same(hf.load(target)[1], other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp dirs left behind
