"""train.real_label: one-sided label smoothing of D's target for reals (Salimans et al. 2016)."""
import os

import numpy as np
import pytest

import config
from conftest import ROOT, built


def losses(label):
    cfg = config.load(os.path.join(ROOT, "configs", "smoke.json"), [f"train.real_label={label}"])
    graph, g, sess = built(cfg)
    rng = np.random.default_rng(0)
    B, S, Z = cfg.train.batch_size, cfg.model.image_size, cfg.model.z_dim
    feed = {g["reals_u8_in"]: rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
            g["z_in"]: rng.uniform(-1, 1, (B, Z)).astype(np.float32)}
    return sess.run([g["real_logits"], g["d_real_loss"], g["d_fake_loss"], g["g_loss"]], feed)


def test_only_ds_target_for_reals_moves():
    logits, real, fake, g_loss = losses(0.9)
    x = logits.astype(np.float64)
    # cross-entropy of sigmoid(x) against the target 0.9
    assert real == pytest.approx(np.mean(np.maximum(x, 0) - 0.9 * x + np.log1p(np.exp(-np.abs(x)))),
                                 rel=1e-5)
    plain_logits, plain_real, plain_fake, plain_g = losses(1.0)
    np.testing.assert_array_equal(logits, plain_logits)  # the same net and batch
    assert real != pytest.approx(plain_real)
    assert (fake, g_loss) == (plain_fake, plain_g)  # G is still told to make reals


@pytest.mark.parametrize("label", ["0.5", "1.1", "-1"])
def test_a_target_outside_its_range_is_refused(label):
    with pytest.raises(config.ConfigError, match="train.real_label"):
        config.load(os.path.join(ROOT, "configs", "smoke.json"), [f"train.real_label={label}"])


def test_off_in_the_write_ups_config_on_in_the_main_one():
    assert config.load(os.path.join(ROOT, "configs", "article.json")).train.real_label == 1.0
    assert config.load(os.path.join(ROOT, "configs", "cpu.json")).train.real_label == 0.9
