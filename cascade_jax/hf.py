"""Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` directories ↔ `(ModelConfig, params)`.

Why this shape:
- One table (`_TENSORS`) names every HF tensor, its param path and its layout change; load, save
  and validation all derive from it, so the two directions cannot drift apart.
- HF stores a torch `Linear` as `[out, in]`; we store `[*in_axes, *out_axes]` with heads split
  out (`wq_DHE`, `wo_HED`). Converting is "transpose, then reshape" and back.
- Loading streams: each stacked `[N, ...]` leaf is filled layer by layer into one host buffer,
  or, given a target sharding, each device's shard is read straight from the file through
  `safe_open(...).get_slice`, so a 24B checkpoint never needs two full copies in host memory.
- Everything is checked before any weight is read: architecture and config fields we do not
  model, missing/unexpected tensors, shapes and dtypes, each reported by name with the way out.
- Saving is atomic (temp dir next to the target, then rename) and gathers one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file

from cascade_jax import files, model, paths
from cascade_jax.config import ModelConfig

Params = dict[str, Any]

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
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
    "attention_bias", "mlp_bias", "quantization_config",
})


# ----------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor (one per layer when `hf` contains `{i}`) ↔ one param leaf.

    `n_in`: HF holds a torch Linear `[out, in]`; our leaf is `[*in_axes, *out_axes]` with
    `n_in` input axes (wq_DHE: 1, wo_HED: 2). None: identical layout (norms, embedding).
    """

    hf: str
    path: str  # our param's path (`paths`)
    n_in: int | None = None

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
        return (math.prod(ours[self.n_in:]), math.prod(ours[:self.n_in]))

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return np.ascontiguousarray(ours)
        in_size = math.prod(ours.shape[:self.n_in])
        return np.ascontiguousarray(ours.reshape(in_size, -1).T)


_EMBEDDING, _LM_HEAD = "embed/embedding", "lm_head/kernel"
_TENSORS = (
    _Tensor("model.embed_tokens.weight", _EMBEDDING),                                # [V, D]
    _Tensor("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale"),
    _Tensor("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/wq", 1),        # [H*E, D]
    _Tensor("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/wk", 1),        # [K*E, D]
    _Tensor("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/wv", 1),        # [K*E, D]
    _Tensor("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/wo", 2),        # [D, H*E]
    _Tensor("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
    _Tensor("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/w_gate", 1),        # [F, D]
    _Tensor("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/w_up", 1),            # [F, D]
    _Tensor("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/w_down", 1),        # [D, F]
    _Tensor("model.norm.weight", "final_norm/scale"),
    _Tensor("lm_head.weight", _LM_HEAD, 1),                                          # [V, D]
)


def _tensors(cfg: ModelConfig) -> tuple[_Tensor, ...]:
    """The entries that exist for `cfg` (no `lm_head` when embeddings are tied)."""
    return tuple(t for t in _TENSORS if not (cfg.tie_embeddings and t.path == _LM_HEAD))


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
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf["model_type"]]]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        hint = (" It wraps a text model (`text_config`): save that text model as "
                "MistralForCausalLM/LlamaForCausalLM first." if "text_config" in hf else "")
        raise ValueError(
            f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"cascade_jax.hf reads and writes {list(ARCHITECTURES)} (RMSNorm, RoPE, GQA, "
            f"SwiGLU decoders). Convert the checkpoint to one of those, or add its tensor "
            f"names to cascade_jax/hf.py.{hint}")
    return archs[0]


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _rope(hf: Mapping[str, Any], source: str
          ) -> tuple[float, tuple[float, float, float, int] | None]:
    """(rope_theta, rope_scaling). transformers 5 keeps RoPE under `rope_parameters`; 4.x used
    `rope_theta` + `rope_scaling`. Plain RoPE and Llama 3.1's 'llama3' scaling are modelled."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"{source}: rope parameters {rope!r} are not one plain RoPE setting "
                         "(per-layer-type RoPE is not supported)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{source}: RoPE scaling {rope_type!r} ({dict(rope)}) is not supported yet; plain "
            f"RoPE ('default') and 'llama3' are modelled. Remove the scaling from config.json "
            f"only if you accept different outputs at long context, or add {rope_type!r} to "
            f"cascade_jax.model.rope_frequencies.")
    missing = [key for key in _LLAMA3_KEYS if rope.get(key) is None]
    if missing:
        raise ValueError(f"{source}: RoPE scaling 'llama3' needs {missing} (Llama 3.1 uses "
                         "factor 8, low_freq_factor 1, high_freq_factor 4, "
                         "original_max_position_embeddings 8192)")
    factor, low, high, original = (rope[key] for key in _LLAMA3_KEYS)
    return theta, (float(factor), float(low), float(high), int(original))


def _dtype_name(value: Any, source: str) -> str | None:
    """'bfloat16' from 'bfloat16', 'torch.bfloat16', jnp.bfloat16 or np.float32; None if unset."""
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, str) else np.dtype(value).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{source}: dtype {value!r} is not supported; use float32, bfloat16 or "
                         "float16 (quantized checkpoints must be dequantized first)")
    return name


def _require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source}: required key {key!r} is missing; a Llama/Mistral "
                         f"config.json has it (see transformers' LlamaConfig)")
    return hf[key]


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from a Llama/Mistral `config.json` dict; refuses what we don't model.

    `source` (usually the file's path) is named in every error. A missing or "auto" dtype
    reads as float32 (`load` uses the tensors' own dtype instead).
    """
    architecture = _architecture(hf, source)
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "quantization_config": hf.get("quantization_config"),
    }
    for key, value in unsupported.items():
        if value:
            raise ValueError(f"{source}: {key}={value!r} is not supported (the decoder has no "
                             "biases and stores plain float weights); use a checkpoint without it")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; the MLP "
                         "is SwiGLU (hidden_act 'silu')")
    rope_theta, rope_scaling = _rope(hf, source)
    d_model = int(_require(hf, "hidden_size", source))
    n_heads = int(_require(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"{source}: head_dim is unset and hidden_size={d_model} is not a "
                             f"multiple of num_attention_heads={n_heads}; set head_dim")
        head_dim = d_model // n_heads
    optional: dict[str, Any] = {}
    if hf.get("max_position_embeddings") is not None:
        optional["max_seq_len"] = int(hf["max_position_embeddings"])
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", source)),
        d_model=d_model,
        n_layers=int(_require(hf, "num_hidden_layers", source)),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        d_ff=int(_require(hf, "intermediate_size", source)),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # transformers' Llama ignores a `sliding_window` key; only Mistral applies it.
        sliding_window=(hf.get("sliding_window") if architecture == "MistralForCausalLM"
                        else None),
        param_dtype=_dtype_name(hf.get("dtype", hf.get("torch_dtype")), source) or "float32",
        **optional,
    )


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return {"rope_type": "llama3", "rope_theta": float(cfg.rope_theta),
            **dict(zip(_LLAMA3_KEYS, cfg.rope_scaling, strict=True))}


