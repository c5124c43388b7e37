"""The same DCGAN training step in PyTorch, timed on this machine: an optional comparison.

    python tools/bench_torch.py [--config configs/article.json] [--set section.key=value]... [--steps 5] [--json OUT]

bench.py tells how close the TensorFlow graph comes to the machine's float32
matmul speed. This script says whether another framework gets closer with
the same arithmetic: it builds model.py's nets for the config in PyTorch
(same layers, filters, kernels, biases, batch-norm placement and parameter
counts) and times gan.train_step's algorithm with four Adam optimisers.
PyTorch's CPU convolutions are oneDNN too, so a gap between the two tables is
framework overhead and kernel choice, not a better library. FLOPs are counted
from layer shapes as bench.py counts them and timed with the same harness and
yardstick (timing.py), so the two tables read side by side.

Known differences, none of which changes the arithmetic: TensorFlow's "SAME"
padding puts the odd pixel of padding at the bottom/right, PyTorch's strided
layers pad symmetrically (the output grid is shifted by one pixel, shapes are
equal; stride-1 layers with an even kernel are padded as TensorFlow does);
history replay (a masked blend of a few cached tiles) is left out; PyTorch
moves batch-norm averages on every training-mode forward, TensorFlow only in
the update runs.

PyTorch's OpenMP threads spin while they wait for each other: on a machine
whose cores are busy with other work a step runs many times slower with 2
threads than with 1 (docs/performance.md). Time on an idle machine, or set
OMP_WAIT_POLICY=passive.

PyTorch is not a project requirement; install it only for this comparison:
    pip install torch==2.13.0
"""
import argparse
import json
import os
import sys

# A developer tool beside the project: its libraries are one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config as config_lib  # noqa: E402
import timing  # noqa: E402
from cli import run_main  # noqa: E402

INSTALL = "pip install torch==2.13.0"
# channels_last ran a path-B step of cpu.json faster than NCHW (docs/performance.md),
# so the nets and the reals use it.
CHANNELS_LAST = True


class TorchMissing(RuntimeError):
    """PyTorch is not installed; the message says how to install it."""


def import_torch():
    try:
        import torch
    except ImportError:
        raise TorchMissing(f"bench_torch.py needs PyTorch, which the project itself does not: "
                           f"{INSTALL} (a CPU build)") from None
    return torch


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark a training step of a satgan config "
                                            "in PyTorch, against bench.py's yardstick.")
    p.add_argument("--config", default="configs/article.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after 2 warm-up)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the two nets

def _padding(kernel, stride):
    """(padding, output_padding) that give TF's "SAME" sizes: size / stride, size * stride."""
    return (kernel - 1) // 2, kernel % 2 if stride == 2 else 0


def _conv(c_in, c_out, kernel, stride, transposed=False):
    from torch import nn
    if kernel % 2 == 0 and stride == 1:
        # No same-size padding in PyTorch for an even kernel: pad as TF's SAME does, the
        # extra pixel at the bottom/right; the transposed layer drops its extra output row.
        low, high = (kernel - 1) // 2, kernel // 2
        if transposed:
            layer = nn.ConvTranspose2d(c_in, c_out, kernel, 1, low)  # size + 1
            return nn.Sequential(_init(layer), nn.ZeroPad2d((0, low - high, 0, low - high)))
        return nn.Sequential(nn.ZeroPad2d((low, high, low, high)),
                             _init(nn.Conv2d(c_in, c_out, kernel, 1, 0)))
    pad, out_pad = _padding(kernel, stride)
    if transposed:
        layer = nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, output_padding=out_pad)
    else:
        layer = nn.Conv2d(c_in, c_out, kernel, stride, pad)
    return _init(layer)


