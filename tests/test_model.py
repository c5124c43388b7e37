"""The networks: shapes, ranges, sizes, initialisation, batch-norm behaviour."""
import numpy as np
import pytest
import tensorflow as tf

import config as config_lib
import model

tf1 = tf.compat.v1
TINY = dict(image_size=16, gen_filters=16, disc_filters=16, kernel=3, extra_layers=1)


def build(batch=8, z_dim=8, **kw):
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        z = tf1.placeholder(tf.float32, [batch, z_dim])
        training = tf1.placeholder_with_default(True, [])
        fakes = model.generator(z, training, **kw)
        logits = model.discriminator(fakes, training, **kw)
    return graph, z, training, fakes, logits


def test_shapes_nhwc_and_tanh_range():
    graph, z, training, fakes, logits = build(**TINY)
    assert fakes.shape.as_list() == [8, 16, 16, 3]  # NHWC (Lesson 11)
    assert logits.shape.as_list() == [8]
    with graph.as_default(), tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        out = sess.run(fakes, {z: np.random.default_rng(0).uniform(-50, 50, (8, 8))})
    assert out.min() >= -1.0 and out.max() <= 1.0  # tanh (Lesson 17)
    assert out.min() < -0.5 and out.max() > 0.5


def test_article_generator_has_the_write_ups_parameter_count():
    """Lesson 20: the write-up's G has 19,154,627 weights and biases: an unbiased projection,
    four 5x5 stride-2 layers, then 64 -> 64 and 64 -> 3 at stride 1. D, which the write-up
    does not list, is the mirror (the write-up's D: 19,616,609)."""
    cfg = config_lib.load("configs/article.json")
    graph, *_ = build(batch=4, **{k: v for k, v in vars(cfg.model).items()})
    with graph.as_default():
        g = model.count_params(model.GEN_SCOPE)
        g_bn = model.count_params(model.GEN_SCOPE, batch_norm=True)
        d = model.count_params(model.DISC_SCOPE)
    assert g == 19_154_627 and g_bn == 4_096
    assert d == 17_533_633


def _layer_filters(graph, scope):
    with graph.as_default():
        kernels = [v for v in tf1.trainable_variables(scope + "/") if v.op.name.endswith("/w")]
    return [(v.op.name, v.shape.as_list()) for v in kernels]


def test_discriminator_mirrors_generator():
    """Lesson 16: same number of layers, mirrored filter counts; Lesson 21: strides, no pooling."""
    graph, *_ = build(batch=4, z_dim=100, image_size=64, gen_filters=1024, disc_filters=1024,
                      kernel=5, extra_layers=1)
    gen = _layer_filters(graph, "generator")
    disc = _layer_filters(graph, "discriminator")
    assert len(gen) == len(disc) == 6
    # Generator conv kernels are [k, k, out, in]; discriminator [k, k, in, out].
    gen_outs = [s[2] for _, s in gen[1:]]
    disc_ins = [s[2] for _, s in disc[:-1]]
    assert gen_outs == [512, 256, 128, 64, 3]
    assert disc_ins == gen_outs[::-1]
    with graph.as_default():
        ops = {op.type for op in tf1.get_default_graph().get_operations()}
    assert not ops & {"MaxPool", "AvgPool"}
    assert "Conv2DBackpropInput" in ops  # fractionally-strided convs up


def test_batch_norm_placement():
    """Lesson 26: no BN on G's output layer nor on D's first layer; BN elsewhere (Lesson 23)."""
    graph, *_ = build(**TINY)
    with graph.as_default():
        names = [v.op.name for v in tf1.global_variables()]
    assert "generator/project_bn/gamma" in names and "generator/up2_bn/gamma" in names
    assert not any(n.startswith("generator/same1_bn") for n in names)  # output layer
    assert "discriminator/down2_bn/gamma" in names
    assert not any(n.startswith("discriminator/same1_bn") for n in names)  # first layer
    assert any(n.endswith("moving_mean") for n in names)


