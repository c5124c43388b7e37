"""Train the DCGAN on a folder of tiles.

    python train.py --config configs/cpu.json [--set section.key=value]... [--out DIR]
    python train.py --resume RUN_DIR_OR_CHECKPOINT_PREFIX [--config ...] [--set ...]

Reads top to bottom: parse -> load tiles -> build the graph once (gan.py) ->
create or restore the session -> loop. The run folder's layout, checkpoints
and lock live in runs.py; what one step does lives in gan.py.
"""
import gc
import os
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

import device  # first of the TensorFlow importers: it holds back TensorFlow's benign notices
import tensorflow as tf

import config as config_lib
import data
import gan
import metrics
import model
import runs
from cli import ArgumentParser, run_main
from history_cache import HistoryCache
from sampling import generate_u8, sample_latents

tf1 = tf.compat.v1
tf.get_logger().setLevel("ERROR")  # no deprecation notes from the v1 Saver


# ---------------------------------------------------------------- output files

def tb_scalars(writer, record):
    values = {k: v for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    values.update(path_a=record["path"] == "A", history_used=record["history_used"])
    tb_values(writer, values, record["step"])


def tb_values(writer, values, step):
    summary = [tf1.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    writer.add_summary(tf1.Summary(value=summary), step)


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
    """(reals, split name, a sample of the training tiles) the evaluations compare fakes with;
    read before the run starts.

    The reals are the data's holdout split when its manifest has one, else the training
    tiles (a seeded sample of them when they stay on disk). How alike the fakes may be is
    judged against the training tiles either way: a holdout from other places can be far
    more or less alike than what G learns from.
    """
    t, m = cfg.train, cfg.model
    side = config_lib.load_size(cfg)
    pick = np.random.default_rng(t.seed).permutation(len(batches))[:t.eval_images]
    if batches.tiles is not None:
        reals, sample = batches.tiles, batches.tiles[pick]
    else:
        reals = sample = np.stack([data.read_tile(batches.files[i], side, cfg.data.grayscale)
                                   for i in pick])
    split = cfg.data.split or "train"
    if data.comparison_split(cfg.data.path) == data.HOLDOUT:
        reals, _ = data.load_tiles(cfg.data.path, data.HOLDOUT, side,
                                   cfg.data.grayscale, cfg.data.bad_files)
        split = data.HOLDOUT
    # One fixed window per tile when training crops (data.load_size).
    window = lambda tiles: data.random_crops(tiles, m.image_size,
                                             np.random.default_rng([t.seed, 0xC0]))
    return window(reals), split, window(sample)


class Evaluator:
    """SWD and MS-SSIM of `eval_images` fakes every `eval_every` steps; finds the best.

    Reals come from `eval_reals`. The fakes come from fixed latents in inference mode, so
    evaluations differ only by the weights. The loop saves the best by average SWD
    as checkpoints/best-N, which checkpoint retention never touches.
    """

    def __init__(self, cfg, g, reals, split, training, ckpt_dir, log_records):
        t, m = cfg.train, cfg.model
        self.cfg, self.reals, self.split = cfg, reals, split
        # The reference for a collapse (on_collapse): the same at every step, so measured once.
        self.ms_ssim_train = metrics.ms_ssim_mean(training, seed=t.seed, threads=cfg.run.threads)
        best = [p for _, p in sorted(runs.checkpoint_steps(ckpt_dir, "best").items())]
        g["best_saver"].recover_last_checkpoints(best[-1:])  # so the next best replaces it
        count = -(-t.eval_images // t.batch_size) * t.batch_size
        self.z = sample_latents(np.random.default_rng([t.seed, 0xE7A1]), (count, m.z_dim),
                                m.z_dist)[:t.eval_images]
        evals = [r for r in log_records if r.get("event") == "eval"]
        self.best = min((r["swd_avg"] for r in evals), default=float("inf"))

    def __call__(self, run, step):
        started, g = time.time(), run.g
        fakes = generate_u8(run.sess, g["z_in"], g["samples_u8_out"], self.z,
                            {g["is_training_in"]: False})
        found = metrics.evaluate_sets(self.reals, fakes, seed=self.cfg.train.seed, quick=True,
                                      threads=self.cfg.run.threads)
        record = {"event": "eval", "step": step, "real_split": self.split,
                  "swd_avg": found["swd_x1e3"]["avg"], "swd_x1e3": found["swd_x1e3"],
                  "swd_real_baseline_x1e3": found["swd_real_baseline_x1e3"],
                  "ms_ssim_fake": found["ms_ssim_fake"], "ms_ssim_real": found["ms_ssim_real"],
                  "ms_ssim_train": self.ms_ssim_train,
                  "n": found["n"], "seconds": time.time() - started}
        record["best"] = record["swd_avg"] < self.best
        if record["best"]:  # the loop saves it, once the evaluation has had its effects
            self.best = record["swd_avg"]
        return record


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = ArgumentParser(prog="train.py", description="Train the satgan DCGAN on a folder of tiles.")
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
    cfg, run_dir, prefix, changed = runs.open_run(args.config, args.set, args.out, args.resume)
    t = cfg.train
    kind = device.choose(cfg.run.device)  # run.device=gpu without a GPU: an error, nothing written
    plan = device.plan(kind, cfg)
    print(device.describe(kind))

    started = time.time()
    side = config_lib.load_size(cfg)
    tiles, files = data.load_tiles(cfg.data.path, cfg.data.split, side, cfg.data.grayscale,
                                   cfg.data.bad_files, min_count=t.batch_size,
                                   keep_pixels=cfg.data.in_memory)
    batches = data.Batches(tiles, files, t.batch_size, side, t.seed, cfg.data.grayscale)
    held = f"{tiles.nbytes / 2 ** 20:.1f} MB uint8 in memory" if tiles is not None else "read from disk"
    print(f"data: {len(files)} tiles from {cfg.data.path} ({held}), {time.time() - started:.1f} s")
    eval_set = eval_reals(cfg, batches) if t.eval_every else None  # its errors come before any write

    device.set_determinism(cfg.run.deterministic)
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(t.seed)  # Lesson 6
        g = gan.build_graph(cfg, plan)
        print("model: " + ", ".join(
            f"{name} weights and biases {model.count_params(scope):,} "
            f"(+ {model.count_params(scope, batch_norm=True):,} batch-norm)"
            for name, scope in (("generator", model.GEN_SCOPE), ("discriminator", model.DISC_SCOPE))))
    # Nothing is allocated until the session runs: a config the device cannot hold stops here.
    device.check_memory(device.memory_needed(graph, (model.GEN_SCOPE, model.DISC_SCOPE)), kind)
    os.makedirs(run_dir, exist_ok=True)
    lock = runs.acquire_lock(run_dir)
    try:
        if not prefix:  # at once: a start-up cut short leaves a folder that says what it was
            runs.write_config(run_dir, cfg)
        with graph.as_default():  # the Saver and FileWriter look up the default graph
            return train(cfg, plan, graph, g, batches, eval_set, run_dir, prefix, changed)
    finally:
        batches.close()
        runs.release_lock(lock)


LONG_RUN_HOURS = 8  # a CPU run expected to take longer says so
PACE_STEPS = 10  # steps, after a sitting's first, whose wall time sets that expectation


class Pace:
    """A run sized for a GPU, started on a CPU without asking for one, says how long it takes:
    timed on its own first steps (samples included), which counts what a figure worked out in
    advance misses (bf16 units, other jobs on the machine)."""

    def __init__(self, cfg, plan):
        self.on = plan.kind == "cpu" and cfg.run.device == "auto"
        self.steps, self.started = cfg.train.steps, None

    def after(self, step):
        if not self.on:
            return
        if self.started is None:  # the first step of a sitting builds kernels: not timed
            self.started = (step, time.time())
            return
        first, then = self.started
        if step - first < PACE_STEPS or step >= self.steps:
            return
        self.on = False
        hours = (time.time() - then) / (step - first) * (self.steps - step) / 3600
        if hours > LONG_RUN_HOURS:
            print(f"warning: no GPU, so this run trains on the CPU: about {hours:,.0f} more hours "
                  f"for steps {step + 1:,}..{self.steps:,} at the pace of steps {first + 1:,}.."
                  f"{step:,}; a GPU machine runs it (README, \"On a GPU\"), configs/cpu.json is "
                  f"sized for a CPU, and --set run.device=cpu trains here without this warning",
                  file=sys.stderr, flush=True)


def train(cfg, plan, graph, g, batches, eval_set, run_dir, prefix, changed):
    t, m = cfg.train, cfg.model
    sess = tf1.Session(graph=graph, config=device.session_config(plan))
    writer = tf1.summary.FileWriter(os.path.join(run_dir, "tensorboard"))
    cache = HistoryCache(t.history_size, (m.image_size, m.image_size, m.channels), seed=t.seed)
    run = runs.Run(run_dir, sess, g, cache, writer)
    for folder in (run.ckpt_dir, run.sample_dir):
        os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(run_dir, "log.jsonl")
    graph.finalize()  # Lesson 14: the loop below can add no op
    data_now = runs.data_state(batches, cfg.data.path)
    data_changed = None
    if prefix:
        step, saved = run.restore(prefix)
        sample_z, data_changed = saved["sample_z"], runs.data_change(saved, data_now)
        logged = runs.truncate_log(log_path, step)
        run.records = [r for r in logged if "event" not in r]
        # TensorBoard drops what earlier event files hold after this step (redone steps).
        writer.add_session_log(tf1.SessionLog(status=tf1.SessionLog.START), step)
        print(f"resumed {prefix} at step {step}" + (f"; changed: {changed}" if changed else ""))
        if data_changed:
            then, now = data_changed["tiles"]
            how = f"{then} then, {now} now" if then != now else f"{now} tiles, files changed"
            print(f"note: the tiles differ from those {prefix} was trained on ({how}): "
                  f"this is not an exact continuation")
        runs.write_config(run_dir, cfg)  # only now: a resume that fails leaves config.json as it was
    else:  # main wrote config.json before anything else
        sess.run(g["init_op"])
        step, logged = 0, []
        runs.truncate_log(log_path, 0)  # a run restarted before its first checkpoint logs anew
        sample_z = sample_latents(np.random.default_rng([t.seed, 0xFACE]),
                                  (t.batch_size, m.z_dim), m.z_dist)  # Lesson 10
    run.log = runs.Log(log_path)
    if prefix:
        run.log.write({"event": "resume", "step": step, "checkpoint": prefix, "changed": changed,
                   **({"data_changed": data_changed} if data_changed else {})})
    since = int(saved.get("d_augment_since", 0)) if prefix else 0  # 0: not started by a collapse
    run.state = {"sample_z": sample_z, "d_augment_since": np.int64(since), **data_now}
    stop = StopFlag()
    print(f"run folder: {run_dir}; training steps {step + 1}..{t.steps}")
    if t.g_average:
        print(f"samples and evaluations: G's averaged weights (train.g_average {t.g_average})")
    names = ", ".join(config_lib.augmentations(cfg))
    if names and augmenting(cfg, run):
        print(f"D sees every image through: {names} (train.d_augment)"
              + (f", since the collapse found at step {since}" if since else ""))
    elif names:
        print(f"D will see every image through: {names} (train.d_augment) from the first "
              f"evaluation that finds the fakes over {ALIKE_LIMIT}x as alike as the training "
              f"tiles (train.d_augment_from collapse)")

    evaluate = Evaluator(cfg, g, *eval_set, run.ckpt_dir, logged) if eval_set else None
    step = loop(cfg, run, batches, evaluate, stop, step, Pace(cfg, plan))

    if stop.signal is not None:
        save_on_stop(run, step)
        print(f"stopped by {stop.signal} after step {step}; {run.how_to_go_on(step)}")
    else:
        print(f"done: {step} steps; samples in {run.sample_dir}, checkpoints in {run.ckpt_dir}")
    writer.close()
    run.log.close()
    sess.close()
    return 0


def out_of_memory(run, step, e):
    """The error for a device out of memory; no checkpoint is written after it (the step
    may be half done), the last one is kept."""
    kept = (f"the last checkpoint, {os.path.join(run.ckpt_dir, f'model-{run.saved_step}')}, "
            f"is kept" if run.saved_step else "no checkpoint was written before it")
    return runs.RunError(f"step {step}: out of memory ({runs.error_cause(e)}); training stopped; "
                         f"{kept}; lower {device.LOWER} in a new run (a resume keeps them), or "
                         f"free the device's memory and --resume {run.dir}")


def loop(cfg, run, batches, evaluate, stop, step, pace):
    """Train from `step` until train.steps or a stop signal; returns the last step trained."""
    t, sess, g, writer, log = cfg.train, run.sess, run.g, run.writer, run.log
    try:
        while step < t.steps and stop.signal is None:
            step_started = time.time()
            step += 1
            try:
                record = gan.run_step(sess, g, cfg, batches, run.cache, step,
                                      augmenting=augmenting(cfg, run))
            except data.DataError as e:  # a tile read from disk (data.in_memory: false) went bad
                step -= 1
                save_on_stop(run, step)
                raise data.DataError(f"{e}; training stopped after step {step}, "
                                     f"{run.how_to_go_on(step)}") from None

            bad = [k for k in gan.LOSS_KEYS if not np.isfinite(record[k])]
            if bad:
                log.write({"step": step, **record, "error": "non-finite loss"})
                raise run.diverged(step, record, bad)
            record = {"step": step, **record,
                      "imgs_per_s": t.batch_size / (time.time() - step_started)}
            run.records.append(record)
            if step % t.log_every == 0 or step == t.steps:
                log.write(record)
                tb_scalars(writer, record)
            if step % t.sample_every == 0 or step == t.steps:  # the end state is seen too
                gan.refresh_samples(sess, g)
                run.dump_samples(step)
            if evaluate and step % t.eval_every == 0:
                gan.refresh_samples(sess, g)
                found = evaluate(run, step)
                log_evaluation(writer, log, found)
                on_collapse(cfg, run, step, found)
                if found["best"]:
                    run.save(step, name="best")
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpoint(run, step)
            if step % 50 == 0 or step == t.steps:
                print_progress(record)
            pace.after(step)
    except tf.errors.ResourceExhaustedError as e:  # in a step, an evaluation or a sample grid
        raise out_of_memory(run, step, e) from None
    except tf.errors.UnimplementedError as e:  # an op with no deterministic kernel on this device
        if not cfg.run.deterministic:
            raise
        raise runs.RunError(f"step {step}: run.deterministic asks for deterministic kernels and "
                            f"this device has none for an op of the graph "
                            f"({runs.error_cause(e)}); drop run.deterministic, or the option "
                            f"that adds the op (the error names it)") from None
    return step


ALIKE_LIMIT = 1.5  # fakes this many times as alike as the training tiles (MS-SSIM): a collapse


def log_evaluation(writer, log, found):
    step = found["step"]
    log.write(found)
    tb_values(writer, {f"eval/{k}": found[k] for k in ("swd_avg", "ms_ssim_fake")}, step)
    print(f"eval at step {step}: SWD x1e3 {found['swd_avg']:.1f} (real vs real "
          f"{found['swd_real_baseline_x1e3']['avg']:.1f}), MS-SSIM {found['ms_ssim_fake']:.3f} "
          f"(reals {found['ms_ssim_real']:.3f}"
          + (f", training tiles {found['ms_ssim_train']:.3f})"
             if found["real_split"] == data.HOLDOUT else ")")
          + ("  best so far, saved as best-%d" % step if found["best"] else ""), flush=True)


def augmenting(cfg, run):
    """Whether the next step augments what D sees: train.d_augment from the first step, or
    with train.d_augment_from "collapse" once an evaluation has found one (the step is kept
    with the checkpoints, so a resume augments the steps the uninterrupted run did)."""
    return cfg.train.d_augment_from == "start" or bool(run.state["d_augment_since"])


def on_collapse(cfg, run, step, found):
    """Fakes over ALIKE_LIMIT times as alike as the training tiles: a warning; with
    train.d_augment_from "collapse", the first such evaluation also turns train.d_augment on
    for the rest of the run."""
    alike = found["ms_ssim_fake"] / max(found["ms_ssim_train"], 1e-6)
    if alike <= ALIKE_LIMIT:
        return
    what = (f"warning: at step {step} the fakes are {alike:.1f}x as alike as the training tiles "
            f"(MS-SSIM): G is collapsing towards few images")
    if augmenting(cfg, run) or not config_lib.augmentations(cfg):
        print(f"{what}; see the README, 'When the samples look alike'", flush=True)
        return
    run.state["d_augment_since"] = np.int64(step)
    run.log.write({"event": "d_augment", "step": step})
    print(f"{what}; from step {step + 1} on D sees every image through "
          f"{', '.join(config_lib.augmentations(cfg))} (train.d_augment_from collapse)", flush=True)


def print_progress(r):
    print(f"step {r['step']:6d}  D real {r['d_real_loss']:.3f}  fake {r['d_fake_loss']:.3f}"
          f"  G {r['g_loss']:.3f}  path {r['path']}  {r['imgs_per_s']:.0f} img/s", flush=True)


def checkpoint(run, step):
    gan.refresh_samples(run.sess, run.g)  # the averaged G is saved as it is shown
    run.save(step)
    plot_losses(run.records, os.path.join(run.dir, "losses.png"))


def save_on_stop(run, step):
    """A run stopped early keeps its last trained step (unless it is saved or there is none)."""
    if step and run.saved_step != step:
        checkpoint(run, step)


class Terminated(KeyboardInterrupt):
    """SIGTERM before the loop takes it over: start-up ends as it does for Ctrl-C."""


def _terminate(_signum, _frame):
    raise Terminated


def cli(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here on
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_main(main, argv)
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
