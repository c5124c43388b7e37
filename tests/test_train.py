"""The training script end to end, and the graph's promises (Lessons 5, 6, 9, 10, 12-15, 32-39)."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf

import config
import gan
import data
import device
import sampling
import runs
import train
from history_cache import HistoryCache
from conftest import (ROOT, assert_clear_error, assert_named, assert_said, built, run_script,
                      write_tiles)

tf1 = tf.compat.v1
LOG_FIELDS = {"step", "d_real_loss", "d_fake_loss", "d_reg_loss", "g_loss", "g_reg_loss", "path",
              "d_real_acc", "d_fake_acc", "history_used", "imgs_per_s"}


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps_of(records):
    return [r for r in records if "event" not in r]


def weights(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


# ---------------------------------------------------------------- the run folder

def test_run_folder_holds_every_promised_output(smoke_run):
    cfg = json.load(open(os.path.join(smoke_run, "config.json")))
    assert cfg["train"]["steps"] == 40 and cfg["model"]["image_size"] == 16  # resolved config

    records = steps_of(read_log(smoke_run))
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert LOG_FIELDS <= set(r)
        assert r["path"] in ("A", "B") and isinstance(r["history_used"], bool)
        assert r["d_reg_loss"] > 0 and r["g_reg_loss"] > 0  # Lesson 25: logged apart
    assert any(r["history_used"] for r in records)  # Lesson 33

    samples = sorted(os.listdir(os.path.join(smoke_run, "samples")))
    assert samples == [f"step-{s:06d}.png" for s in (10, 20, 30, 40)]  # Lesson 10
    from PIL import Image
    grid = Image.open(os.path.join(smoke_run, "samples", samples[0]))
    assert grid.size == (4 * 16 + 3 * 2, 2 * 16 + 2)  # batch 8 -> 4 x 2 grid with gaps

    ckpt_dir = os.path.join(smoke_run, "checkpoints")
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("model-40")
    kept = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".index"))
    assert kept == ["model-20.index", "model-30.index", "model-40.index"]  # keep_checkpoints=3
    assert sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".state.npz")) == \
        ["model-20.state.npz", "model-30.state.npz", "model-40.state.npz"]
    assert os.path.getsize(os.path.join(smoke_run, "losses.png")) > 5000
    assert any(n.startswith("events.out.tfevents")
               for n in os.listdir(os.path.join(smoke_run, "tensorboard")))
    assert not os.path.exists(os.path.join(smoke_run, "lock"))


def test_checkpoint_holds_four_separate_adam_states_and_bn_averages(smoke_run):
    """Lesson 32 (never share Adam state) and Lesson 23 (moving averages saved)."""
    names = set(weights(os.path.join(smoke_run, "checkpoints", "model-40")))
    for opt in ("adam_d_real", "adam_d_fake", "adam_d_total", "adam_g"):
        assert any(f"/{opt}" in n or n.startswith(opt) for n in names), opt
    assert "discriminator/down1/w/adam_d_real" in names
    assert "discriminator/down1/w/adam_d_fake" in names
    assert "generator/up1/w/adam_g" in names
    assert not any(n.startswith("generator/") and "adam_d" in n for n in names)
    assert "generator/up1_bn/moving_mean" in names
    assert "global_step" in names


def test_resume_continues_exactly(smoke_run, tmp_path):
    """20 steps + --resume + 20 steps == 40 steps in one go: log values and final weights."""
    run = tmp_path / "halves"
    run_script("train.py", "--config", "configs/smoke.json", "--set", "train.steps=20",
               "--out", run, check=True)
    proc = run_script("train.py", "--resume", run, "--set", "train.steps=40", check=True)
    assert_said(proc.stdout, run / "checkpoints" / "model-20", "step 20")  # where it resumed
    assert "remapper failed" not in proc.stderr  # no alarming TensorFlow error on a good run
    assert "cuInit" not in proc.stderr and "cudart_stub" not in proc.stderr  # nor a GPU notice
    assert "device: CPU" in proc.stdout

    whole, halves = steps_of(read_log(smoke_run)), read_log(run)
    assert [r["event"] for r in halves if "event" in r] == ["resume"]
    halves = steps_of(halves)
    assert [r["step"] for r in halves] == list(range(1, 41))
    for a, b in zip(whole, halves):
        for key in gan.LOSS_KEYS + ("d_real_acc", "d_fake_acc"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key)
        assert (a["path"], a["history_used"]) == (b["path"], b["history_used"])
    w_whole = weights(os.path.join(smoke_run, "checkpoints", "model-40"))
    w_halves = weights(str(run / "checkpoints" / "model-40"))
    assert w_whole.keys() == w_halves.keys()
    for name in w_whole:
        np.testing.assert_allclose(w_whole[name], w_halves[name], atol=1e-6, err_msg=name)
    # Lesson 10: the sample noise is fixed for the run and kept across the resume.
    for name in ("step-000010.png", "step-000040.png"):
        with open(run / "samples" / name, "rb") as a, \
                open(os.path.join(smoke_run, "samples", name), "rb") as b:
            assert a.read() == b.read(), name


def test_resume_on_other_tiles_says_it_is_not_an_exact_continuation(tmp_path, capsys):
    tiles = write_tiles(str(tmp_path / "tiles"), 24, size=16)
    run = tmp_path / "run"
    assert train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"),
                      "--set", f"data.path={tiles}", "--set", "train.steps=2",
                      "--out", str(run)]) == 0
    for name in sorted(os.listdir(tiles))[:8]:
        os.remove(os.path.join(tiles, name))
    capsys.readouterr()
    assert train.cli(["--resume", str(run), "--set", "train.steps=3"]) == 0
    # which checkpoint, then the number of tiles it was trained on and the number now
    assert_said(capsys.readouterr().out, (run / "checkpoints" / "model-2", "24", "16"))
    resume = [r for r in read_log(run) if r.get("event") == "resume"]
    assert resume[0]["data_changed"] == {"tiles": [24, 16]}
    # Each run's last step is sampled though sample_every (10) does not divide it.
    assert sorted(os.listdir(run / "samples")) == ["step-000002.png", "step-000003.png"]


def test_resume_from_a_missing_prefix_fails_and_names_it(smoke_run, tmp_path, capsys):
    missing = os.path.join(smoke_run, "checkpoints", "model-999")
    proc = run_script("train.py", "--resume", missing)
    assert_clear_error(proc.returncode, proc.stderr, missing)
    code = train.cli(["--resume", str(tmp_path)])  # a folder without checkpoints
    assert_clear_error(code, capsys.readouterr().err, tmp_path)
    assert not os.listdir(tmp_path)


def test_resume_refuses_an_architecture_change(smoke_run, capsys):
    code = train.cli(["--resume", smoke_run, "--set", "model.gen_filters=64"])
    assert_clear_error(code, capsys.readouterr().err, smoke_run, ("model.gen_filters", "32", "64"))


def test_a_new_run_refuses_a_folder_that_holds_one(smoke_run, capsys):
    code = train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"), "--out", smoke_run])
    assert_clear_error(code, capsys.readouterr().err, f"--resume {smoke_run}", "--out")


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/smoke.json",
                             "--set", "train.steps=100000", "--set", "train.checkpoint_every=100000",
                             "--out", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 15):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    last = steps_of(read_log(run))[-1]["step"]
    assert_said(out, "SIGINT", f"step {last}", f"--resume {run}")
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith(f"model-{last}")
    proc = run_script("train.py", "--resume", run, "--set", f"train.steps={last + 2}", check=True)
    assert [r["step"] for r in steps_of(read_log(run))][-3:] == [last, last + 1, last + 2]


def test_ctrl_c_during_start_up_is_one_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_tiles", interrupted)
    code = train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"),
                      "--out", str(tmp_path / "run")])
    assert code == 130
    assert_said(capsys.readouterr().err, "Ctrl-C")
    assert not os.path.exists(tmp_path / "run")  # nothing was saved


def test_sigterm_during_start_up_ends_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """It ended the process silently (exit 143), leaving the lock file behind."""
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    monkeypatch.setattr(data, "load_tiles", terminated)
    def left_to_the_default(*_):  # what the process would do without cli's handler: die
        raise RuntimeError("SIGTERM was not handled by train.cli")
    before = signal.signal(signal.SIGTERM, left_to_the_default)
    try:
        code = train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"),
                          "--out", str(tmp_path / "run")])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143
    assert_said(capsys.readouterr().err, "SIGTERM")
    assert not os.path.exists(tmp_path / "run")  # nothing was saved, no lock left behind


def test_config_json_names_the_data_by_an_absolute_path(smoke_run):
    """So a resume started from another folder trains on the same tiles."""
    with open(os.path.join(smoke_run, "config.json")) as f:
        assert json.load(f)["data"]["path"] == os.path.join(ROOT, "data")


def test_a_data_path_from_home_is_expanded(tmp_path, monkeypatch):
    """`--set data.path=~/tiles` reaches Python unexpanded (bash expands ~ only at a word's start)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = runs.absolute_data_path(config.load(overrides=["data.path=~/tiles"]))
    assert cfg.data.path == str(tmp_path / "tiles")


def test_paths_from_home_and_with_spaces_are_taken_and_quoted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = train.parse_args(["--config", "~/c.json", "--out", "~/my run", "--resume", "~/r"])
    assert (args.config, args.out, args.resume) == (
        str(tmp_path / "c.json"), str(tmp_path / "my run"), str(tmp_path / "r"))
    # A command printed to continue must survive being pasted into a shell.
    (tmp_path / "my run").mkdir()
    (tmp_path / "my run" / "config.json").write_text("{}")
    with pytest.raises(runs.RunError, match="--out '.*/my run'$"):
        runs.resolve_checkpoint(str(tmp_path / "my run"))


def test_an_out_that_cannot_be_made_is_refused_before_the_data_are_read(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("mine")
    smoke = os.path.join(ROOT, "configs", "smoke.json")
    with pytest.raises(runs.RunError) as e:
        runs.open_run(smoke, [], str(tmp_path / "a_file/x/run"), None)
    assert_named(str(e.value), ("--out", tmp_path / "a_file/x/run", tmp_path / "a_file"))
    monkeypatch.setattr(runs.os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(runs.RunError) as e:
        runs.open_run(smoke, [], str(tmp_path / "run"), None)
    # the run folder, then its parent that is not writable
    assert_named(str(e.value), ("--out", tmp_path / "run", f"'{tmp_path}'"))
    assert not os.path.exists(tmp_path / "run")


def test_a_config_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path))
    assert_named(str(e.value), tmp_path, "configs/cpu.json")  # and what to give instead


def test_the_last_step_is_logged_whatever_log_every(tmp_path):
    code = train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"),
                      "--set", "train.steps=6", "--set", "train.log_every=4",
                      "--out", str(tmp_path / "run")])
    assert code == 0
    assert [r["step"] for r in steps_of(read_log(tmp_path / "run"))] == [4, 6]


