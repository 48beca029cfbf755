"""Hugging Face decoder directories ↔ `(ModelConfig, params)`: Llama, Mistral, Ministral 3,
Qwen2/2.5 and Qwen3 `*ForCausalLM`, and the text model inside a Mistral 3 wrapper
(`Mistral3ForConditionalGeneration`), in float or FP8.

Why this shape:
- One table (`_TENSORS`) names every HF tensor, its param path and its layout change; load, save
  and validation all derive from it, so the two directions cannot drift apart. One table of
  families (`_FAMILIES`) says what each architecture's config.json can express.
- HF stores a torch `Linear` as `[out, in]`; we store `[*in_axes, *out_axes]` with heads split
  out (`wq_DHE`, `wo_HED`). Converting is "transpose, then reshape" and back.
- Loading streams: each stacked `[N, ...]` leaf is filled layer by layer into one host buffer,
  or, given a target sharding, each device's shard is read straight from the file through
  `safe_open(...).get_slice`, so a 24B checkpoint never needs two full copies in host memory.
  FP8 weights are dequantized block by block as they are read.
- A Mistral 3 wrapper's text tensors are renamed to the plain layout when the files are
  indexed (either prefix); its vision tower and projector stay on disk, never read.
  `save(vision_from=<that wrapper>)` writes a child back as the wrapper, so it still sees
  images: vision tensors streamed from the parent's files, the projector's output rows
  mapped into the child's residual basis (the prune's `hidden_map`), like any residual writer.
- Everything is checked before any weight is read: architecture and config fields we do not
  model, missing/unexpected tensors, shapes and dtypes, each reported by name with the way out.
- Saving is atomic (temp dir next to the target, then rename) and gathers one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import numpy.typing as npt
from jax.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file

from cascade_jax import files, gguf, model, paths, validate
from cascade_jax.config import (
    ROPE_SCALINGS,
    Llama3RopeScaling,
    ModelConfig,
    RopeScaling,
    YarnRopeScaling,
)

Params = dict[str, Any]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WRITER = "save_pretrained, or hf.save"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's usual "5GB" shards

_FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
# Tensors some checkpoints carry that hold nothing we need (RoPE tables are recomputed).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
# Keys config_to_hf owns; `save(extra_config=...)` may add others but not override these.
_MODELLED_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act",
    "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_theta",
    "rope_parameters", "rope_scaling", "sliding_window", "dtype", "torch_dtype",
    "attention_bias", "mlp_bias", "quantization_config", "use_sliding_window",
    "max_window_layers", "layer_types", "text_config", "vision_config",
})


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class _Family:
    """One transformers text architecture: what its config.json can express.

    `window`: how it reads a sliding window: "ignored" (Llama never applies `sliding_window`),
    "key" (Mistral, Ministral 3: `sliding_window` applies to every layer), "layers" (Qwen:
    only with `use_sliding_window`, on the layers `layer_types` / `max_window_layers` name).
    `qkv_bias` / `qk_norm`: the family always has them (Qwen2 / Qwen3), the others never.
    `query_scale`: applies `rope_parameters.llama_4_scaling_beta` (Ministral 3).
    """

    architecture: str
    model_type: str
    window: str
    qkv_bias: bool = False
    qk_norm: bool = False
    query_scale: bool = False


_FAMILIES = {f.architecture: f for f in (
    _Family("LlamaForCausalLM", "llama", window="ignored"),
    _Family("MistralForCausalLM", "mistral", window="key"),
    _Family("Ministral3ForCausalLM", "ministral3", window="key", query_scale=True),
    _Family("Qwen2ForCausalLM", "qwen2", window="layers", qkv_bias=True),
    _Family("Qwen3ForCausalLM", "qwen3", window="layers", qk_norm=True),
)}
ARCHITECTURES = tuple(_FAMILIES)  # what save writes, and load reads as is
# Mistral 3 (Mistral Small 3.1, Ministral 3): a vision tower and projector around a text
# model whose config is `text_config` (model_type 'mistral' or 'ministral3'); load reads the
# text model, save writes it as that text family, or as the wrapper given `vision_from`.
WRAPPER = "Mistral3ForConditionalGeneration"
_WRAPPER_TEXT_TYPES = ("mistral", "ministral3")
_BY_MODEL_TYPE = {f.model_type: f.architecture for f in _FAMILIES.values()}
_BY_MODEL_TYPE["mistral3"] = WRAPPER


# ----------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor (one per layer when `hf` contains `{i}`) ↔ one param leaf.

    `n_in`: HF holds a torch Linear `[out, in]`; our leaf is `[*in_axes, *out_axes]` with
    `n_in` input axes (wq_DHE: 1, wo_HED: 2). 0: HF holds our leaf flattened to 1-D (a bias
    [H*E] ↔ bq_HE). None: identical layout (norms, embedding). `needs`: the config flag
    without which the tensor does not exist ('untied', 'qkv_bias', 'qk_norm').
    """

    hf: str
    path: str  # our param's path (`paths`)
    n_in: int | None = None
    needs: str | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def names(self, cfg: ModelConfig) -> list[str]:
        return [self.name(i) for i in range(cfg.n_layers)] if self.stacked else [self.name()]

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape of one tensor, given our per-layer shape."""
        if self.n_in is None:
            return tuple(ours)
        if self.n_in == 0:
            return (math.prod(ours),)
        return (math.prod(ours[self.n_in:]), math.prod(ours[:self.n_in]))

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return np.ascontiguousarray(ours)
        if self.n_in == 0:
            return np.ascontiguousarray(ours.reshape(-1))
        in_size = math.prod(ours.shape[:self.n_in])
        return np.ascontiguousarray(ours.reshape(in_size, -1).T)


_EMBEDDING, _LM_HEAD = "embed/embedding", "lm_head/kernel"
_ATTN = "model.layers.{i}.self_attn."
_TENSORS = (
    _Tensor("model.embed_tokens.weight", _EMBEDDING),                     # [V, D]
    _Tensor("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale"),
    _Tensor(_ATTN + "q_proj.weight", "layers/attn/wq", 1),                     # [H*E, D]
    _Tensor(_ATTN + "k_proj.weight", "layers/attn/wk", 1),                     # [K*E, D]
    _Tensor(_ATTN + "v_proj.weight", "layers/attn/wv", 1),                     # [K*E, D]
    _Tensor(_ATTN + "q_proj.bias", "layers/attn/bq", 0, "qkv_bias"),           # [H*E]
    _Tensor(_ATTN + "k_proj.bias", "layers/attn/bk", 0, "qkv_bias"),           # [K*E]
    _Tensor(_ATTN + "v_proj.bias", "layers/attn/bv", 0, "qkv_bias"),           # [K*E]
    _Tensor(_ATTN + "q_norm.weight", "layers/attn/q_norm", None, "qk_norm"),   # [E]
    _Tensor(_ATTN + "k_norm.weight", "layers/attn/k_norm", None, "qk_norm"),   # [E]
    _Tensor(_ATTN + "o_proj.weight", "layers/attn/wo", 2),                     # [D, H*E]
    _Tensor("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
    _Tensor("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/w_gate", 1),  # [F, D]
    _Tensor("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/w_up", 1),      # [F, D]
    _Tensor("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/w_down", 1),  # [D, F]
    _Tensor("model.norm.weight", "final_norm/scale"),
    _Tensor("lm_head.weight", _LM_HEAD, 1, "untied"),                     # [V, D]
)
_HEAD = "lm_head.weight"


def _tensors(cfg: ModelConfig) -> tuple[_Tensor, ...]:
    """The entries that exist for `cfg` (no `lm_head` when tied, biases and q/k norms only
    when the config has them)."""
    flags = {"untied": not cfg.tie_embeddings, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm}
    return tuple(t for t in _TENSORS if t.needs is None or flags[t.needs])


def _leaf_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Our param shapes by path, checked to be exactly what the table maps."""
    shapes = paths.flatten(model.param_shapes(cfg))
    mapped = {t.path for t in _tensors(cfg)}
    if set(shapes) != mapped:  # the model grew or lost a param: this table must follow
        raise AssertionError(f"cascade_jax.hf's table is out of date with model.py: params "
                             f"{sorted(set(shapes) ^ mapped)} are mapped on one side only")
    return shapes


