"""How fast a training step runs, against the machine's own yardstick: the harness that
bench.py and tools/bench_torch.py share, and the FLOP count train.py's CPU estimate uses.

A DCGAN step is almost all convolution arithmetic, so the figure of merit is
achieved GFLOP/s over NumPy's float32 matrix-multiply GFLOP/s with the same
thread count. FLOPs are counted from the layer shapes, not measured.
"""
import os
import subprocess
import sys
import time

import numpy as np

import config as config_lib
import data


# ---------------------------------------------------------------- the yardstick

class Yardstick:
    """NumPy's float32 matrix-product GFLOP/s, probed between timed steps.

    A step's share of peak is its GFLOP/s over the probe taken just before it,
    so the two are measured in the same minutes. Each probe is the best of a
    few products. On a machine shared with other work the probes of one run
    move a lot (docs/performance.md): the share is a rough figure, achieved
    GFLOP/s the steadier one.
    """

    def __init__(self, size=2048):
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
        return {"matmul_gflops": float(np.median(self.readings)),
                "matmul_range": [min(self.readings), max(self.readings)], **blas_kernel()}


KERNEL_SETTING = "OPENBLAS_CORETYPE"  # forces OpenBLAS's kernel, whatever the CPU offers


def blas_kernel():
    """{"blas": library and the kernel NumPy's matrix product runs, "blas_best": the kernel
    the library picks for this CPU when the environment forces none, or None if the same}."""
    from threadpoolctl import threadpool_info
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return {"blas": "unknown", "blas_best": None}
    pool = pools[0]
    kernel = pool.get("architecture") or "?"
    best = None
    if os.environ.get(KERNEL_SETTING) and pool.get("internal_api") == "openblas":
        env = {k: v for k, v in os.environ.items() if k != KERNEL_SETTING}
        probe = ("from threadpoolctl import threadpool_info; import numpy; "
                 "print([p.get('architecture') for p in threadpool_info() "
                 "if p.get('user_api') == 'blas'][0])")
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                               text=True, timeout=60).stdout.strip()
        best = found if found and found != kernel else None
    return {"blas": f"{pool.get('internal_api')} {pool.get('version')}, {kernel} kernel",
            "blas_best": best}


def blas_text(r):
    """The yardstick's kernel, and what held it below the CPU's best."""
    if r.get("blas_best"):
        return (f"{r['blas']} (held there by {KERNEL_SETTING}={os.environ.get(KERNEL_SETTING)}; "
                f"this CPU's best is {r['blas_best']}: % of matmul reads high)")
    return r["blas"]


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


def graph_step_flops(graph, batch, gen_scope="generator", disc_scope="discriminator"):
    """(step_flops by path, G forward per image, D forward per image) of a built graph."""
    g_fwd, g_first = net_flops(graph, gen_scope)
    d_fwd, d_first = net_flops(graph, disc_scope)
    return step_flops(g_fwd, g_first, d_fwd, d_first, batch), g_fwd, d_fwd


# ---------------------------------------------------------------- timing

def random_batches(cfg):
    """data.Batches of random uint8 tiles: the data does not change a step's arithmetic."""
    m, t = cfg.model, cfg.train
    side = config_lib.load_size(cfg)  # steps crop these to image_size
    tiles = np.random.default_rng(0).integers(
        0, 256, (max(4 * t.batch_size, 256), side, side, m.channels), dtype=np.uint8)
    return data.Batches(tiles, [""] * len(tiles), t.batch_size, side, t.seed)


def time_steps(step, steps, first_step, yardstick, warmup=2):
    """Seconds of `steps` calls of step(n), n from first_step + warmup on, after `warmup`
    untimed ones (graph optimisation, kernel choice and allocations happen in the first
    runs), with a yardstick probe before each call.

    step(n) returns the seconds of it spent inside the framework, or None. Returns
    (seconds, share outside the framework or None, probe GFLOP/s), one of each per timed step.
    """
    totals, outside, probes = [], [], []
    for i in range(steps + warmup):
        probe = yardstick.probe()
        start = time.perf_counter()
        inside = step(first_step + i)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            totals.append(elapsed)
            outside.append(None if inside is None else (elapsed - inside) / elapsed)
            probes.append(probe)
    return totals, outside, probes


def path_figures(key, flops, totals, probes):
    """The JSON figures of one path from its per-step seconds and probes."""
    seconds = float(np.median(totals))
    shares = [flops / s / 1e9 / p for s, p in zip(totals, probes)]
    return {f"s_per_step_{key}": seconds, f"tflop_per_step_{key}": flops / 1e12,
            f"gflops_{key}": flops / seconds / 1e9, f"peak_frac_{key}": float(np.median(shares)),
            f"matmul_gflops_{key}": float(np.median(probes))}


def matmul_text(r):
    low, high = r["matmul_range"]
    return (f"{r['matmul_gflops']:.0f} GFLOP/s (median of the probes before the steps; "
            f"{low:.0f}-{high:.0f})")


def achieved_text(r, path):
    return (f"{r[f'gflops_{path}']:.0f} GFLOP/s = "
            f"{100 * r[f'peak_frac_{path}']:.0f}% of matmul (median per step)")


def print_table(title, rows):
    width = max(len(name) for name, _ in rows)
    print(title.rstrip())
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def set_blas_threads(cfg):
    """The thread count of a benchmark, also given to NumPy's BLAS before it loads."""
    from threadpoolctl import threadpool_limits
    threads = cfg.run.threads or config_lib.default_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # libraries that load after this
    threadpool_limits(threads, user_api="blas")  # NumPy's, loaded already
    return threads
