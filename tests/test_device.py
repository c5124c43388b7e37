"""device.py: which device runs the graph, its tuning, its memory, and what train.py says of it."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import config
import device
import gan
import model
import runs
import train
from conftest import ROOT, assert_clear_error, built

tf1 = tf.compat.v1
SMOKE = os.path.join(ROOT, "configs", "smoke.json")
OFF, ON, DEFAULT = 2, 1, 0  # RewriterConfig toggles


def smoke(*overrides):
    return config.load(SMOKE, overrides)


# ---------------------------------------------------------------- the plan: a pure function

@pytest.mark.parametrize("overrides", [[], ["run.mixed_precision=bf16"], ["run.mixed_precision=fp16"],
                                       ["run.xla=true"], ["run.threads=1", "run.inter_op_threads=2"]])
def test_the_cpu_plan_is_the_session_config_the_cpu_was_tuned_with(overrides):
    """The ConfigProto a CPU training session had before run.device existed, field for field."""
    cfg = smoke(*overrides)
    expected = tf1.ConfigProto(intra_op_parallelism_threads=cfg.run.threads or config.default_threads(),
                               inter_op_parallelism_threads=cfg.run.inter_op_threads)
    expected.gpu_options.allow_growth = True
    expected.device_count["GPU"] = 0  # new: run.device=cpu keeps a GPU machine's GPUs out
    rewrite = expected.graph_options.rewrite_options
    rewrite.remapping = OFF
    if cfg.run.mixed_precision == "bf16":
        rewrite.auto_mixed_precision_onednn_bfloat16 = ON
    if cfg.run.mixed_precision == "fp16":
        rewrite.auto_mixed_precision = ON
    if cfg.run.xla:
        expected.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    plan = device.plan("cpu", cfg)
    assert device.session_config(plan) == expected
    assert plan.small_maps_as_matmul


@pytest.mark.parametrize("overrides", [[], ["run.mixed_precision=fp16"], ["run.xla=true"]])
def test_the_gpu_plan_is_tensorflows_defaults(overrides):
    cfg = smoke(*overrides)
    plan = device.plan("gpu", cfg)
    proto = device.session_config(plan)
    assert not plan.small_maps_as_matmul and "GPU" not in proto.device_count
    assert proto.graph_options.rewrite_options.remapping == DEFAULT
    assert proto.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 == DEFAULT
    assert (proto.graph_options.rewrite_options.auto_mixed_precision == ON) == \
        (cfg.run.mixed_precision == "fp16")
    assert (proto.graph_options.optimizer_options.global_jit_level == 1) == cfg.run.xla


def test_bf16_on_a_gpu_is_an_error_naming_the_key():
    with pytest.raises(device.DeviceError, match="run.mixed_precision"):
        device.plan("gpu", smoke("run.mixed_precision=bf16"))


def test_sessions_that_only_infer_keep_tensorflows_defaults_and_their_threads():
    proto = device.session_config(device.plan("cpu", threads=3))
    assert proto.intra_op_parallelism_threads == 3 and proto.inter_op_parallelism_threads == 1
    assert proto.graph_options.rewrite_options.remapping == DEFAULT
    assert device.session_config(device.plan("cpu")).intra_op_parallelism_threads == 0


@pytest.mark.parametrize("kind", device.KINDS)
def test_the_4x4_layers_are_matrix_products_on_a_cpu_only(kind):
    cfg = smoke("model.image_size=8", "model.gen_filters=512", "model.disc_filters=512")
    graph = tf.Graph()
    with graph.as_default():
        gan.build_graph(cfg, device.plan(kind, cfg))
    products = {op.type for op in graph.get_operations()} & {"BatchMatMulV2"}
    assert bool(products) == (kind == "cpu")


# ---------------------------------------------------------------- choosing and naming the device

@pytest.mark.parametrize("requested, visible, kind", [
    ("auto", 0, "cpu"), ("auto", 1, "gpu"), ("cpu", 0, "cpu"), ("cpu", 2, "cpu"), ("gpu", 1, "gpu")])
def test_run_device_chooses(requested, visible, kind):
    assert device.choose(requested, visible) == kind


def test_gpu_without_a_gpu_says_how_to_install_gpu_support():
    with pytest.raises(device.DeviceError) as e:
        device.choose("gpu", 0)
    assert device.GPU_INSTALL in str(e.value) and "run.device=cpu" in str(e.value)


def test_the_device_line_names_the_cpu_and_why():
    line = device.describe("cpu")
    assert line.startswith("device: CPU, ") and "core" in line
    assert "no GPU visible to TensorFlow" in line or "run.device=cpu" in line


def test_tensorflows_benign_start_up_notices_are_held_back_and_real_errors_shown():
    notices = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
               "I0000 00:00:1.2 8258 cudart_stub.cc:31] Could not find cuda drivers on your "
               "machine, GPU will not be used.\n"
               "I0000 00:00:1.25 8258 port.cc:153] oneDNN custom operations are on. You may see "
               "slightly different numerical results due to floating-point round-off errors from "
               "different computation orders. To turn them off, set the environment variable "
               "`TF_ENABLE_ONEDNN_OPTS=0`.\n")
    cuinit = ("E0000 00:00:1.3 8258 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
              "error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    real = "E0000 00:00:1.4 8258 something.cc:1] a real failure\n"
    shown, no_driver = device.shown_lines(notices + real)
    assert shown == [real] and no_driver
    assert device.shown_lines(cuinit, no_driver=True) == ([], True)  # discovery, after the import
    assert device.shown_lines(cuinit)[0] == [cuinit]  # a driver is installed: a real fault


# ---------------------------------------------------------------- memory

def test_the_memory_estimate_counts_four_adams_and_batch_norm_averages():
    cfg = smoke()
    graph, _, sess = built(cfg)
    sess.close()
    with graph.as_default():
        weights = {s: sum(v.shape.num_elements() for v in tf1.trainable_variables(s + "/"))
                   for s in (model.GEN_SCOPE, model.DISC_SCOPE)}
    variables, step = device.memory_needed(graph, (model.GEN_SCOPE, model.DISC_SCOPE))
    # each weight, plus two Adam slots per optimiser: three for D, one for G
    least = 4 * (weights[model.DISC_SCOPE] * (1 + 2 * 3) + weights[model.GEN_SCOPE] * (1 + 2))
    assert least < variables < 1.1 * least
    assert step > 4 * cfg.train.batch_size * cfg.model.image_size ** 2 * 3  # at least the fakes


def test_a_config_the_device_cannot_hold_names_the_keys_to_lower():
    with pytest.raises(device.DeviceError) as e:
        device.check_memory((3 * 2 ** 30, 2 ** 30), "cpu", have=2 ** 31)
    assert "train.batch_size" in str(e.value) and "model.gen_filters" in str(e.value)
    device.check_memory((2 ** 20, 2 ** 20), "cpu", have=2 ** 31)  # fits: no error


def argv(tiles, out, *sets):
    args = ["--config", SMOKE, "--set", f"data.path={tiles}", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("sets, named", [
    (["run.device=gpu"], ["tensorflow[and-cuda]"]),
    (["model.gen_filters=1000000"], ["train.batch_size", "model.gen_filters"]),
])
def test_train_refuses_before_anything_is_written(sets, named, tiles_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.cli(argv(tiles_dir, out, *sets))
    assert_clear_error(code, capsys.readouterr().err, *named, nothing_written=out)


# ---------------------------------------------------------------- during training

def oom(*_):
    raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\n  at ...")


@pytest.mark.parametrize("where", ["step", "sample grid"])
def test_out_of_memory_is_one_error_line_and_keeps_the_last_checkpoint(
        where, tiles_dir, tmp_path, capsys, monkeypatch):
    run_step, dump = gan.run_step, runs.Run.dump_samples
    if where == "step":
        monkeypatch.setattr(gan, "run_step", lambda *a, **k: oom() if a[5] == 3 else run_step(*a, **k))
    else:
        monkeypatch.setattr(runs.Run, "dump_samples",
                            lambda self, step: oom() if step == 3 else dump(self, step))
    out = tmp_path / "run"
    code = train.cli(argv(tiles_dir, out, "train.steps=5", "train.checkpoint_every=2",
                          "train.sample_every=1"))
    assert_clear_error(code, capsys.readouterr().err, "step 3", "out of memory", "model-2",
                     "train.batch_size")
    assert runs.resolve_checkpoint(str(out))[0].endswith("model-2")
    assert not os.path.exists(out / "lock")


def test_an_op_without_a_deterministic_kernel_is_one_error_line_naming_the_key(
        tiles_dir, tmp_path, capsys, monkeypatch):
    def unimplemented(*_, **__):
        raise tf.errors.UnimplementedError(None, None, "A deterministic GPU implementation of "
                                           "ResizeNearestNeighborGrad is not available")
    monkeypatch.setattr(gan, "run_step", unimplemented)
    code = train.cli(argv(tiles_dir, tmp_path / "run", "train.steps=2", "run.deterministic=true"))
    assert_clear_error(code, capsys.readouterr().err, "step 1", "run.deterministic")


def test_a_long_cpu_run_under_auto_says_how_many_hours(tiles_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "LONG_RUN_HOURS", 0)  # every run is long
    assert train.cli(argv(tiles_dir, tmp_path / "a", f"train.steps={train.PACE_STEPS + 2}")) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "hours" in err and "run.device=cpu" in err
    assert train.cli(argv(tiles_dir, tmp_path / "b", f"train.steps={train.PACE_STEPS + 2}",
                          "run.device=cpu")) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("steps, warned", [(10_011, True), (5_011, False)])
def test_the_hours_come_from_the_runs_own_pace(steps, warned, capsys, monkeypatch):
    """3.6 s a step after the first: 10,000 steps to go are 10 hours (over the line),
    5,000 are 5 (under it); the first step, which builds kernels, is not counted."""
    clock = iter([1000.0, 1000.0 + 3.6 * train.PACE_STEPS])  # after step 1, after step 11
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    cfg = SimpleNamespace(train=SimpleNamespace(steps=steps), run=SimpleNamespace(device="auto"))
    pace = train.Pace(cfg, SimpleNamespace(kind="cpu"))
    for step in range(1, train.PACE_STEPS + 3):
        pace.after(step)
    err = capsys.readouterr().err
    assert ("about 10 more hours" in err) if warned else err == ""


# ---------------------------------------------------------------- determinism

def test_deterministic_ops_change_nothing_on_a_cpu():
    """run.deterministic: the same losses and weights, to the bit, as without it."""
    cfg = smoke()
    found = []
    for on in (False, True):
        device.set_determinism(on)
        try:
            graph, g, sess = built(cfg)
            rng = np.random.default_rng(0)
            for _ in range(2):
                reals = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
                z = rng.uniform(-1, 1, (8, 16)).astype(np.float32)
                record, _ = gan.train_step(sess, g, reals, z, None, False)
            with graph.as_default():
                weights = sess.run(tf1.trainable_variables())
            found.append((record, weights))
            sess.close()
        finally:
            device.set_determinism(False)
    (a, wa), (b, wb) = found
    assert a == b and all(np.array_equal(x, y) for x, y in zip(wa, wb))
