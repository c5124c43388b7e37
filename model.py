"""DCGAN generator and discriminator graphs (Radford et al. 2015), TF1 style.

Pure graph building: every hyper-parameter is a keyword argument, nothing here
reads a config file or knows about training. Images are NHWC throughout
(batch, height, width, channels) (Lesson 11) and in -1..+1 at the generator
output and the discriminator input.

Layers are written on `tf.compat.v1.get_variable` and `tf.nn` ops because
Keras 3 leaves no `tf.compat.v1.layers`. Shapes are static wherever the batch
size is known, and batch norm is the fused op: both ran faster on a CPU than
`tf.shape`-derived shapes and `tf.nn.moments` (docs/performance.md).
"""
import itertools
import math

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

GEN_SCOPE = "generator"
AVERAGE_SCOPE = "generator_average"  # the averaged copy of G's weights (train.g_average)
DISC_SCOPE = "discriminator"


# ---------------------------------------------------------------- layer helpers

def _weight(name, shape):
    # Lesson 19: Xavier/Glorot uniform, limit sqrt(6 / (fan_in + fan_out)).
    return tf1.get_variable(name, shape, tf.float32, tf1.glorot_uniform_initializer())


def _bias(name, size):
    # Lesson 18: biases start at zero.
    return tf1.get_variable(name, [size], tf.float32, tf1.constant_initializer(0.0))


def dense(x, units, name, bias=True):
    """x [N, in] -> [N, units]; bias=False where batch norm follows (its offset is the bias)."""
    with tf1.variable_scope(name):
        y = tf.matmul(x, _weight("w", [int(x.shape[-1]), units]))
        return y + _bias("b", units) if bias else y


def conv2d(x, filters, kernel, stride, name, small_maps_as_matmul=True):
    """Strided convolution, SAME padding: size / stride (Lesson 21: no pooling)."""
    with tf1.variable_scope(name):
        w = _weight("w", [kernel, kernel, int(x.shape[-1]), filters])
        return tf.nn.bias_add(_convolve(x, w, stride, small_maps_as_matmul), _bias("b", filters))


