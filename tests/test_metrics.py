"""Each metric tells good sets from bad ones: checked on the bundled Landsat tiles and their corruptions."""
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

import data
import metrics
from conftest import ROOT

N = 128  # images per set: enough for stable numbers, small enough for seconds


@pytest.fixture(scope="module")
def tiles():
    sample = os.path.join(ROOT, "data")  # the bundled Landsat-8 tiles
    train, _ = data.load_tiles(sample, "train", 64, log=lambda *a: None)
    holdout, _ = data.load_tiles(sample, "holdout", 64, log=lambda *a: None)
    return train, holdout


@pytest.fixture(scope="module")
def halves(tiles):
    """Two disjoint random sets of N training tiles: what a perfect generator would give."""
    train, _ = tiles
    pick = np.random.default_rng(0).permutation(len(train))
    return train[pick[:N]], train[pick[N:2 * N]]


def noise_like(images, seed=0):
    return np.random.default_rng(seed).integers(0, 256, images.shape, dtype=np.uint8)


def blurred(images, radius=1.0):
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                     for im in images])


def shrunk(images, side):
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BOX)) for im in images])


def colour_shifted(images, rgb=(25, 0, -25)):
    return np.clip(images.astype(np.int16) + np.array(rgb, np.int16), 0, 255).astype(np.uint8)


