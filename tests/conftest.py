"""Shared fixtures: tiny tile folders and a way to run the real scripts."""
import os
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
