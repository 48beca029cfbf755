"""The run config is typed once: every bad value fails before any work, naming its key."""

import copy

import pytest

from cascade_jax import objectives, runconfig, validate
from configs import tiny_cascade, tiny_teacher


def _cascade(edit) -> dict:
    config = tiny_cascade.get_config().to_dict()
    edit(config)
    return config


def _set(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[last] = value
    return edit


def _delete(path: str):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        del node[last]
    return edit


def test_the_shipped_configs_parse():
    cascade = runconfig.cascade_config(tiny_cascade.get_config())
    assert [s.name for s in cascade.stages] == list(tiny_cascade.get_config().stage_order)
    assert cascade.stage("child_random_ce").objective == "ce"
    assert cascade.stage("child").settings.chunk_size == 128
    train = runconfig.train_run_config(tiny_teacher.get_config())
    assert train.model.d_model == 256 and train.optim.lr == 3e-3
    from configs import ministral3, minitron_llama31

    for module in (ministral3, minitron_llama31):
        assert runconfig.cascade_config(module.get_config()).root.kind == "hf"


# (edit, the message must contain) — one case per typed field family.
CASCADE_CASES = [
    (_set("stages.child.grad_accum", True), "config.stages.child.grad_accum=True must be a "
                                            "positive integer"),
    (_set("stages.child.grad_accum", 0), "config.stages.child.grad_accum=0 must be a positive"),
    (_set("stages.child.steps", 2.0), "config.stages.child.steps=2.0 must be a positive integer"),
    (_set("stages.child.steps", 5), "config.stages.child.steps=5 must exceed "
                                    "config.stages.child.optim.warmup_steps=10"),
    (_set("stages.child.calib_batches", -1), "config.stages.child.calib_batches=-1"),
    (_set("stages.child.baseline", "false"), "config.stages.child.baseline='false' must be True "
                                             "or False"),
    (_set("stages.child.init", "copy"), "config.stages.child.init='copy' is not one of"),
    (_set("stages.child.objective", "rl"), "config.stages.child.objective='rl' is not one of"),
    (_set("stages.child.depth_method", "random"), "config.stages.child.depth_method='random'"),
    (_set("stages.child.head_method", "all"), "config.stages.child.head_method='all'"),
    (_set("stages.child.hidden_method", "svd"), "config.stages.child.hidden_method='svd'"),
    (_set("stages.child.target.d_ff", 0), "config.stages.child.target.d_ff=0 must be a positive"),
    (_set("stages.child.target.tie_embeddings", 1), "config.stages.child.target.tie_embeddings=1"),
    (_set("stages.child.target.width", 3), "config.stages.child.target.width"),
    (_set("stages.child.kd.temperature", 0.0), "config.stages.child.kd: temperature=0.0 must be"),
    (_set("stages.child.kd.kind", "kl"), "config.stages.child.kd: kind='kl'"),
    (_set("stages.child.kd.chunk", 3), "config.stages.child.kd.chunk"),
    (_set("stages.child.ce", {}), "config.stages.child has settings for ['ce'] but its objective "
                                  "is 'kd'"),
    (_set("stages.child.optim.lr", -1.0), "config.stages.child.optim.lr=-1.0 must be a finite "
                                          "number > 0"),
    (_delete("stages.child.optim.lr"), "config.stages.child.optim.lr is not set"),
    (_set("stages.child.optim.b2", 1.0), "config.stages.child.optim.b2=1.0 must be a finite"),
    (_set("stages.child.optim.warmup_steps", -3), "config.stages.child.optim.warmup_steps=-3"),
    (_set("stages.child.optim.clip_norm", 0), "config.stages.child.optim.clip_norm=0"),
    (_set("stages.child.parent", "nope"), "config.stages.child.parent='nope' is not 'root' or"),
    (_set("stages.child.teacher", "/no/such/dir"), "config.stages.child.teacher='/no/such/dir'"),
    (_set("stages.child.lr", 1e-3), "unknown config field(s) ['config.stages.child.lr']"),
    (_set("stage_order", ("child",)), "config.stage_order=['child'] must list every stage"),
    (_set("root.kind", "gguf"), "config.root.kind='gguf' is not one of"),
    (_set("root.steps", 0), "config.root.steps=0 must be a positive integer"),
    (_set("root.model.n_heads", 7), "config.root.model: n_heads=7 is not a multiple of "
                                    "n_kv_heads=2"),
    (_set("root.model.layers", 7), "config.root.model.layers"),
    (_set("root.optim.eps", 0.0), "config.root.optim.eps=0.0 must be a finite number > 0"),
    (_set("data.seq_len", 1), "config.data.seq_len=1 must be >= 2"),
    (_set("data.batch_size", "16"), "config.data.batch_size='16' must be a positive integer"),
    (_set("data.source", 3), "config.data.source=3 must be a string"),
    (_set("data.validation_percent", 100), "config.data.validation_percent=100 must be a "
                                           "finite number in (0, 100)"),
    (_set("mesh.fsdp", 0), "config.mesh.fsdp=0 must be a positive integer"),
    (_set("mesh.fsdp", -1), "config.mesh: only one of data=-1, fsdp=-1"),
    (_set("log_every", 0), "config.log_every=0 must be a positive integer"),
    (_set("eval_every", -30), "config.eval_every=-30 must be a non-negative integer"),
    (_set("eval_micro_batches", 0), "config.eval_micro_batches=0 must be a positive integer"),
    (_set("checkpoint_every", 1.5), "config.checkpoint_every=1.5 must be a non-negative"),
    (_set("keep_checkpoints", 0), "config.keep_checkpoints=0 must be a positive integer"),
    (_set("seed", -1), "config.seed=-1 must be a non-negative integer"),
    (_set("workdir", 3), "config.workdir=3 must be a string"),
    (_set("epochs", 3), "unknown config field(s) ['config.epochs']"),
]


@pytest.mark.parametrize("edit,message", CASCADE_CASES,
                         ids=[m.split("=")[0][:40] for _, m in CASCADE_CASES])
def test_each_bad_cascade_value_is_named(edit, message):
    with pytest.raises(ValueError) as error:
        runconfig.cascade_config(_cascade(edit))
    assert message in str(error.value)


def test_init_parent_refuses_a_target():
    def edit(config):
        config["stages"]["child"]["init"] = "parent"
    with pytest.raises(ValueError, match=r"stages\.child\.init='parent' continues the "):
        runconfig.cascade_config(_cascade(edit))

    def no_target(config):
        config["stages"]["child"].update(init="parent", target={})
    assert runconfig.cascade_config(_cascade(no_target)).stage("child").init == "parent"


def test_bad_train_values_are_named():
    base = tiny_teacher.get_config().to_dict()
    for path, value, message in (
            ("steps", 40, "config.steps=40 must exceed config.optim.warmup_steps=40"),
            ("model.d_model", 0, "config.model: d_model=0 must be a positive integer"),
            ("optim.lr", "3e-3", "config.optim.lr='3e-3' must be a finite number > 0"),
            ("eval_batches", None, "config.eval_batches=None must be a non-negative integer"),
            ("workdir", "", "config.workdir='' must be a non-empty string")):
        config = copy.deepcopy(base)
        _set(path, value)(config)
        with pytest.raises(ValueError) as error:
            runconfig.train_run_config(config)
        assert message in str(error.value), (path, str(error.value))


def test_validators_refuse_bools_and_name_the_key():
    with pytest.raises(ValueError, match=r"k=True must be a positive integer \(why\)"):
        validate.positive_int("k", True, "why")
    assert validate.positive_int("k", 3) == 3
    with pytest.raises(ValueError, match=r"x=nan must be a finite number in \[0, 1\]"):
        validate.number("x", float("nan"), low=0.0, high=1.0)
    assert validate.number("x", 1, low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match="b=1 must be True or False"):
        validate.boolean("b", 1)


def test_objectives_registry_names_what_exists():
    assert {"ce", "kd"} <= set(objectives.names())
    with pytest.raises(ValueError, match=r"objective='nope' is not registered; choose one of"):
        objectives.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        objectives.register(type("Other", (), {"name": "kd"})())


def test_spread_over_seeds_against_a_hand_count():
    from cascade_jax import spread

    runs = {0: [{"stage": "root", "perplexity": 10.0, "params": 5, "wall_s": 1.0},
                {"stage": "child", "perplexity": 20.0, "pass@1": 0.5, "baseline": False}],
            1: [{"stage": "root", "perplexity": 12.0, "params": 5, "wall_s": 2.0},
                {"stage": "child", "perplexity": 26.0, "pass@1": float("nan")}],
            2: [{"stage": "root", "perplexity": 11.0, "params": 5, "wall_s": 3.0},
                {"stage": "child", "perplexity": 23.0, "pass@1": 0.7}]}
    rows = {r["stage"]: r for r in spread.spread(runs)}
    assert spread.figures(runs[0]) == ["perplexity", "pass@1"]  # descriptions left out
    assert rows["root"]["perplexity"] == {"mean": 11.0, "min": 10.0, "max": 12.0, "n": 3}
    assert rows["child"]["pass@1"]["n"] == 2 and abs(rows["child"]["pass@1"]["mean"] - 0.6) < 1e-12
    assert spread.separated(rows["root"]["perplexity"], rows["child"]["perplexity"])
    assert not spread.separated(rows["root"]["perplexity"], {"min": 11.5, "max": 30.0})
    table = spread.spread_markdown(runs)
    assert "| child | 23.000 [20.000–26.000] | 0.600 [0.500–0.700] |" in table
