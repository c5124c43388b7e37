"""Differentiable augmentation of everything D sees (train.d_augment; Zhao et al. 2020).

Reals, fakes and replayed fakes alike pass through the same random colour,
translation and cutout before D, in D's updates and in G's, so D cannot
overfit a small set of tiles while G is still pulled towards the un-augmented
imagery: every op is differentiable in the pixels, and G's gradient flows back
through them.

A step's random values are drawn with NumPy from the step's own generator
(`draw`) and fed, like its latents: a resumed run draws what the uninterrupted
one would have. `build` makes the graph ops; fed nothing, they change nothing.
"""
import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

TRANSLATION_RATIO = 1 / 8  # largest shift, as a share of the side (the paper's)
CUTOUT_RATIO = 1 / 2       # side of the square cut out, as a share of the side (the paper's)


def largest_shift(size):
    return max(1, int(round(size * TRANSLATION_RATIO)))


def build(n, size, names):
    """The inputs of the augmentations `names` of n images [n, size, size, C], and the function
    that applies them.

    Returns (inputs, apply): `inputs` maps value names (those `draw` returns) to
    placeholders whose defaults change nothing (`on` False: the images pass as they are);
    `apply(images)` augments a tensor.
    """
    shift = largest_shift(size)
    inputs = {}
    with tf.name_scope("Inputs"):
        # Off unless fed: D's input then passes untouched, bit for bit (train.d_augment_from).
        inputs["on"] = tf1.placeholder_with_default(False, [], "augment_on_in")
        if "color" in names:
            for key, default in (("brightness", 0.0), ("saturation", 1.0), ("contrast", 1.0)):
                inputs[key] = tf1.placeholder_with_default(tf.fill([n], default), [n],
                                                           f"augment_{key}_in")
        if "translation" in names:
            inputs["shift"] = tf1.placeholder_with_default(tf.zeros([n, 2], tf.int32), [n, 2],
                                                           "augment_shift_in")
        if "cutout" in names:
            inputs["keep"] = tf1.placeholder_with_default(tf.ones([n, size, size]),
                                                          [n, size, size], "augment_keep_in")

    def augmented(x):
        per_image = lambda key: inputs[key][:, None, None, None]  # [n, 1, 1, 1]
        if "color" in names:
            x = x + per_image("brightness")
            mean = tf.reduce_mean(x, axis=3, keepdims=True)  # [n, S, S, 1]
            x = (x - mean) * per_image("saturation") + mean
            mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)  # [n, 1, 1, 1]
            x = (x - mean) * per_image("contrast") + mean
        if "translation" in names:  # shifted in from a zero (mid-grey) border
            padded = tf.pad(x, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
            base = tf.range(size)[None, :] + shift  # [1, S]
            x = tf.gather(padded, base + inputs["shift"][:, :1], axis=1, batch_dims=1)
            x = tf.gather(x, base + inputs["shift"][:, 1:], axis=2, batch_dims=1)  # [n, S, S, C]
        if "cutout" in names:
            x = x * inputs["keep"][..., None]
        return x

    def apply(x):
        # A cond, not a select: off, x and G's gradient pass exactly and the augmentation is
        # not computed at all (a select computed it every step: docs/performance.md).
        return tf.cond(inputs["on"], lambda: augmented(x), lambda: tf.identity(x))

    return inputs, apply


def draw(rng, n, size, names):
    """One step's random augmentation of n images, as the values to feed `build`'s inputs.

    `names`: the augmentations on (config.augmentations); the others stay the identity.
    """
    values = {"on": np.bool_(True)} if names else {}
    if "color" in names:
        values["brightness"] = (rng.random(n) - 0.5).astype(np.float32)
        values["saturation"] = (rng.random(n) * 2.0).astype(np.float32)
        values["contrast"] = (rng.random(n) + 0.5).astype(np.float32)
    if "translation" in names:
        shift = largest_shift(size)
        values["shift"] = rng.integers(-shift, shift + 1, (n, 2)).astype(np.int32)
    if "cutout" in names:
        side = max(1, int(round(size * CUTOUT_RATIO)))
        centre = rng.integers(0, size, (n, 2))  # the square may run over an edge
        low, high = np.clip(centre - side // 2, 0, size), np.clip(centre - side // 2 + side, 0, size)
        grid = np.arange(size)
        inside_rows = (grid >= low[:, :1]) & (grid < high[:, :1])  # [n, S]
        inside_cols = (grid >= low[:, 1:]) & (grid < high[:, 1:])
        values["keep"] = 1.0 - (inside_rows[:, :, None] & inside_cols[:, None, :]).astype(np.float32)
    return values
