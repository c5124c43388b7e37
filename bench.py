"""How fast a training step runs on this machine, against the machine's own yardstick.

    python bench.py [--config configs/article.json] [--steps 5] [--set section.key=value]... [--json OUT] [--untuned]

A DCGAN step is almost all convolution arithmetic, so the figure of merit is
achieved GFLOP/s over NumPy's float32 matrix-multiply GFLOP/s with the same
thread count. FLOPs are counted from the layer shapes, not measured; see
`step_flops`. Steps run on random uint8 tiles (the data does not change the
arithmetic), through the same `gan.run_step` the trainer uses.
"""
import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time

import config as config_lib
from cli import run_main


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark a training step of a satgan config.")
    p.add_argument("--config", default="configs/article.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after 2 warm-up)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--untuned", action="store_true",
                   help="time the 'before' graph: transposed-conv output shapes from tf.shape, "
                        "tf.nn.moments batch norm and tf.nn convolutions at 4x4 instead of static "
                        "shapes, fused batch norm and matrix products")
    args = p.parse_args(argv)
    problem = args.json and config_lib.json_output_problem(args.json)
    if problem:
        p.error(problem)
    return args


# ---------------------------------------------------------------- the yardstick

class Yardstick:
    """NumPy's float32 matrix-product GFLOP/s, probed between timed steps.

    A step's share of peak is its GFLOP/s over the probe taken just before it,
    so the two are measured in the same minutes. Each probe is the best of a
    few products (about 0.05 s each here). On the 2-core machine the probes
    of one run still read either ~135 or ~300 GFLOP/s (the README says so):
    the share is a rough figure, achieved GFLOP/s the steadier one.
    """

    def __init__(self, size=2048):
        import numpy as np
        rng = np.random.default_rng(0)
        self.size = size
        self.a = rng.standard_normal((size, size), dtype=np.float32)
        self.b = rng.standard_normal((size, size), dtype=np.float32)
        self.a @ self.b  # warm-up: BLAS threads and pages
        self.readings = []

    def probe(self, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.a @ self.b
            times.append(time.perf_counter() - start)
        gflops = 2 * self.size ** 3 / min(times) / 1e9
        self.readings.append(gflops)
        return gflops

    def figures(self):
        import numpy as np
        return {"matmul_gflops": float(np.median(self.readings)),
                "matmul_range": [min(self.readings), max(self.readings)]}


# ---------------------------------------------------------------- FLOPs from shapes

def net_flops(graph, scope):
    """(forward FLOPs per image, FLOPs of the net's first layer per image).

    A convolution costs 2 * output pixels * k * k * C_in * C_out multiply-adds;
    a transposed one 2 * input pixels * k * k * C_in * C_out; a dense layer
    2 * inputs * outputs, and so does the weights product of a layer model.py
    computes as matrix products (its rows are pixels x images). Batch norm,
    activations, Adam and those layers' window gathering are left out (a few
    percent at most).
    """
    total, first = 0, None
    for op in graph.get_operations():
        if not op.name.startswith(scope + "/") or "gradients" in op.name:
            continue
        if op.type == "Conv2D":
            _, h, w, c_out = op.outputs[0].shape.as_list()
            kh, kw, c_in, _ = op.inputs[1].shape.as_list()
            flops = 2 * h * w * kh * kw * c_in * c_out
        elif op.type == "Conv2DBackpropInput":  # the forward op of a transposed conv
            _, h, w, c_in = op.inputs[2].shape.as_list()
            kh, kw, c_out, _ = op.inputs[1].shape.as_list()
            flops = 2 * h * w * kh * kw * c_in * c_out
        elif op.type == "MatMul":  # a dense layer, or the weights product of a 4x4 layer
            rows, cols = op.outputs[0].shape.as_list()
            inner = op.inputs[0].shape.as_list()[0 if op.get_attr("transpose_a") else 1]
            flops = 2 * rows // _images(op.inputs[0]) * cols * inner
        else:  # the 4x4 layers' window gathering (BatchMatMulV2) moves data: not counted
            continue
        first = flops if first is None else first
        total += flops
    return total, first


def _images(tensor):
    """The batch size behind a matrix product's input: its leading size before reshapes."""
    while tensor.op.type == "Reshape":
        tensor = tensor.op.inputs[0]
    return tensor.shape.as_list()[0]


@contextlib.contextmanager
def untuned_layers():
    """model.py's tuned layers swapped for their usual first drafts, for `--untuned`.

    Same variables, same arithmetic: the transposed conv takes its output shape
    from tf.shape at run time, batch norm is tf.nn.moments plus
    tf.nn.batch_normalization, and the 4x4 layers are tf.nn convolutions, not
    matrix products. The README's before/after row compares them.
    """
    import tensorflow as tf
    import model
    tf1 = tf.compat.v1
    tuned = model.conv2d, model.deconv2d, model.batch_norm

    def conv2d(x, filters, kernel, stride, name):
        with tf1.variable_scope(name):
            w = model._weight("w", [kernel, kernel, int(x.shape[-1]), filters])
            y = tf.nn.conv2d(x, w, [1, stride, stride, 1], "SAME")
            return tf.nn.bias_add(y, model._bias("b", filters))

    def deconv2d(x, filters, kernel, stride, name):
        with tf1.variable_scope(name):
            w = model._weight("w", [kernel, kernel, filters, int(x.shape[-1])])
            shape = tf.raw_ops.Shape(input=x)  # tf.shape would fold a known shape to a constant
            out_shape = tf.stack([shape[0], shape[1] * stride, shape[2] * stride, filters])
            y = tf.nn.conv2d_transpose(x, w, out_shape, [1, stride, stride, 1], "SAME")
            return tf.nn.bias_add(y, model._bias("b", filters))

    def batch_norm(x, is_training, momentum, name):
        with tf1.variable_scope(name):
            channels = int(x.shape[-1])
            gamma = tf1.get_variable("gamma", [channels], initializer=tf1.ones_initializer())
            beta = tf1.get_variable("beta", [channels], initializer=tf1.zeros_initializer())
            moving_mean = tf1.get_variable("moving_mean", [channels], trainable=False,
                                           initializer=tf1.zeros_initializer())
            moving_var = tf1.get_variable("moving_var", [channels], trainable=False,
                                          initializer=tf1.ones_initializer())
            batch_mean, batch_var = tf.nn.moments(x, [0, 1, 2])
            mean, var = tf.cond(is_training, lambda: (batch_mean, batch_var),
                                lambda: (moving_mean.read_value(), moving_var.read_value()))
            for average, value in ((moving_mean, batch_mean), (moving_var, batch_var)):
                tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, average.assign(
                    average * momentum + value * (1.0 - momentum)))
            return tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-5)

    model.conv2d, model.deconv2d, model.batch_norm = conv2d, deconv2d, batch_norm
    try:
        yield
    finally:
        model.conv2d, model.deconv2d, model.batch_norm = tuned