def config_to_hf(cfg: ModelConfig, architecture: str = "MistralForCausalLM") -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild `cfg` (readable by 4.x and 5.x)."""
    _architecture({"architectures": [architecture]}, "config_to_hf")
    if architecture == "LlamaForCausalLM" and cfg.sliding_window is not None:
        raise ValueError(f"sliding_window={cfg.sliding_window} cannot be expressed as "
                         "LlamaForCausalLM; save with architecture='MistralForCausalLM'")
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": {v: k for k, v in _MODEL_TYPES.items()}[architecture],
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
        "rope_parameters": _rope_parameters(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_scaling is not None:  # what transformers 4.x reads
        hf["rope_scaling"] = hf["rope_parameters"]
    if architecture == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    else:
        hf["sliding_window"] = cfg.sliding_window
    return hf


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of an HF directory, without touching its weights."""
    hf, source = _read_config(Path(path))
    return config_from_hf(hf, source=source)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; an HF model directory needs "
                                f"{CONFIG_FILE} (written by save_pretrained or hf.save)")
    return files.read_json(str(file), _WRITER), str(file)


# ----------------------------------------------------------------------------- reading


class _Checkpoint:
    """The safetensors file(s) of one directory, open for slice reads; tensor name → file."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = files.read_json(str(index), _WRITER)
            if not isinstance(weight_map, dict) or "weight_map" not in weight_map:
                raise ValueError(f"{index} has no 'weight_map'; it is damaged: download or "
                                 "export the model again")
            self.where = {name: path / file for name, file in weight_map["weight_map"].items()}
        elif (path / SINGLE_FILE).is_file():
            self.where = {}
        else:
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(
                f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found}); convert "
                f"*.bin/*.pth weights with transformers: from_pretrained(dir)."
                f"save_pretrained(dir, safe_serialization=True)")
        shards = sorted(set(self.where.values())) or [path / SINGLE_FILE]
        self.handles = {}
        for file in shards:
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {index} but does not exist; the "
                                        "sharded checkpoint is incomplete, download it again")
            self.handles[file] = stack.enter_context(_safe_open(file))
        keys = {file: set(handle.keys()) for file, handle in self.handles.items()}
        if not self.where:
            (file, names), = keys.items()
            self.where = dict.fromkeys(sorted(names), file)
        missing_in_file = [n for n, f in self.where.items() if n not in keys[f]]
        if missing_in_file:
            raise ValueError(f"{index} maps tensors {missing_in_file[:5]} to files that lack "
                             "them; the index and the shards disagree, download them again")

    def slice(self, name: str) -> Any:
        return self.handles[self.where[name]].get_slice(name)

    def validate(self, cfg: ModelConfig, shapes: Mapping[tuple[str, ...], Any]) -> None:
        """All missing, unexpected, mis-shaped or non-float tensors, in one error."""
        expected = {}
        for t in _tensors(cfg):
            for name in t.names(cfg):
                expected[name] = t.hf_shape(_per_layer(t, shapes[t.path].shape))
        problems = []
        missing = [n for n in expected if n not in self.where]
        if missing:
            problems.append(f"missing tensors {_few(missing)} (looked in "
                            f"{sorted({f.name for f in self.handles})}; the download or export "
                            "is incomplete, or config.json describes a different model)")
        ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
        unexpected = [n for n in self.where if n not in expected and n not in ignorable
                      and not n.endswith(_IGNORABLE_SUFFIXES)]
        if unexpected:
            problems.append(f"unexpected tensors {_few(unexpected)} (biases or layers beyond "
                            f"num_hidden_layers={cfg.n_layers}?)")
        for name, shape in expected.items():
            if name not in self.where:
                continue
            found = self.slice(name)
            if tuple(found.get_shape()) != shape:
                problems.append(f"{name} in {self.where[name].name} has shape "
                                f"{tuple(found.get_shape())}, config.json implies {shape} "
                                "(config.json and the weights disagree)")
            if found.get_dtype() not in _FILE_DTYPES:
                problems.append(f"{name} has dtype {found.get_dtype()}; only float weights "
                                "are read (dequantize the checkpoint first)")
        if problems:
            raise ValueError(f"{self.path} does not match its {CONFIG_FILE}: "
                             + "; ".join(problems) + ". Fix config.json, or re-download / "
                             "re-export the model (hf.save writes both from one ModelConfig).")

    def dtype(self, name: str) -> str:
        """The param dtype a tensor implies (float64 and others read as float32)."""
        found = _FILE_DTYPES.get(self.slice(name).get_dtype(), "float32")
        return found if found != "float64" else "float32"


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


def _read_block(sl: Any, t: _Tensor, shape: tuple[int, ...],
                ranges: list[tuple[int, int]]) -> np.ndarray:
    """Our per-layer block `ranges` (one (start, stop) per our axis) read from HF tensor `sl`,
    touching only the rows/columns that hold it."""
    if t.n_in is None:
        return sl[tuple(slice(a, b) for a, b in ranges)]
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
         shardings: Any = None) -> tuple[ModelConfig, Params]:
    """Read an HF Llama/Mistral directory into `(cfg, params)`, tensor by tensor.

    `dtype` casts the weights (and `cfg.param_dtype`), e.g. "float32" for parity checks.
    `shardings`: an optional pytree of `jax.sharding.Sharding` matching the param tree; each
    device then reads only its own slice. Without it: plain arrays on the default device.
    """
    path = Path(path)
    hf_config, source = _read_config(path)
    cfg = config_from_hf(hf_config, source=source)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack)
        configured = _dtype_name(hf_config.get("dtype", hf_config.get("torch_dtype")), source)
        if configured is None and _TENSORS[0].name() in ckpt.where:
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
                return _read_leaf(ckpt, t, shape, leaf_dtype, ranges)

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


def _hf_order(cfg: ModelConfig) -> Iterator[tuple[str, _Tensor, int | None]]:
    """(name, entry, layer) in Hugging Face's own order: embedding, layer by layer, head."""
    entries = _tensors(cfg)
    yield from ((t.name(), t, None) for t in entries if t.path == _EMBEDDING)
    for i in range(cfg.n_layers):
        yield from ((t.name(i), t, i) for t in entries if t.stacked)
    yield from ((t.name(), t, None) for t in entries
                if not t.stacked and t.path != _EMBEDDING)


