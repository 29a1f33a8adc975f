"""tl_helpers: transfer-learn an image classifier for an edge AI camera, from a notebook.

Modules follow the data's path and import on demand (`tl_helpers.config` needs no TensorFlow):
config -> dataset -> model -> train -> export -> evaluate.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "config",
    "dataset",
    "errors",
    "evaluate",
    "export",
    "inference",
    "model",
    "train",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
