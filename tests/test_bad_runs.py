"""Bad or unlucky runs, by surface (run directories, CLI, concurrency, non-finite training):
each case asserts the message (the value or path, and a way out) and that nothing on disk
changed (a hash of the directory before and after). The file and API inputs are in
`tests/test_bad_inputs.py`."""

import errno
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from cascade_jax import (
    cascade,
    checkpoint,
    loop,
    model,
    objectives,
    rundir,
    sharding,
    steps,
    train,
)
from cascade_jax.config import ModelConfig
from experiments import common
from experiments import prune as prune_main

REPO = pathlib.Path(__file__).resolve().parents[1]


def train_config(corpus_dir: str, workdir: str, **changes) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0,
        model=dict(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                   d_ff=32, max_seq_len=16, tie_embeddings=True),
        data=dict(source=f"text:{corpus_dir}/*.py", tokenizer=f"{corpus_dir}/tokenizer.json",
                  seq_len=16, batch_size=8, validation_percent=25),
        mesh=dict(data=-1, fsdp=1, tensor=1),
        optim=dict(lr=1e-2, warmup_steps=1), steps=4, log_every=1, eval_every=0,
        eval_batches=1, checkpoint_every=2, keep_checkpoints=10))
    config.update(changes)
    return config


def cascade_config(corpus_dir: str, workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        workdir=workdir, seed=0,
        root=dict(kind="scratch", model=train_config(corpus_dir, "").model.to_dict(), steps=2,
                  optim=dict(lr=1e-2, warmup_steps=1)),
        data=train_config(corpus_dir, "").data.to_dict(), mesh=dict(data=-1),
        stage_order=("child",),
        stages=dict(child=dict(parent="root", teacher="root", objective="kd",
                               kd=dict(chunk_size=8), target=dict(d_ff=16), steps=2,
                               optim=dict(lr=1e-2, warmup_steps=1), calib_batches=1)),
        log_every=1, eval_batches=1))


@pytest.fixture(scope="module")
def train_run(corpus_dir, tmp_path_factory) -> str:
    """One finished 4-step train run (checkpoints at 2 and 4)."""
    workdir = str(tmp_path_factory.mktemp("train_run"))
    train.run(train_config(corpus_dir, workdir))
    return workdir


# ------------------------------------------------------------------------ run directories


def test_train_into_another_configs_run_is_refused_untouched(train_run, corpus_dir, tree_hash):
    before = tree_hash(train_run)
    config = train_config(corpus_dir, train_run, optim=dict(lr=3e-3, warmup_steps=1))
    with pytest.raises(rundir.WorkdirError, match=r"different config \(differs in \['optim'\]\)"):
        train.run(config)
    assert tree_hash(train_run) == before


def test_rerunning_the_same_train_run_resumes_it(train_run, corpus_dir):
    summary = train.run(train_config(corpus_dir, train_run))
    assert summary["steps"] == 4


def test_train_into_a_cascade_stage_is_refused_untouched(corpus_dir, tmp_path, tree_hash):
    stage = tmp_path / "cascade" / "root"
    rundir.mark_stage(str(stage), run=str(tmp_path / "cascade"), stage="root")
    (stage / "result.json").write_text("{}")
    before = tree_hash(tmp_path)
    with pytest.raises(rundir.WorkdirError, match=r"holds stage 'root' of the cascade run in .*"
                                                  r"not a train run"):
        train.run(train_config(corpus_dir, str(stage)))
    assert tree_hash(tmp_path) == before


def test_train_into_an_unrelated_directory_is_refused_untouched(corpus_dir, tmp_path, tree_hash):
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    with pytest.raises(rundir.WorkdirError, match=r"is not empty \(notes.txt\) and was not made "
                                                  r"by this tool \(train\)"):
        train.run(train_config(corpus_dir, str(tmp_path)))
    assert tree_hash(tmp_path) == before


