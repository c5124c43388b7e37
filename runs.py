"""The run folder: config, log, checkpoints and their sidecars, the lock.

A run folder holds
  config.json             the resolved config
  log.jsonl               one JSON record per logged step (and "event" records)
  checkpoints/model-N.*   tf.compat.v1.train.Saver files for step N
  checkpoints/model-N.state.npz   what is not a TF variable: history cache, sample noise
  samples/step-N.png, tensorboard/, losses.png
  checkpoints/after-step-N/   a continuation abandoned by a resume from step N
  lock                    held by the training process that writes the folder
No TensorFlow graph code here; the `tf.train` checkpoint functions are used
only to read checkpoint files and to rewrite TF's `checkpoint` index file.

What a kill -9 can leave behind, and why it never reaches a resume: the
sidecar is written first, under a temporary name then renamed; the Saver
writes the data file and then the index file the same way, then rewrites
TF's `checkpoint` file (also by rename), then deletes the oldest checkpoint
(index first). So a checkpoint whose index, data and sidecar are all there
is complete; anything else is a leftover, found by `checkpoint_problem` and
deleted by `remove_leftovers`.
"""
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import time
import zipfile

import numpy as np
import tensorflow as tf

import config as config_lib
import data
from cli import UserError

tf1 = tf.compat.v1


class RunError(UserError):
    """A run folder or checkpoint cannot be used; the message says which and why."""


CHECKPOINTS = "checkpoints"
SIDECAR = ".state.npz"
LOCK = "lock"
# Files of step N apart from its index: the sidecar and the data shards.
PART_NAME = re.compile(r"((?:model|best)-\d+)(\.state\.npz|\.data-\d+-of-\d+)$")
ASIDE_NAME = re.compile(r"after-step-\d+(-\d+)?")  # an abandoned continuation (set_aside)
CHECKPOINT_FILE = re.compile(r"\.(index|state\.npz|data-\d+-of-\d+)$")
# What train.py writes at the top of a run folder (and the .tmp files of its atomic writes).
RUN_ENTRIES = {"config.json", "log.jsonl", "losses.png", "samples", CHECKPOINTS, "tensorboard",
               LOCK}


def foreign_entries(run_dir):
    """Sorted names in `run_dir` (hidden ones aside) that train.py did not write: names it
    never writes, or, since it writes config.json first, all of them when there is no
    satgan config.json."""
    if not os.path.isdir(run_dir):
        return []
    names = [name for name in os.listdir(run_dir) if not name.startswith(".")]
    foreign = sorted(name for name in names
                     if name not in RUN_ENTRIES and not name.endswith(".tmp"))
    if foreign or not names:
        return foreign
    try:
        read_run_config(run_dir)
    except (config_lib.ConfigError, RunError):
        return ["config.json"] if "config.json" in names else sorted(names)
    return []


# ---------------------------------------------------------------- finding checkpoints

def checkpoint_problem(prefix):
    """Why checkpoint `prefix` cannot be resumed from, or None when it is complete.

    Complete: the index reads, every data shard it needs is on disk and as long
    as the tensors the index lists, and the sidecar reads.
    """
    if not os.path.isfile(prefix + ".index"):
        return "no index file"
    shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
    counts = {int(s.rsplit("-of-", 1)[1]) for s in shards}
    if len(counts) != 1 or len(shards) != counts.pop():
        return "data files missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as e:
        return f"index unreadable ({str(e).splitlines()[0]})"
    needed = sum(int(np.prod(shapes[k])) * dtypes[k].size for k in shapes
                 if dtypes[k] != tf.string)
    if sum(os.path.getsize(s) for s in shards) < needed:
        return "data file shorter than its index says"
    try:
        if "sample_z" not in load_sidecar(prefix):
            return f"state file {prefix + SIDECAR} lacks the sample noise"
    except RunError:
        return f"no state file {prefix + SIDECAR}"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return f"state file {prefix + SIDECAR} unreadable"
    return None


def checkpoint_steps(ckpt_dir, name="model"):
    """{step: prefix} of every `name`-N checkpoint index in `ckpt_dir`, complete or not."""
    if not os.path.isdir(ckpt_dir):
        return {}
    pattern = re.compile(re.escape(name) + r"-(\d+)\.index$")
    found = (pattern.match(entry) for entry in os.listdir(ckpt_dir)
             if os.path.isfile(os.path.join(ckpt_dir, entry)))
    return {int(m.group(1)): os.path.join(ckpt_dir, f"{name}-{m.group(1)}") for m in found if m}


