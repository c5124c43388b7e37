"""tools/bench_torch.py: the PyTorch nets are model.py's nets, and the benchmark runs and reports.

PyTorch is optional: the tests that need it skip without it; the one that
checks the install message runs either way.
"""
import functools
import json
import os
import sys

import pytest
import tensorflow as tf

import config
import model
import timing
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_torch  # noqa: E402

tf1 = tf.compat.v1
SMOKE = os.path.join(ROOT, "configs", "smoke.json")


@pytest.fixture
def torch():
    """PyTorch on one thread: tiny nets, and other tests' processes share the cores."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def tf_graph(cfg):
    """The generator and discriminator of `cfg` in a fresh TF graph."""
    graph = tf.Graph()
    with graph.as_default():
        m = cfg.model
        z = tf1.placeholder(tf.float32, [2, m.z_dim])
        model.discriminator(model.generator(z, tf.constant(True), **vars(m)),
                            tf.constant(True), **vars(m))
    return graph


@pytest.mark.parametrize("overrides", [
    [],
    ["model.extra_layers=2", "model.image_size=32"],
    ["model.extra_layers=0", "model.kernel=5", "model.gen_leaky=true"],
    ["model.gen_filters=512", "model.disc_filters=512"],  # TF's 4x4 layers as matrix products
    ["model.kernel=4"],  # an even kernel at stride 1 (configs/cpu.json)
])
def test_torch_nets_have_the_tf_nets_parameters_and_flops(torch, overrides):
    cfg = config.load(SMOKE, overrides)
    m = cfg.model
    graph = tf_graph(cfg)
    with graph.as_default():
        tf_counts = tuple(model.count_params(s) + model.count_params(s, batch_norm=True)
                          for s in (model.GEN_SCOPE, model.DISC_SCOPE))
    assert bench_torch.param_counts(cfg) == tf_counts

    gen, disc = bench_torch.generator(m), bench_torch.discriminator(m)
    assert bench_torch.forward_flops(gen, torch.zeros(1, m.z_dim)) == \
        timing.net_flops(graph, model.GEN_SCOPE)
    assert bench_torch.forward_flops(disc, torch.zeros(1, m.channels, m.image_size, m.image_size)) == \
        timing.net_flops(graph, model.DISC_SCOPE)
    fakes = gen(torch.zeros(3, m.z_dim))
    assert tuple(fakes.shape) == (3, m.channels, m.image_size, m.image_size)
    assert tuple(disc(fakes).shape) == (3,)


@pytest.mark.parametrize("transposed", [False, True])
def test_even_kernel_stride_1_layers_pad_as_tf_does(torch, transposed):
    """Same weights, same outputs: the extra pixel of padding on TF's side."""
    import numpy as np
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32))
        layer = model.deconv2d if transposed else model.conv2d
        y = layer(x, 5, 4, 1, "layer")
        w = tf1.trainable_variables("layer/w")[0]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            x_np, y_np, w_np = sess.run([x, y, w])
    twin = bench_torch._conv(3, 5, 4, 1, transposed)
    weighted = [m for m in twin.modules() if hasattr(m, "weight")][0]
    with torch.no_grad():
        weighted.weight.copy_(torch.from_numpy(w_np.transpose(3, 2, 0, 1).copy()))
        out = twin(torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(out.numpy().transpose(0, 2, 3, 1), y_np, atol=1e-5)


def test_a_step_trains_both_nets_on_either_path(torch):
    import numpy as np
    cfg = config.load(SMOKE)
    m, B = cfg.model, cfg.train.batch_size
    torch.manual_seed(0)
    step = bench_torch.Step(cfg)
    rng = np.random.default_rng(0)
    reals = rng.integers(0, 256, (B, m.image_size, m.image_size, m.channels), dtype=np.uint8)
    z = rng.uniform(-1, 1, (B, m.z_dim)).astype(np.float32)
    weights = [*step.weights[step.gen], *step.weights[step.disc]]
    for path in ("A", "B"):
        before = [w.detach().clone() for w in weights]
        record = step(reals, z, path)
        assert all(np.isfinite(v) for v in record.values())
        assert record["d_reg_loss"] > 0 and record["g_reg_loss"] > 0
        assert all(not torch.equal(a, b) for a, b in zip(before, weights)), path


def test_bench_writes_its_figures(torch, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "Yardstick", functools.partial(timing.Yardstick, 256))
    out = tmp_path / "bench_torch.json"
    assert bench_torch.main(["--config", SMOKE, "--steps", "1", "--json", str(out)]) == 0
    assert "path A" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    for key in ("s_per_step_a", "s_per_step_b", "imgs_per_s", "matmul_gflops", "peak_frac_b",
                "threads"):
        assert figures[key] > 0, key
    assert figures["torch_version"] == torch.__version__


def test_without_torch_one_error_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert bench_torch.cli(["--config", SMOKE, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "pip install torch==2.13.0" in err
