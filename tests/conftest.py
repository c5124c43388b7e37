"""Shared fixtures: tiny tile folders, a way to run the real scripts, and the checks of
what a user relies on when a script refuses (the facts, not the wording)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_tiles(folder, count, size=64, seed=0):
    """Smooth random colour tiles (a little like fields), RGB PNG."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        img.save(os.path.join(folder, f"tile-{i:04d}.png"))
    return folder


@pytest.fixture(scope="session")
def tiles_dir(tmp_path_factory):
    return write_tiles(str(tmp_path_factory.mktemp("tiles")), 48)


def run_script(script, *args, timeout=300, check=False):
    """Run one of the project's scripts as a user would; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A real 40-step train.py run of configs/smoke.json on the bundled sample."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_script("train.py", "--config", "configs/smoke.json", "--set", "train.steps=40",
               "--out", run_dir, check=True)
    return str(run_dir)


def built(cfg):
    """(graph, g, initialised session) of gan.build_graph(cfg), seeded, finalized."""
    import tensorflow as tf
    import gan
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        g = gan.build_graph(cfg)
    sess = tf.compat.v1.Session(graph=graph)
    sess.run(g["init_op"])
    graph.finalize()
    return graph, g, sess


# TensorFlow's own log lines (its C++ logging before absl is set up, its Python logger):
# printed by a fresh process whatever TF_CPP_MIN_LOG_LEVEL says, and not the project's.
TF_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|"
                    r"WARNING:tensorflow:")


def _unnamed(text, names):
    """The first of `names` that `text` does not name (a tuple: in its order), else None."""
    for name in names:
        at = 0
        for part in name if isinstance(name, tuple) else (name,):
            at = text.find(str(part), at)
            if at < 0:
                return name
            at += len(str(part))
    return None


def assert_named(text, *names, unnamed=()):
    """`text` names each of `names` and none of `unnamed`. A tuple in `names` is named in
    its order, for where the order is the fact (a key, its old value, its new value)."""
    missing = _unnamed(text, names)
    assert missing is None, f"{missing!r} is not named in: {text}"
    for name in unnamed:
        assert str(name) not in text, f"{name!r} is named in: {text}"


def _nothing_written(paths):
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        assert not os.path.exists(path), f"{path} was written"


def assert_clear_error(code, stderr, *names, unnamed=(), listing=False, nothing_written=()):
    """A script refused its input as promised: exit code 2; stderr is one `error: ` line
    (TensorFlow's log lines aside: no traceback, no second message) naming each of `names`
    and none of `unnamed` (see assert_named); no path of `nothing_written` exists.

    listing=True: the line may be followed by an indented listing (one line per file and
    its problem), where `names` may be named too."""
    assert code == 2, f"exit code {code}:\n{stderr[-3000:]}"
    lines = [line for line in stderr.splitlines() if line.strip() and not TF_LOG.match(line)]
    assert lines and lines[0].startswith("error: "), stderr[-3000:]
    assert all(listing and line.startswith("  ") for line in lines[1:]), stderr[-3000:]
    assert_named("\n".join(lines), *names, unnamed=unnamed)
    _nothing_written(nothing_written)


def assert_said(lines, *names):
    """One of `lines` (a list of notes, or printed text) names each of `names` (see
    assert_named): what a note or a progress line promises, by its facts, not its wording."""
    lines = lines.splitlines() if isinstance(lines, str) else lines
    assert any(_unnamed(line, names) is None for line in lines), \
        f"no line names all of {names}:\n" + "\n".join(lines)[-3000:]