def test_xavier_uniform_weights_and_zero_biases():
    """Lessons 18-19: weights U(-a, a), a = sqrt(6 / (fan_in + fan_out)); biases 0."""
    graph, *_ = build(batch=4, z_dim=100, image_size=32, gen_filters=256, disc_filters=256,
                      kernel=5)
    with graph.as_default(), tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        up1 = [v for v in tf1.global_variables() if v.op.name == "generator/up1/w"][0]
        w = sess.run(up1)  # [5, 5, 128, 256]
        biases = sess.run([v for v in tf1.global_variables() if v.op.name.endswith("/b")])
    limit = np.sqrt(6.0 / (25 * 128 + 25 * 256))
    assert np.abs(w).max() <= limit
    assert np.isclose(w.std(), limit / np.sqrt(3), rtol=0.02)
    assert all(np.all(b == 0.0) for b in biases)


def test_regulariser_is_half_sum_of_squared_weights_times_scale():
    """Lesson 24: L2 on the weights (not the biases) of each net."""
    graph, *_ = build(**TINY)
    with graph.as_default(), tf1.Session() as sess:
        reg = model.l2_regulariser("generator", 1e-4)
        sess.run(tf1.global_variables_initializer())
        weights = sess.run([v for v in tf1.trainable_variables("generator/")
                            if v.op.name.endswith("/w")])
        expected = 1e-4 * sum((w.astype(np.float64) ** 2).sum() / 2 for w in weights)
        assert np.isclose(sess.run(reg), expected, rtol=1e-5)


