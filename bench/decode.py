"""JPEG decoding speed of the image pipeline: large photos decoded at a reduced scale
(`dataset.decode_jpeg`, libjpeg's DCT scaling) against decoding every pixel, as the pipeline did
before. Not a test; docs/distributed.md has the results.

    .venv/bin/python bench/decode.py [--sizes 1024x768 4032x3024] [--count 60] [--repeat 3]

For each size, makes COUNT photos from flowers128 images scaled up with a little noise (written
once to bench/out/decode/, never committed), then times `dataset.load_images` over them at
224 px, batches of 64, files in the page cache: images per second (wall) and per CPU second of
the process, best of REPEAT passes after a warm-up pass, whole decode and scaled decode in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "flowers128" / "training"
OUT = ROOT / "bench" / "out" / "decode"
SIZE = 224


def make_photos(width: int, height: int, count: int) -> list[str]:
    """COUNT JPEGs of width x height (quality 90) from flowers128 photos, made once."""
    folder = OUT / f"{width}x{height}"
    paths = [folder / f"{i:04d}.jpg" for i in range(count)]
    if all(path.exists() for path in paths):
        return [str(path) for path in paths]
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SOURCE.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    for i, path in enumerate(paths):
        with Image.open(sources[i * 7 % len(sources)]) as image:
            big = np.asarray(
                image.convert("RGB").resize((width, height), Image.BICUBIC), np.float32
            )
        noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, "JPEG", quality=90)
    return [str(path) for path in paths]


def timed_pass(paths: list[str], repeat: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the best of `repeat` passes."""
    from tl_helpers import dataset

    def one_pass() -> None:
        for _ in dataset.load_images(paths, SIZE, 64):
            pass

    one_pass()  # warm-up: tracing, page cache
    best = None
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        one_pass()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        best = (wall, cpu) if best is None or wall < best[0] else best
    return len(paths) / best[0], len(paths) / best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "2048x1536", "4032x3024"])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from tl_helpers import dataset

    scaled = dataset.decode_jpeg

    def whole(contents, image_size):
        return tf.io.decode_jpeg(contents, channels=3)

    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        paths = make_photos(width, height, args.count)
        file_mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
        row = {"size": size, "images": len(paths), "file_mb": round(file_mb, 2)}
        row["ratio"] = dataset.DECODE_RATIOS[int(dataset.decode_ratio_index(height, width, SIZE))]
        for name, function in (("whole", whole), ("scaled", scaled)):
            dataset.decode_jpeg = function
            wall, cpu = timed_pass(paths, args.repeat)
            row[f"{name}_images_per_s"] = round(wall, 1)
            row[f"{name}_images_per_cpu_s"] = round(cpu, 1)
        dataset.decode_jpeg = scaled
        print(json.dumps(row), flush=True)
        rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(rows, indent=1))
    print(
        "| photos | file size | decode ratio | whole: images/s (per CPU s) | scaled: images/s "
        "(per CPU s) |\n|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['size']} | {row['file_mb']} MB | 1/{row['ratio']} | "
            f"{row['whole_images_per_s']:,} ({row['whole_images_per_cpu_s']:,}) | "
            f"{row['scaled_images_per_s']:,} ({row['scaled_images_per_cpu_s']:,}) |"
        )


if __name__ == "__main__":
    main()
