"""Calibration images for MCT's post-training quantization: a seeded sample of the training set,
streamed as raw-pixel batches through the same loader as training and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from tl_helpers.dataset import ImageFolder, iter_batches


def calibration_paths(
    images: ImageFolder, batch_size: int, batches: int, seed: int = 0
) -> list[str]:
    """Draw batch_size x batches training images at random (all classes), capped by the set."""
    count = min(batch_size * batches, len(images))
    order = np.random.default_rng(seed).permutation(len(images))[:count]
    return [images.paths[i] for i in order]


class CalibrationData:
    """MCT's representative dataset: calling it gives an iterable of [raw-pixel batch] lists.

    Batches stream from the image files (never all in memory). MCT reads the first batch once
    before calibrating; it is kept, so every image is decoded once. It has a length, so MCT's
    "Statistics Collection" bar shows batches done out of the total.
    """

    def __init__(self, paths: Sequence[str], image_size: int, batch_size: int) -> None:
        if not paths:
            raise ValueError("CalibrationData: no images")
        self.paths = list(paths)
        self.image_size = image_size
        self.batch_size = batch_size
        self._first: np.ndarray | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __call__(self) -> CalibrationData:
        return self

    def first_batch(self) -> np.ndarray:
        """The first batch of raw-pixel images, loaded once and kept."""
        if self._first is None:
            first = self.paths[: self.batch_size]
            self._first = next(iter_batches(first, self.image_size, self.batch_size)).numpy()
        return self._first

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        yield [self.first_batch()]
        rest = self.paths[self.batch_size :]
        for batch in iter_batches(rest, self.image_size, self.batch_size):
            yield [batch.numpy()]
