"""Sample-quality metrics on uint8 NHWC image sets [N, S, S, 3]: pure functions, no file I/O.

Each metric answers one question a loss curve cannot:
  swd                   do local textures at each scale match the reals'? (lower = closer)
  ms_ssim_mean          how alike are two images of one set? (higher = less diverse; collapse)
  nearest_neighbour_l2  how far is each image from its nearest training tile? (copies ~ 0)
  color_stats           are the colours shifted? (SWD normalises colour away)
  c2st                  can a small CNN tell the sets apart? (0.5 = no)
`evaluate_sets` runs them with a real-vs-real baseline of the same set size.
"""
import time

import numpy as np

import device  # before TensorFlow: it holds back TensorFlow's benign start-up notices
import tensorflow as tf

tf1 = tf.compat.v1

# Sliced Wasserstein distance, Karras et al. 2018, "Progressive Growing of GANs", appendix D.
SWD_KERNEL = np.array([1, 4, 6, 4, 1], np.float32) / 16  # binomial 5-tap, applied separably
SWD_MIN_SIZE = 16           # coarsest pyramid level, pixels
SWD_PATCH = 7               # descriptor side, pixels (7x7x3 values)
SWD_PATCHES_PER_IMAGE = 128
SWD_REPEATS = 4
SWD_DIRS_PER_REPEAT = 128

# MS-SSIM, Wang, Simoncelli and Bovik 2003; used for GAN diversity by Odena et al. 2017 (AC-GAN).
MS_SSIM_POWERS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # per scale, finest first
MS_SSIM_FILTER = 7          # Gaussian window side; the coarsest scale must be at least this
MS_SSIM_SIGMA = 1.5


def _check_images(images, name):
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name}: expected uint8 images [N, H, W, C], got {images.dtype} "
                         f"{list(images.shape)}")


# ---------------------------------------------------------------- sliced Wasserstein distance

def _blur(x):
    """Separable 5x5 binomial blur of [N, H, W, C] float32, mirrored edges."""
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        padded = np.pad(x, pad, mode="reflect")
        size = x.shape[axis]
        out = np.zeros_like(x)
        for tap, weight in enumerate(SWD_KERNEL):
            index = [slice(None)] * 4
            index[axis] = slice(tap, tap + size)
            out += weight * padded[tuple(index)]
        x = out
    return x


def laplacian_pyramid(images_u8, min_size=SWD_MIN_SIZE):
    """[(side, level float32 [N, s, s, C])], finest first; the last level is the low-pass rest.

    Halves while the next level is still at least `min_size` wide: 64 -> 64/32/16,
    32 -> 32/16, and a 16x16 (or smaller) image is a single level.
    """
    g = images_u8.astype(np.float32)
    levels = []
    while g.shape[1] // 2 >= min_size:
        down = pyr_down(g)
        levels.append((g.shape[1], g - pyr_up(down, g.shape[1:3])))
        g = down
    levels.append((g.shape[1], g))
    return levels


def pyr_down(x):
    """Blur, then keep every second row and column: [N, H, W, C] -> [N, H/2, W/2, C]."""
    return _blur(x)[:, ::2, ::2]


def pyr_up(x, size):
    """Zeros between the samples, then blur x4 (three of four samples are zero) -> [N, *size, C]."""
    up = np.zeros((len(x), 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), np.float32)
    up[:, ::2, ::2] = x
    return 4.0 * _blur(up)[:, :size[0], :size[1]]


def _descriptors(level, rng):
    """128 random 7x7xC neighbourhoods per image, [N * 128, 49 * C], normalised per channel.

    The positions depend only on the rng and the set's shape, so two sets of equal size
    are sampled at the same places and identical sets give a distance of exactly 0.
    """
    n, h, w, c = level.shape
    ys = rng.integers(0, h - SWD_PATCH + 1, (n, SWD_PATCHES_PER_IMAGE))
    xs = rng.integers(0, w - SWD_PATCH + 1, (n, SWD_PATCHES_PER_IMAGE))
    offsets = np.arange(SWD_PATCH)
    rows = ys[:, :, None, None] + offsets[None, None, :, None]  # [N, 128, 7, 1]
    cols = xs[:, :, None, None] + offsets[None, None, None, :]  # [N, 128, 1, 7]
    desc = level[np.arange(n)[:, None, None, None], rows, cols]  # [N, 128, 7, 7, C]
    pixels = desc.reshape(-1, c)  # a view: normalising it normalises desc
    pixels -= pixels.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = np.sqrt(np.einsum("ij,ij->j", pixels, pixels) / len(pixels))
    pixels /= np.maximum(std, 1e-6)  # a flat set stays finite
    return desc.reshape(n * SWD_PATCHES_PER_IMAGE, -1)


