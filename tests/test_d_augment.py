"""train.d_augment: every image D sees goes through one random colour, translation and cutout."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import config
import d_augment
import data
import gan
from history_cache import HistoryCache
from conftest import ROOT, assert_clear_error, built, run_script

tf1 = tf.compat.v1
N, S = 6, 16
RUN_STEP = gan.run_step  # the function the runs below spy on


def augmented(images, values, names=config.D_AUGMENTS):
    """The graph's augmentation `names` of `images` [N, S, S, 3] fed `values`."""
    graph = tf.Graph()
    with graph.as_default():
        x_in = tf1.placeholder(tf.float32, images.shape)
        inputs, apply = d_augment.build(len(images), images.shape[1], names)
        out = apply(x_in)
        with tf1.Session() as sess:
            return sess.run(out, {x_in: images, **{inputs[k]: v for k, v in values.items()}})


def reference(images, values):
    """The same augmentation written out pixel by pixel in NumPy."""
    x = images.astype(np.float64)
    if "brightness" in values:
        x = x + values["brightness"][:, None, None, None]
        mean = x.mean(axis=3, keepdims=True)
        x = (x - mean) * values["saturation"][:, None, None, None] + mean
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * values["contrast"][:, None, None, None] + mean
    if "shift" in values:
        shifted = np.zeros_like(x)
        for i, (dy, dx) in enumerate(values["shift"]):
            for y in range(S):
                for c in range(S):
                    if 0 <= y + dy < S and 0 <= c + dx < S:
                        shifted[i, y, c] = x[i, y + dy, c + dx]
        x = shifted
    if "keep" in values:
        x = x * values["keep"][..., None]
    return x


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(-1, 1, (N, S, S, 3)).astype(np.float32)


def test_fed_nothing_it_is_the_identity(images):
    assert np.array_equal(augmented(images, {}), images)  # bit for bit: `on` is False
    identity = {"on": True, "brightness": np.zeros(N, np.float32),
                "saturation": np.ones(N, np.float32), "contrast": np.ones(N, np.float32)}
    np.testing.assert_allclose(augmented(images, identity), images, atol=1e-6)
    assert d_augment.draw(np.random.default_rng(0), N, S, ()) == {}


def test_off_it_is_not_computed(images):
    # A shift far outside the padding makes the gather fail whenever it runs; off
    # (train.d_augment_from collapse before one is found) it must not run at all,
    # so a run pays nothing for an augmentation it has not begun.
    far = {"shift": np.full((N, 2), 10 * S, np.int32)}
    assert np.array_equal(augmented(images, {**far, "on": False}), images)
    with pytest.raises(tf.errors.InvalidArgumentError):
        augmented(images, {**far, "on": True})


