"""Never lose a run: break training on purpose and check what survives.

Each test is one promise of the README's "What survives what": kill -9 at any
moment, the log, the NaN guard, no growth, disk trouble, bad configs, resume
mismatches, two runs in one folder.

A train.py start costs seconds of TensorFlow import. The processes here are
forked from a server that imported `train` once (multiprocessing's
"forkserver"), and run `train.cli(argv)` - what `python train.py ARGV` runs -
with their own stdout/stderr files; so a kill -9 hits a real training process
and each start costs only the graph build. The command-line contract (exit
code, one `error:` line, no traceback) is also checked on real `python train.py`.
"""
import dataclasses
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

import config
import gan
import runs
import train
from conftest import ROOT, assert_clear_error, assert_said, write_tiles

tf1 = tf.compat.v1
SMOKE = os.path.join(ROOT, "configs", "smoke.json")


# ---------------------------------------------------------------- processes

def _train_in_child(argv, out_dir, file_size_limit):
    """Body of a forked process: `python train.py ARGV`, output to out_dir/stdout|stderr."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    if file_size_limit:  # writes past it fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    os.chdir(ROOT)
    sys.exit(train.cli(argv))


class Training:
    """One train.py process; `kill()` is a kill -9."""

    def __init__(self, ctx, args, out_dir, file_size_limit=0):
        self.out_dir = tempfile.mkdtemp(dir=out_dir, prefix="proc-")
        self.proc = ctx.Process(target=_train_in_child,
                                args=([str(a) for a in args], self.out_dir, file_size_limit))
        self.proc.start()
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.is_alive()

    def wait(self, timeout=180):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            raise AssertionError(f"train.py did not finish in {timeout} s:\n{self.output()}")
        return self.proc.exitcode

    def kill(self):
        self.proc.kill()
        self.proc.join()
        return self.proc.exitcode

    def read(self, name):
        with open(os.path.join(self.out_dir, name)) as f:
            return f.read()

    def output(self):
        return self.read("stdout")[-3000:] + "\n--- stderr ---\n" + self.read("stderr")[-3000:]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """start(*args, file_size_limit=0) -> a running Training."""
    ctx = multiprocessing.get_context("forkserver")
    # The server imports from the project folder only (Python 3.11 leaves out the
    # tests' sys.path): TensorFlow via train, and what this file imports, so a child
    # only runs this file's own top-level lines.
    ctx.set_forkserver_preload(["train", "pytest", "hypothesis", "PIL.Image"])
    out_dir = str(tmp_path_factory.mktemp("processes"))
    return lambda *args, file_size_limit=0: Training(ctx, args, out_dir, file_size_limit)


@pytest.fixture(scope="module")
def tiles16(tmp_path_factory):
    """24 small tiles: enough for batch 8, read in milliseconds."""
    return write_tiles(str(tmp_path_factory.mktemp("tiles16")), 24, size=16)


def smoke(tiles, *sets):
    """configs/smoke.json on the small tiles, with `section.key=value` overrides."""
    args = ["--config", SMOKE, "--set", f"data.path={tiles}"]
    for item in sets:
        args += ["--set", item]
    return args


def small(tiles, *sets):
    """The trained runs here: smoke.json's net at 8x8 pixels and 128 filters, which
    starts quicker and saves slower (4 MB checkpoints: a kill can land inside)."""
    return smoke(tiles, "model.image_size=8", "model.gen_filters=128",
                 "model.disc_filters=128", *sets)


def killed_before_its_first_checkpoint(run):
    """What a kill -9 during the first checkpoint save leaves in a run folder."""
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config.load(SMOKE).to_dict(), f)
    with open(os.path.join(run, "checkpoints", "model-5.state.npz"), "w") as f:
        f.write("the sidecar of a save the kill cut short")
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"st')


@pytest.fixture(scope="module")
def trained_run(start, tiles16, tmp_path_factory):
    """A finished 20-step run with checkpoints at steps 10, 15, 20; copy it before use.

    It is started, as a user would, in the folder of an attempt killed before its
    first checkpoint (see test_a_run_killed_before_its_first_checkpoint_starts_again).
    """
    run = str(tmp_path_factory.mktemp("trained") / "run")
    killed_before_its_first_checkpoint(run)
    proc = start(*small(tiles16, "train.steps=20", "train.checkpoint_every=5"), "--out", run)
    assert proc.wait() == 0, proc.output()
    return run


def hold_lock(run):
    """A process that holds the run's lock as a training process does; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            runs.acquire_lock(run)
            time.sleep(120)
        finally:
            os._exit(0)
    lock, deadline = os.path.join(run, "lock"), time.time() + 30
    while not (os.path.exists(lock) and open(lock).read().startswith(f"{pid} ")):
        assert time.time() < deadline, "the lock holder did not start"
        time.sleep(0.01)
    return pid