def newest_checkpoint(ckpt_dir):
    """Prefix of the complete checkpoint of the highest step in `ckpt_dir`, or None.

    Found by scanning the index files, not by TF's `checkpoint` file, which a
    kill between a save and its update leaves one checkpoint behind.
    """
    for step, prefix in sorted(checkpoint_steps(ckpt_dir).items(), reverse=True):
        if checkpoint_problem(prefix) is None:
            return prefix
    return None


def resolve_checkpoint(arg):
    """(prefix, run_dir) for a checkpoint prefix or a run folder (its newest complete one)."""
    if os.path.isdir(arg):
        ckpt_dir = os.path.join(arg, CHECKPOINTS)
        if not os.path.isdir(ckpt_dir):
            ckpt_dir = arg
        prefix = newest_checkpoint(ckpt_dir)
        if prefix is None:
            if os.path.isfile(os.path.join(arg, "config.json")):
                raise RunError(f"no checkpoint found in '{arg}': it stopped before its first "
                               f"checkpoint; start it again with --config "
                               f"{shlex.quote(os.path.join(arg, 'config.json'))} --out "
                               f"{shlex.quote(arg)}")
            raise RunError(f"no checkpoint found in '{arg}'; give a run folder that has "
                           f"complete checkpoints/model-N files, or a prefix like "
                           f"RUN/checkpoints/model-500")
    else:
        prefix = CHECKPOINT_FILE.sub("", arg)  # a file of the checkpoint names it too
        problem = checkpoint_problem(prefix)
        if problem == "no index file":
            what = "is a file, not a checkpoint" if os.path.isfile(arg) else "does not exist"
            raise RunError(f"checkpoint '{arg}' {what} (no '{prefix}.index'); "
                           f"give a prefix like RUN/checkpoints/model-500 or a run folder")
        if problem:
            raise RunError(f"checkpoint '{arg}' is incomplete ({problem}); give the run folder "
                           f"to use its newest complete checkpoint")
    ckpt_dir = os.path.dirname(os.path.abspath(prefix))
    if ASIDE_NAME.fullmatch(os.path.basename(ckpt_dir)):  # RUN/checkpoints/after-step-N
        ckpt_dir = os.path.dirname(ckpt_dir)
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == CHECKPOINTS else ckpt_dir
    return prefix, run_dir


def checkpoint_step(prefix):
    """The step a checkpoint was written at, read from the checkpoint itself."""
    reader = tf.train.load_checkpoint(prefix)
    return int(reader.get_tensor("global_step"))


def read_run_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"'{run_dir}' has no config.json, so the model it trained is unknown; "
                       f"point at the run folder train.py wrote")
    return config_lib.load(base=config_lib.read_json(path))


# ---------------------------------------------------------------- keeping the folder tidy

def remove_leftovers(ckpt_dir):
    """Delete what interrupted or failed saves left: temporary files, and sidecars or
    data files whose index is missing. Only the process holding the lock calls this."""
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        part = PART_NAME.match(name)
        temporary = (".tempstate" in name or name.endswith(".tmp")
                     or name.startswith("checkpoint.tmp"))
        orphan = part and not os.path.isfile(os.path.join(ckpt_dir, part.group(1) + ".index"))
        if (temporary or orphan) and os.path.isfile(path):
            os.remove(path)


