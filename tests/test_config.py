"""ModelConfig validation: bad shapes fail at construction with a message naming the fix."""

import pytest

from cascade_jax.config import ModelConfig

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


def test_rope_scaling_is_validated_and_survives_json():
    import json

    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=4, d_ff=8, rope_scaling=(8.0, 1.0, 4.0, 8192))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.rope_scaling == (8.0, 1.0, 4.0, 8192)
    hash(again)  # a jit static argument
    for bad in ((8.0, 4.0, 1.0, 8192), (8.0, 1.0, 4.0), (8.0, 1.0, 4.0, 81.5)):
        with pytest.raises(ValueError, match=r"rope_scaling=.* must be \(factor, low_freq"):
            cfg.replace(rope_scaling=bad)
