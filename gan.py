"""The GAN's training graph and one training step, built on model.py.

Shared by train.py and bench.py: `build_graph` builds every op of a run once
(Lesson 14); `run_step` draws a step's batch and trains on it. Each step
measures D on the current batch, updates D along path A or B, updates G
twice, then fetches the losses in a run of their own (Lessons 15, 39).
"""
import numpy as np
import tensorflow as tf

import config
import d_augment
import data
import device
import model
from sampling import sample_latents, to_u8, to_u8_op

tf1 = tf.compat.v1


LOSS_KEYS = ("d_real_loss", "d_fake_loss", "d_reg_loss", "g_loss", "g_reg_loss")


def choose_path(d_real_acc, d_fake_acc):
    """Lesson 39: path A when D misjudges at least half of the reals or of the fakes.

    Path A optimises D's real and fake losses separately (two runs); path B
    takes one run on the total loss and leaves G room.
    """
    return "A" if d_real_acc <= 0.5 or d_fake_acc <= 0.5 else "B"


def use_history(coin, prob, cached, needed):
    """Lesson 33: replay old fakes with probability `prob`, once enough are cached."""
    return coin < prob and cached >= needed


def history_count(batch_size, fraction):
    return int(round(batch_size * fraction))


def build_graph(cfg, plan=None):
    """Every op of the run, built once; returns a dict of the tensors the loop uses.

    `plan` (device.plan) chooses the device's layer forms; a CPU's by default.
    """
    plan = plan or device.plan("cpu", cfg)
    m, t = cfg.model, cfg.train
    B, S = t.batch_size, m.image_size
    g = {}
    with tf.name_scope("Inputs"):
        # Pixels arrive as uint8 0..255 and are scaled exactly once, here (Lessons 8, 12).
        g["reals_u8_in"] = tf1.placeholder(tf.uint8, [B, S, S, m.channels], "reals_u8_in")
        g["z_in"] = tf1.placeholder(tf.float32, [B, m.z_dim], "z_in")
        g["history_u8_in"] = tf1.placeholder_with_default(
            tf.zeros([B, S, S, m.channels], tf.uint8), [B, S, S, m.channels], "history_u8_in")
        g["history_mask_in"] = tf1.placeholder_with_default(tf.zeros([B]), [B], "history_mask_in")
        g["is_training_in"] = tf1.placeholder_with_default(True, [], "is_training_in")
        g["step_in"] = tf1.placeholder(tf.int64, [], "step_in")

    to_signed = lambda u8: tf.image.convert_image_dtype(u8, tf.float32) * 2.0 - 1.0  # Lesson 29
    reals = to_signed(g["reals_u8_in"])  # [B, S, S, C] in -1..1
    g["reals_in"] = reals
    kw = {**vars(m), **plan.model_kwargs()}
    g["fakes_out"] = model.generator(g["z_in"], g["is_training_in"], **kw)  # [B, S, S, C]
    g["fakes_u8_out"] = to_u8_op(g["fakes_out"])  # the pixels sampling.to_u8 gives
    with tf.name_scope("Inputs"):
        # D's updates are fed the fakes its measurement drew (train_step); G's updates
        # take them from G. A float32 input of its own: the float16 rewrite retypes
        # G's output op, never this one, so the fed values always fit it.
        g["fakes_in"] = tf1.placeholder_with_default(g["fakes_out"], [B, S, S, m.channels],
                                                     "fakes_in")

    # Lesson 33-35: cached fakes, stored as uint8 like the reals, replace part of the fake half.
    mask = g["history_mask_in"][:, None, None, None]
    fakes_for_d = g["fakes_in"] * (1.0 - mask) + to_signed(g["history_u8_in"]) * mask

    # Lesson 38: one D call on one batch of reals and fakes; losses on its halves.
    d_in = tf.concat([reals, fakes_for_d], 0)  # [2B, S, S, C]
    names = config.augmentations(cfg)
    if names:  # train.d_augment: off in the write-up's config
        g["augment_in"], augment = d_augment.build(2 * B, S, names)
        d_in = augment(d_in)
    logits = model.discriminator(d_in, g["is_training_in"], **kw)
    real_logits, fake_logits = logits[:B], logits[B:]  # [B], [B]
    g["real_logits"] = real_logits
    ce = tf.nn.sigmoid_cross_entropy_with_logits
    g["d_real_loss"] = tf.reduce_mean(ce(labels=tf.fill([B], t.real_label), logits=real_logits))
    g["d_fake_loss"] = tf.reduce_mean(ce(labels=tf.zeros([B]), logits=fake_logits))
    own = 1.0 - g["history_mask_in"]  # G is judged on its own fakes only
    g["g_loss"] = tf.reduce_sum(ce(labels=tf.ones([B]), logits=fake_logits) * own) / \
        tf.maximum(tf.reduce_sum(own), 1.0)
    g["d_reg_loss"] = model.l2_regulariser(model.DISC_SCOPE, m.reg_scale)  # Lessons 24-25
    g["g_reg_loss"] = model.l2_regulariser(model.GEN_SCOPE, m.reg_scale)
    g["d_real_acc"] = tf.reduce_mean(tf.cast(real_logits > 0, tf.float32))
    g["d_fake_acc"] = tf.reduce_mean(tf.cast(fake_logits < 0, tf.float32))

    # Lesson 32: four Adam optimisers, one per minimised loss, none sharing state.
    d_vars = tf1.trainable_variables(model.DISC_SCOPE + "/")
    g_vars = tf1.trainable_variables(model.GEN_SCOPE + "/")
    updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)

    def adam(name, lr, loss, var_list, scope):
        optimiser = tf1.train.AdamOptimizer(lr, beta1=t.beta1, name=name)
        if cfg.run.mixed_precision == "fp16":
            # float16 gradients underflow: scale the loss up, the gradients back down,
            # and skip a step whose gradients overflowed (the scale then shrinks).
            optimiser = tf1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimiser, "dynamic")
        with tf.control_dependencies([u for u in updates if u.name.startswith(scope + "/")]):
            return optimiser.minimize(loss, var_list=var_list, name=name + "_op")

    d_reg, g_reg = g["d_reg_loss"], g["g_reg_loss"]
    g["d_real_op"] = adam("adam_d_real", t.lr_disc, g["d_real_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["d_fake_op"] = adam("adam_d_fake", t.lr_disc, g["d_fake_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["d_total_op"] = adam("adam_d_total", t.lr_disc,
                           g["d_real_loss"] + g["d_fake_loss"] + d_reg, d_vars, model.DISC_SCOPE)
    g["g_op"] = adam("adam_g", t.lr_gen, g["g_loss"] + g_reg, g_vars, model.GEN_SCOPE)
    g["samples_u8_out"] = g["fakes_u8_out"]  # what sample grids and evaluations show
    if t.g_average:
        build_average(g, cfg, kw)

    g["global_step"] = tf1.get_variable("global_step", [], tf.int64,
                                        tf1.zeros_initializer(), trainable=False)
    g["set_step_op"] = g["global_step"].assign(g["step_in"])
    g["init_op"] = tf1.global_variables_initializer()
    g["saver"] = tf1.train.Saver(max_to_keep=cfg.train.keep_checkpoints)
    g["best_saver"] = tf1.train.Saver(max_to_keep=1)  # best-N: outside the retention of model-N
    return g


CALIBRATION_BATCHES = 4  # batches of fixed latents that set the averaged G's batch-norm statistics


def build_average(g, cfg, kw):
    """An exponential moving average of G's weights (train.g_average; Karras et al. 2018,
    Yazici et al. 2019): a second, untrained copy of G that samples and evaluations show.

    g["g_average_op"] moves it towards G's weights after each step; its decay ramps up
    from 0 (count / (count + 10), like tf.train.ExponentialMovingAverage's num_updates),
    so the first update copies G. Batch-norm statistics are not averaged: G's moving
    averages belong to G's weights, not to the averaged ones. Before the averaged copy
    is shown or saved, g["refresh_average"](sess) runs it in training mode over
    CALIBRATION_BATCHES batches of fixed latents and sets its statistics to their mean.
    """
    t, m = cfg.train, cfg.model
    B = t.batch_size

    def untrained(getter, *args, **kwargs):
        kwargs["trainable"] = False  # no optimiser, regulariser or count sees the copy
        return getter(*args, **kwargs)

    momentum_in = tf1.placeholder_with_default(m.bn_momentum, [], "average_momentum_in")
    with tf1.variable_scope(tf1.get_variable_scope(), custom_getter=untrained):
        averaged = model.generator(g["z_in"], g["is_training_in"], scope=model.AVERAGE_SCOPE,
                                   **{**kw, "bn_momentum": momentum_in})  # [B, S, S, C]
        count = tf1.get_variable(model.AVERAGE_SCOPE + "/updates", [], tf.float32,
                                 tf1.zeros_initializer())
    copies = {v.op.name.split("/", 1)[1]: v for v in tf1.global_variables(model.AVERAGE_SCOPE + "/")}
    pairs = [(copies[v.op.name.split("/", 1)[1]], v)
             for v in tf1.trainable_variables(model.GEN_SCOPE + "/")]
    decay = tf.minimum(t.g_average, count / (count + 10.0))
    with tf.control_dependencies([a.assign(decay * a + (1.0 - decay) * w) for a, w in pairs]):
        g["g_average_op"] = count.assign_add(1.0)
    g["samples_u8_out"] = to_u8_op(averaged)

    statistics = [u for u in tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
                  if u.name.startswith(model.AVERAGE_SCOPE + "/")]
    latents = sample_latents(np.random.default_rng([t.seed, 0xCA1B]),
                             (CALIBRATION_BATCHES, B, m.z_dim), m.z_dist)

    def refresh_average(sess):
        # momentum i / (i + 1): after the last batch, the mean of every batch's statistics
        for i, z in enumerate(latents):
            sess.run(statistics, {g["z_in"]: z, g["is_training_in"]: True,
                                  momentum_in: i / (i + 1)})
    g["refresh_average"] = refresh_average


def refresh_samples(sess, g):
    """Before samples are shown or saved: the averaged G's statistics brought up to date."""
    if "refresh_average" in g:
        g["refresh_average"](sess)


# ---------------------------------------------------------------- one step

def run_step(sess, g, cfg, batches, cache, step, force_path=None, augmenting=True):
    """Step `step` (1-based): draw its batch, train on it, feed the history cache.

    `augmenting`: whether train.d_augment is on at this step (train.d_augment_from).
    """
    t, m = cfg.train, cfg.model
    rng = np.random.default_rng([t.seed, step])  # every draw of a step, by seed and step
    reals = data.random_crops(batches.get(step - 1), m.image_size, rng)  # data.load_size
    if cfg.data.augment:
        reals = data.augment(reals, rng)
    z = sample_latents(rng, (t.batch_size, m.z_dim), m.z_dist)
    n_history = history_count(t.batch_size, t.history_fraction)
    history_used = use_history(rng.random(), t.history_prob, len(cache), n_history)
    history = cache.sample(n_history) if history_used else None
    names = config.augmentations(cfg) if augmenting else ()
    augment = d_augment.draw(rng, 2 * t.batch_size, m.image_size, names) if names else None
    record, fakes = train_step(sess, g, reals, z, history, history_used, force_path, augment)
    cache.add(to_u8(fakes[0]))  # Lesson 34: from the generated batch, stored as uint8
    return record


def train_step(sess, g, reals_u8, z, history_u8, history_used, force_path=None, augment=None):
    """One training step on one batch; returns (record to log, the generated batch).

    `force_path` is for the benchmark, which times paths A and B apart; `augment`
    (d_augment.draw) is what every image D sees this step goes through.
    """
    augment_feed = {g["augment_in"][k]: v for k, v in (augment or {}).items()}
    feed = {g["reals_u8_in"]: reals_u8, g["z_in"]: z, **augment_feed}
    if history_used:
        mask = np.zeros(len(z), np.float32)
        mask[:len(history_u8)] = 1.0
        padded = np.zeros_like(reals_u8)
        padded[:len(history_u8)] = history_u8
        feed[g["history_u8_in"]], feed[g["history_mask_in"]] = padded, mask

    # Measure D on the batch it is about to learn from (Lesson 39). The fakes
    # are kept and fed back to the D updates, which need no second G pass.
    fakes, real_acc, fake_acc = sess.run(
        [g["fakes_out"], g["d_real_acc"], g["d_fake_acc"]], feed)
    path = force_path or choose_path(real_acc, fake_acc)
    d_feed = {**feed, g["fakes_in"]: fakes}

    # Update D: maximize log(D(x)) + log(1 - D(G(z))), its halves apart on path A.
    if path == "A":
        sess.run(g["d_real_op"], d_feed)
        sess.run(g["d_fake_op"], d_feed)
    else:
        sess.run(g["d_total_op"], d_feed)

    # Update G twice: maximize log(D(G(z))) on its own fakes only.
    g_feed = {g["reals_u8_in"]: reals_u8, g["z_in"]: z, **augment_feed}
    sess.run(g["g_op"], g_feed)
    sess.run(g["g_op"], g_feed)
    if "g_average_op" in g:  # the averaged copy follows; training never reads it
        sess.run(g["g_average_op"])

    # Lesson 15: losses in a run of their own, after the optimisers.
    losses = sess.run({k: g[k] for k in LOSS_KEYS}, feed)
    record = {k: float(v) for k, v in losses.items()}
    record.update(path=path, d_real_acc=float(real_acc), d_fake_acc=float(fake_acc),
                  history_used=bool(history_used))
    return record, fakes
