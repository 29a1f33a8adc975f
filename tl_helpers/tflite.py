"""TFLite: converting MCT's quantized Keras model quickly, running the int8 file, and running a
frozen float model on TFLite's CPU path (the backbone passes)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers.startup import stderr_collected

keras = tf.keras

# The int8 TFLite model takes one image per call, as an edge runtime feeds it: with a fixed
# batch its shapes are all static, so TFLite's default CPU path (the XNNPACK delegate) runs it.
TFLITE_BATCH_SIZE = 1
# Images per call of a float model on TFLite's CPU path (`float_runner`): its fastest on a 2-core
# machine for MobileNetV2 alpha 0.35 was 16 (933 images/s against 872 at 1).
FLOAT_BATCH_SIZE = 16


@contextlib.contextmanager
def tflite_converts_traced_call() -> Iterator[None]:
    """While active, TFLite converts a Keras model from its traced call, not a Keras SavedModel,
    with a batch of `TFLITE_BATCH_SIZE` images.

    MCT's int8 exporter calls `tf.lite.TFLiteConverter.from_keras_model`, which first writes
    the whole model as a Keras SavedModel, per-layer traces and all (the slowest part of the
    export). Here the model's call is traced once into a `tf.function` with the model's input
    and output names, saved with its variables and nothing else, and converted with
    `from_concrete_functions`: the same quantization parameters in every tensor, several times
    faster. The batch is fixed: with the batch left open, the reshapes around MCT's Dense head
    get run-time shapes, and TFLite's default XNNPACK delegate refuses the whole graph.
    TensorFlow's own method is back on leaving, error or not.
    """
    converter_class = tf.lite.TFLiteConverter
    original = converter_class.__dict__["from_keras_model"]

    def from_keras_model(model: keras.Model) -> tf.lite.TFLiteConverter:
        specs = [
            tf.TensorSpec((TFLITE_BATCH_SIZE, *tensor.shape[1:]), tensor.dtype, name=name)
            for tensor, name in zip(model.inputs, model.input_names, strict=True)
        ]

        @tf.function(input_signature=specs)
        def serve(*inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            return dict(zip(model.output_names, outputs, strict=True))

        holder = tf.Module()  # what gets saved: the function and the variables it reads
        holder.model_variables = list(model.variables)
        holder.serve = serve
        return converter_class.from_concrete_functions([serve.get_concrete_function()], holder)

    converter_class.from_keras_model = staticmethod(from_keras_model)
    try:
        yield
    finally:
        converter_class.from_keras_model = original


def tflite_runner(model_file: str | Path) -> Callable[[tf.Tensor], np.ndarray]:
    """A batch of raw-pixel images -> the TFLite model's outputs, as floats.

    One image per call, as the file is exported (`TFLITE_BATCH_SIZE`), on TFLite's default
    CPU path (the XNNPACK delegate).
    """
    interpreter = tf.lite.Interpreter(model_path=str(model_file), num_threads=os.cpu_count())
    interpreter.allocate_tensors()

    def run(batch: tf.Tensor) -> np.ndarray:
        outputs = []
        for image in batch.numpy():
            _set_input(interpreter, image[None])
            interpreter.invoke()
            outputs.append(_get_output(interpreter))
        return np.concatenate(outputs)

    return run


def float_runner(
    model: keras.Model, image_size: int, batch_size: int = FLOAT_BATCH_SIZE
) -> Callable[[tf.Tensor], np.ndarray]:
    """A batch of raw-pixel images -> `model`'s outputs, computed in float32 by TFLite's CPU
    path (the XNNPACK delegate) instead of TensorFlow.

    For a frozen model on a CPU this is the same computation, rounded differently (MobileNetV2
    alpha 0.35's pooled features differ by about 1e-4 at most), at 2.3-2.7x the images per
    second of TensorFlow on 2 cores (docs/performance.md, "The base's passes on TFLite"). The
    model's call is traced with a fixed batch of `batch_size` images (XNNPACK takes only static
    shapes; a shorter batch is padded) and frozen into a graph, so conversion takes about a
    second, not a Keras SavedModel export. Raises when TFLite cannot convert the model with its
    built-in operations or XNNPACK does not take the graph (`inference.backbone_runner` then
    keeps TensorFlow). The converter's log lines are kept off stderr.
    """
    call = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32)],
    )
    absl = logging.getLogger("absl")  # "Please consider providing the trackable_obj": not needed
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with stderr_collected() as log:
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [call.get_concrete_function()]
            )
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            interpreter = tf.lite.Interpreter(
                model_content=converter.convert(), num_threads=os.cpu_count() or 1
            )
            interpreter.allocate_tensors()
            interpreter.invoke()  # XNNPACK takes the graph here, or says why not
    finally:
        absl.setLevel(level)
    refused = [line for line in "".join(log).splitlines() if "delegate" in line.lower()]
    refused = [line for line in refused if "Created TensorFlow Lite XNNPACK" not in line]
    if refused:
        raise RuntimeError(f"XNNPACK does not run it: {refused[0]}")
    source = interpreter.get_input_details()[0]["index"]
    result = interpreter.get_output_details()[0]["index"]

    def run(batch: tf.Tensor) -> np.ndarray:
        images = np.asarray(batch, dtype=np.float32)
        outputs = []
        for start in range(0, len(images), batch_size):
            part = images[start : start + batch_size]
            if len(part) < batch_size:
                padding = np.zeros((batch_size - len(part), *part.shape[1:]), np.float32)
                part = np.concatenate([part, padding])
            interpreter.set_tensor(source, part)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(result)[: len(images) - start])
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    return run


def _set_input(interpreter: tf.lite.Interpreter, batch: np.ndarray) -> None:
    """Feed a float batch, quantizing it first if the model takes integers."""
    detail = interpreter.get_input_details()[0]
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        batch = np.clip(np.round(batch / scale + zero_point), info.min, info.max)
    interpreter.set_tensor(detail["index"], batch.astype(detail["dtype"]))


def _get_output(interpreter: tf.lite.Interpreter) -> np.ndarray:
    """Read the output batch as floats, dequantizing it if the model returns integers."""
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    if np.issubdtype(output.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        output = (output.astype(np.float32) - zero_point) * scale
    return output
