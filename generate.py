"""Images from a trained checkpoint.

    python generate.py --checkpoint PREFIX_OR_RUN_DIR -n 100 --out DIR [--batch-size B] [--seed S]
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import model
import runs

tf1 = tf.compat.v1
tf.get_logger().setLevel("ERROR")


class Generator:
    """The generator of a checkpoint, in inference mode (moving-average batch norm).

    The architecture comes from the run's config.json; only the generator's
    variables are restored. `generate(z)` takes any number of latents and
    returns uint8 images [N, S, S, 3], computed `batch_size` at a time.
    """

    def __init__(self, checkpoint, batch_size=64, threads=0):
        self.prefix, self.run_dir = runs.resolve_checkpoint(checkpoint)
        self.cfg = runs.read_run_config(self.run_dir)
        self.step = runs.checkpoint_step(self.prefix)
        m = self.cfg.model
        self.z_dim, self.z_dist, self.batch_size = m.z_dim, m.z_dist, batch_size
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.z_in = tf1.placeholder(tf.float32, [batch_size, m.z_dim], "z_in")
            fakes = model.generator(self.z_in, tf.constant(False), **vars(m))
            self.fakes_u8_out = tf.image.convert_image_dtype((fakes + 1.0) / 2.0, tf.uint8,
                                                             saturate=True)
            saver = tf1.train.Saver(tf1.global_variables(model.GEN_SCOPE + "/"))
        self.graph.finalize()
        session_config = tf1.ConfigProto(intra_op_parallelism_threads=threads,
                                         inter_op_parallelism_threads=1)
        self.sess = tf1.Session(graph=self.graph, config=session_config)
        try:
            with self.graph.as_default():
                saver.restore(self.sess, self.prefix)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            raise runs.RunError(f"checkpoint '{self.prefix}' does not match the generator of "
                                f"{self.run_dir}/config.json: {str(e).splitlines()[0]}") from None

    def latents(self, n, seed):
        rng = np.random.default_rng(seed)
        if self.z_dist == "normal":
            return rng.standard_normal((n, self.z_dim)).astype(np.float32)
        return rng.uniform(-1.0, 1.0, (n, self.z_dim)).astype(np.float32)

    def generate(self, z, progress=None):
        out = np.empty((len(z), *self.fakes_u8_out.shape[1:]), np.uint8)
        for start in range(0, len(z), self.batch_size):
            chunk = z[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, self.z_dim), np.float32)
            padded[:len(chunk)] = chunk  # inference mode: padding cannot change the others
            out[start:start + len(chunk)] = self.sess.run(
                self.fakes_u8_out, {self.z_in: padded})[:len(chunk)]
            if progress:
                progress(start + len(chunk), len(z))
        return out

    def close(self):
        self.sess.close()
