"""Proof without a GPU: every op of the article graph's training step has a GPU kernel.

The Linux TensorFlow wheel registers its GPU kernels on any machine, so the
kernel registry tells, here, whether an op of the step would fall back to the
CPU on a GPU machine (a silent copy across the bus each step). The graph is
built with the GPU's plan (device.plan("gpu")): its layer forms do not depend on
the filter counts, so smaller filters give the article graph's op set in less time.
"""
import os

import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.framework import kernels

import config
import device
import gan
from conftest import ROOT

ARTICLE = os.path.join(ROOT, "configs", "article.json")
SMALLER = ["model.gen_filters=128", "model.disc_filters=128"]
# What a training step runs: the four optimisers, the measurement, the losses, the
# initialiser and the step counter. The Saver's ops (SaveV2, RestoreV2,
# MergeV2Checkpoints) are deliberately left out: they read and write files on the
# host, between steps, with CPU kernels only.
STEP_KEYS = ("d_real_op", "d_fake_op", "d_total_op", "g_op", "fakes_out", "d_real_acc",
             "d_fake_acc", *gan.LOSS_KEYS, "init_op", "set_step_op")
HOST_ONLY = ()  # ops of the step allowed to run on the CPU: none

pytestmark = pytest.mark.skipif(not device.is_cuda_build(),
                                reason="this TensorFlow registers no GPU kernels")


def step_nodes(cfg):
    """(op type, attrs) of every node a training step runs, inside cond branches too."""
    graph = tf.Graph()
    with graph.as_default():
        g = gan.build_graph(cfg, device.plan("gpu", cfg))
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    seen, todo, nodes = set(), [getattr(g[k], "op", g[k]) for k in STEP_KEYS], []
    while todo:
        op = todo.pop()
        if op.name not in seen:
            seen.add(op.name)
            nodes.append((op.type, op.node_def.attr))
            todo += [t.op for t in op.inputs] + list(op.control_inputs)
    called, pending = set(), [f for _, attrs in nodes for f in functions(attrs)]
    while pending:  # batch norm's tf.cond branches are functions of the graph's library
        name = pending.pop()
        if name not in called:
            called.add(name)
            for node in library[name].node_def:
                nodes.append((node.op, node.attr))
                pending += functions(node.attr)
    return nodes


def functions(attrs):
    return [a.func.name for a in attrs.values() if a.HasField("func")] + \
        [f.name for a in attrs.values() for f in a.list.func]


_registered = {}


def has_gpu_kernel(op, attrs):
    """Whether a GPU kernel (or one registered for every device) accepts these attrs' types."""
    if op not in _registered:
        _registered[op] = kernels.get_registered_kernels_for_op(op).kernel
    return any(k.device_type in ("GPU", "DEFAULT") and
               all(c.name not in attrs or attrs[c.name].type in c.allowed_values.list.type
                   for c in k.constraint)
               for k in _registered[op])


def as_half(attrs):
    """The attrs with a float32 "T" made float16, as the float16 rewrite does."""
    half = {name: attr_value_pb2.AttrValue() for name in attrs}
    for name in attrs:
        half[name].CopyFrom(attrs[name])
    if attrs["T"].type == tf.float32.as_datatype_enum:
        half["T"].type = tf.float16.as_datatype_enum
    return half


@pytest.mark.parametrize("precision, extra", [("none", []), ("fp16", []),
                                               ("none", ["train.d_augment=color,translation,cutout",
                                                         "model.minibatch_std=4"])])
def test_every_op_of_a_training_step_has_a_gpu_kernel(precision, extra):
    cfg = config.load(ARTICLE, SMALLER + [f"run.mixed_precision={precision}"] + extra)
    assert not device.plan("gpu", cfg).small_maps_as_matmul  # filters change no op here
    assert not has_gpu_kernel("SaveV2", {})  # the check can fail: the Saver's op is CPU-only
    nodes = step_nodes(cfg)
    assert {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "FusedBatchNormV3",
            "FusedBatchNormGradV3", "ResourceApplyAdam"} <= {op for op, _ in nodes}
    if extra:  # the augmentation's own ops are in the step
        assert {"GatherV2", "Pad"} <= {op for op, _ in nodes}
    missing = {op for op, attrs in nodes if not has_gpu_kernel(op, attrs)} - set(HOST_ONLY)
    assert not missing
    if precision == "fp16":  # whichever float32 op the rewrite turns to float16 has a kernel
        no_half = {op for op, attrs in nodes if "T" in attrs and not has_gpu_kernel(op, as_half(attrs))}
        assert not no_half