def step_flops(g_fwd, g_first, d_fwd, d_first, batch):
    """FLOPs of one step by path, from per-image forward FLOPs of G and D.

    Backward through a layer costs its forward twice (gradient of the weights
    and of the input); the first layer of a net needs no input gradient
    unless something upstream learns. D sees 2B images (reals and fakes).
      measure   G fwd (B) + D fwd (2B)
      D update  D fwd + D weight grads + D input grads below the first layer (2B);
                the fakes of the measurement are fed, so no G pass
      G update  G fwd (B) + D fwd and input grads (2B) + G weight and input grads (B)
      losses    G fwd (B) + D fwd (2B)
    Path B: measure + one D update + two G updates + losses; path A: two D updates.
    """
    B = batch
    measure = B * g_fwd + 2 * B * d_fwd
    d_update = 2 * B * (3 * d_fwd - d_first)
    g_update = B * (3 * g_fwd - g_first) + 2 * B * 2 * d_fwd
    losses = measure
    path_b = measure + d_update + 2 * g_update + losses
    return {"B": path_b, "A": path_b + d_update}


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


def time_steps(cfg, graph, g, sess, path, steps, first_step, yardstick):
    """Seconds of `steps` steps forced to `path`, with a yardstick probe before each.

    Returns (seconds, share outside session.run, probe GFLOP/s), one of each
    per timed step.
    """
    import numpy as np
    import data
    import gan
    from history_cache import HistoryCache
    m, t = cfg.model, cfg.train
    rng = np.random.default_rng(0)
    side = config_lib.load_size(cfg)  # run_step crops these to image_size
    tiles = rng.integers(0, 256, (max(4 * t.batch_size, 256), side, side, m.channels),
                         dtype=np.uint8)
    batches = data.Batches(tiles, [""] * len(tiles), t.batch_size, side, t.seed)
    cache = HistoryCache(t.history_size, (m.image_size, m.image_size, m.channels), seed=t.seed)
    for i in range(t.history_size):  # a full cache, so history steps happen at their rate
        cache.add(tiles[i % len(tiles), :m.image_size, :m.image_size])
    timed = TimedSession(sess)
    totals, outside, probes = [], [], []
    with tempfile.TemporaryFile("w") as log:
        for i in range(steps + 2):
            probe = yardstick.probe()
            timed.seconds = 0.0
            start = time.perf_counter()
            record = gan.run_step(timed, g, cfg, batches, cache, first_step + i, force_path=path)
            log.write(json.dumps({"step": first_step + i, **record}) + "\n")
            log.flush()
            elapsed = time.perf_counter() - start
            if i >= 2:  # warm-up: graph optimisation and allocations happen in the first runs
                totals.append(elapsed)
                outside.append((elapsed - timed.seconds) / elapsed)
                probes.append(probe)
    return totals, outside, probes


