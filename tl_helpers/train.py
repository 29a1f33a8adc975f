"""One backbone pass to cached features, then head training with Keras `fit`.

The base is frozen, so its output for an image never changes during training: running it
once per image and training the softmax head on the pooled features gives the same model as
running the whole network every epoch, at a fraction of the cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tl_helpers.dataset import ImageFolder
from tl_helpers.inference import INFERENCE_BATCH_SIZE, predict_images
from tl_helpers.model import build_head, feature_extractor, set_head_weights

keras = tf.keras


@dataclass
class Features:
    """Pooled base features of the training and validation images, with their class ids."""

    train: np.ndarray
    train_ids: np.ndarray
    validation: np.ndarray | None = None
    validation_ids: np.ndarray | None = None


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
) -> Features:
    """Run the preprocessing + frozen base + pooling once over every image."""
    extractor = feature_extractor(classifier)
    train_features = predict_images(extractor, train.paths, image_size, batch_size, "training")
    features = Features(train_features, np.asarray(train.class_ids, dtype=np.int32))
    if validation is not None and len(validation):
        features.validation = predict_images(
            extractor, validation.paths, image_size, batch_size, "validation"
        )
        features.validation_ids = np.asarray(validation.class_ids, dtype=np.int32)
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
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )
    set_head_weights(classifier, head)
    return history
