"""Llama-3.1-Minitron 4B (NVIDIA, arXiv 2408.11796; method arXiv 2407.14679): Llama-3.1-8B pruned
to two 4B children, one by width and one by depth, each distilled from the 8B with forward KL.

    python -m experiments.plan --config configs/minitron_llama31.py --mesh.fsdp=8
    python -m experiments.cascade --config configs/minitron_llama31.py \
        --config.root.path=/ckpt/llama-3.1-8b --config.data.source='text:/data/**/*.txt' \
        --config.data.tokenizer=/ckpt/llama-3.1-8b

Where the figures come from:
- Parent, Llama-3.1-8B's config.json: 32 layers, d_model 4096, d_ff 14336, 32 query / 8 KV
  heads of 128, vocabulary 128256, rope_theta 500000 with Llama 3.1's 'llama3' RoPE scaling
  (factor 8, low/high frequency factors 1/4, original length 8192), untied embeddings,
  RMSNorm eps 1e-5.
- Children (the released Llama-3.1-Minitron-4B-Width-Base / -Depth-Base): width keeps the 32
  layers and all heads and cuts d_model to 3072 and d_ff to 9216 (4.51B parameters); depth
  keeps width and drops 16 of the 32 layers as one contiguous block (4.54B).
- Importance from one forward pass over calibration samples (Minitron, arXiv 2407.14679: ~1024;
  here 128 batches of 8 × 8192 tokens): neurons by activation, embedding channels by the
  RMSNorm output, aggregated (L2 over batch, mean over sequence); depth by block influence,
  removing the contiguous block that costs least ('contiguous').
- Distillation: forward KL on logits alone, T = 1 (arXiv 2407.14679: KL alone 2.107 LM loss vs
  2.117 with CE added). 94B distillation tokens per child (the models' cards), 8k context.

Our choices, not the papers': a global batch of 512 × 8192 tokens (so 22,411 steps for 94B
tokens), AdamW peak lr 1e-4 with 100 warmup steps and cosine decay to 10%, bf16 matmuls with
float32 master params, every block rematerialised.

Not done here:
- Teacher correction (briefly fine-tune the 8B on the distillation data first; > 6% lower
  student validation loss per arXiv 2408.11796): train the root on the data, then use it as `root`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

SEQ_LEN = 8192
BATCH_SIZE = 512                 # global rows per step (ours)
TOKENS_PER_CHILD = 94_000_000_000


def _target(**dims: int) -> ml_collections.ConfigDict:
    """A child's shape; unnamed dimensions are placeholders (None keeps the parent's)."""
    names = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads")
    return ml_collections.ConfigDict({name: dims.get(name, placeholder(int)) for name in names})


def _stage(target: ml_collections.ConfigDict, **fields: str) -> ml_collections.ConfigDict:
    stage = dict(
        parent="root", teacher="root", init="pruned", objective="kd", target=target,
        kd=dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=512),
        depth_method="block_influence", head_method="within_group", hidden_method="channel",
        steps=TOKENS_PER_CHILD // (BATCH_SIZE * SEQ_LEN),
        optim=dict(lr=1e-4, warmup_steps=100, min_lr_ratio=0.1),
        calib_batches=128, grad_accum=1, baseline=False)
    stage.update(fields)
    return ml_collections.ConfigDict(stage)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "runs/minitron_llama31"
    config.seed = 0

    # Llama-3.1-8B from a Hugging Face directory; `model` is its shape for experiments.plan.
    config.root = ml_collections.ConfigDict(dict(
        kind="hf",
        path="",
        model=dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   head_dim=128, d_ff=14336, rope_theta=500000.0, norm_eps=1e-5,
                   rope_scaling=(8.0, 1.0, 4.0, 8192),
                   tie_embeddings=False, max_seq_len=SEQ_LEN, dtype="bfloat16",
                   param_dtype="float32", remat=True),
    ))

    config.data = ml_collections.ConfigDict(dict(
        source="",      # set it: 'text:<glob>', 'jsonl:<glob>' or 'npy:<path>'
        tokenizer="",   # set it: Llama 3.1's tokenizer.json (or its directory)
        seq_len=SEQ_LEN,
        batch_size=BATCH_SIZE,
        cache_dir="",
    ))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=8, tensor=1))

    # Both children are cut from the 8B itself (siblings, not a chain).
    config.stage_order = ("minitron_4b_width", "minitron_4b_depth")
    config.stages = ml_collections.ConfigDict()
    config.stages.minitron_4b_width = _stage(_target(d_model=3072, d_ff=9216))
    config.stages.minitron_4b_depth = _stage(_target(n_layers=16), depth_method="contiguous")

    config.log_every = 50
    config.eval_every = 1000
    config.eval_batches = 64
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    return config
