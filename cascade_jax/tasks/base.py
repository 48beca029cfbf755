"""What a verifiable task is: problems with a reference answer, and a verifier for completions.

A task is judged by its final answer alone: a completion is *well formed* when it ends in an
answer line that the task's `answer_pattern` (a regex with one group) finds, and *correct* when
that group equals the reference answer. The reasoning before the answer line (a trace) is what
the model may learn from, never what it is scored on, so the same verifier scores a model
trained on traces and one trained on answers only (`answers_only`).

Held-out prompts are kept out of training by a hash of the prompt text (`is_held_out`), not by
the order problems were drawn in: no seed, count or generator change can leak one into
training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Protocol

# The default final-answer line: '#' then the answer, at the end of the completion.
ANSWER_PATTERN = r"#(\S+)\s*$"
TRAIN, VALIDATION, HARDER = "train", "validation", "harder"
HELD_OUT_PERCENT = 10.0


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the prompt, the reference completion (a trace ending in the answer line,
    or the answer line alone), the reference answer and its difficulty (reasoning steps; 0
    where the task does not know)."""

    prompt: str
    completion: str
    answer: str
    steps: int = 0


@dataclasses.dataclass(frozen=True)
class Score:
    """The verifier's judgement of one completion."""

    correct: bool
    well_formed: bool


class Task(Protocol):
    """A verifiable task. `splits` names what `make_problems` draws from ('train',
    'validation' (held out, disjoint from train), and 'harder' where the task has a difficulty
    knob); `alphabet` the characters its problems use (for `char_tokenizer`)."""

    name: str
    answer_pattern: str
    splits: tuple[str, ...]

    @property
    def alphabet(self) -> str: ...

    def make_problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        """`n` problems of `split` (None: all, where the split is finite), the same for the
        same seed."""
        ...

    def answer(self, problem: Problem) -> str:
        """The reference answer, worked out by the task (not read from `problem.answer`)."""
        ...

    def score(self, prompt: str, completion: str) -> Score:
        """Judge a completion of `prompt` (a prompt the task made or holds)."""
        ...


def compile_answer_pattern(pattern: str, key: str = "answer_pattern") -> re.Pattern[str]:
    """`pattern` compiled, checked to hold exactly one group (the answer)."""
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"{key}={pattern!r} is not a regular expression ({error}); the "
                         f"default is {ANSWER_PATTERN!r}") from None
    if compiled.groups != 1:
        raise ValueError(f"{key}={pattern!r} has {compiled.groups} groups; it needs exactly one, "
                         f"around the answer, as in {ANSWER_PATTERN!r}")
    return compiled


def extract_answer(completion: str, pattern: str = ANSWER_PATTERN) -> str | None:
    """The answer the completion's answer line gives, or None when it has none."""
    match = compile_answer_pattern(pattern).search(completion)
    return None if match is None else match.group(1)


def judge(reference: str, completion: str, pattern: str = ANSWER_PATTERN) -> Score:
    """The verifier shared by every task: well formed = an answer line, correct = its answer
    equals `reference`."""
    given = extract_answer(completion, pattern)
    return Score(correct=given is not None and given == reference, well_formed=given is not None)


def answers_only(problem: Problem, pattern: str = ANSWER_PATTERN) -> Problem:
    """`problem` with its trace stripped: the completion keeps only the final answer line
    (from where `pattern` matches to the end). The contrast traces vs answers only."""
    match = compile_answer_pattern(pattern).search(problem.completion)
    if match is None:
        raise ValueError(f"completion {problem.completion!r} has no answer line matching "
                         f"{pattern!r}; nothing to keep")
    return dataclasses.replace(problem, completion=problem.completion[match.start():])


def is_held_out(prompt: str, held_out_percent: float = HELD_OUT_PERCENT) -> bool:
    """A prompt's split from a hash of its text: stable across runs, machines and seeds (the
    rule `data.is_validation` applies to document names, here applied to prompts)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % 10_000
    return bucket < held_out_percent * 100


def check_split(task: Task, split: str) -> None:
    if split not in task.splits:
        raise ValueError(f"split={split!r} is not one of task {task.name!r}'s splits "
                         f"{list(task.splits)}")