def _init(layer):
    """Xavier-uniform weights and zero biases, like model._weight and model._bias."""
    from torch import nn
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def generator(m):
    """z [N, z_dim] -> images [N, C, S, S] in -1..+1, layer for layer model.generator."""
    from torch import nn
    levels = m.image_size.bit_length() - 3
    act = lambda: nn.LeakyReLU(m.leaky_slope) if m.gen_leaky else nn.ReLU()
    bn = lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=1 - m.bn_momentum)
    F = m.gen_filters
    layers = [_init(nn.Linear(m.z_dim, 4 * 4 * F, bias=False)), nn.Unflatten(1, (F, 4, 4)), bn(F), act()]
    widths = [F // 2 ** i for i in range(1, levels + 1)]  # after each 2x upsampling
    widths += [widths[-1]] * m.extra_layers               # stride-1 layers at full resolution
    widths[-1] = m.channels
    c_in = F
    for i, c_out in enumerate(widths):
        layers.append(_conv(c_in, c_out, m.kernel, 2 if i < levels else 1, transposed=True))
        layers += [bn(c_out), act()] if i < len(widths) - 1 else [nn.Tanh()]
        c_in = c_out
    return nn.Sequential(*layers)


def discriminator(m):
    """Images [N, C, S, S] -> logits [N], layer for layer model.discriminator.

    `extra_layers` stride-1 convs at full resolution, then strided convs
    doubling up to disc_filters at 4x4; leaky ReLU, no batch norm on the first.
    """
    from torch import nn
    levels = m.image_size.bit_length() - 3
    widths = [m.disc_filters // 2 ** levels] * m.extra_layers
    widths += [m.disc_filters // 2 ** (i - 1) for i in range(levels, 0, -1)]
    layers, c_in = [], m.channels
    for i, c_out in enumerate(widths):
        layers.append(_conv(c_in, c_out, m.kernel, 1 if i < m.extra_layers else 2))
        if i > 0:
            layers.append(nn.BatchNorm2d(c_out, eps=1e-5, momentum=1 - m.bn_momentum))
        layers.append(nn.LeakyReLU(m.leaky_slope))
        c_in = c_out
    layers += [nn.Flatten(), _init(nn.Linear(4 * 4 * m.disc_filters, 1)), nn.Flatten(0)]
    return nn.Sequential(*layers)


def param_counts(cfg):
    """(generator, discriminator) trainable parameters; batch-norm averages are buffers."""
    return tuple(sum(p.numel() for p in net(cfg.model).parameters())
                 for net in (generator, discriminator))


def forward_flops(net, x):
    """(forward FLOPs per image, FLOPs of the first layer), counted as timing.net_flops does.

    A convolution costs 2 * output pixels * its weights, a transposed one
    2 * input pixels * its weights, a dense layer 2 * its weights; `x` is one input.
    """
    import torch
    from torch import nn
    flops = []

    def count(layer, inputs, output):
        if isinstance(layer, nn.ConvTranspose2d):
            pixels = inputs[0][0, 0].numel()
        elif isinstance(layer, nn.Conv2d):
            pixels = output[0, 0].numel()
        else:
            pixels = 1
        flops.append(2 * pixels * layer.weight.numel())

    hooks = [layer.register_forward_hook(count) for layer in net.modules()
             if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    was_training = net.training
    with torch.no_grad():
        net.eval()(x)
    net.train(was_training)
    for hook in hooks:
        hook.remove()
    return sum(flops), flops[0]


# ---------------------------------------------------------------- one step

def bce(logits, label):
    """Mean sigmoid cross-entropy against a constant label, tf.nn.sigmoid_cross_entropy_with_logits."""
    import torch
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, label))


class Step:
    """The nets, their four Adam optimisers and one training step, as gan.train_step."""

    def __init__(self, cfg):
        import torch
        from torch import nn
        m, t = cfg.model, cfg.train
        self.torch, self.reg_scale = torch, m.reg_scale
        self.memory_format = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
        self.gen = generator(m).to(memory_format=self.memory_format)
        self.disc = discriminator(m).to(memory_format=self.memory_format)
        weighted = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
        self.weights = {net: [layer.weight for layer in net.modules() if isinstance(layer, weighted)]
                        for net in (self.gen, self.disc)}
        adam = lambda net, lr: torch.optim.Adam(net.parameters(), lr, betas=(t.beta1, 0.999))
        # Lesson 32: one optimiser per minimised loss, none sharing state.
        self.adam_d_real, self.adam_d_fake = adam(self.disc, t.lr_disc), adam(self.disc, t.lr_disc)
        self.adam_d_total, self.adam_g = adam(self.disc, t.lr_disc), adam(self.gen, t.lr_gen)

    def reg_loss(self, net):
        """reg_scale * sum(w^2) / 2 over the weights, not biases (model.l2_regulariser)."""
        return self.reg_scale * sum((w * w).sum() for w in self.weights[net]) / 2

    def minimise(self, optimiser, loss, net):
        # Gradients of this net's parameters only: G's update needs D's input
        # gradients, never its weight gradients (as TF's minimize(var_list=...)).
        optimiser.zero_grad(set_to_none=True)
        loss.backward(inputs=list(net.parameters()))
        optimiser.step()

    def d_logits(self, reals, fakes):
        """(real half, fake half) of ONE D call on reals and fakes together (Lesson 38)."""
        logits = self.disc(self.torch.cat([reals, fakes]))  # [2B]
        return logits[:len(reals)], logits[len(reals):]

    def __call__(self, reals_u8, z, path):
        """One step on a uint8 batch [B, S, S, C] and latents [B, z_dim]; returns its record."""
        torch = self.torch
        # Lessons 8, 29: uint8 in, scaled to -1..1 exactly once, inside the step.
        reals = torch.from_numpy(reals_u8).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
        reals = reals.contiguous(memory_format=self.memory_format)  # [B, C, S, S]
        z = torch.from_numpy(z)

        # Measure D on the batch it is about to learn from (Lesson 39); the
        # fakes are reused by D's update, which needs no second G pass.
        with torch.no_grad():
            fakes = self.gen(z)
            real_logits, fake_logits = self.d_logits(reals, fakes)
            real_acc, fake_acc = (real_logits > 0).float().mean(), (fake_logits < 0).float().mean()

        # Update D: maximize log(D(x)) + log(1 - D(G(z))), its halves apart on path A.
        if path == "A":
            real_logits, _ = self.d_logits(reals, fakes)
            self.minimise(self.adam_d_real, bce(real_logits, 1) + self.reg_loss(self.disc), self.disc)
            _, fake_logits = self.d_logits(reals, fakes)
            self.minimise(self.adam_d_fake, bce(fake_logits, 0) + self.reg_loss(self.disc), self.disc)
        else:
            real_logits, fake_logits = self.d_logits(reals, fakes)
            d_loss = bce(real_logits, 1) + bce(fake_logits, 0) + self.reg_loss(self.disc)
            self.minimise(self.adam_d_total, d_loss, self.disc)

        # Update G twice: maximize log(D(G(z))), a fresh G and D pass each time.
        for _ in range(2):
            _, fake_logits = self.d_logits(reals, self.gen(z))
            self.minimise(self.adam_g, bce(fake_logits, 1) + self.reg_loss(self.gen), self.gen)

        # Lesson 15: losses in a pass of their own, after the updates.
        with torch.no_grad():
            real_logits, fake_logits = self.d_logits(reals, self.gen(z))
            record = {"d_real_loss": bce(real_logits, 1), "d_fake_loss": bce(fake_logits, 0),
                      "d_reg_loss": self.reg_loss(self.disc), "g_loss": bce(fake_logits, 1),
                      "g_reg_loss": self.reg_loss(self.gen),
                      "d_real_acc": real_acc, "d_fake_acc": fake_acc}
        return {k: float(v) for k, v in record.items()}


# ---------------------------------------------------------------- timing

def time_path(cfg, step, path, steps, first_step, yardstick):
    """timing.time_steps of `step` on `path`; each call draws its batch, augmentation and
    latents as gan.run_step does, so the NumPy work inside bench.py's steps is in these too."""
    import numpy as np
    import data
    from sampling import sample_latents
    m, t = cfg.model, cfg.train
    batches = timing.random_batches(cfg)

    def one(n):
        rng = np.random.default_rng([t.seed, n])
        reals = data.random_crops(batches.get(n - 1), m.image_size, rng)
        if cfg.data.augment:
            reals = data.augment(reals, rng)
        step(reals, sample_latents(rng, (t.batch_size, m.z_dim), m.z_dist), path)
    totals, _, probes = timing.time_steps(one, steps, first_step, yardstick)
    return totals, probes


def main(argv=None):
    args = parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    if cfg.model.upsample != "transposed":
        raise config_lib.ConfigError("bench_torch.py twins the transposed-convolution generator "
                                     "only; drop model.upsample")
    threads = timing.set_blas_threads(cfg)  # as bench.py
    torch = import_torch()
    torch.set_num_threads(threads)  # no inter-op pool to size: eager ops run one at a time
    torch.manual_seed(cfg.train.seed)
    m, B = cfg.model, cfg.train.batch_size

    step = Step(cfg)
    yardstick = timing.Yardstick()
    g_fwd, g_first = forward_flops(step.gen, torch.zeros(1, m.z_dim))
    d_fwd, d_first = forward_flops(step.disc, torch.zeros(1, m.channels, m.image_size, m.image_size))
    flops = timing.step_flops(g_fwd, g_first, d_fwd, d_first, B)
    result = {"config": args.config, "overrides": args.set, "threads": threads,
              "torch_version": torch.__version__, "channels_last": CHANNELS_LAST,
              "g_fwd_gflop_per_img": g_fwd / 1e9,
              "d_fwd_gflop_per_img": d_fwd / 1e9}
    for path in ("B", "A"):
        totals, probes = time_path(cfg, step, path, args.steps,
                                    first_step=1 if path == "B" else 1000, yardstick=yardstick)
        result.update(timing.path_figures(path.lower(), flops[path], totals, probes))
    result.update(yardstick.figures())
    result["imgs_per_s"] = B / result["s_per_step_b"]
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def print_table(r):
    rows = [("PyTorch", f"{r['torch_version']}, {r['threads']} threads, "
                        f"{'channels_last' if r['channels_last'] else 'NCHW'}"),
            ("NumPy float32 matmul", timing.matmul_text(r)),
            ("matmul kernel", timing.blas_text(r)),
            ("forward per image, G / D",
             f"{r['g_fwd_gflop_per_img']:.3f} / {r['d_fwd_gflop_per_img']:.3f} GFLOP")]
    for path in ("b", "a"):
        rows += [(f"path {path.upper()}: seconds per step", f"{r[f's_per_step_{path}']:.3f} s (median)"),
                 (f"path {path.upper()}: achieved", timing.achieved_text(r, path))]
    rows.append(("images per second (path B)", f"{r['imgs_per_s']:.1f}"))
    timing.print_table(f"bench_torch: {r['config']} {' '.join(r['overrides'])}", rows)


def cli(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run_main(main, argv, errors=(TorchMissing,))


if __name__ == "__main__":
    sys.exit(cli())
