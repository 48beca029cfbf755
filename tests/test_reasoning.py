"""Reasoning transfer: scores by generation, the teacher-sample dataset of `seq_kd` (resumable,
verified), `on_policy` (GKD) batches and steps, and both objectives as cascade stages."""

import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from cascade_jax import (
    cascade,
    data,
    evaluate,
    generate,
    loop,
    model,
    objectives,
    prompts,
    runconfig,
    rundir,
    sharding,
    steps,
    tasks,
    teacher_data,
)
from cascade_jax.config import ModelConfig
from cascade_jax.objectives import StageContext, Trained
from tests import killed_runs
from tests.test_prompts import task_config

TASK = tasks.ChainArithmetic(min_steps=1, max_steps=2)
TOKENIZER = tasks.char_tokenizer(TASK.alphabet)
EOS = data.eos_id(TOKENIZER)
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                  d_ff=64, max_seq_len=32, tie_embeddings=True)
PARAMS = model.init(CFG, jax.random.key(0))
SEQ_LEN, ROWS = 32, 8


# ------------------------------------------------------------------ scores by generation


def _completions(texts_R: list[str], width: int = 12) -> generate.Completions:
    """Completions holding `texts_R` (each ended by EOS), as the sampler returns them."""
    ids = [[*prompts.encode_completions(TOKENIZER, [t])[0].tolist(), EOS] for t in texts_R]
    tokens = np.zeros((len(ids), width), np.int32)
    for r, row in enumerate(ids):
        tokens[r, :len(row)] = row
    return generate.Completions(tokens, np.asarray([len(r) for r in ids], np.int32),
                                np.zeros((len(ids), width), np.float32))


def test_task_scores_judge_greedy_and_k_samples_as_a_hand_count(monkeypatch):
    problems = [tasks.Problem("1+2=", "1+2=3;#3", "3"), tasks.Problem("4*2=", "4*2=8;#8", "8")]
    greedy = ["1+2=3;#3", "4*2=7"]                  # right; no answer line (not well formed)
    drawn = ["#3", "#4", "#4",                      # majority 4 (wrong), one right: pass@3
             "#8", "#1", "#8"]                      # majority 8 (right)
    calls = []

    def fake_sample(cfg, params, prompts_R, sampling, **kwargs):
        calls.append(sampling)
        assert [p.tolist() for p in prompts_R] == [
            p.tolist() for p in prompts.encode_prompts(TOKENIZER, ["1+2=", "4*2="])]
        return _completions(greedy if sampling.temperature == 0 else drawn)

    monkeypatch.setattr(evaluate, "sample_in_chunks", fake_sample)
    scores = evaluate.task_scores(CFG, PARAMS, TASK, TOKENIZER, problems, samples=3,
                                  temperature=0.7, rng=jax.random.key(0), max_new_tokens=12)
    assert scores == {"pass@1": 0.5, "well_formed": 0.5, "length": (9 + 6) / 2,
                      "maj@3": 0.5, "pass@3": 1.0}
    assert [(s.temperature, s.n, s.stop_tokens) for s in calls] == [(0.0, 1, (EOS,)),
                                                                    (0.7, 3, (EOS,))]


def test_sample_in_chunks_equals_one_call_and_compiles_one_bucket():
    prompts_R = prompts.encode_prompts(TOKENIZER, [p.prompt for p in
                                                   TASK.make_problems("train", 11, 0)])
    sampling = generate.SamplingParams(6, temperature=0.0, stop_tokens=(EOS,))
    whole = generate.generate(CFG, PARAMS, prompts_R, sampling)
    before = generate._sampler.cache_info().misses
    chunked = evaluate.sample_in_chunks(CFG, PARAMS, prompts_R, sampling, chunk=4)
    assert generate._sampler.cache_info().misses - before <= 1  # 4, 4, 3 (padded to 4)
    np.testing.assert_array_equal(whole.tokens, chunked.tokens)
    np.testing.assert_array_equal(whole.lengths, chunked.lengths)
    np.testing.assert_allclose(whole.logprobs, chunked.logprobs, atol=1e-5)  # other buckets


