"""Judges of online `preference` beyond the verifier: a judge *model* comparing completions,
and how any judge's preferences are scored against the verifier's.

The judge model (`preference.judge='model'`) is the stage's teacher (`stages.<name>.teacher`:
'root', 'parent', an earlier stage or an Orbax checkpoint directory), run through our sampler:

- Comparisons: per prompt, every pair (x < y) of its k samples (k(k−1)/2 pairs), each asked
  in both orders, (A=x, B=y) and (A=y, B=x), on a prompt rendered from `judge_template`
  (fields `{prompt}` the problem, `{a}` / `{b}` the two completions, optional `{label_a}` /
  `{label_b}` the verdict labels) and encoded as any prompt (`prompts.encode_prompts`).
- Verdict: `judge_verdict='generate'` samples `judge_max_new_tokens` tokens (greedy by
  default, `judge_temperature`) and reads the label the text starts with (whitespace
  stripped; anything else is no verdict); `'logprob'` compares the log-probs of the two
  labels' tokens at the cue (one forward pass, no sampling; each label one token).
- Position bias: a pair counts only when the two orders agree (A in one and B in the other);
  the same letter in both orders, or no verdict in either, is a tie.
- Scores: each sample's win rate, consistent wins / (k − 1), so the objective's best-vs-worst
  choice applies unchanged (all equal: a tied prompt, no pair trained).
- Shapes: every step's comparison prompts are padded to one fixed length (the template, the
  longest problem and two completions of `max_new_tokens`), and all of them run in one
  compiled sampler call; a judge whose `max_seq_len` cannot hold that is refused at build.
- Key: fold_in(fold_in(stage rng, JUDGE_STREAM), step), so a resumed run judges the same.

Any judge that is not the verifier is also scored against it (when the task has one): per
pair the judge compared (for a scoring judge: each pair of a prompt's samples, by score),
`judge_agreement` is the share of the pairs the verifier's reward tells apart whose winner
the judge picked (a tie is not agreement), `judge_ties` the share of pairs without a verdict.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from cascade_jax.objectives.base import StageContext

DEFAULT_LABELS = ("A", "B")
DEFAULT_TEMPLATE = ("Problem:\n{prompt}\n\nResponse {label_a}:\n{a}\n\nResponse {label_b}:\n{b}"
                    "\n\nWhich response is better, {label_a} or {label_b}?\nBetter response:")
TEMPLATE_FIELDS = ("prompt", "a", "b")
LABEL_FIELDS = ("label_a", "label_b")
VERDICTS = ("generate", "logprob")
JUDGE_STREAM = 0x6A756467  # the judge's fold_in tag: its keys never equal the policy's
NO_VERDICT = -1
# batch columns (summed over pairs by the step): `<name>` and `<name>_count`
METRICS = ("judge_agreement", "judge_ties")


class Comparisons(NamedTuple):
    """C judged pairs: rows (x, y) of the rollouts and the judge's preference."""

    pairs: np.ndarray       # [C, 2] int32, x < y, both samples of one prompt
    preference: np.ndarray  # [C] int32: +1 x better, −1 y better, 0 tie


class Judgement(NamedTuple):
    """What a judge returns: [R] scores, and the comparisons they came from (if any)."""

    scores: np.ndarray
    comparisons: Comparisons | None = None


# (prompt texts [R], completion texts [R], completion lengths [R], k=samples per prompt,
#  step=the loop step) -> scores [R] or a Judgement
JudgeFn = Callable[..., "np.ndarray | Judgement"]


class RolloutShape(NamedTuple):
    """What a judge factory knows of the completions it will judge."""

    max_new_tokens: int  # the policy's completion budget
    longest_prompt: int  # tokens of the longest training prompt


