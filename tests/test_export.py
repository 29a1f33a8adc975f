"""Atomic outputs: a failed or interrupted save leaves the previous model and results intact."""

from __future__ import annotations

import json
import logging
import os

import pytest
import tensorflow as tf
from conftest import tiny_base_model

from tl_helpers import export, model

keras = tf.keras


def _classifier():
    return model.build_classifier(tiny_base_model(), {"a": 0, "b": 1}, 32)


def test_save_model_writes_savedmodel_and_labels(tmp_path):
    labels = {"b": 1, "a": 0}
    path = export.save_model(_classifier(), tmp_path / "out", labels)
    assert path == tmp_path / "out" / "saved_model"
    assert (path / "saved_model.pb").is_file()
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"a": 0, "b": 1}
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_model(tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    first = export.save_model(_classifier(), out, {"a": 0, "b": 1})
    before = sorted(p.relative_to(first) for p in first.rglob("*"))
    pb = (first / "saved_model.pb").read_bytes()

    new = _classifier()
    original_save = new.save

    def save_then_fail(path, *args, **kwargs):
        original_save(path, *args, **kwargs)  # the files are written ...
        raise failure  # ... then the run dies before the move

    monkeypatch.setattr(new, "save", save_then_fail)
    with pytest.raises(type(failure)):
        export.save_model(new, out, {"a": 0, "b": 1})
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before
    assert (first / "saved_model.pb").read_bytes() == pb
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_write_json_interrupted_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "r" / "results.json"
    export.write_json(target, {"top_1_accuracy": 0.5})

    def interrupted_fsync(fd):
        raise KeyboardInterrupt  # the new content is written, not yet in place

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        export.write_json(target, {"top_1_accuracy": 0.9})
    assert json.loads(target.read_text()) == {"top_1_accuracy": 0.5}
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_replace_directory_replaces_content(tmp_path):
    final, new = tmp_path / "final", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    export.replace_directory(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert not new.exists()


class Doubling(keras.layers.Layer):
    """A custom layer the loading side does not know: Keras revives it from its traces."""

    def call(self, x):
        return x * 2.0


def test_user_savedmodel_with_custom_layer_round_trips(tmp_path):
    import numpy as np

    inputs = keras.Input((32, 32, 3))
    x = Doubling()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, x).save(tmp_path / "user_base", save_format="tf")
    base = model.load_base_model(tmp_path / "user_base", 32)  # no custom_objects: revived
    classifier = model.build_classifier(base, {"a": 0, "b": 1}, 32)
    assert not export.only_builtin_layers(classifier)
    path = export.save_model(classifier, tmp_path / "out", {"a": 0, "b": 1})
    reloaded = keras.models.load_model(path, compile=False)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), classifier.predict(images, verbose=0), atol=1e-5
    )


def test_saved_model_serving_signature_without_keras(tmp_path):
    import numpy as np

    classifier = _classifier()
    path = export.save_model(classifier, tmp_path / "out", {"a": 0, "b": 1})
    assert export.only_builtin_layers(classifier)
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    out = serve(image=tf.constant(images))["predictions"].numpy()
    np.testing.assert_allclose(out, classifier.predict(images, verbose=0), atol=1e-5)
    assert json.loads((path / "assets" / "labels.json").read_text()) == {"a": 0, "b": 1}


def test_save_model_keeps_tensorflow_save_notices_out_of_the_output(tmp_path, caplog):
    # Keras warns "Compiled the loaded model, but the compiled metrics have yet to be built"
    # for any model saved without compile(), and TensorFlow logs where it wrote the assets;
    # neither says anything to the user. Other TensorFlow messages still show.
    with caplog.at_level(logging.INFO, logger="tensorflow"):
        export.save_model(_classifier(), tmp_path, {"a": 0, "b": 1})
        tf.get_logger().info("Assets written to: elsewhere")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["Assets written to: elsewhere"]


def test_save_model_first_recovers_what_killed_runs_left(tmp_path, capsys):
    """Temporary folders of killed runs (any swapped folder) go; a missing labels copy returns."""
    out = tmp_path / "out"
    export.save_model(_classifier(), out, {"a": 0, "b": 1})
    (out / "labels.json").unlink()  # killed between removing the copy and swapping
    (out / ".saved_model.tmp-999999999-x1").mkdir()  # no such process
    (out / ".quantized.tmp-k3x_9a2b").mkdir()  # tempfile.mkdtemp's name
    capsys.readouterr()
    export.save_model(_classifier(), out, {"a": 0, "b": 1})
    printed = capsys.readouterr().out
    assert f"replacing {out / 'quantized'}: removed .quantized.tmp-k3x_9a2b." in printed
    assert f"replacing {out / 'saved_model'}: removed .saved_model.tmp-999999999-x1." in printed
    assert f"Restored {out / 'labels.json'} from " in printed
    assert json.loads((out / "labels.json").read_text()) == {"a": 0, "b": 1}
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
