"""Atomic writes: a failed or interrupted run leaves the previous model and results intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from tl_helpers.progress import ticking, without_tensorflow_notices

keras = tf.keras

SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"


def write_json(path: str | Path, data: object) -> Path:
    """Write JSON to a temporary sibling, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text to a temporary sibling, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def replace_directory(new: Path, final: Path) -> None:
    """Move the complete directory `new` to `final`, replacing what was there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        _remove(old)


def save_model(model: keras.Model, output_dir: str | Path, labels: dict[str, int]) -> Path:
    """Save `model` as a Keras SavedModel at output_dir/saved_model, labels.json beside it.

    The SavedModel has a `serving_default` signature (image -> predictions) and a copy of
    labels.json in its assets. It is written to a temporary sibling and moved into place
    only when complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / SAVED_MODEL_DIR
    ordered = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{SAVED_MODEL_DIR}.tmp-", dir=output_dir))
    try:
        with ticking(f"Writing the SavedModel to {final}"), without_tensorflow_notices():
            # Models made of Keras's own layers are rebuilt from their config on loading, so
            # the per-layer traces (slow to write and to read) are not needed; custom layers
            # keep them.
            model.save(
                tmp,
                save_format="tf",
                include_optimizer=False,
                save_traces=not only_builtin_layers(model),
                signatures={"serving_default": serving_function(model)},
            )
        write_json(tmp / "assets" / LABELS_FILE, ordered)
        replace_directory(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    write_json(output_dir / LABELS_FILE, ordered)
    return final


def serving_function(model: keras.Model) -> tf.types.experimental.ConcreteFunction:
    """The SavedModel's serving signature: raw RGB images -> class probabilities."""
    spec = tf.TensorSpec(model.inputs[0].shape, model.inputs[0].dtype, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {"predictions": model(image, training=False)}

    return serve.get_concrete_function()


def only_builtin_layers(model: keras.layers.Layer) -> bool:
    """True when every layer (nested models included) is one of Keras's own classes.

    Layers Keras revived from a SavedModel's traces (custom layers) do not count.
    """
    module = type(model).__module__
    if not module.startswith("keras.") or ".saved_model." in module:
        return False
    return all(only_builtin_layers(layer) for layer in getattr(model, "layers", []))


def _remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
