"""Train the DCGAN on a folder of tiles.

    python train.py --config configs/cpu.json [--set section.key=value]... [--out DIR]
    python train.py --resume RUN_DIR_OR_CHECKPOINT_PREFIX [--config ...] [--set ...]

Reads top to bottom: parse -> load tiles -> build the graph once -> create or
restore the session -> loop. Each step measures D on the current batch,
updates D along path A or B, updates G twice, then fetches the losses in a
run of their own (Lessons 15, 39).
"""
import argparse
import gc
import json
import os
import shlex
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # Ctrl-C while TensorFlow loads ends the process quietly (exit 130)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

import config as config_lib
import data
import metrics
import model
import runs
from history_cache import HistoryCache

tf1 = tf.compat.v1
tf.get_logger().setLevel("ERROR")  # no deprecation notes from the v1 Saver
LOSS_KEYS = ("d_real_loss", "d_fake_loss", "d_reg_loss", "g_loss", "g_reg_loss")


# ---------------------------------------------------------------- pure decisions

def choose_path(d_real_acc, d_fake_acc):
    """Lesson 39: path A when D misjudges at least half of the reals or of the fakes.

    Path A optimises D's real and fake losses separately (two runs); path B
    takes one run on the total loss and leaves G room.
    """
    return "A" if d_real_acc <= 0.5 or d_fake_acc <= 0.5 else "B"


def use_history(coin, prob, cached, needed):
    """Lesson 33: replay old fakes with probability `prob`, once enough are cached."""
    return coin < prob and cached >= needed


def history_count(batch_size, fraction):
    return int(round(batch_size * fraction))


def sample_latents(rng, shape, dist):
    if dist == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


# ---------------------------------------------------------------- the graph