def process_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture(scope="module")
def faulty_resumes(start, trained_run, tmp_path_factory):
    """Copies of trained_run resumed with one fault each, all started at once:
    {name: (run folder, Training)}. The tests of promises 1, 3, 5, 7 and 8 read them.

    "nan" is resumed after a kill -9 whose process is not reaped yet (a zombie, which
    os.kill(pid, 0) still finds): its lock is left behind; the zombie's pid is
    scenarios["zombie"].
    """
    scenarios = {
        "nan": ["--set", "train.steps=40", "--set", "train.keep_checkpoints=1",
                "--set", "train.lr_disc=1e30", "--set", "train.lr_gen=1e30"],
        "disk full": ["--set", "train.steps=30"],
        "path blocked": ["--set", "train.steps=30"],
        # from the older of its last two checkpoints, as after a divergence noticed late
        "safe changes": ["--set", "train.steps=17", "--set", "train.lr_gen=1e-4",
                         "--set", "train.sample_every=2"],
    }
    started = {}
    for name, args in scenarios.items():
        run = shutil.copytree(trained_run, str(tmp_path_factory.mktemp("resumed") / "run"))
        if name == "path blocked":  # a folder where the Saver must put the index of step 25
            os.mkdir(os.path.join(run, "checkpoints", "model-25.index"))
        if name == "nan":
            zombie = hold_lock(run)
            os.kill(zombie, signal.SIGKILL)
            deadline = time.time() + 10
            while process_state(zombie) != "Z":
                assert time.time() < deadline, "the killed lock holder did not become a zombie"
                time.sleep(0.01)
        # Disk full: writes past 200 kB fail with EFBIG as they would with ENOSPC; the
        # checkpoint's data file (4 MB) is the first file to grow that large.
        limit = 200_000 if name == "disk full" else 0
        resume = os.path.join(run, "checkpoints", "model-15") if name == "safe changes" else run
        started[name] = run, start("--resume", resume, *args, file_size_limit=limit)
    started["zombie"] = zombie
    yield started
    os.waitpid(zombie, 0)


def copy_of(run, tmp_path):
    return shutil.copytree(run, str(tmp_path / "run"))


# ---------------------------------------------------------------- what a user can check

def read_log_lines(run):
    """Decoded lines of log.jsonl; only the last line may be torn (it is then left out)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"log line {i + 1} of {len(lines)} is torn: {line!r}"
    return records


def step_records(records):
    return [r for r in records if "event" not in r]


def readable(prefix):
    """The test's own check of a checkpoint: every tensor and the sidecar read back."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        with np.load(prefix + ".state.npz") as f:
            for key in f.files:
                f[key]
    except (tf.errors.OpError, OSError, ValueError, EOFError):
        return False
    return True


def newest_readable(ckpt_dir):
    steps = sorted((int(n[len("model-"):-len(".index")]) for n in os.listdir(ckpt_dir)
                    if n.startswith("model-") and n.endswith(".index")), reverse=True)
    return next((s for s in steps if readable(os.path.join(ckpt_dir, f"model-{s}"))), None)


def wait_until(condition, proc, what, timeout=90):
    deadline = time.time() + timeout
    while not condition():
        if not proc.alive():
            raise AssertionError(f"train.py ended before {what}:\n{proc.output()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout} s:\n{proc.output()}")
        time.sleep(0.001)


# ---------------------------------------------------------------- 1, 2: kill -9, the log

def _indexes(ckpt_dir):
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return set()
    return {int(n[6:-6]) for n in names if n.startswith("model-") and n.endswith(".index")}


