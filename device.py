"""Which device runs the graph, and what the graph and its session need there.

`choose` picks "cpu" or "gpu" from run.device and what TensorFlow sees;
`plan` is a pure function of (device kind, config) that says which of the
project's CPU tuning applies; `session_config` is the one place a Session's
ConfigProto is built; `describe` is the start-up line that names the device;
`memory_needed` / `check_memory` refuse a config the device cannot hold.

Importing this module imports TensorFlow with its benign start-up notices held
back (`held_stderr`): on a machine without a CUDA driver TensorFlow prints an
`E0000 ... failed call to cuInit` line that reads as a failure; the device
line says the same thing plainly. oneDNN's notice that float sums may round
differently is held back too. Anything else TensorFlow prints is shown.
"""
import contextlib
import ctypes
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import config as config_lib
from cli import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's info and warning lines

GPU_INSTALL = "pip install 'tensorflow[and-cuda]==2.21.*'"
KINDS = ("cpu", "gpu")

# What TensorFlow prints at import and device discovery on a machine without a
# CUDA driver. The cuInit error is benign only beside the "no cuda drivers"
# notice: with a driver installed, it is a real fault and is shown.
NO_DRIVER = re.compile(r"cudart_stub\.cc.*Could not find cuda drivers")
BENIGN = (NO_DRIVER, re.compile(r"All log messages before absl::InitializeLog\(\) is called"),
          # oneDNN's notice that sums may round differently: true of every CPU run, said
          # once in docs/performance.md, not twice on every start (--help included)
          re.compile(r"port\.cc.*oneDNN custom operations are on"))
CUINIT = re.compile(r"failed call to cuInit")


class DeviceError(UserError):
    """The device asked for is not there, or the config does not fit it."""


def shown_lines(text, no_driver=False):
    """(the lines of `text`, TensorFlow's stderr, that are not benign notices, whether a
    "no CUDA driver" notice was seen in it or before it, `no_driver`)."""
    lines = text.splitlines(keepends=True)
    no_driver = no_driver or any(NO_DRIVER.search(line) for line in lines)
    return [line for line in lines if not any(p.search(line) for p in BENIGN)
            and not (no_driver and CUINIT.search(line))], no_driver


