"""The tiny context extension: the tiny cascade's root (4.07M parameters) trained at 128 tokens
on the built-in corpus, pruned and distilled into its child at 128 tokens, then the child
extended to 1024 tokens, with the loss by position bucket that says whether it worked
(`positions.md`), in about ten minutes on a 2-core CPU:

  child_yarn   the child with YaRN (arXiv 2309.00071: factor 8 over its 128 original
               positions), max_seq_len 1024, trained with cross-entropy on 1024-token rows
  child_long   the baseline: the same training on the same rows with the child's plain RoPE
               (only max_seq_len raised), to tell YaRN's share from the longer rows'

Each row of `positions.md` is one model on the same 1024-token validation rows: the child as it
is (plain RoPE, beyond the 128 positions it was trained at), the child under the new RoPE
before training, and after. The stages train with `ce`, not `kd`: the root's own context is
128 tokens, so its targets beyond that would be its own extrapolation (a context stage refuses
a teacher shorter than its rows).

    python -m experiments.cascade --config configs/tiny_long_context.py
"""

import ml_collections
from ml_collections.config_dict import placeholder

SEQ_LEN = 128       # the root's and the child's rows and context
LONG = 1024         # the extended context and the long stages' rows
LONG_BATCH = 2      # rows per step of the long stages: 2 × 1024 tokens, as 16 × 128 short
CHILD = dict(n_layers=3, d_ff=512)  # the tiny cascade's root and child


def _stage(objective: str, **fields) -> ml_collections.ConfigDict:
    stage = dict(
        parent="root", teacher="root", init="pruned", objective=objective,
        target={**{name: placeholder(int) for name in
                   ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads")},
                "tie_embeddings": placeholder(bool)},
        depth_method="block_influence", head_method="within_group", hidden_method="channel",
        steps=60, optim=dict(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1),
        calib_batches=4, grad_accum=1, baseline=False)
    stage[objective] = (dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=128)
                        if objective == "kd" else {})
    stage.update(fields)
    return ml_collections.ConfigDict(stage)


def _context(**rope) -> dict:
    """A context block: 1024 positions and rows, LONG_BATCH rows a step, and `rope`."""
    return dict(max_seq_len=LONG, seq_len=LONG, batch_size=LONG_BATCH, **rope)


# The long stages continue a trained child: a quarter of the short stages' peak rate.
LONG_OPTIM = dict(lr=5e-4, warmup_steps=5, min_lr_ratio=0.1)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny_long_context"
    config.seed = 0

    config.root = ml_collections.ConfigDict(dict(
        kind="scratch", path="",
        model=dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                   head_dim=32, d_ff=768, rope_theta=10000.0, norm_eps=1e-5,
                   tie_embeddings=True, max_seq_len=SEQ_LEN, dtype="float32",
                   param_dtype="float32"),
        steps=250,
        optim=dict(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1),
    ))
    config.data = ml_collections.ConfigDict(dict(
        source="builtin", tokenizer="builtin", seq_len=SEQ_LEN, batch_size=16, cache_dir=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    config.stage_order = ("child", "child_yarn", "child_long")
    config.stages = ml_collections.ConfigDict()
    config.stages.child = _stage("kd", target=CHILD)
    yarn = dict(kind="yarn", factor=LONG / SEQ_LEN, original_max_position_embeddings=SEQ_LEN)
    config.stages.child_yarn = _stage("ce", parent="child", init="parent", optim=LONG_OPTIM,
                                      context=_context(rope_scaling=yarn))
    config.stages.child_long = _stage("ce", parent="child", init="parent", optim=LONG_OPTIM,
                                      context=_context(), baseline=True)

    config.log_every = 10
    config.eval_every = 0      # validation at the end of each stage
    config.eval_batches = 16   # 16 × 16 rows of 128 tokens; the long stages: 16 × 2 rows of 1024
    config.eval_micro_batches = 1
    config.checkpoint_every = 0
    config.keep_checkpoints = 2
    return config
