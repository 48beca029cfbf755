"""The tiny cascade (the README's main job): a ~4M-parameter root trained from scratch on the
built-in corpus, pruned and distilled twice (root → child → grandchild, Ministral 3's
"teacher = root" recipe), with the baselines that say whether it worked, in ≤ 10 minutes on a
2-core CPU:

  child_random_ce     the child's shape from random init, cross-entropy, the child's tokens
  child_pruned_ce     the pruned child retrained with cross-entropy only (no teacher)
  grandchild_oneshot  root pruned straight to the grandchild's shape, distilled on the tokens
                      of both cascade stages together (iterative vs one-shot, equal tokens)

    python -m experiments.cascade --config configs/tiny_cascade.py
    python -m experiments.cascade --config configs/tiny_cascade.py --config.workdir=/tmp/c \
        --config.root.steps=50 --config.stages.child.steps=20   # a smoke run
"""

import ml_collections
from ml_collections.config_dict import placeholder

# The settings block of each objective (`stages.<name>.<objective>`), validated by it.
OBJECTIVE_SETTINGS = {
    "kd": dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=128),
    "ce": {},
}


def _stage(objective: str = "kd", **fields) -> ml_collections.ConfigDict:
    stage = dict(
        parent="root", teacher="root", init="pruned", objective=objective,
        # None keeps the parent's size (placeholders, so --config...target.d_ff=512 works)
        target={**{name: placeholder(int) for name in
                   ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads")},
                "tie_embeddings": placeholder(bool)},
        depth_method="block_influence", head_method="within_group", hidden_method="channel",
        steps=STAGE_STEPS, optim=dict(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1),
        calib_batches=4, grad_accum=1, baseline=False)
    stage[objective] = dict(OBJECTIVE_SETTINGS[objective])
    for name, value in fields.items():
        if isinstance(value, dict):
            stage[name] = {**stage[name], **value}
        else:
            stage[name] = value
    return ml_collections.ConfigDict(stage)


STAGE_STEPS = 60
CHILD = dict(n_layers=3, d_ff=512)
GRANDCHILD = dict(n_layers=2, d_model=192, d_ff=384)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny_cascade"
    config.seed = 0

    config.root = ml_collections.ConfigDict(dict(
        kind="scratch",  # or "hf" / "orbax" with path=
        path="",
        model=dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                   head_dim=32, d_ff=768, rope_theta=10000.0, norm_eps=1e-5,
                   tie_embeddings=True, max_seq_len=128, dtype="float32",
                   param_dtype="float32"),
        steps=250,
        optim=dict(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1),
    ))

    config.data = ml_collections.ConfigDict(dict(
        source="builtin", tokenizer="builtin", seq_len=128, batch_size=16, cache_dir=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # Stages run in stage_order; each parent/teacher must come earlier.
    config.stage_order = ("child", "grandchild", "child_random_ce", "child_pruned_ce",
                          "grandchild_oneshot")
    config.stages = ml_collections.ConfigDict()
    config.stages.child = _stage(target=CHILD)
    config.stages.grandchild = _stage(parent="child", target=GRANDCHILD)
    config.stages.child_random_ce = _stage(target=CHILD, init="random", objective="ce",
                                           baseline=True)
    config.stages.child_pruned_ce = _stage(target=CHILD, objective="ce", baseline=True)
    config.stages.grandchild_oneshot = _stage(target=GRANDCHILD, steps=2 * STAGE_STEPS,
                                              baseline=True)

    config.log_every = 10
    config.eval_every = 30  # validation curves: every 30 steps and at the end of each stage
    config.eval_batches = 8
    config.eval_micro_batches = 1
    config.checkpoint_every = 60
    config.keep_checkpoints = 2
    return config
