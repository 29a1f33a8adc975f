"""Batched inference over image files with progress: for features, evaluation, calibration."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from tl_helpers import tflite
from tl_helpers.dataset import iter_batches, view_names

keras = tf.keras

# Images per backbone batch, chosen for throughput and independent of the training batch_size.
# On CPU, small batches keep MobileNet's activations in cache: on a 2-core AMD EPYC at 224x224,
# batches of 16 ran 1.3-1.7x more images per CPU second than 64, and the process peaked about
# 250 MiB lower (bench/README.md, "Profile").
INFERENCE_BATCH_SIZE = 16
# The base's passes run on TFLite's CPU path where they can (`backbone_runner`); set the
# environment variable TL_HELPERS_TFLITE=0 to run them in TensorFlow (for comparisons).
TFLITE_PASSES = os.environ.get("TL_HELPERS_TFLITE", "1") != "0"


def predict_images(
    model: keras.Model,
    paths: Sequence[str],
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    title: str = "",
    devices: Sequence[str] = (),
    view: str | Sequence[str] = "",
) -> np.ndarray:
    """Run `model` on every image in `paths`, in order, batched; show a progress bar.

    With several `devices` (a Distribution's, see tl_helpers.distribute), each batch is split
    between them. `view` names an augmented view of the images (tl_helpers.augment; "": as
    they are), or several: each image is decoded once and gives one output row per view, in
    that order. A file that cannot be decoded stops the pass with a TLError naming it.
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


def backbone_runner(
    model: keras.Model, image_size: int, devices: Sequence[str] = ()
) -> Callable[[tf.Tensor], np.ndarray]:
    """`keras_runner`, or a faster equivalent for the base's passes: on a machine without a GPU,
    a float model made only of Keras's own layers runs on TFLite's CPU path
    (`tflite.float_runner`: 2.3-2.7x the images per second of TensorFlow on 2 cores for
    MobileNetV2 alpha 0.35, a whole pass over photos about 2x as fast).

    TensorFlow runs it with several `devices` (each batch is split between them), with a GPU,
    with other layers (MCT's quantized models, whose values must be exactly TensorFlow's, or a
    user's custom layers), and when TFLite cannot convert the model (one line says so).
    """
    if (
        not TFLITE_PASSES
        or len(devices) > 1
        or tf.config.list_logical_devices("GPU")
        or not _keras_layers_only(model)
    ):
        return keras_runner(model, image_size, devices)
    try:
        return tflite.float_runner(model, image_size)
    except Exception as err:  # noqa: BLE001 - any conversion failure: TensorFlow runs it
        print(f"Note: {model.name} runs in TensorFlow, not TFLite ({_reason(err)}).")
        return keras_runner(model, image_size, devices)


def _reason(err: Exception) -> str:
    """The line of a TFLite conversion error that says what is wrong ("'tf.Erf' op is neither
    a custom op nor a flex op"), not the converter's file positions."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line.rsplit("error: ", 1)[1] for line in lines if "error: " in line]
    return (said or lines or [type(err).__name__])[0][:200]


def _keras_layers_only(model: keras.layers.Layer) -> bool:
    """True when the model and every layer in it, nested models included, are Keras's own."""
    if not type(model).__module__.startswith("keras."):
        return False
    return all(_keras_layers_only(layer) for layer in getattr(model, "layers", []))


def predict_batches(
    run: Callable[[tf.Tensor], np.ndarray],
    paths: Sequence[str],
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    title: str = "",
    view: str | Sequence[str] = "",
) -> np.ndarray:
    """Apply `run` (a batch of raw-pixel images -> a batch of outputs) to every image in
    `paths`, in order, with a progress bar; any model runner (Keras, TFLite) shares this loop.
    """
    paths = list(paths)
    rows = len(paths) * len(view_names(view))
    (outputs,) = predict_chunks(run, paths, image_size, rows, batch_size, title, view=view)
    return outputs


def predict_chunks(
    run: Callable[[tf.Tensor], np.ndarray],
    paths: Sequence[str],
    image_size: int,
    chunk_rows: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    title: str = "",
    view: str | Sequence[str] = "",
) -> Iterator[np.ndarray]:
    """`predict_batches`, yielding the outputs `chunk_rows` rows at a time (the last chunk
    may be shorter), so a long pass holds one chunk in memory, not all.

    One input pipeline and one progress bar serve the whole pass: a tf.data pipeline made per
    chunk leaves memory inside TensorFlow behind each time (about 15 MB per chunk of 4,096
    images measured with MobileNetV2; docs/feature-cache.md, "The feature pass at scale").
    """
    paths = list(paths)
    if not paths:
        raise ValueError("predict_chunks: no images")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    views = len(view_names(view))
    total = len(paths) * views
    if title:
        print(f"{title}: {len(paths)} images" + (f", {views} views each" if views > 1 else ""))
    progress = keras.utils.Progbar(total, interval=1.0, unit_name="image" if views == 1 else "row")
    chunk, filled, done = None, 0, 0  # filled in place: no list of batches to concatenate
    for batch in iter_batches(paths, image_size, batch_size, view):
        result = run(batch)
        taken = 0
        while taken < len(result):
            if chunk is None:
                rows = min(chunk_rows, total - done)
                chunk, filled = np.empty((rows, *result.shape[1:]), dtype=result.dtype), 0
            take = min(len(result) - taken, len(chunk) - filled)
            chunk[filled : filled + take] = result[taken : taken + take]
            filled, taken, done = filled + take, taken + take, done + take
            if filled == len(chunk):
                progress.update(done)
                yield chunk
                chunk = None
        progress.update(done)
