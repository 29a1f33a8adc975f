"""tl_helpers: transfer-learn an image classifier for an edge AI camera, from a notebook.

Modules follow the data's path and import on demand (`tl_helpers.config` needs no TensorFlow):
config -> dataset -> model -> train -> export -> evaluate
(-> quantize -> quantized_evaluation -> convert, optional).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "atomic",
    "augment",
    "cache",
    "calibration",
    "compat",
    "config",
    "convert",
    "dataset",
    "distribute",
    "errors",
    "evaluate",
    "export",
    "inference",
    "model",
    "plots",
    "progress",
    "quantize",
    "quantized_evaluation",
    "startup",
    "store",
    "tflite",
    "train",
)


def preload() -> None:
    """Import TensorFlow, the modules the notebook uses, and build the configuration validator,
    now.

    The notebook calls this in its first cell, so that later cells doing no heavy work answer
    at once (importing jsonschema alone can take 2 s). TensorFlow comes first, imported without
    its start-up notices on stderr (see tl_helpers.startup). MCT is still imported only when
    quantization runs.
    """
    from tl_helpers.startup import import_tensorflow

    import_tensorflow()
    modules = ("config", "dataset", "model", "train", "export", "evaluate", "plots", "quantize")
    for name in (*modules, "quantized_evaluation", "convert"):
        importlib.import_module(f"{__name__}.{name}")
    from tl_helpers import config

    config._validator()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
