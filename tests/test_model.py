"""Base model loading, default top stripping and the classifier's structure."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_base_model, tiny_classifier_with_top

from tl_helpers import model as tl_model
from tl_helpers.errors import TLError

keras = tf.keras


def test_default_base_uses_bundled_imagenet_weights():
    a = tl_model.load_default_base_model(96, alpha=0.35)
    random = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None
    )
    assert a.output_shape == (None, 3, 3, 1280)
    # Weights come from the bundled file, not a random initialisation.
    w_loaded = a.get_layer("Conv1").get_weights()[0]
    assert not np.allclose(w_loaded, random.get_layer("Conv1").get_weights()[0])
    b = tl_model.load_default_base_model(160, alpha=0.35)
    np.testing.assert_array_equal(w_loaded, b.get_layer("Conv1").get_weights()[0])


def test_other_alpha_offline_names_the_weights_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def refuse(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", refuse)
    with pytest.raises(TLError) as err:
        tl_model.load_default_base_model(128, alpha=1.0)
    message = str(err.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5" in message
    assert "mobilenet_alpha" in message


@pytest.mark.parametrize("suffix", [".h5", ".keras", ""])
def test_load_user_model_in_every_format(tmp_path, suffix):
    original = tiny_classifier_with_top()
    path = tmp_path / f"model{suffix}"
    original.save(path) if suffix else original.save(path, save_format="tf")
    loaded = tl_model.load_base_model(path, 32)
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), original.predict(x, verbose=0), atol=1e-6
    )


def test_unloadable_model_names_the_file(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(TLError, match="broken.h5"):
        tl_model.load_base_model(path, 32)


def test_plain_tf_savedmodel_is_refused(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "plain"))
    with pytest.raises(TLError, match="plain"):
        tl_model.load_base_model(tmp_path / "plain", 32)


def test_fixed_input_size_mismatch_says_which_size(tmp_path):
    path = tmp_path / "m.h5"
    tiny_base_model(48).save(path)
    with pytest.raises(TLError) as err:
        tl_model.load_base_model(path, 32)
    assert '"input_tensor_size": 48' in str(err.value)


def test_grayscale_base_is_refused():
    inputs = keras.Input((32, 32, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(TLError, match="3-channel"):
        tl_model.check_input_shape(model, 32)


def test_strip_full_mobilenet_v2_with_top():
    full = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, include_top=True, weights=None, classes=7
    )
    stripped = tl_model.strip_classification_head(full)
    assert stripped.layers[-1].name == "out_relu"
    assert stripped.output_shape == (None, 3, 3, 1280)


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_strip_small_classifier_saved_and_reloaded(tmp_path, fmt):
    path = tmp_path / ("model.h5" if fmt == "h5" else "saved")
    tiny_classifier_with_top().save(path, save_format=fmt)
    loaded = tl_model.load_base_model(path, 32)
    stripped = tl_model.strip_classification_head(loaded)
    assert stripped.layers[-1].name == "conv2"
    assert stripped.output_shape == (None, 7, 7, 16)


def test_strip_leaves_a_model_without_top_unchanged():
    base = tiny_base_model()
    assert tl_model.strip_classification_head(base) is base


def test_strip_mobilenet_v1_style_conv_top():
    full = keras.applications.MobileNet(
        input_shape=(128, 128, 3), alpha=0.25, include_top=True, weights=None
    )
    stripped = tl_model.strip_classification_head(full)
    assert stripped.output_shape == (None, 4, 4, 256)


def test_strip_nested_base_in_sequential():
    inner = tiny_base_model()
    outer = keras.Sequential([inner, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    outer.build((None, 32, 32, 3))
    stripped = tl_model.strip_classification_head(outer)
    assert stripped.output_shape == (None, 7, 7, 16)


def test_strip_everything_is_an_error():
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    with pytest.raises(TLError, match="remove_top_layer_if_needed"):
        tl_model.strip_classification_head(model)


def _scaled_input(classifier: keras.Model) -> np.ndarray:
    """What the classifier's base receives for the pixel values 0, 127.5 and 255."""
    base = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    scaled = keras.Model(classifier.inputs, base._inbound_nodes[-1].input_tensors)
    pixels = np.broadcast_to(np.array([0.0, 127.5, 255.0], np.float32)[:, None, None], (3, 32, 32))
    return scaled(np.repeat(pixels[..., None], 3, axis=-1)).numpy()[:, 0, 0, 0]


@pytest.mark.parametrize(
    "preprocessing, expected",
    [
        ("minus_one_to_one", [-1.0, 0.0, 1.0]),
        ("zero_to_one", [0.0, 0.5, 1.0]),
        ("none", [0.0, 127.5, 255.0]),
    ],
)
def test_classifier_scales_raw_pixels(preprocessing, expected):
    classifier = tl_model.build_classifier(tiny_base_model(), {"a": 0}, 32, preprocessing)
    np.testing.assert_allclose(_scaled_input(classifier), expected, atol=1e-5)
    # Plain tensor arithmetic (TFOpLambda), never Keras's Rescaling layer: the IMX500
    # converter refuses Rescaling.
    kinds = {type(layer).__name__ for layer in classifier.layers}
    assert "Rescaling" not in kinds
    assert ("TFOpLambda" in kinds) == (preprocessing != "none")


def test_classifier_output_size_is_max_id_plus_one(capsys, labels_unordered):
    classifier = tl_model.build_classifier(tiny_base_model(), labels_unordered, 32)
    assert classifier.output_shape == (None, 5)
    assert "no class with id 2" in capsys.readouterr().out
    assert classifier.get_layer(tl_model.PREDICTIONS_LAYER).activation.__name__ == "softmax"
    # The base is frozen and runs in inference mode.
    assert [w.name for w in classifier.trainable_weights] == [
        w.name for w in classifier.get_layer("predictions").weights
    ]


def test_classifier_on_vector_base():
    inputs = keras.Input((32, 32, 3))
    base = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    classifier = tl_model.build_classifier(base, {"a": 0, "b": 1}, 32)
    assert classifier.output_shape == (None, 2)
