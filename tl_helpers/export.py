"""Write the trained model: a failed, interrupted or killed run leaves the previous model and
its labels.json intact (see tl_helpers.atomic)."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from tl_helpers.atomic import (
    recover_copy,
    recover_leftovers,
    remove,
    replace_directory,  # noqa: F401  (part of this module's interface: export.replace_directory)
    replace_directory_with_copy,
    temporary_sibling,
    write_json,
)
from tl_helpers.progress import ticking, without_tensorflow_notices

keras = tf.keras

SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"


def save_model(model: keras.Model, output_dir: str | Path, labels: dict[str, int]) -> Path:
    """Save `model` as a Keras SavedModel at output_dir/saved_model, labels.json beside it.

    The SavedModel has a `serving_default` signature (image -> predictions) and labels.json in
    its assets. It is written to a temporary sibling and swapped in only when complete; the
    labels.json beside it is a copy of the one in its assets, never of another model's. What
    killed runs left in output_dir is recovered first.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / SAVED_MODEL_DIR
    inner_labels = f"assets/{LABELS_FILE}"
    recover_leftovers(output_dir)
    recover_copy(final / inner_labels, output_dir / LABELS_FILE)
    ordered = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    tmp = temporary_sibling(final)
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
        write_json(tmp / inner_labels, ordered)
        replace_directory_with_copy(tmp, final, inner_labels, output_dir / LABELS_FILE)
    except BaseException:
        remove(tmp)
        raise
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
