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


def test_top_score_ties_counts_shared_maxima_and_true_classes_not_taken():
    step = 1 / 256  # 8-bit outputs
    scores = (
        np.array(
            [
                [90, 90, 76],  # tie of 0 and 1, true 1: argmax takes 0 -> not taken
                [90, 90, 76],  # same tie, true 0: taken
                [50, 103, 103],  # tie of 1 and 2, true 0 not tied
                [200, 50, 6],  # no tie
                [85, 85, 86],  # equal runners-up below the top: no tie
            ]
        )
        * step
    )
    true = np.array([1, 0, 0, 0, 0])
    assert evaluate.top_score_ties(scores, true) == {"images": 3, "true_class_not_taken": 1}
    float_scores = np.array([[0.4, 0.4 + 1e-7, 0.2 - 1e-7]])  # float: no exact tie
    assert evaluate.top_score_ties(float_scores, np.array([0]))["images"] == 0


def test_save_results_is_json_with_reference_key(tmp_path):
    r = evaluate.classification_report(np.array([0, 1]), np.array([0, 0]), {"a": 0, "b": 1}, 2)
    path = evaluate.save_results(r, tmp_path / "new" / "dir", configuration={"epochs": 3})
    data = json.loads(path.read_text())
    assert path.name == "results.json"
    assert data["top_1_accuracy"] == 0.5
    assert data["configuration"] == {"epochs": 3}