# ------------------------------------------------------------- seq_kd: the teacher's samples


def _write(directory, problems, **kwargs):
    sampling = generate.SamplingParams(8, temperature=1.0, n=2, stop_tokens=(EOS,))
    return teacher_data.write(str(directory), CFG, PARAMS, problems, TOKENIZER, sampling,
                              rng=jax.random.key(3), task=TASK, teacher="t0",
                              prompts_per_part=4, progress=False, **kwargs)


def test_teacher_samples_killed_mid_write_resume_with_every_row_once(tmp_path, monkeypatch):
    problems = TASK.make_problems("train", 10, 0)  # parts of 4, 4, 2 prompts
    reference = _write(tmp_path / "whole", problems)
    whole = teacher_data.read(str(tmp_path / "whole"))

    class Killed(Exception):
        pass

    def kill_after_first(part):
        if part == 0:
            raise Killed
    with pytest.raises(Killed):
        _write(tmp_path / "cut", problems, on_part=kill_after_first)
    assert sorted(os.listdir(tmp_path / "cut")) == ["part-00000.jsonl", "spec.json"]
    (tmp_path / "cut" / "part-00001.jsonl.tmp").write_text('{"half": ')  # a torn write

    sampled = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate",
                        lambda cfg, params, p, *a, **k: sampled.append(len(p)) or
                        real(cfg, params, p, *a, **k))
    manifest = _write(tmp_path / "cut", problems)
    assert sampled == [4, 2]  # only the missing parts were sampled
    resumed = teacher_data.read(str(tmp_path / "cut"))
    assert resumed == whole  # every row once, the same as a run never killed
    assert [(r.prompt, r.sample) for r in resumed] == [(p.prompt, j) for p in problems
                                                        for j in range(2)]
    correct = sum(bool(r.correct) for r in resumed)
    assert manifest == reference
    assert manifest["rows"] == 20 and manifest["kept"]["correct"] == correct
    assert manifest["dropped"]["correct"] == 20 - correct
    stored = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert stored == manifest
    teacher_data.check_rows(resumed, TOKENIZER, CFG.vocab_size)  # ids decode to the text
    for row in resumed:  # the verifier's judgement, and the exact ids, as written
        assert row.correct == TASK.score(row.prompt, row.completion).correct
        assert TOKENIZER.decode([t for t in row.completion_ids if t != EOS]) == row.completion


def test_teacher_samples_of_other_settings_are_refused(tmp_path):
    problems = TASK.make_problems("train", 4, 0)
    _write(tmp_path, problems)
    with pytest.raises(ValueError, match=r"other settings.*'prompts'.*delete"):
        _write(tmp_path, TASK.make_problems("train", 3, 0))


def test_training_pairs_keep_correct_answers_only_and_external_files(tmp_path):
    path = tmp_path / "teacher.jsonl"
    rows = [{"prompt": "1+2=", "completion": "1+2=3;#3"},    # right
            {"prompt": "4*2=", "completion": "4*2=9;#9"},    # wrong
            {"prompt": "5-1=", "completion": "5-1=4"}]       # no answer line
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = teacher_data.judged(teacher_data.read(str(path)), TASK)
    assert [(r.correct, r.well_formed) for r in judged] == [(True, True), (False, True),
                                                            (False, False)]
    with pytest.raises(ValueError, match="judge them first"):
        teacher_data.training_pairs(teacher_data.read(str(path)), TOKENIZER, keep="correct")

    def texts(pairs):
        return [(TOKENIZER.decode(pairs.prompts[i].tolist()),
                 TOKENIZER.decode(pairs.completions[i][:-1].tolist())) for i in range(len(pairs))]

    assert texts(teacher_data.training_pairs(judged, TOKENIZER, keep="correct")) == [
        ("1+2=", "1+2=3;#3")]
    assert texts(teacher_data.training_pairs(judged, TOKENIZER, keep="well_formed",
                                             answers_only=True)) == [("1+2=", "#3"),
                                                                     ("4*2=", "#9")]
    everything = teacher_data.training_pairs(judged, TOKENIZER)
    assert len(everything) == 3 and all(c[-1] == EOS for c in
                                        (everything.completions[i] for i in range(3)))


