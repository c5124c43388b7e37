"""The run folder: config, log, checkpoints and their sidecars, the lock.

A run folder holds
  config.json             the resolved config
  log.jsonl               one JSON record per logged step (and "event" records)
  checkpoints/model-N.*   tf.compat.v1.train.Saver files for step N
  checkpoints/model-N.state.npz   what is not a TF variable: history cache, sample noise
  samples/step-N.png, tensorboard/, losses.png
No TensorFlow graph code here; the `tf.train` checkpoint lookups are used
only to find files.
"""
import json
import os

import numpy as np
import tensorflow as tf

import config as config_lib


class RunError(RuntimeError):
    """A run folder or checkpoint cannot be used; the message says which and why."""


CHECKPOINTS = "checkpoints"
SIDECAR = ".state.npz"


# ---------------------------------------------------------------- finding checkpoints

def resolve_checkpoint(arg):
    """(prefix, run_dir) for a checkpoint prefix or a run folder (its newest checkpoint)."""
    if os.path.isdir(arg):
        ckpt_dir = os.path.join(arg, CHECKPOINTS)
        if not os.path.isdir(ckpt_dir):
            ckpt_dir = arg
        prefix = tf.train.latest_checkpoint(ckpt_dir)
        if prefix is None or not os.path.exists(prefix + ".index"):
            raise RunError(f"no checkpoint found in '{arg}'; give a run folder that has "
                           f"checkpoints/model-N.index files, or a prefix like RUN/checkpoints/model-500")
    else:
        prefix = arg[:-len(".index")] if arg.endswith(".index") else arg
        if not os.path.exists(prefix + ".index"):
            raise RunError(f"checkpoint '{arg}' does not exist (no '{prefix}.index'); "
                           f"give a prefix like RUN/checkpoints/model-500 or a run folder")
    ckpt_dir = os.path.dirname(os.path.abspath(prefix))
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


def remove_orphan_sidecars(ckpt_dir):
    """Drop the sidecars of checkpoints that retention has deleted."""
    for name in os.listdir(ckpt_dir):
        if name.endswith(SIDECAR):
            prefix = os.path.join(ckpt_dir, name[:-len(SIDECAR)])
            if not os.path.exists(prefix + ".index"):
                os.remove(prefix + SIDECAR)


# ---------------------------------------------------------------- the log

def read_log(path):
    """Records of log.jsonl; a torn last line (a kill mid-write) is left out."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_log(path, step):
    """Keep the records up to `step`, so steps redone after a resume appear once."""
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

def acquire_lock(run_dir):
    """Refuse a folder that a live training process writes; take over a stale lock."""
    path = os.path.join(run_dir, "lock")
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise RunError(f"'{run_dir}' is being written by another training process "
                       f"(pid {pid}, see {path}); wait for it or choose another --out")
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return path


def release_lock(path):
    if path and os.path.exists(path):
        os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