def test_a_cascade_into_a_train_run_is_refused_untouched(train_run, corpus_dir, tree_hash):
    before = tree_hash(train_run)
    with pytest.raises(rundir.WorkdirError, match="holds a train run, not a cascade run"):
        cascade.run(cascade_config(corpus_dir, train_run), progress=False)
    assert tree_hash(train_run) == before


def test_a_bad_train_value_fails_before_the_directory_exists(corpus_dir, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"config.steps=1 must exceed config.optim.warmup_steps"):
        train.run(train_config(corpus_dir, str(workdir), steps=1))
    with pytest.raises(ValueError, match=r"config.model.vocab_size=64 is smaller than the "
                                         r"tokenizer's vocabulary \(320\)"):
        train.run(train_config(corpus_dir, str(workdir),
                               model=dict(train_config(corpus_dir, "").model.to_dict(),
                                          vocab_size=64)))
    assert not workdir.exists()


def test_cascade_checks_fail_in_seconds_and_leave_the_directory_unclaimed(corpus_dir,
                                                                          tmp_path):
    """Bad target, missing teacher, teacher of another vocabulary: refused before the root
    trains and before the directory is claimed, so the corrected command can run there."""
    workdir = tmp_path / "run"
    config = cascade_config(corpus_dir, str(workdir))
    config.stages.child.target.d_ff = 64
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"config.stages.child.target: .*d_ff=64 exceeds the "
                                         r"parent's d_ff=32"):
        cascade.run(config, progress=False)
    config = cascade_config(corpus_dir, str(workdir))
    config.stages.child.teacher = str(tmp_path / "no_such_teacher")
    with pytest.raises(ValueError, match=r"config.stages.child.teacher='.*no_such_teacher' is "
                                         r"neither 'parent'"):
        cascade.run(config, progress=False)
    other = ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32, max_seq_len=16)
    teacher_dir = tmp_path / "teacher"
    checkpoint.save(str(teacher_dir), 1,
                    {"params": jax.device_get(model.init(other, jax.random.key(0)))},
                    metadata={"model": other.to_dict()})
    config = cascade_config(corpus_dir, str(workdir))
    config.stages.child.teacher = str(teacher_dir)
    with pytest.raises(ValueError, match=r"teacher=.* has vocab_size=300 but the child has 320"):
        cascade.run(config, progress=False)
    config = cascade_config(corpus_dir, str(workdir))
    config.data.seq_len = 32  # the models' max_seq_len is 16
    with pytest.raises(ValueError, match=r"config.data.seq_len=32 exceeds root's max_seq_len=16"):
        cascade.run(config, progress=False)
    assert time.perf_counter() - start < 60
    assert not workdir.exists() or rundir.read_owner(str(workdir)) is None
    rundir.claim(str(workdir), tool="cascade", config={"fixed": True})  # free to claim


# ----------------------------------------------------------------------------- the CLI


def test_prune_overwrite_never_touches_the_parent_or_foreign_files(tmp_path, tree_hash):
    parent = tmp_path / "models" / "parent"
    parent.mkdir(parents=True)
    (parent / "config.json").write_text("{}")
    (tmp_path / "models" / "unrelated.txt").write_text("keep me")
    before = tree_hash(tmp_path)
    for out, message in ((tmp_path / "models", "is, holds or lies inside the parent's"),
                         (parent, "is, holds or lies inside the parent's"),
                         (parent / "child", "is, holds or lies inside the parent's")):
        with pytest.raises(ValueError, match=message):
            prune_main.check_output(str(out), True, str(parent))
    assert tree_hash(tmp_path) == before
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / prune_main.RECORD_FILE).write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds files this tool never writes "
                                              r"\(thesis.tex\)"):
        prune_main.check_output(str(foreign), True, str(parent))
    assert (foreign / "thesis.tex").read_text() == "years of work"
    (foreign / "thesis.tex").unlink()
    (foreign / prune_main.RECORD_FILE).unlink()
    (foreign / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"has no prune_record\.json, so it is not an "
                                              r"experiments\.prune output"):
        prune_main.check_output(str(foreign), True, str(parent))
    with pytest.raises(FileExistsError, match="pass --overwrite to replace a previous"):
        prune_main.check_output(str(foreign), False, str(parent))
    (foreign / prune_main.RECORD_FILE).write_text("{}")
    prune_main.check_output(str(foreign), True, str(parent))  # our own output: may be replaced


