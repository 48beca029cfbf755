"""Ministral 3's cascade (Mistral AI, arXiv 2601.08584): Mistral Small 3.1 24B → 14B → 8B → 3B,
each child pruned from the previous child and distilled from the root, forward KL on logits;
then each size extended from 16k to 256k positions with YaRN (arXiv 2309.00071) and the query
scale, in a context stage of its own (`<size>_long`).

    python -m experiments.plan --config configs/ministral3.py --mesh.fsdp=64 \
        --config.data.seq_len=4096 --config.data.batch_size=64       # memory/FLOPs, no params
    python -m experiments.plan --config configs/ministral3.py:262144 --mesh.fsdp=64 \
        --stages=ministral_3b_long --flops=false                       # the 3B at 262k tokens
    python -m experiments.cascade --config configs/ministral3.py \
        --config.root.path=/ckpt/Mistral-Small-3.1-24B-Base-2503 \
        --config.data.source='text:/data/**/*.txt' \
        --config.data.tokenizer=/ckpt/Mistral-Small-3.1-24B-Base-2503

The root is the released directory as is (`root.kind='hf'`): `hf.load` reads the
`Mistral3ForConditionalGeneration` wrapper's text model and leaves the vision tower on disk.

Where the figures come from (the Ministral 3 report, arXiv 2601.08584, and Mistral Small 3.1's
released config.json):
- Shapes (paper): parent 40 layers / d_model 5120 / FFN 32768, 32 query and 8 KV heads of 128,
  vocabulary 131072; children 14B (40 / 5120 / 16384), 8B (34 / 4096 / 14336), 3B (26 / 3072 /
  9216, tied embeddings). No head pruning at any size.
- Each child is pruned from the previous child; the pretraining teacher is Mistral Small 3.1,
  the root, at every stage (a stronger teacher, Mistral Medium 3, was slightly worse).
- Layers kept by the norm ratio E‖block out‖ / ‖block in‖ ('norm_ratio'); the hidden dimension
  by one PCA rotation of the residual stream ('pca'); FFN neurons by mean |SiLU(xW1)·(xW3)|
  (the importance pass scores neurons by activation either way).
- Loss: forward KL on logits only (T = 1, no cross-entropy term).
- Distillation context 16k tokens; each size then extended to 256k with YaRN and the
  position-dependent query scale (Llama 4's attention temperature), 1–3T tokens in total, the
  data mix traversed once across the stages.
- rope_theta 1e9, RMSNorm eps 1e-5, untied embeddings, max_position_embeddings 131072: Mistral
  Small 3.1's own config.json. The released sizes' RoPE (their config.json): YaRN factor 16 over
  original_max_position_embeddings 16384 (beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim
  1), llama_4_scaling_beta 0.1, max_position_embeddings 262144; rope_theta 1e9 for the 14B and
  1e6 for the 8B and 3B. Each `<size>_long` stage sets exactly that (`ROPE_THETA`, `YARN`), so
  its child exports as the released model's `Ministral3ForCausalLM` config.

Our choices, not the paper's (it gives no per-stage split, batch or learning rate):
- 1T tokens (the low end) split evenly over the three stages, a global batch of 256 × 16384
  tokens (4.2M), so each stage is 79,472 steps; AdamW peak lr 1e-4 with 2,000 warmup steps and
  cosine decay to 10%.
- bf16 matmuls with float32 master params and optimizer state; every block rematerialised
  (root.model's dtype/param_dtype/remat apply to the loaded root, and children inherit them);
  4 micro-batches per step; attention in blocks of 2048 queries (the whole 16k × 16k float32
  score matrix would be ~34 GiB per row).
- The 3B's tied embeddings (the 8B's are untied): the 3B keeps the 8B's rotated input
  embedding as its head too and the 8B's head is dropped; the final norm scale, which the PCA
  cut folds into the head, returns as its diagonal in the rotated basis (prune.surgery).
- Mesh: parameters sharded 64 ways (d_model 5120, 4096 and 3072 are all multiples of 64); data
  parallelism takes the remaining devices (data=-1).
- The context stages: each size is extended from its 16k distillation (the next size is pruned
  from the 16k model, not the extended one), by KD from the root on rows of 131072 tokens, the
  root's own context (its targets beyond it would be its untrained extrapolation, which a
  context stage refuses), 64 rows a step (one per device on 64 chips), 20B tokens per size
  (2384 steps), attention in blocks of 256 queries. `get_config('262144')` (the command line's
  `configs/ministral3.py:262144`) plans and trains them on 262144-token rows instead, with
  cross-entropy on the text (no teacher takes those rows).
"""

import ml_collections
from ml_collections.config_dict import placeholder

