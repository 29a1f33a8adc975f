"""The feature pass at scale: a generated dataset of N distinct JPEGs (not a test).

    .venv/bin/python bench/scale.py --images 100000      # make bench-scale
    .venv/bin/python bench/scale.py --images 4317 --source-only   # flowers128 itself

Makes N distinct training JPEGs from flowers128 (../shared/datasets) in a scratch folder
(default bench/out/scale/data, never committed): image i is source image i mod M, cropped to a
box, mirrored on odd rounds and brightened or darkened, all drawn from i. Then, each in a new
process, with the real backbone (MobileNetV2 alpha 0.35 at 224 px) and the project's feature
store:

1. first run: empty store, every image through the backbone;
2. second run: nothing changed (the scan and the store check alone);
3. third run: 1 % of the images rewritten with other pixels (only those recomputed);

and reports for each: wall seconds of the scan, of the feature step and of training the head
(2 epochs), backbone images per second, images computed, peak RSS, and the store's bytes per
image. Results in OUT/scale-<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers128"
OUT = ROOT / "bench" / "out" / "scale"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--source-only", action="store_true", help="flowers128 as it is")
    parser.add_argument("--scratch", type=Path, default=OUT / "data")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--step", choices=["first", "again", "changed"], help=argparse.SUPPRESS)
    return parser.parse_args()


def source_images() -> list[tuple[Path, str]]:
    """flowers128's training images with their class folder, classes taking turns, so that
    any number of images holds every class."""
    folders = sorted(p for p in (FLOWERS / "training").iterdir() if p.is_dir())
    per_class = [sorted(folder.glob("*.jpg")) for folder in folders]
    longest = max(len(paths) for paths in per_class)
    return [
        (paths[i], paths[i].parent.name)
        for i in range(longest)
        for paths in per_class
        if i < len(paths)
    ]


def derived(image: Image.Image, index: int) -> Image.Image:
    """Image `index`'s variant: a crop, a mirror on odd rounds, a brightness change."""
    rng = np.random.default_rng(index)
    width, height = image.size
    scale = rng.uniform(0.7, 1.0)
    w, h = int(width * scale), int(height * scale)
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    out = image.crop((left, top, left + w, top + h)).resize((width, height))
    if rng.integers(2):
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))


def make_dataset(count: int, scratch: Path) -> Path:
    """Write `count` distinct training JPEGs (and flowers128's validation set) once."""
    marker = scratch / f".complete-{count}"
    if marker.exists():
        return scratch
    sources = source_images()
    for index in range(count):
        path, name = sources[index % len(sources)]
        target = scratch / "training" / name / f"{index:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            derived(image.convert("RGB"), index).save(target, "JPEG", quality=90)
    for path in (FLOWERS / "validation").glob("*/*.jpg"):
        target = scratch / "validation" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (scratch / "labels.json").write_bytes((FLOWERS / "labels.json").read_bytes())
    marker.touch()
    return scratch


def change_one_percent(scratch: Path) -> int:
    """Rewrite every 100th training image with other pixels (mirrored)."""
    paths = sorted((scratch / "training").glob("*/*.jpg"))[::100]
    for path in paths:
        with Image.open(path) as image:
            changed = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        changed.save(path, "JPEG", quality=90)
    return len(paths)


def run_step(data: Path, cache: Path) -> dict:
    """One run of the pipeline's data steps, as the notebook makes them (in this process)."""
    import tl_helpers as tl

    tl.preload()  # TensorFlow and the modules, as the notebook's first cell (not timed)
    clock = {}
    start = time.perf_counter()
    labels = tl.dataset.read_labels(data / "labels.json")
    train = tl.dataset.scan_image_folder(data / "training", labels, role="training")
    validation = tl.dataset.scan_image_folder(data / "validation", labels, role="validation")
    clock["scan_s"] = time.perf_counter() - start
    tl.train.setup_tensorflow(0)
    classifier = tl.model.build_classifier(tl.model.load_base_model("", 224, 0.35), labels, 224)
    start = time.perf_counter()
    features = tl.train.compute_features(classifier, train, validation, 224, cache_dir=cache)
    clock["features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    tl.train.train_head(classifier, features, 2, 32, verbose=0)
    clock["train_s"] = time.perf_counter() - start
    store_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    images = len(train) + len(validation)
    return {
        **{k: round(v, 2) for k, v in clock.items()},
        "images": images,
        "store_bytes_per_image": round(store_bytes / images),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    args = parse_args()
    if args.step:  # a child process: one measured run
        data, cache = args.scratch, args.out / f"store-{args.images}"
        print("RESULT " + json.dumps(run_step(data, cache)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = FLOWERS if args.source_only else make_dataset(args.images, args.scratch)
    cache = args.out / f"store-{args.images}"
    rows = []
    for step in ("first", "again", "changed"):
        if step == "changed":
            if args.source_only:
                break  # flowers128 is read-only: no 1 % change there
            changed = change_one_percent(data)
        command = [sys.executable, __file__, "--step", step, "--images", str(args.images)]
        command += ["--scratch", str(data), "--out", str(args.out)]
        shown = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(shown.stdout.split("RESULT ", 1)[1])
        lines = [line for line in shown.stdout.splitlines() if line.startswith("features:")]
        result |= {"step": step, "report": lines[-1] if lines else None}
        found = re.search(r"([\d,]+) computed", lines[-1]) if lines else None
        computed = int(found.group(1).replace(",", "")) if found else 0
        result["computed"] = computed
        result["backbone_images_per_s"] = (
            round(computed / result["features_s"], 1) if computed else None
        )
        if step == "changed":
            result["files_changed"] = changed
        rows.append(result)
        print(json.dumps(result), flush=True)
    path = args.out / f"scale-{args.images}.json"
    path.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
