"""Verifiable tasks: the verifier, disjoint seeded splits, difficulty, the char tokenizer."""

import json
import re
import subprocess
import sys

import pytest

from cascade_jax import data, tasks
from cascade_jax.tasks import arithmetic

TASK = tasks.ChainArithmetic(min_steps=2, max_steps=4)


def reference_chain(prompt: str) -> tuple[list[str], str]:
    """An independent evaluator: ((a op b = c) steps, answer), left to right, mod 10."""
    numbers = [int(d) for d in re.findall(r"[0-9]", prompt)]
    ops = re.findall(r"[-+*]", prompt)
    value, steps = numbers[0], []
    for op, b in zip(ops, numbers[1:], strict=True):
        new = {"+": value + b, "-": value - b, "*": value * b}[op] % 10
        steps.append(f"{value}{op}{b}={new}")
        value = new
    return steps, str(value)


# ------------------------------------------------------------------------------- the verifier


def test_the_issue_example():
    problem = TASK._problem([3, 5, 2, 7], "+*-")
    assert problem.prompt == "3+5*2-7="
    assert problem.completion == "3+5=8;8*2=6;6-7=9;#9"
    assert (problem.answer, problem.steps) == ("9", 3)


def test_traces_and_answers_agree_with_an_independent_evaluator():
    for problem in TASK.make_problems("train", 300, seed=1):
        steps, answer = reference_chain(problem.prompt)
        assert problem.completion == ";".join([*steps, f"#{answer}"])
        assert problem.answer == answer == TASK.answer(problem)
        assert problem.steps == len(steps)


@pytest.mark.parametrize(("completion", "correct", "well_formed"), [
    ("3+5=8;8*2=6;6-7=9;#9", True, True),
    ("#9", True, True),                          # answers only: judged the same way
    ("#9\n", True, True),                        # trailing whitespace after the answer line
    ("3+5=8;8*2=6;6-7=1;#1", False, True),       # a wrong step, a wrong answer
    ("3+5=8;8*2=6;6-7=9;#9;#1", False, True),    # its answer is '9;#1' (\S+), not 9
    ("3+5=8;8*2=6;6-7=9", False, False),         # no answer line
    ("9", False, False),
    ("", False, False),
    ("#", False, False),
])
def test_verifier(completion, correct, well_formed):
    assert TASK.score("3+5*2-7=", completion) == tasks.Score(correct, well_formed)


def test_extract_answer():
    assert tasks.extract_answer("6-7=9;#9") == "9"
    assert tasks.extract_answer("#9;#1") == "9;#1"
    assert tasks.extract_answer("6-7=9") is None
    assert tasks.extract_answer("x = 4", r"x = (\d+)$") == "4"


def test_scoring_a_prompt_the_task_cannot_read_is_an_error():
    with pytest.raises(ValueError, match="'3\\+55='"):
        TASK.score("3+55=", "#8")


def test_answers_only_keeps_only_the_final_answer_line():
    problem = TASK.make_problems("train", 1, seed=0)[0]
    short = tasks.answers_only(problem)
    assert short.completion == f"#{problem.answer}"
    assert (short.prompt, short.answer, short.steps) == (problem.prompt, problem.answer,
                                                         problem.steps)
    assert TASK.score(short.prompt, short.completion).correct


# --------------------------------------------------------------------------------- the splits


def test_same_seed_same_problems_other_seed_other_problems():
    a = TASK.make_problems("train", 200, seed=3)
    assert a == TASK.make_problems("train", 200, seed=3)
    assert a != TASK.make_problems("train", 200, seed=4)
    assert TASK.make_problems("train", 50, seed=3) == a[:50]  # more data extends, not reshuffles


def test_held_out_prompts_never_appear_in_training():
    train = {p.prompt for seed in range(3) for p in TASK.make_problems("train", 3000, seed)}
    held_out = {p.prompt for p in TASK.make_problems("validation", 1000, seed=0)}
    assert held_out and not train & held_out
    # The rule is a hash of the prompt: it does not depend on seeds or counts.
    assert all(tasks.is_held_out(p) for p in held_out)
    assert not any(tasks.is_held_out(p) for p in train)


def test_steps_span_the_range_and_the_harder_split_has_more():
    train_steps = {p.steps for p in TASK.make_problems("train", 500, seed=0)}
    harder = TASK.make_problems("harder", 300, seed=0)
    assert train_steps == {2, 3, 4}
    assert {p.steps for p in harder} == {5, 6}
    assert all(reference_chain(p.prompt)[1] == p.answer for p in harder)


def test_bad_task_settings_and_splits_are_named():
    with pytest.raises(ValueError, match=r"config.task: max_steps=1 is below min_steps=2"):
        tasks.make("chain_arithmetic", dict(min_steps=2, max_steps=1))
    with pytest.raises(ValueError, match=r"config.task.kind='chain' is not one of"):
        tasks.make("chain", {})
    with pytest.raises(ValueError, match=r"unknown config field.*config.task.max_step"):
        tasks.make("chain_arithmetic", dict(max_step=3))
    with pytest.raises(ValueError, match="split='test'"):
        TASK.make_problems("test", 1, seed=0)
    with pytest.raises(ValueError, match="n=None"):
        TASK.make_problems("train", None, seed=0)