def _plan_shards(cfg: ModelConfig, max_shard_bytes: int
                 ) -> list[list[tuple[str, _Tensor, int | None]]]:
    """Consecutive tensors grouped into files of at most `max_shard_bytes` (a bigger tensor
    gets a file of its own), the way `save_pretrained` splits them."""
    shapes = _leaf_shapes(cfg)
    itemsize = np.dtype(cfg.weight_dtype).itemsize
    shards: list[list[tuple[str, _Tensor, int | None]]] = [[]]
    size = 0
    for item in _hf_order(cfg):
        t = item[1]
        nbytes = math.prod(_per_layer(t, shapes[t.path].shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
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


def save(cfg: ModelConfig, params: Params, path: str | os.PathLike[str], *,
         architecture: str = "MistralForCausalLM",
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
         extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write `params` as an HF directory that `AutoModelForCausalLM.from_pretrained` reads.

    Weights are stored in `cfg.param_dtype`; one file, or `model-0000k-of-0000n.safetensors`
    plus an index above `max_shard_bytes`. Written into a temp dir next to `path` and renamed,
    so a crash never leaves a half-written model. `extra_config` adds config.json keys we don't
    model (e.g. the parent's `bos_token_id`); returns the directory.
    """
    extra = dict(extra_config or {})
    clash = sorted(set(extra) & _MODELLED_KEYS)
    if clash:
        raise ValueError(f"extra_config may not set {clash}: they come from cfg (use "
                         "cfg.replace(...) instead)")
    hf_config = {**config_to_hf(cfg, architecture), **extra}
    _check_params(cfg, params)
    shards = _plan_shards(cfg, max_shard_bytes)
    target = Path(path)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            file = (SINGLE_FILE if len(shards) == 1
                    else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {name: _hf_tensor(params, t, layer, cfg.weight_dtype)
                       for name, t, layer in shard}
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
    return target
