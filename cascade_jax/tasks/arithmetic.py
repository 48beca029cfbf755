"""`ChainArithmetic`: single-digit arithmetic mod 10, evaluated left to right.

    prompt      3+5*2-7=
    completion  3+5=8;8*2=6;6-7=9;#9

Each step is a table lookup a small model can learn, but the answer depends on every step in
order, so a model that writes the steps (the trace) can solve chains it could not solve in one
forward pass. The number of operations (`steps`) is the difficulty knob: training and held-out
problems have `min_steps..max_steps`, the 'harder' split `max_steps + 1 .. max_steps +
harder_steps`, lengths never seen in training.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np

from cascade_jax import validate
from cascade_jax.tasks.base import (
    ANSWER_PATTERN,
    HARDER,
    HELD_OUT_PERCENT,
    TRAIN,
    VALIDATION,
    Problem,
    Score,
    check_split,
    is_held_out,
    judge,
)

OPS = "+-*"
_APPLY = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10,
          "*": lambda a, b: (a * b) % 10}
_CHUNK = 1024  # problems drawn at a time
_PROMPT = re.compile(r"^([0-9])((?:[-+*][0-9])+)=$")


def evaluate_chain(digits: list[int], ops: str) -> list[int]:
    """The running value after each operation, left to right, mod 10."""
    values, value = [], digits[0]
    for op, digit in zip(ops, digits[1:], strict=True):
        value = _APPLY[op](value, digit)
        values.append(value)
    return values


def parse_prompt(prompt: str) -> tuple[list[int], str]:
    """(digits, operators) of a prompt such as '3+5*2-7='."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a chain such as '3+5*2-7=' (single digits "
                         f"joined by {OPS!r}, ending in '=')")
    rest = match.group(2)
    return [int(match.group(1)), *(int(d) for d in rest[1::2])], rest[0::2]


@dataclasses.dataclass(frozen=True)
class ChainArithmetic:
    """The built-in verifiable task (see the module docstring).

    min_steps, max_steps: operations per problem in 'train' and 'validation'.
    harder_steps: the 'harder' split has max_steps + 1 .. max_steps + harder_steps operations.
    held_out_percent: share of all prompts (by a hash of the text) reserved for 'validation'.
    """

    min_steps: int = 2
    max_steps: int = 4
    harder_steps: int = 2
    held_out_percent: float = HELD_OUT_PERCENT

    name: ClassVar[str] = "chain_arithmetic"
    answer_pattern: ClassVar[str] = ANSWER_PATTERN
    splits: ClassVar[tuple[str, ...]] = (TRAIN, VALIDATION, HARDER)

    def __post_init__(self) -> None:
        validate.positive_int("min_steps", self.min_steps)
        validate.positive_int("max_steps", self.max_steps)
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps={self.max_steps} is below min_steps={self.min_steps}")
        validate.positive_int("harder_steps", self.harder_steps)
        validate.number("held_out_percent", self.held_out_percent, low=0.0, high=100.0,
                        low_open=True, high_open=True)

    @property
    def alphabet(self) -> str:
        return "0123456789" + OPS + "=;#"

    def step_range(self, split: str) -> tuple[int, int]:
        """(fewest, most) operations of a problem of `split`."""
        check_split(self, split)
        if split == HARDER:
            return self.max_steps + 1, self.max_steps + self.harder_steps
        return self.min_steps, self.max_steps

    def make_problems(self, split: str, n: int | None, seed: int) -> list[Problem]:
        """`n` problems drawn uniformly (steps, then digits and operators) from `split`;
        'train' and 'validation' keep only the prompts `is_held_out` assigns to them."""
        low, high = self.step_range(split)
        if n is None:
            raise ValueError("n=None: a procedural task has no end; ask for a number of "
                             "problems")
        validate.non_negative_int("n", n)
        rng = np.random.default_rng([seed, self.splits.index(split)])
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < n:  # in fixed chunks: the first n of n + m are the same n
            steps_C = rng.integers(low, high + 1, _CHUNK)
            digits_CS = rng.integers(0, 10, (_CHUNK, high + 1))
            ops_CS = rng.integers(0, len(OPS), (_CHUNK, high))
            for steps, digits, ops in zip(steps_C.tolist(), digits_CS.tolist(), ops_CS.tolist(),
                                          strict=True):
                problem = self._problem(digits[:steps + 1], "".join(OPS[i] for i in ops[:steps]))
                if split == HARDER or is_held_out(problem.prompt, self.held_out_percent) == (
                        split == VALIDATION):
                    problems.append(problem)
                    if len(problems) == n:
                        break
            attempts += _CHUNK
            if attempts > 100 * (n + _CHUNK) and len(problems) < n:
                raise ValueError(f"drew {attempts} problems but only {len(problems)} fall in "
                                 f"{split!r}; raise held_out_percent={self.held_out_percent} "
                                 "or max_steps")
        return problems

    @staticmethod
    def _problem(digits: list[int], ops: str) -> Problem:
        values = evaluate_chain(digits, ops)
        lefts = [digits[0], *values[:-1]]
        lines = [f"{a}{op}{b}={c}" for a, op, b, c in zip(lefts, ops, digits[1:], values,
                                                           strict=True)]
        prompt = str(digits[0]) + "".join(f"{op}{d}" for op, d in zip(ops, digits[1:],
                                                                      strict=True)) + "="
        return Problem(prompt=prompt, completion=";".join([*lines, f"#{values[-1]}"]),
                       answer=str(values[-1]), steps=len(ops))

    def answer(self, problem: Problem) -> str:
        return _reference(problem.prompt)

    def score(self, prompt: str, completion: str) -> Score:
        return judge(_reference(prompt), completion, self.answer_pattern)


def _reference(prompt: str) -> str:
    return str(evaluate_chain(*parse_prompt(prompt))[-1])