# ----------------------------------------------------------------------------- templates


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, labels: Sequence[str]) -> tuple[str, str]:
    """The labels as a tuple; the template refused unless its fields are the problem, the two
    completions and optionally the labels, and the labels two distinct strings of which
    neither starts the other (so a verdict reads as one of them)."""
    if not isinstance(template, str):
        raise ValueError(f"judge_template={template!r} must be a string")
    try:
        fields = template_fields(template)
    except ValueError as error:
        raise ValueError(f"judge_template={template!r} is not a format string ({error}); "
                         "write literal braces as {{ and }}") from None
    missing = [f"{{{f}}}" for f in TEMPLATE_FIELDS if f not in fields]
    unknown = [f"{{{f}}}" for f in sorted(fields - {*TEMPLATE_FIELDS, *LABEL_FIELDS})]
    if missing or unknown:
        raise ValueError(f"judge_template={template!r} " + ("lacks " + ", ".join(missing)
                         if missing else "has unknown " + ", ".join(unknown))
                         + ": it takes {prompt} (the problem), {a} and {b} (the completions) "
                         "and optionally {label_a}, {label_b}")
    if (isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != 2
            or not all(isinstance(x, str) and x.strip() for x in labels)):
        raise ValueError(f"judge_labels={labels!r} must be two non-blank strings, e.g. "
                         "('A', 'B')")
    a, b = (x.strip() for x in labels)
    if a.startswith(b) or b.startswith(a):
        raise ValueError(f"judge_labels={tuple(labels)!r}: one label starts the other, so a "
                         "verdict could read as both; choose e.g. ('A', 'B')")
    return tuple(labels)


def render(template: str, labels: Sequence[str], prompt: str, a: str, b: str) -> str:
    return template.format(prompt=prompt, a=a, b=b, label_a=labels[0], label_b=labels[1])


def group_pairs(n_prompts: int, k: int) -> np.ndarray:
    """[C, 2]: every pair (x < y) of each prompt's k rows (prompt-major rows)."""
    within = np.asarray([(i, j) for i in range(k) for j in range(i + 1, k)], np.int32)
    return (np.arange(n_prompts, dtype=np.int32)[:, None, None] * k + within).reshape(-1, 2)


def comparison_texts(template: str, labels: Sequence[str], prompts_R: Sequence[str],
                     completions_R: Sequence[str], pairs_C2: np.ndarray) -> list[str]:
    """[2C]: pair c as (A=x, B=y) at 2c, then as (A=y, B=x) at 2c + 1."""
    out = []
    for x, y in pairs_C2:
        for first, second in ((x, y), (y, x)):
            out.append(render(template, labels, prompts_R[x], completions_R[first],
                              completions_R[second]))
    return out


# ----------------------------------------------------------------------------- verdicts


def parse_verdict(text: str, labels: Sequence[str]) -> int:
    """0 (label A), 1 (label B) or NO_VERDICT: the label the text starts with, whitespace
    stripped."""
    text = text.strip()
    for i, label in enumerate(labels):
        if text.startswith(label.strip()):
            return i
    return NO_VERDICT


def consistent_preference(verdicts_C2: np.ndarray) -> np.ndarray:
    """[C] +1 / −1 / 0 from the verdicts of both orders ([:, 0] with x as A, [:, 1] with y as
    A): x wins with A then B, y with B then A; anything else is a tie."""
    first, second = np.asarray(verdicts_C2).T
    return np.where((first == 0) & (second == 1), 1,
                    np.where((first == 1) & (second == 0), -1, 0)).astype(np.int32)


def win_rates(comparisons: Comparisons, n_rows: int, k: int) -> np.ndarray:
    """[R] float32: each row's consistent wins over the k − 1 other samples of its prompt."""
    x, y = comparisons.pairs.T
    wins = (np.bincount(x, comparisons.preference > 0, minlength=n_rows)
            + np.bincount(y, comparisons.preference < 0, minlength=n_rows))
    return (wins / (k - 1)).astype(np.float32)