def _per_layer(t: _Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[1:]) if t.stacked else tuple(shape)


# ----------------------------------------------------------------------------- config


def _architecture(hf: Mapping[str, Any], source: str) -> str:
    """The one architecture a config.json names (or its model_type implies), if we read it."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[hf["model_type"]]]
    if len(archs) != 1 or archs[0] not in (*ARCHITECTURES, WRAPPER):
        hint = (" It wraps a text model (`text_config`): save that text model as one of those "
                "first." if "text_config" in hf else "")
        raise ValueError(
            f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"cascade_jax.hf reads {[*ARCHITECTURES, WRAPPER]} and writes "
            f"{list(ARCHITECTURES)} (RMSNorm, RoPE, GQA, SwiGLU decoders). Convert the "
            f"checkpoint to one of those, or add its tensor names to cascade_jax/hf.py.{hint}")
    return archs[0]


def _text_config(hf: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], _Family]:
    """The text model's config and family: `hf` itself, or a Mistral 3 wrapper's text_config."""
    architecture = _architecture(hf, source)
    if architecture != WRAPPER:
        return hf, _FAMILIES[architecture]
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError(f"{source}: {WRAPPER} needs a `text_config` object (the language "
                         f"model's config), found {text!r}; re-download config.json")
    text_type = text.get("model_type", "mistral")  # transformers' default text model
    if text_type not in _WRAPPER_TEXT_TYPES:
        raise ValueError(f"{source}: text_config.model_type={text_type!r} is not supported; a "
                         f"{WRAPPER} is read when its text model is one of "
                         f"{list(_WRAPPER_TEXT_TYPES)}. Save the text model alone as one of "
                         f"{list(ARCHITECTURES)} and load that")
    return text, _FAMILIES[_BY_MODEL_TYPE[text_type]]


def text_architecture(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> str:
    """The `*ForCausalLM` a config.json's text model is (a Mistral 3 wrapper's: its
    text_config's): what a pruned child of it is saved as."""
    return _text_config(hf, source)[1].architecture


def is_wrapper(hf: Mapping[str, Any]) -> bool:
    """Whether a config.json dict is a Mistral 3 wrapper (what `save(vision_from=...)` needs)."""
    return (hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type"))]) == [WRAPPER]


def _rope_dict(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """transformers 5 keeps RoPE under `rope_parameters`; 4.x used `rope_theta` + `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"{source}: rope_parameters {rope!r} is not one plain RoPE setting "
                         "(per-layer-type RoPE is not supported)")
    rope = dict(rope)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: rope_parameters.partial_rotary_factor="
                         f"{rope['partial_rotary_factor']} is not supported (RoPE rotates "
                         "every channel of a head here); use a checkpoint without it")
    return rope


def _original_length(hf: Mapping[str, Any], rope: Mapping[str, Any]) -> int | None:
    """transformers' precedence: a top-level `original_max_position_embeddings` (Phi-3 style),
    else rope_parameters', else max_position_embeddings."""
    value = hf.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    value = value if value is not None else hf.get("max_position_embeddings")
    return None if value is None else int(value)


def _yarn(hf: Mapping[str, Any], rope: Mapping[str, Any], source: str) -> YarnRopeScaling:
    """YaRN with transformers' defaults filled in: factor from the two lengths if unset,
    beta_fast / beta_slow 32 / 1 when unset or zero, truncate True."""
    original = _original_length(hf, rope)
    if original is None:
        raise ValueError(f"{source}: RoPE scaling 'yarn' needs "
                         "rope_parameters.original_max_position_embeddings (or "
                         "max_position_embeddings); add the length the model was pretrained "
                         "at (Ministral 3: 16384)")
    factor = rope.get("factor")
    if factor is None:
        factor = _require(hf, "max_position_embeddings", source) / original
    optional = {key: float(rope[key]) for key in ("mscale", "mscale_all_dim", "attention_factor")
                if rope.get(key) is not None}
    return YarnRopeScaling(
        factor=float(factor), original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        truncate=bool(rope.get("truncate", True)), **optional)


def _llama3(hf: Mapping[str, Any], rope: Mapping[str, Any], source: str) -> Llama3RopeScaling:
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    original = _original_length(hf, rope)
    missing = [key for key in keys if rope.get(key) is None]
    if missing or original is None:
        raise ValueError(f"{source}: RoPE scaling 'llama3' needs rope_parameters."
                         f"{missing or ['original_max_position_embeddings']}; add them to "
                         "config.json (Llama 3.1 uses factor 8, low_freq_factor 1, "
                         "high_freq_factor 4, original_max_position_embeddings 8192)")
    return Llama3RopeScaling(*(float(rope[key]) for key in keys), original)


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling): plain RoPE, Llama 3.1's 'llama3' and YaRN are modelled."""
    rope = _rope_dict(hf, source)
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    readers = {"llama3": _llama3, "yarn": _yarn}
    if rope_type == "default":
        return theta, None
    if rope_type not in readers:
        raise ValueError(
            f"{source}: RoPE scaling {rope_type!r} ({rope}) is not supported yet; plain RoPE "
            f"('default') and {sorted(ROPE_SCALINGS)} are modelled. Remove the scaling from "
            f"config.json only if you accept different outputs at long context, or add "
            f"{rope_type!r} to cascade_jax.model.rope_frequencies.")
    return theta, readers[rope_type](hf, rope, source)


def _query_scale_beta(text: Mapping[str, Any], family: _Family, scaling: RopeScaling | None,
                      source: str) -> float | None:
    """Ministral 3's β (`rope_parameters.llama_4_scaling_beta`); None when the family ignores
    it or β = 0 (a scale of exactly 1)."""
    if not family.query_scale:
        return None
    beta = _rope_dict(text, source).get("llama_4_scaling_beta")
    if beta is None:
        raise ValueError(f"{source}: {family.architecture} needs "
                         "rope_parameters.llama_4_scaling_beta (Ministral 3 uses 0.1; 0 turns "
                         "the query scale off); add it to config.json")
    if float(beta) == 0.0:
        return None
    if scaling is None:
        raise ValueError(f"{source}: rope_parameters.llama_4_scaling_beta={beta} with plain "
                         "RoPE is not supported: the query scale's length is the RoPE "
                         "scaling's original_max_position_embeddings. Use a 'yarn' "
                         "rope_parameters (as Ministral 3 releases do)")
    return float(beta)


def _sliding_window(text: Mapping[str, Any], family: _Family, n_layers: int, source: str
                    ) -> int | None:
    """The window every layer uses, or None; a window on only some layers is refused."""
    if family.window == "ignored":  # transformers' Llama never applies one
        return None
    window = text.get("sliding_window")
    if family.window == "key" or window is None:
        return window
    if not text.get("use_sliding_window", False):  # Qwen's key is inert without this flag
        return None
    first_windowed = int(text.get("max_window_layers", 0))
    layer_types = text.get("layer_types") or [
        "sliding_attention" if i >= first_windowed else "full_attention"
        for i in range(n_layers)]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return window
    raise ValueError(
        f"{source}: use_sliding_window=true with max_window_layers={first_windowed} < "
        f"num_hidden_layers={n_layers} gives a sliding window on some layers only "
        f"(layer_types {layer_types}); one window for every layer is modelled. Set "
        "use_sliding_window=false (full attention, what Qwen2.5 releases use) if you accept "
        "different outputs beyond the window")


@dataclasses.dataclass(frozen=True)
class _Fp8:
    """An FP8 checkpoint's scheme (transformers' finegrained FP8): float8_e4m3fn weights, each
    with a float `<name>_scale_inv` (`X.weight` → `X.weight_scale_inv`), one per `block`
    [rows, cols] tile (ceil-divided grid), or a single one per tensor when `block` is None.
    Dequantized: w = fp8 · scale_inv. `activation_scale`s only matter to FP8 matmuls: unread."""

    block: tuple[int, int] | None


_FP8_DTYPE = "F8_E4M3"
_SCALE_SUFFIX = "_scale_inv"
_UNREAD_QUANT_SUFFIXES = (".activation_scale",)


def _fp8_scheme(hf: Mapping[str, Any], source: str) -> _Fp8 | None:
    """The `_Fp8` of `quantization_config` (None: not quantized); other methods are refused."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, Mapping) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        raise ValueError(f"{source}: quantization_config.quant_method={method!r} is not "
                         "supported; FP8 ('fp8', float8_e4m3fn weights with weight_scale_inv) "
                         "is read and dequantized. Dequantize the checkpoint first (e.g. "
                         "transformers from_pretrained + save_pretrained in bfloat16)")
    block = quant.get("weight_block_size")
    if block is None:
        return _Fp8(None)
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{source}: quantization_config.weight_block_size={block!r} must be "
                         "[rows, cols] (e.g. [128, 128]) or null (per-tensor scales)")
    return _Fp8((int(block[0]), int(block[1])))


def _dtype_name(value: Any, source: str) -> str | None:
    """'bfloat16' from 'bfloat16', 'torch.bfloat16', jnp.bfloat16 or np.float32; None if unset."""
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, str) else np.dtype(value).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{source}: dtype {value!r} is not supported; use float32, bfloat16 or "
                         "float16 (FP8 weights are read through quantization_config, other "
                         "quantized checkpoints must be dequantized first)")
    return name


def _configured_dtype(hf: Mapping[str, Any], source: str) -> str | None:
    """The dtype config.json names (a wrapper's text_config first), or None."""
    text = hf.get("text_config") if isinstance(hf.get("text_config"), Mapping) else {}
    for config in (text, hf):
        for key in ("dtype", "torch_dtype"):
            if config.get(key) is not None:
                return _dtype_name(config[key], source)
    return None


def _require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source}: required key {key!r} is missing; a Llama/Mistral/Qwen "
                         f"config.json has it (see transformers' LlamaConfig)")
    return hf[key]