# ------------------------------------------------------------------ on_policy (GKD)


def _context(settings_block, **kwargs):
    mesh = sharding.make_mesh(data=-1)
    objective = objectives.get("on_policy")
    student_cfg = CFG
    teacher = Trained("root", CFG, model.init(CFG, jax.random.key(1)), "root", "fp")
    return objective, StageContext(
        stage_name="gkd", student=student_cfg, child_params=PARAMS, teacher=teacher,
        settings=objective.parse_settings(settings_block, "stages.gkd.on_policy"), mesh=mesh,
        optimizer=steps.make_optimizer(lr=1e-3, total_steps=10, warmup_steps=1),
        rng=jax.random.key(5), grad_accum=1, train_batches=lambda: iter(()), task=TASK,
        tokenizer=TOKENIZER, seed=0,
        data=data.DataConfig(source="task", tokenizer="chars", seq_len=SEQ_LEN,
                             batch_size=ROWS), **kwargs)


def test_on_policy_with_lambda_zero_is_kd_on_the_same_rows():
    objective, ctx = _context(dict(kind="jsd", beta=0.3, student_fraction=0.0, prompts=64,
                                   chunk_size=16))
    built = objective.build(ctx)
    batch = next(built.batches)
    state = built.make_state()
    assert built.prepare_batch(state, batch) is batch  # λ = 0, off-policy from the data
    kd = objectives.get("kd")
    kd_built = kd.build(ctx.__class__(**{**ctx.__dict__, "settings": ctx.settings.loss}))
    _, ours = built.step_fn(state, sharding.shard_batch(batch, ctx.mesh))
    _, theirs = kd_built.step_fn(kd_built.make_state(), sharding.shard_batch(batch, ctx.mesh))
    for name in ("loss_sum", "kd_sum", "count"):
        np.testing.assert_allclose(float(ours[name]), float(theirs[name]), rtol=1e-6)
    # completion tokens only: one per completion token and EOS of each row's pair
    assert float(ours["count"]) == batch["loss_mask"].sum()


def test_on_policy_samples_the_student_into_rows_and_compiles_its_sampler_once():
    objective, ctx = _context(dict(kind="reverse_kl", student_fraction=1.0, prompts=64,
                                   max_new_tokens=10, chunk_size=16))
    built = objective.build(ctx)
    state = built.make_state()
    sampling = generate.SamplingParams(10, temperature=1.0, stop_tokens=(EOS,))
    compiled = 0
    for _ in range(3):
        batch = next(built.batches)
        step = int(state.step)
        student = jax.device_get(state.params)  # the state is donated to the step below
        before = generate._sampler.cache_info().misses
        prepared = built.prepare_batch(state, batch)
        compiled += generate._sampler.cache_info().misses - before
        # an independent call of the sampler: the same prompts, key and student params
        prompts_R = prompts.row_prompts(batch)
        expected = generate.generate(CFG, student, prompts_R, sampling,
                                     rng=jax.random.fold_in(ctx.rng, step))
        for r, prompt in enumerate(prompts_R):
            n, m = prompt.size, int(expected.lengths[r])
            np.testing.assert_array_equal(prepared["tokens"][r, :n], prompt)
            np.testing.assert_array_equal(prepared["tokens"][r, n:n + m],
                                          expected.tokens[r, :m])
            mask = np.zeros(SEQ_LEN, np.int32)
            mask[n:n + m] = 1  # the completion, its stop token included; nothing after it
            np.testing.assert_array_equal(prepared["loss_mask"][r], mask)
            np.testing.assert_array_equal(prepared["segment_ids"][r] != 0,
                                          np.arange(SEQ_LEN) < n + m)
        state, metrics = built.step_fn(state, sharding.shard_batch(prepared, ctx.mesh))
        assert np.isfinite(float(metrics["loss_sum"]))
        assert float(metrics["count"]) == prepared["loss_mask"].sum()  # completions only
    assert compiled == 1  # one bucket: the sampler compiled at the first step only


