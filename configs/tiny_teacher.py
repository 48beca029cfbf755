"""Tiny teacher: a ~4M-parameter Mistral-shaped decoder trained from scratch on the built-in
corpus (the Python standard library's source) in about ten minutes on a 2-core CPU.

    python -m experiments.train --config configs/tiny_teacher.py
    python -m experiments.train --config configs/tiny_teacher.py --config.steps=50 \
        --config.workdir=/tmp/smoke
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny_teacher"
    config.seed = 0

    # ModelConfig fields (cascade_jax.config). vocab_size must be >= the tokenizer's.
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
        d_ff=768, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=256,
        dtype="float32", param_dtype="float32", remat=False))

    config.data = ml_collections.ConfigDict(dict(
        source="builtin",      # the stdlib corpus; or "text:<glob>", "jsonl:<glob>", "npy:<path>"
        tokenizer="builtin",   # or the path of a Hugging Face tokenizer.json
        seq_len=256,
        batch_size=16,         # global: split across hosts
        cache_dir="",          # "" = $CASCADE_JAX_CACHE or ~/.cache/cascade_jax
    ))

    config.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=40, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
        clip_norm=1.0))

    config.steps = 400
    config.log_every = 10
    config.eval_every = 100
    config.eval_batches = 16     # 0 = the whole validation split
    config.checkpoint_every = 100
    config.keep_checkpoints = 2

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