def _refuse_unmodelled(text: Mapping[str, Any], family: _Family, source: str) -> None:
    unsupported = {
        "attention_bias": text.get("attention_bias", False),  # also an o_proj bias
        "mlp_bias": text.get("mlp_bias", False),
    }
    for key, value in unsupported.items():
        if value:
            raise ValueError(f"{source}: {key}={value!r} is not supported ({family.architecture}"
                             " then has output-projection / MLP biases, which the decoder does "
                             "not model); use a checkpoint without it")
    if text.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act={text['hidden_act']!r} is not supported; the "
                         "MLP is SwiGLU (hidden_act 'silu')")


# The JSON type of every config.json value read (top level or text_config; rope_parameters).
_CONFIG_TYPES: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(("hidden_size", "num_attention_heads", "num_hidden_layers", "head_dim",
                     "num_key_value_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "original_max_position_embeddings"),
                    validate.positive_int),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias",
                     "use_sliding_window"), validate.boolean),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), validate.positive_number)}
_ROPE_TYPES: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                     "mscale", "mscale_all_dim", "attention_factor"), validate.number),
    "rope_theta": validate.positive_number, "truncate": validate.boolean,
    "original_max_position_embeddings": validate.positive_int}


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE,
                   tie_embeddings: bool | None = None) -> ModelConfig:
    """A `ModelConfig` from a `config.json` dict (a `*ForCausalLM` we read, or a Mistral 3
    wrapper: its `text_config`); refuses what we don't model.

    `source` (usually the file's path) is named in every error. `tie_embeddings` overrides
    the config's (`load` decides a wrapper's tying from whether `lm_head.weight` is stored).
    A missing or "auto" dtype reads as float32 (`load` uses the tensors' own dtype instead).
    """
    text, family = _text_config(hf, source)
    _fp8_scheme(hf, source)
    if text is not hf:  # errors about the text model's keys say where they live
        source = f"{source} (text_config)"
    validate.fields(source, text, _CONFIG_TYPES)
    validate.fields(f"{source} rope_parameters", _rope_dict(text, source), _ROPE_TYPES)
    _refuse_unmodelled(text, family, source)
    rope_theta, rope_scaling = _rope(text, source)
    d_model = int(_require(text, "hidden_size", source))
    n_heads = int(_require(text, "num_attention_heads", source))
    n_layers = int(_require(text, "num_hidden_layers", source))
    head_dim = text.get("head_dim")
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"{source}: head_dim is unset and hidden_size={d_model} is not a "
                             f"multiple of num_attention_heads={n_heads}; set head_dim")
        head_dim = d_model // n_heads
    optional: dict[str, Any] = {}
    if text.get("max_position_embeddings") is not None:
        optional["max_seq_len"] = int(text["max_position_embeddings"])
    if tie_embeddings is None:
        tie_embeddings = bool(text.get("tie_word_embeddings", False))
    return ModelConfig(
        vocab_size=int(_require(text, "vocab_size", source)),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(text.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        d_ff=int(_require(text, "intermediate_size", source)),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        query_scale_beta=_query_scale_beta(text, family, rope_scaling, source),
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tie_embeddings,
        sliding_window=_sliding_window(text, family, n_layers, source),
        param_dtype=_configured_dtype(hf, source) or "float32",
        **optional,
    )


def default_architecture(cfg: ModelConfig) -> str:
    """The text family that expresses `cfg`: Qwen3 for q/k norms, Qwen2 for q/k/v biases,
    Ministral 3 for YaRN or the query scale, else Mistral."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    if cfg.query_scale_beta is not None or isinstance(cfg.rope_scaling, YarnRopeScaling):
        return "Ministral3ForCausalLM"
    return "MistralForCausalLM"


def _check_expressible(cfg: ModelConfig, family: _Family) -> None:
    """Refuse to write `cfg` as a family whose transformers model would compute otherwise."""
    problems = []
    if cfg.sliding_window is not None and family.window == "ignored":
        problems.append(f"sliding_window={cfg.sliding_window} (Llama has none)")
    for flag in ("qkv_bias", "qk_norm"):
        if getattr(cfg, flag) != getattr(family, flag):
            problems.append(f"{flag}={getattr(cfg, flag)} ({family.architecture} "
                            f"{'always has' if getattr(family, flag) else 'has no'} {flag})")
    if cfg.query_scale_beta is not None and not family.query_scale:
        problems.append(f"query_scale_beta={cfg.query_scale_beta} (only Ministral3ForCausalLM "
                        "applies it)")
    if family.query_scale and cfg.rope_scaling is None:
        problems.append("rope_scaling=None (Ministral3ForCausalLM reads the query scale's "
                        "original_max_position_embeddings from a RoPE scaling)")
    if problems:
        raise ValueError(f"cannot write this config as {family.architecture}: "
                         + "; ".join(problems) + f". Use architecture="
                         f"{default_architecture(cfg)!r} (or None: chosen from the config)")


def _rope_parameters(cfg: ModelConfig, family: _Family) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling is not None:
        scaling = {k: v for k, v in cfg.rope_scaling.to_dict().items() if v is not None}
        params.update(scaling, rope_theta=float(cfg.rope_theta))
    if family.query_scale:
        params["llama_4_scaling_beta"] = float(cfg.query_scale_beta or 0.0)
    return params


def _window_keys(cfg: ModelConfig, family: _Family) -> dict[str, Any]:
    if family.window == "key":
        return {"sliding_window": cfg.sliding_window}
    if family.window == "ignored":
        return {}
    windowed = cfg.sliding_window is not None
    return {"use_sliding_window": windowed, "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if windowed else cfg.n_layers,
            "layer_types": [("sliding" if windowed else "full") + "_attention"] * cfg.n_layers}


def config_to_hf(cfg: ModelConfig, architecture: str | None = None) -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild `cfg` (readable by 4.x and 5.x for
    Llama/Mistral/Qwen2; Ministral 3 and Qwen3 need a transformers that has them).
    `architecture` None: `default_architecture(cfg)`."""
    architecture = architecture or default_architecture(cfg)
    if architecture not in _FAMILIES:
        raise ValueError(f"architecture={architecture!r} cannot be written; choose one of "
                         f"{list(ARCHITECTURES)} (a {WRAPPER} child is saved as its text "
                         "family, or as the wrapper with save(vision_from=...))")
    family = _FAMILIES[architecture]
    _check_expressible(cfg, family)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": _rope_parameters(cfg, family),
        "attention_dropout": 0.0,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
        **_window_keys(cfg, family),
    }
    if cfg.rope_scaling is not None:  # what transformers 4.x reads
        hf["rope_scaling"] = hf["rope_parameters"]
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        hf["attention_bias"] = False
    if architecture == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    return hf


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of an HF directory (or a GGUF file), without reading its weights (a
    Mistral 3 wrapper's tensor names are listed, for its tying)."""
    path = Path(path)
    hf, source = _read_config(path)
    if _architecture(hf, source) != WRAPPER:
        return config_from_hf(hf, source=source)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack, wrapper=True, fp8=_fp8_scheme(hf, source))
        return config_from_hf(hf, source=source, tie_embeddings=_HEAD not in ckpt.where)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    """(config.json dict, its source name): a directory's file, or what a GGUF file's
    metadata says (`gguf.hf_config`)."""
    if gguf.is_gguf(path):
        return gguf.hf_config(path), str(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; an HF model directory needs "
                                f"{CONFIG_FILE} (written by save_pretrained or hf.save)")
    return files.read_json(str(file), _WRITER), str(file)


