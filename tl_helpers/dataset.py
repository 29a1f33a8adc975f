"""Read an ImageNet-style JPEG folder dataset: labels.json, the class folders, the images.

Layout::

    dataset/
      training/<class name>/<image>.jpg ...
      validation/<class name>/<image>.jpg ...
      labels.json          {"daisy": 0, "dandelion": 1, ...}

The class id of an image is the id its folder name has in labels.json -- never the folder's
alphabetical position. Names are compared in Unicode NFC form on both sides, so a folder "café"
made on macOS (decomposed é) matches "café" typed in labels.json. Ids are 0 or more, and the
largest may be at most 10 x the number of classes + 100 (`max_class_id`): the model has one
output per id up to the largest, and evaluation a square confusion matrix of that size.

Every user-fixable problem raises `TLError` naming the file or folder at
fault and saying how to fix it, before TensorFlow sees a single image.

Typical use::

    labels = read_labels("dataset/labels.json")
    train = scan_image_folder("dataset/training", labels, labels_path="dataset/labels.json")

`load_images` is the one image pipeline for training features, evaluation and calibration. It
keeps batch order (batch k holds `paths[k*bs:(k+1)*bs]`; with several views, `files_of_batch`
says which), so a batch that fails to decode can be traced back to its files. Callers iterate
it like this (or use `iter_batches`, which does it)::

    bs = batch_size
    batches = iter(load_images(paths, image_size, bs))
    for k in itertools.count():
        try:
            batch = next(batches)
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError as err:
            raise bad_image_error(paths[k * bs : (k + 1) * bs], err) from err
        ...  # use batch: float32, shape (n, image_size, image_size, 3), values 0..255
"""

from __future__ import annotations

import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from tl_helpers import augment
from tl_helpers.errors import TLError

JPEG_SUFFIXES = (".jpg", ".jpeg")  # compared case-insensitively
JPEG_MAGIC = b"\xff\xd8\xff"
ROLES = ("training", "validation")
_MAX_LISTED = 5  # how many culprits a message lists before "... and N more"
INT32_LIMIT = 2**31  # class ids are stored as int32
_LABELS_EXAMPLE = '{"daisy": 0, "dandelion": 1, "roses": 2}'


# --------------------------------------------------------------------------- labels.json


def read_labels(path: str | Path) -> dict[str, int]:
    """Read labels.json ({class folder name: class id}) and check it, so ids are trustworthy."""
    path = Path(path)
    raw = _read_labels_text(path)
    try:
        pairs = json.loads(raw, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as err:
        raise TLError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            f"Write it as a JSON object of class folder names to class ids, e.g. {_LABELS_EXAMPLE}."
        ) from None
    if not isinstance(pairs, _Pairs):
        raise TLError(
            f"{path} must hold a JSON object {{class folder name: class id}}, "
            f"not a JSON {_json_kind(pairs)}. Example: {_LABELS_EXAMPLE}."
        )
    return _check_label_pairs(path, pairs)


class _Pairs(list):
    """The (key, value) pairs of a JSON object, kept as a list so duplicate keys can be seen."""


def missing_ids(labels: dict[str, int]) -> list[int]:
    """Ids between 0 and the largest id that no class uses (callers warn: those outputs idle)."""
    used = set(labels.values())
    return [i for i in range(max(used, default=-1) + 1) if i not in used]