@pytest.mark.parametrize("net", [TINY, dict(TINY, gen_filters=1024)])  # 1024: 4x4 layer as products
def test_generated_image_does_not_depend_on_its_batch(net):
    """Lesson 23: inference mode uses moving averages, so batch size and neighbours don't matter."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        z_train = tf1.placeholder(tf.float32, [8, 8])
        training = tf1.placeholder_with_default(True, [])
        fakes_train = model.generator(z_train, training, **net)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        z_any = tf1.placeholder(tf.float32, [None, 8])  # any batch size, same weights
        fakes_any = model.generator(z_any, tf.constant(False), **net)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            rng = np.random.default_rng(1)
            for _ in range(5):  # move the averages away from their initial 0/1
                sess.run(updates, {z_train: rng.uniform(-1, 1, (8, 8))})
            z = rng.uniform(-1, 1, (8, 8)).astype(np.float32)
            alone = sess.run(fakes_any, {z_any: z[:1]})
            in_batch = sess.run(fakes_any, {z_any: z})
            shuffled = sess.run(fakes_any, {z_any: z[::-1]})
            batch_stats = sess.run(fakes_train, {z_train: z})
    np.testing.assert_allclose(alone[0], in_batch[0], atol=1e-5)
    np.testing.assert_allclose(in_batch, shuffled[::-1], atol=1e-5)
    assert np.abs(batch_stats - in_batch).max() > 1e-3  # training mode really differs


def test_image_size_must_be_power_of_two():
    with pytest.raises(ValueError, match="image_size.*48"):
        build(image_size=48, gen_filters=16, disc_filters=16)


@pytest.mark.parametrize("extra", [0, 2])
def test_extra_layers_count(extra):
    kw = dict(TINY, extra_layers=extra)
    graph, z, training, fakes, logits = build(**kw)
    assert fakes.shape.as_list() == [8, 16, 16, 3]
    gen, disc = _layer_filters(graph, "generator"), _layer_filters(graph, "discriminator")
    assert len(gen) == len(disc) == 1 + 2 + extra


def _op_types(graph, scope):
    return {op.type for op in graph.get_operations() if op.name.startswith(scope + "/")
            and "gradients" not in op.name}


def test_leaky_relu_in_d_and_optionally_in_g():
    """Lesson 22."""
    graph, *_ = build(**TINY)
    assert "LeakyRelu" in _op_types(graph, "discriminator")
    assert "Relu" in _op_types(graph, "generator")
    assert "LeakyRelu" not in _op_types(graph, "generator")
    graph, *_ = build(gen_leaky=True, **TINY)
    assert "LeakyRelu" in _op_types(graph, "generator") and "Relu" not in _op_types(graph, "generator")


@pytest.mark.parametrize("size, kernel, stride", [(8, 5, 2), (8, 4, 2), (8, 3, 2), (4, 3, 1)])
def test_small_map_layers_compute_what_tf_convolutions_compute(size, kernel, stride):
    """The 4x4 layers as matrix products: same outputs and gradients as tf.nn (SAME padding)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, size, size, 5)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32)
    u = rng.normal(size=(3, size // stride, size // stride, 7)).astype(np.float32)
    with tf.Graph().as_default(), tf1.Session() as sess:
        x_t, w_t, u_t = tf.constant(x), tf.constant(w), tf.constant(u)
        pairs = [(tf.nn.conv2d(x_t, w_t, [1, stride, stride, 1], "SAME"),
                  model._conv_as_matmul(x_t, w_t, stride), x_t),
                 (tf.nn.conv2d_transpose(u_t, w_t, [3, size, size, 5], [1, stride, stride, 1], "SAME"),
                  model._deconv_as_matmul(u_t, w_t, stride), u_t)]
        for reference, ours, inp in pairs:
            assert ours.shape.as_list() == reference.shape.as_list()
            grads = [tf.gradients(tf.reduce_sum(y * y), [inp, w_t]) for y in (reference, ours)]
            (ref_y, ref_grads), (our_y, our_grads) = sess.run([(reference, grads[0]), (ours, grads[1])])
            np.testing.assert_allclose(our_y, ref_y, rtol=1e-4, atol=1e-4)
            for a, b in zip(our_grads, ref_grads):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_window_matrix_picks_the_same_padding_taps():
    """8x8 -> 4x4, 5x5 kernel, stride 2: SAME pads 1 before and 2 after."""
    picks = model.window_matrix(8, 5, 2).reshape(4, 4, 5, 5, 8, 8)
    assert picks.sum(axis=(4, 5)).max() == 1  # a tap reads one pixel or the padding
    assert picks[0, 0, 1, 1, 0, 0] == 1 and picks[0, 0, 0, 0].sum() == 0  # tap (0, 0) on padding
    assert picks[3, 3, 2, 2, 7, 7] == 1  # 3 * 2 + 2 - 1
    assert picks[3, 3, 3, 3].sum() == 0 and picks[3, 3, 4, 4].sum() == 0  # rows 8, 9: padding
    assert picks[0, 0].sum() == 16 and picks[1, 1].sum() == 25


def test_layers_at_4x4_are_matrix_products_in_the_article_nets():
    """oneDNN ran the article's 4x4 layers at half speed: G's first and D's last layer are
    built as window x weights products instead (README, "Performance")."""
    graph, *_ = build(batch=4, z_dim=100, image_size=64, gen_filters=1024, disc_filters=1024,
                      kernel=5, extra_layers=1)
    convs = [op for op in graph.get_operations() if "gradients" not in op.name
             and op.type in ("Conv2D", "Conv2DBackpropInput")]
    assert len(convs) == 8  # G up2..up4, same1; D same1, down4..down2
    small = {op.name.split("/")[1] for op in graph.get_operations() if op.type == "BatchMatMulV2"}
    assert small == {"up1", "down1"}
    # With 128 filters at 4x4 the window gathering would cost half the weights' product
    # (64 pixels / 128 channels) and the convolutions ran faster: they stay convolutions.
    graph, *_ = build(batch=4, z_dim=100, image_size=32, gen_filters=128, disc_filters=128,
                      kernel=5, extra_layers=1)
    assert not any(op.type == "BatchMatMulV2" for op in graph.get_operations())


@pytest.mark.parametrize("how, even", [("resize", True), ("transposed", False)])
def test_resize_upsampling_leaves_no_checkerboard(how, even):
    """A flat input through equal weights: a resize then convolution gives a flat inside;
    a 5x5 stride-2 transposed convolution overlaps unevenly (a checkerboard, Odena 2016)."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.ones([1, 8, 8, 2])
        y = model.upsample2x(x, 2, 5, how, "up")  # [1, 16, 16, 2]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            w = tf1.global_variables("up/w")[0]
            sess.run(w.assign(tf.ones_like(w)))
            out = sess.run(y)
    assert out.shape == (1, 16, 16, 2)
    inside = out[0, 4:12, 4:12, 0]
    assert (inside.std() == 0) == even


def test_resize_generator_builds_and_trains_its_conv_kernels():
    graph, z, training, fakes, logits = build(**TINY, upsample="resize")
    assert fakes.shape.as_list() == [8, 16, 16, 3]
    with graph.as_default():
        ops = {op.type for op in graph.get_operations() if op.name.startswith("generator/")}
        up = {op.type for op in graph.get_operations() if op.name.startswith("generator/up")}
    assert "DepthToSpace" in up and "Conv2DBackpropInput" not in up
    assert "ResizeNearestNeighbor" not in ops  # the resize is folded into the kernel


@pytest.mark.parametrize("kernel, size, filters", [(4, 8, 6), (5, 8, 6), (3, 8, 6), (4, 4, 40)])
def test_resize_upsampling_computes_a_resize_then_a_convolution(kernel, size, filters):
    """The four-phase form gives what resizing, then convolving (SAME), gives; (4, 4, 40):
    the 4x4 map as matrix products."""
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default(), tf1.Session() as sess:
        y = model.upsample2x(tf.constant(x), filters, kernel, "resize", "up")
        sess.run(tf1.global_variables_initializer())
        w, b = sess.run(tf1.global_variables("up/w")[0]), sess.run(tf1.global_variables("up/b")[0])
        resized = tf.image.resize(x, [2 * size, 2 * size], "nearest")
        expected = tf.nn.conv2d(resized, w, 1, "SAME") + b
        got, want = sess.run([y, expected])
    assert got.shape == (2, 2 * size, 2 * size, filters)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_minibatch_std_is_each_groups_spread_and_catches_one_image_for_every_latent():
    """model.minibatch_std: one more 4x4 channel, the spread of the image's own group only."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 4, 5)).astype(np.float32)
    x[4:] = x[4]  # the second group of four: one image four times
    graph = tf.Graph()
    with graph.as_default(), tf1.Session() as sess:
        out = sess.run(model.minibatch_stddev(tf.constant(x), 4))
    assert out.shape == (8, 4, 4, 6) and np.array_equal(out[..., :5], x)
    spread = x[:4].std(axis=0).mean()
    np.testing.assert_allclose(out[:4, ..., 5], spread, rtol=1e-5)
    assert np.abs(out[4:, ..., 5]).max() < 1e-3  # a collapsed group stands out
    graph, z, training, fakes, logits = build(**TINY, minibatch_std=4)
    with graph.as_default():
        weights = {v.op.name: v.shape.as_list() for v in tf1.trainable_variables("discriminator/")}
    assert weights["discriminator/logit/w"] == [4 * 4 * 17, 1]  # 16 filters + the spread


def test_minibatch_std_must_divide_the_batch_and_is_off_in_the_write_ups_config():
    assert config_lib.load("configs/article.json").model.minibatch_std == 0
    with pytest.raises(config_lib.ConfigError, match="model.minibatch_std"):
        config_lib.load("configs/smoke.json", ["model.minibatch_std=3"])  # batch 8
    assert "model.minibatch_std" in config_lib.ARCHITECTURE_KEYS  # a resume keeps it
