"""Atomic outputs: a failed or interrupted save leaves the previous model and results intact."""

from __future__ import annotations

import json

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

    def broken_dump(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.json, "dump", broken_dump)
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