def test_ctrl_c_while_tensorflow_loads_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/smoke.json",
                             "--out", str(tmp_path / "run")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # TensorFlow takes seconds to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err


def test_a_tile_gone_bad_mid_run_stops_with_a_checkpoint_and_names_it(tmp_path, monkeypatch,
                                                                        capsys):
    """data.in_memory: false reads tiles each step; when they vanish after step 3,
    the run saves step 3, names a file, says how to resume, and exits 2."""
    tiles = write_tiles(str(tmp_path / "tiles"), 24, size=16)
    run_step = gan.run_step

    def deleting(sess, g, cfg, batches, cache, step, **kw):
        if step == 3:
            for name in os.listdir(tiles):
                os.remove(os.path.join(tiles, name))
        return run_step(sess, g, cfg, batches, cache, step, **kw)
    monkeypatch.setattr(gan, "run_step", deleting)
    run = tmp_path / "run"
    code = train.cli(["--config", os.path.join(ROOT, "configs", "smoke.json"),
                      "--set", f"data.path={tiles}", "--set", "data.in_memory=false",
                      "--out", str(run)])
    assert_clear_error(code, capsys.readouterr().err, tiles, "step 3", f"--resume {run}")
    assert runs.newest_checkpoint(str(run / "checkpoints")).endswith("model-3")
    assert [r["step"] for r in steps_of(read_log(run))] == [1, 2, 3]


