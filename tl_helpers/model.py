"""Base model loading, default top stripping, and the classifier built on top of the base.

The classifier takes raw RGB pixels (0-255), scales them the way the base expects, runs the
frozen base in inference mode, pools to a feature vector and ends in a softmax `Dense` head.
Deployment and MCT quantization then need no separate preprocessing step.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from tl_helpers.errors import TLError

keras = tf.keras

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED_ALPHA = 0.35
BUNDLED_WEIGHTS = WEIGHTS_DIR / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
KERAS_WEIGHT_SIZES = (96, 128, 160, 192, 224)

# Layer types that make up a classification head and are stripped by default.
HEAD_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Activation,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.MaxPooling2D,
)

PREPROCESSING = {
    # MobileNetV2 ImageNet weights expect [-1, 1] (keras mobilenet_v2.preprocess_input).
    "minus_one_to_one": (1.0 / 127.5, -1.0),
    "zero_to_one": (1.0 / 255.0, 0.0),
    "none": None,
}

PREDICTIONS_LAYER = "predictions"
FEATURES_LAYER = "features"


def load_default_base_model(input_size: int, alpha: float = 1.0) -> keras.Model:
    """Keras MobileNetV2 without its top, with ImageNet weights (bundled for alpha 0.35)."""
    shape = (input_size, input_size, 3)
    if alpha == BUNDLED_ALPHA:
        return keras.applications.MobileNetV2(
            input_shape=shape, alpha=alpha, include_top=False, weights=str(BUNDLED_WEIGHTS)
        )
    rows = input_size if input_size in KERAS_WEIGHT_SIZES else 224
    file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"
    try:
        return keras.applications.MobileNetV2(
            input_shape=shape, alpha=alpha, include_top=False, weights="imagenet"
        )
    except Exception as err:  # offline: Keras cannot download the weights
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise TLError(
            f"Could not get the ImageNet weights of MobileNetV2 alpha {alpha} ({err}). "
            f'Place the file {file_name} in {cache}, or set "mobilenet_alpha": 0.35 in '
            "configuration.json to use the weights bundled with tl_helpers (no download)."
        ) from err


def load_base_model(source: str | Path | None, input_size: int, alpha: float = 1.0) -> keras.Model:
    """Load the user's base model (.h5, .keras or SavedModel folder), or the default MobileNetV2."""
    if source is None or str(source) == "":
        return load_default_base_model(input_size, alpha)
    source = Path(source)
    try:
        model = keras.models.load_model(source, compile=False)
    except Exception as err:
        raise TLError(
            f"source_keras_model: cannot load {source} as a Keras model "
            f"({type(err).__name__}: {_first_line(err)}). Save it with model.save() as a "
            '.h5 file, a .keras file or a SavedModel folder, or set "source_keras_model": "" '
            "for the default MobileNetV2."
        ) from err
    if not isinstance(model, keras.Model):
        raise TLError(
            f"source_keras_model: {source} is a TensorFlow SavedModel but not a Keras model. "
            "Save the model with Keras (model.save()) and point source_keras_model at that."
        )
    check_input_shape(model, input_size, source)
    return model