def score_comparisons(scores_R: np.ndarray, k: int) -> Comparisons:
    """A scoring judge's comparisons: every pair of a prompt's samples, by score."""
    scores_R = np.asarray(scores_R, np.float32)
    pairs = group_pairs(len(scores_R) // k, k)
    return Comparisons(pairs, np.sign(scores_R[pairs[:, 0]] - scores_R[pairs[:, 1]])
                       .astype(np.int32))


def agreement_columns(comparisons: Comparisons, verifier_R: np.ndarray, k: int,
                      n_prompts: int) -> dict[str, np.ndarray]:
    """Per prompt [P] counts for METRICS: `judge_agreement` (pairs the verifier tells apart
    whose winner the judge picked) over `judge_agreement_count` (pairs the verifier tells
    apart), `judge_ties` (pairs without a verdict) over `judge_ties_count` (pairs judged)."""
    x, y = comparisons.pairs.T
    verifier_R = np.asarray(verifier_R, np.float32)
    truth_C = np.sign(verifier_R[x] - verifier_R[y]).astype(np.int32)
    decided_C = truth_C != 0
    prompt_C = x // k

    def count(flags_C: np.ndarray) -> np.ndarray:
        return np.bincount(prompt_C, flags_C.astype(np.float32), minlength=n_prompts)

    return {"judge_agreement": count(decided_C & (comparisons.preference == truth_C)),
            "judge_agreement_count": count(decided_C),
            "judge_ties": count(comparisons.preference == 0),
            "judge_ties_count": count(np.ones_like(decided_C))}


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class ModelJudge:
    """The stage's teacher as judge (`judge='model'`); see the module docstring.

    `slots`: the fixed length every comparison prompt is padded to; `label_ids`: the labels'
    tokens ('logprob' verdicts)."""

    cfg: Any
    params: Any
    tokenizer: Any
    template: str
    labels: tuple[str, str]
    verdict: str
    sampling: Any
    slots: int
    label_ids: tuple[int, int] | None
    rng: jax.Array
    mesh: Any
    where: str

    def comparison_prompts(self, prompts_R: Sequence[str], completions_R: Sequence[str],
                           k: int) -> tuple[Comparisons, list[np.ndarray]]:
        """(the pairs, with no preference yet; their 2C prompts as token ids)."""
        from cascade_jax import prompts

        pairs = group_pairs(len(prompts_R) // k, k)
        ids = prompts.encode_prompts(self.tokenizer, comparison_texts(
            self.template, self.labels, prompts_R, completions_R, pairs))
        longest = max(len(p) for p in ids)
        if longest > self.slots:
            raise ValueError(f"{self.where}: a comparison prompt has {longest} tokens, more than "
                             f"the {self.slots} slots its bound gave (template + longest problem"
                             " + 2 × max_new_tokens); the tokenizer re-encodes a completion "
                             "longer than it was sampled: lower max_new_tokens or shorten "
                             "judge_template")
        return Comparisons(pairs, np.zeros(len(pairs), np.int32)), ids

    def key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.rng, JUDGE_STREAM), step)

    def verdicts(self, prompt_ids: Sequence[np.ndarray], step: int) -> np.ndarray:
        """[2C] verdicts (0, 1, NO_VERDICT) of the comparison prompts, one compiled call."""
        from cascade_jax import generate, prompts

        if self.verdict == "logprob":
            logprobs = generate.next_token_logprobs(self.cfg, self.params, prompt_ids,
                                                    self.label_ids, mesh=self.mesh,
                                                    prompt_len=self.slots)
            return np.where(logprobs[:, 0] > logprobs[:, 1], 0,
                            np.where(logprobs[:, 1] > logprobs[:, 0], 1, NO_VERDICT))
        out = generate.generate(self.cfg, self.params, prompt_ids, self.sampling,
                                rng=self.key(step), mesh=self.mesh, prompt_len=self.slots)
        texts = prompts.decode_completions(self.tokenizer, out.tokens, out.lengths)
        return np.asarray([parse_verdict(t, self.labels) for t in texts], np.int32)

    def __call__(self, prompts_R: Sequence[str], completions_R: Sequence[str],
                 lengths_R: np.ndarray, *, k: int, step: int) -> Judgement:
        comparisons, ids = self.comparison_prompts(prompts_R, completions_R, k)
        preference = consistent_preference(self.verdicts(ids, step).reshape(-1, 2))
        comparisons = comparisons._replace(preference=preference)
        return Judgement(win_rates(comparisons, len(prompts_R), k), comparisons)


