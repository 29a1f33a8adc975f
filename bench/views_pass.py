"""Time of the feature pass with the default configuration's views, on photos of several sizes.
Not a test; docs/distributed.md ("Large photos") has the results.

    .venv/bin/python bench/views_pass.py [--sizes flowers128 4032x3024] [--count 60] [--repeat 2]

The pass is the first run's: every training photo as it is and in the views the bundled
configuration computes (mirror, crop, and the noise view fine-tuning trains on), through the
default base (MobileNetV2 alpha 0.35, 224 px) below the default cut, into an empty feature
store (`cache.cached_features`, float16 rows, as `train.compute_features` calls it). Large
photos are made as in bench/decode.py (bench/out/decode/, never committed); "flowers128" takes
the first COUNT training photos of ../shared/datasets/flowers128. For each set: wall and CPU
seconds of the best of REPEAT passes after a warm-up pass (tracing), each into a new store.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers128" / "training"
OUT = ROOT / "bench" / "out" / "views_pass"
SIZE = 224
VIEWS = ("", "mirror", "crop", "noise")  # the bundled configuration's first run


def photos(size: str, count: int) -> list[str]:
    """COUNT photos of a size ("WxH", made as bench/decode.py does) or of flowers128."""
    if size == "flowers128":
        return [str(path) for path in sorted(FLOWERS.glob("*/*.jpg"))[:count]]
    from decode import make_photos

    width, height = (int(v) for v in size.split("x"))
    return make_photos(width, height, count)


def lower_part():
    """The default classifier's base below the default cut (raw pixels in)."""
    from tl_helpers import finetune, model

    base = model.load_default_base_model(SIZE, 0.35)
    classifier = model.build_classifier(base, {"a": 0, "b": 1}, SIZE)
    return finetune.split_classifier(classifier, finetune.DEFAULT_CUT).lower


def timed_pass(extractor, paths: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one pass of every photo in every view into a new store."""
    from tl_helpers import cache

    rows = [path for path in paths for _ in VIEWS]
    views = [view for _ in paths for view in VIEWS]
    with tempfile.TemporaryDirectory() as folder:
        cpu, wall = time.process_time(), time.perf_counter()
        features, _ = cache.cached_features(
            extractor, rows, SIZE, folder, views=views, float16_rows=[True] * len(rows)
        )
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        del features
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["flowers128", "1024x768", "4032x3024"])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    args = parser.parse_args()

    extractor = lower_part()
    results = []
    for size in args.sizes:
        paths = photos(size, args.count)
        timed_pass(extractor, paths)  # warm-up: tracing, page cache
        runs = [timed_pass(extractor, paths) for _ in range(args.repeat)]
        wall, cpu = min(runs)
        row = {
            "label": args.label,
            "photos": size,
            "images": len(paths),
            "rows": len(paths) * len(VIEWS),
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "images_per_s": round(len(paths) / wall, 1),
            "all_wall_s": [round(w, 2) for w, _ in runs],
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"result-{args.label}.json" if args.label else "result.json"
    (OUT / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