def swd_pairs(sets, pairs, seed=0):
    """SWD x 1e3 for each (i, j) in `pairs` between sets[i] and sets[j], one dict per pair.

    Every set is reduced to descriptors and projected once, on the same random
    directions, so k comparisons among m sets cost m projections, not 2k.
    """
    for i, images in enumerate(sets):
        _check_images(images, f"set {i}")
        if images.shape[1:] != sets[0].shape[1:]:
            raise ValueError(f"SWD needs images of one size; set {i} is {list(images.shape[1:])}, "
                             f"set 0 is {list(sets[0].shape[1:])}")
        if min(images.shape[1:3]) < SWD_PATCH:
            raise ValueError(f"SWD needs images of at least {SWD_PATCH}x{SWD_PATCH} pixels")
    for i, j in pairs:
        if len(sets[i]) != len(sets[j]):
            raise ValueError(f"SWD compares sets of the same number of images (its value "
                             f"depends on the set size); got {len(sets[i])} and {len(sets[j])}")
    used = sorted({k for pair in pairs for k in pair})
    pyramids = {k: laplacian_pyramid(sets[k]) for k in used}
    out = [{} for _ in pairs]
    for li, (side, _) in enumerate(pyramids[used[0]]):
        desc = {k: _descriptors(pyramids[k][li][1], np.random.default_rng([seed, li]))
                for k in used}
        dim = desc[used[0]].shape[1]
        dirs = np.random.default_rng([seed, li, 1]).standard_normal(
            (SWD_REPEATS, dim, SWD_DIRS_PER_REPEAT)).astype(np.float32)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)  # unit directions
        total = np.zeros(len(pairs))
        for r in range(SWD_REPEATS):
            # [128, M]: each row the sorted projections of all descriptors on one direction.
            proj = {k: dirs[r].T @ desc[k].T for k in used}
            for projections in proj.values():
                projections.sort(axis=1)
            for p, (i, j) in enumerate(pairs):
                total[p] += np.abs(proj[i] - proj[j]).mean()
        for p in range(len(pairs)):
            out[p][str(side)] = float(total[p] / SWD_REPEATS * 1e3)
    for d in out:
        d["avg"] = float(np.mean(list(d.values())))
    return out


def swd(a, b, seed=0):
    """Sliced Wasserstein distance x 1e3 per pyramid level and averaged: {"64":, "32":, "16":, "avg":}.

    Karras et al. 2018, appendix D. Both sets must hold the same number of images:
    the value shrinks as sets grow, so it is read against two real sets of the
    same size (evaluate_sets), never against the paper's figures for 16k images.
    """
    return swd_pairs([a, b], [(0, 1)], seed)[0]


# ---------------------------------------------------------------- MS-SSIM

def ms_ssim_scales(side):
    """(power factors, filter size): as many of the five scales as `side` allows, renormalised."""
    if side < MS_SSIM_FILTER:
        raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_FILTER}x{MS_SSIM_FILTER} pixels")
    scales = 1
    while scales < len(MS_SSIM_POWERS) and side // 2 ** scales >= MS_SSIM_FILTER:
        scales += 1
    powers = np.array(MS_SSIM_POWERS[:scales])
    return tuple(float(p) for p in powers / powers.sum()), MS_SSIM_FILTER


def _session(graph, threads):
    return tf1.Session(graph=graph, config=device.session_config(device.inference_plan(threads)))


