"""`search_targets` against a brute-force search with a hand-written parameter formula, and
against the published Ministral 3 shapes (arXiv 2601.08584). No jax compilation: configs only.
Also the `prune` package's public surface, and `child_config` for both kinds of child."""

import itertools
import json
import types

import pytest

from cascade_jax import prune
from cascade_jax.config import ModelConfig
from cascade_jax.prune import Candidate, Target, search_targets

SMALL = ModelConfig(vocab_size=1000, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2,
                    head_dim=64, d_ff=704)
# Mistral Small 3.1 (24B), the root of the Ministral 3 cascade; its first child is the 14B.
MISTRAL_SMALL = ModelConfig(vocab_size=131072, d_model=5120, n_layers=40, n_heads=32,
                            n_kv_heads=8, head_dim=128, d_ff=32768)


def _count(n_layers, d_model, d_ff, cfg):
    """Parameters written out by hand: attention, SwiGLU, two norms per layer; embeddings."""
    attn = d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    per_layer = attn + 3 * d_model * d_ff + 2 * d_model
    embed = cfg.vocab_size * d_model * (1 if cfg.tie_embeddings else 2)
    return n_layers * per_layer + embed + d_model


def test_candidates_are_the_tightest_fits_of_a_brute_force_search():
    budget = 2_500_000
    got = search_targets(SMALL, budget, multiple_of=64, max_candidates=10_000)
    sizes_D = [*range(64, 256, 64), 256]
    sizes_F = [*range(64, 704, 64), 704]       # 704 = 11·64, the parent's own size
    want = {}
    for n, d in itertools.product(range(1, 7), sizes_D):
        fits = [f for f in sizes_F if _count(n, d, f, SMALL) <= budget]
        if fits:
            want[(n, d)] = (max(fits), _count(n, d, max(fits), SMALL))
    assert {(c.child_cfg.n_layers, c.child_cfg.d_model): (c.child_cfg.d_ff, c.n_params)
            for c in got} == want
    for c in got:
        assert c.n_params <= budget and c.n_params == c.child_cfg.num_params()
        assert c.budget_fraction == pytest.approx(c.n_params / budget)
        assert c.child_cfg.d_model % 64 == 0 and c.child_cfg.d_ff % 64 == 0
        assert (c.child_cfg.n_heads, c.child_cfg.n_kv_heads) == (4, 2)   # heads are kept
        assert c.target.resolve(SMALL) == {
            "n_layers": c.child_cfg.n_layers, "d_model": c.child_cfg.d_model,
            "d_ff": c.child_cfg.d_ff, "n_heads": 4, "n_kv_heads": 2}


def test_ranking_prefers_closeness_then_fewer_changes_then_less_depth():
    budget = 2_500_000
    got = search_targets(SMALL, budget, multiple_of=64, max_candidates=10_000, tolerance=0.02)
    within = [c for c in got if c.n_params >= 0.98 * budget]
    assert got[:len(within)] == within         # everything within 2% comes first
    keys = [(len(c.changed), SMALL.n_layers - c.child_cfg.n_layers) for c in within]
    assert keys == sorted(keys)
    outside = got[len(within):]
    assert [c.n_params for c in outside] == sorted((c.n_params for c in outside), reverse=True)
    assert len(within) == 4 and keys[0] == (1, 0)
    # The best changes one dimension and lands within 2%: d_model 256 → 128 (98.8%). Shrinking
    # d_ff alone fits only at 704 → 128 (91%), outside the tolerance.
    assert got[0].target == Target(d_model=128) and got[0].changed == ("d_model",)
    assert got[0].n_params == _count(6, 128, 704, SMALL) == 2_469_504
    ffn_only = next(c for c in got if c.changed == ("d_ff",))
    assert ffn_only.target == Target(d_ff=128) and ffn_only.n_params == 2_284_800