# ----------------------------------------------------------------------------- reading


# Where a Mistral 3 wrapper keeps its text model, (decoder prefix, LM head name): as
# transformers >= 5 writes it, and as older writers did (Mistral Small 3.1's release).
_WRAPPER_LAYOUTS = (("model.language_model.", "lm_head.weight"),
                    ("language_model.model.", "language_model.lm_head.weight"))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def _canonical_names(stored: list[str], wrapper: bool, source: Path) -> dict[str, str]:
    """Plain `*ForCausalLM` name → stored name. A wrapper's text tensors are renamed from
    whichever layout it uses; its vision tensors are left out (never read)."""
    if not wrapper:
        return {name: name for name in stored}
    layouts = [(prefix, head) for prefix, head in _WRAPPER_LAYOUTS
               if any(name.startswith(prefix) for name in stored)]
    if len(layouts) != 1:
        raise ValueError(f"{source}: a {WRAPPER} stores its text model under exactly one of "
                         f"{[prefix for prefix, _ in _WRAPPER_LAYOUTS]}; found "
                         f"{[prefix for prefix, _ in layouts] or 'neither'}. Re-download or "
                         "re-save the checkpoint with transformers")
    prefix, head = layouts[0]
    names = {}
    for name in stored:
        if name.startswith(_VISION_PREFIXES):
            continue
        canonical = _HEAD if name == head else name
        if name.startswith(prefix):
            canonical = "model." + name.removeprefix(prefix)
        names[canonical] = name
    return names


def _safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, header) of a safetensors file: an 8-byte little-endian
    header length, then the JSON header."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def _map_fp8(file: Path, header: tuple[int, dict[str, Any]], stored: str) -> np.ndarray:
    """A float8_e4m3fn tensor memory-mapped, not read: safetensors' numpy reader has no float8
    dtype, and indexing the map reads only the rows a block needs. `header`: the file's
    `_safetensors_header`."""
    start, entries = header
    info = entries[stored]
    begin, end = info["data_offsets"]
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return raw.view(ml_dtypes.float8_e4m3fn).reshape(info["shape"])


