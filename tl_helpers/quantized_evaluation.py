"""Top-1 of the quantized models: the .keras file and the int8 .tflite file on every validation
image, beside the float model, for results.json and the notebook's comparison table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers.dataset import ImageFolder
from tl_helpers.evaluate import classification_report, top_score_ties
from tl_helpers.inference import INFERENCE_BATCH_SIZE, keras_runner, predict_batches
from tl_helpers.progress import ticking
from tl_helpers.quantize import (
    QUANTIZATION_KEY,
    TARGET_PLATFORM,
    QuantizedModel,
    format_size,
    mct,
    size_bytes,
)
from tl_helpers.tflite import tflite_runner

keras = tf.keras

# Keys added to results.json; "top_1_accuracy" stays the float model's.
KERAS_TOP1_KEY = "quantized_keras_top_1_accuracy"
TFLITE_TOP1_KEY = "quantized_tflite_top_1_accuracy"
# A quantized model more than this many points below the float model (and more than one image:
# one image of a small validation set is not enough) gets a word of advice.
QUANTIZED_LOSS_POINTS = 1.5


def load_quantized_keras(path: str | Path) -> keras.Model:
    """Load MCT's quantized .keras file (its quantizers are MCT custom objects)."""
    with ticking(f"Loading {Path(path).name}"):
        return mct().keras_load_quantized_model(str(path), compile=False)


def evaluate_quantized(
    quantized: QuantizedModel,
    validation: ImageFolder,
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
) -> dict[str, dict]:
    """Top-1 reports of the quantized .keras and int8 .tflite files on every validation image.

    One pass over the images: each decoded batch goes through both models.
    """
    run_keras = keras_runner(load_quantized_keras(quantized.keras_file), image_size)
    run_tflite = tflite_runner(quantized.tflite_file)
    both = predict_batches(
        lambda batch: np.stack([run_keras(batch), run_tflite(batch)], axis=1),
        validation.paths,
        image_size,
        batch_size,
        "quantized Keras and int8 TFLite models",
    )
    keras_probabilities, tflite_probabilities = both[:, 0], both[:, 1]
    reports = {}
    for name, probabilities in (
        ("quantized_keras", keras_probabilities),
        ("quantized_tflite", tflite_probabilities),
    ):
        reports[name] = {
            **classification_report(
                validation.class_ids,
                probabilities.argmax(axis=1),
                validation.labels,
                probabilities.shape[1],
            ),
            "top_score_ties": top_score_ties(probabilities, validation.class_ids),
        }
    return reports


def add_quantized_results(
    results: dict, quantized: QuantizedModel, validation: ImageFolder, image_size: int
) -> dict:
    """Return `results` (the float model's) with the quantized models' Top-1 and details added."""
    reports = evaluate_quantized(quantized, validation, image_size)
    files = {
        "float": results.get("model"),
        "quantized_keras": str(quantized.keras_file),
        "quantized_tflite": str(quantized.tflite_file),
    }
    models = {
        "float": {
            "file": files["float"],
            "size_bytes": size_bytes(files["float"]) if files["float"] else None,
            "top_1_accuracy": results["top_1_accuracy"],
            "num_correct": results["num_correct"],
            "num_images": results["num_images"],
        }
    }
    for name, report in reports.items():
        models[name] = {"file": files[name], "size_bytes": size_bytes(files[name]), **report}
    return {
        **results,
        KERAS_TOP1_KEY: reports["quantized_keras"]["top_1_accuracy"],
        TFLITE_TOP1_KEY: reports["quantized_tflite"]["top_1_accuracy"],
        QUANTIZATION_KEY: {
            "tool": f"model-compression-toolkit {mct().__version__}",
            "target_platform": TARGET_PLATFORM,
            "tpc_version": quantized.tpc_version,
            "settings_changed_from_mct_defaults": quantized.settings,
            "calibration_images": quantized.calibration_images,
            "calibration_batch_size": quantized.calibration_batch_size,
            "quantization_seconds": round(quantized.quantization_seconds, 1),
            "export_seconds": round(quantized.export_seconds, 1),
            "models": models,
        },
    }


def format_comparison(results: dict) -> str:
    """A table of the float, quantized Keras and int8 TFLite models: Top-1, change, file size."""
    models = results[QUANTIZATION_KEY]["models"]
    names = {
        "float": "float (SavedModel)",
        "quantized_keras": "quantized Keras (.keras)",
        "quantized_tflite": "int8 TFLite (.tflite)",
    }
    float_top1 = models["float"]["top_1_accuracy"]
    lines = [f"{'model':<26}{'Top-1':>8}{'correct':>11}{'vs float':>10}{'size':>11}"]
    for key, label in names.items():
        row = models[key]
        change = "" if key == "float" else f"{100 * (row['top_1_accuracy'] - float_top1):+.1f} pt"
        size = "-" if row["size_bytes"] is None else format_size(row["size_bytes"])
        correct = f"{row['num_correct']}/{row['num_images']}"
        lines.append(f"{label:<26}{row['top_1_accuracy']:>8.4f}{correct:>11}{change:>10}{size:>11}")
    folder = Path(models["quantized_keras"]["file"]).parent
    lines.append(f"(size: files on disk; the quantized files are in {folder})")
    for key in ("quantized_keras", "quantized_tflite"):
        ties = models[key].get("top_score_ties") or {}
        if ties.get("images"):
            lines.append(
                f"{names[key]}: {ties['images']} images have classes tied at the top score "
                f"(8-bit outputs); Top-1 takes the lowest class id of the tied, and in "
                f"{ties['true_class_not_taken']} of them the true class was tied but not taken."
            )
    advice = quantization_loss_advice(models, names)
    return "\n".join(lines + ([advice] if advice else []))


def quantization_loss_advice(models: dict, names: dict[str, str]) -> str | None:
    """What to do when a quantized model falls well below the float model, or None.

    The loss belongs mostly to the trained model, not to the calibration images (other draws
    of them lose as much: docs/fine-tuning.md), so the advice is another training run.
    """
    float_model = models["float"]
    lost = []
    for key in ("quantized_keras", "quantized_tflite"):
        row = models[key]
        # Rounded: 1.5 points (3 of 200 images) is within, whatever the float arithmetic.
        points = round(100 * (float_model["top_1_accuracy"] - row["top_1_accuracy"]), 6)
        images = float_model["num_correct"] - row["num_correct"]
        if points > QUANTIZED_LOSS_POINTS and images > 1:
            lost.append(f"{names[key]} {points:.1f} points ({images} images)")
    if not lost:
        return None
    return (
        f"Below the float model by more than {QUANTIZED_LOSS_POINTS} points: "
        + "; ".join(lost)
        + ". Other calibration images seldom change that; another training run usually does: "
        'set another "seed" in configuration.json and run the notebook again (the features are '
        "cached: the base's pass over the photos does not run again). See "
        'docs/fine-tuning.md, "Quantized over seeds and calibration draws".'
    )
