"""The generator's sampling: latents, pixels, any number of images, a checkpoint's generator.

Shared by train.py (sample grids, evaluations), generate.py and evaluate.py.
One home for the rounding rule that turns the generator's -1..+1 output into
0..255 pixels, in NumPy and in the graph, so a cached history image, a sample
PNG and a generated tile of the same fake hold the same pixels.
"""
import numpy as np
import tensorflow as tf

import device
import model
import runs

tf1 = tf.compat.v1


def sample_latents(rng, shape, dist):
    """Latents of `shape` from "uniform" (-1..1) or "normal", float32."""
    if dist == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def to_u8(image):
    """-1..1 float image -> uint8 0..255, the range the real path is fed with (Lesson 35)."""
    return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_u8_op(images):
    """The graph's to_u8: the same pixels as `to_u8`."""
    return tf.cast(tf.round(tf.clip_by_value((images + 1.0) * 127.5, 0.0, 255.0)), tf.uint8)


def generate_u8(sess, z_in, images_out, z, feed=None, progress=None):
    """uint8 images for any number of latents, run `z_in`'s static batch at a time.

    The last batch is padded with zeros and cut back; in inference mode the
    padding cannot change the other images. `feed` adds to each run.
    """
    batch = int(z_in.shape[0])
    out = np.empty((len(z), *images_out.shape[1:]), np.uint8)
    for start in range(0, len(z), batch):
        part = z[start:start + batch]
        padded = np.zeros((batch, z.shape[1]), np.float32)
        padded[:len(part)] = part
        out[start:start + len(part)] = sess.run(images_out, {**(feed or {}), z_in: padded})[:len(part)]
        if progress:
            progress(start + len(part), len(z))
    return out


# ---------------------------------------------------------------- a checkpoint's generator

def weights_scope(cfg, weights=None, run_dir="the run"):
    """The generator a run shows: its averaged weights when train.g_average was on, unless
    `weights` ("averaged" or "trained", None = the run's choice) asks for the other copy."""
    if weights == "averaged" and not cfg.train.g_average:
        raise runs.RunError(f"--weights averaged: {run_dir} kept no averaged weights "
                            f"(train.g_average was 0); leave --weights out or give trained")
    averaged = weights == "averaged" or (weights is None and cfg.train.g_average)
    return model.AVERAGE_SCOPE if averaged else model.GEN_SCOPE


def describe_weights(cfg, scope):
    return (f"averaged weights (train.g_average {cfg.train.g_average})"
            if scope == model.AVERAGE_SCOPE else "trained weights")


def inference_images(z_in, m, scope=model.GEN_SCOPE, plan=None):
    """uint8 images [N, S, S, 3] of the generator in inference mode, for latents z_in;
    `plan` (device.plan) chooses the device's layer forms, a CPU's by default."""
    kw = {**vars(m), **(plan or device.plan("cpu")).model_kwargs()}
    fakes = model.generator(z_in, tf.constant(False), scope=scope, **kw)  # [N, S, S, 3]
    return to_u8_op(fakes)


def generator_variables(scope):
    """The variables of one copy of the generator (the averaged copy's update count aside)."""
    return [v for v in tf1.global_variables(scope + "/") if v.op.name != scope + "/updates"]


def architecture_differences(graph, prefix, scope=model.GEN_SCOPE):
    """How the generator variables of `graph` differ from the checkpoint's, as text lines."""
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    # Optimizer slots ("<variable>/adam_g") belong to their variable, not to the net.
    saved = {name: shape for name, shape in shapes.items()
             if name.startswith(scope + "/") and name.rsplit("/", 1)[0] not in shapes
             and name != scope + "/updates"}
    with graph.as_default():
        built = {v.op.name: v.shape.as_list() for v in generator_variables(scope)}
    return runs.variable_differences(saved, built)


def restore_generator(sess, graph, prefix, run_dir, scope=model.GEN_SCOPE):
    """Restore only the generator's variables; a checkpoint of another net is a RunError."""
    differences = architecture_differences(graph, prefix, scope)
    if differences:
        more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
        raise runs.RunError(f"checkpoint '{prefix}' was not trained with the generator that "
                            f"{run_dir}/config.json describes: {'; '.join(differences[:2])}{more}; "
                            f"use the checkpoint with the config.json of the run that wrote it")
    with graph.as_default():  # the v1 Saver looks up the default graph
        saver = tf1.train.Saver(generator_variables(scope))
        try:
            saver.restore(sess, prefix)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            raise runs.RunError(f"checkpoint '{prefix}' does not match the generator of "
                                f"{run_dir}/config.json: {str(e).splitlines()[0]}") from None


class Generator:
    """The generator of a checkpoint, in inference mode (moving-average batch norm).

    The architecture comes from the run's config.json; only the generator's
    variables are restored: its averaged copy when the run kept one (train.g_average), unless
    `weights` asks for the other (weights_scope). `generate(z)` takes any number of latents
    and returns uint8 images [N, S, S, 3], computed `batch_size` at a time.
    """

    def __init__(self, checkpoint, batch_size=64, threads=0, weights=None):
        self.prefix, self.run_dir = runs.resolve_checkpoint(checkpoint)
        self.cfg = runs.read_run_config(self.run_dir)
        self.step = runs.checkpoint_step(self.prefix)
        m = self.cfg.model
        self.z_dim, self.z_dist, self.batch_size = m.z_dim, m.z_dist, batch_size
        self.scope = weights_scope(self.cfg, weights, self.run_dir)
        self.weights = describe_weights(self.cfg, self.scope)
        plan = device.inference_plan(threads)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.z_in = tf1.placeholder(tf.float32, [batch_size, m.z_dim], "z_in")
            self.fakes_u8_out = inference_images(self.z_in, m, self.scope, plan)
        self.sess = tf1.Session(graph=self.graph, config=device.session_config(plan))
        try:
            restore_generator(self.sess, self.graph, self.prefix, self.run_dir, self.scope)
        except runs.RunError:
            self.sess.close()
            raise
        self.graph.finalize()

    def latents(self, n, seed):
        return sample_latents(np.random.default_rng(seed), (n, self.z_dim), self.z_dist)

    def generate(self, z, progress=None):
        return generate_u8(self.sess, self.z_in, self.fakes_u8_out, z, progress=progress)

    def close(self):
        self.sess.close()