@pytest.mark.parametrize("names", [("color",), ("translation",), ("cutout",), config.D_AUGMENTS])
def test_each_augmentation_is_what_it_says(images, names):
    values = d_augment.draw(np.random.default_rng(1), N, S, names)
    got = augmented(images, values, names)
    np.testing.assert_allclose(got, reference(images, values), atol=1e-5)
    assert not np.allclose(got, images)  # each one does something to every draw of six images
    if "translation" in names:
        assert np.abs(values["shift"]).max() <= S // 8 and np.abs(values["shift"]).max() > 0
    if "cutout" in names:  # a square of half the side, cut where it lies inside the tile
        cut = (values["keep"] == 0).sum(axis=(1, 2))
        assert (cut > 0).all() and (cut <= (S // 2) ** 2).all()
        assert (got[values["keep"] == 0] == 0).all()


def test_d_sees_the_augmented_images_and_g_learns_through_them():
    """D's input is augmented in G's loss too, and G's gradient flows back through it."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"),
                      ["train.d_augment=color,translation,cutout"])
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        g = gan.build_graph(cfg)
        grad = tf.gradients(g["g_loss"], g["fakes_out"])[0]  # [B, S, S, 3]
    sess = tf1.Session(graph=graph)
    sess.run(g["init_op"])
    B, S_, Z = cfg.train.batch_size, cfg.model.image_size, cfg.model.z_dim
    rng = np.random.default_rng(0)
    feed = {g["reals_u8_in"]: rng.integers(0, 256, (B, S_, S_, 3), dtype=np.uint8),
            g["z_in"]: rng.uniform(-1, 1, (B, Z)).astype(np.float32)}
    values = d_augment.draw(rng, 2 * B, S_, config.augmentations(cfg))
    augmented_feed = {**feed, **{g["augment_in"][k]: v for k, v in values.items()}}
    plain_loss, plain_grad = sess.run([g["g_loss"], grad], feed)
    loss, through = sess.run([g["g_loss"], grad], augmented_feed)
    assert loss != plain_loss and np.isfinite(through).all()
    keep = values["keep"][B:]  # where the fake half was cut out, G gets no gradient
    shift = np.abs(values["shift"][B:]).max()
    inner = (slice(None), slice(shift, S_ - shift), slice(shift, S_ - shift))
    assert (np.abs(through).sum(axis=3)[inner][keep[inner] == 1] > 0).mean() > 0.9
    blank = {g["augment_in"]["on"]: True,
             g["augment_in"]["keep"]: np.zeros((2 * B, S_, S_), np.float32)}
    assert not sess.run(grad, {**feed, **blank}).any()  # D saw nothing of the fakes


def test_a_training_step_feeds_it_to_every_update():
    """Cut out everything: D sees blank images, so G's updates get no gradient at all."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"),
                      ["train.d_augment=cutout", "model.reg_scale=0"])
    graph, g, sess = built(cfg)
    B, S_, Z = cfg.train.batch_size, cfg.model.image_size, cfg.model.z_dim
    rng = np.random.default_rng(0)
    reals = rng.integers(0, 256, (B, S_, S_, 3), dtype=np.uint8)
    z = rng.uniform(-1, 1, (B, Z)).astype(np.float32)
    with graph.as_default():
        g_vars = tf1.trainable_variables("generator/")
    before = sess.run(g_vars)
    blank = {"on": True, "keep": np.zeros((2 * B, S_, S_), np.float32)}
    record, _ = gan.train_step(sess, g, reals, z, None, False, augment=blank)
    assert record["d_real_acc"] + record["d_fake_acc"] in (0.0, 1.0, 2.0)  # one logit for all
    assert all(np.array_equal(a, b) for a, b in zip(before, sess.run(g_vars)))
    gan.train_step(sess, g, reals, z, None, False)  # not cut out: G learns
    assert not all(np.array_equal(a, b) for a, b in zip(before, sess.run(g_vars)))


def test_a_step_draws_its_augmentation_by_seed_and_step(monkeypatch):
    """A resumed run augments step k as the uninterrupted run did."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"),
                      ["train.d_augment=color,translation,cutout"])
    B, S_ = cfg.train.batch_size, cfg.model.image_size
    tiles = np.random.default_rng(0).integers(0, 256, (3 * B, S_, S_, 3), dtype=np.uint8)
    seen = {}

    def step(sess, g, reals, z, history, used, force_path=None, augment=None):
        seen.setdefault(len(seen), augment)
        return {}, np.zeros((B, S_, S_, 3), np.float32)

    monkeypatch.setattr(gan, "train_step", step)
    whole, resumed = HistoryCache(64, (S_, S_, 3)), HistoryCache(64, (S_, S_, 3))
    for k in (1, 2, 3):
        gan.run_step(None, None, cfg, data.Batches(tiles, [""] * len(tiles), B, S_, seed=1),
                     whole, k)
    gan.run_step(None, None, cfg, data.Batches(tiles, [""] * len(tiles), B, S_, seed=1),
                 resumed, 3)
    assert set(seen[2]) == {"on", "brightness", "saturation", "contrast", "shift", "keep"}
    assert all(np.array_equal(seen[2][k], seen[3][k]) for k in seen[2])
    assert not np.array_equal(seen[1]["shift"], seen[2]["shift"])


def test_off_in_the_write_ups_config_and_nothing_built():
    cfg = config.load(os.path.join(ROOT, "configs", "article.json"))
    assert cfg.train.d_augment == "" and config.augmentations(cfg) == ()
    _, g, _ = built(config.load(os.path.join(ROOT, "configs", "smoke.json")))
    assert "augment_in" not in g


def test_the_main_config_turns_it_on_at_a_collapse():
    # docs/quality.md: from the first step it cost the bundled sample's fakes the quiz;
    # waiting for a collapse leaves the sample's runs as they were and rescues small sets.
    cfg = config.load(os.path.join(ROOT, "configs", "cpu.json"))
    assert config.augmentations(cfg) == config.D_AUGMENTS
    assert cfg.train.d_augment_from == "collapse" and 0 < cfg.train.eval_every <= 500


def test_a_run_says_it_augments(tmp_path):
    proc = run_script("train.py", "--config", "configs/smoke.json", "--set", "train.steps=2",
                      "--set", "train.d_augment=translation, cutout", "--out", tmp_path / "run",
                      check=True)
    line = next(line for line in proc.stdout.splitlines() if "train.d_augment" in line)
    assert "translation" in line and "cutout" in line and "color" not in line


@pytest.mark.parametrize("value, named", [("blur", "blur"), ("cutout,cutout", "twice")])
def test_an_unknown_or_repeated_augmentation_is_one_clear_error(tmp_path, value, named):
    out = tmp_path / "run"
    proc = run_script("train.py", "--config", "configs/smoke.json", "--set",
                      f"train.d_augment={value}", "--out", out)
    assert_clear_error(proc.returncode, proc.stderr, "train.d_augment", named,
                       nothing_written=[out])


def test_a_run_without_it_can_resume_with_it(tmp_path):
    """The README's cure for a collapsing run: go on from its checkpoint with d_augment on."""
    run = tmp_path / "run"
    run_script("train.py", "--config", "configs/smoke.json", "--set", "train.steps=10",
               "--out", run, check=True)
    proc = run_script("train.py", "--resume", run, "--set", "train.steps=12",
                      "--set", "train.d_augment=color,translation,cutout", check=True)
    assert any("train.d_augment" in line and "cutout" in line for line in proc.stdout.splitlines())
    assert (run / "checkpoints" / "model-12.index").exists()


def from_collapse(tmp_path, monkeypatch, name, limit, *sets, resume=False, augment=True):
    """An in-process train.py run of the smoke config with train.d_augment_from "collapse"
    (augment=False: no train.d_augment), an evaluation every 2 steps, and train.ALIKE_LIMIT
    `limit`; returns (its log records, the steps trained with augmentation)."""
    import train
    monkeypatch.setattr(train, "ALIKE_LIMIT", limit)
    augmented = []

    def spy(*args, augmenting=True, **kwargs):
        if augmenting and config.augmentations(args[2]):
            augmented.append(args[5])
        return RUN_STEP(*args, augmenting=augmenting, **kwargs)

    monkeypatch.setattr(gan, "run_step", spy)
    run = tmp_path / name
    argv = (["--resume", str(run)] if resume else
            ["--config", os.path.join(ROOT, "configs", "smoke.json"), "--out", str(run),
             "--set", "train.eval_every=2", "--set", "train.eval_images=8",
             "--set", "train.checkpoint_every=2"])
    if augment and not resume:
        argv += ["--set", "train.d_augment=color,translation,cutout",
                 "--set", "train.d_augment_from=collapse"]
    for s in sets:
        argv += ["--set", s]
    assert train.cli(argv) == 0
    with open(run / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return records, augmented


def losses(records):
    return [(r["d_real_loss"], r["d_fake_loss"], r["g_loss"]) for r in records if "event" not in r]


def test_from_collapse_it_starts_after_the_first_evaluation_that_finds_one(tmp_path, monkeypatch,
                                                                          capsys):
    """Issue 19: the main config augments D's inputs only where G collapses; every
    evaluation finds a collapse when the limit is below any ratio."""
    records, augmented = from_collapse(tmp_path, monkeypatch, "run", -1.0, "train.steps=6")
    out = capsys.readouterr().out
    assert "D will see every image through: color, translation, cutout" in out
    assert "warning: at step 2 the fakes are" in out and "from step 3 on D sees" in out
    assert augmented == [3, 4, 5, 6]
    assert [r["step"] for r in records if r.get("event") == "d_augment"] == [2]


def test_from_collapse_a_resume_augments_what_the_whole_run_did(tmp_path, monkeypatch, capsys):
    """The step it started is kept with the checkpoints: 2 steps + resume + 4 steps train as
    6 steps did, and the resume says since when."""
    whole, _ = from_collapse(tmp_path, monkeypatch, "whole", -1.0, "train.steps=6")
    from_collapse(tmp_path, monkeypatch, "halves", -1.0, "train.steps=2")
    capsys.readouterr()
    halves, augmented = from_collapse(tmp_path, monkeypatch, "halves", -1.0, "train.steps=6",
                                      resume=True)
    assert "since the collapse found at step 2" in capsys.readouterr().out
    assert augmented == [3, 4, 5, 6] and losses(halves) == losses(whole)


def test_from_collapse_nothing_changes_until_one_is_found(tmp_path, monkeypatch):
    """A run that never collapses trains exactly as one without train.d_augment (a GAN run
    parts from tiny float differences within tens of steps)."""
    waiting, augmented = from_collapse(tmp_path, monkeypatch, "waiting", float("inf"),
                                       "train.steps=4")
    plain, _ = from_collapse(tmp_path, monkeypatch, "plain", float("inf"), "train.steps=4",
                             augment=False)
    assert augmented == [] and not any(r.get("event") == "d_augment" for r in waiting)
    assert losses(waiting) == losses(plain)


@pytest.mark.parametrize("key, value", [("train.eval_every", "0"), ("train.d_augment", "")])
def test_from_collapse_without_evaluations_or_augmentations_is_one_clear_error(tmp_path, key,
                                                                               value):
    out = tmp_path / "run"
    sets = {"train.d_augment": "cutout", "train.eval_every": "5", key: value,
            "train.d_augment_from": "collapse"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = run_script("train.py", "--config", "configs/smoke.json", *args, "--out", out)
    assert_clear_error(proc.returncode, proc.stderr, "train.d_augment_from", key,
                       nothing_written=[out])