def _kill_moment(plan, proc, run, resumed_at, rng):
    """Wait for the moment `plan` names; returns once train.py should be killed."""
    ckpt_dir = os.path.join(run, "checkpoints")
    names = lambda: os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if plan == "starting":  # data, graph, session, restore
        time.sleep(rng.uniform(0.2, 2.0))
    elif plan == "resuming":  # lock taken: session, restore, log repair
        lock = os.path.join(run, "lock")
        holder = lambda: open(lock).read().split()[:1] if os.path.exists(lock) else []
        wait_until(lambda: holder() == [str(proc.pid)], proc, "the lock")
    elif plan == "sidecar written":  # the Saver has not finished
        wait_until(lambda: any(n.endswith(".state.npz") and int(n[6:-10]) > resumed_at
                               and f"{n[:-10]}.index" not in names() for n in names()),
                   proc, "a new sidecar")
    elif plan == "saver writing":
        wait_until(lambda: any(".tempstate" in n for n in names()), proc, "a Saver temporary file")
    elif plan == "index written":  # before or while TF's `checkpoint` file and retention
        wait_until(lambda: any(s > resumed_at for s in _indexes(ckpt_dir)), proc, "a new index")
    elif plan == "training":
        target = resumed_at + rng.randint(1, 2)
        log = os.path.join(run, "log.jsonl")
        wait_until(lambda: any(r.get("step", 0) >= target and "event" not in r
                               for r in runs.read_log(log)[-3:]), proc, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.3))


KILL_PLANS = ["sidecar written", "saver writing", "index written", "training", "resuming",
              "starting", "sidecar written", "starting", "saver writing"]


def test_kill_9_at_any_moment_then_resume_continues_exactly(start, tiles16, trained_run, tmp_path):
    """Promises 1 and 2: 10 kills -9, 5 of them timed into checkpoint saves, each followed
    by --resume RUN; the log ends with every step once and equals trained_run's, which
    ran the same 20 steps unbroken (checkpoint and sample intervals change no value)."""
    rng = random.Random(2024)
    run = str(tmp_path / "run")
    ckpt_dir = os.path.join(run, "checkpoints")
    proc = start(*small(tiles16, "train.checkpoint_every=1", "train.sample_every=3",
                        "train.keep_checkpoints=2", "train.steps=1000"), "--out", run)
    wait_until(lambda: _indexes(ckpt_dir), proc, "the first checkpoint")
    assert proc.kill() == -signal.SIGKILL
    expected, interrupted_saves, resumes_seen = newest_readable(ckpt_dir), 0, 0
    for i, plan in enumerate(KILL_PLANS):
        if i == 2:  # a kill mid-write of a log line
            with open(os.path.join(run, "log.jsonl"), "a") as f:
                f.write('{"step": 999, "d_real_lo')
        if i == 4:  # TF's own index names a checkpoint that is not there
            with open(os.path.join(ckpt_dir, "checkpoint"), "w") as f:
                f.write('model_checkpoint_path: "model-99999"\nall_model_checkpoint_paths: "mo')
        if i == 7:
            os.remove(os.path.join(ckpt_dir, "checkpoint"))
        proc = start("--resume", run)
        _kill_moment(plan, proc, run, expected, rng)
        assert proc.kill() == -signal.SIGKILL, f"kill {i} ({plan}):\n{proc.output()}"

        records = read_log_lines(run)
        steps = [r["step"] for r in step_records(records)]
        assert steps == sorted(set(steps)), f"kill {i} ({plan}): duplicate steps in the log"
        resumes = [r for r in records if r.get("event") == "resume"]
        if len(resumes) > resumes_seen:  # this process got as far as restoring
            assert resumes[-1]["checkpoint"] == os.path.join(ckpt_dir, f"model-{expected}"), \
                f"kill {i} ({plan}): resumed from {resumes[-1]['checkpoint']}"
            resumes_seen = len(resumes)
        names = os.listdir(ckpt_dir)
        interrupted_saves += any(".tempstate" in n or n.endswith(".tmp") for n in names) or any(
            n.endswith(".state.npz") and n[:-10] + ".index" not in names for n in names)
        newest = newest_readable(ckpt_dir)
        assert newest is not None and newest >= expected, f"kill {i} ({plan}) lost a checkpoint"
        expected = newest
    assert interrupted_saves >= 2, "too few kills landed inside a checkpoint save"

    # The last resume runs to the end.
    last = 20
    assert expected < last
    proc = start("--resume", run, "--set", f"train.steps={last}",
                 "--set", "train.checkpoint_every=5")
    assert proc.wait() == 0, proc.output()
    assert_said(proc.read("stdout"), os.path.join(ckpt_dir, f"model-{expected}"),
                f"step {expected}")

    records = read_log_lines(run)
    assert len(records) == len(runs.read_log(os.path.join(run, "log.jsonl")))  # nothing torn
    whole = step_records(read_log_lines(trained_run))
    pieced = step_records(records)
    assert [r["step"] for r in pieced] == list(range(1, last + 1))
    for a, b in zip(whole, pieced):
        for key in gan.LOSS_KEYS + ("d_real_acc", "d_fake_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
        assert (a["path"], a["history_used"]) == (b["path"], b["history_used"])
    changed = [r["changed"] for r in records if r.get("event") == "resume"]
    assert changed[-1] == {"train.steps": [1000, last], "train.checkpoint_every": [1, 5]}
    # TensorBoard is told to drop what the killed processes logged after the checkpoint.
    events = sorted(os.listdir(os.path.join(run, "tensorboard")))[-1]
    starts = [e.step for e in tf1.train.summary_iterator(os.path.join(run, "tensorboard", events))
              if e.session_log.status == tf1.SessionLog.START]
    assert starts == [expected]

    # Nothing left over: the kept checkpoints, TF's index naming the newest, no lock.
    kept = [last - 5, last]
    assert sorted(os.listdir(ckpt_dir)) == sorted(
        ["checkpoint"] + [f"model-{s}{ext}" for s in kept
                          for ext in (".data-00000-of-00001", ".index", ".state.npz")])
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, f"model-{last}")
    assert not os.path.exists(os.path.join(run, "lock"))


