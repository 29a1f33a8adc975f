"""Time of MCT's post-training quantization with the project's statistics collection
(`tl_helpers.quantize.faster_statistics`) against MCT's own, and a check that both give the same
quantized model (not a test; docs/quantization.md, "Less work per statistics update").

    .venv/bin/python bench/mct_statistics.py [--dataset flowers128] [--images 200] [--rounds 2]

The classifier is the default one (MobileNetV2 alpha 0.35 with its bundled weights, 224 px)
with an untrained 10-class head: what MCT's statistics cost depends on the layers' outputs,
not on training. Calibration images: a seeded sample of the dataset's training photos, in
batches of 50 as the notebook does. The two ways alternate, ROUNDS times each, in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="flowers128")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import tl_helpers as tl

    base = tl.model.load_default_base_model(224, 0.35)
    classifier = tl.model.build_classifier(base, {f"class{i}": i for i in range(10)}, 224)
    photos = sorted(str(path) for path in (DATASETS / args.dataset / "training").glob("*/*"))
    order = np.random.default_rng(0).permutation(len(photos))[: args.images]
    paths = [photos[i] for i in order]
    tl.quantize.mct()  # the import is not timed

    models = {}
    for _ in range(args.rounds):
        for fast in (True, False):
            data = tl.calibration.CalibrationData(paths, 224, 50)
            wall, cpu = time.perf_counter(), time.process_time()
            models[fast] = tl.quantize.quantize_model(classifier, data, fast_statistics=fast)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            name = "faster_statistics" if fast else "MCT's own"
            print(f"{name}: {wall:.1f} s (CPU {cpu:.1f} s)", flush=True)

    def thresholds(model):
        return [
            layer.activation_holder_quantizer.get_config()
            for layer in model.layers
            if hasattr(layer, "activation_holder_quantizer")
        ]

    fast, own = models[True], models[False]
    same_weights = all(
        np.array_equal(a, b) for a, b in zip(fast.get_weights(), own.get_weights(), strict=True)
    )
    same_thresholds = thresholds(fast) == thresholds(own)
    print(f"same weights: {same_weights}; same activation quantizers: {same_thresholds}")


if __name__ == "__main__":
    main()