def test_the_last_line_of_a_failed_main_is_the_cause():
    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "/runs/x/checkpoints/4"
    try:
        try:
            raise full
        except OSError as inner:
            raise ImportError("cannot import name 'x' (shutdown)") from inner
    except ImportError as outer:
        assert common.cause(outer) == ("no space left on /runs/x/checkpoints/4: free space "
                                       "there or choose another directory")
    assert common.cause(ValueError("config.steps=0 must be a positive integer\nmore")) == (
        "ValueError: config.steps=0 must be a positive integer")


def test_a_cli_error_ends_with_the_cause(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/tiny_teacher.py",
         f"--config.workdir={tmp_path}/run", "--config.steps=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: ValueError: config.steps=0 must be a positive integer")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- concurrency


def test_a_live_lock_is_refused_and_a_dead_ones_is_taken_over(tmp_path, tree_hash):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / rundir.LOCK_FILE
        lock.write_text(f'{{"pid": {sleeper.pid}, "host": "{os.uname().nodename}", '
                        f'"since": {time.time()}}}')
        before = tree_hash(tmp_path)
        with (pytest.raises(rundir.WorkdirError, match=rf"in use by pid {sleeper.pid} on "),
              rundir.lock(str(tmp_path))):
            pass
        assert tree_hash(tmp_path) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    with rundir.lock(str(tmp_path)):  # its process is gone: a kill -9's leftover
        assert f'"pid": {os.getpid()}' in lock.read_text()
    assert not lock.exists()


def test_two_cascades_on_one_directory_at_once(corpus_dir, tmp_path):
    """`python -m experiments.cascade` twice on one directory: the second is refused while
    the first holds it, and its metrics never join the first's."""
    config = cascade_config(corpus_dir, str(tmp_path / "run"))
    config.root.steps = 20000  # still training when the second one starts; killed after
    config.log_every = 1000
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n"
        f"def get_config():\n    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    command = [sys.executable, "-m", "experiments.cascade", f"--config={config_file}",
               "--progress=false"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock = tmp_path / "run" / rundir.LOCK_FILE
        deadline = time.time() + 240
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lock.exists(), first.communicate()[1][-2000:]
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert f"is in use by pid {first.pid} on" in second.stderr.strip().splitlines()[-1]
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------- non-finite training