def path_figures(key, flops, totals, probes):
    """The JSON figures of one path from its per-step seconds and probes."""
    import numpy as np
    seconds = float(np.median(totals))
    shares = [flops / s / 1e9 / p for s, p in zip(totals, probes)]
    return {f"s_per_step_{key}": seconds, f"tflop_per_step_{key}": flops / 1e12,
            f"gflops_{key}": flops / seconds / 1e9, f"peak_frac_{key}": float(np.median(shares)),
            f"matmul_gflops_{key}": float(np.median(probes))}


def main(argv=None):
    args = parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    threads = cfg.run.threads or config_lib.default_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # NumPy's BLAS reads these when it loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np
    import tensorflow as tf
    import gan
    import model
    tf1 = tf.compat.v1

    yardstick = Yardstick()
    graph = tf.Graph()
    with graph.as_default():  # FLOPs from the tuned graph's static shapes either way
        tf1.set_random_seed(cfg.train.seed)
        g = gan.build_graph(cfg)
    g_fwd, g_first = net_flops(graph, model.GEN_SCOPE)
    d_fwd, d_first = net_flops(graph, model.DISC_SCOPE)
    flops = step_flops(g_fwd, g_first, d_fwd, d_first, cfg.train.batch_size)
    if args.untuned:
        graph = tf.Graph()
        with graph.as_default(), untuned_layers():
            tf1.set_random_seed(cfg.train.seed)
            g = gan.build_graph(cfg)

    sess = tf1.Session(graph=graph, config=gan.session_config(cfg))
    sess.run(g["init_op"])
    graph.finalize()
    result = {"config": args.config, "overrides": args.set, "threads": threads,
              "untuned": args.untuned,
              "g_fwd_gflop_per_img": g_fwd / 1e9, "d_fwd_gflop_per_img": d_fwd / 1e9}
    with graph.as_default():
        for path in ("B", "A"):
            totals, outside, probes = time_steps(cfg, graph, g, sess, path, args.steps,
                                                 first_step=1 if path == "B" else 1000,
                                                 yardstick=yardstick)
            key = path.lower()
            result.update(path_figures(key, flops[path], totals, probes))
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


def matmul_text(r):
    low, high = r["matmul_range"]
    return (f"{r['matmul_gflops']:.0f} GFLOP/s (median of the probes before the steps; "
            f"{low:.0f}-{high:.0f})")


def achieved_text(r, path):
    return (f"{r[f'gflops_{path}']:.0f} GFLOP/s = "
            f"{100 * r[f'peak_frac_{path}']:.0f}% of matmul (median per step)")


def print_table(r):
    rows = [
        ("threads", f"{r['threads']}"),
        ("NumPy float32 matmul", matmul_text(r)),
        ("forward per image, G / D", f"{r['g_fwd_gflop_per_img']:.3f} / {r['d_fwd_gflop_per_img']:.3f} GFLOP"),
    ]
    for path in ("b", "a"):
        rows += [
            (f"path {path.upper()}: FLOPs per step", f"{r[f'tflop_per_step_{path}']:.3f} TFLOP"),
            (f"path {path.upper()}: seconds per step", f"{r[f's_per_step_{path}']:.3f} s (median)"),
            (f"path {path.upper()}: achieved", achieved_text(r, path)),
            (f"path {path.upper()}: outside session.run", f"{100 * r[f'outside_run_frac_{path}']:.1f}% of the step"),
        ]
    rows += [
        ("images per second (path B)", f"{r['imgs_per_s']:.1f}"),
        ("sample grid dump", f"{r['sample_dump_s']:.3f} s"),
        ("checkpoint save", f"{r['checkpoint_s']:.3f} s"),
        ("peak resident memory", f"{r['peak_rss_mb']:.0f} MB"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"bench: {r['config']} {' '.join(r['overrides'])}".rstrip()
          + (" (untuned graph)" if r.get("untuned") else ""))
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(run_main(main))
