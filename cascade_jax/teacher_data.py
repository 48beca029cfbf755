"""Hard labels: a teacher's sampled completions, written once as a dataset next to a stage.

Sequence-level KD (Kim & Rush 2016, arXiv 1606.07947) trains the student with cross-entropy on
what the teacher *writes*, not on its distribution: the only option with a black-box teacher,
and how DeepSeek-R1 (arXiv 2501.12948) distilled its reasoning into Qwen and Llama students,
keeping only samples a verifier accepts (rejection sampling).

    <stage>/teacher_data/spec.json          what the samples are (teacher, sampling, prompts)
    <stage>/teacher_data/part-00000.jsonl   one line per sample, prompt-major
    <stage>/teacher_data/manifest.json      written last: rows, kept, dropped

Each line is the interchange format a black-box teacher's outputs come in too
(`{"prompt", "completion"}`), plus what we know of our own samples: the exact sampled token
ids (`completion_ids`, so no re-tokenization changes what the teacher wrote), the verifier's
`correct` / `well_formed`, and `sample` (which of the k). Rejected samples are written too;
filtering happens on read, so the keep/drop counts are facts of the data.

Nothing is lost or duplicated when a run is killed: a part file appears whole (atomic rename)
or not at all, a restart samples only the parts that are missing, with the same random key
per part (`fold_in(rng, part)`), so the dataset is the same as an uninterrupted run's. All
processes sample every part together (one SPMD sampler over the mesh); part i is written by
process i mod process_count, so hosts write disjoint rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from cascade_jax import files, generate, model, prompts, rundir, tasks, validate
from cascade_jax.config import ModelConfig
from cascade_jax.tasks import base as task_base
from cascade_jax.tasks import jsonl

SPEC, MANIFEST = "spec.json", "manifest.json"
KEEP = ("all", "correct", "well_formed")


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


@dataclasses.dataclass(frozen=True)
class Sampled:
    """One teacher sample as stored."""

    prompt: str
    completion: str
    completion_ids: tuple[int, ...] | None  # None: text only (an external teacher's file)
    correct: bool | None = None
    well_formed: bool | None = None
    sample: int = 0
    where: str = dataclasses.field(default="", compare=False)  # file:line it was read from


def _line(s: Sampled) -> str:
    record = {"prompt": s.prompt, "completion": s.completion, "correct": s.correct,
              "well_formed": s.well_formed, "sample": s.sample}
    if s.completion_ids is not None:
        record["completion_ids"] = list(s.completion_ids)
    return json.dumps(record)


def _sample_part(cfg: ModelConfig, params: model.Params, problems: Sequence[tasks.Problem],
                 task: tasks.Task | None, tokenizer: Any, sampling: generate.SamplingParams,
                 rng: jax.Array, mesh: Mesh | None) -> list[Sampled]:
    prompt_ids = prompts.encode_prompts(tokenizer, [p.prompt for p in problems])
    out = generate.generate(cfg, params, prompt_ids, sampling, rng=rng, mesh=mesh)
    texts = prompts.decode_completions(tokenizer, out.tokens, out.lengths)
    rows = []
    for r, text in enumerate(texts):
        problem = problems[r // sampling.n]
        score = None if task is None else task.score(problem.prompt, text)
        rows.append(Sampled(problem.prompt, text,
                            tuple(int(t) for t in out.tokens[r, :out.lengths[r]]),
                            None if score is None else score.correct,
                            None if score is None else score.well_formed, r % sampling.n))
    return rows


def _check_spec(directory: str, spec: dict[str, Any]) -> None:
    """Samples already on disk must be of this teacher, sampling and prompt set: parts of
    two different runs would mix silently."""
    path = os.path.join(directory, SPEC)
    orphans = ([n for n in sorted(os.listdir(directory)) if n.startswith("part-")]
               if os.path.isdir(directory) else [])
    if not os.path.exists(path) and orphans:
        raise rundir.WorkdirError(
            f"{directory} holds teacher samples ({', '.join(orphans[:3])}) but no {SPEC}: "
            "nothing says which teacher and settings made them, so they are not adopted; "
            f"delete {directory} to sample again, or restore its {SPEC}")
    if os.path.exists(path):
        recorded = files.read_json(path)
        if recorded != json.loads(json.dumps(spec)):
            changed = sorted(k for k in {*recorded, *spec} if recorded.get(k) != spec.get(k))
            raise rundir.WorkdirError(
                f"{directory} holds teacher samples made with other settings ({changed} "
                f"differ: {[recorded.get(k) for k in changed]} then, "
                f"{[spec.get(k) for k in changed]} now); delete {directory} to sample again, "
                "or restore the settings")
    elif jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        files.write_json(path, spec)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write(directory: str, cfg: ModelConfig, params: model.Params,
          problems: Sequence[tasks.Problem], tokenizer: Any,
          sampling: generate.SamplingParams, *, rng: jax.Array, task: tasks.Task | None,
          teacher: str, mesh: Mesh | None = None, prompts_per_part: int = 256,
          progress: bool = True, on_part: Callable[[int], None] | None = None
          ) -> dict[str, Any]:
    """Sample `sampling.n` completions of every problem's prompt with the teacher
    (`cfg`, `params`), judge them with `task`, write them under `directory`; resumes a
    partial directory. Returns the manifest (rows, kept per rule, parts). `teacher` names
    the teacher's identity (a fingerprint) for the spec check; `on_part(i)` runs after part i
    is on disk (tests kill a run there)."""
    if not problems:
        raise ValueError("no prompts to sample; give the stage at least one problem")
    parts = -(-len(problems) // prompts_per_part)
    spec = {"teacher": teacher, "sampling": dataclasses.asdict(sampling),
            "prompts": len(problems), "prompts_per_part": prompts_per_part,
            "first_prompt": problems[0].prompt, "last_prompt": problems[-1].prompt}
    _check_spec(directory, spec)
    _barrier("teacher_data_spec")
    missing = [i for i in range(parts)
               if not os.path.exists(os.path.join(directory, part_name(i)))]
    _barrier("teacher_data_missing")  # every process decided before any writes
    bar = tqdm.tqdm(total=parts, initial=parts - len(missing), desc="teacher samples",
                    unit="part", disable=not progress or jax.process_index() != 0)
    for i in missing:
        chunk = problems[i * prompts_per_part:(i + 1) * prompts_per_part]
        rows = _sample_part(cfg, params, chunk, task, tokenizer, sampling,
                            jax.random.fold_in(rng, i), mesh)
        if i % jax.process_count() == jax.process_index():
            text = "".join(_line(r) + "\n" for r in rows)
            files.atomic_write(os.path.join(directory, part_name(i)),
                               lambda f, text=text: f.write(text.encode()))
        bar.update(1)
        if on_part is not None:
            on_part(i)
    bar.close()
    _barrier("teacher_data_parts")
    rows = read(directory)
    manifest = {"rows": len(rows), "parts": parts,
                "kept": {rule: sum(map(_keeper(rule), rows)) for rule in KEEP}}
    manifest["dropped"] = {rule: manifest["rows"] - kept
                           for rule, kept in manifest["kept"].items()}
    if jax.process_index() == 0:
        files.write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def read(path: str) -> list[Sampled]:
    """Every sample of a teacher-data directory (parts in order) or of one JSONL file of
    `{"prompt", "completion"}` lines (a black-box teacher's outputs; `correct` optional)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.startswith("part-")
                       and n.endswith(".jsonl"))
        return [row for name in names for row in read(os.path.join(path, name))]
    out = []
    for line, r in jsonl.read_records(path, required=("prompt", "completion"),
                                      hint='each line is {"prompt": ..., "completion": ...}'):
        where = f"{path}:{line}"
        ids = r.get("completion_ids")
        out.append(Sampled(
            r["prompt"], r["completion"],
            None if ids is None else tuple(validate.int_list(f"{where} completion_ids", ids)),
            validate.optional_boolean(f"{where} correct", r.get("correct")),
            validate.optional_boolean(f"{where} well_formed", r.get("well_formed")),
            validate.non_negative_int(f"{where} sample", r.get("sample", 0)), where))
    return out


