"""Verifiable tasks: problems with reference answers, and a verifier for completions.

    task = tasks.ChainArithmetic(min_steps=2, max_steps=4)
    train = task.make_problems("train", 20_000, seed=0)       # Problem(prompt, completion, ...)
    task.score("3+5*2-7=", "3+5=8;8*2=6;6-7=9;#9")           # Score(correct=True, ...)
    tokenizer = tasks.char_tokenizer(task.alphabet)
    tasks.JsonlTask("mine.jsonl", answer_pattern=r"answer: (\\S+)$")   # a user's task

numpy only (no jax, no grain): a verifier can run anywhere, a judge or a data tool included.
`make(kind, fields, key)` builds a task from a config block (`config.task`, see
`cascade_jax.prompts.TaskConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cascade_jax import validate
from cascade_jax.tasks.arithmetic import ChainArithmetic
from cascade_jax.tasks.base import (
    ANSWER_PATTERN,
    HARDER,
    TRAIN,
    VALIDATION,
    Problem,
    Score,
    Task,
    answers_only,
    extract_answer,
    is_held_out,
    judge,
)
from cascade_jax.tasks.chars import EOS_TOKEN, PAD_TOKEN, char_tokenizer
from cascade_jax.tasks.jsonl import JsonlTask

KINDS: dict[str, type] = {ChainArithmetic.name: ChainArithmetic, JsonlTask.name: JsonlTask}


def make(kind: str, fields: Mapping[str, Any], key: str = "config.task") -> Task:
    """The task of `kind` with `fields`; errors name `key` (`config.task.max_steps=0 ...`)."""
    validate.one_of(f"{key}.kind", kind, KINDS)
    return validate.construct(KINDS[kind], dict(fields), key)


__all__ = ["ANSWER_PATTERN", "EOS_TOKEN", "HARDER", "KINDS", "PAD_TOKEN", "TRAIN", "VALIDATION",
           "ChainArithmetic", "JsonlTask", "Problem", "Score", "Task", "answers_only",
           "char_tokenizer", "extract_answer", "is_held_out", "judge", "make"]