def _convolve(x, w, stride, small_maps_as_matmul):
    """SAME convolution of x with kernel w, as a matmul where that is faster (_as_matmul)."""
    size = int(x.shape[1])
    if small_maps_as_matmul and _as_matmul(size // stride, size, int(w.shape[-1])):
        return _conv_as_matmul(x, w, stride)
    return tf.nn.conv2d(x, w, [1, stride, stride, 1], "SAME")


def deconv2d(x, filters, kernel, stride, name, small_maps_as_matmul=True):
    """Fractionally-strided (transposed) convolution: size * stride (Lesson 21)."""
    with tf1.variable_scope(name):
        w = _weight("w", [kernel, kernel, filters, int(x.shape[-1])])
        size = int(x.shape[1])
        if small_maps_as_matmul and _as_matmul(size, size * stride, int(x.shape[-1])):
            return tf.nn.bias_add(_deconv_as_matmul(x, w, stride), _bias("b", filters))
        _, h, wd, _ = x.shape.as_list()
        batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        out_shape = [batch, h * stride, wd * stride, filters]
        if not isinstance(batch, int):
            out_shape = tf.stack(out_shape)  # only for a SavedModel's [None] batch
        y = tf.nn.conv2d_transpose(x, w, out_shape, [1, stride, stride, 1], "SAME")
        return tf.nn.bias_add(y, _bias("b", filters))


# The wide layers at 4x4 (D's last convolution, G's first transposed one in
# the article net) as two matrix products: a constant 0/1 matrix gathers each
# output pixel's k x k window (im2col), then one product with the weights.
# oneDNN's direct convolution is slow on such small maps, and the products
# beat it there; the gathering adds (big map's pixels / wide side's channels)
# to the weights' product, so the products are used where that is at most 1/8
# (docs/performance.md). A CPU choice: device.plan turns it off on a GPU
# (`small_maps_as_matmul`). Same variables, same arithmetic as tf.nn.conv2d /
# conv2d_transpose with SAME padding.
SMALL_MAP = 4


def _as_matmul(small_side, big_side, wide_channels):
    """Whether a layer between a small_side and a big_side map runs as matrix products."""
    return small_side <= SMALL_MAP and big_side * big_side * 8 <= wide_channels


def window_matrix(size, kernel, stride):
    """0/1 matrix [out*out*k*k, size*size] of a SAME convolution on a size x size map.

    Row (oy, ox, ky, kx) picks the input pixel that tap (ky, kx) of output pixel
    (oy, ox) reads, out = size / stride; a tap on the zero padding is an
    all-zero row. Padding before = total // 2, as TensorFlow's SAME.
    """
    out = size // stride
    before = max((out - 1) * stride + kernel - size, 0) // 2
    picks = np.zeros((out, out, kernel, kernel, size, size), np.float32)
    for oy, ox, ky, kx in itertools.product(range(out), range(out), range(kernel), range(kernel)):
        iy, ix = oy * stride + ky - before, ox * stride + kx - before
        if 0 <= iy < size and 0 <= ix < size:
            picks[oy, ox, ky, kx, iy, ix] = 1.0
    return picks.reshape(out * out * kernel * kernel, size * size)


def _conv_as_matmul(x, w, stride):
    """tf.nn.conv2d(x, w, stride, SAME) as windows x weights. x [N, S, S, C_in]."""
    size, c_in = int(x.shape[1]), int(x.shape[-1])
    kernel, c_out = int(w.shape[0]), int(w.shape[-1])
    out = size // stride
    windows = tf.matmul(tf.constant(window_matrix(size, kernel, stride)),
                        tf.reshape(x, [-1, size * size, c_in]))  # [N, out*out*k*k, C_in]
    y = tf.matmul(tf.reshape(windows, [-1, kernel * kernel * c_in]),
                  tf.reshape(w, [kernel * kernel * c_in, c_out]))  # [N*out*out, C_out]
    return tf.reshape(y, [-1, out, out, c_out])


def _deconv_as_matmul(x, w, stride):
    """tf.nn.conv2d_transpose(x, w, stride, SAME): the adjoint of _conv_as_matmul.

    x [N, S, S, C_in], w [k, k, C_out, C_in] -> [N, S*stride, S*stride, C_out]:
    each input pixel spreads weights x pixel over its window, the transposed
    window matrix adds up what lands on each output pixel.
    """
    size, c_in = int(x.shape[1]), int(x.shape[-1])
    kernel, c_out = int(w.shape[0]), int(w.shape[2])
    big = size * stride
    spread = tf.matmul(tf.reshape(x, [-1, c_in]),
                       tf.reshape(w, [kernel * kernel * c_out, c_in]), transpose_b=True)
    y = tf.matmul(tf.constant(window_matrix(big, kernel, stride).T),
                  tf.reshape(spread, [-1, size * size * kernel * kernel, c_out]))
    return tf.reshape(y, [-1, big, big, c_out])  # [N, S*stride, S*stride, C_out]


def upsample2x(x, filters, kernel, how, name, small_maps_as_matmul=True):
    """Double the resolution: a stride-2 transposed convolution (the write-up's), or a
    nearest-neighbour resize then a stride-1 convolution, whose taps cover every
    output pixel alike and so leave no checkerboard (Odena et al. 2016).

    The resize is never made: each of the four output pixels of an input pixel sees
    the input through sums of the kernel's taps (resize_conv_kernel), so one convolution
    of the small map with four times the filters, then depth_to_space, gives the same
    images with 36 instead of 64 multiplications per tap, input channel and filter, and
    no resize op (which has no deterministic gradient kernel on a GPU).
    """
    if how == "transposed":
        return deconv2d(x, filters, kernel, 2, name, small_maps_as_matmul)
    with tf1.variable_scope(name):  # the variables of conv2d: checkpoints of either form load
        w = _weight("w", [kernel, kernel, int(x.shape[-1]), filters])
        phases = resize_conv_kernel(w)  # [W, W, C_in, 4 * filters]
        y = _convolve(x, phases, 1, small_maps_as_matmul)  # [N, S, S, 4 * filters]
        y = tf.nn.depth_to_space(y, 2)  # [N, 2S, 2S, filters]
        return tf.nn.bias_add(y, _bias("b", filters))


def resize_conv_kernel(w):
    """Kernel [k, k, C_in, C_out] of a SAME convolution after a 2x nearest-neighbour resize ->
    kernel [W, W, C_in, 4 * C_out] of a SAME convolution of the map before the resize.

    Output pixel (2i + a, 2j + b) reads resized rows 2i + a - before + t (t < k), which are
    input rows i + (a - before + t) // 2: the taps of one input row add up. Filter
    (2a + b) * C_out + c of the result is phase (a, b) of filter c, depth_to_space's order.
    """
    kernel = int(w.shape[0])
    before = (kernel - 1) // 2  # TensorFlow's SAME padding before, stride 1
    offsets = np.array([[(a - before + t) // 2 for t in range(kernel)] for a in (0, 1)])
    low, width = offsets.min(), offsets.max() - offsets.min() + 1
    assert -low == (width - 1) // 2, "the phases' window must be SAME-padded like its size"
    picks = np.zeros((2, width, kernel), np.float32)  # [phase, window row, kernel row]
    for a, t in itertools.product((0, 1), range(kernel)):
        picks[a, offsets[a, t] - low, t] = 1.0
    summed = tf.einsum("apt,bqu,tuio->pqiabo", picks, picks, w)  # [W, W, C_in, 2, 2, C_out]
    return tf.reshape(summed, [width, width, int(w.shape[2]), 4 * int(w.shape[3])])


def batch_norm(x, is_training, momentum, name):
    """Fused batch norm over NHWC with moving averages for inference (Lesson 23).

    In training mode it normalises with the batch statistics and its update
    ops (in UPDATE_OPS) move the averages; in inference mode it uses the
    averages, so an image does not depend on the other images in its batch.
    """
    with tf1.variable_scope(name):
        channels = int(x.shape[-1])
        gamma = tf1.get_variable("gamma", [channels], initializer=tf1.ones_initializer())
        beta = tf1.get_variable("beta", [channels], initializer=tf1.zeros_initializer())
        moving_mean = tf1.get_variable(
            "moving_mean", [channels], initializer=tf1.zeros_initializer(), trainable=False)
        moving_var = tf1.get_variable(
            "moving_var", [channels], initializer=tf1.ones_initializer(), trainable=False)

        def batch_stats():
            return tf1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-5, is_training=True)

        def moving_stats():
            y, _, _ = tf1.nn.fused_batch_norm(
                x, gamma, beta, mean=moving_mean, variance=moving_var,
                epsilon=1e-5, is_training=False)
            return y, moving_mean.read_value(), moving_var.read_value()

        y, mean, var = tf.cond(is_training, batch_stats, moving_stats)
        # Run only by the train ops, which always feed is_training=True.
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, moving_mean.assign(
            moving_mean * momentum + mean * (1.0 - momentum)))
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, moving_var.assign(
            moving_var * momentum + var * (1.0 - momentum)))
        return y


def _activation(x, leaky, slope):
    return tf.nn.leaky_relu(x, slope) if leaky else tf.nn.relu(x)


def _levels(image_size):
    """Number of 2x resolution steps between 4x4 and image_size."""
    levels = int(round(math.log2(image_size / 4)))
    if image_size < 8 or 4 * 2 ** levels != image_size:
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return levels


# ---------------------------------------------------------------- the two nets

def generator(z_in, is_training, *, image_size=64, channels=3, gen_filters=1024,
              kernel=5, extra_layers=1, gen_leaky=False, leaky_slope=0.2,
              bn_momentum=0.9, upsample="transposed", scope=GEN_SCOPE,
              small_maps_as_matmul=True, **_):
    """z [N, z_dim] -> images [N, S, S, channels] in -1..+1.

    4x4 x gen_filters, then filters halve while resolution doubles (Lesson 20),
    then `extra_layers` stride-1 transposed convs at full resolution against
    checkerboard artefacts (Lesson 27), the last one to `channels` and tanh
    (Lesson 17). Batch norm everywhere except the output layer (Lesson 26).
    `scope` names its variables: a second scope holds a second copy (the averaged weights).
    `small_maps_as_matmul`: the wide 4x4 layers as matrix products (same variables).
    """
    levels = _levels(image_size)
    act = lambda x: _activation(x, gen_leaky, leaky_slope)
    bn = lambda x, name: batch_norm(x, is_training, bn_momentum, name)
    with tf1.variable_scope(scope, reuse=tf1.AUTO_REUSE):
        x = dense(z_in, 4 * 4 * gen_filters, "project", bias=False)  # batch norm follows
        x = act(bn(tf.reshape(x, [-1, 4, 4, gen_filters]), "project_bn"))  # [N, 4, 4, F]
        for i in range(1, levels + 1):
            last = i == levels and extra_layers == 0
            filters = channels if last else gen_filters // 2 ** i
            x = upsample2x(x, filters, kernel, upsample, f"up{i}",
                           small_maps_as_matmul)  # [N, 4*2^i, 4*2^i, F/2^i]
            if last:
                return tf.tanh(x)
            x = act(bn(x, f"up{i}_bn"))
        for j in range(1, extra_layers + 1):
            last = j == extra_layers
            x = deconv2d(x, channels if last else int(x.shape[-1]), kernel, 1, f"same{j}",
                         small_maps_as_matmul)
            if last:
                return tf.tanh(x)  # [N, S, S, channels]
            x = act(bn(x, f"same{j}_bn"))


def discriminator(x_in, is_training, *, image_size=64, disc_filters=1024, kernel=5,
                  extra_layers=1, leaky_slope=0.2, bn_momentum=0.9, small_maps_as_matmul=True,
                  minibatch_std=0, **_):
    """Images [N, S, S, C] in -1..+1 -> logits [N].

    The mirror of the generator (Lesson 16): `extra_layers` stride-1 convs at
    full resolution, then strided convs doubling the filters up to
    disc_filters at 4x4, leaky ReLU (Lesson 22), batch norm except on the
    first layer (Lesson 26), one logit. `minibatch_std` > 0: the 4x4 features
    gain one channel, how much they vary within each group of that many
    consecutive images (minibatch_stddev).
    """
    levels = _levels(image_size)
    act = lambda x: tf.nn.leaky_relu(x, leaky_slope)
    bn = lambda x, name: batch_norm(x, is_training, bn_momentum, name)
    first = True
    with tf1.variable_scope(DISC_SCOPE, reuse=tf1.AUTO_REUSE):
        x = x_in
        full_res_filters = disc_filters // 2 ** levels
        for j in range(extra_layers, 0, -1):
            x = conv2d(x, full_res_filters, kernel, 1, f"same{j}",
                       small_maps_as_matmul)  # [N, S, S, F/2^levels]
            x = act(x if first else bn(x, f"same{j}_bn"))
            first = False
        for i in range(levels, 0, -1):
            x = conv2d(x, disc_filters // 2 ** (i - 1), kernel, 2, f"down{i}",
                       small_maps_as_matmul)
            x = act(x if first else bn(x, f"down{i}_bn"))  # [N, 4*2^(i-1), .., F/2^(i-1)]
            first = False
        if minibatch_std:
            x = minibatch_stddev(x, minibatch_std)  # [N, 4, 4, F + 1]
        x = tf.reshape(x, [-1, 4 * 4 * int(x.shape[-1])])
        return tf.squeeze(dense(x, 1, "logit"), axis=1)  # [N]


def minibatch_stddev(x, group):
    """x [N, H, W, F] -> [N, H, W, F + 1]: the last channel is, for each group of `group`
    consecutive images, the standard deviation of every feature over the group, averaged
    (Karras et al. 2018). D sees how alike a group's images are, so a generator that makes
    one image for every latent is caught at once. Groups must not mix reals and fakes:
    the caller puts each kind in whole groups."""
    n, h, w, f = [int(d) for d in x.shape]
    grouped = tf.reshape(x, [n // group, group, h, w, f])
    variance = tf.reduce_mean(tf.square(grouped - tf.reduce_mean(grouped, 1, keepdims=True)), 1)
    spread = tf.reduce_mean(tf.sqrt(variance + 1e-8), axis=[1, 2, 3])  # [N / group]
    per_image = tf.repeat(spread, group)[:, None, None, None]  # [N, 1, 1, 1]
    return tf.concat([x, tf.tile(per_image, [1, h, w, 1])], axis=3)


def l2_regulariser(scope, scale):
    """scale * sum(w^2) / 2 over the scope's weights, not biases (Lesson 24)."""
    weights = [v for v in tf1.trainable_variables(scope + "/") if v.op.name.endswith("/w")]
    return tf.multiply(scale, tf.add_n([tf.nn.l2_loss(w) for w in weights]), name=scope + "_reg")


def count_params(scope, batch_norm=False):
    """Weights and biases of one net, or with batch_norm=True its batch-norm scales and
    offsets (counted apart, as the write-up counts; moving averages never count)."""
    return sum(v.shape.num_elements() for v in tf1.trainable_variables(scope + "/")
               if v.op.name.endswith(("/gamma", "/beta")) == batch_norm)
