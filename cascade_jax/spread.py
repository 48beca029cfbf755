"""The same job over several seeds: what a reading of the results table may rest on.

XLA's numerics differ between CPUs, and one seed's table cannot carry a one-point difference:
the tiny reasoning job's children moved 3–20 points on another machine. A job run with
several seeds reports each figure as its mean and min–max over the seeds, and a difference
between two rows is read only where their ranges do not overlap (`separated`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Columns that describe a row rather than measure it.
_NOT_FIGURES = ("stage", "baseline", "teacher", "fingerprint", "params", "tokens", "wall_s")


def figures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric columns of a results table that measure something, in table order."""
    names: dict[str, None] = {}
    for row in rows:
        for name, value in row.items():
            if (name not in _NOT_FIGURES and isinstance(value, int | float)
                    and not isinstance(value, bool)):
                names[name] = None
    return list(names)


def spread(runs: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per stage: for each figure, {'mean', 'min', 'max', 'n'} over the seeds' runs
    (`runs`: seed → that run's results rows); NaNs (a column a row does not have) skipped."""
    stages = list(dict.fromkeys(r["stage"] for rows in runs.values() for r in rows))
    names = figures([r for rows in runs.values() for r in rows])
    out = []
    for stage in stages:
        row: dict[str, Any] = {"stage": stage}
        for name in names:
            values = [r[name] for rows in runs.values() for r in rows
                      if r["stage"] == stage and isinstance(r.get(name), int | float)
                      and not math.isnan(r[name])]
            if values:
                row[name] = {"mean": sum(values) / len(values), "min": min(values),
                             "max": max(values), "n": len(values)}
        out.append(row)
    return out


def separated(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two figures' seed ranges do not overlap: the only differences worth reading."""
    return a["max"] < b["min"] or b["max"] < a["min"]


def spread_markdown(runs: Mapping[int, Sequence[Mapping[str, Any]]]) -> str:
    """The spread as a table: `mean [min–max]` per stage and figure, seeds named above it."""
    rows = spread(runs)
    names = figures([r for rows_ in runs.values() for r in rows_])
    lines = [f"seeds {sorted(runs)}: mean [min–max] over the seeds", "",
             "| stage | " + " | ".join(names) + " |",
             "|---|" + "|".join("---" for _ in names) + "|"]
    for row in rows:
        cells = []
        for name in names:
            found = row.get(name)
            cells.append("–" if found is None else
                         f"{found['mean']:.3f} [{found['min']:.3f}–{found['max']:.3f}]")
        lines.append(f"| {row['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
