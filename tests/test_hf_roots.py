"""Real roots as released, against `transformers`: the Mistral 3 wrapper
(`Mistral3ForConditionalGeneration`, both tensor prefixes, tying from the tensors present,
vision tensors never read) and FP8 checkpoints (block-wise and per-tensor scales).

Two tiny wrappers are built once each: one like Ministral 3 (text model 'ministral3' with
YaRN and the query scale, tied, a short original length of 8 so both act within 12 tokens)
and one like Mistral Small 3.1 (text model 'mistral', untied). transformers 5.24's
save_pretrained writes the older prefix (`language_model.model.*`, `vision_tower.*`); the newer
one (`model.language_model.*`, `lm_head.weight`) is written here by renaming the tensors.
The parity metric is test_hf's: max |ours - theirs| / max |theirs| over float32 logits ≤ 1e-4.
"""

import copy
import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_reference import TOL, hf_logits, random_tokens, randomize, rel_err
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Ministral3Config,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
)

from cascade_jax import hf, model, prune
from cascade_jax.config import ModelConfig, YarnRopeScaling

_TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               head_dim=8, image_size=16, patch_size=4)
WRAPPERS = {
    "ministral3_tied": Ministral3Config(**_TEXT, max_position_embeddings=32,
                                        tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
        beta_fast=2.0, beta_slow=0.02, mscale=1.0, mscale_all_dim=0.5,
        llama_4_scaling_beta=0.4)),
    "mistral_small_untied": MistralConfig(**_TEXT, max_position_embeddings=64,
                                          tie_word_embeddings=False, rope_theta=1e9),
}
# The renaming from the tensor names transformers keeps in memory (the newer layout) to the
# older one it writes, as (prefix, replacement), first match wins.
_OLDER_LAYOUT = (("model.language_model.", "language_model.model."),
                 ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector."))
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_QUANTIZED = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.",
              ".self_attn.o_proj.", ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def _older_name(name: str) -> str:
    for prefix, replacement in _OLDER_LAYOUT:
        if name.startswith(prefix):
            return replacement + name.removeprefix(prefix)
    return name


def _is_vision(name: str) -> bool:
    return name.startswith(("model.vision_tower.", "model.multi_modal_projector."))


@pytest.fixture(scope="module", params=list(WRAPPERS))
def wrapper(request, tmp_path_factory):
    """(name, random-weight Mistral3ForConditionalGeneration, its save_pretrained dir)."""
    text = WRAPPERS[request.param]
    torch.manual_seed(0)
    config = Mistral3Config(text_config=text, vision_config=PixtralVisionConfig(**_VISION),
                            tie_word_embeddings=text.tie_word_embeddings,
                            attn_implementation="eager")
    hf_model = Mistral3ForConditionalGeneration(config).eval()
    randomize(hf_model, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    if not text.tie_word_embeddings:
        # Released configs may say "tied" at the top level (Mistral3Config's default) while an
        # LM head is stored: transformers then does not tie, and neither may we.
        config_json = json.loads((directory / hf.CONFIG_FILE).read_text())
        config_json["tie_word_embeddings"] = True
        (directory / hf.CONFIG_FILE).write_text(json.dumps(config_json))
    return request.param, hf_model, directory


def _write_wrapper(hf_model, source: Path, target: Path, older: bool,
                   tensors: dict[str, torch.Tensor] | None = None,
                   config_changes: dict | None = None) -> Path:
    """A wrapper directory holding `tensors` (default: the model's, the LM head only if
    untied), named in the older or newer layout, with `source`'s config.json (+ changes)."""
    if tensors is None:
        tensors = {k: v.detach().clone() for k, v in hf_model.state_dict().items()
                   if k != "lm_head.weight" or not hf_model.config.tie_word_embeddings}
    target.mkdir()
    save_file({(_older_name(k) if older else k): v.contiguous() for k, v in tensors.items()},
              str(target / hf.SINGLE_FILE), metadata={"format": "pt"})
    config_json = {**json.loads((source / hf.CONFIG_FILE).read_text()), **(config_changes or {})}
    (target / hf.CONFIG_FILE).write_text(json.dumps(config_json))
    return target


def _text_tokens():
    return random_tokens(1, (2, 12))


# ------------------------------------------------------------------------------ the wrapper


def test_saved_layout_is_the_older_prefix(wrapper):
    """What the newer-layout tests below rename from: transformers 5.24 writes the old names."""
    _, hf_model, directory = wrapper
    names = load_file(directory / hf.SINGLE_FILE).keys()
    assert any(n.startswith("language_model.model.layers.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names)
    assert ("language_model.lm_head.weight" in names) != hf_model.config.tie_word_embeddings


def test_wrapper_import_matches_transformers(wrapper, tmp_path):
    """Both prefixes read the same params; the newer-layout copy stores its vision tensors as
    int8, which any read or check of them would refuse: they are never touched."""
    name, hf_model, directory = wrapper
    cfg, params = hf.load(directory)
    text = WRAPPERS[name]
    assert cfg.tie_embeddings == text.tie_word_embeddings == ("lm_head" not in params)
    assert hf.read_config(directory) == cfg
    if name == "ministral3_tied":
        assert cfg.query_scale_beta == 0.4 and isinstance(cfg.rope_scaling, YarnRopeScaling)
    else:
        assert cfg.rope_theta == 1e9 and cfg.rope_scaling is None
    tokens = _text_tokens()
    err = rel_err(model.forward(cfg, params, jnp.asarray(tokens)), hf_logits(hf_model, tokens))
    print(f"\n[{name} wrapper] import max relative error {err:.2e}")
    assert err <= TOL

    tensors = {k: (torch.zeros(v.shape, dtype=torch.int8) if _is_vision(k) else v.detach())
               for k, v in hf_model.state_dict().items()
               if k != "lm_head.weight" or not text.tie_word_embeddings}
    newer = _write_wrapper(hf_model, directory, tmp_path / "newer", older=False, tensors=tensors)
    again_cfg, again = hf.load(newer)
    assert again_cfg == cfg
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_wrapper_child_exports_as_its_text_model(wrapper, tmp_path):
    """The default export is the text family (Ministral3ForCausalLM for YaRN + query scale,
    MistralForCausalLM otherwise); transformers reads it back with the same logits."""
    name, _, directory = wrapper
    cfg, params = hf.load(directory)
    out = hf.save(cfg, params, tmp_path / "child")
    want = {"ministral3_tied": "Ministral3ForCausalLM",
            "mistral_small_untied": "MistralForCausalLM"}[name]
    config_json = json.loads((out / hf.CONFIG_FILE).read_text())
    assert config_json["architectures"] == [want]
    assert hf.text_architecture(json.loads((directory / hf.CONFIG_FILE).read_text())) == want
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == want
    tokens = _text_tokens()
    err = rel_err(model.forward(cfg, params, jnp.asarray(tokens)), hf_logits(reloaded, tokens))
    print(f"\n[{name} wrapper] export max relative error {err:.2e}")
    assert err <= TOL


def test_wrapper_without_text_tensors_is_a_clear_error(wrapper, tmp_path):
    _, hf_model, directory = wrapper
    vision_only = {k: v.detach() for k, v in hf_model.state_dict().items() if _is_vision(k)}
    bad = _write_wrapper(hf_model, directory, tmp_path / "bad", older=False, tensors=vision_only)
    with pytest.raises(ValueError, match=r"model\.language_model\.") as info:
        hf.load(bad)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------------------------ wrapper export


_PROJECTOR = "multi_modal_projector."


def _image_inputs(hf_model) -> dict[str, torch.Tensor]:
    """One 16 × 16 image (4 × 4 patches of 4, merged 2 × 2: 4 image tokens) between text."""
    config = hf_model.config
    merged = config.vision_config.patch_size * config.spatial_merge_size
    n_image = (config.vision_config.image_size // merged) ** 2
    text = random_tokens(3, (1, 10)) % config.image_token_index  # no stray image tokens
    ids = np.concatenate([text[:, :3], np.full((1, n_image), config.image_token_index),
                          text[:, 3:]], axis=1)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return {"input_ids": torch.from_numpy(ids).long(), "pixel_values": pixels,
            "image_sizes": torch.tensor([[16, 16]])}


def _load_wrapper(directory: Path):
    """transformers' wrapper from `directory`, refusing any missing/unexpected/mismatched key."""
    loaded, info = Mistral3ForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return loaded.eval()


def _logits(hf_model, inputs) -> np.ndarray:
    with torch.no_grad():
        return hf_model(**inputs).logits.float().numpy()


def _projector(directory: Path) -> dict[str, np.ndarray]:
    return {k.removeprefix(_PROJECTOR): v.numpy() for k, v in
            load_file(directory / hf.SINGLE_FILE).items() if k.startswith(_PROJECTOR)}


def test_rotated_wrapper_child_sees_images_like_its_parent(wrapper, tmp_path):
    """A full-width rotation of the residual is the parent to rounding; exported as the
    wrapper (projector output rows rotated too), image + text logits equal the parent's."""
    name, hf_model, directory = wrapper
    cfg, params = hf.load(directory)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(cfg.d_model, cfg.d_model)))[0]
    child_cfg, child_params = prune.surgery.rotate_hidden(cfg, params, q)
    out = hf.save(child_cfg, child_params, tmp_path / "child", vision_from=directory,
                  hidden_map=prune.surgery.hidden_map(cfg.d_model, rotation=q))
    config_json = json.loads((out / hf.CONFIG_FILE).read_text())
    parent_json = json.loads((directory / hf.CONFIG_FILE).read_text())
    assert config_json["vision_config"] == parent_json["vision_config"]
    assert config_json["text_config"]["model_type"] == WRAPPERS[name].model_type
    assert not config_json["tie_word_embeddings"]  # a rotated child is untied
    child = _load_wrapper(out)
    inputs = _image_inputs(hf_model)
    err = rel_err(_logits(child, inputs), _logits(hf_model, inputs))
    print(f"\n[{name} wrapper] rotated child, image + text max relative error {err:.2e}")
    assert err <= TOL
    parent_projector, child_projector = _projector(directory), _projector(out)
    for key in ("norm.weight", "patch_merger.merging_layer.weight", "linear_1.weight"):
        np.testing.assert_array_equal(child_projector[key], parent_projector[key])


def test_narrower_wrapper_child_maps_the_projector_to_its_channels(wrapper, tmp_path):
    """A channel cut and a dropped layer: transformers reads the wrapper child, its text logits
    are ours, and the projector's output rows are the parent's at the kept channels, times the
    residual scale sqrt(D'/D) every residual writer gets."""
    name, hf_model, directory = wrapper
    cfg, params = hf.load(directory)
    rng = np.random.default_rng(1)
    d = cfg.d_model
    scores = prune.Importance(
        layer_block_influence=rng.random(2), layer_norm_ratio=rng.random(2),
        neuron=rng.random((2, cfg.d_ff)), head=rng.random((2, cfg.n_heads)),
        kv_group=rng.random((2, cfg.n_kv_heads)), channel=rng.random(d),
        residual_cov=np.eye(d), n_tokens=np.float32(1), model_config=cfg.to_dict())
    pruned = prune.prune(cfg, params, scores, prune.Target(n_layers=1, d_model=32))
    out = hf.save(pruned.cfg, pruned.params, tmp_path / "child", vision_from=directory,
                  hidden_map=pruned.record.hidden_map())
    assert hf.read_config(out) == pruned.cfg  # and it reads back as the child
    child = _load_wrapper(out)
    inputs = _image_inputs(hf_model)
    logits = _logits(child, inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg.vocab_size)
    assert np.isfinite(logits).all()
    tokens = _text_tokens()
    err = rel_err(model.forward(pruned.cfg, pruned.params, jnp.asarray(tokens)),
                  hf_logits(child, tokens))
    print(f"\n[{name} wrapper] channel-cut child, text max relative error {err:.2e}")
    assert err <= TOL

    parent_projector, child_projector = _projector(directory), _projector(out)
    w1, w2 = parent_projector["linear_1.weight"], parent_projector["linear_2.weight"]
    # The hidden units kept (transformers sizes them by d_model too): rows of linear_1.
    units = [int(np.flatnonzero((w1 == row).all(axis=1))[0])
             for row in child_projector["linear_1.weight"]]
    assert len(set(units)) == 32
    channels = pruned.record.channels
    np.testing.assert_allclose(child_projector["linear_2.weight"],
                               pruned.record.residual_scale * w2[channels][:, units],
                               rtol=1e-6)
    np.testing.assert_array_equal(child_projector["norm.weight"], parent_projector["norm.weight"])


def test_wrapper_export_refuses_bad_requests_before_writing(wrapper, tmp_path, monkeypatch):
    _, _, directory = wrapper
    cfg, params = hf.load(directory)
    text_only = hf.save(cfg, params, tmp_path / "text")
    narrow_cfg, narrow = prune.surgery.keep_channels(cfg, params, list(range(32)))
    target = tmp_path / "child"
    cases = [
        (dict(vision_from=text_only), f"vision_from={str(text_only)!r} is "
                                      f"['{hf.default_architecture(cfg)}'], not a {hf.WRAPPER}"),
        (dict(hidden_map=np.eye(cfg.d_model)), "need vision_from="),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            hf.save(cfg, params, target, **{"architecture": None, **kwargs})
    for kwargs, match in (
            (dict(), "hidden_map is required: the child's d_model=32"),
            (dict(hidden_map=np.eye(cfg.d_model)), "hidden_map has shape (48, 48), but it must "
                                                   "be [hidden_size of vision_from=48, child "
                                                   "d_model=32]"),
            (dict(hidden_map=np.eye(cfg.d_model)[:, :32], projector_units=[0] * 32),
             "projector_units=")):
        with pytest.raises(ValueError, match=re.escape(match)) as info:
            hf.save(narrow_cfg, narrow, target, vision_from=directory, **kwargs)
        assert "record.hidden_map()" in str(info.value) or "projector_units" in match
    assert list(tmp_path.iterdir()) == [text_only]  # nothing written, not even a temp dir

    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save(cfg, params, text_only, vision_from=directory)
    with pytest.raises(ValueError, match="is vision_from itself"):
        hf.save(cfg, params, directory, vision_from=directory, overwrite=True)

    def fail(self, name, dtype):
        raise OSError(f"disk full while writing {name}")

    monkeypatch.setattr(hf._Checkpoint, "tensor", fail)
    with pytest.raises(OSError, match="disk full"):
        hf.save(cfg, params, text_only, vision_from=directory, overwrite=True)
    assert sorted(tmp_path.iterdir()) == [text_only]  # the old export intact, no temp dir
    assert json.loads((text_only / hf.CONFIG_FILE).read_text())["architectures"] == [
        hf.default_architecture(cfg)]


# ------------------------------------------------------------------------------ FP8


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) the way transformers' Fp8Quantize makes them:
    per [rows, cols] tile, scale = 448 / max|w|, stored as its inverse. Tiles at the edges may
    be partial (the scale grid is ceil-divided, as FP8Linear allocates it)."""
    rows, cols = w.shape
    bm, bn = block or (rows, cols)
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn)
    padded[:rows, :cols] = w.float()
    tiles = padded.reshape(grid[0], bm, grid[1], bn)
    max_abs = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(max_abs > 0, _FP8_MAX / max_abs, torch.ones_like(max_abs))
    quantized = torch.clamp(tiles * scale[:, None, :, None], -_FP8_MAX, _FP8_MAX)
    quantized = quantized.to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols]
    inv = (1.0 / scale).float()
    return quantized.contiguous(), (inv if block else inv.reshape(()))


def _dequantize_fp8(quantized: torch.Tensor, inv: torch.Tensor,
                    block: tuple[int, int] | None) -> torch.Tensor:
    rows, cols = quantized.shape
    if block is None:
        return quantized.float() * inv
    per_value = inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return quantized.float() * per_value[:rows, :cols]


# wrapper: (weight_block_size, older layout, activation scales as in a "static" release).
# Block-wise 32 × 32 on 48-wide matrices leaves partial tiles at the edges; per-tensor with
# activation scales is how Ministral 3's FP8 releases are stored.
FP8_CASES = {
    "mistral_small_untied": ((32, 32), False, False),
    "ministral3_tied": (None, True, True),
}


def _fp8_case(wrapper, target: Path):
    """(FP8 directory, transformers running its dequantized weights, the float model)."""
    name, hf_model, directory = wrapper
    block, older, static = FP8_CASES[name]
    tensors, reference = {}, copy.deepcopy(hf_model)
    dequantized = {}
    for key, value in hf_model.state_dict().items():
        if key == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        if "language_model" in key and key.endswith(".weight") and any(
                part in key for part in _QUANTIZED):
            quantized, inv = _quantize_fp8(value.detach(), block)
            tensors[key], tensors[key + "_scale_inv"] = quantized, inv
            if static:
                tensors[key.removesuffix(".weight") + ".activation_scale"] = torch.tensor(0.02)
            dequantized[key] = _dequantize_fp8(quantized, inv, block)
        else:
            tensors[key] = value.detach().clone()
    reference.load_state_dict(dequantized, strict=False)
    quant = {"quant_method": "fp8", "weight_block_size": list(block) if block else None,
             "activation_scheme": "static" if static else "dynamic",
             "modules_to_not_convert": ["lm_head", "model.vision_tower",
                                        "model.multi_modal_projector"]}
    out = _write_wrapper(hf_model, directory, target, older=older, tensors=tensors,
                         config_changes={"quantization_config": quant, "dtype": "bfloat16"})
    return out, reference.eval(), hf_model


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(wrapper, tmp_path):
    case = f"{'block-wise' if FP8_CASES[wrapper[0]][0] else 'per-tensor'} {wrapper[0]}"
    fp8_dir, reference, float_model = _fp8_case(wrapper, tmp_path / "fp8")
    cfg, params = hf.load(fp8_dir, dtype="float32")
    assert hf.read_config(fp8_dir).param_dtype == "bfloat16"  # the config's compute dtype
    tokens = _text_tokens()
    ours = model.forward(cfg, params, jnp.asarray(tokens))
    theirs = hf_logits(reference, tokens)
    err = rel_err(ours, theirs)
    print(f"\n[fp8 {case}] import max relative error {err:.2e}")
    assert err <= TOL
    assert rel_err(ours, hf_logits(float_model, tokens)) > 100 * TOL  # FP8 rounding shows
    out = hf.save(cfg, params, tmp_path / "child")
    config_json = json.loads((out / hf.CONFIG_FILE).read_text())
    assert "quantization_config" not in config_json and config_json["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    err = rel_err(ours, hf_logits(reloaded, tokens))
    print(f"\n[fp8 {case}] export max relative error {err:.2e}")
    assert err <= TOL
    # As a wrapper: the FP8 parent's (unquantized) vision tensors around the float child.
    wrapped = hf.save(cfg, params, tmp_path / "wrapped", vision_from=fp8_dir)
    assert "quantization_config" not in json.loads((wrapped / hf.CONFIG_FILE).read_text())
    assert rel_err(ours, hf_logits(_load_wrapper(wrapped), tokens)) <= TOL


def test_fp8_blocks_read_alone_equal_the_whole_dequantized_tensor():
    """A device shard reads only its block; partial tiles at either end take the right scale."""
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(0))
    for block in ((16, 32), None):
        quantized, inv = _quantize_fp8(w, block)
        whole = _dequantize_fp8(quantized, inv, block).numpy()
        raw = quantized.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        fp8 = hf._Fp8Slice(raw, inv.numpy(), block)
        for rows, cols in (((0, 40), (0, 72)), ((5, 23), (17, 70)), ((16, 32), (32, 64)),
                           ((39, 40), (0, 1))):
            np.testing.assert_array_equal(fp8[slice(*rows), slice(*cols)],
                                          whole[slice(*rows), slice(*cols)])


def test_fp8_problems_name_the_tensor_and_the_fix(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=16, d_ff=32)
    saved = hf.save(cfg, model.init(cfg, jax.random.key(0)), tmp_path / "float")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(saved / hf.SINGLE_FILE)
    tensors[name], scale = _quantize_fp8(tensors[name], (16, 16))
    fp8 = {"quant_method": "fp8", "weight_block_size": [16, 16]}

    def broken(tag, tensors, quantization_config):
        path = Path(shutil.copytree(saved, tmp_path / tag))
        save_file(tensors, str(path / hf.SINGLE_FILE), metadata={"format": "pt"})
        config_json = json.loads((path / hf.CONFIG_FILE).read_text())
        config_json["quantization_config"] = quantization_config
        (path / hf.CONFIG_FILE).write_text(json.dumps(config_json))
        return path

    for tag, files, quant, match in (
            ("unconfigured", {**tensors, name + "_scale_inv": scale}, None,
             f"{name} is float8 but config.json has no quantization_config"),
            ("no_scale", tensors, fp8, f"{name}_scale_inv is missing"),
            ("wrong_block", {**tensors, name + "_scale_inv": scale},
             {**fp8, "weight_block_size": [32, 32]}, "implies (1, 1)")):
        path = broken(tag, files, quant)
        with pytest.raises(ValueError, match=re.escape(match)) as info:
            hf.load(path)
        assert str(path) in str(info.value)
