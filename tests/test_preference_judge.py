"""Online `preference` judged by a model (`judge='model'`, `objectives.judge`): the comparison
prompts are the template rendered, the verdicts are our sampler's (same key, parsed by hand),
a pair counts only when both orders agree, win rates pick chosen and rejected, agreement with
the verifier is a hand count, a step runs and a rebuilt stage judges the same.

Cost: the tiny model and rollouts of `test_grpo_preference` (the policy sampler's bucket is
theirs); the judge's sampler, its log-prob scorer and the step with judge columns compile once.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import generate, model, prompts, runconfig, steps
from cascade_jax.objectives import Trained, rollouts
from cascade_jax.objectives import judge as judges
from cascade_jax.objectives import preference as preference_objective
from tests.test_grpo_preference import (
    CFG,
    EOS,
    MESH,
    NEW,
    SEQ_LEN,
    TASK,
    TOKENIZER,
    _context,
    _init,
    _run,
)

LABELS = ("1", "2")
TEMPLATE = "{prompt}{a}#{b}"  # in the task's alphabet: its character tokenizer encodes it
JUDGE_BLOCK = dict(loss="odpo", alpha=0.5, beta=0.1, pairs_per_step=4, max_new_tokens=NEW,
                   prompts=64, overlong_buffer=NEW, judge="model", judge_template=TEMPLATE,
                   judge_labels=LABELS, judge_max_new_tokens=2, judge_temperature=1.0)
JUDGE_CFG = CFG.replace(tie_embeddings=False)
LONGEST = 6  # the task's longest 2-step prompt, 'd+d*d='


@functools.cache
def _judge_params():
    """A random judge that answers with a label: its head is zero but for hidden coordinate
    29, which votes '1' when positive and '2' when negative (±30 logits). The last token of a
    comparison (its second completion's last) sways that coordinate, so the two orders of a
    pair often differ: consistent verdicts, not only ties."""
    params = _init(1)  # the tied model's params, and an untied head
    kernel = np.zeros((JUDGE_CFG.d_model, JUDGE_CFG.vocab_size), np.float32)
    for label, sign in zip(LABELS, (1.0, -1.0), strict=True):
        kernel[29, TOKENIZER.token_to_id(label)] = 30.0 * sign
    return {**params, "lm_head": {"kernel": kernel}}


def _judge_context(block=None, **fields):
    teacher = Trained("judge", JUDGE_CFG, _judge_params(), "judge", "fp")
    objective, ctx = _context("preference", {**JUDGE_BLOCK, **(block or {})}, teacher=teacher)
    return objective, dataclasses.replace(ctx, **fields)


def _model_judge(block=None, **fields):
    _, ctx = _judge_context(block, **fields)
    return judges.model_judge(ctx, ctx.settings, judges.RolloutShape(NEW, LONGEST))


def _by_hand(text):
    """The verdict read by hand: '1' → A (0), '2' → B (1), else none."""
    text = text.strip()
    return 0 if text[:1] == "1" else 1 if text[:1] == "2" else -1


# ----------------------------------------------------------------------------- host side


def test_comparison_prompts_are_the_template_rendered():
    judge = _model_judge()
    assert judge.slots == len("#") + LONGEST + 2 * NEW  # template + longest problem + 2 answers
    problems = ["1+2=", "1+2=", "1+2=", "3*4=", "3*4=", "3*4="]
    answers = ["1+2=3;#3", "#4", "", "3*4=2;#2", "#7", "9"]
    comparisons, ids = judge.comparison_prompts(problems, answers, k=3)
    assert comparisons.pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    expected = []
    for x, y in comparisons.pairs:  # both orders of each pair, x first
        expected += [problems[x] + answers[x] + "#" + answers[y],
                     problems[x] + answers[y] + "#" + answers[x]]
    assert expected[:2] == ["1+2=1+2=3;#3##4", "1+2=#4#1+2=3;#3"]
    assert len(ids) == 12
    for got, text in zip(ids, expected, strict=True):
        np.testing.assert_array_equal(got, prompts.encode_prompts(TOKENIZER, [text])[0])
    # the default template: the problem, response A, response B, then the verdict cue
    assert judges.render(judges.DEFAULT_TEMPLATE, judges.DEFAULT_LABELS, "2+2=", "#4", "#5") == (
        "Problem:\n2+2=\n\nResponse A:\n#4\n\nResponse B:\n#5\n\n"
        "Which response is better, A or B?\nBetter response:")


def test_verdicts_parse_and_a_pair_counts_only_when_both_orders_agree():
    labels = ("A", "B")
    texts = ["A", " B.", "AB", "Both", "\nA is better", "C", "", "b"]
    assert [judges.parse_verdict(t, labels) for t in texts] == [0, 1, 0, 1, 0, -1, -1, -1]
    # [verdict with x as A, verdict with y as A]: A then B → x; B then A → y; else a tie
    verdicts = np.array([[0, 1], [1, 0], [0, 0], [1, 1], [-1, 1], [0, -1], [-1, -1]])
    assert judges.consistent_preference(verdicts).tolist() == [1, -1, 0, 0, 0, 0, 0]


def test_win_rates_pick_chosen_and_rejected_by_hand_count():
    # k = 3, two prompts; pairs (0,1) (0,2) (1,2) (3,4) (3,5) (4,5)
    pairs = judges.group_pairs(2, 3)
    # prompt 0: 1 beats 0, 2 beats 0, 1 beats 2 → wins 0, 2, 1 of 2; prompt 1: all ties
    comparisons = judges.Comparisons(pairs, np.array([-1, -1, 1, 0, 0, 0], np.int32))
    scores = judges.win_rates(comparisons, 6, 3)
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    rows = {k: np.arange(6)[:, None] * 10 + np.arange(2)[None] for k in
            preference_objective.SEQUENCE_KEYS}
    batch = preference_objective.online_pairs(rows, scores, 3)
    assert batch["tokens"][:, 0].tolist() == [10, 30]  # chosen: row 1; the tied prompt: row 3
    assert batch["rejected_tokens"][:, 0].tolist() == [0, 40]  # rejected: row 0; tied: row 4
    assert batch["pair_weight"][:, 0].tolist() == [1.0, 0.0]
    assert batch["score_chosen"][:, 0].tolist() == [1.0, 0.0]


def test_agreement_with_the_verifier_by_hand_count():
    pairs = judges.group_pairs(2, 3)
    verifier = np.array([1.0, 0.0, 1.0, 0.1, 0.1, 0.1], np.float32)
    # prompt 0: the verifier prefers 0 to 1 and 2 to 1, ties 0-2; prompt 1: all equal
    comparisons = judges.Comparisons(pairs, np.array([1, 0, 1, -1, 0, 1], np.int32))
    columns = judges.agreement_columns(comparisons, verifier, 3, 2)
    # prompt 0: (0,1) agrees, (0,2) undecided by the verifier, (1,2): judge says 1, wrong
    assert {k: v.tolist() for k, v in columns.items()} == {
        "judge_agreement": [1.0, 0.0], "judge_agreement_count": [2.0, 0.0],
        "judge_ties": [1.0, 1.0], "judge_ties_count": [3.0, 3.0]}
    # a scoring judge: its pairs by score (ties where equal)
    scored = judges.score_comparisons(np.array([0.2, 0.9, 0.9, 0.0, 0.0, 1.0]), 3)
    assert scored.preference.tolist() == [-1, -1, 0, 0, -1, -1]
    # the step sums the columns: summarize gives agreement 1/2 and ties 2/6
    from cascade_jax import loop

    summary = loop.summarize({"loss_sum": 0.0, "count": 2.0,
                              **{f"{k}_sum" if not k.endswith("_count") else k: v.sum()
                                 for k, v in columns.items()}})
    assert (summary["judge_agreement"], summary["judge_ties"]) == (0.5, 2 / 6)


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def judged_run():
    objective, ctx = _judge_context()
    built = objective.build(ctx)
    return ctx, built, _run(built, 2)


def _rollouts(ctx, params, prompt_batch, step):
    """The policy's samples of the step, as prepare_batch drew them (its key)."""
    sampling = rollouts.sampling_params(
        max_new_tokens=NEW, temperature=1.0, top_p=None, n=2, seq_len=SEQ_LEN,
        max_seq_len=CFG.max_seq_len, longest_prompt=LONGEST, eos=EOS, key="k")
    return rollouts.sample_rollouts(CFG, params, prompts.row_prompts(prompt_batch), sampling,
                                    seq_len=SEQ_LEN, rng=jax.random.fold_in(ctx.rng, step),
                                    mesh=MESH, tokenizer=TOKENIZER)


def test_model_judge_verdicts_are_the_samplers_and_the_step_trains_on_them(judged_run):
    ctx, built, record = judged_run
    judge = _model_judge()
    decisive = 0
    for step in (0, 1):
        batch, metrics = record["batches"][step], record["metrics"][step]
        roll = _rollouts(ctx, record["params"][step], record["prompts"][step], step)
        texts = [TOKENIZER.decode(p.tolist()) for p in roll.prompts]
        comparisons, ids = judge.comparison_prompts(texts, roll.texts, 2)
        key = jax.random.fold_in(jax.random.fold_in(ctx.rng, judges.JUDGE_STREAM), step)
        out = generate.generate(JUDGE_CFG, _judge_params(), ids,
                                generate.SamplingParams(2, temperature=1.0, stop_tokens=(EOS,)),
                                rng=key, mesh=MESH, prompt_len=judge.slots)
        verdicts = [_by_hand(t) for t in prompts.decode_completions(TOKENIZER, out.tokens,
                                                                    out.lengths)]
        pref = []
        for first, second in zip(verdicts[::2], verdicts[1::2], strict=True):
            pref.append(1 if (first, second) == (0, 1) else -1 if (first, second) == (1, 0)
                        else 0)
        decisive += sum(p != 0 for p in pref)
        # k = 2: the winner scores 1, the loser 0; a tie trains nothing
        np.testing.assert_array_equal(batch["pair_weight"][:, 0], np.abs(pref))
        for p, (x, y) in enumerate(comparisons.pairs):
            chosen, rejected = (x, y) if pref[p] >= 0 else (y, x)
            np.testing.assert_array_equal(batch["tokens"][p], roll.rows["tokens"][chosen])
            np.testing.assert_array_equal(batch["rejected_tokens"][p],
                                          roll.rows["tokens"][rejected])
            assert batch["score_chosen"][p, 0] == abs(pref[p])
        # agreement with the verifier's reward, counted by hand
        reward = rollouts.judge_with_verifier(TASK, texts, roll.texts, roll.lengths, NEW,
                                              ctx.settings.rewards).reward
        truth = [np.sign(reward[x] - reward[y]) for x, y in comparisons.pairs]
        assert metrics["judge_agreement_count"] == sum(t != 0 for t in truth)
        assert metrics["judge_agreement_sum"] == sum(t != 0 and t == p
                                                     for t, p in zip(truth, pref, strict=True))
        assert (metrics["judge_ties_sum"], metrics["judge_ties_count"]) == (
            sum(p == 0 for p in pref), 4)
        assert math.isfinite(metrics["loss_sum"]) and metrics["count"] == 4
    assert decisive >= 2, decisive  # the judge trained some pairs
    assert record["metrics"][1]["loss_sum"] != 0
    assert built.lineage["preference"]["judge_model"] == "judge"


def test_a_rebuilt_stage_judges_the_same(judged_run):
    """A resumed stage is rebuilt from its config and fed the checkpointed state and prompts:
    its judge's key comes from the step, so its pairs equal the uninterrupted run's."""
    _, _, record = judged_run
    objective, ctx = _judge_context()
    rebuilt = objective.build(ctx)
    state = steps.TrainState(jnp.asarray(1), record["params"][1], None)
    again = rebuilt.prepare_batch(state, record["prompts"][1])
    assert sorted(again) == sorted(record["batches"][1])
    for name, value in record["batches"][1].items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_logprob_verdicts_compare_the_labels_at_the_cue():
    judge = _model_judge(dict(judge_verdict="logprob"))
    assert judge.label_ids == tuple(TOKENIZER.token_to_id(x) for x in LABELS)
    problems = ["1+2=", "1+2=", "3*4=", "3*4="]
    _, ids = judge.comparison_prompts(problems, ["1+2=3;#3", "#4", "3*4=2;#2", "#7"], 2)
    verdicts = judge.verdicts(ids, step=0)
    # a plain forward, no cache: right-padded rows (padding in segment 0), each row's last
    tokens = np.zeros((len(ids), judge.slots), np.int32)
    for r, prompt in enumerate(ids):
        tokens[r, :len(prompt)] = prompt
    logits = jax.jit(model.forward, static_argnums=0)(JUDGE_CFG, _judge_params(), tokens,
                                                      (tokens != 0).astype(np.int32))
    for r, (prompt, verdict) in enumerate(zip(ids, verdicts, strict=True)):
        a, b = (float(logits[r, len(prompt) - 1, i]) for i in judge.label_ids)
        assert verdict == (0 if a > b else 1)
    assert set(verdicts.tolist()) == {0, 1}


# ----------------------------------------------------------------------------- bad input


def test_bad_judge_settings_and_models_are_refused():
    preference = preference_objective.Preference()
    key = "stages.s.preference"
    for block, message in [
            (dict(judge="model", judge_template="{prompt}{a}"), r"judge_template='\{prompt\}"
             r"\{a\}' lacks \{b\}"),
            (dict(judge="model", judge_template="{prompt}{a}{b}{c}"), r"has unknown \{c\}"),
            (dict(judge="model", judge_labels=("A", "A!")), r"one label starts the other"),
            (dict(judge="model", judge_verdict="vote"), r"judge_verdict='vote' is not one of"),
            (dict(judge_temperature=1.0), r"\['judge_temperature'\] set the judge model, but "
             r"judge='verifier'"),
            (dict(judge="model", source=__file__), r"judge='model' judges online samples")]:
        with pytest.raises(ValueError, match=message):
            preference.parse_settings(block, key)
    with pytest.raises(ValueError, match=r"judge='model' judges with the stage's teacher, but "
                                         r"it has none; set config\.stages\.t\.teacher"):
        _model_judge(teacher=None)
    with pytest.raises(ValueError, match=r"judge_template or judge_labels cannot be encoded"):
        _model_judge(dict(judge_template=judges.DEFAULT_TEMPLATE, judge_labels=("A", "B")))
    with pytest.raises(ValueError, match=r"'logprob' reads one token per label, but judge_labels"
                                         r"=\('12', '3'\) encode to \[2, 1\] tokens"):
        _model_judge(dict(judge_verdict="logprob", judge_labels=("12", "3")))
    with pytest.raises(ValueError, match=r"take 3 tokens, more than judge_max_new_tokens=2"):
        _model_judge(dict(judge_labels=("123", "4")))
    # too long for the judge: 5 template + 6 problem + 2 × 8 answers = 27, + 2 verdict > 28
    short = Trained("judge", JUDGE_CFG.replace(max_seq_len=28), _judge_params(), "judge", "fp")
    with pytest.raises(ValueError, match=r"a comparison prompt takes up to 27 tokens \("
                                         r"judge_template 5 \+ longest problem 6 \+ 2 × "
                                         r"max_new_tokens 8\) and its verdict 2 more: 29 > the "
                                         r"judge's \(teacher 'judge'\) max_seq_len=28"):
        _model_judge(dict(judge_template="{prompt}={a}##{b}=="), teacher=short)
    judge = dataclasses.replace(_model_judge(), slots=10)  # a prompt past its slots, at a step
    with pytest.raises(ValueError, match=r"a comparison prompt has 15 tokens, more than the 10"):
        judge.comparison_prompts(["1+2="] * 2, ["#3", "1+2=3;#3"], 2)
    with pytest.raises(ValueError, match=r"prompt_len=3 is shorter than the longest prompt"):
        generate.generate(CFG, None, [np.arange(2, 6)],
                          generate.SamplingParams(1, temperature=0.0), prompt_len=3)


def test_an_unknown_judge_model_is_refused_at_config_time():
    """The judge model is the stage's teacher: a name that is no model is refused before any
    work, as for any teacher."""
    stage = dict(objective="preference", parent="root", teacher="no_such_model", init="parent",
                 steps=2, optim=dict(lr=1e-3), preference=dict(judge="model"))
    config = dict(workdir="w", root=dict(kind="scratch", model=CFG.to_dict(), steps=2,
                                         optim=dict(lr=1e-3)),
                  data=dict(source="task", tokenizer="chars"),
                  task=dict(kind="chain_arithmetic"), stage_order=("s",), stages=dict(s=stage))
    with pytest.raises(ValueError, match=r"config\.stages\.s\.teacher='no_such_model' is neither "
                                         r"'parent', one of \['root'\], nor an existing "
                                         r"checkpoint directory"):
        runconfig.cascade_config(config)
