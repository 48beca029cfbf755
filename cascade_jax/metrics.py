"""Metric files every run writes: JSON lines (for scripts and plots) and TensorBoard events.

Only process 0 writes, so a multi-host job produces one copy. Lines are flushed as written:
a killed run keeps everything it logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Self

import jax


class MetricWriter:
    """Append scalars to `<workdir>/metrics.jsonl` and TensorBoard event files in `<workdir>/tb`.

    Each record is `{"step": int, "split": str, <name>: float, ...}`.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only where used

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        if not self._active:
            return
        values = {name: float(value) for name, value in scalars.items()}
        self._file.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{split}/{name}", value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
    """Records from `metrics.jsonl` by step, optionally of one split (for plots and tables).

    After a resume, steps past the last checkpoint are logged twice; the later record (the
    run that went on) wins. A last line cut short by a kill is ignored.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if split is None or record["split"] == split:
                latest[(record["split"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: r["step"])