def check_rows(rows: Sequence[Sampled], tokenizer: Any, vocab_size: int) -> None:
    """Every row's `completion_ids` (where given) lie in the student's vocabulary
    [0, vocab_size) and decode (by `tokenizer`) to the row's completion text: ids beyond the
    vocabulary, or of another tokenizer or text, would be trained on silently. Errors name
    the file and line."""
    from cascade_jax import token_ids

    for row in rows:
        if row.completion_ids is None:
            continue
        ids = np.asarray(row.completion_ids, np.int64)
        token_ids.check(ids, vocab_size, where=f"{row.where} completion_ids",
                        fix="give ids of the student's tokenizer, or drop completion_ids "
                            "(the completion text is then tokenized)")
        text = prompts.decode_completions(tokenizer, ids[None], np.asarray([ids.size]))[0]
        if text != row.completion:
            raise ValueError(f"{row.where}: completion_ids decode to {text[:60]!r}, not the "
                             f"line's completion {row.completion[:60]!r}; fix the line, or "
                             "drop completion_ids (the completion text is then tokenized)")


def _keeper(rule: str) -> Callable[[Sampled], bool]:
    if rule == "all":
        return lambda s: True
    if rule == "correct":
        return lambda s: bool(s.correct)
    return lambda s: bool(s.well_formed)