def _scale_grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of an FP8 weight's scale_inv: one per block (ceil-divided), or one value."""
    if block is None:
        return ()
    return tuple(-(-n // b) for n, b in zip(shape, block, strict=True))


@dataclasses.dataclass(frozen=True)
class _Fp8Slice:
    """A safetensors slice look-alike over an FP8 weight [rows, cols]: indexing returns the
    float32 `fp8 · scale_inv` of just that block (transformers' dequantization)."""

    raw: np.ndarray     # [rows, cols] float8_e4m3fn, memory-mapped
    scale: np.ndarray   # `_scale_grid` of the weight, float32
    block: tuple[int, int] | None

    def get_shape(self) -> list[int]:
        return list(self.raw.shape)

    def get_dtype(self) -> str:
        return _FP8_DTYPE

    def __getitem__(self, index: Any) -> np.ndarray:
        (r0, r1), (c0, c1) = _ranges(index if isinstance(index, tuple) else (index,),
                                     self.raw.shape)
        values = self.raw[r0:r1, c0:c1].astype(np.float32)
        if self.block is None:
            return values * self.scale.reshape(())
        bm, bn = self.block
        tiles = self.scale[r0 // bm:-(-r1 // bm), c0 // bn:-(-c1 // bn)]
        per_value = np.repeat(np.repeat(tiles, bm, axis=0), bn, axis=1)
        return values * per_value[r0 % bm:r0 % bm + r1 - r0, c0 % bn:c0 % bn + c1 - c0]


class _Checkpoint:
    """The safetensors file(s) of one directory, open for slice reads. Tensors are known by
    their plain `*ForCausalLM` names (`_canonical_names`); `where`: name → file. With `fp8`,
    each float8 weight's scale_inv is found by name (`scales`) and applied as it is read."""

    def __init__(self, path: Path, stack: contextlib.ExitStack, *, wrapper: bool = False,
                 fp8: _Fp8 | None = None, check_finite: bool = True):
        self.path, self.fp8, self.check_finite = path, fp8, check_finite
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = files.read_json(str(index), _WRITER)
            if not isinstance(weight_map, dict) or "weight_map" not in weight_map:
                raise ValueError(f"{index} has no 'weight_map'; it is damaged: download or "
                                 "export the model again")
            where = {name: path / file for name, file in weight_map["weight_map"].items()}
        elif (path / SINGLE_FILE).is_file():
            where = {}
        else:
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(
                f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found}); convert "
                f"*.bin/*.pth weights with transformers: from_pretrained(dir)."
                f"save_pretrained(dir, safe_serialization=True)")
        shards = sorted(set(where.values())) or [path / SINGLE_FILE]
        self.handles = {}
        for file in shards:
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {index} but does not exist; the "
                                        "sharded checkpoint is incomplete, download it again")
            self.handles[file] = stack.enter_context(_safe_open(file))
        keys = {file: set(handle.keys()) for file, handle in self.handles.items()}
        if not where:
            (file, names), = keys.items()
            where = dict.fromkeys(sorted(names), file)
        missing_in_file = [n for n, f in where.items() if n not in keys[f]]
        if missing_in_file:
            raise ValueError(f"{index} maps tensors {missing_in_file[:5]} to files that lack "
                             "them; the index and the shards disagree, download them again")
        self.stored = _canonical_names(sorted(where), wrapper, path)
        self.files = {name: where[stored] for name, stored in self.stored.items()}
        self.where = dict(self.files)  # the tensors to read (FP8 scales apart)
        self.scales: dict[str, str] = {}  # FP8 weight → its scale_inv
        self.headers: dict[Path, tuple[int, dict[str, Any]]] = {}  # FP8 files' headers
        if fp8 is not None:
            for name in self.files:
                if name.endswith(_SCALE_SUFFIX):
                    self.scales[name.removesuffix(_SCALE_SUFFIX)] = name
                if name.endswith((_SCALE_SUFFIX, *_UNREAD_QUANT_SUFFIXES)):
                    del self.where[name]

    def meta(self, name: str) -> Any:
        """The stored tensor's slice, for its shape and dtype (float8 cannot be read here)."""
        return self.handles[self.files[name]].get_slice(self.stored[name])

    def slice(self, name: str) -> Any:
        """Index it to read a block: float tensors as stored, FP8 ones dequantized."""
        found = self.meta(name)
        if found.get_dtype() != _FP8_DTYPE:
            return found
        scale = np.asarray(self.meta(self.scales[name])[...], np.float32)
        if self.check_finite:
            _check_finite(scale != 0, scale, f"{self.files[name]}: {self.scales[name]}",
                          "NaN, infinite or 0 scales (a 0 would zero its weights)")
        file = self.files[name]
        if file not in self.headers:  # parsed once per file, not once per layer and shard
            self.headers[file] = _safetensors_header(file)
        raw = _map_fp8(file, self.headers[file], self.stored[name])
        return _Fp8Slice(raw, scale, self.fp8.block)

    def tensor(self, name: str, fp8_dtype: Any) -> np.ndarray:
        """A whole tensor as stored; an FP8 one dequantized and cast to `fp8_dtype`."""
        found = self.meta(name)
        if found.get_dtype() != _FP8_DTYPE:
            return self.handles[self.files[name]].get_tensor(self.stored[name])
        problems = self._fp8_problems(name, tuple(found.get_shape()))
        if problems:
            raise ValueError(f"{self.path}: " + "; ".join(problems))
        return self.slice(name)[:, :].astype(fp8_dtype)

    def validate(self, cfg: ModelConfig, shapes: Mapping[tuple[str, ...], Any]) -> None:
        validate_tensors(self, cfg, shapes)

    def _fp8_problems(self, name: str, shape: tuple[int, ...]) -> list[str]:
        """Why an FP8 weight cannot be dequantized, if it cannot (its scale, its shape)."""
        if self.fp8 is None:
            return [f"{name} is float8 but {CONFIG_FILE} has no quantization_config with "
                    "quant_method 'fp8'; re-download config.json"]
        if len(shape) != 2:
            return [f"{name} is float8 with shape {shape}; only 2-D (Linear) weights are "
                    "dequantized"]
        scale = self.scales.get(name)
        if scale is None:
            return [f"{name} is float8 but {name + _SCALE_SUFFIX} is missing; the download is "
                    "incomplete"]
        grid = _scale_grid(shape, self.fp8.block)
        found = tuple(self.meta(scale).get_shape())
        if math.prod(found) != math.prod(grid) or (grid and found != grid):
            return [f"{scale} has shape {found}, but weight_block_size="
                    f"{list(self.fp8.block) if self.fp8.block else None} implies {grid} for "
                    f"{name} {shape}; fix quantization_config.weight_block_size"]
        return []

    def dtype(self, name: str) -> str:
        """The param dtype a tensor implies (float64 and others read as float32)."""
        found = _FILE_DTYPES.get(self.meta(name).get_dtype(), "float32")
        return found if found != "float64" else "float32"


def validate_tensors(ckpt: Any, cfg: ModelConfig, shapes: Mapping[tuple[str, ...], Any]
                     ) -> None:
    """All missing, unexpected, mis-shaped or non-float tensors of a checkpoint (`_Checkpoint`
    or `gguf.Tensors`: `where`, `meta`, `path`), in one error."""
    expected = {}
    for t in _tensors(cfg):
        for name in t.names(cfg):
            expected[name] = t.hf_shape(_per_layer(t, shapes[t.path].shape))
    problems = []
    missing = [n for n in expected if n not in ckpt.where]
    if missing:
        problems.append(f"missing tensors {_few(missing)} (looked in "
                        f"{sorted({f.name for f in ckpt.handles})}; the download or export "
                        "is incomplete, or config.json describes a different model)")
    ignorable = {_HEAD} if cfg.tie_embeddings else set()
    unexpected = [n for n in ckpt.where if n not in expected and n not in ignorable
                  and not n.endswith(_IGNORABLE_SUFFIXES)]
    if unexpected:
        hint = (f"FP8 scales, but {CONFIG_FILE} has no quantization_config 'fp8'"
                if any(n.endswith(_SCALE_SUFFIX) for n in unexpected)
                else f"biases or layers beyond num_hidden_layers={cfg.n_layers}?")
        problems.append(f"unexpected tensors {_few(unexpected)} ({hint})")
    for name, shape in expected.items():
        if name not in ckpt.where:
            continue
        found = ckpt.meta(name)
        if tuple(found.get_shape()) != shape:
            problems.append(f"{name} in {ckpt.where[name].name} has shape "
                            f"{tuple(found.get_shape())}, config.json implies {shape} "
                            "(config.json and the weights disagree)")
        elif found.get_dtype() == _FP8_DTYPE:
            problems += ckpt._fp8_problems(name, shape)
        elif found.get_dtype() not in _FILE_DTYPES:
            problems.append(f"{name} has dtype {found.get_dtype()}; only float and FP8 "
                            "(float8_e4m3fn) weights are read: dequantize the checkpoint "
                            "first")
    if problems:
        raise ValueError(f"{ckpt.path} does not match its {CONFIG_FILE}: "
                         + "; ".join(problems) + ". Fix config.json, or re-download / "
                         "re-export the model (hf.save writes both from one ModelConfig).")


def _safe_open(file: Path) -> Any:
    """`safe_open`, whose header errors ("HeaderTooLarge", "InvalidHeaderDeserialization")
    name no file."""
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError)
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: "
                         f"{e}): its header is damaged or the file was cut short; download "
                         "or export it again") from e


