"""Top-1 of the saved model on the validation images: reload from disk, batched inference."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers.atomic import write_json
from tl_helpers.cache import describable_key
from tl_helpers.dataset import ImageFolder, iter_batches
from tl_helpers.inference import INFERENCE_BATCH_SIZE, predict_images
from tl_helpers.model import feature_extractor
from tl_helpers.progress import ticking
from tl_helpers.store import feature_batches
from tl_helpers.train import Features

keras = tf.keras

RESULTS_FILE = "results.json"
# Evaluation from the training pass's features is checked against the whole reloaded model on
# this many validation images; probabilities may differ by float rounding only.
CHECK_IMAGES = 32
# The check runs the reloaded model eagerly, this many images a call: one call on all 32 at
# 224 px holds about 290 MB of MobileNetV2's activations at once, 8 about 90 MB
# (docs/performance.md), and this step set the kernel's peak.
CHECK_BATCH_SIZE = 8
CHECK_TOLERANCE = 1e-4
FEATURE_BATCH_SIZE = 4096  # validation features read from the store per head call
FULL_PASS = "saved model on every validation image"  # results["evaluation"]["method"]


def load_saved_model(model_dir: str | Path) -> keras.Model:
    """Reload the transfer-learned Keras SavedModel (what the camera toolchain will read)."""
    with ticking(f"Loading the SavedModel {model_dir}"):
        return keras.models.load_model(model_dir, compile=False)


def top_score_ties(scores: np.ndarray, true_ids: np.ndarray) -> dict[str, int]:
    """Count the images whose highest score is shared by two or more classes.

    Quantized models output 8-bit scores (steps of 1/256), so classes can tie at the top, and
    Top-1 (argmax) then takes the lowest class id. `true_class_not_taken`: ties in which the
    true class is one of the tied classes but not the one Top-1 takes.
    """
    scores = np.asarray(scores)
    true_ids = np.asarray(true_ids, dtype=np.int64)
    tied = scores == scores.max(axis=1, keepdims=True)
    ties = tied.sum(axis=1) > 1
    true_tied = tied[np.arange(len(true_ids)), true_ids]
    return {
        "images": int(ties.sum()),
        "true_class_not_taken": int((ties & true_tied & (scores.argmax(axis=1) != true_ids)).sum()),
    }


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
    *,
    features: Features | None = None,
) -> dict:
    """Reload the SavedModel and measure Top-1 on every validation image.

    With `features` (this run's `train.compute_features`), the validation images are not run
    through the base a second time: the reloaded model's own head runs on the features the
    training pass computed, once the reloaded base is shown to be the base that computed them
    (see `head_on_features`). Otherwise the whole reloaded model runs on every image.
    """
    model = load_saved_model(model_dir)
    probabilities, method = None, {"method": FULL_PASS}
    if features is not None:
        probabilities, method = head_on_features(model, validation, image_size, features)
    if probabilities is None:
        probabilities = predict_images(
            model, validation.paths, image_size, batch_size, "evaluation"
        )
    report = classification_report(
        validation.class_ids,
        probabilities.argmax(axis=1),
        validation.labels,
        probabilities.shape[1],
    )
    report["misclassified"] = misclassified_images(
        validation.paths, validation.class_ids, probabilities, validation.labels
    )
    report["evaluation"] = method
    report["model"] = str(Path(model_dir))
    report["dataset_validation_dir"] = str(validation.directory)
    report["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return report


def head_on_features(
    model: keras.Model, validation: ImageFolder, image_size: int, features: Features
) -> tuple[np.ndarray | None, dict]:
    """The reloaded model's predictions from the training pass's validation features.

    Used only when the reloaded model's part up to the pooled features has the architecture
    and weights of the extractor that computed them (same feature-cache key) and the whole
    reloaded model gives the same probabilities on a batch of validation images: then running
    its head on the features is running the saved model on the images, minus a second pass of
    the base. Returns (None, reason) when any of this does not hold.
    """
    fallback = {"method": FULL_PASS}
    if features.validation is None or features.validation_paths != tuple(
        map(str, validation.paths)
    ):
        return None, {**fallback, "why": "the features are not of these validation images"}
    try:
        extractor = feature_extractor(model)
        head = keras.Model(extractor.outputs, model.outputs)
    except (KeyError, ValueError) as err:
        return None, {**fallback, "why": f"the reloaded model cannot be split ({err})"}
    if features.model_key is None or describable_key(extractor, image_size) != features.model_key:
        return None, {**fallback, "why": "its base differs from the one that computed features"}
    probabilities = np.concatenate(
        [
            head(batch, training=False).numpy()
            for batch in feature_batches(features.validation, FEATURE_BATCH_SIZE)
        ]
    )
    # Images spread over the whole (class-sorted) list, so every class is likely checked.
    rows = np.unique(np.linspace(0, len(validation) - 1, CHECK_IMAGES).round().astype(int))
    check = len(rows)
    images = next(iter_batches([validation.paths[i] for i in rows], image_size, check))
    full = np.concatenate(
        [
            model(images[start : start + CHECK_BATCH_SIZE], training=False).numpy()
            for start in range(0, check, CHECK_BATCH_SIZE)
        ]
    )
    difference = float(np.abs(full - probabilities[rows]).max())
    if difference > CHECK_TOLERANCE:
        print(
            f"Warning: the saved model and its head on the training pass's features differ by "
            f"{difference:.2g} on {check} validation images; running the whole model instead."
        )
        return None, {**fallback, "why": f"check failed (difference {difference:.2g})"}
    print(
        f"evaluation: {len(validation)} validation images, from the features of the training "
        f"pass (same base, verified on {check} images)"
    )
    return probabilities, {
        "method": "saved model's head on the validation features of its own base",
        "checked_images": check,
        "max_probability_difference": difference,
    }


def misclassified_images(
    paths: list[str], true_ids: np.ndarray, probabilities: np.ndarray, labels: dict[str, int]
) -> list[dict]:
    """The images the model got wrong, most confident mistake first, for the user to look at."""
    names = {class_id: name for name, class_id in labels.items()}
    true_ids = np.asarray(true_ids, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != true_ids)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [
        {
            "image": str(paths[i]),
            "true": names[int(true_ids[i])],
            "predicted": names.get(int(predicted[i]), f"output {int(predicted[i])} (no class)"),
            "confidence": round(float(confidence[i]), 4),
        }
        for i in wrong
    ]


def format_results(results: dict) -> str:
    """A short text table: Top-1, then per-class images, precision, recall and F1."""
    width = max([7, *map(len, results["per_class"])]) + 2
    lines = [
        f"Top-1 accuracy: {results['top_1_accuracy']:.4f} "
        f"({results['num_correct']}/{results['num_images']} validation images)",
        "",
        f"{'class':<{width}}{'id':>4}{'images':>8}{'correct':>9}"
        f"{'precision':>11}{'recall':>8}{'F1':>7}",
    ]
    for name, row in results["per_class"].items():
        lines.append(
            f"{name:<{width}}{row['id']:>4}{row['images']:>8}{row['correct']:>9}"
            f"{_score(row['precision']):>11}{_score(row['recall']):>8}{_score(row['f1']):>7}"
        )
    lines += [
        "",
        "recall: share of the class's images classified correctly (the class's accuracy)",
        "precision: share of the images predicted as the class that are that class",
        "F1: harmonic mean of precision and recall; -: undefined (no images / never predicted)",
    ]
    return "\n".join(lines)


def _score(value: float | None) -> str:
    """A 0-1 score with 3 decimals, or "-" when it is undefined."""
    return "-" if value is None else f"{value:.3f}"


def save_results(results: dict, result_dir: str | Path, configuration: dict | None = None) -> Path:
    """Write results.json atomically into evaluate_result_dir (created if missing)."""
    if configuration is not None:
        results = {**results, "configuration": configuration}
    return write_json(Path(result_dir) / RESULTS_FILE, results)
