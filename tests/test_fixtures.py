"""The generated datasets the other tests learn from: evaluation must not see training images."""

from __future__ import annotations

import hashlib

from conftest import LABELS_UNORDERED, make_dataset


def _digests(folder) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}


def test_validation_images_are_not_copies_of_training_images(tmp_path):
    root = make_dataset(tmp_path / "data", LABELS_UNORDERED)
    training, validation = _digests(root / "training"), _digests(root / "validation")
    assert len(training) == 6 * len(LABELS_UNORDERED)  # every image differs from every other
    assert len(validation) == 3 * len(LABELS_UNORDERED)
    assert not training & validation
