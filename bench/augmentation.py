"""Top-1 and time of the head trained on the images alone vs with augmented views (not a test).

For each dataset (224 px, MobileNetV2 alpha 0.35 with its bundled weights, batch 32, 10
epochs, a feature cache of its own under OUT): one backbone pass over the training and
validation images as they are, then one pass per view over the training images, each timed
(wall seconds, `time.perf_counter`). Each `augmentation` setting's first run costs the passes
of its views plus its head training: its "first run" column is that sum. Then, for each
setting and seed, the head is trained (`tl_helpers.train.train_head`) and its Top-1 measured
on every validation image (never augmented, never used to choose anything). With
`--quantize`, each setting's first-seed classifier is also quantized with MCT (as
bench/calibration.py does: 500 calibration images in batches of 50) and its quantized
.keras and int8 .tflite Top-1 measured on every validation image.

    .venv/bin/python bench/augmentation.py                        # the published table
    .venv/bin/python bench/augmentation.py --datasets clothing5 --seeds 0 --out /tmp/aug

Writes OUT/augmentation.json and prints a Markdown table (docs/augmentation.md has the
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

from calibration import quantized_files  # bench/calibration.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "flowers128": ROOT.parent / "shared" / "datasets" / "flowers128",
    "clothing10": ROOT.parent / "shared" / "datasets" / "clothing10",
    "clothing5": ROOT / "samples" / "clothing5",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--settings", nargs="+", default=["none", "mirror", "mirror_crop"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quantize", action="store_true", help="quantized Top-1 of seed 0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "augmentation")
    parser.add_argument(
        "--json-name", default="augmentation.json", help="file name of the rows, under OUT"
    )
    return parser.parse_args()


def load_sets(name: str):
    """labels, training and validation sets of a dataset."""
    import tl_helpers as tl

    root = DATASETS[name]
    labels = tl.dataset.read_labels(root / "labels.json")
    scan = tl.dataset.scan_image_folder
    train = scan(root / "training", labels, role="training", labels_path=root / "labels.json")
    validation = scan(
        root / "validation", labels, role="validation", labels_path=root / "labels.json"
    )
    return labels, train, validation


def timed_passes(classifier, train, validation, settings, cache_dir: Path) -> dict[str, float]:
    """Seconds of the backbone pass of the images as they are ("") and of each view."""
    import tl_helpers as tl

    seconds: dict[str, float] = {}
    done: list[str] = []
    for setting in settings:
        for view in ("", *tl.augment.views_of(setting)):
            if view in seconds:
                continue
            start = time.perf_counter()
            views = (*done, view) if view else ()
            tl.train.compute_features(
                classifier, train, validation, 224, cache_dir=cache_dir, views=views
            )
            seconds[view] = time.perf_counter() - start
            if view:
                done.append(view)
    return seconds


def top1(classifier, features) -> float:
    """Top-1 of the classifier's head on the validation features."""
    import numpy as np

    import tl_helpers as tl

    head = classifier.get_layer(tl.model.PREDICTIONS_LAYER)
    predicted = np.asarray(head(np.asarray(features.validation))).argmax(axis=1)
    return float((predicted == features.validation_ids).mean())


def quantized_top1(
    classifier, train, validation, out: Path, batches: int = 10, calibration_seed: int = 0
) -> dict[str, float]:
    """Quantized .keras and int8 .tflite Top-1 on every validation image, quantized as
    bench/calibration.py does (`batches` x 50 calibration images drawn with
    `calibration_seed`; 10 batches = 500 images, the notebook's default is 4), with each
    file's tied top scores and the threshold of the quantized logits."""
    import tl_helpers as tl

    paths = tl.calibration.calibration_paths(train, 50, batches, calibration_seed)
    data = tl.calibration.CalibrationData(paths, 224, 50)
    quantized = tl.quantize.quantize_model(classifier, data)
    with tempfile.TemporaryDirectory(dir=out) as work:
        folder = tl.quantize.export_quantized(quantized, work)
        files = quantized_files(folder, len(paths), 50)
        reports = tl.quantized_evaluation.evaluate_quantized(files, validation, 224)
    return {
        "keras": reports["quantized_keras"]["top_1_accuracy"],
        "tflite": reports["quantized_tflite"]["top_1_accuracy"],
        "keras_ties": reports["quantized_keras"]["top_score_ties"],
        "tflite_ties": reports["quantized_tflite"]["top_score_ties"],
        "logits_threshold": logits_threshold(quantized),
    }


