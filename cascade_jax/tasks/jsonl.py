"""`JsonlTask`: a user's task as a JSONL file plus an answer-extraction rule.

One problem per line, either
    {"prompt": "...", "completion": "... #42"}   the answer is what `answer_pattern` finds
    {"prompt": "...", "answer": "42"}            the completion is `answer_format` of it
(other fields are ignored). Both are checked on load: the pattern must find the answer in every
completion, so the verifier and the training targets can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from cascade_jax import validate
from cascade_jax.tasks import base
from cascade_jax.tasks.base import Problem, Score


def read_records(path: str, required: Sequence[str] = (), hint: str = ""
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of a JSONL file; each record is an
    object whose `required` fields are strings (errors name `path:line`, what the line holds
    and `hint`). Invalid UTF-8 reads as U+FFFD, deterministically."""
    if not os.path.isfile(path):
        raise ValueError(f"no JSONL file at {path!r}; give the path of a file with one JSON "
                         "object per line")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e}); JSONL holds one object per "
                             "line") from e
        missing = [name for name in required
                   if not isinstance(record, dict) or not isinstance(record.get(name), str)]
        if missing:
            has = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where} has no string field {missing[0]!r} (it has {has})"
                             + (f"; {hint}" if hint else ""))
        yield line_no, record


@dataclasses.dataclass(frozen=True)
class JsonlTask:
    """Problems from `path` (see the module docstring), scored by `answer_pattern`.

    answer_format: the completion made for a record that gives only an answer.
    held_out_percent: share of prompts (by a hash of the text) kept for 'validation'.
    """

    path: str
    answer_pattern: str = base.ANSWER_PATTERN
    answer_format: str = "#{answer}"
    held_out_percent: float = base.HELD_OUT_PERCENT
    problems: tuple[Problem, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _answers: dict[str, str] = dataclasses.field(init=False, repr=False, compare=False)

    name: ClassVar[str] = "jsonl"
    splits: ClassVar[tuple[str, ...]] = (base.TRAIN, base.VALIDATION)

    def __post_init__(self) -> None:
        validate.string("path", self.path, allow_empty=False)
        base.compile_answer_pattern(self.answer_pattern)
        validate.string("answer_format", self.answer_format, allow_empty=False)
        validate.number("held_out_percent", self.held_out_percent, low=0.0, high=100.0,
                        low_open=True, high_open=True)
        problems, answers = [], {}
        for line_no, record in read_records(self.path, required=("prompt",)):
            where = f"{self.path}:{line_no}"
            problem = self._problem(where, record)
            if answers.setdefault(problem.prompt, problem.answer) != problem.answer:
                raise ValueError(f"{where}: prompt {problem.prompt!r} appears again with answer "
                                 f"{problem.answer!r} (earlier {answers[problem.prompt]!r}); one "
                                 "prompt must have one answer")
            problems.append(problem)
        if not problems:
            raise ValueError(f"{self.path} holds no problems")
        object.__setattr__(self, "problems", tuple(problems))
        object.__setattr__(self, "_answers", answers)

    def _problem(self, where: str, record: dict[str, Any]) -> Problem:
        completion, answer = record.get("completion"), record.get("answer")
        if completion is None:
            if not isinstance(answer, str):
                raise ValueError(f"{where} needs a string 'completion' or 'answer' (it has "
                                 f"{sorted(record)})")
            completion = self.answer_format.format(answer=answer)
        if not isinstance(completion, str):
            raise ValueError(f"{where}: 'completion' must be a string, got {completion!r}")
        match = base.compile_answer_pattern(self.answer_pattern).search(completion)
        found = None if match is None else match.group(1)
        if found is None or (answer is not None and found != answer):
            raise ValueError(f"{where}: answer_pattern={self.answer_pattern!r} finds {found!r} "
                             f"in the completion {completion!r}, not the answer {answer!r}; fix "
                             "the line, the pattern or answer_format")
        return Problem(prompt=record["prompt"], completion=completion, answer=found)

    @property
    def alphabet(self) -> str:
        return "".join(sorted({c for p in self.problems for c in p.prompt + p.completion}))

    def make_problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        """The problems of `split` (by `is_held_out` on the prompt) in a seeded order, the
        first `n` of them (None: all)."""
        base.check_split(self, split)
        held_out = split == base.VALIDATION
        chosen = [p for p in self.problems
                  if base.is_held_out(p.prompt, self.held_out_percent) == held_out]
        if n is not None and n > len(chosen):
            raise ValueError(f"n={n} problems asked of split {split!r}, but {self.path} has "
                             f"{len(chosen)} there; ask for fewer, or n=None for all")
        order = np.random.default_rng(seed).permutation(len(chosen))
        return [chosen[i] for i in order[:n]]

    def answer(self, problem: Problem) -> str:
        return self._reference(problem.prompt)

    def score(self, prompt: str, completion: str) -> Score:
        return base.judge(self._reference(prompt), completion, self.answer_pattern)

    def _reference(self, prompt: str) -> str:
        if prompt not in self._answers:
            raise ValueError(f"prompt {prompt[:80]!r} is not in {self.path}; a JSONL task can "
                             "only score its own prompts")
        return self._answers[prompt]