# ------------------------------------ every sampling objective as a stage, and kill -9


def _reasoning_cascade(workdir) -> ml_collections.ConfigDict:
    """root → sft child (3 steps), seq_kd child, on_policy child; the seq_kd child → grpo,
    online DPO; and a codistilled pair: every objective that samples or trains in a group,
    4 steps each."""
    config = task_config(str(workdir))
    sft = config.stages.child.to_dict()
    child = {k: v for k, v in sft.items() if k != "sft"}
    posttrain = {**child, "parent": "child_seq_kd", "teacher": "child_seq_kd",
                 "init": "parent", "target": {}}
    pair = dict(group="pair", alpha=0.5, refresh_every=2, chunk_size=16)
    config.stages = dict(
        child=sft,
        child_seq_kd={**child, "objective": "seq_kd", "steps": 4,
                      "seq_kd": dict(samples_per_prompt=2, prompts=12, keep="all",
                                     prompts_per_part=8)},
        child_gkd={**child, "objective": "on_policy", "steps": 4,
                   "on_policy": dict(kind="jsd", beta=0.5, student_fraction=1.0, prompts=32,
                                     chunk_size=16)},
        child_grpo={**posttrain, "objective": "grpo", "steps": 4,
                    "grpo": dict(preset="magistral", group_size=4, prompts_per_step=2,
                                 prompts=16, chunk_size=16)},
        child_dpo={**posttrain, "objective": "preference", "steps": 4,
                   "preference": dict(samples_per_prompt=2, prompts=16, chunk_size=16)},
        deep={**child, "objective": "codistill", "steps": 4, "codistill": pair},
        wide={**child, "objective": "codistill", "steps": 4, "codistill": pair,
              "target": dict(d_ff=32)})
    config.stage_order = ("child", "child_seq_kd", "child_gkd", "child_grpo", "child_dpo",
                          "deep", "wide")
    config.checkpoint_every = 2
    config.keep_checkpoints = 2
    return config


def _check_sft_stage(config, results, directory):
    """`sft` as a stage: a smaller child, and the tokens it saw are completion tokens (the
    loss-mask count of the batches it consumed)."""
    rows = {r["stage"]: r for r in results}
    assert rows["child"]["params"] < rows["root"]["params"]
    assert all(np.isfinite(r["validation_loss"]) for r in results)
    batches = iter(cascade.run_datasets(runconfig.cascade_config(config), seed=0).train)
    assert rows["child"]["tokens"] == sum(loop.counted_tokens(next(batches)) for _ in range(3))
    assert json.loads((directory / "stage.json").read_text())["objective"] == "sft"
    train = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == [1, 2, 3]


def _stage_params(workdir, stage):
    mesh = sharding.make_mesh(data=-1)
    return jax.device_get(cascade.load_checkpoint_model(
        str(workdir / stage / "checkpoints"), mesh)[1])


