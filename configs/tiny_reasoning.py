"""The tiny reasoning cascade (the README's second main job): does a teacher's *reasoning*
transfer to a pruned child, and which kind of distillation carries it best?

A ~1M-parameter root learns the built-in verifiable task (chained single-digit arithmetic
mod 10 with step-by-step traces, `cascade_jax.tasks.ChainArithmetic`, character tokens) by
`sft`. One pruned child is then trained five ways from the same pruned weights, each on about
the same number of completion tokens (≈ 0.1M, 7% of the root's: distillation budgets are a
small fraction of pre-training, Minitron arXiv 2407.14679). Steps differ so tokens match:
an answers-only row packs fewer completion tokens, and `on_policy` keeps one pair per row.
The `tokens` column says what each counted:

  child_kd              soft labels: the teacher's distribution on the task's reference traces
  child_seq_kd          hard labels: the teacher's own sampled traces, verifier-correct only
                        (R1-style rejection sampling)
  child_seq_kd_answers  the same kind of samples with the traces stripped (final answers only)
  child_on_policy       GKD: half the steps on the student's own samples, graded by the
                        teacher token by token (generalized JSD, β = 0.5)
  child_pruned_sft      baseline: the pruned child on the reference traces, no teacher
  child_random_sft      baseline: the child's shape from random init, no teacher

and a co-distilled pair (Anil et al. 2018, arXiv 1804.03235): the depth-pruned child and a
width-pruned child of about the same size (`child_codistill_depth`, `child_codistill_width`)
trained together, each on CE plus α·KL to the other's prediction, against the same two
trained alone with `sft` on the same steps (`child_pruned_sft`, `child_width_sft`);
then a grandchild from `child_kd` by `kd`, and each distilled size (child_kd, grandchild) in
Ministral 3's three variants: the base (as distilled), `<size>_instruct` (online DPO judged
by the task's verifier) and `<size>_reasoning` (GRPO with Magistral's settings, then online
DPO; `<size>_reasoning_grpo` is its first half). Every model is scored by generation: greedy pass@1
on held-out 2–4-step problems and on the harder 5–6-step split (`task_accuracy.png`).

    python -m experiments.cascade --config configs/tiny_reasoning.py
    python -m experiments.cascade --config configs/tiny_reasoning.py:quick   # CI smoke run

`:quick` (the argument of `get_config`) shrinks every stage to a few steps and few samples:
it proves the pipeline, not the figures (the README's come from the full run).
"""

import ml_collections

ROOT_STEPS = 800
STAGE_STEPS = 80  # ≈ 1300 completion tokens per step of packed traces
# completion tokens per step relative to packed traces (measured: answers-only rows 0.41,
# one pair per row 0.51), so these stages get more steps for the same tokens
STEPS_FOR_EQUAL_TOKENS = {"answers_only": 195, "one_pair_per_row": 155}
CHILD = dict(n_layers=3, d_ff=384)
GRANDCHILD = dict(n_layers=2, d_model=96, d_ff=256)

# The settings block of each objective (`stages.<name>.<objective>`), validated by it.
OBJECTIVE_SETTINGS = {
    "kd": dict(kind="forward_kl", temperature=1.0, alpha=1.0, chunk_size=64),
    "sft": {},
    "seq_kd": dict(samples_per_prompt=2, prompts=2048, temperature=1.0, keep="correct",
                   source=""),  # '' samples the teacher; a JSONL or teacher_data directory
    "on_policy": dict(kind="jsd", beta=0.5, student_fraction=0.5, off_policy="data",
                      sample_temperature=1.0, chunk_size=64),
    # post-training variants (Ministral 3's instruct and reasoning recipes, at our scale).
    # A judge model instead of the verifier (judge="model": the stage's teacher compares each
    # pair of samples, cascade_jax.objectives.judge) is off here: the teacher of these stages
    # (the distilled model itself) never learned to compare, and its 64 tokens hold two
    # completions only when they are cut short. To try it: judge="model",
    # max_new_tokens=26, judge_template="{prompt}{a}#{b}", judge_labels=("1", "2") (the
    # task's alphabet), judge_max_new_tokens=1 (1 + 10 + 2 × 26 + 1 = 64 tokens: template,
    # longest problem, two completions, verdict).
    "preference": dict(loss="dpo", beta=0.1, samples_per_prompt=2, judge="verifier",
                       sample_temperature=1.0, chunk_size=64, source=""),
    "grpo": dict(preset="magistral", group_size=8, sample_temperature=1.0, chunk_size=64),
    "codistill": dict(group="pair", alpha=0.5, refresh_every=0, kind="forward_kl",
                      chunk_size=64),
}
# A second child shape of about the same size, pruned in width only (for co-distillation)
WIDTH_CHILD = dict(n_layers=None, d_ff=256)  # all 4 layers kept
POSTTRAIN_STEPS = 40
POSTTRAIN_OPTIM = dict(lr=3e-4, warmup_steps=5, min_lr_ratio=0.1)


