"""Top-1 and time of head-only training vs fine-tuning the top of the base (not a test).

For each dataset (224 px, MobileNetV2 alpha 0.35 with its bundled weights, batch 32, head 10
epochs at Adam 0.001, a feature store of its own under OUT, empty at the start) and each
`augmentation` setting and cut: the backbone passes that fill the store (the images as they
are, then each view), timed once; then for each seed the head is trained on the pooled
features (`train.train_head`), its Top-1 measured, then the base above the cut and the head
are fine-tuned (`train.fine_tune`: Adam, cosine decay from --learning-rate; with the "noise"
view of each training image as well, as `fine_tune_noise` does by default, unless --no-noise;
with --quantized-rows, those rows (or, with --no-noise, the images as they are) go through
the lower part quantized by MCT, as `fine_tune_quantized` does when `quantize` is on)
and Top-1 measured again, on every validation image (never augmented; nothing is chosen on it
within a run).
"first run" = the passes + the pooled features from the activations + head training +
fine-tuning, seed 0: what features and training cost on a first run. With `--quantize`, each
row's first-seed fine-tuned classifier is quantized with the notebook's default calibration
(200 training images, 4 batches of 50, seed 0) and its quantized .keras / .tflite Top-1
measured on every validation image; `--quantize-every-seed` quantizes every seed's, and
`--calibration-seeds 0 1 2` draws the 200 images once per seed given (a second table gives
the mean and the worst change against the float model over all those quantizations).

    .venv/bin/python bench/finetune.py --quantize          # the published table
    .venv/bin/python bench/finetune.py --datasets clothing5 --seeds 0 --out /tmp/ft
    .venv/bin/python bench/finetune.py --datasets clothing10 --settings mirror_crop \
        --seeds 0 1 2 3 --quantize --quantize-every-seed --calibration-seeds 0 1 2

Writes OUT/finetune.json (with each epoch's val_accuracy, for the record) and prints a
Markdown table (docs/fine-tuning.md has the published one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from augmentation import DATASETS, load_sets, quantized_top1, run_all, top1  # beside this

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--settings", nargs="+", default=["none", "mirror_crop"])
    parser.add_argument("--cuts", nargs="+", default=["block_12_add"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10, help="head epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="fine-tuning's")
    parser.add_argument("--constant-lr", action="store_true", help="no cosine decay")
    parser.add_argument(
        "--no-noise", dest="noise", action="store_false", help="fine_tune_noise off"
    )
    parser.add_argument(
        "--quantized-rows",
        action="store_true",
        help="fine_tune_quantized: the fine-tuning-only rows go through the quantized lower part",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--label-smoothing", type=float, default=0.0, help="of head training and fine-tuning"
    )
    parser.add_argument("--quantize", action="store_true", help="quantized Top-1 of seed 0")
    parser.add_argument(
        "--quantize-every-seed", action="store_true", help="with --quantize: every seed's"
    )
    parser.add_argument(
        "--calibration-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="with --quantize: one quantization per seed of the calibration draw (0)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "finetune")
    parser.add_argument("--json-name", default="finetune.json")
    return parser.parse_args()


def timed_passes(
    classifier, train, validation, views, cut, cache_dir, seconds, noise, quantization=None
) -> dict:
    """Seconds of the backbone (lower part) pass of the images as they are, of each view and
    of the fine-tuning-only rows: with `quantization`, MCT's quantization of the lower part and
    its pass ("quantized"), else with `noise` the noise view; added to `seconds` (view ->
    seconds) for those it does not have yet (their activations are in the store already)."""
    import tl_helpers as tl

    passes = [(view, views[:number], False, None) for number, view in enumerate(("", *views))]
    if quantization is not None:  # of the noise view with `noise`, as in the notebook
        passes.append(("quantized", views, noise, quantization))
    elif noise:
        passes.append(("noise", views, True, None))
    for view, done, with_noise, lower in passes:
        if (view or "as is") in seconds:
            continue
        start = time.perf_counter()
        tl.train.compute_features(
            classifier,
            train,
            validation,
            224,
            cache_dir=cache_dir,
            views=done,
            fine_tune_cut=cut,
            fine_tune_noise=with_noise,
            quantization=lower,
        )
        seconds[view or "as is"] = time.perf_counter() - start
    return seconds


def run_dataset(name: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one dataset: one per setting, cut and seed."""
    import tl_helpers as tl

    labels, train, validation = load_sets(name)
    quantization = None
    if args.quantized_rows:  # the notebook's default calibration: 4 x 50 images, seed 0
        paths = tl.calibration.calibration_paths(train, 50, 4, 0)
        quantization = tl.quantize.LowerQuantization(tuple(paths), 224, 50, "1.0")
    rows = []
    timed: dict[str, dict[str, float]] = {cut: {} for cut in args.cuts}
    for setting in args.settings:
        views = tl.augment.views_of(setting)
        for cut in args.cuts:
            tl.train.setup_tensorflow(0)
            base = tl.model.load_base_model("", 224, 0.35)
            original = base.get_weights()
            classifier = tl.model.build_classifier(base, labels, 224)
            cache_dir = args.out / "feature_cache" / name
            timed_passes(
                classifier,
                train,
                validation,
                views,
                cut,
                cache_dir,
                timed[cut],
                args.noise,
                quantization,
            )
            extra = ("quantized",) if quantization else ("noise",) if args.noise else ()
            passed = ("as is", *views, *extra)
            passes = {view: timed[cut][view] for view in passed}
            for seed in args.seeds:
                base.set_weights(original)  # as loaded: the pooled features are the base's
                start = time.perf_counter()
                features = tl.train.compute_features(
                    classifier,
                    train,
                    validation,
                    224,
                    cache_dir=cache_dir,
                    views=views,
                    fine_tune_cut=cut,
                    fine_tune_noise=args.noise,
                    quantization=quantization,
                )
                pooled_seconds = time.perf_counter() - start  # store read + pooled features
                tl.train.setup_tensorflow(seed)
                start = time.perf_counter()
                tl.train.train_head(
                    classifier,
                    features,
                    args.epochs,
                    args.batch_size,
                    verbose=0,
                    label_smoothing=args.label_smoothing,
                )
                head_seconds = time.perf_counter() - start
                head_top1 = top1(classifier, features)
                start = time.perf_counter()
                history = tl.train.fine_tune(
                    classifier,
                    features,
                    args.fine_tune_epochs,
                    args.batch_size,
                    args.learning_rate,
                    verbose=0,
                    decay=not args.constant_lr,
                    label_smoothing=args.label_smoothing,
                )
                fine_seconds = time.perf_counter() - start
                row = {
                    "dataset": name,
                    "augmentation": setting,
                    "cut": cut,
                    "seed": seed,
                    "training_rows": len(features.train),
                    "fine_tune_rows": len(features.train_activations),
                    "fine_tune_noise": args.noise,
                    "fine_tune_quantized": quantization is not None,
                    "label_smoothing": args.label_smoothing,
                    "activation_size": features.split.size,
                    "head_top1": head_top1,
                    "fine_tuned_top1": top1(classifier, features),
                    "val_accuracy_per_epoch": history.history.get("val_accuracy"),
                    "pass_seconds": passes,
                    "pooled_seconds": pooled_seconds,
                    "head_seconds": head_seconds,
                    "fine_tune_seconds": fine_seconds,
                    "first_run_seconds": sum(passes.values()) + head_seconds + fine_seconds,
                }
                if args.quantize and (args.quantize_every_seed or seed == args.seeds[0]):
                    by_draw = {
                        draw: quantized_top1(
                            classifier, train, validation, args.out, 4, calibration_seed=draw
                        )
                        for draw in args.calibration_seeds
                    }
                    row["quantized_top1"] = by_draw[args.calibration_seeds[0]]
                    row["quantized_by_calibration_seed"] = by_draw
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per dataset, setting and cut, seeds side by side."""
    seeds = sorted({row["seed"] for row in rows})
    head = ["dataset", "augmentation", "cut", "training rows", "fine-tuning rows"]
    head += [f"head / fine-tuned seed {seed}" for seed in seeds] + ["mean head / fine-tuned"]
    head += ["backbone passes (s)", "head + fine-tune (s)", "first run (s)"]
    head += ["quantized .keras / .tflite"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["dataset"], r["augmentation"], r["cut"]) for r in rows))
    for key in keys:
        group = [r for r in rows if (r["dataset"], r["augmentation"], r["cut"]) == key]
        by_seed = {r["seed"]: r for r in group}
        first = group[0]
        mean = [sum(r[k] for r in group) / len(group) for k in ("head_top1", "fine_tuned_top1")]
        quantized = (by_seed[seeds[0]] if seeds[0] in by_seed else first).get("quantized_top1")
        cells = [*key, f"{first['training_rows']:,}", f"{first.get('fine_tune_rows', 0):,}"]
        cells += [
            f"{by_seed[s]['head_top1']:.4f} / {by_seed[s]['fine_tuned_top1']:.4f}"
            if s in by_seed
            else ""
            for s in seeds
        ]
        cells += [f"{mean[0]:.4f} / {mean[1]:.4f}"]
        cells += [" + ".join(f"{v:.1f}" for v in first["pass_seconds"].values())]
        cells += [f"{first['head_seconds']:.1f} + {first['fine_tune_seconds']:.1f}"]
        cells += [f"{first['first_run_seconds']:.1f}"]
        cells += [f"{quantized['keras']:.4f} / {quantized['tflite']:.4f}" if quantized else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    quantized_lines = changes_table(rows)
    return "\n".join(lines + ([""] + quantized_lines if quantized_lines else []))


def changes_table(rows: list[dict]) -> list[str]:
    """Quantized minus float Top-1 in points (.keras / .tflite): every quantization of a
    dataset, setting and cut (each quantized seed x calibration draw), their mean and worst."""
    head = "| dataset | augmentation | cut | quantizations | changes (seed.draw: .keras / .tflite)"
    lines = [head + " | mean | worst |", "|" + "---|" * 7]
    keys = list(dict.fromkeys((r["dataset"], r["augmentation"], r["cut"]) for r in rows))
    for key in keys:
        changes = []  # (label, keras points, tflite points)
        for row in rows:
            if (row["dataset"], row["augmentation"], row["cut"]) != key:
                continue
            for draw, top in row.get("quantized_by_calibration_seed", {}).items():
                keras, tflite = (
                    100 * (top[k] - row["fine_tuned_top1"]) for k in ("keras", "tflite")
                )
                changes.append((f"{row['seed']}.{draw}", keras, tflite))
        if not changes:
            continue
        listed = ", ".join(f"{label}: {k:+.1f} / {t:+.1f}" for label, k, t in changes)
        mean = [sum(c[i] for c in changes) / len(changes) for i in (1, 2)]
        worst = [min(c[i] for c in changes) for i in (1, 2)]
        cells = [*key, str(len(changes)), listed, "{:+.1f} / {:+.1f}".format(*mean)]
        cells.append("{:+.1f} / {:+.1f}".format(*worst))
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def main() -> None:
    run_all(parse_args(), run_dataset, table)


if __name__ == "__main__":
    main()