def check_input_shape(
    model: keras.Model, input_size: int, source: object = "the base model"
) -> None:
    """Fail early when the model's fixed input does not fit input_tensor_size x 3 channels."""
    if len(model.inputs) != 1:
        raise TLError(
            f"source_keras_model: {source} has {len(model.inputs)} inputs; an image classifier "
            "base needs exactly one image input."
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise TLError(
            f"source_keras_model: {source} takes inputs of shape {shape[1:]}, not images "
            "(height, width, 3)."
        )
    _, height, width, channels = shape
    if channels not in (None, 3):
        raise TLError(
            f"source_keras_model: {source} takes {channels}-channel images; the dataset is RGB "
            "(3 channels). Use a base model with a 3-channel input."
        )
    for side in (height, width):
        if side is not None and side != input_size:
            raise TLError(
                f"input_tensor_size is {input_size} but {source} has a fixed input of "
                f'{height}x{width}. Set "input_tensor_size": {height} in configuration.json '
                "(or use a base model with that input size)."
            )


def strip_classification_head(model: keras.Model) -> keras.Model:
    """Remove trailing classification layers (Dense, Softmax, Dropout, Flatten, pooling, ...).

    Walks back from the output through a chain of head layers (and 1x1 convolutions on a
    pooled map, as in MobileNetV1's top) and cuts before the first layer that is not one.
    Returns the model unchanged when it has no such tail.
    """
    tensor = model.outputs[0]
    stripped = []
    while True:
        layer, node_index, _ = tensor._keras_history
        if isinstance(layer, keras.layers.InputLayer) or not _is_head_layer(layer, tensor):
            break
        inputs = layer._inbound_nodes[node_index].input_tensors
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 1:
                break  # a merge: not a simple head
            inputs = inputs[0]
        stripped.append(layer.name)
        tensor = inputs
    if not stripped:
        return model
    if any(tensor is t for t in model.inputs):
        raise TLError(
            f"remove_top_layer_if_needed: removing the head ({', '.join(reversed(stripped))}) "
            f"leaves nothing of {model.name}. Edit remove_top_layer_if_needed() in the notebook "
            "to cut at a given layer, e.g. "
            'keras.Model(model.input, model.get_layer("name").output).'
        )
    print(f"Removed the classification head of {model.name}: {', '.join(reversed(stripped))}")
    return keras.Model(model.inputs, tensor, name=f"{model.name}_no_top")


def _is_head_layer(layer: keras.layers.Layer, output: tf.Tensor) -> bool:
    if isinstance(layer, HEAD_LAYER_TYPES):
        return True
    shape = tuple(output.shape)
    # A convolution used as a dense layer on a pooled 1x1 map (MobileNetV1-style top).
    return isinstance(layer, keras.layers.Conv2D) and len(shape) == 4 and shape[1:3] == (1, 1)


def build_classifier(
    base: keras.Model,
    labels: dict[str, int],
    input_size: int,
    preprocessing: str = "minus_one_to_one",
) -> keras.Model:
    """Raw RGB pixels -> preprocessing -> frozen base (inference mode) -> pooling -> softmax Dense.

    The output has max(class id) + 1 units: output index i is the class whose labels.json id is i.
    """
    check_input_shape(base, input_size)
    num_classes = max(labels.values()) + 1
    unused = sorted(set(range(num_classes)) - set(labels.values()))
    if unused:
        print(
            f"Warning: labels.json has no class with id {', '.join(map(str, unused))}; "
            f"the model still has {num_classes} outputs (ids are output indices)."
        )
    if preprocessing not in PREPROCESSING:
        raise TLError(
            f'preprocessing must be one of {", ".join(PREPROCESSING)}, got "{preprocessing}".'
        )
    base.trainable = False
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = base(scale_pixels(inputs, preprocessing), training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    elif len(x.shape) == 2:
        x = keras.layers.Identity(name=FEATURES_LAYER)(x)
    else:
        raise TLError(
            f"The base model {base.name} outputs shape {tuple(x.shape)[1:]}; the classifier "
            "needs a feature map (h, w, c) or a vector. Edit remove_top_layer_if_needed() in "
            "the notebook to cut the base at such a layer."
        )
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=PREDICTIONS_LAYER)(x)
    return keras.Model(inputs, outputs, name="classifier")


def scale_pixels(pixels: tf.Tensor, preprocessing: str) -> tf.Tensor:
    """Scale raw 0-255 pixels as `preprocessing` says, with plain tensor arithmetic.

    Keras records `x * scale + offset` as TensorFlow-op layers (TFOpLambda), which MCT quantizes
    and Sony's IMX500 converter maps; the converter refuses Keras's `Rescaling` layer.
    """
    if PREPROCESSING[preprocessing] is None:
        return pixels
    scale, offset = PREPROCESSING[preprocessing]
    scaled = pixels * scale
    return scaled + offset if offset else scaled


def feature_extractor(classifier: keras.Model) -> keras.Model:
    """The classifier up to the pooled features (what the head is trained on)."""
    return keras.Model(classifier.inputs, classifier.get_layer(FEATURES_LAYER).output)


def build_head(feature_dim: int, num_classes: int, dropout: float = 0.2) -> keras.Model:
    """The trainable head used on cached features: Dropout + the classifier's softmax Dense."""
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = keras.layers.Dropout(dropout, name="dropout")(inputs) if dropout else inputs
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=PREDICTIONS_LAYER)(x)
    return keras.Model(inputs, outputs, name="head")


def set_head_weights(classifier: keras.Model, head: keras.Model) -> keras.Model:
    """Copy the trained head's Dense weights into the classifier's output layer."""
    classifier.get_layer(PREDICTIONS_LAYER).set_weights(
        head.get_layer(PREDICTIONS_LAYER).get_weights()
    )
    return classifier


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