def collapsed(image, count, seed=0):
    """One tile repeated with a little noise: a generator stuck on one mode."""
    jitter = np.random.default_rng(seed).integers(-4, 5, (count, *image.shape))
    return np.clip(image.astype(np.int16) + jitter, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- SWD

def test_swd_of_identical_sets_is_zero_at_every_level(halves):
    a, _ = halves
    d = metrics.swd(a, a, seed=3)
    assert set(d) == {"64", "32", "16", "avg"}
    assert all(v == 0.0 for v in d.values())


def test_swd_ranks_noise_and_blur_far_above_the_real_baseline(halves):
    a, b = halves
    baseline = metrics.swd(a, b)
    noise = metrics.swd(a, noise_like(b))
    blur = metrics.swd(a, blurred(b))
    assert 0 < baseline["avg"] < 60
    assert noise["avg"] > 5 * baseline["avg"]
    # A 1-pixel Gaussian blur removes fine detail: the finest level sees it, the 16x16 rest hardly.
    assert blur["64"] > 2.5 * baseline["64"] and blur["avg"] > baseline["avg"]


def test_swd_is_seeded_and_refuses_unequal_sets(halves):
    a, b = halves[0][:32], halves[1][:32]
    assert metrics.swd(a, b, seed=1) == metrics.swd(a, b, seed=1)
    assert metrics.swd(a, b, seed=1) != metrics.swd(a, b, seed=2)
    with pytest.raises(ValueError, match="same number of images"):
        metrics.swd(a, b[:-1])


def test_swd_levels_follow_the_image_size(halves):
    a, _ = halves
    assert set(metrics.swd(shrunk(a[:16], 32), shrunk(a[16:32], 32))) == {"32", "16", "avg"}
    assert set(metrics.swd(shrunk(a[:16], 16), shrunk(a[16:32], 16))) == {"16", "avg"}


def test_laplacian_pyramid_adds_back_up_to_the_image(halves):
    a, _ = halves
    levels = [lvl for _, lvl in metrics.laplacian_pyramid(a[:4])]
    assert [lvl.shape[1] for lvl in levels] == [64, 32, 16]
    image = levels[-1]
    for lvl in reversed(levels[:-1]):
        image = lvl + metrics.pyr_up(image, lvl.shape[1:3])
    np.testing.assert_allclose(image, a[:4].astype(np.float32), atol=1e-3)


# ---------------------------------------------------------------- MS-SSIM

def test_ms_ssim_scales_fit_the_image_size():
    powers64, filter_size = metrics.ms_ssim_scales(64)
    assert len(powers64) == 4 and filter_size <= 64 // 8  # 64, 32, 16, 8
    assert len(metrics.ms_ssim_scales(16)[0]) == 2
    assert abs(sum(powers64) - 1) < 1e-9


def test_ms_ssim_is_high_for_a_collapsed_set_and_low_for_reals(halves):
    a, _ = halves
    real = metrics.ms_ssim_mean(a, pairs=300, seed=0)
    stuck = metrics.ms_ssim_mean(collapsed(a[0], N), pairs=300, seed=0)
    assert real < 0.3
    assert stuck > 0.8 and stuck > real + 0.5
    assert metrics.ms_ssim_mean(a, pairs=300, seed=0) == real


# ---------------------------------------------------------------- nearest neighbours

def test_nearest_neighbour_matches_brute_force(halves):
    a, b = halves
    queries, refs = a[:10], b[:40]
    diff = queries[:, None].astype(np.float64) - refs[None].astype(np.float64)
    exact = np.sqrt((diff ** 2).sum(axis=(2, 3, 4))).min(axis=1) / 255.0
    np.testing.assert_allclose(metrics.nearest_neighbour_l2(queries, refs, chunk=3), exact, rtol=1e-4)


def test_copies_of_training_tiles_are_flagged(tiles):
    train, holdout = tiles
    rng = np.random.default_rng(1)
    copies = data.augment(train[rng.choice(len(train), 64, replace=False)], rng)  # turned/flipped
    copy_nn = metrics.nearest_neighbour_l2(copies, train, dihedral=True)
    holdout_nn = metrics.nearest_neighbour_l2(holdout, train, dihedral=True)
    assert copy_nn.max() == 0.0
    assert np.median(holdout_nn) > 5.0  # unseen tiles are far from every training tile
    assert metrics.prob_closer(copy_nn, holdout_nn) > 0.99
    # Held-out tiles against themselves: no copying, by construction.
    assert metrics.prob_closer(holdout_nn, holdout_nn) == pytest.approx(0.5)


# ---------------------------------------------------------------- colour

def test_color_stats_catch_a_shift_that_swd_normalises_away(tiles):
    train, _ = tiles
    pick = np.random.default_rng(0).permutation(len(train))
    a, b = train[pick[:500]], train[pick[500:1000]]
    same = metrics.color_stats(a, b)
    shifted = metrics.color_stats(a, colour_shifted(b))
    assert np.allclose(same["real_mean"], a.reshape(-1, 3).mean(axis=0))
    assert np.allclose(same["fake_std"], b.reshape(-1, 3).std(axis=0))
    assert max(same["w1"]) < 4
    assert min(shifted["w1"][0], shifted["w1"][2]) > 5 * max(same["w1"])  # red up, blue down
    assert shifted["w1"][1] == same["w1"][1]  # green untouched
    assert metrics.color_stats(a, a)["w1"] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- C2ST

def test_c2st_cannot_tell_real_halves_apart_but_spots_noise(tiles):
    train, _ = tiles
    pick = np.random.default_rng(2).permutation(len(train))
    a, b = train[pick[:256]], train[pick[256:512]]
    quick = dict(steps=120, side=32)  # 32x32 inside: a quarter of the work
    same = metrics.c2st(a, b, seed=0, **quick)
    assert 0.4 <= same <= 0.6
    assert metrics.c2st(a, b, seed=0, **quick) == same  # seeded: same number
    assert metrics.c2st(a, noise_like(b), seed=0, **quick) > 0.95


# ---------------------------------------------------------------- together

def test_evaluate_sets_scores_noise_against_the_baseline(tiles, halves):
    train, holdout = tiles
    a, b = halves[0][:64], halves[1][:64]
    r = metrics.evaluate_sets(a, noise_like(b), train[:400], holdout, seed=4,
                              ms_ssim_pairs=100, c2st_steps=40)
    assert r["n"] == 64 and r["swd_set_size"] == 32  # fakes and baseline: halves of 32
    assert r["swd_x1e3"]["avg"] > 3 * r["swd_real_baseline_x1e3"]["avg"]
    assert r["c2st_acc"] > 0.9
    assert r["nn_fake_to_train"] > r["nn_holdout_to_train"] > 0
    assert r["nn_fake_closer_than_holdout"] < 0.1
    assert set(r["timings"]) == {"swd", "ms_ssim", "color_stats", "nn", "c2st"}


def test_quick_evaluation_has_swd_and_ms_ssim_only(halves):
    a, b = halves
    r = metrics.evaluate_sets(a, b[:100], seed=0, quick=True, ms_ssim_pairs=100)
    assert r["n"] == 100 and r["swd_set_size"] == 50  # the larger set is cut to the smaller
    assert set(r) == {"n", "seed", "swd_set_size", "swd_x1e3", "swd_real_baseline_x1e3",
                      "ms_ssim_fake", "ms_ssim_real", "timings"}