def test_newest_checkpoint_skips_incomplete_ones(trained_run, tmp_path):
    """What a kill, a full disk or a lost file can leave is never chosen for a resume."""
    run = copy_of(trained_run, tmp_path)
    ckpt = os.path.join(run, "checkpoints")

    def fake(step, like=20):
        for ext in (".data-00000-of-00001", ".index", ".state.npz"):
            shutil.copy(os.path.join(ckpt, f"model-{like}{ext}"),
                        os.path.join(ckpt, f"model-{step}{ext}"))
        return os.path.join(ckpt, f"model-{step}")

    os.truncate(fake(21) + ".data-00000-of-00001", 1000)           # data cut short
    os.remove(fake(22) + ".state.npz")                              # no sidecar
    os.remove(fake(23) + ".data-00000-of-00001")                    # no data
    with open(fake(24) + ".index", "wb") as f:                      # torn index
        f.write(b"\0" * 100)
    with open(fake(25) + ".state.npz", "wb") as f:                  # torn sidecar
        f.write(b"PK\3\4")
    shutil.move(fake(26) + ".index", fake(26) + ".index.tempstate123")  # Saver interrupted
    for step in range(21, 27):
        assert runs.checkpoint_problem(os.path.join(ckpt, f"model-{step}")), step
    assert runs.resolve_checkpoint(run)[0] == os.path.join(ckpt, "model-20")
    with pytest.raises(runs.RunError, match="model-21"):
        runs.resolve_checkpoint(os.path.join(ckpt, "model-21"))

    runs.remove_leftovers(ckpt)
    left = sorted(os.listdir(ckpt))
    assert "model-26.index.tempstate123" not in left and "model-26.state.npz" not in left
    assert "model-20.index" in left and "model-21.index" in left  # complete-looking files stay


def test_a_run_killed_before_its_first_checkpoint_starts_again(start, trained_run, tmp_path):
    run = str(tmp_path / "run")
    killed_before_its_first_checkpoint(run)
    proc = start("--resume", run)
    # what to do: the command that starts it again
    assert_clear_error(proc.wait(), proc.read("stderr"), f"--config {run}/config.json",
                       f"--out {run}", nothing_written=os.path.join(run, "lock"))
    # trained_run was started with --config --out in such a folder: a new log, no leftovers.
    assert [r["step"] for r in read_log_lines(trained_run)] == list(range(1, 21))
    assert not os.path.exists(os.path.join(trained_run, "checkpoints", "model-5.state.npz"))


# ---------------------------------------------------------------- 3: NaN and Inf

def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(faulty_resumes):
    """Learning rates of 1e30 (allowed on resume) make every loss NaN in one step."""
    run, proc = faulty_resumes["nan"]
    ckpt = os.path.join(run, "checkpoints")
    assert_clear_error(proc.wait(), proc.read("stderr"), "step 21", "nan",
                       os.path.join(ckpt, "model-20"), "train.lr_disc", "train.lr_gen",
                       f"--resume {run}")

    assert runs.resolve_checkpoint(run)[0] == os.path.join(ckpt, "model-20")
    assert readable(os.path.join(ckpt, "model-20"))
    assert not [n for n in os.listdir(ckpt) if n.startswith("model-21")]
    last = read_log_lines(run)[-1]
    assert last["step"] == 21 and last["error"] == "non-finite loss"
    assert not os.path.exists(os.path.join(run, "lock"))


