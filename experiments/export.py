"""A finished cascade stage as a Hugging Face directory:
`python -m experiments.export --workdir runs/tiny_cascade --stage child --out child_hf`.

Writes the stage in its root's format (`cascade_jax.export`): a Mistral 3 wrapper root's
stages as the wrapper again (vision tower carried, projector mapped), anything else text-only;
`--text_only` forces the text model. The root's tokenizer files come along when the root was
a Hugging Face directory. Writes only what it owns: `--out` may not be (or hold, or lie
inside) the run, a stage, a checkpoint or the root; a non-empty `--out` is replaced only when
it is a previous export (its `export.json`) and `--overwrite` is given. An unfinished stage is
exported only with `--step`.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import last_line_is_the_cause, quiet_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The cascade run's directory.", required=True)
_STAGE = flags.DEFINE_string("stage", None, "The stage to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.", required=True)
_TEXT_ONLY = flags.DEFINE_bool("text_only", False, "Write the text model even when the root "
                               "is a Mistral 3 wrapper.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous export at --out.")
_STEP = flags.DEFINE_integer("step", None, "Export this checkpoint step (needed for an "
                             "unfinished stage); default the finished stage's last.")


@last_line_is_the_cause
def main(argv: list[str]) -> None:
    del argv
    quiet_logging()
    from cascade_jax import export

    out = export.export(_WORKDIR.value, _STAGE.value, _OUT.value,
                        vision=False if _TEXT_ONLY.value else None,
                        overwrite=_OVERWRITE.value, step=_STEP.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