def _variants(size: str) -> dict:
    """`<size>_instruct` (online DPO judged by the verifier) and `<size>_reasoning` (GRPO,
    Magistral's settings, then online DPO), each starting from the distilled `<size>` as is."""
    def posttrain(objective: str, parent: str) -> dict:
        stage = _stage(objective, parent=parent, teacher=parent, init="parent",
                       steps=POSTTRAIN_STEPS, optim=dict(POSTTRAIN_OPTIM))
        stage["target"] = {}  # the parent's shape, unchanged
        return stage

    return {f"{size}_instruct": posttrain("preference", size),
            f"{size}_reasoning_grpo": posttrain("grpo", size),
            f"{size}_reasoning": posttrain("preference", f"{size}_reasoning_grpo")}


def _stage(objective: str, **fields) -> dict:
    stage = dict(
        parent="root", teacher="root", init="pruned", objective=objective,
        target=dict(CHILD), depth_method="block_influence", head_method="within_group",
        hidden_method="channel", steps=STAGE_STEPS,
        optim=dict(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1), calib_batches=4, grad_accum=1,
        baseline=False)
    stage[objective] = dict(OBJECTIVE_SETTINGS[objective])
    for name, value in fields.items():
        stage[name] = {**stage[name], **value} if isinstance(value, dict) else value
    return stage


def get_config(mode: str = "") -> ml_collections.ConfigDict:
    if mode not in ("", "quick"):
        raise ValueError(f"configs/tiny_reasoning.py:{mode}: the only mode is ':quick'")
    quick = mode == "quick"
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny_reasoning_quick" if quick else "runs/tiny_reasoning"
    config.seed = 0

    config.task = dict(kind="chain_arithmetic", min_steps=2, max_steps=4, harder_steps=2,
                       n_train=50_000, n_validation=256, eval_problems=256, eval_samples=1)
    config.root = dict(
        kind="scratch", path="",
        model=dict(vocab_size=20, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                   head_dim=32, d_ff=512, rope_theta=10000.0, norm_eps=1e-5,
                   tie_embeddings=True, max_seq_len=64, dtype="float32",
                   param_dtype="float32"),
        steps=ROOT_STEPS, optim=dict(lr=3e-3, warmup_steps=100, min_lr_ratio=0.1))
    config.data = dict(source="task", tokenizer="chars", seq_len=64, batch_size=32,
                       cache_dir="")
    config.mesh = dict(data=-1, fsdp=1, tensor=1)

    stages = dict(
        child_kd=_stage("kd"),
        child_seq_kd=_stage("seq_kd"),
        child_seq_kd_answers=_stage("seq_kd", seq_kd=dict(answers_only=True, prompts=4096),
                                    steps=STEPS_FOR_EQUAL_TOKENS["answers_only"]),
        child_on_policy=_stage("on_policy", steps=STEPS_FOR_EQUAL_TOKENS["one_pair_per_row"]),
        child_pruned_sft=_stage("sft", baseline=True),
        child_random_sft=_stage("sft", init="random", baseline=True),
        grandchild=_stage("kd", parent="child_kd", teacher="child_kd", target=GRANDCHILD),
        # co-distillation: the depth-pruned child (child_pruned_sft's shape) and a
        # width-pruned one trained together, each on CE + α·KL to the other; alone, each is
        # child_pruned_sft / child_width_sft (the same steps and data)
        child_codistill_depth=_stage("codistill"),
        child_codistill_width=_stage("codistill", target=WIDTH_CHILD),
        child_width_sft=_stage("sft", target=WIDTH_CHILD, baseline=True),
        **_variants("child_kd"),
        **_variants("grandchild"),
    )
    if quick:
        config.root["steps"] = 40
        config.root["optim"]["warmup_steps"] = 5
        for stage in stages.values():
            stage["steps"] = 6
            stage["optim"]["warmup_steps"] = 2
            stage["calib_batches"] = 1
        for name in ("child_seq_kd", "child_seq_kd_answers"):
            stages[name]["seq_kd"].update(prompts=64, keep="all")
        config.task.update(n_train=2000, n_validation=64, eval_problems=32)
    config.stage_order = tuple(stages)
    config.stages = stages

    config.log_every = 25
    config.eval_every = 0 if quick else 40
    config.eval_batches = 4
    config.eval_micro_batches = 1
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    return ml_collections.ConfigDict(config)