# ---------------------------------------------------------------- 5: disk trouble

@pytest.mark.parametrize("fault", ["disk full", "path blocked"])
def test_a_failed_checkpoint_write_stops_and_keeps_the_older_ones(fault, faulty_resumes):
    """Disk full: the data file's write fails. Path blocked: the Saver's rename of the
    index fails after the data file was written."""
    run, proc = faulty_resumes[fault]
    ckpt = os.path.join(run, "checkpoints")
    assert_clear_error(proc.wait(), proc.read("stderr"), "step 25",
                       os.path.join(ckpt, "model-25"), f"--resume {run}")

    for step in (10, 15, 20):
        assert readable(os.path.join(ckpt, f"model-{step}"))
    state = tf.train.get_checkpoint_state(ckpt)  # TF's index: whole, naming the older ones
    assert state.model_checkpoint_path == os.path.join(ckpt, "model-20")
    assert list(state.all_model_checkpoint_paths) == [os.path.join(ckpt, f"model-{s}")
                                                      for s in (10, 15, 20)]
    assert runs.resolve_checkpoint(run)[0] == os.path.join(ckpt, "model-20")
    leftovers = [n for n in os.listdir(ckpt) if n.startswith("model-25") and n != "model-25.index"]
    assert leftovers == [] and not os.path.exists(os.path.join(run, "lock"))


# ---------------------------------------------------------------- 6: bad configs

SECTIONS = {f.name: {k.name: k.type for k in dataclasses.fields(f.type)}
            for f in dataclasses.fields(config.Config)}
KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
plausible = {int: st.integers(-3, 300) | st.sampled_from([8, 16, 32, 64, 2 ** 40]),
             float: st.floats(-1, 2) | st.sampled_from([0.0, 1e-4, float("nan"), float("inf")]),
             bool: st.booleans(), str: st.text(max_size=8) | st.sampled_from(
                 ["error", "convert", "skip", "uniform", "normal", "none", "bf16", "data"])}


@st.composite
def config_documents(draw):
    doc = {}
    names = st.sampled_from(list(SECTIONS)) | st.text(max_size=6)
    for section in draw(st.lists(names, max_size=4)):
        if section in SECTIONS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(list(SECTIONS[section])) | st.text(max_size=6),
                                 max_size=4))
            doc[section] = {k: draw(plausible.get(SECTIONS[section].get(k), json_values)
                                    | json_values) for k in keys}
        else:
            doc[section] = draw(json_values)
    return doc


def check_load(path, overrides=(), mentioned=()):
    """The property: a config that passes every check, or one clear ConfigError."""
    try:
        cfg = config.load(path, overrides)
    except config.ConfigError as e:
        message = str(e)
        assert message and "\n" not in message
        assert any(name in message or repr(name) in message
                   for name in [path, *mentioned, *KEYS, *SECTIONS]), message
        return
    for key, value in config.flat(cfg).items():
        assert type(value) is SECTIONS[key.split(".")[0]][key.split(".")[1]]
    assert cfg.model.image_size >= 8 and not cfg.model.image_size & (cfg.model.image_size - 1)
    assert cfg.train.batch_size > 0 and cfg.train.lr_gen > 0 and cfg.train.lr_disc > 0
    assert np.isfinite([v for v in config.flat(cfg).values() if type(v) is float]).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=config_documents())
def test_any_config_file_is_valid_or_one_clear_error(doc):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        mentioned = list(doc) + [f"{s}.{k}" for s, v in doc.items()
                                 if isinstance(v, dict) for k in v]
        check_load(path, mentioned=mentioned)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_any_file_bytes_are_a_valid_config_or_one_clear_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "wb") as f:
            f.write(raw)
        check_load(path)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=8),
                                st.sampled_from(["0", "-1", "8", "48", "1e3", "true", "nan",
                                                 "Infinity", "0.5", "x", "", "[1]", "1e400"])
                                | st.text(max_size=8)), max_size=3),
       joiner=st.sampled_from(["=", " = ", ":"]))
def test_any_set_overrides_are_valid_or_one_clear_error(items, joiner):
    overrides = [f"{k}{joiner}{v}" for k, v in items]
    check_load(SMOKE, overrides, mentioned=[k for k, _ in items] + overrides)