# ---------------------------------------------------------------- the graph, in-process

def tiny_cfg(**train_values):
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"))
    for key, value in train_values.items():
        setattr(cfg.train, key, value)
    return cfg


class RecordingSession:
    """Delegates to a Session and remembers what each run fetched."""

    def __init__(self, sess):
        self.sess, self.fetched = sess, []

    def run(self, fetches, feed_dict=None):
        flat = list(fetches.values()) if isinstance(fetches, dict) else \
            list(fetches) if isinstance(fetches, (list, tuple)) else [fetches]
        self.fetched.append({getattr(f, "name", str(f)) for f in flat})
        return self.sess.run(fetches, feed_dict)


def batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    S, B = cfg.model.image_size, cfg.train.batch_size
    reals = rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8)
    z = rng.uniform(-1, 1, (B, cfg.model.z_dim)).astype(np.float32)
    return reals, z


def test_load_size_trains_on_windows_of_the_larger_tiles(monkeypatch):
    """data.load_size: the step's reals are image_size windows of the loaded tiles."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"),
                      ["data.load_size=32", "data.augment=false"])
    B = cfg.train.batch_size
    tiles = np.random.default_rng(0).integers(0, 256, (3 * B, 32, 32, 3), dtype=np.uint8)
    batches = data.Batches(tiles, [""] * len(tiles), B, 32, seed=0)
    seen = []
    monkeypatch.setattr(gan, "train_step", lambda sess, g, reals, *rest, **kw:
                        (seen.append(reals) or {}, np.zeros((B, 16, 16, 3), np.float32)))
    cache = HistoryCache(10, (16, 16, 3))
    gan.run_step(None, None, cfg, batches, cache, step=2)
    source = tiles[data.batch_indices(1, B, len(tiles), 0)]
    assert seen[0].shape == (B, 16, 16, 3)
    for tile, crop in zip(source, seen[0]):
        assert any(np.array_equal(tile[r:r + 16, c:c + 16], crop)
                   for r in range(17) for c in range(17))


def test_graph_is_finalized_and_its_op_count_constant():
    """Lesson 14: the loop creates no op."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    before = len(graph.get_operations())
    for step in range(3):
        gan.train_step(sess, g, *batch(cfg, step), None, False)
    assert graph.finalized and len(graph.get_operations()) == before