VOCAB = 131072
TOTAL_TOKENS = 1_000_000_000_000  # the low end of the paper's 1–3T, over all stages
SEQ_LEN = 16384                   # the paper's distillation context
BATCH_SIZE = 256                  # global rows per step (ours)
GRAD_ACCUM = 4                    # micro-batches per step: 1 row per device on a 64-chip pod
ATTENTION_CHUNK = 2048            # queries per attention block: [.., 2048, .., 16384] scores
STAGES = {  # name -> (parent, n_layers, d_model, d_ff, tied embeddings)
    "ministral_14b": ("root", 40, 5120, 16384, False),
    "ministral_8b": ("ministral_14b", 34, 4096, 14336, False),
    "ministral_3b": ("ministral_8b", 26, 3072, 9216, True),
}
ROOT_CONTEXT = 131072             # Mistral Small 3.1's max_position_embeddings
CONTEXT = 262144                  # the released sizes' max_position_embeddings (16 × 16384)
ROPE_THETA = {"ministral_14b": 1e9, "ministral_8b": 1e6, "ministral_3b": 1e6}
YARN = dict(kind="yarn", factor=16.0, original_max_position_embeddings=SEQ_LEN, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
QUERY_SCALE_BETA = 0.1            # llama_4_scaling_beta
LONG_TOKENS = 20_000_000_000      # per size (ours: the paper gives no split)
LONG_BATCH = 64                   # rows per step of a context stage: one per device on 64 chips
LONG_CHUNK = 256                  # queries per attention block at 131k–262k tokens


def _stage_steps() -> int:
    """Steps per stage: the token budget split evenly, at BATCH_SIZE × SEQ_LEN tokens a step."""
    return TOTAL_TOKENS // len(STAGES) // (BATCH_SIZE * SEQ_LEN)


def _target(n_layers: int, d_model: int, d_ff: int, tied: bool) -> ml_collections.ConfigDict:
    """The child's shape; heads are kept (placeholders = None = the parent's value)."""
    return ml_collections.ConfigDict(dict(
        n_layers=n_layers, d_model=d_model, d_ff=d_ff,
        n_heads=placeholder(int), n_kv_heads=placeholder(int), tie_embeddings=tied))


def _stage(parent: str, n_layers: int, d_model: int, d_ff: int, tied: bool
           ) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        parent=parent, teacher="root", init="pruned", objective="kd",
        target=_target(n_layers, d_model, d_ff, tied),
        kd=dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=512),
        depth_method="norm_ratio", head_method="within_group", hidden_method="pca",
        steps=_stage_steps(), optim=dict(lr=1e-4, warmup_steps=2000, min_lr_ratio=0.1),
        calib_batches=64, grad_accum=GRAD_ACCUM, baseline=False))


def _long_stage(name: str, rows: int) -> ml_collections.ConfigDict:
    """`name` extended to CONTEXT positions with its released RoPE, on rows of `rows` tokens:
    KD from the root where the root takes them, cross-entropy beyond."""
    stage = ml_collections.ConfigDict(dict(
        parent=name, teacher="root", init="parent", objective="kd" if rows <= ROOT_CONTEXT
        else "ce", target=_target(None, None, None, None),
        context=dict(max_seq_len=CONTEXT, rope_theta=ROPE_THETA[name], rope_scaling=YARN,
                     query_scale_beta=QUERY_SCALE_BETA, seq_len=rows, batch_size=LONG_BATCH,
                     attention_chunk=LONG_CHUNK),
        steps=LONG_TOKENS // (LONG_BATCH * rows),
        optim=dict(lr=3e-5, warmup_steps=100, min_lr_ratio=0.1),
        calib_batches=1, grad_accum=1, baseline=False))
    stage[stage.objective] = (dict(kind="forward_kl", temperature=1.0, alpha=1.0,
                                   chunk_size=512) if stage.objective == "kd"
                              else dict(chunk_size=512))  # logits 512 positions at a time
    return stage


def get_config(long_rows: str = "") -> ml_collections.ConfigDict:
    """The cascade; `long_rows` (`--config=configs/ministral3.py:262144`) sets the context
    stages' row length (default: the root's context, ROOT_CONTEXT)."""
    rows = int(long_rows) if long_rows else ROOT_CONTEXT
    config = ml_collections.ConfigDict()
    config.workdir = "runs/ministral3"
    config.seed = 0

    # The root is Mistral Small 3.1 base, read from its released Hugging Face directory as is
    # (the Mistral3ForConditionalGeneration wrapper; its text model is read, the vision tower
    # left on disk). `model` describes it for experiments.plan, which allocates nothing; the
    # cascade reads the shape from `path` and takes only the runtime fields from `model`.
    config.root = ml_collections.ConfigDict(dict(
        kind="hf",
        path="",
        model=dict(vocab_size=VOCAB, d_model=5120, n_layers=40, n_heads=32, n_kv_heads=8,
                   head_dim=128, d_ff=32768, rope_theta=1e9, norm_eps=1e-5,
                   tie_embeddings=False, max_seq_len=ROOT_CONTEXT, dtype="bfloat16",
                   param_dtype="float32", remat=True, attention_chunk=ATTENTION_CHUNK),
    ))

    config.data = ml_collections.ConfigDict(dict(
        source="",            # set it: 'text:<glob>', 'jsonl:<glob>' or 'npy:<path>'
        tokenizer="",         # set it: the root's tokenizer.json (or the root directory)
        seq_len=SEQ_LEN,
        batch_size=BATCH_SIZE,
        cache_dir="",
    ))

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=64, tensor=1))

    # Stages run in stage_order (a ConfigDict iterates its keys sorted, not as written); each
    # size's context stage right after it.
    config.stage_order = tuple(n for name in STAGES for n in (name, f"{name}_long"))
    config.stages = ml_collections.ConfigDict()
    for name, (parent, n_layers, d_model, d_ff, tied) in STAGES.items():
        config.stages[name] = _stage(parent, n_layers, d_model, d_ff, tied)
        config.stages[f"{name}_long"] = _long_stage(name, rows)

    config.log_every = 50
    config.eval_every = 2000
    config.eval_batches = 64
    config.eval_micro_batches = GRAD_ACCUM  # evaluation rows, like training's, one at a time
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    return config
