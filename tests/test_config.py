"""ModelConfig validation: bad shapes fail at construction with a message naming the fix."""

import pytest

from cascade_jax.config import Llama3RopeScaling, ModelConfig, YarnRopeScaling

BASE = dict(vocab_size=128, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            d_ff=96)


def test_valid_config_round_trips_through_dict():
    cfg = ModelConfig(**BASE, rope_theta=1e6, tie_embeddings=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_groups == 2


@pytest.mark.parametrize("changes, fragment", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads=6 is not a multiple of n_kv_heads=4"),
    (dict(head_dim=15), "head_dim=15 must be even"),
    (dict(d_model=0), "d_model=0 must be a positive integer"),
    (dict(n_layers=2.5), "n_layers=2.5 must be a positive integer"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(dtype="float8"), "dtype='float8' is not supported"),
])
def test_invalid_config_names_the_value(changes, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**{**BASE, **changes})


def test_gqa_error_suggests_valid_values():
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**BASE, "n_heads": 30, "n_kv_heads": 8})
    assert "choose n_heads in" in str(err.value) and "32" in str(err.value)


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown ModelConfig fields \\['n_layer'\\]"):
        ModelConfig.from_dict({**BASE, "n_layer": 3})


def test_num_params_matches_formula_by_hand():
    cfg = ModelConfig(**BASE)
    d, f, e, h, k, v, n = 48, 96, 16, 4, 2, 128, 2
    per_layer = d * h * e * 2 + d * k * e * 2 + 3 * d * f + 2 * d
    assert cfg.num_params() == n * per_layer + 2 * v * d + d
    assert cfg.replace(tie_embeddings=True).num_params() == n * per_layer + v * d + d


def test_rope_scaling_is_a_tagged_choice_that_survives_json():
    import json

    base = dict(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    llama3 = ModelConfig(**base, rope_scaling=(8.0, 1.0, 4.0, 8192))  # the old 4-tuple reads
    assert llama3.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    yarn = ModelConfig(**base, rope_scaling=YarnRopeScaling(
        16.0, 16384, mscale=1.0, mscale_all_dim=1.0), query_scale_beta=0.1)
    for cfg in (llama3, yarn):
        stored = json.loads(json.dumps(cfg.to_dict()))
        assert stored["rope_scaling"]["rope_type"] == cfg.rope_scaling.rope_type
        again = ModelConfig.from_dict(stored)
        assert again == cfg
        hash(again)  # a jit static argument
    # Checkpoint metadata written before YaRN: no new fields, the 4-tuple as a JSON list.
    old = {k: v for k, v in llama3.to_dict().items()
           if k not in ("query_scale_beta", "qkv_bias", "qk_norm")}
    assert ModelConfig.from_dict({**old, "rope_scaling": [8.0, 1.0, 4.0, 8192]}) == llama3
    for bad, match in (((8.0, 4.0, 1.0, 8192), "0 < low_freq_factor < high_freq_factor"),
                       ((8.0, 1.0, 4.0), "4-tuple"),
                       ((8.0, 1.0, 4.0, 81.5), "positive integer"),
                       ({"rope_type": "dynamic", "factor": 2.0}, "choose one of"),
                       ({"rope_type": "yarn", "factor": 4.0}, "missing .'original_max"),
                       ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                         8, "beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast > beta_slow")):
        with pytest.raises(ValueError, match=match):
            llama3.replace(rope_scaling=bad)
    with pytest.raises(ValueError, match=r"query_scale_beta=0\.1 needs rope_scaling"):
        llama3.replace(rope_scaling=None, query_scale_beta=0.1)


def test_num_params_counts_qwen_biases_and_qk_norms():
    cfg = ModelConfig(**BASE)
    e, h, k, n = 16, 4, 2, 2
    assert cfg.replace(qkv_bias=True).num_params() == cfg.num_params() + n * e * (h + 2 * k)
    assert cfg.replace(qk_norm=True).num_params() == cfg.num_params() + n * 2 * e