def build_graph(cfg):
    """Every op of the run, built once; returns a dict of the tensors the loop uses."""
    m, t = cfg.model, cfg.train
    B, S = t.batch_size, m.image_size
    g = {}
    with tf.name_scope("Inputs"):
        # Pixels arrive as uint8 0..255 and are scaled exactly once, here (Lessons 8, 12).
        g["reals_u8_in"] = tf1.placeholder(tf.uint8, [B, S, S, m.channels], "reals_u8_in")
        g["z_in"] = tf1.placeholder(tf.float32, [B, m.z_dim], "z_in")
        g["history_u8_in"] = tf1.placeholder_with_default(
            tf.zeros([B, S, S, m.channels], tf.uint8), [B, S, S, m.channels], "history_u8_in")
        g["history_mask_in"] = tf1.placeholder_with_default(tf.zeros([B]), [B], "history_mask_in")
        g["is_training_in"] = tf1.placeholder_with_default(True, [], "is_training_in")
        g["step_in"] = tf1.placeholder(tf.int64, [], "step_in")

    to_signed = lambda u8: tf.image.convert_image_dtype(u8, tf.float32) * 2.0 - 1.0  # Lesson 29
    reals = to_signed(g["reals_u8_in"])  # [B, S, S, C] in -1..1
    g["reals_in"] = reals
    kw = dict(vars(m))
    g["fakes_out"] = model.generator(g["z_in"], g["is_training_in"], **kw)  # [B, S, S, C]
    g["fakes_u8_out"] = model.to_u8(g["fakes_out"])  # the same pixels as to_u8 below

    # Lesson 33-35: cached fakes, stored as uint8 like the reals, replace part of the fake half.
    mask = g["history_mask_in"][:, None, None, None]
    fakes_for_d = g["fakes_out"] * (1.0 - mask) + to_signed(g["history_u8_in"]) * mask

    # Lesson 38: one D call on one batch of reals and fakes; losses on its halves.
    logits = model.discriminator(tf.concat([reals, fakes_for_d], 0), g["is_training_in"], **kw)
    real_logits, fake_logits = logits[:B], logits[B:]  # [B], [B]
    ce = tf.nn.sigmoid_cross_entropy_with_logits
    g["d_real_loss"] = tf.reduce_mean(ce(labels=tf.ones([B]), logits=real_logits))
    g["d_fake_loss"] = tf.reduce_mean(ce(labels=tf.zeros([B]), logits=fake_logits))
    own = 1.0 - g["history_mask_in"]  # G is judged on its own fakes only
    g["g_loss"] = tf.reduce_sum(ce(labels=tf.ones([B]), logits=fake_logits) * own) / \
        tf.maximum(tf.reduce_sum(own), 1.0)
    g["d_reg_loss"] = model.l2_regulariser(model.DISC_SCOPE, m.reg_scale)  # Lessons 24-25
    g["g_reg_loss"] = model.l2_regulariser(model.GEN_SCOPE, m.reg_scale)
    g["d_real_acc"] = tf.reduce_mean(tf.cast(real_logits > 0, tf.float32))
    g["d_fake_acc"] = tf.reduce_mean(tf.cast(fake_logits < 0, tf.float32))

    # Lesson 32: four Adam optimisers, one per minimised loss, none sharing state.
    d_vars = tf1.trainable_variables(model.DISC_SCOPE + "/")
    g_vars = tf1.trainable_variables(model.GEN_SCOPE + "/")
    updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)

    def adam(name, lr, loss, var_list, scope):
        optimiser = tf1.train.AdamOptimizer(lr, beta1=t.beta1, name=name)
        if cfg.run.mixed_precision == "fp16":
            # float16 gradients underflow: scale the loss up, the gradients back down,
            # and skip a step whose gradients overflowed (the scale then shrinks).
            optimiser = tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimiser, "dynamic")
        with tf.control_dependencies([u for u in updates if u.name.startswith(scope + "/")]):
            return optimiser.minimize(loss, var_list=var_list, name=name + "_op")

    d_reg, g_reg = g["d_reg_loss"], g["g_reg_loss"]
    g["d_real_op"] = adam("adam_d_real", t.lr_disc, g["d_real_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["d_fake_op"] = adam("adam_d_fake", t.lr_disc, g["d_fake_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["d_total_op"] = adam("adam_d_total", t.lr_disc,
                           g["d_real_loss"] + g["d_fake_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["g_op"] = adam("adam_g", t.lr_gen, g["g_loss"] + g_reg, g_vars, model.GEN_SCOPE)

    g["global_step"] = tf1.get_variable("global_step", [], tf.int64,
                                        tf1.zeros_initializer(), trainable=False)
    g["set_step_op"] = g["global_step"].assign(g["step_in"])
    g["init_op"] = tf1.global_variables_initializer()
    g["saver"] = tf1.train.Saver(max_to_keep=cfg.train.keep_checkpoints)
    g["best_saver"] = tf1.train.Saver(max_to_keep=1)  # best-N: outside the retention of model-N
    return g


# ---------------------------------------------------------------- one step

def run_step(sess, g, cfg, batches, cache, step, force_path=None):
    """Step `step` (1-based): draw its batch, train on it, feed the history cache."""
    t, m = cfg.train, cfg.model
    rng = np.random.default_rng([t.seed, step])  # every draw of a step, by seed and step
    reals = data.random_crops(batches.get(step - 1), m.image_size, rng)  # data.load_size
    if cfg.data.augment:
        reals = data.augment(reals, rng)
    z = sample_latents(rng, (t.batch_size, m.z_dim), m.z_dist)
    n_history = history_count(t.batch_size, t.history_fraction)
    history_used = use_history(rng.random(), t.history_prob, len(cache), n_history)
    history = cache.sample(n_history) if history_used else None
    record, fakes = train_step(sess, g, reals, z, history, history_used, force_path)
    cache.add(to_u8(fakes[0]))  # Lesson 34: from the generated batch, stored as uint8
    return record


def train_step(sess, g, reals_u8, z, history_u8, history_used, force_path=None):
    """One training step on one batch; returns (record to log, the generated batch).

    `force_path` is for the benchmark, which times paths A and B apart.
    """
    feed = {g["reals_u8_in"]: reals_u8, g["z_in"]: z}
    if history_used:
        mask = np.zeros(len(z), np.float32)
        mask[:len(history_u8)] = 1.0
        padded = np.zeros_like(reals_u8)
        padded[:len(history_u8)] = history_u8
        feed[g["history_u8_in"]], feed[g["history_mask_in"]] = padded, mask

    # Measure D on the batch it is about to learn from (Lesson 39). The fakes
    # are kept and fed back to the D updates, which need no second G pass.
    fakes, real_acc, fake_acc = sess.run(
        [g["fakes_out"], g["d_real_acc"], g["d_fake_acc"]], feed)
    path = force_path or choose_path(real_acc, fake_acc)
    d_feed = {**feed, g["fakes_out"]: fakes}

    # Update D: maximize log(D(x)) + log(1 - D(G(z))), its halves apart on path A.
    if path == "A":
        sess.run(g["d_real_op"], d_feed)
        sess.run(g["d_fake_op"], d_feed)
    else:
        sess.run(g["d_total_op"], d_feed)

    # Update G twice: maximize log(D(G(z))) on its own fakes only.
    g_feed = {g["reals_u8_in"]: reals_u8, g["z_in"]: z}
    sess.run(g["g_op"], g_feed)
    sess.run(g["g_op"], g_feed)

    # Lesson 15: losses in a run of their own, after the optimisers.
    losses = sess.run({k: g[k] for k in LOSS_KEYS}, feed)
    record = {k: float(v) for k, v in losses.items()}
    record.update(path=path, d_real_acc=float(real_acc), d_fake_acc=float(fake_acc),
                  history_used=bool(history_used))
    return record, fakes


# ---------------------------------------------------------------- output files

def write_atomic(path, payload):
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)


def tb_scalars(writer, record):
    values = {k: v for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    values.update(path_a=record["path"] == "A", history_used=record["history_used"])
    tb_values(writer, values, record["step"])


def tb_values(writer, values, step):
    summary = [tf1.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    writer.add_summary(tf1.Summary(value=summary), step)


def tb_image(writer, tag, picture_u8, step):
    h, w, c = picture_u8.shape
    image = tf1.Summary.Image(height=h, width=w, colorspace=c,
                              encoded_image_string=data.png_bytes(picture_u8))
    writer.add_summary(tf1.Summary(value=[tf1.Summary.Value(tag=tag, image=image)]), step)


def plot_losses(records, path):
    """Losses over steps with the steps that took path A marked (the article's figure)."""
    steps = np.array([r["step"] for r in records])
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True,
                                    gridspec_kw={"height_ratios": [5, 1]})
    for key, style in (("d_real_loss", "-"), ("d_fake_loss", "-"), ("g_loss", "-"),
                       ("d_reg_loss", "--"), ("g_reg_loss", "--")):
        ax.plot(steps, [r[key] for r in records], style, lw=0.8, label=key)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("losses; below: D path per step (A = separate real/fake updates)")
    path_a = np.array([r["path"] == "A" for r in records])
    history = np.array([r["history_used"] for r in records])
    strip.vlines(steps[path_a], 1, 2, color="tab:red", lw=0.6, label="path A")
    strip.vlines(steps[~path_a], 1, 2, color="tab:blue", lw=0.6, label="path B")
    strip.vlines(steps[history], 0, 0.8, color="tab:gray", lw=0.6, label="history used")
    strip.set_yticks([])
    strip.set_xlabel("step")
    strip.legend(loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    gc.collect()  # a figure is reference cycles: free it now, not at a rare full collection
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------- evaluation during training

def eval_reals(cfg, batches):
    """(reals, split name) the evaluations compare fakes with; read before the run starts.

    The data's holdout split when its manifest has one, else the training tiles
    (a seeded sample of them when they stay on disk).
    """
    t, m = cfg.train, cfg.model
    side = config_lib.load_size(cfg)
    if "holdout" in data.manifest_splits(cfg.data.path):
        reals, _ = data.load_tiles(cfg.data.path, "holdout", side,
                                   cfg.data.grayscale, cfg.data.bad_files)
        split = "holdout"
    else:
        split = cfg.data.split or "train"
        reals = batches.tiles
        if reals is None:
            pick = np.random.default_rng(t.seed).permutation(len(batches))[:t.eval_images]
            reals = np.stack([data.read_tile(batches.files[i], side, cfg.data.grayscale)
                              for i in pick])
    # One fixed window per tile when training crops (data.load_size).
    return data.random_crops(reals, m.image_size, np.random.default_rng([t.seed, 0xC0])), split


class Evaluator:
    """SWD and MS-SSIM of `eval_images` fakes every `eval_every` steps; keeps the best.

    Reals come from `eval_reals`. The fakes come from fixed latents in inference mode, so
    evaluations differ only by the weights. The best checkpoint by average SWD
    is saved as checkpoints/best-N, which checkpoint retention never touches.
    """

    def __init__(self, cfg, g, reals, split, ckpt_dir, log_records):
        t, m = cfg.train, cfg.model
        self.cfg, self.reals, self.split = cfg, reals, split
        best = [p for _, p in sorted(runs.checkpoint_steps(ckpt_dir, "best").items())]
        g["best_saver"].recover_last_checkpoints(best[-1:])  # so the next best replaces it
        count = -(-t.eval_images // t.batch_size) * t.batch_size
        self.z = sample_latents(np.random.default_rng([t.seed, 0xE7A1]), (count, m.z_dim),
                                m.z_dist)[:t.eval_images]
        evals = [r for r in log_records if r.get("event") == "eval"]
        self.best = min((r["swd_avg"] for r in evals), default=float("inf"))

    def __call__(self, sess, g, step, ckpt_dir, cache, state):
        started = time.time()
        fakes = generate_u8(sess, g["z_in"], g["fakes_u8_out"], self.z,
                            {g["is_training_in"]: False})
        found = metrics.evaluate_sets(self.reals, fakes, seed=self.cfg.train.seed, quick=True,
                                      threads=self.cfg.run.threads)
        record = {"event": "eval", "step": step, "real_split": self.split,
                  "swd_avg": found["swd_x1e3"]["avg"], "swd_x1e3": found["swd_x1e3"],
                  "swd_real_baseline_x1e3": found["swd_real_baseline_x1e3"],
                  "ms_ssim_fake": found["ms_ssim_fake"], "ms_ssim_real": found["ms_ssim_real"],
                  "n": found["n"], "seconds": time.time() - started}
        record["best"] = record["swd_avg"] < self.best
        if record["best"]:
            self.best = record["swd_avg"]
            save_checkpoint(sess, g, ckpt_dir, step, cache, state, name="best")
        return record


def generate_u8(sess, z_in, images_out, z, feed=None, progress=None):
    """uint8 images for any number of latents, run `z_in`'s static batch at a time.

    The last batch is padded with zeros and cut back; in inference mode the
    padding cannot change the other images. `feed` adds to each run.
    """
    batch = int(z_in.shape[0])
    out = np.empty((len(z), *images_out.shape[1:]), np.uint8)
    for start in range(0, len(z), batch):
        part = z[start:start + batch]
        padded = np.zeros((batch, z.shape[1]), np.float32)
        padded[:len(part)] = part
        out[start:start + len(part)] = sess.run(images_out, {**(feed or {}), z_in: padded})[:len(part)]
        if progress:
            progress(start + len(part), len(z))
    return out


# ---------------------------------------------------------------- run folder

def parse_args(argv):
    p = argparse.ArgumentParser(description="Train the satgan DCGAN on a folder of tiles.")
    p.add_argument("--config", help="JSON config (configs/*.json); optional with --resume")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--out", help="run folder (default runs/<config-name>-<timestamp>)")
    p.add_argument("--resume", metavar="PREFIX_OR_RUN_DIR",
                   help="continue a run from a checkpoint prefix or a run folder's newest checkpoint")
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("give --config (e.g. configs/cpu.json) or --resume RUN_DIR")
    config_lib.expand_home(args, ("config", "out", "resume"))
    return args


def open_run(args):
    """(cfg, run_dir, prefix or None, changed safe keys) after every check that can fail early."""
    if args.resume:
        prefix, run_dir = runs.resolve_checkpoint(args.resume)
        if runs.ASIDE_NAME.fullmatch(os.path.basename(os.path.dirname(os.path.abspath(prefix)))):
            raise runs.RunError(f"'{prefix}' belongs to a continuation set aside by an earlier "
                                f"resume; generate.py and evaluate.py take it as it is; to train "
                                f"it on, copy the run folder and move that folder's files (log "
                                f"and samples too) back in place of the newer ones")
        runs.check_unlocked(run_dir)
        if args.out and os.path.abspath(args.out) != os.path.abspath(run_dir):
            raise runs.RunError(f"--resume continues in its own folder '{run_dir}'; drop --out")
        saved = runs.read_run_config(run_dir)
        base = config_lib.read_json(args.config) if args.config else saved.to_dict()
        cfg = absolute_data_path(config_lib.load(base=base, overrides=args.set))
        arch = config_lib.differences(saved, cfg, config_lib.ARCHITECTURE_KEYS)
        if arch:
            raise runs.RunError(
                f"cannot resume '{prefix}': the config changes what the checkpoint holds ("
                + ", ".join(f"{k}: {config_lib.get(saved, k)} -> {config_lib.get(cfg, k)}"
                            for k in arch) + "); resume with the run's own values")
        changed = {k: [config_lib.get(saved, k), config_lib.get(cfg, k)]
                   for k in config_lib.differences(saved, cfg, list(config_lib.flat(cfg)))}
        done = runs.checkpoint_step(prefix)
        if done >= cfg.train.steps:
            raise runs.RunError(f"'{prefix}' is at step {done} and train.steps is "
                                f"{cfg.train.steps}: nothing to train; to go on, resume with "
                                f"--set train.steps=N, N above {done}")
        check_outside_data(run_dir, cfg.data.path)
        return cfg, run_dir, prefix, changed
    cfg = absolute_data_path(config_lib.load(args.config, args.set))
    name = os.path.splitext(os.path.basename(args.config))[0]
    run_dir = args.out or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise runs.RunError(f"--out '{run_dir}' is a file; give a folder for the run")
    check_creatable(run_dir)
    check_outside_data(run_dir, cfg.data.path)
    runs.check_unlocked(run_dir)
    if runs.newest_checkpoint(os.path.join(run_dir, runs.CHECKPOINTS)):
        raise runs.RunError(f"'{run_dir}' already holds a run; continue it with "
                            f"--resume {shlex.quote(run_dir)}, or choose another --out")
    foreign = runs.foreign_entries(run_dir)
    if foreign:  # its config.json or log.jsonl would be overwritten
        raise runs.RunError(f"--out '{run_dir}' holds files that are not a run's ("
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
        raise runs.RunError(f"--out '{run_dir}' lies under '{parent}', which is a file; "
                            f"give a folder for the run")
    if parent != os.path.abspath(run_dir) and not os.access(parent, os.W_OK | os.X_OK):
        raise runs.RunError(f"--out '{run_dir}' cannot be made: '{parent}' is not writable; "
                            f"choose another --out")


def absolute_data_path(cfg):
    """data.path made absolute (and ~ expanded: a shell leaves `data.path=~/x` as it is),
    so that config.json names the data wherever a resume runs."""
    cfg.data.path = os.path.abspath(os.path.expanduser(cfg.data.path))
    return cfg


def check_outside_data(run_dir, data_path):
    """A run folder inside a scanned data folder would have its samples read as tiles."""
    if not os.path.isdir(data_path) or os.path.isfile(os.path.join(data_path, data.MANIFEST)):
        return  # a manifest names its files; nothing else in the folder is read
    run = os.path.realpath(run_dir) + os.sep
    if any(run.startswith(os.path.realpath(root) + os.sep)  # symlinked folders count too
           for root, _ in data.walk(data_path)):
        raise runs.RunError(f"run folder '{run_dir}' is inside data.path '{data_path}', whose "
                            f"images are all read as tiles (the run's samples would be too); "
                            f"choose an --out outside it")


# Batch norm stays float32 under the bf16 rewrite: normalising in bf16 trained
# to a worse SWD than float32 on every seed tried (README "Performance").
BF16_FLOAT32_OPS = ("FusedBatchNormV3", "FusedBatchNormGradV3")
AMP_LISTS = "TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_"


def keep_float32(ops):
    """Move `ops` from the mixed-precision rewrite's infer list to its deny list.

    TensorFlow reads these variables whenever it rewrites a graph, so they hold
    for every later session of this process; values already set are kept.
    """
    for suffix in ("INFERLIST_REMOVE", "DENYLIST_ADD"):
        have = [op for op in os.environ.get(AMP_LISTS + suffix, "").split(",") if op]
        os.environ[AMP_LISTS + suffix] = ",".join(have + [op for op in ops if op not in have])


def session_config(cfg):
    """Threads (Lesson 28), precision and JIT for the session that runs the graph.

    Mixed precision is a graph rewrite: variables, batch norm and losses stay
    float32, convolutions and matrix products run in bf16/fp16.
    """
    threads = cfg.run.threads or config_lib.default_threads()  # Lesson 28
    proto = tf1.ConfigProto(intra_op_parallelism_threads=threads,
                            inter_op_parallelism_threads=cfg.run.inter_op_threads)
    proto.gpu_options.allow_growth = True  # share a GPU instead of taking all its memory
    rewrite = proto.graph_options.rewrite_options
    # Grappler's remapper fuses D's first conv, bias and leaky ReLU though the
    # gradient still reads the bias output; it then logs "remapper failed" and
    # leaves the graph as it was. Off, the graph runs the same, without the error.
    rewrite.remapping = rewriter_config_pb2.RewriterConfig.OFF
    if cfg.run.mixed_precision == "bf16":
        keep_float32(BF16_FLOAT32_OPS)
        rewrite.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    elif cfg.run.mixed_precision == "fp16":
        # The rewrite casts to float16 on GPUs only; on a CPU the loss-scaled graph
        # runs in float32 (TF's CPU float16 emulation crashes on this graph).
        rewrite.auto_mixed_precision = rewriter_config_pb2.RewriterConfig.ON
    if cfg.run.xla:
        proto.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    return proto


def save_checkpoint(sess, g, ckpt_dir, step, cache, state, name="model"):
    """Sidecar first, then the Saver (data, index, then TF's `checkpoint` file).

    The sidecar holds the history cache and `state`: the fixed sample noise and
    what identifies the tiles trained on (data_state).

    A failed write (disk full, folder gone) stops the run: its leftovers are
    removed, the older checkpoints and the `checkpoint` file stay as they were.
    name="best" writes best-N with its own Saver and index file, so neither
    retention nor `--resume RUN` ever picks or deletes it.
    """
    prefix = os.path.join(ckpt_dir, f"{name}-{step}")
    saver, index = (g["saver"], "checkpoint") if name == "model" else (g["best_saver"], "best")
    sess.run(g["set_step_op"], {g["step_in"]: step})
    try:
        runs.save_sidecar(prefix, {**state, **{f"history_{k}": v
                                               for k, v in cache.state().items()}})
        saver.save(sess, os.path.join(ckpt_dir, name), global_step=step,
                   latest_filename=index, write_meta_graph=False)
    except (OSError, ValueError, tf.errors.OpError) as e:
        if os.path.isdir(ckpt_dir):
            runs.remove_leftovers(ckpt_dir)
        raise runs.RunError(f"step {step}: writing checkpoint '{prefix}' failed "
                            f"({error_cause(e)}); training stopped, the older checkpoints "
                            f"are kept: fix the cause (disk space, permissions) and "
                            f"--resume {shlex.quote(os.path.dirname(ckpt_dir))}") from None
    runs.remove_leftovers(ckpt_dir)
    return prefix


def diverged(step, record, bad, run_dir, saved_step):
    """The error for a non-finite loss: no checkpoint is written after it."""
    good = os.path.join(run_dir, runs.CHECKPOINTS, f"model-{saved_step}")
    kept = (f"the last good checkpoint, {good}, is kept: lower train.lr_disc / train.lr_gen "
            f"and --resume {shlex.quote(run_dir)}" if saved_step
            else "no checkpoint was written before it: start again with lower learning rates")
    return runs.RunError(f"step {step}: {', '.join(bad)} became {record[bad[0]]}; "
                         f"training stopped; {kept}")


def error_cause(e):
    """The line of an error that says what went wrong; TF's come after a stack."""
    lines = [s for s in getattr(e, "message", str(e)).splitlines() if s and not s[0].isspace()]
    return lines[-1] if lines else type(e).__name__


def restore_checkpoint(sess, g, prefix, cache, ckpt_dir):
    """Weights, all four Adam states and BN averages, then the sidecar; returns (step, state).

    A checkpoint of another net is refused before anything in the run folder moves.
    """
    saved = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    built = {v.op.name: v.shape.as_list()  # what g["saver"] saves: every global variable
             for v in sess.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    differences = runs.variable_differences(saved, built)
    if differences:
        more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
        raise runs.RunError(f"checkpoint '{prefix}' was not trained with the model that "
                            f"{os.path.dirname(ckpt_dir)}/config.json describes: "
                            f"{'; '.join(differences[:2])}{more}; resume with the config.json "
                            f"of the run that wrote it")
    try:
        g["saver"].restore(sess, prefix)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        raise runs.RunError(f"checkpoint '{prefix}' does not match this model: "
                            f"{str(e).splitlines()[0]}") from None
    state = runs.load_sidecar(prefix)
    cache.load_state({k[len("history_"):]: v for k, v in state.items() if k.startswith("history_")})
    step = int(sess.run(g["global_step"]))
    keep = g["saver"].saver_def.max_to_keep
    g["saver"].recover_last_checkpoints(runs.adopt_checkpoints(ckpt_dir, step, keep))
    return step, {k: v for k, v in state.items() if not k.startswith("history_")}


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


# ---------------------------------------------------------------- main

class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name


def main(argv=None):
    args = parse_args(argv)
    cfg, run_dir, prefix, changed = open_run(args)
    t, m = cfg.train, cfg.model

    started = time.time()
    side = config_lib.load_size(cfg)
    tiles, files = data.load_tiles(cfg.data.path, cfg.data.split, side, cfg.data.grayscale,
                                   cfg.data.bad_files, min_count=t.batch_size,
                                   keep_pixels=cfg.data.in_memory)
    batches = data.Batches(tiles, files, t.batch_size, side, t.seed, cfg.data.grayscale)
    held = f"{tiles.nbytes / 2 ** 20:.1f} MB uint8 in memory" if tiles is not None else "read from disk"
    print(f"data: {len(files)} tiles from {cfg.data.path} ({held}), {time.time() - started:.1f} s")
    eval_set = eval_reals(cfg, batches) if t.eval_every else None  # its errors come before any write

    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(t.seed)  # Lesson 6
        g = build_graph(cfg)
    print("model: " + ", ".join(
        f"{name} weights and biases {model_count(graph, scope):,} "
        f"(+ {model_count(graph, scope, batch_norm=True):,} batch-norm)"
        for name, scope in (("generator", model.GEN_SCOPE), ("discriminator", model.DISC_SCOPE))))

    os.makedirs(run_dir, exist_ok=True)
    lock = runs.acquire_lock(run_dir)
    try:
        if not prefix:  # at once: a start-up cut short leaves a folder that says what it was
            write_config(run_dir, cfg)
        with graph.as_default():  # the Saver and FileWriter look up the default graph
            return train(cfg, graph, g, batches, eval_set, run_dir, prefix, changed)
    finally:
        batches.close()
        runs.release_lock(lock)


def model_count(graph, scope, batch_norm=False):
    with graph.as_default():
        return model.count_params(scope, batch_norm)


def write_config(run_dir, cfg):
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    write_atomic(os.path.join(run_dir, "config.json"), text.encode())


def train(cfg, graph, g, batches, eval_set, run_dir, prefix, changed):
    t, m = cfg.train, cfg.model
    ckpt_dir = os.path.join(run_dir, runs.CHECKPOINTS)
    sample_dir = os.path.join(run_dir, "samples")
    for d in (ckpt_dir, sample_dir):
        os.makedirs(d, exist_ok=True)
    log_path = os.path.join(run_dir, "log.jsonl")
    cache = HistoryCache(t.history_size, (m.image_size, m.image_size, m.channels), seed=t.seed)

    sess = tf1.Session(graph=graph, config=session_config(cfg))
    writer = tf1.summary.FileWriter(os.path.join(run_dir, "tensorboard"))
    graph.finalize()  # Lesson 14: the loop below can add no op
    data_now = data_state(batches, cfg.data.path)
    data_changed = None
    if prefix:
        step, saved = restore_checkpoint(sess, g, prefix, cache, ckpt_dir)
        sample_z, data_changed = saved["sample_z"], data_change(saved, data_now)
        logged = runs.truncate_log(log_path, step)
        records = [r for r in logged if "event" not in r]
        # TensorBoard drops what earlier event files hold after this step (redone steps).
        writer.add_session_log(tf1.SessionLog(status=tf1.SessionLog.START), step)
        print(f"resumed {prefix} at step {step}" + (f"; changed: {changed}" if changed else ""))
        if data_changed:
            then, now = data_changed["tiles"]
            how = f"{then} then, {now} now" if then != now else f"{now} tiles, files changed"
            print(f"note: the tiles differ from those {prefix} was trained on ({how}): "
                  f"this is not an exact continuation")
        write_config(run_dir, cfg)  # only now: a resume that fails leaves config.json as it was
    else:  # main wrote config.json before anything else
        sess.run(g["init_op"])
        step, records, logged = 0, [], []
        runs.truncate_log(log_path, 0)  # a run restarted before its first checkpoint logs anew
        sample_z = sample_latents(np.random.default_rng([t.seed, 0xFACE]),
                                  (t.batch_size, m.z_dim), m.z_dist)  # Lesson 10
    log = runs.Log(log_path)
    if prefix:
        log.write({"event": "resume", "step": step, "checkpoint": prefix, "changed": changed,
                   **({"data_changed": data_changed} if data_changed else {})})
    state = {"sample_z": sample_z, **data_now}  # what each checkpoint's sidecar keeps
    stop = StopFlag()
    print(f"run folder: {run_dir}; training steps {step + 1}..{t.steps}")

    evaluate = Evaluator(cfg, g, *eval_set, ckpt_dir, logged) if eval_set else None
    saved_step = step
    while step < t.steps and stop.signal is None:
        step_started = time.time()
        step += 1
        try:
            record = run_step(sess, g, cfg, batches, cache, step)
        except data.DataError as e:  # a tile read from disk (data.in_memory: false) went bad
            step -= 1
            raise data.DataError(f"{e}; training stopped after step {step}, "
                                 + stop_saved(sess, g, run_dir, step, saved_step, cache, state,
                                              records)) from None

        bad = [k for k in LOSS_KEYS if not np.isfinite(record[k])]
        if bad:
            log.write({"step": step, **record, "error": "non-finite loss"})
            raise diverged(step, record, bad, run_dir, saved_step)
        record = {"step": step, **record,
                  "imgs_per_s": t.batch_size / (time.time() - step_started)}
        records.append(record)
        if step % t.log_every == 0 or step == t.steps:
            log.write(record)
            tb_scalars(writer, record)
        if step % t.sample_every == 0 or step == t.steps:  # the end state is seen too
            dump_samples(sess, g, sample_z, sample_dir, writer, step)
        if evaluate and step % t.eval_every == 0:
            found = evaluate(sess, g, step, ckpt_dir, cache, state)
            log.write(found)
            tb_values(writer, {f"eval/{k}": found[k] for k in ("swd_avg", "ms_ssim_fake")}, step)
            print(f"eval at step {step}: SWD x1e3 {found['swd_avg']:.1f} (real vs real "
                  f"{found['swd_real_baseline_x1e3']['avg']:.1f}), MS-SSIM {found['ms_ssim_fake']:.3f}"
                  + ("  best so far, saved as best-%d" % step if found["best"] else ""), flush=True)
        if step % t.checkpoint_every == 0 or step == t.steps:
            save_checkpoint(sess, g, ckpt_dir, step, cache, state)
            plot_losses(records, os.path.join(run_dir, "losses.png"))
            saved_step = step
        if step % 50 == 0 or step == t.steps:
            print(f"step {step:6d}  D real {record['d_real_loss']:.3f}  fake {record['d_fake_loss']:.3f}"
                  f"  G {record['g_loss']:.3f}  path {record['path']}  {record['imgs_per_s']:.0f} img/s",
                  flush=True)

    if stop.signal is not None:
        print(f"stopped by {stop.signal} after step {step}; "
              + stop_saved(sess, g, run_dir, step, saved_step, cache, state, records))
    else:
        print(f"done: {step} steps; samples in {sample_dir}, checkpoints in {ckpt_dir}")
    writer.close()
    log.close()
    sess.close()
    return 0


def stop_saved(sess, g, run_dir, step, saved_step, cache, state, records):
    """Checkpoint `step` for a run that stops early (unless it is saved); says how to go on."""
    if step == 0:
        return (f"no step was trained; start it again with --config "
                f"{shlex.quote(os.path.join(run_dir, 'config.json'))} --out {shlex.quote(run_dir)}")
    if saved_step != step:
        save_checkpoint(sess, g, os.path.join(run_dir, runs.CHECKPOINTS), step, cache, state)
        plot_losses(records, os.path.join(run_dir, "losses.png"))
    return f"checkpoint saved. Continue with: python train.py --resume {shlex.quote(run_dir)}"


def to_u8(image):
    """-1..1 float image -> uint8 0..255, the range the real path is fed with (Lesson 35).

    The same rounding as the graph's model.to_u8, so a cached history image and
    a sample PNG of the same fake hold the same pixels."""
    return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def dump_samples(sess, g, sample_z, sample_dir, writer, step):
    """Grid from the fixed noise in inference mode (moving-average batch norm)."""
    fakes = sess.run(g["fakes_u8_out"], {g["z_in"]: sample_z, g["is_training_in"]: False})
    picture = data.image_grid(fakes)
    write_atomic(os.path.join(sample_dir, f"step-{step:06d}.png"), data.png_bytes(picture))
    tb_image(writer, "samples", picture, step)


class Terminated(KeyboardInterrupt):
    """SIGTERM before the loop takes it over: start-up ends as it does for Ctrl-C."""


def _terminate(_signum, _frame):
    raise Terminated


def cli(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here on
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return runs.cli(main, argv)
    except OSError as e:  # a full disk while writing samples or the log, say
        print(f"error: {e}; any checkpoint written before it is kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before the loop takes Ctrl-C and SIGTERM over
        by, signum = ("SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else \
            ("Ctrl-C", signal.SIGINT)
        print(f"stopped by {by} during start-up: no step was trained and nothing was saved; "
              f"run the command again", file=sys.stderr)
        return 128 + signum  # the shell's code for a process ended by that signal


if __name__ == "__main__":
    sys.exit(cli())