def _few(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _axis_block(ranges: list[tuple[int, int]], dims: tuple[int, ...]) -> tuple[slice, tuple]:
    """Axes flattened into one HF axis: the contiguous flat range covering the block, and the
    slices that cut the block out of that range once it is reshaped to `(a1, *dims[1:])`."""
    inner = math.prod(dims[1:])
    (start, stop), rest = ranges[0], ranges[1:]
    return slice(start * inner, stop * inner), tuple(slice(a, b) for a, b in rest)


def _check_finite(ok: np.ndarray, values: np.ndarray, what: str, bad: str) -> None:
    """Refuse `values` where `ok` (and finiteness) fails, naming `what` and the first bad
    index: a damaged weight must fail where it is read, not as a NaN loss later."""
    ok = ok & np.isfinite(values)
    if not ok.all():
        index = tuple(int(i) for i in np.unravel_index(int(np.argmin(ok)), ok.shape))
        raise ValueError(f"{what} holds {bad}: {values[index]} at index {index}; the file is "
                         "damaged: download or export it again (or load with "
                         "check_finite=False if you know why)")


def _read_block(sl: Any, t: _Tensor, shape: tuple[int, ...],
                ranges: list[tuple[int, int]]) -> np.ndarray:
    """Our per-layer block `ranges` (one (start, stop) per our axis) read from HF tensor `sl`,
    touching only the rows/columns that hold it."""
    if t.n_in is None:
        return sl[tuple(slice(a, b) for a, b in ranges)]
    if t.n_in == 0:  # a bias: every axis of ours flattened into the one HF axis
        flat, cut = _axis_block(ranges, shape)
        block = sl[flat].reshape(ranges[0][1] - ranges[0][0], *shape[1:])
        return block[(slice(None), *cut)]
    in_flat, in_cut = _axis_block(ranges[:t.n_in], shape[:t.n_in])
    out_flat, out_cut = _axis_block(ranges[t.n_in:], shape[t.n_in:])
    block_oi = sl[out_flat, in_flat]
    in_len = ranges[0][1] - ranges[0][0]
    out_len = ranges[t.n_in][1] - ranges[t.n_in][0]
    block = block_oi.T.reshape(in_len, *shape[1:t.n_in], out_len, *shape[t.n_in + 1:])
    return block[(slice(None), *in_cut, slice(None), *out_cut)]


def _read_leaf(ckpt: _Checkpoint, t: _Tensor, shape: tuple[int, ...], dtype: Any,
               ranges: list[tuple[int, int]]) -> np.ndarray:
    """Our leaf (or the block `ranges` of it) as one host buffer, filled layer by layer."""
    if not t.stacked:
        return _read_block(ckpt.slice(t.name()), t, shape, ranges).astype(dtype, copy=False)
    (first, last), rest = ranges[0], ranges[1:]
    out = np.empty([last - first] + [b - a for a, b in rest], dtype)
    for i in range(first, last):
        out[i - first] = _read_block(ckpt.slice(t.name(i)), t, shape[1:], rest)
    return out


def _ranges(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    out = []
    for s, dim in zip(index, shape, strict=True):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def _place(read: Callable[[list[tuple[int, int]]], np.ndarray], shape: tuple[int, ...],
           dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """One leaf onto its device(s): whole (no sharding) or shard by shard (each read once)."""
    if sharding is None:
        return jax.device_put(read(_ranges(None, shape)))
    cache: dict[tuple, np.ndarray] = {}  # replicas of one shard share a single read

    def callback(index: tuple[slice, ...] | None) -> np.ndarray:
        key = tuple(_ranges(index, shape))
        if key not in cache:
            cache[key] = read(list(key))
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback, dtype=dtype)


def _flat_shardings(shardings: Any, shapes: Mapping[str, Any]) -> dict[str, Any]:
    if shardings is None:
        return dict.fromkeys(shapes)
    by_path = paths.flatten(shardings)
    if set(by_path) != set(shapes):
        raise ValueError(f"shardings do not match the param tree: missing "
                         f"{sorted(set(shapes) - set(by_path))}, extra "
                         f"{sorted(set(by_path) - set(shapes))}; build them from "
                         "model.param_shapes(cfg) / param_logical_axes(cfg)")
    return by_path


def load(path: str | os.PathLike[str], *, dtype: DTypeLike | None = None,
         shardings: Any = None, check_finite: bool = True) -> tuple[ModelConfig, Params]:
    """Read an HF directory (`ARCHITECTURES`, or a Mistral 3 wrapper's text model), or a
    `.gguf` file of one of `gguf.ARCHITECTURES` (dequantized), into `(cfg, params)`, tensor
    by tensor.

    `dtype` casts the weights (and `cfg.param_dtype`), e.g. "float32" for parity checks; FP8
    weights are dequantized to it (default: the config's dtype). `shardings`: an optional
    pytree of `jax.sharding.Sharding` matching the param tree; each device then reads only its
    own slice. Without it: plain arrays on the default device. A wrapper is tied exactly when
    it stores no LM head; its vision tower and projector are not read. Every weight (and FP8
    scale) is checked finite as it is read (FP8 scales also non-zero) unless `check_finite`
    is False.
    """
    path = Path(path)
    hf_config, source = _read_config(path)
    wrapper = _architecture(hf_config, source) == WRAPPER
    with contextlib.ExitStack() as stack:
        ckpt = (gguf.Tensors(path, hf_config) if gguf.is_gguf(path) else
                _Checkpoint(path, stack, wrapper=wrapper, fp8=_fp8_scheme(hf_config, source),
                            check_finite=check_finite))
        cfg = config_from_hf(hf_config, source=source,
                             tie_embeddings=(_HEAD not in ckpt.where) if wrapper else None)
        if _configured_dtype(hf_config, source) is None and _TENSORS[0].name() in ckpt.where:
            cfg = cfg.replace(param_dtype=ckpt.dtype(_TENSORS[0].name()))
        if dtype is not None:
            cfg = cfg.replace(param_dtype=_dtype_name(dtype, "load(dtype=...)"))
        shapes = _leaf_shapes(cfg)
        ckpt.validate(cfg, shapes)
        placement = _flat_shardings(shardings, shapes)
        flat: dict[str, Any] = {}
        for t in _tensors(cfg):
            shape, leaf_dtype = tuple(shapes[t.path].shape), shapes[t.path].dtype

            def read(ranges, t=t, shape=shape, leaf_dtype=leaf_dtype):
                block = _read_leaf(ckpt, t, shape, leaf_dtype, ranges)
                if check_finite:
                    _check_finite(np.ones(block.shape, bool), block,
                                  f"{path}: {t.path} (block {ranges})", "a non-finite value")
                return block

            flat[t.path] = _place(read, shape, leaf_dtype, placement[t.path])
    return cfg, paths.unflatten(flat)


# ----------------------------------------------------------------------------- writing


def _check_params(cfg: ModelConfig, params: Params) -> None:
    shapes = _leaf_shapes(cfg)
    got = {p: tuple(np.shape(v)) for p, v in paths.flatten(params).items()}
    problems = [f"missing {p}" for p in shapes if p not in got]
    problems += [f"unexpected {p}" for p in got if p not in shapes]
    problems += [f"{p} has shape {got[p]}, cfg implies {tuple(s.shape)}"
                 for p, s in shapes.items() if p in got and got[p] != tuple(s.shape)]
    if problems:
        raise ValueError("params do not match cfg: " + "; ".join(problems[:8])
                         + ". Save the cfg that these params were made with.")


@dataclasses.dataclass(frozen=True)
class _Out:
    """One tensor to write: its stored name, its size (shards are planned before any tensor
    is made) and how to make it (so only one shard's tensors are ever in host memory)."""

    name: str
    nbytes: int
    make: Callable[[], np.ndarray]


def _text_outs(cfg: ModelConfig, params: Params,
               rename: Callable[[str], str] = lambda name: name) -> list[_Out]:
    """The text model's tensors in Hugging Face's own order: embedding, layer by layer, head."""
    shapes = _leaf_shapes(cfg)
    itemsize = np.dtype(cfg.weight_dtype).itemsize
    entries = _tensors(cfg)
    order = [(t, None) for t in entries if t.path == _EMBEDDING]
    for i in range(cfg.n_layers):
        order += [(t, i) for t in entries if t.stacked]
    order += [(t, None) for t in entries if not t.stacked and t.path != _EMBEDDING]
    return [_Out(rename(t.name(layer)),
                 math.prod(_per_layer(t, shapes[t.path].shape)) * itemsize,
                 functools.partial(_hf_tensor, params, t, layer, cfg.weight_dtype))
            for t, layer in order]


def _plan_shards(outs: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    """Consecutive tensors grouped into files of at most `max_shard_bytes` (a bigger tensor
    gets a file of its own), the way `save_pretrained` splits them."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if shards[-1] and size + out.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards


def _hf_tensor(params: Params, t: _Tensor, layer: int | None, dtype: Any) -> np.ndarray:
    """One HF tensor gathered to host (a single layer of a stacked leaf, not the whole leaf)."""
    leaf = paths.tree_get(params, t.path)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError(f"{t.path} spans several processes; hf.save gathers on one "
                         "host: gather params first (multihost_utils.process_allgather)")
    ours = leaf if layer is None else leaf[layer]
    return t.to_hf(np.asarray(jax.device_get(ours)).astype(dtype, copy=False))


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file; choose a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True "
                              "to replace it, or save to a new directory")


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temp dir onto `target`; a replaced old dir is removed only after."""
    _check_target(target, overwrite)
    old = None
    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old)


def _write(hf_config: Mapping[str, Any], outs: list[_Out], target: Path,
           max_shard_bytes: int, overwrite: bool) -> None:
    """config.json and the tensors (one file, or shards plus an index) into a temp dir next
    to `target`, then `_swap_in`: a crash never leaves a half-written model."""
    shards = _plan_shards(outs, max_shard_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            file = (SINGLE_FILE if len(shards) == 1
                    else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {out.name: out.make() for out in shard}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(a.nbytes for a in tensors.values())
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- wrapper export


# The layout `save(vision_from=...)` writes: the older one, which transformers 5.24's
# save_pretrained writes and its from_pretrained renames with no missing/unexpected keys.
_SAVED_TEXT_PREFIX, _SAVED_HEAD = _WRAPPER_LAYOUTS[1]
_PROJECTOR = "multi_modal_projector."
_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1}


def _wrapper_name(name: str) -> str:
    """A plain text tensor name, or a parent's vision tensor name (either layout), as the
    wrapper export stores it."""
    if name == _HEAD:
        return _SAVED_HEAD
    if name.startswith(_VISION_PREFIXES):
        return name.removeprefix("model.")
    return _SAVED_TEXT_PREFIX + name.removeprefix("model.")


def _wrapper_config(parent: Mapping[str, Any], cfg: ModelConfig, architecture: str | None,
                    source: str) -> dict[str, Any]:
    """The parent's wrapper config.json around the child's text config: vision_config, the
    image token, projector settings and the text model's unmodelled keys (token ids) kept;
    quantization dropped (the child is written unquantized); tying set at both levels, since
    transformers ties a wrapper by the top-level flag."""
    text, family = _text_config(parent, source)
    allowed = [_BY_MODEL_TYPE[t] for t in _WRAPPER_TEXT_TYPES]
    architecture = architecture or family.architecture
    if architecture not in allowed:
        raise ValueError(f"architecture={architecture!r} cannot be a {WRAPPER}'s text model; "
                         f"choose one of {allowed} (None: the parent's, {family.architecture})")
    child_text = {k: v for k, v in text.items() if k not in _MODELLED_KEYS}
    child_text.update(config_to_hf(cfg, architecture))
    del child_text["architectures"]
    top = {k: v for k, v in parent.items() if k != "quantization_config"}
    return {**top, "architectures": [WRAPPER], "text_config": child_text,
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype,
            "torch_dtype": cfg.param_dtype}


def _hidden_basis(hidden_map: Any, d_parent: int, d_child: int, parent: Path
                  ) -> np.ndarray | None:
    """`hidden_map` as float64 [d_parent, d_child], checked; None for an unchanged basis."""
    how = ("pass the map of the prune(s) that made this child: prune.prune(...).record."
           "hidden_map(), or prune.surgery.hidden_map(...) after the primitives, composed "
           "M1 @ M2 across stages")
    if hidden_map is None:
        if d_child != d_parent:
            raise ValueError(f"hidden_map is required: the child's d_model={d_child} differs "
                             f"from the hidden_size={d_parent} of vision_from={str(parent)!r}; "
                             + how)
        return None
    basis = np.asarray(hidden_map, np.float64)
    if basis.shape != (d_parent, d_child) or d_child > d_parent:
        raise ValueError(f"hidden_map has shape {basis.shape}, but it must be [hidden_size of "
                         f"vision_from={d_parent}, child d_model={d_child}] (parent residual "
                         f"@ hidden_map = the child's); {how}")
    if not np.isfinite(basis).all():
        raise ValueError(f"hidden_map contains NaN or inf; {how}")
    return basis


def _projector_units(units: Any, d_parent: int, d_child: int) -> np.ndarray:
    idx = np.asarray(units)
    if (idx.shape != (d_child,) or not np.issubdtype(idx.dtype, np.integer)
            or len(set(idx.tolist())) != d_child or idx.min() < 0 or idx.max() >= d_parent):
        raise ValueError(f"projector_units={_few(idx.ravel().tolist())} must be {d_child} "
                         f"distinct integers in [0, {d_parent}) (the projector's hidden units "
                         "to keep, one per child channel), or None to keep the largest by "
                         "weight norm")
    return idx


def _child_projector(ckpt: _Checkpoint, names: Mapping[str, str], basis: np.ndarray | None,
                     d_child: int, units: Any, dtype: str) -> dict[str, np.ndarray]:
    """The child's linear_1 / linear_2 (stored name → array); the rest of the projector (its
    norm and patch merger work in vision space) is copied.

    linear_2's output rows are mapped into the child's residual basis: W2' = Mᵀ W2, b2' = b2 M
    (exact for a rotation). transformers sizes the projector's hidden layer by the text
    hidden_size too, so a narrower child also keeps d_model of its GELU units (`units`,
    default the largest ‖W1[j]‖·‖W2'[:, j]‖, a weight-only guess: no image is seen here).
    """
    if "linear_1.weight" not in names or "linear_2.weight" not in names:
        raise ValueError(f"{ckpt.path}: the projector has no linear_1 / linear_2 weight (found "
                         f"{sorted(names)}); re-download the {WRAPPER} checkpoint")
    arrays = {key: ckpt.tensor(name, dtype) for key, name in names.items()
              if key.startswith(("linear_1.", "linear_2."))}
    w1, w2 = arrays["linear_1.weight"], arrays["linear_2.weight"]
    d_parent = w2.shape[0] if basis is None else basis.shape[0]
    if w2.shape != (d_parent, d_parent) or w1.shape[0] != d_parent:
        raise ValueError(f"{ckpt.path}: projector linear_1 {w1.shape} / linear_2 {w2.shape} do "
                         f"not match the text hidden_size {d_parent}; the checkpoint and its "
                         f"{CONFIG_FILE} disagree")
    m = np.eye(d_parent) if basis is None else basis
    new = {"linear_2.weight": m.T @ w2.astype(np.float64)}
    if "linear_2.bias" in arrays:
        new["linear_2.bias"] = arrays["linear_2.bias"].astype(np.float64) @ m
    if units is None and d_child < d_parent:
        score = np.linalg.norm(w1.astype(np.float64), axis=1) * np.linalg.norm(
            new["linear_2.weight"], axis=0)
        units = np.sort(np.argsort(-score, kind="stable")[:d_child])
    if units is not None:
        units = _projector_units(units, d_parent, d_child)
        new["linear_2.weight"] = new["linear_2.weight"][:, units]
        new["linear_1.weight"] = w1[units]
        if "linear_1.bias" in arrays:
            new["linear_1.bias"] = arrays["linear_1.bias"][units]
    return {names[key]: np.ascontiguousarray(value.astype(arrays[key].dtype))
            for key, value in new.items()}


def _vision_outs(cfg: ModelConfig, parent: Path, stack: contextlib.ExitStack,
                 architecture: str | None, hidden_map: Any, projector_units: Any
                 ) -> tuple[dict[str, Any], list[_Out]]:
    """(wrapper config.json, the parent's vision tensors) for `save(vision_from=parent)`;
    everything is checked here, before anything is written."""
    hf_parent, source = _read_config(parent)
    if not is_wrapper(hf_parent):
        named = hf_parent.get("architectures") or hf_parent.get("model_type")
        raise ValueError(f"vision_from={str(parent)!r} is {named!r}, not a {WRAPPER}: pass "
                         "the wrapper directory this text model was loaded from, or leave "
                         "vision_from=None to write the text model alone")
    text, _ = _text_config(hf_parent, source)
    d_parent = int(_require(text, "hidden_size", source))
    if int(_require(text, "vocab_size", source)) != cfg.vocab_size:
        raise ValueError(f"vision_from={str(parent)!r} has vocab_size={text['vocab_size']}, "
                         f"the child {cfg.vocab_size}: its image token and tokenizer would not "
                         "fit; pass the wrapper this child was pruned from")
    basis = _hidden_basis(hidden_map, d_parent, cfg.d_model, parent)
    hf_config = _wrapper_config(hf_parent, cfg, architecture, source)
    ckpt = _Checkpoint(parent, stack, fp8=_fp8_scheme(hf_parent, source))
    vision = [name for name in ckpt.where if name.startswith(_VISION_PREFIXES)]
    if not vision:
        raise ValueError(f"vision_from={str(parent)!r} stores no vision tensors "
                         f"({list(_VISION_PREFIXES)}); re-download the {WRAPPER} checkpoint")
    projector = {_wrapper_name(name).removeprefix(_PROJECTOR): name for name in vision
                 if _wrapper_name(name).startswith(_PROJECTOR)}
    changed = {}
    if basis is not None or projector_units is not None:
        changed = _child_projector(ckpt, projector, basis, cfg.d_model, projector_units,
                                   cfg.weight_dtype)
    outs = []
    for name in vision:
        if name in changed:
            outs.append(_Out(_wrapper_name(name), changed[name].nbytes,
                             lambda value=changed[name]: value))
            continue
        found = ckpt.meta(name)
        itemsize = (np.dtype(cfg.weight_dtype).itemsize if found.get_dtype() == _FP8_DTYPE
                    else _ITEMSIZES.get(found.get_dtype(), 4))
        outs.append(_Out(_wrapper_name(name), math.prod(found.get_shape()) * itemsize,
                         functools.partial(ckpt.tensor, name, cfg.weight_dtype)))
    return hf_config, outs


def save(cfg: ModelConfig, params: Params, path: str | os.PathLike[str], *,
         architecture: str | None = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
         extra_config: Mapping[str, Any] | None = None,
         vision_from: str | os.PathLike[str] | None = None,
         hidden_map: npt.ArrayLike | None = None,
         projector_units: npt.ArrayLike | None = None) -> Path:
    """Write `params` as an HF directory that `AutoModelForCausalLM.from_pretrained` reads,
    or, with `vision_from`, a `Mistral3ForConditionalGeneration` around them.

    `architecture`: one of `ARCHITECTURES` that can express `cfg`, or None for
    `default_architecture(cfg)` (a Mistral 3 wrapper's child is written as its text model).
    Weights are stored in `cfg.param_dtype`, never quantized (an FP8 root's child is written
    in its compute dtype, without quantization_config); one file, or
    `model-0000k-of-0000n.safetensors` plus an index above `max_shard_bytes`. Written into a
    temp dir next to `path` and renamed, so a crash never leaves a half-written model.
    `extra_config` adds config.json keys we don't model (e.g. the parent's `bos_token_id`);
    returns the directory.

    `vision_from`: the wrapper directory this child was pruned from (its root). The child is
    then written as that wrapper, so it keeps seeing images: the parent's config.json with
    the child's `text_config` (`architecture`: its text family, default the parent's), the
    vision tower and projector streamed from the parent's files tensor by tensor, except the
    projector's output layer, whose rows are mapped into the child's residual basis by
    `hidden_map` ([parent hidden_size, cfg.d_model], `PruneRecord.hidden_map()`; None when
    d_model and the basis are unchanged). A narrower child also narrows the projector's
    hidden layer: `projector_units` (kept indices), default by weight norm.
    """
    extra = dict(extra_config or {})
    clash = sorted(set(extra) & _MODELLED_KEYS)
    if clash:
        raise ValueError(f"extra_config may not set {clash}: they come from cfg (use "
                         "cfg.replace(...) instead)")
    if vision_from is None and (hidden_map is not None or projector_units is not None):
        raise ValueError("hidden_map and projector_units map the parent's vision projector: "
                         "they need vision_from=<the parent's Mistral3ForConditionalGeneration "
                         "directory>")
    _check_params(cfg, params)
    target = Path(path)
    _check_target(target, overwrite)
    with contextlib.ExitStack() as stack:
        if vision_from is None:
            hf_config, outs = config_to_hf(cfg, architecture), _text_outs(cfg, params)
        else:
            parent = Path(vision_from)
            if target.resolve() == parent.resolve():
                raise ValueError(f"path={str(target)!r} is vision_from itself: the parent "
                                 "would be replaced while it is read; save to a new directory")
            hf_config, vision = _vision_outs(cfg, parent, stack, architecture, hidden_map,
                                             projector_units)
            outs = vision + _text_outs(cfg, params, rename=_wrapper_name)
        _write({**hf_config, **extra}, outs, target, max_shard_bytes, overwrite)
    return target


# ------------------------------------------------------------- the files beside the weights

# Files a Hugging Face directory keeps its tokenizer (and generation defaults) in.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "tekken.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")
# What a Mistral 3 wrapper's image processor reads (copied beside a wrapper child).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")
# config.json keys we do not model but a child must keep to be used like its parent.
CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json dict of an HF directory, or the one a GGUF file's metadata implies."""
    return _read_config(Path(path))[0]


def is_saved_file(name: str) -> bool:
    """A file name `save` and `copy_tokenizer_files` write into a model directory."""
    return (name in (CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES, *PROCESSOR_FILES)
            or name.endswith(".safetensors"))


def carried_config(hf_in: str | os.PathLike[str]) -> dict[str, Any]:
    """The parent directory's (or GGUF file's) token ids a child's config.json must keep
    (`save`'s `extra_config`); a wrapper's are read from its `text_config`."""
    config = config_dict(hf_in)
    config = {**config, **(config.get("text_config") or {})}
    return {k: config[k] for k in CARRIED_CONFIG_KEYS if config.get(k) is not None}


def copy_tokenizer_files(hf_in: str | os.PathLike[str], tokenizer: str | None,
                         hf_out: str | os.PathLike[str], processor: bool = False) -> list[str]:
    """The parent's tokenizer files into the child (a GGUF parent's: tokenizer.json and
    tokenizer_config.json rebuilt from its metadata); `tokenizer`'s (a directory or a
    tokenizer.json) when the parent has no tokenizer.json; with `processor`, the parent's
    image processor files too. Returns the names copied."""
    parent = Path(hf_in)
    if gguf.is_gguf(parent) and not tokenizer:  # the tokenizer lives in its metadata
        return gguf.write_tokenizer_files(parent, hf_out)
    if (parent / "tokenizer.json").is_file() or not tokenizer:
        sources = {name: parent / name for name in TOKENIZER_FILES}
    elif Path(tokenizer).is_dir():
        sources = {name: Path(tokenizer) / name for name in TOKENIZER_FILES}
    else:
        sources = {"tokenizer.json": Path(tokenizer)}
    if processor:
        sources.update({name: parent / name for name in PROCESSOR_FILES})
    copied = [name for name, source in sources.items() if source.is_file()]
    for name in copied:
        shutil.copyfile(sources[name], Path(hf_out) / name)
    return copied