def model_judge(ctx: StageContext, settings: Any, shape: RolloutShape) -> ModelJudge:
    """`judge='model'`: the stage's teacher, checked to take the comparisons."""
    from cascade_jax import data, generate, prompts

    where = f"stage {ctx.stage_name!r}"
    key = f"config.stages.{ctx.stage_name}"
    teacher = ctx.teacher
    if teacher is None:
        raise ValueError(f"{where}: preference.judge='model' judges with the stage's teacher, "
                         f"but it has none; set {key}.teacher to 'root', 'parent', an earlier "
                         "stage or an Orbax checkpoint directory")
    if teacher.cfg.vocab_size != ctx.student.vocab_size:
        raise ValueError(f"{where}: the judge (teacher {teacher.name!r}) has vocab_size="
                         f"{teacher.cfg.vocab_size}, the policy {ctx.student.vocab_size}; the "
                         "judge reads the policy's tokens: use a judge with its tokenizer")
    labels = tuple(settings.judge_labels)
    try:
        overhead = len(prompts.encode_prompts(ctx.tokenizer, [
            render(settings.judge_template, labels, "", "", "")])[0])
        label_ids = prompts.encode_completions(ctx.tokenizer, [x.strip() for x in labels])
    except ValueError as error:
        raise ValueError(f"{where}: preference.judge_template or judge_labels cannot be encoded "
                         f"by the run's tokenizer ({error}); write them in its alphabet, e.g. "
                         "judge_template='{prompt}{a}#{b}=', judge_labels=('1', '2') for a "
                         "task's character tokenizer") from None
    if settings.judge_verdict == "logprob":
        if any(len(ids) != 1 for ids in label_ids):
            raise ValueError(f"{where}: judge_verdict='logprob' reads one token per label, but "
                             f"judge_labels={labels!r} encode to {[len(i) for i in label_ids]} "
                             "tokens; choose single-token labels, or judge_verdict='generate'")
        verdict_tokens, ids = 1, (int(label_ids[0][0]), int(label_ids[1][0]))
    else:
        verdict_tokens, ids = settings.judge_max_new_tokens, None
        longest_label = max(len(i) for i in label_ids)
        if longest_label > verdict_tokens:
            raise ValueError(f"{where}: judge_labels={labels!r} take {longest_label} tokens, "
                             f"more than judge_max_new_tokens={verdict_tokens}; raise it")
    slots = overhead + shape.longest_prompt + 2 * shape.max_new_tokens
    if slots + verdict_tokens > teacher.cfg.max_seq_len:
        raise ValueError(
            f"{where}: a comparison prompt takes up to {slots} tokens (judge_template "
            f"{overhead} + longest problem {shape.longest_prompt} + 2 × max_new_tokens "
            f"{shape.max_new_tokens}) and its verdict {verdict_tokens} more: "
            f"{slots + verdict_tokens} > the judge's (teacher {teacher.name!r}) max_seq_len="
            f"{teacher.cfg.max_seq_len}; lower preference.max_new_tokens, shorten "
            "judge_template, or judge with a model of a longer context")
    eos = data.eos_id(ctx.tokenizer)
    sampling = generate.SamplingParams(verdict_tokens, temperature=settings.judge_temperature,
                                       stop_tokens=() if eos is None else (eos,))
    return ModelJudge(teacher.cfg, teacher.params, ctx.tokenizer, settings.judge_template,
                      labels, settings.judge_verdict, sampling, slots, ids, ctx.rng, ctx.mesh,
                      where)
