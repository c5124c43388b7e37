"""How fast a training step runs on this machine, against the machine's own yardstick.

    python bench.py [--config configs/article.json] [--steps 5] [--set section.key=value]... [--json OUT] [--untuned]

The figure of merit is achieved GFLOP/s over NumPy's float32 matrix-multiply
GFLOP/s with the same thread count (timing.py, shared with tools/bench_torch.py).
Steps run on random uint8 tiles through the same `gan.run_step` the trainer
uses, on the device train.py would choose (run.device), with its tuning.
"""
import json
import os
import resource
import sys
import tempfile
import time

import config as config_lib
import device
import timing
from cli import ArgumentParser, run_main


def parse_args(argv):
    p = ArgumentParser(prog="bench.py", description="Benchmark a training step of a satgan config.")
    p.add_argument("--config", default="configs/article.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after 2 warm-up)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--untuned", action="store_true",
                   help="time the graph with TensorFlow's defaults instead of the device's tuning "
                        "(on a CPU: the remapper on, the 4x4 layers as convolutions)")
    args = p.parse_args(argv)
    problem = args.json and config_lib.json_output_problem(args.json)
    if problem:
        p.error(problem)
    return args


# ---------------------------------------------------------------- timing

class TimedSession:
    """A Session whose run() adds up the wall time spent inside TensorFlow."""

    def __init__(self, sess):
        self.sess, self.seconds = sess, 0.0

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.sess.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def time_path(cfg, g, sess, path, steps, first_step, yardstick):
    """timing.time_steps of gan.run_step forced to `path`, each step logged as train.py does."""
    import gan
    from history_cache import HistoryCache
    m, t = cfg.model, cfg.train
    batches = timing.random_batches(cfg)
    cache = HistoryCache(t.history_size, (m.image_size, m.image_size, m.channels), seed=t.seed)
    for i in range(t.history_size):  # a full cache, so history steps happen at their rate
        cache.add(batches.tiles[i % len(batches.tiles), :m.image_size, :m.image_size])
    timed = TimedSession(sess)
    with tempfile.TemporaryFile("w") as log:
        def step(n):
            timed.seconds = 0.0
            # train.d_augment_from "collapse": a run starts without it, so time that
            record = gan.run_step(timed, g, cfg, batches, cache, n, force_path=path,
                                  augmenting=cfg.train.d_augment_from == "start")
            log.write(json.dumps({"step": n, **record}) + "\n")
            log.flush()
            return timed.seconds
        return timing.time_steps(step, steps, first_step, yardstick)


def main(argv=None):
    args = parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    threads = timing.set_blas_threads(cfg)
    kind = device.choose(cfg.run.device)
    plan = device.plan(kind, cfg, tuned=not args.untuned)
    device.set_determinism(cfg.run.deterministic)

    import numpy as np
    import tensorflow as tf
    import gan
    tf1 = tf.compat.v1

    yardstick = timing.Yardstick()
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(cfg.train.seed)
        g = gan.build_graph(cfg, plan)
    flops, g_fwd, d_fwd = timing.graph_step_flops(graph, cfg.train.batch_size)
    sess = tf1.Session(graph=graph, config=device.session_config(plan))
    sess.run(g["init_op"])
    graph.finalize()
    result = {"config": args.config, "overrides": args.set, "threads": threads,
              "device": device.describe(kind), "untuned": args.untuned,
              "g_fwd_gflop_per_img": g_fwd / 1e9, "d_fwd_gflop_per_img": d_fwd / 1e9}
    with graph.as_default():
        for path in ("B", "A"):
            totals, outside, probes = time_path(cfg, g, sess, path, args.steps,
                                                first_step=1 if path == "B" else 1000,
                                                yardstick=yardstick)
            key = path.lower()
            result.update(timing.path_figures(key, flops[path], totals, probes))
            result[f"outside_run_frac_{key}"] = float(np.median(outside))
        result["imgs_per_s"] = cfg.train.batch_size / result["s_per_step_b"]
        result["outside_run_frac"] = result["outside_run_frac_b"]
        result.update(yardstick.figures())
        result.update(time_outputs(sess, g, cfg))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def time_outputs(sess, g, cfg):
    """Seconds to write one sample grid and one checkpoint."""
    import numpy as np
    import runs
    from history_cache import HistoryCache
    m, t = cfg.model, cfg.train
    cache = HistoryCache(t.history_size, (m.image_size, m.image_size, m.channels))
    with tempfile.TemporaryDirectory() as tmp:
        run = runs.Run(tmp, sess, g, cache, _NullWriter())
        run.state = {"sample_z": np.zeros((t.batch_size, m.z_dim), np.float32)}
        for folder in (run.ckpt_dir, run.sample_dir):
            os.makedirs(folder)
        start = time.perf_counter()
        run.dump_samples(1)
        sample_s = time.perf_counter() - start
        start = time.perf_counter()
        run.save(1)
        checkpoint_s = time.perf_counter() - start
    return {"sample_dump_s": sample_s, "checkpoint_s": checkpoint_s}


class _NullWriter:
    def add_summary(self, *_):
        pass


def print_table(r):
    rows = [
        ("device", r["device"].split(": ", 1)[1]),
        ("threads", f"{r['threads']}"),
        ("NumPy float32 matmul", timing.matmul_text(r)),
        ("matmul kernel", timing.blas_text(r)),
        ("forward per image, G / D", f"{r['g_fwd_gflop_per_img']:.3f} / {r['d_fwd_gflop_per_img']:.3f} GFLOP"),
    ]
    for path in ("b", "a"):
        rows += [
            (f"path {path.upper()}: FLOPs per step", f"{r[f'tflop_per_step_{path}']:.3f} TFLOP"),
            (f"path {path.upper()}: seconds per step", f"{r[f's_per_step_{path}']:.3f} s (median)"),
            (f"path {path.upper()}: achieved", timing.achieved_text(r, path)),
            (f"path {path.upper()}: outside session.run", f"{100 * r[f'outside_run_frac_{path}']:.1f}% of the step"),
        ]
    rows += [
        ("images per second (path B)", f"{r['imgs_per_s']:.1f}"),
        ("sample grid dump", f"{r['sample_dump_s']:.3f} s"),
        ("checkpoint save", f"{r['checkpoint_s']:.3f} s"),
        ("peak resident memory", f"{r['peak_rss_mb']:.0f} MB"),
    ]
    timing.print_table(f"bench: {r['config']} {' '.join(r['overrides'])}".rstrip()
                       + (" (untuned graph)" if r.get("untuned") else ""), rows)


if __name__ == "__main__":
    sys.exit(run_main(main))