def adopt_checkpoints(ckpt_dir, step, keep):
    """Ready `ckpt_dir` for a run resumed at `step`; returns the prefixes retention
    manages from now on (the newest `keep`), oldest first.

    Checkpoints after `step` exist when a run is resumed from an older one of its
    checkpoints: they belong to the abandoned continuation, which moves whole to
    a new `after-step-N/` (see `set_aside`). Older ones beyond `keep` are
    deleted, as retention would have done had a kill not come first (the Saver
    deletes one per save, so it would never catch up). TF's `checkpoint` file is
    rewritten to name the step resumed from.
    """
    remove_leftovers(ckpt_dir)
    steps = checkpoint_steps(ckpt_dir)
    later = {s: prefix for s, prefix in steps.items() if s > step}
    if later:
        best = [p for s, p in checkpoint_steps(ckpt_dir, "best").items() if s > step]
        aside = set_aside(ckpt_dir, step, [*later.values(), *best])
        names = ", ".join(f"model-{s}" for s in sorted(later))
        print(f"moved the checkpoints after step {step} ({names}), with their log records and "
              f"samples, to {aside}: the run continues from step {step}")
    kept = [steps[s] for s in sorted(steps) if s <= step and checkpoint_problem(steps[s]) is None]
    for prefix in kept[:-keep]:
        os.remove(prefix + ".index")  # first: a kill from here on leaves only leftovers
        for path in glob.glob(glob.escape(prefix) + ".*"):
            os.remove(path)
    kept = kept[-keep:]
    if kept:
        tf.compat.v1.train.update_checkpoint_state(ckpt_dir, kept[-1], kept)
    return kept