def _driver_missing():
    """Whether the machine has no CUDA driver library for TensorFlow to load."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return False
    except OSError:
        return True


_no_driver = _driver_missing()  # then TensorFlow's cuInit error only says "no GPU here"


@contextlib.contextmanager
def held_stderr():
    """Hold file descriptor 2 (where TensorFlow's C++ logs go) until the block ends, then
    write out every line that is not a known benign notice."""
    global _no_driver
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines, _no_driver = shown_lines(held.read().decode("utf-8", "replace"), _no_driver)
            sys.stderr.write("".join(lines))
            sys.stderr.flush()


with held_stderr():
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

tf1 = tf.compat.v1


# ---------------------------------------------------------------- which device

_gpus = None


def gpus():
    """The GPUs TensorFlow sees (discovered once, its notices held)."""
    global _gpus
    if _gpus is None:
        with held_stderr():
            _gpus = tf.config.list_physical_devices("GPU")
    return _gpus


def choose(requested, visible=None):
    """"cpu" or "gpu" for run.device `requested` ("auto", "cpu", "gpu").

    `visible` is the number of GPUs TensorFlow sees (found out when None)."""
    visible = len(gpus()) if visible is None else visible
    if requested == "cpu":
        return "cpu"
    if requested == "gpu" and not visible:
        raise DeviceError(f"run.device is gpu but TensorFlow sees no GPU"
                          f"{'' if is_cuda_build() else ' (this TensorFlow has no CUDA support)'}; "
                          f"install GPU support with: {GPU_INSTALL} (and an NVIDIA driver), check "
                          f"with: python -c \"import tensorflow as tf; "
                          f"print(tf.config.list_physical_devices('GPU'))\"; "
                          f"or train on the CPU with --set run.device=cpu")
    return "gpu" if visible else "cpu"


def is_cuda_build():
    return bool(tf.sysconfig.get_build_info().get("is_cuda_build"))


def describe(kind):
    """The start-up line that says what runs the graph."""
    if kind == "gpu":
        details = tf.config.experimental.get_device_details(gpus()[0])
        cuda = tf.sysconfig.get_build_info().get("cuda_version", "?")
        more = f"; {len(gpus())} GPUs visible, the graph runs on GPU 0" if len(gpus()) > 1 else ""
        return f"device: GPU 0 {details.get('device_name', 'unknown GPU')} (CUDA {cuda}{more})"
    cores = os.cpu_count() or 1
    why = (f"run.device=cpu; {len(gpus())} GPU{'s' if len(gpus()) > 1 else ''} left unused"
           if gpus() else "no GPU visible to TensorFlow")
    return f"device: CPU, {cores} core{'s' if cores > 1 else ''} ({why})"


# ---------------------------------------------------------------- what the device needs

@dataclasses.dataclass(frozen=True)
class Plan:
    """How a graph is built and run on one kind of device (see `plan`)."""
    kind: str                     # "cpu" or "gpu"
    threads: int                  # intra-op threads
    inter_op_threads: int         # independent ops run at once
    remapper: bool = True         # Grappler's conv + bias + activation fusion
    small_maps_as_matmul: bool = False  # model.py's wide 4x4 layers as matrix products
    onednn_bf16: bool = False     # run.mixed_precision=bf16: oneDNN's bfloat16 rewrite
    fp16: bool = False            # run.mixed_precision=fp16: the float16 rewrite (casts on GPUs)
    xla: bool = False             # XLA JIT

    def model_kwargs(self):
        """What model.generator / model.discriminator take from the plan."""
        return {"small_maps_as_matmul": self.small_maps_as_matmul}


def plan(kind, cfg=None, threads=0, tuned=True):
    """The device tuning of a graph run on `kind`: a pure function of its arguments.

    `cfg` is a training config (its run section sets threads, precision, XLA);
    None for a session that only generates or measures (`threads`, no rewrite).
    On a CPU the project's measured tuning applies (docs/performance.md): the
    remapper off, the wide 4x4 layers as matrix products (faster on oneDNN only),
    bf16 as oneDNN's rewrite. On a GPU, TensorFlow's defaults. `tuned=False`
    gives TensorFlow's defaults on either (bench.py --untuned).
    """
    if kind not in KINDS:
        raise ValueError(f"device kind must be one of {KINDS}, got {kind!r}")
    run = cfg.run if cfg is not None else None
    if run:
        threads = run.threads or config_lib.default_threads()  # Lesson 28
    precision = run.mixed_precision if run else "none"
    if precision == "bf16" and kind == "gpu":
        raise DeviceError("run.mixed_precision=bf16 is oneDNN's rewrite for CPUs; on a GPU use "
                          "--set run.mixed_precision=fp16 (or none)")
    cpu = kind == "cpu" and tuned
    return Plan(kind=kind, threads=threads, inter_op_threads=run.inter_op_threads if run else 1,
                # In a training graph the remapper fuses D's first conv, bias and leaky ReLU
                # though the gradient still reads the bias output; it then logs "remapper
                # failed" and leaves the graph as it was. Off, the graph runs the same.
                remapper=not (cpu and run),
                small_maps_as_matmul=cpu,
                onednn_bf16=precision == "bf16", fp16=precision == "fp16",
                xla=bool(run and run.xla))


def inference_plan(threads):
    """The plan of a session that only generates or measures, on the device TensorFlow sees."""
    return plan(choose("auto"), threads=threads)


# Batch norm stays float32 under the bf16 rewrite: normalising in bf16 trained
# to a worse SWD than float32 (docs/performance.md).
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


def session_config(p):
    """The ConfigProto of every session the project opens, from a Plan.

    Mixed precision is a graph rewrite: variables, batch norm and losses stay
    float32, convolutions and matrix products run in bf16/fp16.
    """
    gpus()  # the session would look for GPUs itself, with TensorFlow's notices showing
    proto = tf1.ConfigProto(intra_op_parallelism_threads=p.threads,
                            inter_op_parallelism_threads=p.inter_op_threads)
    proto.gpu_options.allow_growth = True  # share a GPU instead of taking all its memory
    if p.kind == "cpu":
        proto.device_count["GPU"] = 0  # run.device=cpu on a GPU machine: not even placed there
    rewrite = proto.graph_options.rewrite_options
    if not p.remapper:
        rewrite.remapping = rewriter_config_pb2.RewriterConfig.OFF
    if p.onednn_bf16:
        keep_float32(BF16_FLOAT32_OPS)
        rewrite.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    if p.fp16:
        # The rewrite casts to float16 on GPUs only; on a CPU the loss-scaled graph
        # runs in float32 (TF's CPU float16 emulation crashes on this graph).
        rewrite.auto_mixed_precision = rewriter_config_pb2.RewriterConfig.ON
    if p.xla:
        proto.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    return proto


def set_determinism(on):
    """run.deterministic: TensorFlow's deterministic kernels (and an error from an op
    that has none), for exact resume on a GPU; a CPU's kernels already are."""
    from tensorflow.python.framework import config as tf_config
    tf_config.enable_op_determinism() if on else tf_config.disable_op_determinism()