def test_optimisers_and_losses_never_share_a_run():
    """Lesson 15; Lesson 39: path A = two D runs, path B = one; then G twice."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    rec = RecordingSession(sess)
    train_ops = {g[k].name for k in ("d_real_op", "d_fake_op", "d_total_op", "g_op")}
    loss_names = {g[k].name for k in gan.LOSS_KEYS}
    record, _ = gan.train_step(rec, g, *batch(cfg), None, False)
    for fetched in rec.fetched:
        assert not (fetched & train_ops and fetched & loss_names)
    ops = [f & train_ops for f in rec.fetched if f & train_ops]
    d_runs = [{g["d_real_op"].name}, {g["d_fake_op"].name}] if record["path"] == "A" \
        else [{g["d_total_op"].name}]
    assert ops == d_runs + [{g["g_op"].name}] * 2
    assert rec.fetched[-1] >= loss_names  # losses come last, after every update


def test_reals_are_scaled_exactly_once_to_minus_one_one():
    """Lessons 8, 12, 29: uint8 0..255 fed, -1..+1 inside the graph."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    reals, _ = batch(cfg)
    reals[0], reals[1] = 0, 255
    fed = sess.run(g["reals_in"], {g["reals_u8_in"]: reals})
    assert fed[0].min() == -1.0 and fed[1].max() == 1.0
    np.testing.assert_allclose(fed, reals / 127.5 - 1.0, atol=1e-6)


