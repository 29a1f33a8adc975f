"""Batched inference over image files with progress: for features, evaluation, calibration."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tl_helpers.dataset import iter_batches

keras = tf.keras

# Images per backbone batch, chosen for throughput and independent of the training batch_size.
# On CPU, small batches keep MobileNet's activations in cache: on a 2-core AMD EPYC at 224x224,
# batches of 16 ran 1.3-1.7x more images per CPU second than 64, and the process peaked about
# 250 MiB lower (bench/README.md, "Profile").
INFERENCE_BATCH_SIZE = 16


def predict_images(
    model: keras.Model,
    paths: Sequence[str],
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    title: str = "",
    devices: Sequence[str] = (),
    view: str = "",
) -> np.ndarray:
    """Run `model` on every image in `paths`, in order, batched; show a progress bar.

    With several `devices` (a Distribution's, see tl_helpers.distribute), each batch is split
    between them. `view` names an augmented view of the images (tl_helpers.augment; "": as
    they are). A file that cannot be decoded stops the pass with a TLError naming it.
    """
    run = keras_runner(model, image_size, devices)
    return predict_batches(run, paths, image_size, batch_size, title, view=view)


def keras_runner(
    model: keras.Model, image_size: int, devices: Sequence[str] = ()
) -> Callable[[tf.Tensor], np.ndarray]:
    """A batch of raw-pixel images -> `model`'s outputs (inference mode, traced once).

    With two or more `devices`, the batch is cut into one consecutive slice per device, each
    slice runs on its device, and the outputs are joined in order: data parallel inference
    that needs no collective (workers of a cluster run different images at different paces).
    """
    devices = list(devices)

    def call(images: tf.Tensor) -> tf.Tensor:
        if len(devices) < 2:
            return model(images, training=False)
        per_device = (tf.shape(images)[0] + len(devices) - 1) // len(devices)
        outputs = []
        for number, device in enumerate(devices):
            with tf.device(device):
                part = images[number * per_device : (number + 1) * per_device]
                outputs.append(model(part, training=False))
        return tf.concat(outputs, axis=0)

    run = tf.function(
        call, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
    )
    return lambda batch: run(batch).numpy()


def predict_batches(
    run: Callable[[tf.Tensor], np.ndarray],
    paths: Sequence[str],
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    title: str = "",
    view: str = "",
) -> np.ndarray:
    """Apply `run` (a batch of raw-pixel images -> a batch of outputs) to every image in
    `paths`, in order, with a progress bar; any model runner (Keras, TFLite) shares this loop.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("predict_batches: no images")
    if title:
        print(f"{title}: {len(paths)} images")
    progress = keras.utils.Progbar(len(paths), interval=1.0, unit_name="image")
    outputs = None  # filled in place: no list of batches to concatenate (half the peak memory)
    done = 0
    for batch in iter_batches(paths, image_size, batch_size, view):
        result = run(batch)
        if outputs is None:
            outputs = np.empty((len(paths), *result.shape[1:]), dtype=result.dtype)
        outputs[done : done + len(result)] = result
        done += len(result)
        progress.update(done)
    return outputs