BAD_CONFIGS = [  # (what, --set items or a JSON document, a name the error must give)
    ("unknown key", ["train.learning_rate=0.001"], "train.learning_rate"),
    ("wrong type", ["model.kernel=3.5"], "model.kernel"),
    ("zero size", ["model.z_dim=0"], "model.z_dim"),
    ("negative size", ["train.batch_size=-8"], "train.batch_size"),
    ("learning rate of 0", ["train.lr_gen=0"], "train.lr_gen"),
    ("not a power of two", ["model.image_size=48"], "model.image_size"),
    ("negative count", ["model.extra_layers=-1"], "model.extra_layers"),
    ("infinite rate", ["train.lr_disc=Infinity"], "train.lr_disc"),
    ("batch larger than the data", ["train.batch_size=64"], "train.batch_size"),
    ("string for a number in a file", {"model": {"image_size": "64"}}, "model.image_size"),
    ("unknown section in a file", {"optimiser": {"lr": 0.1}}, "optimiser"),
    ("a key given twice", '{"train": {"steps": 5, "steps": 6}}', "steps"),
]


def _bad_config_args(bad, tiles, folder):
    if isinstance(bad, list):
        return smoke(tiles, *bad)
    path = os.path.join(folder, "bad.json")
    with open(path, "w") as f:
        f.write(bad if isinstance(bad, str) else json.dumps(bad))
    return ["--config", path, "--set", f"data.path={tiles}"]


@pytest.mark.parametrize("what, bad, name", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_a_bad_config_is_one_clear_error_before_anything_is_written(what, bad, name, start,
                                                                     tiles16, tmp_path):
    run = tmp_path / "run"
    proc = start(*_bad_config_args(bad, tiles16, str(tmp_path)), "--out", run)
    assert_clear_error(proc.wait(), proc.read("stderr"), name, nothing_written=run)
    assert "model:" not in proc.read("stdout")  # stopped before the graph was built


def test_a_bad_config_through_the_real_script(tiles16, tmp_path):
    """`python train.py` itself (a batch larger than the data: the check that comes
    last before the graph): exit code 2, one `error:` line, no traceback, no folder."""
    what, bad, name = BAD_CONFIGS[8]
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                           *_bad_config_args(bad, tiles16, str(tmp_path)), "--out", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert_clear_error(proc.returncode, proc.stderr, name, nothing_written=run)


# ---------------------------------------------------------------- 7: resume mismatches

def test_resume_refuses_changed_architecture_naming_every_key(start, trained_run):
    proc = start("--resume", trained_run, "--set", "model.z_dim=32", "--set", "model.kernel=5",
                 "--set", "train.history_size=32")
    assert_clear_error(proc.wait(), proc.read("stderr"), trained_run, ("model.z_dim", "16", "32"),
                       ("model.kernel", "3", "5"), ("train.history_size", "64", "32"))
    assert len(read_log_lines(trained_run)) == 20  # the run is untouched


def test_resume_allows_safe_changes_and_logs_them(faulty_resumes):
    run, proc = faulty_resumes["safe changes"]
    assert proc.wait() == 0, proc.output()
    records = read_log_lines(run)
    assert [r["step"] for r in step_records(records)] == list(range(1, 18))  # 16, 17 once
    event = [r for r in records if r.get("event") == "resume"]
    assert event == [{"event": "resume", "step": 15,
                      "checkpoint": os.path.join(run, "checkpoints", "model-15"),
                      "changed": {"train.steps": [20, 17], "train.lr_gen": [2e-4, 1e-4],
                                  "train.sample_every": [10, 2]}}]
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["lr_gen"] == 1e-4
    assert os.path.exists(os.path.join(run, "samples", "step-000016.png"))


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(faulty_resumes):
    """model-20 belongs to the continuation the resume from model-15 abandons: a later
    --resume RUN must not pick it, and it is moved aside, not deleted."""
    run, proc = faulty_resumes["safe changes"]
    assert proc.wait() == 0, proc.output()
    ckpt = os.path.join(run, "checkpoints")
    assert_said(proc.read("stdout"), "model-20", "step 15", os.path.join(ckpt, "after-step-15"))
    assert readable(os.path.join(ckpt, "after-step-15", "model-20"))
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".index")) == \
        ["model-10.index", "model-15.index", "model-17.index"]  # the new line, newest 3
    assert runs.resolve_checkpoint(run)[0] == os.path.join(ckpt, "model-17")