def test_a_fake_becomes_the_same_pixels_in_the_graph_and_in_numpy():
    # A history image (NumPy) and a sample PNG (graph) of one fake must agree;
    # convert_image_dtype truncated x * 255.5, which made 0.0 grey level 127, not 128.
    edges = [-1.2, -1.0, -0.999, -0.5, 0.0, 1 / 255, 0.5, 0.999, 1.0, 1.3]
    values = np.concatenate([edges, np.random.default_rng(0).uniform(-1, 1, 1000)]).astype(np.float32)
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, [None])
        in_graph = tf1.Session().run(sampling.to_u8_op(x), {x: values})
    assert in_graph.tolist() == sampling.to_u8(values).tolist()
    assert sampling.to_u8(np.float32([0.0, -1.0, 1.0])).tolist() == [128, 0, 255]


def test_history_images_reach_d_in_the_real_paths_range():
    """Lessons 34-35: cached uint8 fakes replace part of the fake half, converted like reals."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    reals, z = batch(cfg)
    B = cfg.train.batch_size
    history = np.full((B, 16, 16, 3), 255, np.uint8)
    mask = np.zeros(B, np.float32)
    mask[:3] = 1.0
    d_input = graph.get_tensor_by_name("concat:0")  # [2B, S, S, 3]: reals then fakes
    seen = sess.run(d_input, {g["reals_u8_in"]: reals, g["z_in"]: z,
                              g["history_u8_in"]: history, g["history_mask_in"]: mask})
    assert np.all(seen[B:B + 3] == 1.0)  # 255 -> +1, exactly like a real white pixel
    assert not np.any(seen[B + 3:] == 1.0)


def test_regulariser_is_part_of_what_the_optimisers_minimise():
    """Lesson 24: a strong L2 term shrinks the generator's weights."""
    def g_weight_norm(reg_scale):
        cfg = tiny_cfg(lr_gen=0.01)
        cfg.model.reg_scale = reg_scale
        graph, g, sess = built(cfg)
        reals, z = batch(cfg)
        kernels = [v for v in graph.get_collection("trainable_variables")
                   if v.op.name.startswith("generator/") and v.op.name.endswith("/w")]
        for _ in range(10):
            sess.run(g["g_op"], {g["reals_u8_in"]: reals, g["z_in"]: z})
        return sum(float((w ** 2).sum()) for w in sess.run(kernels))
    assert g_weight_norm(10.0) < 0.7 * g_weight_norm(0.0)


def test_thread_limits_come_from_the_config():
    cfg = tiny_cfg()
    cfg.run.threads = 0
    assert device.session_config(device.plan("cpu", cfg)).intra_op_parallelism_threads == config.default_threads()
    cfg.run.threads = 1
    assert device.session_config(device.plan("cpu", cfg)).intra_op_parallelism_threads == 1