def test_recovers_ministral3_14b_from_its_parameter_count():
    """Ministral 3's first stage cut only the FFN: 40 / 5120 / 32768 → 40 / 5120 / 16384."""
    budget = _count(40, 5120, 16384, MISTRAL_SMALL)
    assert budget == MISTRAL_SMALL.replace(d_ff=16384).num_params()
    best = search_targets(MISTRAL_SMALL, budget, multiple_of=128)
    assert best[0].target == Target(d_ff=16384)
    assert best[0].n_params == budget and best[0].budget_fraction == 1.0
    assert len(best) == 10 and all(c.n_params <= budget for c in best)


def test_depth_and_width_switches():
    budget = 2_500_000
    width_only = search_targets(SMALL, budget, prune_depth=False, max_candidates=100)
    assert width_only and all(c.child_cfg.n_layers == 6 for c in width_only)
    depth_only = search_targets(SMALL, budget, prune_width=False, max_candidates=100)
    assert [c.target for c in depth_only] == [Target(n_layers=2), Target(n_layers=1)]
    assert depth_only[0].n_params == _count(2, 256, 704, SMALL) == 1_987_840


def test_candidate_to_dict_is_plain_data():
    c = search_targets(SMALL, 2_500_000)[0]
    assert isinstance(c, Candidate)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["child_config"] == c.child_cfg.to_dict() and d["changed"] == ["d_model"]
    assert d["target"] == {"n_layers": None, "d_model": 128, "d_ff": None, "n_heads": None,
                           "n_kv_heads": None, "tie_embeddings": None}


def test_target_checks_and_resolves():
    assert Target().resolve(SMALL)["d_ff"] == 704
    assert Target(d_ff=512, n_layers=6).changed(SMALL) == ("d_ff",)
    with pytest.raises(ValueError, match="exceeds the parent's d_model=256"):
        Target(d_model=512).check(SMALL)
    with pytest.raises(ValueError, match="positive integer"):
        Target(n_layers=2.5).check(SMALL)


@pytest.mark.parametrize(("budget", "kwargs", "match"), [
    (SMALL.num_params(), {}, "not below the parent's"),
    (10_000, {}, "no child fits"),
    (2_500_000, {"multiple_of": 0}, "multiple_of=0"),
    (2_500_000, {"prune_depth": False, "prune_width": False}, "both False"),
    (2_500_000, {"tolerance": 1.5}, "tolerance=1.5"),
])
def test_bad_budgets_are_named(budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_targets(SMALL, budget, **kwargs)


def test_prune_surface_is_curated():
    """`prune` exports exactly its documented names; `budget` is a module, not a function."""
    import cascade_jax.prune.budget

    assert isinstance(cascade_jax.prune.budget, types.ModuleType)
    assert prune.search_targets is cascade_jax.prune.budget.search_targets
    assert isinstance(prune.surgery, types.ModuleType)
    assert sorted(prune.__all__) == [
        "Candidate", "Importance", "PruneRecord", "Pruned", "Target", "child_config",
        "estimate_importance", "prune", "search_targets", "surgery"]
    assert all(getattr(prune, name) is not None for name in prune.__all__)
    assert not hasattr(Target, "child_config")   # one checked sizing function: prune's


def test_child_config_for_a_random_init_is_the_targets_shape():
    """init='random' needs no method to resolve heads or tying: the target's shape, checked."""
    tied = SMALL.replace(tie_embeddings=True)
    target = Target(d_model=128, n_kv_heads=1)   # no head method can reach this by cutting
    child = prune.child_config(tied, target, init="random")
    assert child == tied.replace(d_model=128, n_kv_heads=1)
    pca = prune.child_config(tied, Target(d_model=128), hidden_method="pca")
    assert pca.tie_embeddings is False            # pruned: a PCA cut unties
    assert prune.child_config(tied, Target(d_model=128, tie_embeddings=False),
                              init="random").tie_embeddings is False
    with pytest.raises(ValueError, match="exceeds the parent's d_ff=704"):
        prune.child_config(SMALL, Target(d_ff=1024), init="random")
    with pytest.raises(ValueError, match="init='copy' is unknown; choose one of"):
        prune.child_config(SMALL, Target(), init="copy")