def _read_labels_text(path: Path) -> str:
    """Return the text of labels.json, refusing a missing file, a folder or a symlink."""
    if path.is_symlink():
        raise TLError(f"{path} is a symbolic link, which is not allowed. Copy the real file there.")
    if not path.exists():
        raise TLError(
            f"Labels file not found: {path}. Create it as a JSON object of class folder names "
            f"to class ids, e.g. {_LABELS_EXAMPLE}, or fix its path in configuration.json."
        )
    if not path.is_file():
        raise TLError(f"{path} is not a file. Point the labels path at the labels.json file.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TLError(f"{path} is not UTF-8 text. Save it as UTF-8 JSON.") from None


def _check_label_pairs(path: Path, pairs: list[tuple[str, object]]) -> dict[str, int]:
    """Check each (name, id) entry of labels.json and return them as a dict in file order."""
    if not pairs:
        raise TLError(f"{path} is empty ({{}}). List every class folder with its id.")
    labels: dict[str, int] = {}
    owner: dict[int, str] = {}
    for raw_name, class_id in pairs:
        name = class_name(raw_name)
        entry = f"{json.dumps(raw_name, ensure_ascii=False)}: {json.dumps(class_id)}"
        if not name.strip() or "/" in name or "\\" in name:
            raise TLError(
                f"{path}: entry {entry} has an invalid class name. Use the class folder's "
                "name (non-empty, no slashes)."
            )
        if name in labels:
            raise TLError(
                f"{path}: class {json.dumps(name, ensure_ascii=False)} is listed twice (names "
                "are compared in Unicode NFC form). Keep one entry."
            )
        if isinstance(class_id, bool) or not isinstance(class_id, int):
            raise TLError(
                f"{path}: entry {entry} has a class id that is not an integer. "
                "Use a whole number such as 0, 1, 2 (no quotes)."
            )
        if class_id < 0:
            raise TLError(f"{path}: entry {entry} has a negative class id. Use 0 or more.")
        if class_id in owner:
            raise TLError(
                f"{path}: classes {json.dumps(owner[class_id])} and {json.dumps(name)} both have "
                f"id {class_id}. Give each class its own id."
            )
        labels[name] = class_id
        owner[class_id] = name
    _check_largest_id(path, labels)
    return labels


def max_class_id(num_classes: int) -> int:
    """The largest class id allowed for `num_classes` classes: ids may skip, but not by far."""
    return min(10 * num_classes + 100, INT32_LIMIT - 1)


def class_name(name: str) -> str:
    """A class name as it is compared: Unicode NFC (macOS stores folder names decomposed)."""
    return unicodedata.normalize("NFC", name)


def _check_largest_id(path: Path, labels: dict[str, int]) -> None:
    """Refuse an id so large that the model's output and the confusion matrix would explode."""
    name, largest = max(labels.items(), key=lambda item: item[1])
    limit = max_class_id(len(labels))
    if largest <= limit:
        return
    size = largest + 1
    raise TLError(
        f"{path}: class {json.dumps(name)} has id {largest:,}, far more than its "
        f"{len(labels)} classes need: the model would get {size:,} outputs and evaluation a "
        f"{size:,} x {size:,} confusion matrix. Number the classes from 0 (the largest id "
        f"allowed for {len(labels)} classes is {limit:,}: 10 x classes + 100)."
    )


def _json_kind(value: object) -> str:
    """Name the JSON type of a parsed value, for messages."""
    if isinstance(value, _Pairs):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null"


# --------------------------------------------------------------------------- folder scan


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """The JPEG images of one dataset folder, each with its labels.json class id."""

    directory: Path
    paths: list[str]  # absolute paths, sorted by (class folder, file name)
    class_ids: np.ndarray  # int32, the labels.json id of each path
    labels: dict[str, int]
    skipped_files: int  # entries skipped because they are not JPEG images in a class folder
    missing_classes: tuple[str, ...] = ()  # labels.json classes with no folder (validation only)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images per class name, in class-id order (0 for a class without a folder)."""
        size = max(self.labels.values(), default=-1) + 1
        per_id = np.bincount(self.class_ids, minlength=size) if size else np.zeros(0, int)
        ordered = sorted(self.labels.items(), key=lambda item: item[1])
        return {name: int(per_id[class_id]) for name, class_id in ordered}


def scan_image_folder(
    directory: str | Path,
    labels: dict[str, int],
    *,
    role: str = "training",
    labels_path: str | Path | None = None,
) -> ImageFolder:
    """List a dataset folder's JPEGs with their class ids, refusing layouts that would mislead."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    directory = _check_dataset_dir(Path(directory), role)
    labels_name = str(labels_path) if labels_path is not None else "labels.json"
    class_dirs, skipped = _list_class_dirs(directory, role)
    _check_classes(directory, class_dirs, labels, role, labels_name)
    paths: list[str] = []
    ids: list[int] = []
    not_jpeg: list[tuple[str, str]] = []
    for name in sorted(class_dirs):
        files, class_skipped, bad = _scan_class_dir(class_dirs[name], role)
        skipped += class_skipped
        not_jpeg += bad
        paths += files
        ids += [labels[name]] * len(files)
    if not_jpeg:
        raise _not_jpeg_error(not_jpeg, role)
    _warn_skipped(skipped, role)
    missing = tuple(name for name in labels if name not in class_dirs)
    return ImageFolder(
        directory=directory,
        paths=paths,
        class_ids=np.asarray(ids, dtype=np.int32),
        labels=dict(labels),
        skipped_files=len(skipped),
        missing_classes=missing,
    )


def _check_dataset_dir(directory: Path, role: str) -> Path:
    """Return the absolute dataset folder, refusing a missing path, a file or a symlink."""
    key = f"dataset_{role}_dir"
    if directory.is_symlink():
        raise TLError(
            f"The {role} folder {directory} is a symbolic link, which is not allowed. "
            f"Set {key} in configuration.json to the real folder."
        )
    if not directory.exists():
        raise TLError(
            f"The {role} folder {directory} does not exist. Set {key} in configuration.json "
            "to the folder that holds one sub-folder of JPEG images per class."
        )
    if not directory.is_dir():
        raise TLError(
            f"The {role} path {directory} is not a folder. Set {key} in configuration.json "
            "to the folder that holds one sub-folder of JPEG images per class."
        )
    return directory.absolute()


def _list_class_dirs(directory: Path, role: str) -> tuple[dict[str, Path], list[str]]:
    """Return {name: path} of the class folders, and the loose entries that will be skipped."""
    class_dirs: dict[str, Path] = {}
    skipped: list[str] = []
    links: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                if not entry.is_dir():
                    skipped.append(entry.name)  # .DS_Store and friends
                continue  # hidden folders (.ipynb_checkpoints, .git) are ignored silently
            if entry.is_symlink() and entry.is_dir():
                links.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                name = class_name(entry.name)
                if name in class_dirs:
                    raise TLError(
                        f"{role.capitalize()} class folders {class_dirs[name]} and {entry.path} "
                        "have the same name in different Unicode forms. Merge them into one."
                    )
                class_dirs[name] = Path(entry.path)
            else:
                skipped.append(entry.name)
    if links:
        raise TLError(
            f"{role.capitalize()} class folder {_listing(sorted(links))} is a symbolic "
            "link, which is not allowed. Replace it with a real folder holding the images."
        )
    if not class_dirs:
        raise TLError(
            f"The {role} folder {directory} has no class sub-folders. Expected layout: "
            f"{directory / '<class name>' / '<image>.jpg'}, one sub-folder per class, named as "
            "in labels.json."
        )
    return class_dirs, skipped


def _check_classes(
    directory: Path,
    class_dirs: dict[str, Path],
    labels: dict[str, int],
    role: str,
    labels_name: str,
) -> None:
    """Refuse class folders unknown to labels.json, and training classes without a folder."""
    unknown = sorted(name for name in class_dirs if name not in labels)
    if unknown:
        raise TLError(
            f"{role.capitalize()} class folder {_listing([str(class_dirs[n]) for n in unknown])} "
            f"is not listed in {labels_name}. Add it there with a class id, or remove the folder."
            + _unknown_hint(unknown, labels)
        )
    if role != "training":
        return  # evaluation simply has no images of a class without a validation folder
    absent = [name for name in labels if name not in class_dirs]
    if absent:
        expected = _listing([str(directory / name) for name in absent])
        raise TLError(
            f"Class {_listing([json.dumps(n) for n in absent])} of {labels_name} has no training "
            f"folder: expected {expected}. Add that folder with JPEG images of the class, or "
            f"remove the class from {labels_name}."
        )


def _unknown_hint(unknown: list[str], labels: dict[str, int]) -> str:
    """Suggest the likely mistake behind unknown class folders (wrong case, dataset root)."""
    if {"training", "validation", "train", "val"} & set(unknown):
        return (
            " (It looks like the dataset root folder was given: point the setting at its "
            "training/ or validation/ sub-folder.)"
        )
    by_lower = {name.lower(): name for name in labels}
    near = [f"{n!r} vs {by_lower[n.lower()]!r}" for n in unknown if n.lower() in by_lower]
    if near:
        return f" Names are case sensitive: {', '.join(near)}."
    return ""


def _scan_class_dir(folder: Path, role: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Return a class folder's sorted JPEG paths, its skipped entries and its fake JPEGs."""
    files: list[str] = []
    skipped: list[str] = []
    links: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            is_jpeg_name = entry.name.lower().endswith(JPEG_SUFFIXES)
            if entry.name.startswith("."):
                if not entry.is_dir():
                    skipped.append(f"{folder.name}/{entry.name}")  # .DS_Store, ._x.jpg
            elif entry.is_symlink() and is_jpeg_name:
                links.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                skipped.append(f"{folder.name}/{entry.name}/")  # sub-folders are not searched
            elif is_jpeg_name:
                files.append(entry.path)
            else:
                skipped.append(f"{folder.name}/{entry.name}")
    if links:
        raise TLError(
            f"{role.capitalize()} image {_listing(sorted(links))} is a symbolic link, "
            "which is not allowed. Replace it with a copy of the image."
        )
    if not files:
        raise TLError(
            f"The {role} class folder {folder} has no JPEG images (.jpg/.jpeg). Add images of "
            "that class, or remove the folder"
            + (" and its class from labels.json." if role == "training" else ".")
        )
    files.sort()
    bad = [(path, kind) for path in files if (kind := _file_kind(path)) != "JPEG"]
    return files, skipped, bad


def _file_kind(path: str) -> str:
    """Tell what a file is from its first bytes: "JPEG", "PNG", "empty file", ..."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as err:
        return f"unreadable file ({err.strerror})"
    if head.startswith(JPEG_MAGIC):
        return "JPEG"
    if not head:
        return "empty file"
    for magic, kind in (
        (b"\x89PNG", "PNG image"),
        (b"GIF8", "GIF image"),
        (b"BM", "BMP image"),
        (b"II*\x00", "TIFF image"),
        (b"MM\x00*", "TIFF image"),
        (b"%PDF", "PDF document"),
        (b"<", "HTML/XML text (a web page saved instead of the image?)"),
    ):
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image"
    if head[4:8] == b"ftyp":
        return "HEIC/AVIF or video file"
    return f"unknown data (starts with bytes {head[:3].hex(' ')})"


def _not_jpeg_error(bad: list[tuple[str, str]], role: str) -> TLError:
    """Build the error listing .jpg/.jpeg files whose content is not JPEG."""
    lines = [f"  {path}: {kind}" for path, kind in bad[:_MAX_LISTED]]
    if len(bad) > _MAX_LISTED:
        lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    return TLError(
        f"{len(bad)} {role} file(s) named .jpg/.jpeg are not JPEG images:\n"
        + "\n".join(lines)
        + "\nRe-save each as a real JPEG (open it in an image editor and export as .jpg), "
        "or delete it."
    )


def _warn_skipped(skipped: list[str], role: str) -> None:
    """Print one line counting the entries that were not used, with an example."""
    if not skipped:
        return
    count = len(skipped)
    noun = "file that is" if count == 1 else "files that are"
    print(
        f"{role}: skipped {count} {noun} not JPEG images inside a class folder "
        f"(e.g. {sorted(skipped)[0]}). Convert them to JPEG (.jpg) and put them in their "
        "class folder to use them."
    )


def _listing(items: Sequence[str]) -> str:
    """Join culprits for a message, shortening long lists."""
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" (and {len(items) - _MAX_LISTED} more)"
    return shown


def describe(training: ImageFolder, validation: ImageFolder | None = None) -> str:
    """A text table of images per class (training, validation), in class-id order."""
    train_counts = training.counts()
    val_counts = validation.counts() if validation is not None else {}
    width = max([5, *map(len, train_counts)]) + 2
    lines = [f"{'class':<{width}}{'id':>4}{'training':>10}{'validation':>12}"]
    for name, count in train_counts.items():
        val = val_counts.get(name, "-") if validation is not None else "-"
        lines.append(f"{name:<{width}}{training.labels[name]:>4}{count:>10}{val:>12}")
    total_val = len(validation) if validation is not None else "-"
    lines.append(f"{'total':<{width}}{'':>4}{len(training):>10}{total_val:>12}")
    gaps = missing_ids(training.labels)
    if gaps:
        lines.append(
            f"Note: no class has id {', '.join(map(str, gaps))} (allowed; ids are output indices)."
        )
    return "\n".join(lines)


FEW_IMAGES = 10  # a class with fewer training images than this is learned poorly
IMBALANCE_RATIO = 3.0  # warn when the largest class has this many times a class's images


def class_warnings(training: ImageFolder, validation: ImageFolder | None = None) -> list[str]:
    """Warnings naming classes with few training images, far fewer than others, or no validation."""
    counts = training.counts()
    warnings = []
    few = [name for name, count in counts.items() if count < FEW_IMAGES]
    if few:
        warnings.append(
            f"{_classes(few, counts)} {'has' if len(few) == 1 else 'have'} fewer than "
            f"{FEW_IMAGES} training images: too few examples to learn a class. Add images to "
            f"{_listing([str(training.directory / name) for name in few])}."
        )
    largest = max(counts, key=counts.get)
    small = [name for name, count in counts.items() if count * IMBALANCE_RATIO <= counts[largest]]
    if small:
        warnings.append(
            f'The training classes are imbalanced: "{largest}" has {counts[largest]} images, '
            f"{IMBALANCE_RATIO:g}x or more the images of {_quoted(small, counts)}. "
            "The model will favour the large classes: add images to the small ones, or use "
            "fewer of the large ones."
        )
    if validation is not None:
        empty = [name for name, count in validation.counts().items() if count == 0]
        if empty:
            warnings.append(
                f"{_classes(empty)} {'has' if len(empty) == 1 else 'have'} no validation "
                "images, so its accuracy cannot be measured. Add images to "
                f"{_listing([str(validation.directory / name) for name in empty])}."
            )
    return warnings


def print_class_warnings(training: ImageFolder, validation: ImageFolder | None = None) -> None:
    """Print `class_warnings`, or that the classes look fine, for the notebook."""
    warnings = class_warnings(training, validation)
    for warning in warnings:
        print(f"Warning: {warning}")
    if not warnings:
        counts = training.counts().values()
        print(
            f"Classes look fine: each has at least {FEW_IMAGES} training images, and the "
            f"largest has {max(counts) / min(counts):.1f}x the images of the smallest."
        )


def identical_images(
    training: ImageFolder,
    validation: ImageFolder | None = None,
    cache_dir: str | Path | None = None,
) -> list[list[tuple[ImageFolder, int]]]:
    """Groups of files with the same contents, in either folder, as (folder, index) pairs.

    With `cache_dir` (the feature store's folder) the contents are compared by the store's
    digests, which it keeps per file and which the feature pass reads anyway, so a re-run reads
    no file for this. Without it (or if the store cannot be used), only files whose size another
    file shares are read and hashed.
    """
    files = [
        (folder, index)
        for folder in (training, validation)
        if folder is not None
        for index in range(len(folder.paths))
    ]
    paths = [folder.paths[index] for folder, index in files]
    from tl_helpers import store  # no TensorFlow; only this check needs it here

    digests = None
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            digests = store.FeatureStore(cache_dir).digests(paths)
        except OSError:
            digests = None  # the feature step says what is wrong with the store
    if digests is None:
        digests = [b""] * len(paths)
        by_size: dict[int, list[int]] = {}
        for number, path in enumerate(paths):
            by_size.setdefault(os.stat(path).st_size, []).append(number)
        for numbers in by_size.values():
            for number in numbers if len(numbers) > 1 else ():
                digests[number] = store._file_digest(paths[number])  # the store's own digest
    by_contents: dict[bytes, list[tuple[ImageFolder, int]]] = {}
    for file, digest in zip(files, digests, strict=True):
        if digest:
            by_contents.setdefault(digest, []).append(file)
    return [same for same in by_contents.values() if len(same) > 1]


def identical_image_warnings(
    training: ImageFolder,
    validation: ImageFolder | None = None,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Warnings naming validation images that are copies of training images (Top-1 would
    count photos the model trained on as unseen) and photos filed under several classes."""

    def name(file: tuple[ImageFolder, int]) -> str:
        folder, index = file
        inside = Path(folder.paths[index]).relative_to(folder.directory)
        return str(Path(folder.directory.name) / inside)

    leaks, conflicts = [], []
    for files in identical_images(training, validation, cache_dir):
        names = " = ".join(sorted(map(name, files)))
        roles = {folder is validation for folder, _ in files}
        if validation is not None and roles == {True, False}:
            leaks.append(names)
        if len({int(folder.class_ids[index]) for folder, index in files}) > 1:
            conflicts.append(names)
    warnings = []
    if leaks:
        many = len(leaks) > 1
        warnings.append(
            f"{len(leaks)} validation "
            + (
                "images are copies of training images"
                if many
                else "image is a copy of a training image"
            )
            + " (the same file contents), so Top-1 counts photos the model trained on as unseen: "
            f"{_listing(leaks)}. Delete each from one of the two folders."
        )
    if conflicts:
        warnings.append(
            f"{len(conflicts)} photo{'s are' if len(conflicts) > 1 else ' is'} filed under "
            "more than one class (the same file contents in different class folders), which "
            f"teaches the model contradicting labels: {_listing(conflicts)}. Keep each in the "
            "one class folder it belongs to."
        )
    return warnings


def print_identical_images(
    training: ImageFolder,
    validation: ImageFolder | None = None,
    cache_dir: str | Path | None = None,
) -> None:
    """Print `identical_image_warnings`, or that no photo is in two places, for the notebook."""
    warnings = identical_image_warnings(training, validation, cache_dir)
    for warning in warnings:
        print(f"Warning: {warning}")
    if not warnings:
        print("No validation image is a copy of a training image, and no photo is in two classes.")


def _classes(names: Sequence[str], counts: dict[str, int] | None = None) -> str:
    """'Class "a" (3)' / 'Classes "a" (3), "b" (5)': names with image counts, for messages."""
    return f"Class{'es' if len(names) > 1 else ''} {_quoted(names, counts)}"


def _quoted(names: Sequence[str], counts: dict[str, int] | None = None) -> str:
    """'"a" (3), "b" (5)': quoted class names with their image counts, shortened when long."""
    return _listing([f'"{name}"' + (f" ({counts[name]})" if counts else "") for name in names])


# --------------------------------------------------------------------------- image loading


def load_images(
    paths: Sequence[str], image_size: int, batch_size: int, view: str | Sequence[str] = ""
) -> tf.data.Dataset:
    """Stream batches of RGB float32 images (0..255, square), in the order of `paths`.

    Each image is decoded (large photos at a reduced scale, `decode_jpeg`), turned the right
    way up by its EXIF orientation (`upright`), then given the augmented view named `view` ("":
    as is; see tl_helpers.augment), then resized (and, for a view that changes the resized
    image, changed then). With a sequence of views, each image is decoded once and gives one
    row per view, in that order: image 0's views, then image 1's, and so on.
    """
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size}, {batch_size}")
    views = view_names(view)
    if not views:
        raise ValueError("load_images: no views")
    size = (int(image_size), int(image_size))
    steps = [(augment.view_function(v), augment.after_resize_function(v)) for v in views]
    orientations = [exif_orientation(path) for path in paths]

    def load(path: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
        contents = tf.io.read_file(path)
        image = upright(decode_jpeg(contents, image_size), orientation)
        rows = [
            finish(tf.image.resize(transform(image), size, method="bilinear"), contents)
            for transform, finish in steps  # float32, 0..255
        ]
        return rows[0] if len(rows) == 1 else tf.stack(rows)

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), dtype=tf.string), tf.constant(orientations, dtype=tf.int32))
    )
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if len(views) > 1:
        dataset = dataset.unbatch()  # one row per view
    return without_autotune(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def view_names(view: str | Sequence[str]) -> tuple[str, ...]:
    """The views of `load_images`'s `view` argument: one name, or several (rows per image)."""
    return (view,) if isinstance(view, str) else tuple(view)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuning thread.

    That thread sleeps up to 10 s between rounds and deleting an iterator waits for it, so
    every pass longer than a few seconds ended with a stall of up to 10 s (each fine-tuning
    epoch too). Without it, AUTOTUNE parallel calls use every core and prefetching continues:
    a flowers128 pass took as long (docs/performance.md, "Stalls at the end of a pass").
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def files_of_batch(paths: Sequence[str], batch_size: int, number: int, views: int = 1) -> list[str]:
    """The files whose rows batch `number` of `load_images` holds (`views` rows per file)."""
    first = number * batch_size // views
    end = -(-(number + 1) * batch_size // views)  # rounded up
    return list(paths[first:end])


# libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling), skipping part of the
# work of a full decode (the entropy decoding it does in full: 12 MP photos load about 1.2x
# faster, docs/distributed.md). The scaled image keeps its shorter side at least DECODE_MARGIN x
# the input size, so the bilinear resize after it still shrinks by 2 or more, as it does for
# any photo up to 4x the input size (those are decoded whole).
DECODE_RATIOS = (1, 2, 4, 8)
DECODE_MARGIN = 2


def decode_ratio_index(
    height: int | tf.Tensor, width: int | tf.Tensor, image_size: int
) -> tf.Tensor:
    """Index in `DECODE_RATIOS` of the largest ratio that keeps the shorter side at least
    DECODE_MARGIN x image_size (ints or int32 tensors in, an int32 tensor out).
    """
    shorter = tf.minimum(height, width)
    # The ratios increase: the count of those after 1 that fit is the index of the largest.
    fits = [tf.cast(shorter >= DECODE_MARGIN * image_size * r, tf.int32) for r in DECODE_RATIOS[1:]]
    return tf.add_n(fits)


def decode_jpeg(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode JPEG bytes to uint8 [h, w, 3], scaled down as `decode_ratio_index` says.

    The header gives the size without decoding; libjpeg's scaled decode averages each 8x8 block
    into 8/ratio x 8/ratio pixels, an area average rather than a subsample.
    """
    shape = tf.io.extract_jpeg_shape(contents)
    branches = [
        (lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in DECODE_RATIOS
    ]
    index = decode_ratio_index(shape[0], shape[1], image_size)
    return tf.ensure_shape(tf.switch_case(index, branches), [None, None, 3])


EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(path: str) -> int:
    """The EXIF Orientation (1-8) of a JPEG, 1 when it has none or it cannot be read.

    Pillow reads only the file's header here, not its pixels. A file Pillow cannot open gets
    1: the decoder then reports it, naming the file (`bad_image_error`).
    """
    try:
        with Image.open(path) as image:
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # any Pillow failure: the decode step names the file
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Rotate/flip a decoded [h, w, 3] image as EXIF `orientation` (1-8) says it is shown.

    The same transforms as Pillow's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180,
    4 flip top to bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise; 1 (and anything else) leaves it as stored.
    """
    branches = [
        lambda: image,
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        lambda: tf.image.transpose(image),
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
    return tf.ensure_shape(tf.switch_case(index, branches), [None, None, 3])


def iter_batches(
    paths: Sequence[str], image_size: int, batch_size: int, view: str | Sequence[str] = ""
) -> Iterator[tf.Tensor]:
    """Yield `load_images` batches, turning a decode failure into a TLError naming the file."""
    batches = iter(load_images(paths, image_size, batch_size, view))
    views = len(view_names(view))
    for k in itertools.count():
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as err:
            raise bad_image_error(files_of_batch(paths, batch_size, k, views), err) from err
        yield batch


def find_bad_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Decode each file as the pipeline does and return (path, reason) for those that fail."""
    bad = []
    for path in paths:
        try:
            tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        except tf.errors.NotFoundError:
            bad.append((path, "file not found (moved or deleted after the dataset was scanned)"))
        except tf.errors.OpError as err:
            bad.append((path, _describe_undecodable(path, err)))
    return bad


def bad_image_error(paths: Sequence[str], original: Exception) -> TLError:
    """Build the TLError for a batch that failed to load, naming the image(s) at fault."""
    bad = find_bad_images(paths)
    if not bad:
        first = paths[0] if paths else "?"
        return TLError(
            f"A batch of {len(paths)} images (from {first}) failed to load: "
            f"{_first_line(original)}. Check those images open in an image viewer; re-save any "
            "that do not as JPEG, or delete them."
        )
    lines = [f"  {path}: {reason}" for path, reason in bad]
    return TLError(
        f"{len(bad)} image(s) cannot be decoded:\n"
        + "\n".join(lines)
        + "\nRe-save each as a JPEG (open it in an image editor and export as .jpg), "
        "or delete it, then run again."
    )


def _describe_undecodable(path: str, err: Exception) -> str:
    """Say why a file fails to decode, using Pillow's more specific diagnosis when it has one."""
    kind = _file_kind(path)
    if kind != "JPEG":
        return f"not a JPEG: {kind}"
    try:
        with Image.open(path) as image:
            image.load()
            mode, width, height = image.mode, image.width, image.height
    except Exception as pil_err:  # any Pillow failure is a description
        return f"corrupt or truncated JPEG ({pil_err})"
    return (
        f"TensorFlow cannot decode this {width}x{height} {mode} JPEG ({_first_line(err)}); "
        "Pillow can: re-saving it as an RGB JPEG fixes it"
    )


def _first_line(err: Exception) -> str:
    """The first line of an error message, without TensorFlow's {{function_node ...}} prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
