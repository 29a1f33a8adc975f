"""What the user sees: dataset warnings, figures (PNG, headless), progress, TensorBoard logs."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import (
    COLOURS,
    EXIF_UPRIGHT,
    make_dataset,
    quadrant_pixels,
    tiny_base_model,
    write_oriented_jpeg,
)
from matplotlib.artist import Artist
from PIL import Image

from tl_helpers import dataset, evaluate, model, plots, progress, train
from tl_helpers.store import FeatureStore

NOTEBOOK_FIGURES = (
    "class_counts.png",
    "training_samples.png",
    "training_curves.png",
    "confusion_matrix.png",
    "misclassified.png",
)
# Long, non-Latin, "$" (not math) and near-duplicate names: 27 classes.
MANY_NAMES = [f"class_{i:02d}" for i in range(22)] + [
    "a_really_long_class_name_that_goes_on_and_on",
    "a_really_long_class_name_that_goes_on_and_off",
    "Tシャツ",
    "$5 note",
    "x",
]


def png_size(path: Path) -> tuple[int, int]:
    """Pixel size of a PNG file, checking it is one."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def assert_sensible_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    width, height = png_size(path)
    assert 200 <= width <= 4000 and 100 <= height <= 4000, (path, width, height)


def render(fig):
    """Draw a figure on the Agg canvas (as saving does), so text positions are final."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def assert_labels_apart(labels, renderer, axis: int) -> None:
    """Tick labels along `axis` (0: x, 1: y) do not overlap each other."""
    boxes = sorted(
        (label.get_window_extent(renderer) for label in labels if label.get_text()),
        key=lambda box: box.bounds[axis],
    )
    for first, second in zip(boxes, boxes[1:], strict=False):
        end = first.x1 if axis == 0 else first.y1
        start = second.x0 if axis == 0 else second.y0
        assert end <= start + 0.5, (first, second)


# --------------------------------------------------------------------------- dataset warnings


def test_class_warnings_name_few_imbalanced_and_unmeasurable_classes(tmp_path, capsys):
    labels = {"cat": 0, "dog": 1, "bird": 2}
    make_dataset(tmp_path, labels, train_per_class=12, val_per_class=1)
    for i in range(12, 40):  # dog: 40 images, cat 12, bird 3
        (tmp_path / "training" / "dog" / f"dog_{i:03d}.jpg").write_bytes(
            (tmp_path / "training" / "dog" / "dog_000.jpg").read_bytes()
        )
    for path in sorted((tmp_path / "training" / "bird").iterdir())[3:]:
        path.unlink()
    for path in (tmp_path / "validation" / "cat").iterdir():
        path.unlink()
    (tmp_path / "validation" / "cat").rmdir()
    training = dataset.scan_image_folder(tmp_path / "training", labels)
    validation = dataset.scan_image_folder(tmp_path / "validation", labels, role="validation")

    few, imbalance, no_validation = dataset.class_warnings(training, validation)
    assert '"bird" (3)' in few and "fewer than 10" in few
    assert str(tmp_path / "training" / "bird") in few
    assert '"dog" has 40 images' in imbalance
    assert '"bird" (3)' in imbalance and '"cat" (12)' in imbalance
    assert '"cat"' in no_validation and "cannot be measured" in no_validation
    dataset.print_class_warnings(training, validation)
    assert capsys.readouterr().out.count("Warning: ") == 3


def test_balanced_dataset_gets_no_warning(tmp_path, capsys):
    labels = {"a": 0, "b": 1}
    make_dataset(tmp_path, labels, train_per_class=10, val_per_class=1)
    training = dataset.scan_image_folder(tmp_path / "training", labels)
    assert dataset.class_warnings(training) == []
    dataset.print_class_warnings(training)
    assert "Classes look fine" in capsys.readouterr().out


@pytest.mark.parametrize("store", [False, True], ids=["by size and contents", "store digests"])
def test_identical_images_name_validation_copies_and_photos_in_two_classes(tmp_path, capsys, store):
    cache_dir = tmp_path / "feature_cache" if store else None
    labels = {"cat": 0, "dog": 1}
    make_dataset(tmp_path, labels, train_per_class=6, val_per_class=3)
    training_dir, validation_dir = tmp_path / "training", tmp_path / "validation"

    def copy(source: Path, target: Path, change_byte: bool = False) -> None:
        data = bytearray(source.read_bytes())
        if change_byte:  # same size, other contents (a byte of the compressed pixels)
            data[-10] ^= 0x01
        target.write_bytes(bytes(data))

    copy(training_dir / "cat" / "cat_004.jpg", validation_dir / "cat" / "cat_copy.jpg")
    copy(training_dir / "cat" / "cat_001.jpg", training_dir / "dog" / "cat_001.jpg")
    copy(training_dir / "dog" / "dog_002.jpg", training_dir / "dog" / "dog_again.jpg")
    copy(training_dir / "dog" / "dog_003.jpg", validation_dir / "cat" / "near.jpg", True)
    if store:  # files changed within the last 2 s are hashed but not kept in the stat index
        time.sleep(2.1)
    training = dataset.scan_image_folder(training_dir, labels)
    validation = dataset.scan_image_folder(validation_dir, labels, role="validation")

    leak, conflict = dataset.identical_image_warnings(training, validation, cache_dir)
    assert leak.startswith("1 validation image is a copy of a training image")
    assert "training/cat/cat_004.jpg = validation/cat/cat_copy.jpg" in leak
    assert conflict.startswith("1 photo is filed under more than one class")
    assert "training/cat/cat_001.jpg = training/dog/cat_001.jpg" in conflict
    # A copy within one class of the training images is harmless; same size is not a copy.
    assert "dog_again" not in leak + conflict and "near.jpg" not in leak + conflict
    dataset.print_identical_images(training, validation, cache_dir)
    assert capsys.readouterr().out.count("Warning: ") == 2
    if store:  # the digests are kept for the feature pass (and the next run)
        assert len(FeatureStore(cache_dir)._read_stat_index().row) == len(training) + len(
            validation
        )

    (validation_dir / "cat" / "cat_copy.jpg").unlink()
    (training_dir / "dog" / "cat_001.jpg").unlink()
    training = dataset.scan_image_folder(training_dir, labels)
    validation = dataset.scan_image_folder(validation_dir, labels, role="validation")
    assert dataset.identical_image_warnings(training, validation, cache_dir) == []
    dataset.print_identical_images(training, validation, cache_dir)
    assert "No validation image is a copy" in capsys.readouterr().out


# --------------------------------------------------------------------------- figures


def test_figures_on_tiny_inputs(tmp_path):
    figures = [
        ("counts.png", plots.class_counts_figure({"only": 1})),
        ("counts_val.png", plots.class_counts_figure({"a": 3, "b": 12}, {"a": 0, "b": 2})),
        ("history.png", plots.history_figure({"loss": [0.7], "accuracy": [0.5]})),
        ("cm.png", plots.confusion_matrix_figure([[0, 0], [0, 0]], ["a", "b"])),
        ("cm1.png", plots.confusion_matrix_figure([[3]], ["a"])),
        ("none_wrong.png", plots.misclassified_figure([], 4)),
        ("accuracy.png", plots.accuracy_comparison_figure({"float": 0.9, "quantized": None})),
    ]
    for name, fig in figures:
        assert_sensible_png(plots.save_figure(fig, tmp_path / "figures" / name))
    with pytest.raises(ValueError, match="loss"):
        plots.history_figure({})


@pytest.mark.parametrize("epochs", [1, 2, 7, 40])
def test_training_curves_have_whole_epoch_ticks(epochs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    logs = {"loss": [1.0 / (i + 1) for i in range(epochs)], "accuracy": [0.5] * epochs}
    fig = plots.history_figure(logs)
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_fine_tuning_epochs_follow_the_heads_after_a_line():
    head = {"loss": [1.0, 0.8, 0.7], "accuracy": [0.5, 0.6, 0.7], "val_accuracy": [0.5] * 3}
    tuned = {"loss": [0.6, 0.5], "accuracy": [0.75, 0.8], "val_accuracy": [0.55, 0.6]}
    fig = plots.history_figure(head, tuned)
    loss, accuracy = fig.axes
    assert list(loss.lines[0].get_ydata()) == [1.0, 0.8, 0.7, 0.6, 0.5]
    assert list(accuracy.lines[1].get_ydata()) == [0.5, 0.5, 0.5, 0.55, 0.6]
    boundary = [line for line in loss.lines if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in boundary] == [[3.5, 3.5]]
    assert "fine-tuning" in fig._suptitle.get_text()
    assert "fine-tuning" not in plots.history_figure(head, None)._suptitle.get_text()


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # no CJK font on the machine
def test_many_long_class_names_stay_readable(tmp_path):
    names = MANY_NAMES
    counts = {name: 5 + 3 * i for i, name in enumerate(names)}
    matrix = np.eye(len(names), dtype=int) * 7 + 1

    fig = plots.confusion_matrix_figure(matrix, names)
    renderer = render(fig)
    ax = fig.axes[0]
    x_labels, y_labels = ax.get_xticklabels(), ax.get_yticklabels()
    assert len(y_labels) == len(names) == len(x_labels)
    assert all(len(label.get_text()) <= plots.MAX_NAME for label in y_labels)
    assert "Tシャツ" in [label.get_text() for label in y_labels]
    assert "$5 note" in [label.get_text() for label in y_labels]
    assert_labels_apart(y_labels, renderer, axis=1)
    # x labels are rotated 45 degrees: neighbours are apart by (tick spacing x sin 45)
    ends = [label.get_window_extent(renderer).x1 for label in x_labels]
    font_px = x_labels[0].get_fontsize() * fig.dpi / 72
    assert min(np.diff(ends)) * np.sin(np.pi / 4) >= font_px
    # every label is inside the saved image
    for label in [*x_labels, *y_labels]:
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width, label.get_text()
    assert_sensible_png(plots.save_figure(fig, tmp_path / "cm.png"))

    fig = plots.class_counts_figure(counts, {name: 2 for name in names})
    renderer = render(fig)
    assert_labels_apart(fig.axes[0].get_yticklabels(), renderer, axis=1)
    assert_sensible_png(plots.save_figure(fig, tmp_path / "counts.png"))

    accuracies = {f"model {i}": i / 10 for i in range(8)}
    fig = plots.accuracy_comparison_figure(accuracies)
    renderer = render(fig)
    assert_labels_apart(fig.axes[0].get_xticklabels(), renderer, axis=0)


def photo_runs(canvas: np.ndarray, y: float) -> list[np.ndarray]:
    """The photos a photo grid's pixel row `y` crosses: each run of non-white pixels on it."""
    line = canvas[int(y)]
    painted = np.r_[0, (line < 245).any(axis=1).astype(int), 0]
    edges = np.flatnonzero(np.diff(painted))
    return [line[start:stop] for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def test_samples_and_misclassified_grids_show_real_images(tmp_path):
    labels = {"zebra": 0, "apple": 3, "mango": 1}
    make_dataset(tmp_path, labels, train_per_class=7, val_per_class=1)
    broken = tmp_path / "training" / "mango" / "mango_999.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 20)  # JPEG magic, no image: drawn as a note
    folder = dataset.scan_image_folder(tmp_path / "training", labels)
    note = "cannot read\nimage"

    fig = plots.samples_figure(folder, per_class=4)
    (ax,) = fig.axes  # one image of the whole grid, texts on it
    canvas = ax.images[0].get_array()
    assert canvas.shape[:2] == png_size(plots.save_figure(fig, tmp_path / "s.png"))[::-1]
    rows = [t for t in ax.texts if "images)" in t.get_text()]
    assert [row.get_text().split("\n")[0] for row in rows] == ["zebra", "mango", "apple"]
    assert "(8 images)" in rows[1].get_text()
    notes = [t.get_text() for t in ax.texts].count(note)  # the broken image, if picked
    photos = 0
    for row, name in zip(rows, ["zebra", "mango", "apple"], strict=True):
        row_photos = photo_runs(canvas, row.get_position()[1])
        photos += len(row_photos)
        for photo in row_photos:  # each photo shown is one of the class's own images
            colour = photo.reshape(-1, 3).mean(axis=0)
            assert np.abs(colour - COLOURS[labels[name]]).max() < 25, (name, colour)
    assert photos + notes == 12 and notes <= 1  # 4 picks of each class
    assert_sensible_png(plots.save_figure(fig, tmp_path / "samples.png"))

    readable = [path for path in folder.paths if path != str(broken)]
    wrong = [
        {"image": path, "true": "zebra", "predicted": "mango", "confidence": 0.5 + i / 100}
        for i, path in enumerate((readable * 2)[:26])
    ]
    fig = plots.misclassified_figure(wrong, num_images=40)
    (ax,) = fig.axes
    canvas = ax.images[0].get_array()
    title = fig._suptitle.get_text()  # Figure.get_suptitle needs matplotlib 3.8
    assert "26 of 40" in title and "24 most confident" in title
    tops = [t for t in ax.texts if t.get_text().startswith("true: ")]
    bottoms = [t for t in ax.texts if t.get_text().startswith("predicted: ")]
    assert len(tops) == len(bottoms) == 24
    assert tops[0].get_text() == "true: zebra"
    assert bottoms[0].get_text() == "predicted: mango\nconfidence 50.0%"
    assert "73.0%" in bottoms[-1].get_text()  # most confident first, in the order given
    # 4 rows of 6 photos, each between its captions; the first row shows the first 6 images
    assert len({t.get_position()[1] for t in tops}) == 4
    for row in range(4):
        top, bottom = tops[6 * row], bottoms[6 * row]
        middle = (top.get_position()[1] + bottom.get_position()[1]) / 2
        photos = photo_runs(canvas, middle)
        assert len(photos) == 6, row
        for photo, item in zip(photos, wrong[6 * row : 6 * row + 6], strict=True):
            expected = COLOURS[labels[Path(item["image"]).parent.name]]
            assert np.abs(photo.reshape(-1, 3).mean(axis=0) - expected).max() < 25
    assert_sensible_png(plots.save_figure(fig, tmp_path / "wrong.png"))

    item = {"image": str(broken), "true": "mango", "predicted": "apple", "confidence": 0.9}
    fig = plots.misclassified_figure([item])
    assert note in [t.get_text() for t in fig.axes[0].texts]
    assert not photo_runs(fig.axes[0].images[0].get_array(), fig.bbox.height / 2)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # no CJK font on the machine
def test_photo_grids_fit_long_class_names(tmp_path):
    labels = {name: i for i, name in enumerate(MANY_NAMES)}
    make_dataset(tmp_path, labels, train_per_class=2, val_per_class=0)
    folder = dataset.scan_image_folder(tmp_path / "training", labels)
    wrong = [
        {"image": path, "true": name, "predicted": MANY_NAMES[-5], "confidence": 0.9}
        for path, name in zip(folder.paths[-10:], MANY_NAMES[-5:] * 2, strict=True)
    ]
    for fig in (
        plots.samples_figure(folder),
        plots.misclassified_figure(wrong),
        plots.misclassified_figure(wrong[:1], num_images=1000),
    ):
        renderer = render(fig)
        texts = [fig._suptitle, *fig.axes[0].texts]
        boxes = [t.get_window_extent(renderer) for t in texts]
        canvas = fig.axes[0].images[0].get_array()
        height = canvas.shape[0]
        for text, box in zip(texts, boxes, strict=True):  # inside the figure, on no photo
            assert box.x0 >= 0 and box.x1 <= fig.bbox.width, text.get_text()
            assert box.y0 >= 0 and box.y1 <= fig.bbox.height, text.get_text()
            under = canvas[
                int(height - box.y1) : math.ceil(height - box.y0),
                int(box.x0) : math.ceil(box.x1),
            ]
            assert (under == 255).all(), text.get_text()
        for i, first in enumerate(boxes):  # and apart from each other
            for second in boxes[i + 1 :]:
                assert not first.overlaps(second), (first, second)
        assert_sensible_png(plots.save_figure(fig, tmp_path / "grid.png"))


def test_save_figure_replaces_atomically(tmp_path):
    path = tmp_path / "figure.png"
    plots.save_figure(plots.class_counts_figure({"a": 1}), path)
    before = path.read_bytes()

    class Broken(Artist):
        def draw(self, renderer):
            raise RuntimeError("drawing failed")

    fig = plots.class_counts_figure({"b": 2})
    fig.add_artist(Broken())
    with pytest.raises(RuntimeError, match="drawing failed"):
        plots.save_figure(fig, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temporary left


def test_headless_without_display_writes_pngs_and_plots_nothing(tmp_path):
    script = f"""
import sys
from tl_helpers import plots
plots.plot_history({{"loss": [1.0, 0.5], "val_loss": [1.1, 0.9]}}, {str(tmp_path)!r} + "/h.png")
plots.plot_accuracy_comparison({{"float": 0.8, "quantized": 0.78}}, {str(tmp_path)!r} + "/a.png")
assert not plots.in_jupyter_kernel()
assert "matplotlib.pyplot" not in sys.modules, "pyplot (and a GUI backend) was imported"
print("headless ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("MPLBACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "headless ok" in done.stdout and "Figure saved:" in done.stdout
    for name in ("h.png", "a.png"):
        assert_sensible_png(tmp_path / name)


def test_quantization_comparison_from_results(tmp_path, capsys):
    results = {
        "top_1_accuracy": 0.825,
        "quantized_keras_top_1_accuracy": 0.8,
        "quantized_tflite_top_1_accuracy": 0.775,
        "per_class": {},
    }
    assert plots.top1_by_model(results) == {
        "float": 0.825, "quantized keras": 0.8, "quantized tflite": 0.775
    }  # fmt: skip
    plots.plot_quantization_comparison(results, tmp_path / "float_vs_quantized.png")
    assert_sensible_png(tmp_path / "float_vs_quantized.png")
    plots.plot_quantization_comparison({"top_1_accuracy": 0.8}, tmp_path / "none.png")
    assert "quantization is off" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------- evaluation details


def test_misclassified_images_most_confident_first_and_table():
    labels = {"zebra": 0, "apple": 2}
    true = np.array([0, 0, 2, 2])
    probabilities = np.array(
        [[0.9, 0.05, 0.05], [0.3, 0.1, 0.6], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]], dtype=np.float32
    )
    wrong = evaluate.misclassified_images(list("abcd"), true, probabilities, labels)
    assert [w["image"] for w in wrong] == ["c", "b"]
    assert wrong[0] == {
        "image": "c", "true": "apple", "predicted": "output 1 (no class)", "confidence": 0.8
    }  # fmt: skip
    assert wrong[1]["predicted"] == "apple" and wrong[1]["confidence"] == pytest.approx(0.6)

    report = evaluate.classification_report(true, probabilities.argmax(1), labels, 3)
    table = evaluate.format_results(report).splitlines()
    assert table[2].split() == ["class", "id", "images", "correct", "precision", "recall", "F1"]
    assert table[3].split() == ["zebra", "0", "2", "1", "1.000", "0.500", "0.667"]
    assert table[4].split() == ["apple", "2", "2", "1", "0.500", "0.500", "0.500"]


# --------------------------------------------------------------------------- progress, TensorBoard


def test_ticking_updates_while_the_step_runs_and_says_how_it_ended():
    stream = io.StringIO()
    with progress.ticking("Saving", interval=0.01, stream=stream):
        deadline = time.monotonic() + 30
        while "\rSaving ... " not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    text = stream.getvalue()
    assert text.startswith("Saving ...") and "\rSaving ... " in text
    assert text.endswith("s\n") and "\rSaving: done in " in text

    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), progress.ticking("Loading", 10, stream):
        raise KeyboardInterrupt
    assert "Loading: stopped after" in stream.getvalue()


def test_tensorboard_callback_is_optional_and_writes_logs(tmp_path):
    assert plots.tensorboard_callbacks("") == []
    assert plots.tensorboard_callbacks(None) == []
    labels = {"a": 0, "b": 1}
    classifier = model.build_classifier(tiny_base_model(32), labels, 32, "zero_to_one")
    rng = np.random.default_rng(0)
    features = train.Features(
        rng.normal(size=(8, 16)).astype("float32"), np.array([0, 1] * 4, dtype=np.int32)
    )
    log_dir = tmp_path / "tensorboard"
    callbacks = plots.tensorboard_callbacks(log_dir)
    train.train_head(classifier, features, 2, 4, verbose=0, callbacks=callbacks)
    assert list(log_dir.rglob("events.out.tfevents.*"))


# --------------------------------------------------------------------------- the notebook


def test_headless_notebook_run_produces_every_figure(tiny_notebook_run):
    tmp_path, nb = tiny_notebook_run.folder, tiny_notebook_run.nb
    figures = tmp_path / "out" / "model" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(NOTEBOOK_FIGURES)
    for name in NOTEBOOK_FIGURES:
        assert_sensible_png(figures / name)
    # inline in the executed notebook, as the very PNGs that were saved
    shown = [
        out["data"]["image/png"]
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(shown) == len(NOTEBOOK_FIGURES)
    saved = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [o for cell in saved.cells for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(NOTEBOOK_FIGURES)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Warning: Classes" in text and "fewer than 10 training images" in text
    assert "precision" in text and "recall" in text and "F1" in text
    assert "Writing the SavedModel" in text and "done in" in text
    results = json.loads((tmp_path / "out" / "evaluation" / "results.json").read_text())
    assert {"top_1_accuracy", "per_class", "confusion_matrix", "misclassified"} <= set(results)
    assert list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    # fine-tuning's epochs are a run of their own beside the head's
    assert list((tmp_path / "out" / "tensorboard" / "fine_tune").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photo_grids_show_exif_rotated_photos_the_right_way_up(tmp_path, orientation):
    stored = quadrant_pixels(48, 32)
    path = write_oriented_jpeg(tmp_path / "photo.jpg", stored, orientation)
    shown = EXIF_UPRIGHT[orientation](stored)
    height, width = shown.shape[:2]
    canvas = np.full((height + 20, width + 20, 3), 255, np.uint8)
    assert plots._paste_image(canvas, str(path), (0, 0, width + 20, height + 20), 10) == []
    np.testing.assert_allclose(canvas[10 : 10 + height, 10 : 10 + width], shown, atol=12)
