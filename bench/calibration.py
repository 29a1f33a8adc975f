"""Quantized Top-1 against the number of calibration images (not a test).

For each dataset: train the float classifier once (224 px, MobileNetV2 alpha 0.35, 10 epochs,
batch 32, seed 0, feature cache in --feature-cache), then for each calibration seed and size
quantize it with MCT (the project's settings), export both files, and measure Top-1 of the
quantized .keras and int8 .tflite files on every validation image. Times are wall seconds.

    .venv/bin/python bench/calibration.py --statistics serial  # the published table
    .venv/bin/python bench/calibration.py --datasets clothing10 --sizes 100 500 --seeds 0

Writes OUT/calibration.json and prints a Markdown table (docs/quantization.md has the
published one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["flowers128", "clothing10"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 200, 300, 500])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--calibration-batch-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--statistics",
        choices=["fast", "serial"],
        default="fast",
        help="MCT's statistics collected as the notebook does (tl_helpers.quantize."
        "faster_statistics) or by MCT's own code, one layer after the other",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "calibration")
    parser.add_argument(
        "--feature-cache", type=Path, default=ROOT / "bench" / "out" / "calibration" / "cache"
    )
    return parser.parse_args()


def float_classifier(name: str, epochs: int, cache_dir: Path):
    """Train the float classifier on a dataset; return it, its sets and its Top-1."""
    import numpy as np

    import tl_helpers as tl

    root = SHARED / name
    labels = tl.dataset.read_labels(root / "labels.json")
    train = tl.dataset.scan_image_folder(
        root / "training", labels, role="training", labels_path=root / "labels.json"
    )
    validation = tl.dataset.scan_image_folder(
        root / "validation", labels, role="validation", labels_path=root / "labels.json"
    )
    tl.train.setup_tensorflow(0)
    base = tl.model.load_base_model("", 224, 0.35)
    classifier = tl.model.build_classifier(base, labels, 224)
    features = tl.train.compute_features(classifier, train, validation, 224, cache_dir=cache_dir)
    tl.train.train_head(classifier, features, epochs, 32, verbose=0)
    head = classifier.get_layer(tl.model.PREDICTIONS_LAYER)
    predicted = np.asarray(head(np.asarray(features.validation))).argmax(axis=1)
    top1 = float((predicted == features.validation_ids).mean())
    return classifier, labels, train, validation, top1


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import tl_helpers as tl

    rows = []
    for name in args.datasets:
        classifier, labels, train, validation, float_top1 = float_classifier(
            name, args.epochs, args.feature_cache
        )
        print(f"{name}: float Top-1 {float_top1:.4f}", flush=True)
        for seed in args.seeds:
            for size in args.sizes:
                batches = max(1, size // args.calibration_batch_size)
                paths = tl.calibration.calibration_paths(
                    train, args.calibration_batch_size, batches, seed
                )
                data = tl.calibration.CalibrationData(paths, 224, args.calibration_batch_size)
                start = time.perf_counter()
                quantized = tl.quantize.quantize_model(
                    classifier, data, fast_statistics=args.statistics == "fast"
                )
                mct_seconds = time.perf_counter() - start
                with tempfile.TemporaryDirectory(dir=args.out) as work:
                    start = time.perf_counter()
                    folder = tl.quantize.export_quantized(quantized, work)
                    export_seconds = time.perf_counter() - start
                    files = quantized_files(
                        folder, len(paths), args.calibration_batch_size, mct_seconds, export_seconds
                    )
                    start = time.perf_counter()
                    reports = tl.quantized_evaluation.evaluate_quantized(files, validation, 224)
                    eval_seconds = time.perf_counter() - start
                row = {
                    "dataset": name,
                    "statistics": args.statistics,
                    "seed": seed,
                    "calibration_images": len(paths),
                    "float_top_1": float_top1,
                    "keras_top_1": reports["quantized_keras"]["top_1_accuracy"],
                    "tflite_top_1": reports["quantized_tflite"]["top_1_accuracy"],
                    "mct_seconds": round(mct_seconds, 1),
                    "export_seconds": round(export_seconds, 1),
                    "evaluation_seconds": round(eval_seconds, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                result = {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "load_average": os.getloadavg(),
                    "rows": rows,
                }
                (args.out / "calibration.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(rows))


def quantized_files(
    folder: Path,
    images: int,
    batch_size: int,
    mct_seconds: float = 0.0,
    export_seconds: float = 0.0,
):
    """The QuantizedModel record of an export_quantized folder (TPC 1.0), for its evaluation."""
    import tl_helpers as tl

    return tl.quantize.QuantizedModel(
        folder,
        folder / tl.quantize.KERAS_FILE,
        folder / tl.quantize.TFLITE_FILE,
        "1.0",
        images,
        batch_size,
        mct_seconds,
        export_seconds,
        {},
    )


def markdown_table(rows: list[dict]) -> str:
    """One line per dataset, seed and calibration size."""
    lines = [
        "| dataset | seed | calibration images | float | .keras | .tflite | MCT s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['calibration_images']} | "
            f"{r['float_top_1']:.4f} | {r['keras_top_1']:.4f} | {r['tflite_top_1']:.4f} | "
            f"{r['mct_seconds']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
