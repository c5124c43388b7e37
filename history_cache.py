"""A cache of earlier generated images, replayed to the discriminator (Lesson 33).

Images go in as uint8 0..255, the range the real-image path is fed with
(Lesson 35), so replayed fakes take exactly the same conversion as reals.
Once full, a new image replaces a random old one, so the cache spans the
whole run rather than only the last few hundred steps. No TensorFlow here.
"""
import json

import numpy as np


class HistoryCache:
    def __init__(self, capacity, image_shape, seed=0):
        self.images = np.zeros((capacity, *image_shape), np.uint8)  # [capacity, H, W, C]
        self.count = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return min(self.count, len(self.images))

    def add(self, image_u8):
        """Store one uint8 HWC image (Lesson 34: taken from the generated batch)."""
        if image_u8.dtype != np.uint8 or image_u8.shape != self.images.shape[1:]:
            raise ValueError(f"history images must be uint8 {self.images.shape[1:]}, "
                             f"got {image_u8.dtype} {image_u8.shape}")
        slot = self.count if self.count < len(self.images) else self.rng.integers(len(self.images))
        self.images[slot] = image_u8
        self.count += 1

    def sample(self, n):
        """n distinct cached images, uint8 [n, H, W, C]."""
        if n > len(self):
            raise ValueError(f"asked for {n} history images, the cache holds {len(self)}")
        return self.images[self.rng.choice(len(self), n, replace=False)]

    def state(self):
        """Everything needed to continue exactly, as NumPy arrays (for an .npz)."""
        return {"images": self.images[:len(self)], "count": np.int64(self.count),
                "rng": np.array(json.dumps(self.rng.bit_generator.state))}

    def load_state(self, state):
        images = state["images"]
        if images.shape[1:] != self.images.shape[1:] or len(images) > len(self.images):
            raise ValueError(f"saved history images {images.shape} do not fit a cache of "
                             f"{self.images.shape}")
        self.images[:len(images)] = images
        self.count = int(state["count"])
        self.rng.bit_generator.state = json.loads(str(state["rng"]))

