"""The base's passes on TFLite's CPU path: the same outputs as TensorFlow, and TensorFlow where
TFLite does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tl_helpers import inference, tflite

keras = tf.keras
SIZE = 24


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def _model(flatten: bool = False, layer: keras.layers.Layer | None = None) -> keras.Model:
    """Raw pixels -> scaling (TFOpLambda, as the classifier's) -> conv -> BN -> ReLU6 -> pooled
    (or flattened: a reshape with the batch in its shape)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs * (1 / 127.5) - 1
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x, training=False)
    x = keras.layers.ReLU(6.0)(x)
    if layer is not None:
        x = layer(x)
    x = keras.layers.Flatten()(x) if flatten else keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x)


class Doubled(keras.layers.Layer):
    """A layer that is not Keras's own (as MCT's quantization wrappers are not)."""

    def call(self, inputs):
        return inputs * 2.0


@pytest.mark.parametrize("flatten", [False, True])
def test_backbone_runner_uses_tflite_and_matches_tensorflow(flatten, capfd):
    model = _model(flatten)
    run = inference.backbone_runner(model, SIZE)
    assert run.__qualname__.startswith("float_runner"), "a plain Keras model runs on TFLite"
    images = _images(37)  # two full batches of FLOAT_BATCH_SIZE and a padded one
    expected = inference.keras_runner(model, SIZE)(tf.constant(images))
    for batch in (images, images[:5], images[:16], images[:1]):
        got = run(tf.constant(batch))
        assert got.shape == (len(batch), *expected.shape[1:])
        np.testing.assert_allclose(got, expected[: len(batch)], rtol=1e-5, atol=1e-5)
    # The converter's and XNNPACK's log lines (JupyterLab shows stderr as a pink box) are kept off.
    assert capfd.readouterr().err == ""


def test_padding_does_not_change_a_short_batch():
    model = _model()
    run = tflite.float_runner(model, SIZE, batch_size=8)
    images = _images(8)
    np.testing.assert_array_equal(run(tf.constant(images[:3])), run(tf.constant(images))[:3])


def test_layers_not_keras_own_run_in_tensorflow_exactly():
    model = _model(layer=Doubled())
    run = inference.backbone_runner(model, SIZE)
    images = tf.constant(_images(5))
    np.testing.assert_array_equal(run(images), inference.keras_runner(model, SIZE)(images))
    assert not run.__qualname__.startswith("float_runner")


def test_a_model_tflite_cannot_convert_runs_in_tensorflow_with_a_note(capsys):
    model = _model(layer=keras.layers.Lambda(tf.math.erf))  # no TFLite built-in for Erf
    run = inference.backbone_runner(model, SIZE)
    assert "runs in TensorFlow, not TFLite ('tf.Erf' op is neither" in capsys.readouterr().out
    images = tf.constant(_images(5))
    np.testing.assert_array_equal(run(images), inference.keras_runner(model, SIZE)(images))


def test_several_devices_or_the_switch_off_keep_tensorflow(monkeypatch):
    model = _model()
    devices = ["/cpu:0", "/cpu:0"]
    assert not inference.backbone_runner(model, SIZE, devices).__qualname__.startswith("float_")
    monkeypatch.setattr(inference, "TFLITE_PASSES", False)
    assert not inference.backbone_runner(model, SIZE).__qualname__.startswith("float_")