# ---------------------------------------------------------------- memory

# Ops whose output is a view or a constant of the graph, not a buffer of the step.
NO_BUFFER = {"Reshape", "Identity", "Squeeze", "Const", "VarHandleOp", "VariableV2",
             "ReadVariableOp", "Placeholder", "PlaceholderWithDefault", "Shape", "NoOp"}
LOWER = "train.batch_size, model.gen_filters, model.disc_filters or model.image_size"


def memory_needed(graph, scopes):
    """(bytes of variables, bytes of one step's activations) of a built training graph.

    Variables: every global variable (weights, the four Adam optimisers' two
    slots each, batch-norm averages, the averaged copy of G). One step holds each
    forward output of the nets in `scopes` until its gradient is taken (gradients
    reuse freed buffers), and the weights' gradients. An estimate from static
    shapes, a little above what a CPU run holds (docs/performance.md).
    """
    with graph.as_default():
        variables = sum(v.shape.num_elements() * v.dtype.base_dtype.size
                        for v in tf1.global_variables())
        gradients = sum(v.shape.num_elements() * v.dtype.base_dtype.size
                        for v in tf1.trainable_variables())
    forward = 0
    for op in graph.get_operations():
        if (op.type in NO_BUFFER or "gradients" in op.name
                or not op.name.startswith(tuple(s + "/" for s in scopes))):
            continue
        for out in op.outputs:
            if out.dtype.is_floating and out.shape.is_fully_defined():
                forward += out.shape.num_elements() * out.dtype.size
    return variables, gradients + forward


def device_memory(kind):
    """(bytes the device has, what they are) or (None, why unknown)."""
    if kind == "gpu":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=20)
            return int(out.stdout.split()[0]) * 2 ** 20, "GPU 0's memory"
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None, "nvidia-smi did not tell GPU 0's memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError):
        return None, "the machine's RAM is unknown"


def check_memory(needed, kind, have=None):
    """A DeviceError when `needed` (memory_needed's pair) cannot fit the device."""
    have, what = device_memory(kind) if have is None else (have, "the device's memory")
    total = sum(needed)
    if have is None or total <= have:
        return
    gib = lambda n: f"{n / 2 ** 30:,.1f} GiB"
    raise DeviceError(f"this config needs about {gib(total)} ({gib(needed[0])} of weights, Adam "
                      f"and batch-norm state, {gib(needed[1])} for one step), more than "
                      f"{what} ({gib(have)}); lower {LOWER}")