# --------------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_round_trip_and_special_ids():
    tokenizer = tasks.char_tokenizer(TASK.alphabet)
    assert tokenizer.get_vocab_size() == 2 + len(set(TASK.alphabet))
    assert (tasks.PAD_TOKEN, tasks.EOS_TOKEN) == (data.PAD_TOKEN, data.EOS_TOKEN)
    assert tokenizer.token_to_id(data.PAD_TOKEN) == data.PAD_ID
    assert data.eos_id(tokenizer) == data.EOS_ID
    for problem in TASK.make_problems("harder", 20, seed=0):
        text = problem.prompt + problem.completion
        ids = tokenizer.encode(text).ids
        assert len(ids) == len(text) and min(ids) >= 2  # one char, one token; no specials
        assert tokenizer.decode([*ids, data.EOS_ID, data.PAD_ID]) == text
    with pytest.raises(Exception, match="UNK"):  # never a silent unknown
        tokenizer.encode("3/4")


def test_char_tokenizer_survives_a_tokenizer_json_round_trip(tmp_path):
    tokenizer = tasks.char_tokenizer("ab c\n")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = data.load_tokenizer(str(tmp_path))
    assert loaded.encode("a c\nb").ids == tokenizer.encode("a c\nb").ids
    assert loaded.decode(loaded.encode("a c\nb").ids) == "a c\nb"


def test_tasks_import_no_jax():
    code = ("import sys, cascade_jax.tasks; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'grain'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# ---------------------------------------------------------------------------- JSONL tasks


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


def test_a_jsonl_task_with_answers_or_completions(tmp_path):
    records = [{"prompt": f"what is {i}+{i}?", "answer": str(2 * i)} for i in range(200)]
    records += [{"prompt": "capital of France?", "completion": "It is Paris.\nanswer: Paris",
                 "source": "ignored"}]
    task = tasks.JsonlTask(write_jsonl(tmp_path / "t.jsonl", records),
                           answer_pattern=r"answer: (\S+)$", answer_format="answer: {answer}")
    train = task.make_problems("train", None, seed=0)
    held_out = task.make_problems("validation", None, seed=0)
    assert len(train) + len(held_out) == 201 and held_out
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert sorted(task.make_problems("train", None, seed=1), key=str) == sorted(train, key=str)
    paris = next(p for p in task.problems if p.prompt == "capital of France?")
    assert (paris.answer, task.answer(paris)) == ("Paris", "Paris")
    assert task.score("what is 3+3?", "answer: 6") == tasks.Score(True, True)
    assert task.score("what is 3+3?", "so answer: 7") == tasks.Score(False, True)
    assert task.score("what is 3+3?", "6") == tasks.Score(False, False)
    assert tasks.answers_only(paris, task.answer_pattern).completion == "answer: Paris"
    with pytest.raises(ValueError, match="not in"):
        task.score("what is 1000+1000?", "answer: 2000")
    with pytest.raises(ValueError, match="n=5000"):
        task.make_problems("train", 5000, seed=0)
    with pytest.raises(ValueError, match="split='harder'"):
        task.make_problems("harder", 1, seed=0)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "a"}'], r"t.jsonl:1 needs a string 'completion' or 'answer'"),
    (['{"prompt": "a", "completion": "no answer line"}'], r"t.jsonl:1: answer_pattern"),
    (['{"prompt": "a", "answer": "1", "completion": "#2"}'], r"finds '2'.*not the answer '1'"),
    (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "a", "answer": "2"}'],
     r"t.jsonl:3: prompt 'a' appears again with answer '2'"),
    (["not json"], r"t.jsonl:1 is not valid JSON"),
    (['["prompt"]'], r"t.jsonl:1 has no string field 'prompt' \(it has list\)"),
    (['{"question": "a"}'], r"t.jsonl:1 has no string field 'prompt' \(it has \['question'\]\)"),
])
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        tasks.JsonlTask(str(path))


def test_bad_answer_patterns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="has 0 groups"):
        tasks.JsonlTask(path, answer_pattern=r"#\S+")
    with pytest.raises(ValueError, match="not a regular expression"):
        tasks.JsonlTask(path, answer_pattern=r"#(\S+")
    with pytest.raises(ValueError, match="no JSONL file"):
        tasks.JsonlTask(str(tmp_path / "missing.jsonl"))


def test_parse_prompt_reads_what_make_problems_writes():
    for problem in TASK.make_problems("validation", 50, seed=2):
        digits, ops = arithmetic.parse_prompt(problem.prompt)
        assert len(digits) == len(ops) + 1 == problem.steps + 1
