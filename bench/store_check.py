"""Time the dataset scan and the feature-store check of many small generated JPEGs.

Not the notebook benchmark (bench/benchmark.py): this measures only what a re-run does before
the base runs, at a scale the tests do not reach. Each step runs in a fresh process, so its
peak RSS is its own::

    python bench/store_check.py /tmp/store_check 20000

writes <folder>/data (the JPEGs, 5 classes, once) and <folder>/store, then prints one line per
step: the scan (dataset.scan_image_folder), the digests (stat index, hashing what changed), the
lookup (index + checksum of every shard used) and the peak RSS; the last step also trains the
head for 2 epochs from the store (train.train_head). The features are made-up 1,280 float32
rows added once, as the backbone pass would add them.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CLASSES = 5
FEATURES = 1280


def make_images(data: Path, count: int) -> None:
    """Write `count` distinct 32x32 JPEGs into data/training/<class>/ (skipped when present)."""
    import numpy as np
    from PIL import Image

    if (data / "labels.json").exists():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = data / "training" / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:07d}.jpg", "JPEG", quality=90)
    labels = {f"class{k}": k for k in range(CLASSES)}
    (data / "labels.json").write_text(json.dumps(labels))


def step(folder: Path, name: str) -> dict:
    """One step in this process: 'check' (scan + digests + lookup), 'fill' (add features
    first) or 'train' (check, then train the head from the store)."""
    import numpy as np

    from tl_helpers import dataset, store

    store.RACY_SECONDS = 0.0  # the images were written seconds ago
    data = folder / "data"
    labels = dataset.read_labels(data / "labels.json")
    times = {}
    start = time.perf_counter()
    images = dataset.scan_image_folder(data / "training", labels)
    times["scan_s"] = time.perf_counter() - start
    feature_store = store.FeatureStore(folder / "store")
    start = time.perf_counter()
    digests = feature_store.digests(images.paths)
    times["digests_s"] = time.perf_counter() - start
    key = "b" * 64
    if name == "fill":
        rng = np.random.default_rng(1)
        for begin in range(0, len(digests), store.SHARD_ROWS):
            part = digests[begin : begin + store.SHARD_ROWS]
            rows = rng.normal(size=(len(part), FEATURES)).astype(np.float32)
            feature_store.add(key, part, rows)
    start = time.perf_counter()
    located = feature_store.lookup(key, digests)
    times["lookup_s"] = time.perf_counter() - start
    times["found"] = int(located.found.sum())
    if name == "train":
        times["peak_rss_before_training_mb"] = _peak_rss_mb()
        times["train_head_s"] = train_two_epochs(located.features, images)
    times["images"] = len(images)
    times["peak_rss_mb"] = _peak_rss_mb()
    return times


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_two_epochs(features, images) -> float:
    """train.train_head for 2 epochs (batch 32) on the stored features, 10 % for validation."""
    import tensorflow as tf

    from tl_helpers import model, train

    keras = tf.keras
    cut = len(images) * 9 // 10
    ids = images.class_ids
    split = train.Features(features[:cut], ids[:cut], features[cut:], ids[cut:])
    base = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(FEATURES, 3)])
    classifier = model.build_classifier(base, images.labels, 32)
    start = time.perf_counter()
    train.train_head(classifier, split, 2, 32, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    """Generate the images, then run the steps, each in its own process."""
    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        print(json.dumps(step(folder, sys.argv[3])))
        return
    start = time.perf_counter()
    make_images(folder / "data", count)
    print(f"images ready ({time.perf_counter() - start:.1f} s)")
    for name in ("fill", "check", "check", "train"):
        out = subprocess.run(
            [sys.executable, __file__, str(folder), str(count), name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        result = json.loads(out.splitlines()[-1])
        line = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
        )
        print(f"{name}: {line}")
    size = sum(p.stat().st_size for p in (folder / "store").rglob("*") if p.is_file())
    print(f"store: {size / 1e6:.1f} MB, {size / count / 1024:.2f} KB per image")


if __name__ == "__main__":
    main()