def test_d_step_trains_d_on_the_generated_batch_it_returns():
    """Lesson 34: the fakes handed to the history cache are the batch D was trained on."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    d_kernel = [v for v in graph.get_collection("trainable_variables")
                if v.op.name == "discriminator/down1/w"][0]
    reals, z = batch(cfg)
    before = sess.run(d_kernel)
    record, fakes = gan.train_step(sess, g, reals, z, None, False)
    assert not np.allclose(before, sess.run(d_kernel))
    assert record["path"] == gan.choose_path(record["d_real_acc"], record["d_fake_acc"])
    assert fakes.shape == (cfg.train.batch_size, 16, 16, 3)
    # The same z through the weights of before the G updates: a fresh graph would differ.
    assert np.abs(fakes).max() <= 1.0 and not np.allclose(fakes, sess.run(
        g["fakes_out"], {g["reals_u8_in"]: reals, g["z_in"]: z}))
    cached = sampling.to_u8(fakes[0])
    assert cached.dtype == np.uint8 and cached.shape == (16, 16, 3)  # Lesson 35


def test_d_sees_reals_and_fakes_in_one_call():
    """Lesson 38: one discriminator forward pass on one mixed batch."""
    cfg = tiny_cfg()
    graph, g, sess = built(cfg)
    first_convs = [op for op in graph.get_operations() if op.type == "Conv2D"
                   and op.name.startswith("discriminator/") and "gradients" not in op.name]
    assert len(first_convs) == 3  # one per layer: same1, down2, down1
    assert first_convs[0].inputs[0].shape.as_list()[0] == 2 * cfg.train.batch_size


class Sink:
    def write(self, record):
        self.record = record

    def add_summary(self, summary, step):
        pass


def evaluated(found, capsys):
    """What the run prints of evaluation `found` at step 500 (smoke config)."""
    train.log_evaluation(Sink(), Sink(), found)
    run = types.SimpleNamespace(state={"d_augment_since": 0}, log=Sink())
    train.on_collapse(config.load(os.path.join(ROOT, "configs", "smoke.json")), run, 500, found)
    return capsys.readouterr().out


@pytest.mark.parametrize("fake_ms_ssim, warned", [(0.40, True), (0.12, False)])
def test_an_evaluation_that_finds_the_fakes_alike_says_so(fake_ms_ssim, warned, capsys):
    """Issue 19: a collapse on the user's imagery is named in the run's output, not only in
    numbers: fakes more than 1.5x as alike as the training tiles (MS-SSIM) give a warning line."""
    out = evaluated({"event": "eval", "step": 500, "real_split": "train", "swd_avg": 128.0,
                     "swd_real_baseline_x1e3": {"avg": 80.0}, "ms_ssim_fake": fake_ms_ssim,
                     "ms_ssim_real": 0.08, "ms_ssim_train": 0.08, "best": False}, capsys)
    assert "MS-SSIM %.3f (reals 0.080)" % fake_ms_ssim in out
    warning = "warning: at step 500 the fakes are 5.0x as alike as the training tiles"
    assert (warning in out) == warned
    assert ("'When the samples look alike'" in out) == warned


def test_a_collapse_is_judged_against_the_training_tiles_not_a_holdout(capsys):
    # A holdout from other places can be far more alike than the training tiles (the bundled
    # sample's: about twice); judged against it, fakes 2.5x as alike as what G learns from passed.
    out = evaluated({"event": "eval", "step": 500, "real_split": "holdout", "swd_avg": 128.0,
                     "swd_real_baseline_x1e3": {"avg": 80.0}, "ms_ssim_fake": 0.20,
                     "ms_ssim_real": 0.30, "ms_ssim_train": 0.08, "best": False}, capsys)
    assert "MS-SSIM 0.200 (reals 0.300, training tiles 0.080)" in out
    assert "warning: at step 500 the fakes are 2.5x as alike as the training tiles" in out


def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path):
    """train.eval_every: SWD/MS-SSIM on the holdout logged; best-N outlives retention."""
    run = tmp_path / "run"
    # Trained on 16x16 windows of the 64x64 sample tiles (data.load_size), evaluated on such too.
    proc = run_script("train.py", "--config", "configs/smoke.json", "--set", "train.eval_every=20",
                      "--set", "train.eval_images=64", "--set", "train.keep_checkpoints=1",
                      "--set", "data.load_size=64", "--out", run, check=True)
    assert "eval at step 20" in proc.stdout
    evals = [r for r in read_log(run) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [20] and evals[0]["real_split"] == "holdout"
    assert evals[0]["swd_avg"] > 0 and 0 < evals[0]["ms_ssim_fake"] <= 1
    train_ms_ssim = evals[0]["ms_ssim_train"]
    assert 0 < train_ms_ssim <= 1 and train_ms_ssim != evals[0]["ms_ssim_real"]
    assert f"training tiles {evals[0]['ms_ssim_train']:.3f})" in proc.stdout
    names = sorted(os.listdir(run / "checkpoints"))
    assert [n for n in names if n.endswith(".index")] == ["best-20.index", "model-30.index"]
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("model-30")
    proc = run_script("generate.py", "--checkpoint", run / "checkpoints" / "best-20", "-n", "2",
                      "--out", tmp_path / "fakes", check=True)
    assert sorted(os.listdir(tmp_path / "fakes")) == ["fake-000000.png", "fake-000001.png"]
    # The Turing quiz of a window-trained run shows windows of the real tiles beside the fakes.
    import generate
    assert generate.cli(["--checkpoint", str(run), "--turing", "--real", "data",
                         "--out", str(tmp_path / "quiz"), "--threads", "1"]) == 0
    assert os.path.exists(tmp_path / "quiz" / "quiz.png")