def ms_ssim_mean(images, pairs=1000, seed=0, batch_size=500, threads=0):
    """Mean MS-SSIM over `pairs` random pairs of distinct images (i != j) of one set.

    64x64 allows four scales (64, 32, 16, 8) with a 7x7 window, 16x16 two.
    Near 1: the images look alike (mode collapse); a varied set scores lower.
    """
    _check_images(images, "images")
    if len(images) < 2:
        raise ValueError("MS-SSIM needs at least 2 images")
    powers, filter_size = ms_ssim_scales(min(images.shape[1:3]))
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(images), pairs)
    second = rng.integers(0, len(images) - 1, pairs)
    second += second >= first  # distinct from `first`, uniform over the others

    graph = tf.Graph()
    with graph.as_default():
        with tf.name_scope("Inputs"):
            a_in = tf1.placeholder(tf.uint8, [None, *images.shape[1:]], "a_in")
            b_in = tf1.placeholder(tf.uint8, [None, *images.shape[1:]], "b_in")
        ms_ssim_out = tf.image.ssim_multiscale(a_in, b_in, 255, power_factors=powers,
                                               filter_size=filter_size, filter_sigma=MS_SSIM_SIGMA)
    graph.finalize()
    with _session(graph, threads) as sess:
        values = [sess.run(ms_ssim_out, {a_in: images[first[s:s + batch_size]],
                                         b_in: images[second[s:s + batch_size]]})
                  for s in range(0, pairs, batch_size)]
    return float(np.mean(np.concatenate(values)))


# ---------------------------------------------------------------- nearest neighbours

def _dihedral(images):
    """The 8 turns and flips of [N, H, W, C]: [8, N, H, W, C] (train.py augments with these)."""
    turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return np.stack(turns + [t[:, :, ::-1] for t in turns])


def nearest_neighbour_l2(queries, refs, dihedral=False, chunk=128):
    """Per query, the L2 distance to its nearest ref, pixels scaled to 0..1: float32 [Nq].

    Candidates come from ||q||^2 + ||r||^2 - 2 q.r in float32 chunks; the winner's
    distance is then recomputed from the difference, so an exact copy gives 0 and
    not float32 cancellation noise. dihedral=True also matches turned and flipped
    copies, which a generator trained with augmentation can produce.
    """
    _check_images(queries, "queries")
    _check_images(refs, "refs")
    if queries.shape[1:] != refs.shape[1:]:
        raise ValueError(f"queries {list(queries.shape[1:])} and refs {list(refs.shape[1:])} "
                         f"differ in size")
    if dihedral and queries.shape[1] != queries.shape[2]:
        raise ValueError("dihedral matching needs square images")
    flat_refs = refs.reshape(len(refs), -1)
    centre = flat_refs.mean(axis=0, dtype=np.float64).astype(np.float32)  # smaller norms, less cancellation
    r = np.empty(flat_refs.shape, np.float32)  # [Nr, D], centred, pixels 0..1
    for start in range(0, len(r), chunk):
        r[start:start + chunk] = (flat_refs[start:start + chunk] - centre) / 255.0
    r_sq = np.einsum("ij,ij->i", r, r)
    out = np.empty(len(queries), np.float32)
    for start in range(0, len(queries), chunk):
        batch = queries[start:start + chunk]
        views = _dihedral(batch) if dihedral else batch[None]  # [V, B, H, W, C]
        v, b = views.shape[:2]
        q = (views.reshape(v * b, -1) - centre) / 255.0  # [V*B, D] float32
        d_sq = np.einsum("ij,ij->i", q, q)[:, None] + r_sq[None, :] - 2.0 * (q @ r.T)
        d_sq = d_sq.reshape(v, b, len(r)).transpose(1, 0, 2).reshape(b, v * len(r))
        best = np.argmin(d_sq, axis=1)  # [B] over (view, ref)
        view, ref = np.divmod(best, len(r))
        diff = q.reshape(v, b, -1)[view, np.arange(b)] - r[ref]
        out[start:start + b] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def prob_closer(fake_nn, holdout_nn):
    """P(a fake's distance < a held-out tile's distance), ties counted half.

    The whole-set form of the data-copying test of Meehan, Chaudhuri and
    Dasgupta 2020 (a Mann-Whitney U statistic scaled to 0..1): 0.5 when fakes
    are as far from the training tiles as unseen real tiles are, near 1 when
    fakes copy training tiles, below 0.5 when they lie further from them than real tiles do.
    """
    ref = np.sort(holdout_nn)
    below = np.searchsorted(ref, fake_nn, side="left")
    above = len(ref) - np.searchsorted(ref, fake_nn, side="right")
    return float(np.mean(above + 0.5 * (len(ref) - above - below)) / len(ref))


# ---------------------------------------------------------------- colour

