"""Make `samples/clothing5/`, the small demo dataset shipped with the project (re-runnable).

It takes 5 clearly distinct classes of the clothing10 dataset (itself a CC0 1.0 subset of
github.com/alexeygrigorev/clothing-dataset-small), the first 25 training and 8 validation images
per class by sorted file name, and downscales them with Pillow so the longer side is 224 px
(aspect kept, EXIF orientation applied then all metadata dropped, JPEG quality 85).

`labels.json` lists the classes deliberately NOT in alphabetical order: it shows that the ids in
labels.json, not the folder order, are the model's class ids.

Usage (from the project root; the source defaults to ../shared/datasets/clothing10):

    .venv/bin/python samples/make_samples.py [SOURCE_DIR]

The output folder is deleted and rebuilt, so running it twice gives the same files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "datasets" / "clothing10"
OUTPUT = HERE / "clothing5"

# Ids deliberately not in alphabetical order (see the module docstring).
LABELS = {"t-shirt": 0, "dress": 1, "shoes": 2, "hat": 3, "pants": 4}
PER_SPLIT = {"training": 25, "validation": 8}
LONGER_SIDE = 224
QUALITY = 85
JPEG_SUFFIXES = (".jpg", ".jpeg")


def downscale(source: Path, target: Path) -> None:
    """Write `source` as an RGB JPEG whose longer side is LONGER_SIDE px, with no metadata."""
    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = LONGER_SIDE / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        # A fresh save without `exif=` / `icc_profile=` drops all metadata.
        image.save(target, "JPEG", quality=QUALITY, optimize=True)


def copy_split(source: Path, split: str, count: int) -> None:
    """Downscale the first `count` images (sorted by name) of each class of one split."""
    for name in LABELS:
        class_dir = source / split / name
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
        if len(files) < count:
            sys.exit(f"{class_dir} has {len(files)} JPEG files, {count} are needed.")
        target_dir = OUTPUT / split / name
        target_dir.mkdir(parents=True)
        for path in files[:count]:
            downscale(path, target_dir / (path.stem + ".jpg"))


def write_license(source: Path) -> None:
    """Write LICENSE.md: where the images come from, their licence and how the subset was made."""
    origin = (source / "SOURCE.md").read_text(encoding="utf-8").strip()
    text = f"""# clothing5 — licence and origin

Images: **CC0 1.0 Universal** (public domain dedication,
https://creativecommons.org/publicdomain/zero/1.0/). They may be copied, modified and
redistributed without asking permission.

## Origin

Public GitHub repository `alexeygrigorev/clothing-dataset-small`
(https://github.com/alexeygrigorev/clothing-dataset-small), folder `train/`, commit
`11961516512414bf9f6c150a832cfd21b54a6b54`, via the project's clothing10 subset, whose
SOURCE.md reads:

```
{origin}
```

## How this subset was made

`samples/make_samples.py`: classes {", ".join(sorted(LABELS))}; from clothing10's
`training/<class>/` the first {PER_SPLIT["training"]} files by sorted name, from its
`validation/<class>/` the first {PER_SPLIT["validation"]} files by sorted name; each
downscaled with Pillow (Lanczos) so the longer side is {LONGER_SIDE} px, aspect kept, EXIF
orientation applied and all metadata stripped, saved as JPEG quality {QUALITY}.
`labels.json` ids are deliberately not in alphabetical order.
"""
    (OUTPUT / "LICENSE.md").write_text(text, encoding="utf-8")


def main(argv: list[str]) -> None:
    """Rebuild samples/clothing5 from the clothing10 folder given (or the default one)."""
    source = Path(argv[0]) if argv else DEFAULT_SOURCE
    if not (source / "training").is_dir():
        sys.exit(f"{source} has no training/ folder: pass the clothing10 folder as argument.")
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    OUTPUT.mkdir(parents=True)
    for split, count in PER_SPLIT.items():
        copy_split(source, split, count)
    (OUTPUT / "labels.json").write_text(json.dumps(LABELS, indent=2) + "\n", encoding="utf-8")
    write_license(source)
    total = sum(p.stat().st_size for p in OUTPUT.rglob("*") if p.is_file())
    print(f"Wrote {OUTPUT} ({total / 1e6:.2f} MB).")


if __name__ == "__main__":
    main(sys.argv[1:])
