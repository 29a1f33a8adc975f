"""Top-1 of the saved model on the validation images: reload from disk, batched inference."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers.dataset import ImageFolder
from tl_helpers.export import write_json
from tl_helpers.inference import INFERENCE_BATCH_SIZE, predict_images

keras = tf.keras

RESULTS_FILE = "results.json"


def load_saved_model(model_dir: str | Path) -> keras.Model:
    """Reload the transfer-learned Keras SavedModel (what the camera toolchain will read)."""
    return keras.models.load_model(model_dir, compile=False)


def classification_report(
    true_ids: np.ndarray, predicted_ids: np.ndarray, labels: dict[str, int], num_outputs: int
) -> dict:
    """Top-1, per-class accuracy/precision/recall and the confusion matrix, as plain values."""
    true_ids = np.asarray(true_ids, dtype=np.int64)
    predicted_ids = np.asarray(predicted_ids, dtype=np.int64)
    size = max(num_outputs, max(labels.values()) + 1)
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (true_ids, predicted_ids), 1)
    names = sorted(labels, key=labels.get)
    per_class = {}
    for name in names:
        i = labels[name]
        images, correct, predicted = (
            int(matrix[i].sum()),
            int(matrix[i, i]),
            int(matrix[:, i].sum()),
        )
        recall = correct / images if images else None
        precision = correct / predicted if predicted else None
        f1 = None
        if precision and recall:
            f1 = 2 * precision * recall / (precision + recall)
        per_class[name] = {
            "id": i,
            "images": images,
            "correct": correct,
            "accuracy": recall,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    ids = [labels[n] for n in names]
    total = int(true_ids.size)
    correct = int((true_ids == predicted_ids).sum())
    return {
        "top_1_accuracy": correct / total if total else None,
        "num_images": total,
        "num_correct": correct,
        "per_class": per_class,
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class",
            "labels": names,
            "matrix": matrix[np.ix_(ids, ids)].tolist(),
            "predicted_outside_labels": int(
                matrix[np.ix_(ids, [j for j in range(size) if j not in ids])].sum()
            )
            if size > len(ids)
            else 0,
        },
    }


def evaluate_saved_model(
    model_dir: str | Path,
    validation: ImageFolder,
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
) -> dict:
    """Reload the SavedModel and measure Top-1 on every validation image."""
    model = load_saved_model(model_dir)
    probabilities = predict_images(model, validation.paths, image_size, batch_size, "evaluation")
    report = classification_report(
        validation.class_ids,
        probabilities.argmax(axis=1),
        validation.labels,
        probabilities.shape[1],
    )
    report["model"] = str(Path(model_dir))
    report["dataset_validation_dir"] = str(validation.directory)
    report["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return report


def format_results(results: dict) -> str:
    """A short text table: Top-1, then per-class accuracy."""
    lines = [
        f"Top-1 accuracy: {results['top_1_accuracy']:.4f} "
        f"({results['num_correct']}/{results['num_images']} validation images)",
        "",
        f"{'class':<24}{'id':>4}{'images':>8}{'accuracy':>10}",
    ]
    for name, row in results["per_class"].items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"{name:<24}{row['id']:>4}{row['images']:>8}{acc:>10}")
    return "\n".join(lines)


def save_results(results: dict, result_dir: str | Path, configuration: dict | None = None) -> Path:
    """Write results.json atomically into evaluate_result_dir (created if missing)."""
    if configuration is not None:
        results = {**results, "configuration": configuration}
    return write_json(Path(result_dir) / RESULTS_FILE, results)
