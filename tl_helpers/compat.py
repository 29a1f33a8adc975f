"""Which layers the camera's tools accept: MCT (quantization) and Sony's IMX500 converter.

Both checks run on the float classifier before any calibration, so a user's base model with a
layer either tool refuses stops at once, with every such layer named, instead of failing in
MCT or in the converter minutes later.
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow as tf

from tl_helpers.errors import TLError

keras = tf.keras

_BUILTIN_LAYER_PACKAGES = ("keras", "tensorflow")  # MCT's own test for a non-custom layer

# Keras layer classes that Sony's IMX500 converter (imx500-converter 3.19) maps to the chip.
# MCT keeps these classes when it quantizes (it wraps them, or folds BatchNormalization into the
# convolution before it), so a float model made of them gives a quantized model the converter
# reads. Keras's preprocessing layers (Rescaling, Normalization, ...) are not among them.
IMX500_LAYERS = frozenset(
    {
        "Activation",
        "Add",
        "AveragePooling2D",
        "BatchNormalization",
        "Concatenate",
        "Conv2D",
        "Conv2DTranspose",
        "Dense",
        "DepthwiseConv2D",
        "Dropout",
        "Flatten",
        "GlobalAveragePooling2D",
        "Identity",
        "InputLayer",
        "LayerNormalization",
        "LeakyReLU",
        "Maximum",
        "MaxPooling2D",
        "Minimum",
        "Multiply",
        "Permute",
        "Resizing",
        "ReLU",
        "Reshape",
        "Softmax",
        "Subtract",
        "UpSampling2D",
        "ZeroPadding2D",
    }
)

# TensorFlow ops that the converter maps when Keras records them as layers (TFOpLambda, named by
# their `function`, e.g. `x * 2` is "math.multiply").
IMX500_TF_OPS = frozenset(
    {
        "__operators__.add",
        "broadcast_to",
        "cast",
        "compat.v1.gather",
        "compat.v1.norm",
        "compat.v1.pad",
        "compat.v1.squeeze",
        "compat.v1.transpose",
        "concat",
        "expand_dims",
        "identity",
        "image.resize",
        "linalg.matmul",
        "math.abs",
        "math.add",
        "math.argmax",
        "math.divide",
        "math.equal",
        "math.multiply",
        "math.negative",
        "math.reduce_max",
        "math.reduce_mean",
        "math.reduce_sum",
        "math.rsqrt",
        "math.sigmoid",
        "math.sqrt",
        "math.subtract",
        "math.tanh",
        "math.top_k",
        "math.truediv",
        "nn.gelu",
        "nn.relu",
        "nn.relu6",
        "nn.silu",
        "nn.softmax",
        "reshape",
        "slice",
        "split",
        "stack",
        "strided_slice",
        "unstack",
    }
)
_IMX500_FIX = {
    "Rescaling": "write the scaling as tensor arithmetic (x * scale + offset) instead",
    "Normalization": "write the normalisation as tensor arithmetic ((x - mean) / std) instead",
    "GlobalMaxPooling2D": "use GlobalAveragePooling2D, or cut the base before it",
}


def unsupported_layers(model: keras.Model) -> list[str]:
    """Describe each layer (nested models included) that MCT cannot quantize and export."""
    problems = []
    for path, layer in iter_layers(model):
        cls = type(layer)
        module = cls.__module__ or ""
        where = f'layer "{path}" ({cls.__name__})'
        if "saved_model.load" in module:
            problems.append(
                f"{where} was loaded from a SavedModel without its Python class, so the "
                "quantized model cannot be saved"
            )
        elif module.split(".")[0] not in _BUILTIN_LAYER_PACKAGES:
            problems.append(
                f"{where} is a custom layer (from {module}); MCT quantizes built-in Keras "
                "layers only"
            )
        elif isinstance(layer, keras.layers.Lambda):
            problems.append(
                f"{where} holds Python code, which the quantized .keras file cannot carry and "
                "the IMX500 converter cannot read"
            )
    return problems


def check_quantizable(model: keras.Model) -> None:
    """Refuse, before any calibration, a model with layers MCT cannot quantize or export."""
    _refuse(
        unsupported_layers(model),
        "The model cannot be quantized for the IMX500",
        "Rebuild the base model (source_keras_model) from built-in Keras layers, or set "
        '"quantize": false in configuration.json to skip quantization.',
    )


def unconvertible_layers(model: keras.Model) -> list[str]:
    """Describe each layer (nested models included) that the IMX500 converter cannot map."""
    problems = []
    for path, layer in iter_layers(model):
        kind = type(layer).__name__
        where = f'layer "{path}" ({kind})'
        if kind == "TFOpLambda":
            op = layer.get_config().get("function")
            if op not in IMX500_TF_OPS:
                problems.append(f"{where} runs tf.{op}, an operation the converter does not map")
        elif kind not in IMX500_LAYERS:
            fix = _IMX500_FIX.get(
                kind,
                "replace it with a layer the converter maps, or cut "
                "the base model before it in remove_top_layer_if_needed()",
            )
            problems.append(f"{where} is not a layer the converter maps: {fix}")
    return problems


def check_convertible(model: keras.Model) -> None:
    """Refuse, before any calibration, a model the IMX500 converter would refuse."""
    problems = unconvertible_layers(model)
    _refuse(
        problems,
        f"Sony's IMX500 converter would refuse the model ({len(problems)} "
        f"layer{'s' if len(problems) > 1 else ''})",
        "Change the base model (source_keras_model) or remove_top_layer_if_needed(), or set "
        '"convert_for_imx500": false in configuration.json to quantize without converting.',
    )


def _refuse(problems: list[str], headline: str, fix: str) -> None:
    """Raise one TLError listing every problem, with what to do; nothing when there is none."""
    if problems:
        listed = "\n".join(f"- {problem}" for problem in problems)
        raise TLError(f"{headline}:\n{listed}\n{fix}")


def iter_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield (path, layer) for every layer, descending into nested models ("base/conv1")."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, f"{path}/")
        else:
            yield path, layer
