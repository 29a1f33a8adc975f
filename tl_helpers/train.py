"""One backbone pass to cached features, then head training with Keras `fit`.

The base is frozen, so its output for an image never changes during training: running it
once per image and training the softmax head on the pooled features gives the same model as
running the whole network every epoch, at a fraction of the cost.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers import cache
from tl_helpers.dataset import ImageFolder
from tl_helpers.inference import INFERENCE_BATCH_SIZE
from tl_helpers.model import build_head, feature_extractor, set_head_weights

keras = tf.keras

VALIDATION_BATCH_SIZE = 512


@dataclass
class Features:
    """Pooled base features of the training and validation images, with their class ids."""

    train: np.ndarray
    train_ids: np.ndarray
    validation: np.ndarray | None = None
    validation_ids: np.ndarray | None = None
    model_key: str | None = None  # cache.model_key of the extractor that computed them
    validation_paths: tuple[str, ...] = ()  # the validation images, in the order of the rows


def setup_tensorflow(seed: int = 0) -> None:
    """Seed Python, NumPy and TensorFlow, and use every core for TensorFlow's ops."""
    keras.utils.set_random_seed(seed)
    cores = os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(min(cores, 4))
    except RuntimeError:
        pass  # TensorFlow already initialised (a re-run in the same kernel): keep its settings
    print(f"TensorFlow {tf.__version__}, {cores} CPU cores, seed {seed}")


def compute_features(
    classifier: keras.Model,
    train: ImageFolder,
    validation: ImageFolder | None,
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    *,
    cache_dir: str | Path | None = None,
) -> Features:
    """Run the preprocessing + frozen base + pooling once per image, reusing cached features.

    With `cache_dir`, features of unchanged images come from the feature cache there (see
    tl_helpers.cache) and only new or changed images go through the base; None: no cache.
    """
    extractor = feature_extractor(classifier)
    has_validation = validation is not None and len(validation) > 0
    paths = list(train.paths) + (list(validation.paths) if has_validation else [])
    if cache_dir is None:
        vectors, report = cache.uncached_features(extractor, paths, image_size, batch_size)
    else:
        vectors, report = cache.cached_features(extractor, paths, image_size, cache_dir, batch_size)
    count = len(train)
    features = Features(
        vectors[:count], np.asarray(train.class_ids, dtype=np.int32), model_key=report.key
    )
    if has_validation:
        features.validation = vectors[count:]
        features.validation_ids = np.asarray(validation.class_ids, dtype=np.int32)
        features.validation_paths = tuple(map(str, validation.paths))
    return features


def check_batch_size(batch_size: int, num_images: int) -> int:
    """Clamp a batch_size larger than the training set, and say so."""
    if batch_size > num_images:
        print(
            f"Warning: batch_size {batch_size} is larger than the training set ({num_images} "
            f"images); using {num_images}. Set a smaller batch_size in configuration.json."
        )
        return num_images
    return batch_size


def train_head(
    classifier: keras.Model,
    features: Features,
    epochs: int,
    batch_size: int,
    learning_rate: float = 0.001,
    verbose: int = 2,
    callbacks: list | None = None,
) -> keras.callbacks.History:
    """Train the softmax head on the cached features and copy it into the classifier."""
    num_classes = classifier.output_shape[-1]
    batch_size = check_batch_size(batch_size, len(features.train))
    head = build_head(features.train.shape[1], num_classes)
    head.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # A head step takes microseconds, so Keras's per-step Python overhead dominated: run a
        # whole epoch's steps in one call (same batches, same updates, same model).
        steps_per_execution=math.ceil(len(features.train) / batch_size),
    )
    validation_data = None
    if features.validation is not None:
        validation_data = (features.validation, features.validation_ids)
    history = head.fit(
        features.train,
        features.train_ids,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=validation_data,
        # Validation only measures, so its batch size does not change the model (the metrics
        # are means over images); large batches take fewer steps.
        validation_batch_size=max(batch_size, VALIDATION_BATCH_SIZE),
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )
    set_head_weights(classifier, head)
    return history
