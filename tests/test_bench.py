"""bench.py and timing.py's arithmetic, and the speed-related run flags (no timing asserted here)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import bench
import config
import device
import gan
import model
import timing
from conftest import ROOT, run_script

tf1 = tf.compat.v1


@pytest.mark.parametrize("filters", [16, 512])  # 512: the 4x4 layers are matrix products
def test_forward_flops_are_counted_from_layer_shapes(filters):
    f, half = filters, filters // 2
    graph = tf.Graph()
    with graph.as_default():
        z = tf1.placeholder(tf.float32, [2, 10])
        fakes = model.generator(z, tf.constant(True), image_size=8, gen_filters=f, kernel=3,
                                extra_layers=1)
        model.discriminator(fakes, tf.constant(True), image_size=8, disc_filters=f, kernel=3,
                            extra_layers=1)
    products = any(op.type == "BatchMatMulV2" for op in graph.get_operations())
    assert products == (filters == 512)
    g_total, g_first = timing.net_flops(graph, "generator")
    # dense 10 -> 4*4*f; up1 4x4xf -> 8x8xf/2 (transposed: input pixels); same1 8x8xf/2 -> 8x8x3
    dense, up1, same1 = 2 * 10 * 16 * f, 2 * 16 * 9 * f * half, 2 * 64 * 9 * half * 3
    assert (g_total, g_first) == (dense + up1 + same1, dense)
    d_total, d_first = timing.net_flops(graph, "discriminator")
    # same1 8x8x3 -> 8x8xf/2; down1 -> 4x4xf; logit 16f -> 1
    conv1, down1, logit = 2 * 64 * 9 * 3 * half, 2 * 16 * 9 * half * f, 2 * 16 * f
    assert (d_total, d_first) == (conv1 + down1 + logit, conv1)


def test_step_flops_add_up_the_runs_of_a_step():
    flops = timing.step_flops(g_fwd=10, g_first=1, d_fwd=20, d_first=2, batch=1)
    measure = 10 + 2 * 20
    d_update = 2 * (3 * 20 - 2)
    g_update = (3 * 10 - 1) + 4 * 20
    assert flops["B"] == measure + d_update + 2 * g_update + measure
    assert flops["A"] == flops["B"] + d_update


@pytest.mark.parametrize("flags", [["run.mixed_precision=bf16"], ["run.mixed_precision=fp16"],
                                   ["run.xla=true"]])
def test_speed_flags_build_and_train_a_step_on_the_cpu(flags):
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"), flags)
    graph = tf.Graph()
    with graph.as_default():
        g = gan.build_graph(cfg)
    sess = tf1.Session(graph=graph, config=device.session_config(device.plan("cpu", cfg)))
    sess.run(g["init_op"])
    graph.finalize()
    rng = np.random.default_rng(0)
    reals = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    z = rng.uniform(-1, 1, (8, 16)).astype(np.float32)
    with graph.as_default():
        kernel = [v for v in tf1.trainable_variables() if v.op.name == "generator/up1/w"][0]
    assert kernel.dtype.base_dtype == tf.float32  # variables stay float32
    # D's updates are fed the measured fakes through a float32 input no rewrite retypes
    assert g["fakes_in"].op.type == "PlaceholderWithDefault" and g["fakes_in"].dtype == tf.float32
    before = sess.run(kernel)
    record, _ = gan.train_step(sess, g, reals, z, None, False)
    assert all(np.isfinite(record[k]) for k in gan.LOSS_KEYS)
    assert not np.allclose(before, sess.run(kernel))



def test_json_naming_a_folder_is_refused_before_the_benchmark(tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--json", str(tmp_path)])
    assert e.value.code == 2


def test_json_in_a_folder_it_cannot_write_is_refused_before_the_benchmark(
        tmp_path, monkeypatch, capsys):
    """The same check as evaluate.py's (config.json_output_problem)."""
    monkeypatch.setattr(config.os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--json", str(tmp_path / "b.json")])
    assert e.value.code == 2 and f"'{tmp_path}' is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("wide", [False, True])  # wide: the 4x4 layers are matrix products
def test_bf16_runs_convolutions_in_bf16_and_batch_norm_in_float32(wide):
    """The ops a bf16 D update runs, as TensorFlow executed them after its rewrites."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"), ["run.mixed_precision=bf16"]
                      + (["model.image_size=8", "model.gen_filters=512", "model.disc_filters=512"]
                         if wide else []))
    graph = tf.Graph()
    with graph.as_default():
        g = gan.build_graph(cfg)
    sess = tf1.Session(graph=graph, config=device.session_config(device.plan("cpu", cfg)))
    sess.run(g["init_op"])
    side = cfg.model.image_size
    feed = {g["reals_u8_in"]: np.zeros((8, side, side, 3), np.uint8),
            g["z_in"]: np.zeros((8, 16), np.float32)}
    metadata = tf1.RunMetadata()
    sess.run(g["d_total_op"], feed, options=tf1.RunOptions(output_partition_graphs=True),
             run_metadata=metadata)
    types = {}
    for node in (n for graph_def in metadata.partition_graphs for n in graph_def.node):
        if "T" in node.attr:
            types.setdefault(node.op, set()).add(tf.dtypes.as_dtype(node.attr["T"].type))
    if not any(tf.bfloat16 in t for t in types.values()):
        pytest.skip("TensorFlow does not rewrite to bf16 on this CPU")
    convs = set().union(*(t for op, t in types.items() if "Conv2D" in op or "MatMul" in op))
    norms = set().union(*(t for op, t in types.items() if "BatchNorm" in op))
    assert ("_MklBatchMatMulV2" in types) == wide
    assert convs == {tf.bfloat16}
    assert norms == {tf.float32}

def test_untuned_graph_is_the_same_net_with_tensorflows_defaults():
    """bench.py --untuned: the same variables, the 4x4 layers as convolutions, the remapper on."""
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"),  # wide: 4x4 layers as products
                      ["model.image_size=8", "model.gen_filters=512", "model.disc_filters=512"])
    graphs = {}
    for tuned in (True, False):
        plan = device.plan("cpu", cfg, tuned=tuned)
        graph = tf.Graph()
        with graph.as_default():
            tf1.set_random_seed(0)
            g = gan.build_graph(cfg, plan)
            names = sorted((v.op.name, tuple(v.shape.as_list())) for v in tf1.global_variables())
        ops = {op.type for op in graph.get_operations() if op.name.startswith("generator/")}
        graphs[tuned] = (graph, g, names, ops, plan)
    assert graphs[True][2] == graphs[False][2]  # same variables, same shapes
    assert "BatchMatMulV2" in graphs[True][3] and "BatchMatMulV2" not in graphs[False][3]
    rewrite = device.session_config(graphs[False][4]).graph_options.rewrite_options
    assert rewrite.remapping == 0  # DEFAULT: TensorFlow's choice
    graph, g, _, _, plan = graphs[False]
    sess = tf1.Session(graph=graph, config=device.session_config(plan))
    sess.run(g["init_op"])
    rng = np.random.default_rng(0)
    reals = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    z = rng.uniform(-1, 1, (8, 16)).astype(np.float32)
    record, fakes = gan.train_step(sess, g, reals, z, None, False)
    assert fakes.shape == (8, 8, 8, 3) and all(np.isfinite(record[k]) for k in gan.LOSS_KEYS)


def test_a_steps_share_of_peak_is_over_the_probe_just_before_it():
    # The machine halves its speed for the second step: the yardstick does too,
    # so both steps ran at the full share, which a run-wide figure would hide.
    figures = timing.path_figures("b", 100e9, totals=[1.0, 2.0], probes=[100.0, 50.0])
    assert figures["peak_frac_b"] == pytest.approx(1.0)
    assert figures["gflops_b"] == pytest.approx(100 / 1.5)
    assert figures["matmul_gflops_b"] == pytest.approx(75.0)


def test_the_yardstick_is_probed_before_every_step():
    class Clock:  # probe i reads 100 + i
        readings = []

        def probe(self):
            self.readings.append(100.0 + len(self.readings))
            return self.readings[-1]

    clock, called = Clock(), []
    totals, outside, probes = timing.time_steps(lambda n: called.append(n) or 0.0, 2, 1, clock)
    assert len(clock.readings) == 4 and called == [1, 2, 3, 4]  # two warm-up steps, two timed
    assert probes == clock.readings[2:] and len(totals) == len(outside) == 2


def test_bench_times_gan_run_step_on_both_paths():
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"))
    graph = tf.Graph()
    with graph.as_default():
        g = gan.build_graph(cfg)
    sess = tf1.Session(graph=graph)
    sess.run(g["init_op"])
    totals, outside, probes = bench.time_path(cfg, g, sess, "A", 1, 1, timing.Yardstick(64))
    assert len(totals) == len(outside) == len(probes) == 1 and 0 <= outside[0] < 1


def test_the_yardstick_reads_numpys_matmul():
    yardstick = timing.Yardstick(128)
    assert yardstick.probe(2) > 0 and len(yardstick.readings) == 1


def test_bench_prints_the_table_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--config", "configs/smoke.json", "--steps", "2",
                      "--json", out, check=True)
    assert "NumPy float32 matmul" in proc.stdout and "path A" in proc.stdout
    figures = json.loads(out.read_text())
    for key in ("s_per_step_b", "s_per_step_a", "peak_frac_b", "imgs_per_s", "matmul_gflops",
                "outside_run_frac", "peak_rss_mb", "sample_dump_s", "checkpoint_s"):
        assert figures[key] > 0, key
    low, high = figures["matmul_range"]
    assert low <= figures["matmul_gflops"] <= high
    assert figures["blas"] and "matmul kernel" in proc.stdout  # what the yardstick ran
    assert figures["device"].startswith("device: ")


def test_the_yardstick_says_when_the_environment_held_its_kernel_below_the_cpus_best(
        monkeypatch):
    info = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3",
             "architecture": "Haswell"}]
    monkeypatch.setattr("threadpoolctl.threadpool_info", lambda: info)
    monkeypatch.setenv(timing.KERNEL_SETTING, "Haswell")
    monkeypatch.setattr(timing.subprocess, "run", lambda *a, **k: type(
        "Done", (), {"stdout": "SkylakeX\n"}))
    found = timing.blas_kernel()
    assert "Haswell" in found["blas"] and found["blas_best"] == "SkylakeX"
    assert "OPENBLAS_CORETYPE" in timing.blas_text(found) and "SkylakeX" in timing.blas_text(found)
    monkeypatch.delenv(timing.KERNEL_SETTING)
    assert timing.blas_kernel()["blas_best"] is None
