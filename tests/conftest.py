"""Shared fixtures: tiny generated JPEG datasets and tiny Keras models (fast, real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLES = ROOT / "samples" / "clothing5"
NOTEBOOK = ROOT / "image_classification.ipynb"
# Class ids neither alphabetical nor contiguous: the case the reference implementation got wrong.
LABELS_UNORDERED = {"zebra": 0, "apple": 3, "mango": 1, "kiwi": 4}

# Visually distinct colours, one per class id; images are that colour plus noise.
COLOURS = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (230, 220, 40),
    (200, 40, 200),
    (40, 210, 210),
    (250, 150, 30),
    (120, 120, 120),
]


def write_jpeg(path: Path, colour, size=(24, 20), seed=0) -> Path:
    """A small real JPEG: a solid colour with noise (`seed`: an int or a list of ints)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(
        np.array(colour, dtype=np.float32) + rng.normal(0, 18, (h, w, 3)), 0, 255
    ).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def make_dataset(
    root: Path,
    labels: dict[str, int],
    train_per_class: int = 6,
    val_per_class: int = 3,
    colour_of=None,
) -> Path:
    """Spec layout: root/training/<class>/*.jpg, root/validation/<class>/*.jpg, root/labels.json.

    The colour of a class depends on its labels.json id, so a model can only score well when
    training and evaluation use the same ids. The noise is seeded by split, class and index, so
    no validation image is a copy of a training image: a good Top-1 shows learning, not memory.
    """
    colour_of = colour_of or (lambda name: COLOURS[labels[name] % len(COLOURS)])
    splits = (("training", train_per_class), ("validation", val_per_class))
    for split_index, (split, count) in enumerate(splits):
        for class_index, name in enumerate(labels):
            for i in range(count):
                size = (24 + 4 * (i % 3), 20 + 3 * (i % 2))
                seed = [split_index, class_index, i]
                write_jpeg(
                    root / split / name / f"{name}_{i:03d}.jpg", colour_of(name), size, seed=seed
                )
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def write_config(directory: Path, **values) -> Path:
    """configuration.json in `directory` with tiny defaults, overridden by `values`."""
    config = {
        "source_keras_model": "",
        "dataset_training_dir": "data/training",
        "dataset_validation_dir": "data/validation",
        "batch_size": 8,
        "input_tensor_size": 32,
        "epochs": 2,
        "output_dir": "out/model",
        "evaluate_result_dir": "out/evaluation",
        "mobilenet_alpha": 0.35,
    }
    config.update(values)
    config = {k: v for k, v in config.items() if v is not None}
    path = directory / "configuration.json"
    path.write_text(json.dumps(config, indent=2))
    return path


# The two test tiers: `make test-fast` runs
# `-m "not slow and not notebook and not mct and not distributed and not savedmodel"`.
NOTEBOOK_FIXTURES = {"tiny_notebook_run"}
MCT_TEST_FILES = {"test_quantize.py"}  # every test there runs MCT quantization


def pytest_collection_modifyitems(items) -> None:
    """Mark the tests that need a notebook kernel or MCT, so the fast tier can leave them out.

    Tests that start a kernel themselves carry `@pytest.mark.notebook`; those that only read the
    shared notebook run get the mark from its fixture; every test of `MCT_TEST_FILES` gets `mct`.
    """
    for item in items:
        if NOTEBOOK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.notebook)
        if item.path.name in MCT_TEST_FILES:
            item.add_marker(pytest.mark.mct)


@pytest.fixture
def labels_unordered() -> dict[str, int]:
    """Ids neither alphabetical nor contiguous: the case the reference implementation got wrong."""
    return dict(LABELS_UNORDERED)


@pytest.fixture(scope="session")
def tiny_notebook_run(tmp_path_factory) -> SimpleNamespace:
    """The notebook run once headless (nbclient) on a tiny dataset, for the tests that read it.

    4 classes with unordered ids, 6 training and 3 validation images each, default MobileNetV2
    at 32 px, 3 epochs at learning rate 0.01 (enough to learn the colours), TensorBoard logging
    on. Tests must only read what it wrote: at the end of the session its files are checked to
    be as the run left them.
    """
    from tl_helpers.run_notebook import run_notebook

    folder = tmp_path_factory.mktemp("tiny_notebook_run")
    make_dataset(folder / "data", LABELS_UNORDERED)
    write_config(folder, epochs=3, learning_rate=0.01, tensorboard_log_dir="out/tensorboard")
    executed = folder / "executed.ipynb"
    nb = run_notebook(NOTEBOOK, executed, cwd=folder)
    before = folder_state(folder)
    yield SimpleNamespace(folder=folder, nb=nb, executed=executed, labels=LABELS_UNORDERED)
    assert folder_state(folder) == before, "a test changed the shared notebook run's files"


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time in ns) of every file under `folder`, to see if any changed."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def tiny_dataset(tmp_path, labels_unordered) -> Path:
    return make_dataset(tmp_path / "data", labels_unordered)


def tiny_base_model(input_size: int = 32):
    """A small convolutional base (feature map output), quick to build and run."""
    import tensorflow as tf

    keras = tf.keras
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    return keras.Model(inputs, x, name="tiny_base")


def tiny_classifier_with_top(input_size: int = 32, classes: int = 3):
    """A small classifier that still has its top: the base plus pooling, Dense, Dropout, Dense."""
    import tensorflow as tf

    keras = tf.keras
    base = tiny_base_model(input_size)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(12, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(base.input, outputs, name="tiny_with_top")


# Four flat quadrants of distinct colours: each of the 8 EXIF orientations gives another image.
QUADRANT_COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 240))

# What a viewer does to the stored pixels for each EXIF orientation (the EXIF/TIFF standard):
# 2 mirror, 3 rotate 180, 4 flip top to bottom, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse (the other diagonal), 8 rotate 90 counter-clockwise.
EXIF_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),
}


def quadrant_pixels(width: int = 32, height: int = 32) -> np.ndarray:
    """An asymmetric uint8 image: four flat quadrants (red, green / blue, white)."""
    pixels = np.empty((height, width, 3), np.uint8)
    top, left = height // 2, width // 2
    pixels[:top, :left], pixels[:top, left:] = QUADRANT_COLOURS[0], QUADRANT_COLOURS[1]
    pixels[top:, :left], pixels[top:, left:] = QUADRANT_COLOURS[2], QUADRANT_COLOURS[3]
    return pixels


def write_oriented_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """Save `pixels` as stored data of a JPEG whose EXIF Orientation tag is `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=95, subsampling=0, exif=exif)
    return path