def _histograms(images):
    """Normalised 256-bin histograms per channel: [C, 256]."""
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                       for c in range(images.shape[-1])])
    return counts / counts.sum(axis=1, keepdims=True)


def color_stats(real, fake):
    """Per-channel (R, G, B) mean and std of both sets, and two histogram distances per channel.

    w1: 1-D Wasserstein distance between the 256-bin histograms, in grey levels
        (a uniform shift of 5 levels gives 5); hist_l1: sum |p - q| of the
        normalised histograms, 0 (same) .. 2 (disjoint).
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    out = {}
    levels = np.arange(256)
    hists = []
    for name, images in (("real", real), ("fake", fake)):
        hist = _histograms(images)  # mean and std follow exactly from the histogram
        mean = hist @ levels
        std = np.sqrt(np.maximum(hist @ levels ** 2 - mean ** 2, 0.0))
        out[f"{name}_mean"] = [float(v) for v in mean]
        out[f"{name}_std"] = [float(v) for v in std]
        hists.append(hist)
    cdf_gap = np.cumsum(hists[0], axis=1) - np.cumsum(hists[1], axis=1)
    out["w1"] = [float(v) for v in np.abs(cdf_gap).sum(axis=1)]
    out["hist_l1"] = [float(v) for v in np.abs(hists[0] - hists[1]).sum(axis=1)]
    return out


# ---------------------------------------------------------------- classifier two-sample test

def _area_downsample(images_u8, side):
    n, h, w, c = images_u8.shape
    if h <= side or h % side or w != h:
        return images_u8.astype(np.float32)
    f = h // side
    return images_u8.reshape(n, side, f, side, f, c).mean(axis=(2, 4), dtype=np.float32)


def _c2st_logits(x_in, filters=(8, 16, 32, 64)):
    """Strided 3x3 convs with leaky ReLU, then one logit per image: [N, S, S, 3] -> [N]."""
    x = x_in
    for i, f in enumerate(filters):
        with tf1.variable_scope(f"conv{i}"):
            w = tf1.get_variable("w", [3, 3, int(x.shape[-1]), f], tf.float32,
                                 tf1.glorot_uniform_initializer())
            b = tf1.get_variable("b", [f], tf.float32, tf1.zeros_initializer())
            x = tf.nn.bias_add(tf.nn.conv2d(x, w, [1, 2, 2, 1], "SAME"), b)
            x = tf.maximum(x, 0.2 * x)  # leaky ReLU; tf.nn.leaky_relu trips a grappler fusion warning
    x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])  # [N, s/16 * s/16 * 64]
    with tf1.variable_scope("logit"):
        w = tf1.get_variable("w", [int(x.shape[-1]), 1], tf.float32, tf1.glorot_uniform_initializer())
        b = tf1.get_variable("b", [1], tf.float32, tf1.zeros_initializer())
    return tf.squeeze(tf.matmul(x, w) + b, 1)


def c2st(real, fake, seed=0, steps=300, batch_size=64, side=64, lr=1e-3, threads=0):
    """Classifier two-sample test accuracy (Lopez-Paz and Oquab 2017): 0.5 = indistinguishable.

    A small CNN learns real (1) vs fake (0) on half of each set and is scored on
    the other half. Images larger than `side` are area-averaged to it first
    (speed); at 64 the CNN sees the tiles' finest detail, where blur shows.
    The same seed gives the same number.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real {list(real.shape[1:])} and fake {list(fake.shape[1:])} differ in size")
    n = min(len(real), len(fake))
    if n < 4:
        raise ValueError("C2ST needs at least 4 images per set")
    rng = np.random.default_rng(seed)
    x = np.concatenate([real[rng.permutation(len(real))[:n]], fake[rng.permutation(len(fake))[:n]]])
    x = _area_downsample(x, side) / 127.5 - 1.0  # [2n, s, s, C] in -1..1
    y = np.concatenate([np.ones(n, np.float32), np.zeros(n, np.float32)])
    half = n // 2
    train_idx = np.concatenate([np.arange(half), n + np.arange(half)])
    test_idx = np.concatenate([np.arange(half, n), n + np.arange(half, n)])

    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        with tf.name_scope("Inputs"):
            x_in = tf1.placeholder(tf.float32, [None, *x.shape[1:]], "x_in")
            y_in = tf1.placeholder(tf.float32, [None], "y_in")
        logits_out = _c2st_logits(x_in)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_in, logits=logits_out))
        train_op = tf1.train.AdamOptimizer(lr).minimize(loss)
        init_op = tf1.global_variables_initializer()
    graph.finalize()
    with _session(graph, threads) as sess:
        sess.run(init_op)
        # Update C: minimise the cross-entropy of real-vs-fake on balanced batches of the train half.
        for _ in range(steps):
            pick = np.concatenate([rng.choice(half, batch_size // 2),
                                   half + rng.choice(half, batch_size // 2)])
            sess.run(train_op, {x_in: x[train_idx[pick]], y_in: y[train_idx[pick]]})
        logits = np.concatenate([sess.run(logits_out, {x_in: x[test_idx[s:s + 512]]})
                                 for s in range(0, len(test_idx), 512)])
    return float(np.mean((logits > 0) == (y[test_idx] > 0.5)))


# ---------------------------------------------------------------- all together

def _mean_dicts(dicts):
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def evaluate_sets(real, fake, train=None, holdout=None, seed=0, quick=False,
                  ms_ssim_pairs=1000, c2st_steps=300, dihedral=True, threads=0):
    """Every metric on uint8 sets of one image size; returns a JSON-ready dict.

    Both sets are cut to the smaller one's size m (a seeded random subset) and
    each is split into random halves A|B (reals) and F1|F2 (fakes) of h = m // 2:
      swd_x1e3                mean of SWD(F1, A) and SWD(F2, B)
      swd_real_baseline_x1e3  SWD(A, B)
    so the fake figure and the baseline compare sets of the same size h (SWD
    shrinks as sets grow). Colour histogram distances are paired the same way.
    quick=True: SWD and MS-SSIM only (about 512 images, for use during training).
    `train` (and `holdout`) enable the nearest-neighbour memorisation check.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real images {list(real.shape[1:])} and fakes {list(fake.shape[1:])} "
                         f"differ in size; resize the reals to the fakes' size first")
    m = min(len(real), len(fake))
    if m < 4:
        raise ValueError(f"need at least 4 images per set, got {len(real)} real and {len(fake)} fake")
    rng = np.random.default_rng([seed, 0xE7A1])
    real = real[rng.permutation(len(real))[:m]]
    fake = fake[rng.permutation(len(fake))[:m]]
    h = m // 2
    a, b, f1, f2 = real[:h], real[h:2 * h], fake[:h], fake[h:2 * h]
    results = {"n": m, "seed": seed, "swd_set_size": h}
    timings = {}

    started = time.time()
    baseline, fake_a, fake_b = swd_pairs([a, b, f1, f2], [(0, 1), (2, 0), (3, 1)], seed)
    results["swd_x1e3"] = _mean_dicts([fake_a, fake_b])
    results["swd_real_baseline_x1e3"] = baseline
    timings["swd"] = time.time() - started

    started = time.time()
    results["ms_ssim_fake"] = ms_ssim_mean(fake, ms_ssim_pairs, seed, threads=threads)
    results["ms_ssim_real"] = ms_ssim_mean(real, ms_ssim_pairs, seed, threads=threads)
    timings["ms_ssim"] = time.time() - started
    if quick:
        results["timings"] = timings
        return results

    started = time.time()
    colour = color_stats(real, fake)
    paired = [color_stats(a, f1), color_stats(b, f2)]
    real_pair = color_stats(a, b)
    for key in ("w1", "hist_l1"):
        colour[key] = [float(v) for v in np.mean([p[key] for p in paired], axis=0)]
        colour[f"{key}_real_baseline"] = real_pair[key]
    results["color_stats"] = colour
    timings["color_stats"] = time.time() - started

    if train is not None:
        started = time.time()
        fake_nn = nearest_neighbour_l2(fake, train, dihedral)
        results["nn_fake_to_train"] = float(np.median(fake_nn))
        if holdout is not None:
            holdout_nn = nearest_neighbour_l2(holdout, train, dihedral)
            results["nn_holdout_to_train"] = float(np.median(holdout_nn))
            results["nn_fake_closer_than_holdout"] = prob_closer(fake_nn, holdout_nn)
        timings["nn"] = time.time() - started

    started = time.time()
    results["c2st_acc"] = c2st(real, fake, seed, steps=c2st_steps, threads=threads)
    timings["c2st"] = time.time() - started
    results["timings"] = timings
    return results