def judged(rows: Sequence[Sampled], task: tasks.Task) -> list[Sampled]:
    """Rows with the verifier's judgement filled in where the file had none (an external
    teacher's outputs are judged here)."""
    out = []
    for row in rows:
        if row.correct is None or row.well_formed is None:
            score = task.score(row.prompt, row.completion)
            row = dataclasses.replace(row, correct=score.correct, well_formed=score.well_formed)
        out.append(row)
    return out


def training_pairs(rows: Sequence[Sampled], tokenizer: Any, *, keep: str = "all",
                   answers_only: bool = False,
                   answer_pattern: str = tasks.ANSWER_PATTERN) -> prompts.TokenPairs:
    """The student's CE data: kept rows as prompt/completion token pairs. A row's exact
    sampled ids are used when known; `answers_only` keeps only each completion's final
    answer line (rows without one are dropped: there is no answer to keep)."""
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r} must be one of {list(KEEP)}")
    if keep != "all" and any(r.correct is None for r in rows):
        raise ValueError(f"keep={keep!r} needs the verifier's judgement of every row; judge "
                         "them first (teacher_data.judged(rows, task))")
    kept = [r for r in rows if _keeper(keep)(r)]
    if answers_only:
        pattern = task_base.compile_answer_pattern(answer_pattern)
        kept = [dataclasses.replace(r, completion=r.completion[m.start():],
                                    completion_ids=None)
                for r in kept if (m := pattern.search(r.completion)) is not None]
    if not kept:
        raise ValueError(f"no teacher samples left to train on (keep={keep!r}, answers_only="
                         f"{answers_only}, {len(rows)} rows); sample more, or keep 'all'")
    eos = prompts.data.eos_id(tokenizer)
    prompt_ids = prompts.encode_prompts(tokenizer, [r.prompt for r in kept])
    by_text = [r for r in kept if r.completion_ids is None]
    encoded = iter(prompts.encode_completions(tokenizer, [r.completion for r in by_text]))
    completion_ids = [np.asarray(r.completion_ids if r.completion_ids is not None
                                 else next(encoded), np.int32) for r in kept]
    return prompts.token_pairs(prompt_ids, completion_ids, eos_id=eos)
