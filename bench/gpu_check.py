"""What the distribution chooses on this machine, and how fast the backbone pass runs with it.

    .venv/bin/python bench/gpu_check.py [--dataset ../shared/datasets/flowers128] [--limit N]

For a machine with GPUs (`make venv GPU=1`): prints the GPUs, the strategy line the notebook
prints, then images per second of JPEG decoding alone and of the backbone pass
(MobileNetV2 alpha 0.35 at 224 px) at the automatic backbone batch size and at the CPU's 16.
Runs on a CPU too (it then reports the CPU's choice). Not a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224


def rate(count: int, run) -> float:
    """Images per second of `run()` over `count` images (its second call: warm caches)."""
    run()
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared/datasets/flowers128")
    parser.add_argument("--limit", type=int, default=2000, help="images to time (default 2000)")
    args = parser.parse_args()

    from tl_helpers import dataset, distribute, inference, model

    chosen = distribute.choose_distribution()
    import tensorflow as tf

    print("GPUs:", [gpu.name for gpu in tf.config.list_physical_devices("GPU")])
    paths = sorted(str(path) for path in args.dataset.glob("training/*/*.jpg"))[: args.limit]
    decode = rate(len(paths), lambda: sum(1 for _ in dataset.load_images(paths, SIZE, 64)))
    print(f"JPEG decoding alone: {decode:,.0f} images/s ({len(paths):,} images)")
    base = model.load_base_model(None, SIZE, 0.35)
    classifier = model.build_classifier(base, {"a": 0, "b": 1}, SIZE)
    extractor = model.feature_extractor(classifier)
    for batch in sorted({chosen.backbone_batch_size, distribute.CPU_BACKBONE_BATCH_SIZE}):
        images_per_second = rate(
            len(paths),
            lambda batch=batch: inference.predict_images(
                extractor, paths, SIZE, batch, devices=chosen.devices
            ),
        )
        print(f"backbone pass, batch {batch}: {images_per_second:,.0f} images/s")


if __name__ == "__main__":
    main()