def test_sampling_stages_resume_bit_identically_after_kill_9_at_each(tmp_path):
    """Each stage killed at its step-2 save (half written, or just committed), the run restarted
    each time: the rollouts, judge and sampler keys, teacher samples and the joint group state
    all come back, so every stage ends on the uninterrupted run's params to the bit."""
    config = _reasoning_cascade(tmp_path / "whole")
    whole = cascade.run(config, progress=False)
    assert [r["stage"] for r in whole] == ["root", "child", "child_seq_kd", "child_gkd",
                                           "child_grpo", "child_dpo", "deep", "wide"]
    _check_sft_stage(config, whole, tmp_path / "whole" / "child")
    for r in whole:  # scores by generation joined the table
        assert {"pass@1", "well_formed", "length", "pass@1_harder"} <= set(r)
    assert "pass@1_harder" in (tmp_path / "whole" / "results.md").read_text()
    assert (tmp_path / "whole" / "task_accuracy.png").exists()
    manifest = json.loads((tmp_path / "whole" / "child_seq_kd" / "teacher_data" /
                           "manifest.json").read_text())
    assert manifest["rows"] == 24 and manifest["parts"] == 2
    stage = json.loads((tmp_path / "whole" / "child_gkd" / "stage.json").read_text())
    assert stage["objective"] == "on_policy"

    killed = tmp_path / "killed"
    kills = [("child_seq_kd/checkpoints", "during"), ("child_gkd/checkpoints", "after"),
             ("child_grpo/checkpoints", "during"), ("child_dpo/checkpoints", "after"),
             ("pair_codistill/checkpoints", "during")]
    for kill_dir, when in kills:
        assert killed_runs.run_in_subprocess(__file__, "_reasoning_cascade", (str(killed),),
                                             kill_dir, 2, when) == -signal.SIGKILL
    cascade.run(_reasoning_cascade(killed), progress=False)  # the restart after the last kill
    for r in whole[1:]:
        jax.tree.map(np.testing.assert_array_equal, _stage_params(killed, r["stage"]),
                     _stage_params(tmp_path / "whole", r["stage"]))
    for x in whole:  # the same rows: losses, scores by generation, tokens seen
        y = json.loads((killed / x["stage"] / "result.json").read_text())
        assert {k: v for k, v in x.items() if k not in ("wall_s", "fingerprint")} == {
            k: v for k, v in y.items() if k not in ("wall_s", "fingerprint")}


def test_teacher_jsonl_values_are_typed_and_checked_against_the_tokenizer(tmp_path):
    """No truthiness ("false" is not false), no digits read one by one, no ids outside the
    vocabulary or of another text: each refused naming the file and line, before training."""
    path = tmp_path / "teacher.jsonl"
    ids = TOKENIZER.encode("1+2=3;#3").ids
    good = {"prompt": "1+2=", "completion": "1+2=3;#3", "completion_ids": ids}

    path.write_text("")
    seq_kd = objectives.get("seq_kd")
    settings = seq_kd.parse_settings({"source": str(path)}, "config.stages.s.seq_kd")

    def refused(change, message):
        """What `cascade.run` checks before the root trains (objectives.check_files)."""
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
        with pytest.raises(ValueError, match=rf"config.stages.s: .*{message}"):
            objectives.check_files("seq_kd", settings, TOKENIZER, seq_len=SEQ_LEN,
                                   vocab_size=CFG.vocab_size, key="config.stages.s")

    refused({"correct": "false"}, r"teacher.jsonl:2 correct='false' must be True or False")
    refused({"well_formed": 1}, r"teacher.jsonl:2 well_formed=1 must be True or False")
    refused({"completion_ids": "123"}, r"teacher.jsonl:2 completion_ids='123' must be a list "
                                       r"of integers")
    refused({"sample": -1}, r"teacher.jsonl:2 sample=-1 must be a non-negative integer")
    refused({"completion_ids": [*ids[:-1], 999]},
            r"teacher.jsonl:2 completion_ids: token id 999 at position \d+ is outside the "
            r"vocabulary \[0, 24\); give ids of the student's tokenizer")
    refused({"completion_ids": TOKENIZER.encode("1+2=4;#4").ids},
            r"teacher.jsonl:2: completion_ids decode to '1\+2=4;#4', not the line's completion "
            r"'1\+2=3;#3'")
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "completion_ids": None})
                    + "\n")
    pairs = teacher_data.training_pairs(teacher_data.read(str(path)), TOKENIZER)
    assert [c[:-1].tolist() for c in pairs.completions] == [ids, ids]


def test_teacher_samples_without_their_spec_are_not_adopted(tmp_path, tree_hash):
    (tmp_path / "part-00000.jsonl").write_text('{"prompt": "1+2=", "completion": "#3"}\n')
    before = tree_hash(tmp_path)
    with pytest.raises(rundir.WorkdirError, match=r"holds teacher samples \(part-00000.jsonl\) "
                                                  r"but no spec.json: .* not adopted; delete"):
        _write(tmp_path, TASK.make_problems("train", 4, 0))
    assert tree_hash(tmp_path) == before