def test_resuming_twice_from_one_checkpoint_keeps_both_abandoned_continuations(
        start, faulty_resumes, tmp_path):
    """After "safe changes" (model-15 -> 17), a second resume from model-15 sets the
    first continuation aside in a new folder; the original one stays whole, with the
    log records and samples of its steps."""
    run, proc = faulty_resumes["safe changes"]
    assert proc.wait() == 0, proc.output()
    run = copy_of(run, tmp_path)
    ckpt = os.path.join(run, "checkpoints")
    again = start("--resume", os.path.join(ckpt, "model-15"), "--set", "train.steps=16")
    assert again.wait() == 0, again.output()
    first, second = (os.path.join(ckpt, name) for name in ("after-step-15", "after-step-15-2"))
    assert readable(os.path.join(first, "model-20")) and readable(os.path.join(second, "model-17"))
    assert [r["step"] for r in step_records(read_log_lines(first))] == list(range(16, 21))
    assert [r["step"] for r in step_records(read_log_lines(second))] == [16, 17]
    assert os.listdir(os.path.join(first, "samples")) == ["step-000020.png"]
    assert sorted(os.listdir(os.path.join(second, "samples"))) == \
        ["step-000016.png", "step-000017.png"]
    assert [r["step"] for r in step_records(read_log_lines(run))] == list(range(1, 17))
    # generate.py and evaluate.py find the run of a set-aside checkpoint; train.py refuses it
    aside = os.path.join(first, "model-20")
    assert runs.resolve_checkpoint(aside) == (aside, run)
    proc = start("--resume", aside)
    assert_clear_error(proc.wait(), proc.read("stderr"), aside, "generate.py", "evaluate.py")


