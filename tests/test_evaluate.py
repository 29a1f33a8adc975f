"""Top-1, per-class figures and the confusion matrix against labels.json ids."""

from __future__ import annotations

import json

import numpy as np

from tl_helpers import evaluate


def test_report_uses_labels_json_ids():
    labels = {"zebra": 0, "apple": 2}  # id 1 unused
    true = np.array([0, 0, 2, 2, 2])
    pred = np.array([0, 2, 2, 2, 1])  # one prediction of the unused id 1
    r = evaluate.classification_report(true, pred, labels, num_outputs=3)
    assert r["top_1_accuracy"] == 3 / 5
    assert r["num_images"] == 5 and r["num_correct"] == 3
    assert r["per_class"]["zebra"] == {
        "id": 0, "images": 2, "correct": 1, "accuracy": 0.5,
        "precision": 1.0, "recall": 0.5, "f1": 2 * 0.5 / 1.5,
    }  # fmt: skip
    assert r["per_class"]["apple"]["precision"] == 2 / 3
    cm = r["confusion_matrix"]
    assert cm["labels"] == ["zebra", "apple"]
    assert cm["matrix"] == [[1, 1], [0, 2]]
    assert cm["predicted_outside_labels"] == 1


def test_class_without_validation_images():
    r = evaluate.classification_report(np.array([0]), np.array([0]), {"a": 0, "b": 1}, 2)
    assert r["per_class"]["b"]["accuracy"] is None
    assert "b" in evaluate.format_results(r)


def test_save_results_is_json_with_reference_key(tmp_path):
    r = evaluate.classification_report(np.array([0, 1]), np.array([0, 0]), {"a": 0, "b": 1}, 2)
    path = evaluate.save_results(r, tmp_path / "new" / "dir", configuration={"epochs": 3})
    data = json.loads(path.read_text())
    assert path.name == "results.json"
    assert data["top_1_accuracy"] == 0.5
    assert data["configuration"] == {"epochs": 3}