def set_aside(ckpt_dir, step, later):
    """Move the continuation abandoned at `step` into a folder of its own; returns it.

    The folder is new each time (`after-step-N`, then `after-step-N-2`, ...), so
    resuming twice from one checkpoint keeps both abandoned continuations. It gets
    the log records after `step` (`log.jsonl`), the sample grids after `step`
    (`samples/`) and the checkpoint prefixes `later` (model-N and best-N after
    `step`: a best of the abandoned steps is not the resumed run's). The checkpoints go
    last, each index after its data: until then a resume finds them again and
    starts over with a new folder, so a kill midway loses nothing.
    """
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    aside, n = os.path.join(ckpt_dir, f"after-step-{step}"), 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(ckpt_dir, f"after-step-{step}-{n}")
    os.makedirs(os.path.join(aside, "samples"))
    records = [r for r in read_log(os.path.join(run_dir, "log.jsonl")) if r.get("step", 0) > step]
    with open(os.path.join(aside, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for path in glob.glob(os.path.join(run_dir, "samples", "step-*.png")):
        if int(re.sub(r"\D", "", os.path.basename(path))) > step:
            shutil.move(path, os.path.join(aside, "samples", os.path.basename(path)))
    for prefix in later:
        for path in sorted(glob.glob(glob.escape(prefix) + ".*"), key=lambda p: p.endswith(".index")):
            shutil.move(path, os.path.join(aside, os.path.basename(path)))
    return aside


def variable_differences(saved, built):
    """How variables {name: shape} of a graph differ from a checkpoint's, as text lines.

    Checked before restoring: a resource variable takes a value of another shape
    without complaint, and the mismatch would surface only later as an obscure
    error inside some layer.
    """
    lines = [f"{name} is {saved[name]} in the checkpoint but {shape} by the config"
             for name, shape in built.items() if name in saved and saved[name] != shape]
    lines += [f"{name} is missing from the checkpoint" for name in built if name not in saved]
    lines += [f"{name} of the checkpoint has no place in the config's model"
              for name in saved if name not in built]
    return lines


# ---------------------------------------------------------------- sidecar state

def save_sidecar(prefix, arrays):
    """Write prefix.state.npz atomically (a kill leaves the old file or the new one)."""
    tmp = prefix + SIDECAR + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, prefix + SIDECAR)


def load_sidecar(prefix):
    path = prefix + SIDECAR
    if not os.path.isfile(path):
        raise RunError(f"checkpoint '{prefix}' lacks its state file '{path}' (history cache, "
                       f"sample noise); resume from an older checkpoint of the run")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------- the log

def read_log(path):
    """Records of log.jsonl; a line torn by a kill mid-write is left out."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_log(path, step):
    """Keep the records up to `step`, so steps redone after a resume appear once.

    The file is rewritten whole (a torn last line goes); returns the kept records.
    """
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


class Log:
    """Appends one JSON line per record and flushes it, so a crash keeps it."""

    def __init__(self, path):
        self.file = open(path, "a")

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


# ---------------------------------------------------------------- the lock
#
# The lock is an flock on run_dir/lock: the kernel drops it when its process
# dies, however it dies, so a lock left by a kill -9 (or by a killed process
# not yet reaped, a zombie) is free, and a reused PID does not matter. The file
# also holds the PID and start time of its holder, for messages, and to judge
# the holder on file systems without flock.

def acquire_lock(run_dir):
    """Lock `run_dir` for this process; refuse one a live training process holds."""
    path = os.path.join(run_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _holder(fd)
        if not _lock(fd, holder):
            os.close(fd)
            raise _locked_error(run_dir, path, holder)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file in between: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {_start_time(os.getpid())}\n".encode())
    if holder[0] and holder[0] != os.getpid():
        print(f"took over the stale lock of process {holder[0]}, which stopped without "
              f"releasing it")
    return fd, path


def check_unlocked(run_dir):
    """Raise RunError now if a live training process holds `run_dir`."""
    path = os.path.join(run_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        holder = _holder(fd)
        if not _lock(fd, holder):
            raise _locked_error(run_dir, path, holder)
    finally:
        os.close(fd)  # closing drops the flock taken to test it


def release_lock(lock):
    if lock:
        fd, path = lock
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.remove(path)
        except OSError:  # gone, or a folder made read-only: the flock ends with close anyway,
            pass         # and an error that stopped the run must not be replaced by this one
        os.close(fd)


def _lock(fd, holder):
    """True when this process now holds the lock on `fd`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # no flock on this file system: judge the recorded holder
        pid, started = holder
        return not pid or pid == os.getpid() or _start_time(pid) != started


def _holder(fd):
    """(pid, start time) written in a lock file, or (0, None)."""
    try:
        pid, started = os.pread(fd, 100, 0).decode().split()
        return int(pid), int(started)
    except (ValueError, UnicodeDecodeError):
        return 0, None


def _start_time(pid):
    """Start time of process `pid` in clock ticks after boot; None when it is not
    running: gone, or a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd on
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _locked_error(run_dir, path, holder):
    who = f"pid {holder[0]}" if holder[0] else "another process"
    return RunError(f"'{run_dir}' is being written by another training process ({who}, "
                    f"see {path}); wait for it to finish or stop it, or choose another --out")


# ---------------------------------------------------------------- starting a run

def write_atomic(path, payload):
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)


def write_config(run_dir, cfg):
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    write_atomic(os.path.join(run_dir, "config.json"), text.encode())


def open_run(config_path, overrides, out, resume):
    """(cfg, run_dir, prefix or None, changed safe keys) after every check that can fail early.

    A new run from `config_path`, or a resume of `resume` (a run folder or a checkpoint
    prefix) in its own folder; `overrides` are --set items, `out` the --out folder."""
    if resume:
        prefix, run_dir = resolve_checkpoint(resume)
        if ASIDE_NAME.fullmatch(os.path.basename(os.path.dirname(os.path.abspath(prefix)))):
            raise RunError(f"'{prefix}' belongs to a continuation set aside by an earlier "
                                f"resume; generate.py and evaluate.py take it as it is; to train "
                                f"it on, copy the run folder and move that folder's files (log "
                                f"and samples too) back in place of the newer ones")
        check_unlocked(run_dir)
        if out and os.path.abspath(out) != os.path.abspath(run_dir):
            raise RunError(f"--resume continues in its own folder '{run_dir}'; drop --out")
        saved = read_run_config(run_dir)
        base = config_lib.read_json(config_path) if config_path else saved.to_dict()
        cfg = absolute_data_path(config_lib.load(base=base, overrides=overrides))
        arch = config_lib.differences(saved, cfg, config_lib.ARCHITECTURE_KEYS)
        if arch:
            raise RunError(
                f"cannot resume '{prefix}': the config changes what the checkpoint holds ("
                + ", ".join(f"{k}: {config_lib.get(saved, k)} -> {config_lib.get(cfg, k)}"
                            for k in arch) + "); resume with the run's own values")
        changed = {k: [config_lib.get(saved, k), config_lib.get(cfg, k)]
                   for k in config_lib.differences(saved, cfg, list(config_lib.flat(cfg)))}
        done = checkpoint_step(prefix)
        if done >= cfg.train.steps:
            raise RunError(f"'{prefix}' is at step {done} and train.steps is "
                                f"{cfg.train.steps}: nothing to train; to go on, resume with "
                                f"--set train.steps=N, N above {done}")
        check_outside_data(run_dir, cfg.data.path)
        return cfg, run_dir, prefix, changed
    cfg = absolute_data_path(config_lib.load(config_path, overrides))
    name = os.path.splitext(os.path.basename(config_path))[0]
    run_dir = out or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"--out '{run_dir}' is a file; give a folder for the run")
    check_creatable(run_dir)
    check_outside_data(run_dir, cfg.data.path)
    check_unlocked(run_dir)
    if newest_checkpoint(os.path.join(run_dir, CHECKPOINTS)):
        raise RunError(f"'{run_dir}' already holds a run; continue it with "
                            f"--resume {shlex.quote(run_dir)}, or choose another --out")
    foreign = foreign_entries(run_dir)
    if foreign:  # its config.json or log.jsonl would be overwritten
        raise RunError(f"--out '{run_dir}' holds files that are not a run's ("
                            + ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                            + "); give a new or empty folder for the run")
    return cfg, run_dir, None, {}


def check_creatable(run_dir):
    """Before the data are read: the run folder exists or its nearest existing parent is a
    folder this process may write in."""
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunError(f"--out '{run_dir}' lies under '{parent}', which is a file; "
                            f"give a folder for the run")
    if parent != os.path.abspath(run_dir) and not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out '{run_dir}' cannot be made: '{parent}' is not writable; "
                            f"choose another --out")


def absolute_data_path(cfg):
    """data.path made absolute (and ~ expanded: a shell leaves `data.path=~/x` as it is),
    so that config.json names the data wherever a resume """
    cfg.data.path = os.path.abspath(os.path.expanduser(cfg.data.path))
    return cfg


def check_outside_data(run_dir, data_path):
    """A run folder inside a scanned data folder would have its samples read as tiles."""
    if not os.path.isdir(data_path) or os.path.isfile(os.path.join(data_path, data.MANIFEST)):
        return  # a manifest names its files; nothing else in the folder is read
    run = os.path.realpath(run_dir) + os.sep
    if any(run.startswith(os.path.realpath(root) + os.sep)  # symlinked folders count too
           for root, _ in data.walk(data_path)):
        raise RunError(f"run folder '{run_dir}' is inside data.path '{data_path}', whose "
                            f"images are all read as tiles (the run's samples would be too); "
                            f"choose an --out outside it")


# ---------------------------------------------------------------- a run in progress

class Run:
    """What a training process holds of its run folder, travelling together.

    The session and graph tensors (`g`, from gan.build_graph) a checkpoint
    saves and restores, the history cache and the sidecar `state` saved with
    them, the TensorBoard writer the samples go to, the log (a Log, once
    opened) and the step records trained so far, and the step of the newest
    checkpoint of this process.
    """

    def __init__(self, run_dir, sess, g, cache, writer):
        self.dir, self.sess, self.g, self.cache, self.writer = run_dir, sess, g, cache, writer
        self.ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
        self.sample_dir = os.path.join(run_dir, "samples")
        self.state = {}  # sample_z and data_state(): what a sidecar keeps besides the cache
        self.log, self.records = None, []  # log.jsonl and its step records (losses.png)
        self.saved_step = 0

    def save(self, step, name="model"):
        """Sidecar first, then the Saver (data, index, then TF's `checkpoint` file).

        A failed write (disk full, folder gone) stops the run: its leftovers are
        removed, the older checkpoints and the `checkpoint` file stay as they were.
        name="best" writes best-N with its own Saver and index file, so neither
        retention nor `--resume RUN` ever picks or deletes it.
        """
        g, sess = self.g, self.sess
        prefix = os.path.join(self.ckpt_dir, f"{name}-{step}")
        saver, index = (g["saver"], "checkpoint") if name == "model" else (g["best_saver"], "best")
        sess.run(g["set_step_op"], {g["step_in"]: step})
        try:
            save_sidecar(prefix, {**self.state, **{f"history_{k}": v
                                                   for k, v in self.cache.state().items()}})
            saver.save(sess, os.path.join(self.ckpt_dir, name), global_step=step,
                       latest_filename=index, write_meta_graph=False)
        except (OSError, ValueError, tf.errors.OpError) as e:
            if os.path.isdir(self.ckpt_dir):
                remove_leftovers(self.ckpt_dir)
            raise RunError(f"step {step}: writing checkpoint '{prefix}' failed "
                           f"({error_cause(e)}); training stopped, the older checkpoints "
                           f"are kept: fix the cause (disk space, permissions) and "
                           f"--resume {shlex.quote(self.dir)}") from None
        remove_leftovers(self.ckpt_dir)
        if name == "model":
            self.saved_step = step
        return prefix

    def restore(self, prefix):
        """Weights, all four Adam states and BN averages, then the sidecar; returns (step, the
        sidecar's state). A checkpoint of another net is refused before anything moves."""
        g, sess = self.g, self.sess
        saved = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
        built = {v.op.name: v.shape.as_list()  # what g["saver"] saves: every global variable
                 for v in sess.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
        differences = variable_differences(saved, built)
        if differences:
            more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
            raise RunError(f"checkpoint '{prefix}' was not trained with the model that "
                           f"{self.dir}/config.json describes: "
                           f"{'; '.join(differences[:2])}{more}; resume with the config.json "
                           f"of the run that wrote it")
        try:
            g["saver"].restore(sess, prefix)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            raise RunError(f"checkpoint '{prefix}' does not match this model: "
                           f"{str(e).splitlines()[0]}") from None
        state = load_sidecar(prefix)
        self.cache.load_state({k[len("history_"):]: v for k, v in state.items()
                               if k.startswith("history_")})
        step = int(sess.run(g["global_step"]))
        keep = g["saver"].saver_def.max_to_keep
        g["saver"].recover_last_checkpoints(adopt_checkpoints(self.ckpt_dir, step, keep))
        self.saved_step = step
        return step, {k: v for k, v in state.items() if not k.startswith("history_")}

    def dump_samples(self, step):
        """Grid from the fixed noise in inference mode (moving-average batch norm), of the
        averaged weights when train.g_average is on (gan.refresh_samples ran before)."""
        g = self.g
        fakes = self.sess.run(g["samples_u8_out"], {g["z_in"]: self.state["sample_z"],
                                                    g["is_training_in"]: False})
        picture = data.image_grid(fakes)
        write_atomic(os.path.join(self.sample_dir, f"step-{step:06d}.png"), data.png_bytes(picture))
        h, w, c = picture.shape
        image = tf1.Summary.Image(height=h, width=w, colorspace=c,
                                  encoded_image_string=data.png_bytes(picture))
        self.writer.add_summary(
            tf1.Summary(value=[tf1.Summary.Value(tag="samples", image=image)]), step)

    def how_to_go_on(self, step):
        """What a user does after a stop at `step`, once its checkpoint is saved."""
        if step == 0:
            return (f"no step was trained; start it again with --config "
                    f"{shlex.quote(os.path.join(self.dir, 'config.json'))} "
                    f"--out {shlex.quote(self.dir)}")
        return f"checkpoint saved. Continue with: python train.py --resume {shlex.quote(self.dir)}"

    def diverged(self, step, record, bad):
        """The error for a non-finite loss: no checkpoint is written after it."""
        good = os.path.join(self.ckpt_dir, f"model-{self.saved_step}")
        kept = (f"the last good checkpoint, {good}, is kept: lower train.lr_disc / "
                f"train.lr_gen and --resume {shlex.quote(self.dir)}" if self.saved_step
                else "no checkpoint was written before it: start again with lower learning rates")
        return RunError(f"step {step}: {', '.join(bad)} became {record[bad[0]]}; "
                        f"training stopped; {kept}")


def error_cause(e):
    """The line of an error that says what went wrong; TF's come after a stack."""
    lines = [s for s in getattr(e, "message", str(e)).splitlines() if s and not s[0].isspace()]
    return lines[-1] if lines else type(e).__name__


def data_state(batches, data_path):
    """The tile count and digest a checkpoint keeps: a resume on other tiles says so."""
    return {"data_tiles": np.int64(len(batches)),
            "data_digest": np.str_(data.fingerprint(batches.files, data_path))}


def data_change(saved, now):
    """{"tiles": [then, now]} when the tiles differ from a checkpoint's; None if the same
    (or the checkpoint predates the digest)."""
    if "data_digest" not in saved or str(saved["data_digest"]) == str(now["data_digest"]):
        return None
    return {"tiles": [int(saved["data_tiles"]), int(now["data_tiles"])]}