def test_a_best_checkpoint_of_the_abandoned_steps_is_set_aside_with_them(tmp_path):
    """best-20 came from steps a resume from model-10 abandons: it is no best of the
    resumed run, and the resumed run's own best saves must not delete it."""
    ckpt = tmp_path / "checkpoints"
    (tmp_path / "samples").mkdir(parents=True)
    ckpt.mkdir()
    for prefix in ("model-10", "model-20", "best-20"):
        for suffix in (".index", ".data-00000-of-00001", ".state.npz"):
            (ckpt / (prefix + suffix)).write_text("x")
    (tmp_path / "log.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
    runs.adopt_checkpoints(str(ckpt), 10, keep=5)
    aside = ckpt / "after-step-10"
    assert sorted(os.listdir(aside)) == sorted(
        [p + s for p in ("model-20", "best-20")
         for s in (".index", ".data-00000-of-00001", ".state.npz")] + ["log.jsonl", "samples"])
    assert not any(n.startswith("best-") for n in os.listdir(ckpt))


def test_resume_refuses_a_checkpoint_of_another_net_before_moving_anything(start, trained_run,
                                                                           tmp_path):
    """A config.json edited after training (or a checkpoint copied in from another run)
    does not fit the checkpoint: one error naming a variable; nothing moves."""
    run = copy_of(trained_run, tmp_path)
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    saved["model"]["gen_filters"] = 64
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(saved, f)
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    proc = start("--resume", os.path.join(run, "checkpoints", "model-10"))
    assert_clear_error(proc.wait(), proc.read("stderr"),
                       os.path.join(run, "checkpoints", "model-10"),
                       os.path.join(run, "config.json"), "generator/project/w")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(start, trained_run):
    proc = start("--resume", trained_run)
    assert_clear_error(proc.wait(), proc.read("stderr"),
                       os.path.join(trained_run, "checkpoints", "model-20"), "step 20",
                       "--set train.steps=")
    assert len(read_log_lines(trained_run)) == 20  # the run is untouched


def test_a_run_folder_must_not_be_a_file_nor_inside_the_tiles_nor_hold_other_files(
        start, tiles16, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    mine = tmp_path / "mine"  # a user's folder: its config.json must not be overwritten
    mine.mkdir()
    (mine / "config.json").write_text("my own")
    (mine / "notes.txt").write_text("my notes")
    theirs = tmp_path / "theirs"  # only a config.json, of another program
    theirs.mkdir()
    (theirs / "config.json").write_text('{"my_app_setting": 1}')
    tiles = shutil.copytree(tiles16, str(tmp_path / "tiles"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(tiles, "linked"))  # its images are read as tiles too
    for out, names, unnamed in ((a_file, [], []),
                                (os.path.join(tiles, "run"), ["data.path", tiles], []),
                                (elsewhere / "run", ["data.path", tiles], []),
                                (mine, ["notes.txt"], ["config.json"]),  # a run's file name
                                (theirs, ["config.json"], [])):
        proc = start(*smoke(tiles), "--out", out)
        assert_clear_error(proc.wait(), proc.read("stderr"), out, "--out", *names,
                           unnamed=unnamed)
    assert a_file.read_text() == "not a folder"
    assert sorted(os.listdir(tiles)) == sorted(os.listdir(tiles16) + ["linked"])
    assert os.listdir(elsewhere) == []  # nothing written
    assert sorted(os.listdir(mine)) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == "my own"
    assert (theirs / "config.json").read_text() == '{"my_app_setting": 1}'


# ---------------------------------------------------------------- 8: two runs, one folder

def test_a_live_run_holds_its_folder(start, trained_run, tmp_path):
    run = copy_of(trained_run, tmp_path)
    holder = hold_lock(run)
    try:
        for args in (["--resume", run], ["--config", SMOKE, "--out", run]):
            proc = start(*args)
            assert_clear_error(proc.wait(), proc.read("stderr"), run, f"pid {holder}",
                               os.path.join(run, "lock"))
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_the_lock_of_a_killed_run_is_taken_over_even_before_it_is_reaped(faulty_resumes):
    run, proc = faulty_resumes["nan"]
    zombie = faulty_resumes["zombie"]
    assert proc.wait() == 2, proc.output()  # it ran: the NaN guard stopped it, not the lock
    assert process_state(zombie) == "Z"
    assert_said(proc.read("stdout"), "lock", zombie)
    assert not os.path.exists(os.path.join(run, "lock"))


def test_a_lock_that_cannot_be_removed_does_not_hide_the_error_that_stopped_the_run(
        tmp_path, monkeypatch):
    """A run folder made read-only mid-run: the failed checkpoint write must be the message."""
    lock = runs.acquire_lock(str(tmp_path))

    def read_only(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(runs.os, "remove", read_only)
    with pytest.raises(OSError, match="checkpoint write failed"):
        try:
            raise OSError("checkpoint write failed")
        finally:
            runs.release_lock(lock)
    monkeypatch.undo()
    runs.release_lock(runs.acquire_lock(str(tmp_path)))  # and the flock is free


def test_lock_ignores_a_recorded_pid_that_belongs_to_another_process(tmp_path, monkeypatch):
    """A lock file left by a dead run whose PID the system gave to a live process
    (here PID 1) is stale; judged by flock, or by PID and start time without flock."""
    folder = str(tmp_path)
    with open(os.path.join(folder, "lock"), "w") as f:
        f.write(f"1 {runs._start_time(1) + 1}\n")
    lock = runs.acquire_lock(folder)
    with pytest.raises(runs.RunError, match="pid"):  # a second holder, even in this process
        runs.acquire_lock(folder)
    runs.release_lock(lock)
    assert not os.path.exists(os.path.join(folder, "lock"))

    def no_flock(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(runs.fcntl, "flock", no_flock)
    with open(os.path.join(folder, "lock"), "w") as f:
        f.write(f"1 {runs._start_time(1) + 1}\n")  # PID reused: start time differs
    runs.release_lock(runs.acquire_lock(folder))
    with open(os.path.join(folder, "lock"), "w") as f:
        f.write(f"1 {runs._start_time(1)}\n")  # the recorded process itself, alive
    with pytest.raises(runs.RunError, match="pid 1"):
        runs.acquire_lock(folder)


# ---------------------------------------------------------------- 4: no growth

def _rss_mb():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


@pytest.mark.parametrize("steps", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_memory_and_op_count_stay_flat(steps, tiles16, tmp_path, monkeypatch):
    """Lesson 14: after warm-up, resident memory within 5% and not one new op.

    200 steps in the default suite; 2,000 (-m slow) also catch slow growth, such as
    loss plots left to the garbage collector (about 5 MB a checkpoint).
    """
    seen = []  # (step, RSS in MB, ops in the graph)
    one_step = gan.train_step

    def measured(sess, *args, **kwargs):
        result = one_step(sess, *args, **kwargs)
        seen.append((len(seen) + 1, _rss_mb(), len(sess.graph.get_operations())))
        return result
    monkeypatch.setattr(gan, "train_step", measured)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = train.main(small(tiles16, f"train.steps={steps}", "train.checkpoint_every=60",
                                "train.sample_every=30") + ["--out", str(tmp_path / "run")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 0 and len(seen) == steps
    assert len({ops for _, _, ops in seen}) == 1
    warm = [rss for step, rss, _ in seen if step > 70]  # after a checkpoint, plot and samples
    assert max(warm) <= 1.05 * warm[0], [f"{r:.0f}" for r in warm[::20]]