def test_a_nan_run_never_checkpoints_a_non_finite_state(corpus_dir, tmp_path):
    workdir = tmp_path / "nan"
    config = train_config(corpus_dir, str(workdir), steps=8, checkpoint_every=1,
                          optim=dict(lr=1e9, warmup_steps=1))
    with pytest.raises(loop.NonFiniteLossError) as error:
        train.run(config)
    message = str(error.value)
    assert "at step" in message and "stopped without saving" in message
    ckpt_dir = str(workdir / "checkpoints")
    saved = checkpoint.all_steps(ckpt_dir)
    if saved:
        assert f"the last good checkpoint is step {saved[-1]} (verified finite)" in message
    cfg = ModelConfig.from_dict(train_config(corpus_dir, "").model.to_dict())
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    target = steps.abstract_like(model.param_shapes(cfg), sharding.param_shardings(cfg, mesh))
    for step in saved:  # every leaf of every saved step
        params = checkpoint.restore(ckpt_dir, {"params": target}, step=step,
                                    partial=True).state["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step


@pytest.mark.parametrize("content, message", [
    ("", r"is not a readable cascade_jax lock \(.*is not valid JSON"),
    ("pid 12", r"is not a readable cascade_jax lock"),
    ('{"pid": "12", "host": "h"}', r"is not a cascade_jax lock \(it holds"),
    ("[1, 2]", r"is not a cascade_jax lock \(it holds"),
    (None, r"is a directory, so it is not a cascade_jax lock: remove it"),
    ("unreadable", r"is not a readable cascade_jax lock \(.*Permission denied.*\); if no run "
                   r"is using .*, delete"),
])
def test_a_lock_file_that_is_no_lock_is_refused_naming_it_never_waited_on(
        tmp_path, tree_hash, monkeypatch, content, message):
    monkeypatch.setattr(rundir, "_TORN_S", 0.2)  # how long a torn lock may take to finish
    lock = tmp_path / rundir.LOCK_FILE
    if content is None:
        lock.mkdir()
    else:
        lock.write_text(content)
    if content == "unreadable":  # as chmod 000 would make it for anyone but root
        def unreadable(path, *args):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(rundir.files, "read_json", unreadable)
    before = tree_hash(tmp_path)
    start = time.monotonic()
    with (pytest.raises(rundir.WorkdirError, match=rf"{lock} {message}"),
          rundir.lock(str(tmp_path))):
        pass
    assert time.monotonic() - start < 10
    assert tree_hash(tmp_path) == before


# ------------------------------------------------------------------- checks before work


def test_every_jsonl_a_stage_names_is_checked_before_the_root_trains(corpus_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    workdir = tmp_path / "run"
    config = cascade_config(corpus_dir, str(workdir))
    del config.stages.child["kd"]
    config.stages.child.objective = "preference"
    config.stages.child.preference = dict(source=str(pairs))
    line = {"prompt": "def f(", "chosen": "x): pass", "rejected": "):", "score_chosen": 1.0,
            "score_rejected": 0.0}
    for bad, message in (({"score_chosen": "1.0"}, r"score_chosen='1.0' must be a finite "
                                                   r"number"),
                         ({"score_rejected": float("nan")}, r"score_rejected=nan must be a "
                                                            r"finite number"),
                         ({"chosen": 3}, r"has no string field 'chosen'")):
        pairs.write_text(json.dumps(line) + "\n" + json.dumps({**line, **bad}) + "\n")
        with pytest.raises(ValueError, match=rf"config.stages.child: {pairs}:2 {message}"):
            cascade.run(config, progress=False)
        assert not workdir.exists() or rundir.read_owner(str(workdir)) is None


def test_the_shipped_configs_take_the_documented_keys_from_the_command_line(tmp_path):
    """README documents `seq_kd.source` and `preference.source`: each shipped config's stages
    of those objectives take them as command-line overrides (a locked ConfigDict refuses a key
    it lacks), and a bad sampling temperature is reported under its own key."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_reasoning",
                                                  REPO / "configs" / "tiny_reasoning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key in ("child_seq_kd.seq_kd.source", "child_kd_instruct.preference.source"):
        config = module.get_config("quick")
        config.lock()  # as --config=... does: `--config.<key>=...` may only set existing keys
        stage, objective, field = key.split(".")
        config.stages[stage][objective][field] = str(tmp_path / "t.jsonl")
        assert config.stages[stage][objective][field] == str(tmp_path / "t.jsonl")
    preference = objectives.get("preference")
    for block, message in ((dict(judge="model", judge_temperature="0"),
                            r"judge_temperature='0' must be a finite number >= 0"),
                           (dict(sample_temperature=-1.0),
                            r"sample_temperature=-1.0 must be a finite number >= 0")):
        with pytest.raises(ValueError, match=rf"stages.i.preference: {message}"):
            preference.parse_settings(block, "stages.i.preference")
    for name in ("grpo", "on_policy"):
        with pytest.raises(ValueError, match=r"sample_temperature=nan must be a finite"):
            objectives.get(name).parse_settings(dict(sample_temperature=float("nan")), name)


def test_a_cli_that_waits_says_so_on_stderr(monkeypatch, capsys):
    """--multihost blocks in jax.distributed.initialize() until every process has started:
    the user sees why nothing happens."""
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: joined.append(True))
    common.start(True)
    assert joined == [True]
    assert "waits until every process of the job has started" in capsys.readouterr().err