def logits_threshold(quantized) -> float | None:
    """The threshold of the 8-bit quantizer of the logits (the input of the softmax) in
    MCT's quantized model: the logits' grid step is threshold / 128."""
    layers = quantized.layers
    for index, layer in enumerate(layers):
        if "Softmax" in type(layer).__name__ and index > 0:
            config = layers[index - 1].get_config().get("activation_holder_quantizer", {})
            threshold = config.get("config", {}).get("threshold")
            return float(threshold[0]) if threshold else None
    return None


def run_dataset(name: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one dataset: one per setting and seed."""
    import tl_helpers as tl

    labels, train, validation = load_sets(name)
    tl.train.setup_tensorflow(0)
    base = tl.model.load_base_model("", 224, 0.35)
    classifier = tl.model.build_classifier(base, labels, 224)
    cache_dir = args.out / "feature_cache" / name
    passes = timed_passes(classifier, train, validation, args.settings, cache_dir)
    rows = []
    for setting in args.settings:
        views = tl.augment.views_of(setting)
        features = tl.train.compute_features(
            classifier, train, validation, 224, cache_dir=cache_dir, views=views
        )
        for seed in args.seeds:
            tl.train.setup_tensorflow(seed)
            start = time.perf_counter()
            tl.train.train_head(classifier, features, args.epochs, args.batch_size, verbose=0)
            head_seconds = time.perf_counter() - start
            row = {
                "dataset": name,
                "augmentation": setting,
                "views": list(views),
                "seed": seed,
                "training_images": len(train),
                "validation_images": len(validation),
                "training_rows": len(features.train),
                "top1": top1(classifier, features),
                "head_seconds": head_seconds,
                "pass_seconds": {view or "as is": passes[view] for view in ("", *views)},
                "first_run_seconds": sum(passes[v] for v in ("", *views)) + head_seconds,
            }
            if args.quantize and seed == args.seeds[0]:
                row["quantized_top1"] = quantized_top1(classifier, train, validation, args.out)
            print(json.dumps(row))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per dataset and setting, seeds side by side."""
    seeds = sorted({row["seed"] for row in rows})
    head = ["dataset", "augmentation", "training rows"]
    head += [f"Top-1 seed {seed}" for seed in seeds] + ["mean Top-1"]
    head += ["backbone passes (s)", "first run (s, seed 0)", "quantized .keras / .tflite"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((row["dataset"], row["augmentation"]) for row in rows))
    for dataset, setting in keys:
        group = [r for r in rows if (r["dataset"], r["augmentation"]) == (dataset, setting)]
        by_seed = {r["seed"]: r for r in group}
        scores = [by_seed[s]["top1"] for s in seeds if s in by_seed]
        first = group[0]
        quantized = first.get("quantized_top1")
        cells = [dataset, setting, f"{first['training_rows']:,}"]
        cells += [f"{by_seed[s]['top1']:.4f}" if s in by_seed else "" for s in seeds]
        cells += [f"{sum(scores) / len(scores):.4f}"]
        cells += [" + ".join(f"{v:.1f}" for v in first["pass_seconds"].values())]
        cells += [f"{first['first_run_seconds']:.1f}"]
        cells += [f"{quantized['keras']:.4f} / {quantized['tflite']:.4f}" if quantized else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_rows(args: argparse.Namespace, rows: list[dict], markdown: str) -> None:
    """Write the rows (with the machine and the arguments) to OUT/--json-name; print the table."""
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    (args.out / args.json_name).write_text(json.dumps(result, indent=2))
    print(markdown)


def run_all(args: argparse.Namespace, run_dataset, table) -> None:
    """Run `run_dataset(name, args)` for each dataset, then save the rows and print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:
        rows += run_dataset(name, args)
    save_rows(args, rows, table(rows))


def main() -> None:
    run_all(parse_args(), run_dataset, table)


if __name__ == "__main__":
    main()
