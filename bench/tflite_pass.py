"""The base's pass in TensorFlow against TFLite's CPU path (`tl_helpers.inference.backbone_runner`):
images per second of the model alone and of the whole pass over photos, and how far the outputs
differ (not a test; docs/performance.md, "The base's passes on TFLite").

    .venv/bin/python bench/tflite_pass.py [--dataset flowers128] [--images 2000] [--rounds 2]

Models: the default classifier's pooled features (MobileNetV2 alpha 0.35 with its bundled
weights, 224 px) and its base below the default fine-tuning cut (`block_12_add`, the rows
fine-tuning trains on). "model alone": 256 random images, batches of 16, best of 3 timings.
"pass": `inference.predict_batches` over the first IMAGES training photos, as is and mirrored
(JPEG decoding, resizing and the view in tf.data, as the notebook's pass), the runner's
conversion included. TensorFlow and TFLite alternate, ROUNDS times each, in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SIZE = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="flowers128")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import tensorflow as tf

    import tl_helpers as tl

    tl.train.setup_tensorflow(0)
    base = tl.model.load_default_base_model(SIZE, 0.35)
    classifier = tl.model.build_classifier(base, {f"class{i}": i for i in range(10)}, SIZE)
    models = {
        "pooled features": tl.model.feature_extractor(classifier),
        "below block_12_add": tl.finetune.split_for(classifier, "").lower,
    }
    runners = {
        "TensorFlow": tl.inference.keras_runner,
        "TFLite": tl.inference.backbone_runner,
    }
    photos = sorted(str(path) for path in (DATASETS / args.dataset / "training").glob("*/*"))
    photos = photos[: args.images]
    random = np.random.default_rng(0).uniform(0, 255, (256, SIZE, SIZE, 3)).astype(np.float32)
    for name, model in models.items():
        outputs = {}
        for round_ in range(args.rounds):
            for kind, make in runners.items():
                run = make(model, SIZE)
                run(tf.constant(random[:16]))
                best = np.inf
                for _ in range(3):
                    start = time.perf_counter()
                    for first in range(0, len(random), 16):
                        run(tf.constant(random[first : first + 16]))
                    best = min(best, time.perf_counter() - start)
                start = time.perf_counter()
                run = make(model, SIZE)  # a new runner: the pass pays its conversion
                outputs[kind] = tl.inference.predict_batches(run, photos, SIZE, view=["", "mirror"])
                seconds = time.perf_counter() - start
                print(
                    f"{name}, round {round_ + 1}, {kind}: model alone "
                    f"{len(random) / best:.0f} images/s; pass over {len(photos)} photos x 2 "
                    f"views {seconds:.1f} s ({2 * len(photos) / seconds:.0f} rows/s)",
                    flush=True,
                )
        difference = np.abs(outputs["TFLite"] - outputs["TensorFlow"])
        print(
            f"{name}: largest difference {difference.max():.2g} (largest value "
            f"{np.abs(outputs['TensorFlow']).max():.3g}), mean {difference.mean():.2g}"
        )


if __name__ == "__main__":
    main()
