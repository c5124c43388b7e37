"""train.g_average: an averaged copy of G that samples and generation use, and training never reads."""
import os

import numpy as np
import pytest
import tensorflow as tf

import config
import gan
import model
from conftest import ROOT, assert_clear_error, built, run_script

tf1 = tf.compat.v1


def built_with(decay):
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"), [f"train.g_average={decay}"])
    return (cfg, *built(cfg))


def values(graph, sess, scope):
    with graph.as_default():
        found = {v.op.name.split("/", 1)[1]: v for v in tf1.global_variables(scope + "/")}
    return {k: v for k, v in zip(found, sess.run(list(found.values())))}


def steps(cfg, g, sess, count):
    rng = np.random.default_rng(0)
    B, S, Z = cfg.train.batch_size, cfg.model.image_size, cfg.model.z_dim
    for _ in range(count):
        reals = rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8)
        z = rng.uniform(-1, 1, (B, Z)).astype(np.float32)
        gan.train_step(sess, g, reals, z, None, False)


def test_the_average_changes_nothing_in_training_and_follows_g():
    plain_cfg, plain_graph, plain_g, plain = built_with(0.0)
    cfg, graph, g, sess = built_with(0.5)
    steps(plain_cfg, plain_g, plain, 1)
    steps(cfg, g, sess, 1)
    raw = values(graph, sess, model.GEN_SCOPE)
    average = values(graph, sess, model.AVERAGE_SCOPE)
    trained = [k for k in raw if k.endswith(("/w", "/b", "/gamma", "/beta"))]
    assert all(np.array_equal(average[k], raw[k]) for k in trained)  # the first update copies G
    steps(plain_cfg, plain_g, plain, 2)
    steps(cfg, g, sess, 2)
    for scope in (model.GEN_SCOPE, "discriminator"):  # training never reads the average
        mine, theirs = values(graph, sess, scope), values(plain_graph, plain, scope)
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    raw, later = values(graph, sess, model.GEN_SCOPE), values(graph, sess, model.AVERAGE_SCOPE)
    assert not any(np.array_equal(later[k], raw[k]) for k in trained if k.endswith("/w"))
    assert later["updates"] == 3
    with graph.as_default():
        assert not tf1.trainable_variables(model.AVERAGE_SCOPE + "/")  # no optimiser touches it


def test_the_averaged_copy_gets_batch_statistics_of_its_own_weights():
    """G's moving averages belong to G's weights: the copy's are measured before use."""
    cfg, graph, g, sess = built_with(0.5)
    steps(cfg, g, sess, 1)  # the copy now holds G's weights exactly
    z = np.random.default_rng(1).uniform(-1, 1, (cfg.train.batch_size, cfg.model.z_dim))
    in_training = sess.run(g["fakes_out"], {g["z_in"]: z})
    inference = lambda: sess.run(g["samples_u8_out"], {g["z_in"]: z, g["is_training_in"]: False})
    before = np.abs(inference() / 127.5 - 1 - in_training).mean()
    gan.refresh_samples(sess, g)
    after = np.abs(inference() / 127.5 - 1 - in_training).mean()
    assert after < 0.1 < before, (before, after)
    stats = values(graph, sess, model.AVERAGE_SCOPE)
    gan.refresh_samples(sess, g)  # from fixed latents: the same statistics every time
    again = values(graph, sess, model.AVERAGE_SCOPE)
    assert all(np.array_equal(stats[k], again[k]) for k in stats)


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("average") / "run"
    run_script("train.py", "--config", "configs/smoke.json", "--set", "train.g_average=0.9",
               "--set", "train.steps=20", "--out", run, check=True)
    return run


def test_generation_uses_the_averaged_weights_and_says_so(averaged_run, tmp_path):
    reader = tf.train.load_checkpoint(str(averaged_run / "checkpoints" / "model-20"))
    names = reader.get_variable_to_shape_map()
    assert f"{model.AVERAGE_SCOPE}/same1/w" in names and f"{model.GEN_SCOPE}/same1/w" in names
    proc = run_script("generate.py", "--checkpoint", averaged_run, "-n", 4, "--out",
                      tmp_path / "fakes", check=True)
    assert "averaged" in proc.stdout and "train.g_average" in proc.stdout


def test_weights_trained_shows_the_other_copy(averaged_run, tmp_path):
    """--weights trained: the raw G of a run that kept an average, to compare the two."""
    shown = {}
    for weights in ("averaged", "trained"):
        out = tmp_path / weights
        proc = run_script("generate.py", "--checkpoint", averaged_run, "-n", 4, "--seed", 3,
                          "--weights", weights, "--out", out, check=True)
        assert f"{weights} weights" in proc.stdout
        shown[weights] = [(out / f"fake-{i:06d}.png").read_bytes() for i in range(4)]
    default = tmp_path / "default"
    run_script("generate.py", "--checkpoint", averaged_run, "-n", 4, "--seed", 3, "--out", default,
               check=True)
    assert [(default / f"fake-{i:06d}.png").read_bytes() for i in range(4)] == shown["averaged"]
    assert shown["trained"] != shown["averaged"]
    proc = run_script("evaluate.py", "--real", "data", "-n", 8, "--checkpoint", averaged_run,
                      "--weights", "trained", check=True)
    assert "trained weights" in proc.stdout


def test_weights_averaged_of_a_run_without_an_average_is_one_clear_error(smoke_run, tmp_path):
    out = tmp_path / "fakes"
    for script, args in (("generate.py", ["--out", out]), ("evaluate.py", ["--real", "data"])):
        proc = run_script(script, "--checkpoint", smoke_run, "--weights", "averaged", *args)
        assert_clear_error(proc.returncode, proc.stderr, "--weights", "train.g_average",
                           nothing_written=[out])


def test_resume_is_exact_with_the_average(averaged_run, tmp_path):
    half = tmp_path / "half"
    run_script("train.py", "--config", "configs/smoke.json", "--set", "train.g_average=0.9",
               "--set", "train.steps=10", "--out", half, check=True)
    run_script("train.py", "--resume", half, "--set", "train.steps=20", check=True)
    whole = tf.train.load_checkpoint(str(averaged_run / "checkpoints" / "model-20"))
    resumed = tf.train.load_checkpoint(str(half / "checkpoints" / "model-20"))
    for name in whole.get_variable_to_shape_map():
        if name.startswith(model.AVERAGE_SCOPE):
            assert np.array_equal(whole.get_tensor(name), resumed.get_tensor(name)), name
