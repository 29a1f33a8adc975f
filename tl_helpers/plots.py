"""Figures of the dataset, the training and the evaluation, saved as PNG and shown inline.

Every figure is drawn with matplotlib's object API on the Agg canvas: no pyplot, no GUI
backend, no window, so it works the same with or without a display. Each `plot_*` function
writes its PNG atomically (under `output_dir/figures` in the notebook) and, inside a Jupyter
kernel (JupyterLab, or nbclient in a headless run), also displays that PNG inline, so the
executed notebook holds the images. Elsewhere (a script, a terminal) only the file is written.
The `*_figure` functions build the figure alone, for tests and for other uses.

`tensorboard_callbacks` gives the optional TensorBoard logging (key `tensorboard_log_dir`).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import font_manager, rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from tl_helpers.dataset import FEW_IMAGES, ImageFolder

FIGURE_DIR = "figures"
DPI = 100
TRAINING_COLOUR = "#1f77b4"
VALIDATION_COLOUR = "#ff7f0e"
WARNING_COLOUR = "#d62728"
MISTAKE_COLOUR = "#b00020"
TOP1_KEY = "top_1_accuracy"  # results.json: the float model's; "<model>_top_1_accuracy" others'
MAX_NAME = 24  # class names longer than this are shortened with "…" on axes
# Photo grids, in pixels at DPI: title band, space around texts, a misclassified image's cell
# (width, height) and the band for each caption above and below its image.
HEADER = 50
PAD = 8
MISTAKE_CELL = (210, 250)
CAPTION_BAND = 28
TITLE_SIZE = 11
CAPTION_SIZE = 8
# zlib level of the PNG files: 1 writes the photo grids ~3x faster than the default 6, ~20 %
# larger.
PNG_COMPRESS_LEVEL = 1
# Fonts tried after the default for class names in other scripts (Japanese, Chinese, Korean).
FALLBACK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans JP",
    "IPAexGothic",
    "IPAGothic",
    "TakaoGothic",
    "Yu Gothic",
    "Meiryo",
    "MS Gothic",
    "Hiragino Sans",
    "Arial Unicode MS",
)


# --------------------------------------------------------------------------- output


def figure_dir(output_dir: str | Path) -> Path:
    """The folder for the notebook's PNG figures: output_dir/figures."""
    return Path(output_dir) / FIGURE_DIR


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG to a temporary sibling, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(
                handle, format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def in_jupyter_kernel() -> bool:
    """Tell whether this code runs in a Jupyter kernel, where figures can be shown inline."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show_figure(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as PNG at `path` and, in a Jupyter kernel, display that PNG inline."""
    path = save_figure(fig, path)
    if in_jupyter_kernel():
        from IPython.display import display

        png = base64.b64encode(path.read_bytes()).decode("ascii")
        display({"image/png": png, "text/plain": f"<figure {path.name}>"}, raw=True)
    print(f"Figure saved: {path}")
    return path


# --------------------------------------------------------------------------- the notebook's figures


def plot_class_counts(
    training: ImageFolder, validation: ImageFolder | None, path: str | Path
) -> None:
    """Bar chart of images per class, training vs validation; saved and shown."""
    counts = validation.counts() if validation is not None else None
    show_figure(class_counts_figure(training.counts(), counts), path)


def plot_samples(folder: ImageFolder, path: str | Path, per_class: int = 5) -> None:
    """Grid of a few images of each class, to spot wrong or mislabelled folders; saved and shown."""
    show_figure(samples_figure(folder, per_class), path)


def plot_history(history: object, path: str | Path, fine_tune: object | None = None) -> None:
    """Loss and accuracy per epoch, training vs validation, then the fine-tuning epochs (when
    `fine_tune` is its History) after a dashed line; saved and shown."""
    show_figure(history_figure(history, fine_tune), path)


def plot_confusion_matrix(results: Mapping, path: str | Path) -> None:
    """The evaluation's confusion matrix, class names on the axes; saved and shown."""
    matrix = results["confusion_matrix"]
    show_figure(confusion_matrix_figure(matrix["matrix"], matrix["labels"]), path)


def plot_misclassified(results: Mapping, path: str | Path, max_images: int = 24) -> None:
    """Grid of the misclassified validation images, true vs predicted; saved and shown."""
    fig = misclassified_figure(results["misclassified"], results["num_images"], max_images)
    show_figure(fig, path)


def plot_accuracy_comparison(accuracies: Mapping[str, float | None], path: str | Path) -> None:
    """Top-1 of several models side by side (e.g. float vs quantized); saved and shown."""
    show_figure(accuracy_comparison_figure(accuracies), path)


def plot_quantization_comparison(results: Mapping, path: str | Path) -> None:
    """Float vs quantized Top-1 from results (after quantization); says so when there is none."""
    accuracies = top1_by_model(results)
    if len(accuracies) < 2:
        print("No quantized model in the results: nothing to compare (quantization is off).")
        return
    plot_accuracy_comparison(accuracies, path)


def top1_by_model(results: Mapping) -> dict[str, float | None]:
    """Top-1 per model: "top_1_accuracy" is the float model's, "<model>_top_1_accuracy" others'."""
    accuracies = {"float": results["top_1_accuracy"]}
    for key, value in results.items():
        if key.endswith(f"_{TOP1_KEY}"):
            accuracies[key.removesuffix(f"_{TOP1_KEY}").replace("_", " ")] = value
    return accuracies


# --------------------------------------------------------------------------- figures


def class_counts_figure(
    training: Mapping[str, int], validation: Mapping[str, int] | None = None
) -> Figure:
    """Horizontal bars of images per class (class-id order, top down), few-image classes in red."""
    names = list(training)
    rows = np.arange(len(names))
    train_values = [training[name] for name in names]
    bar = 0.4 if validation is not None else 0.7
    fontsize = 9 if len(names) <= 30 else 7
    with _style():
        fig = Figure(figsize=(8, max(2.6, 1.2 + (0.45 if validation else 0.3) * len(names))))
        fig.set_layout_engine("constrained")
        ax = fig.subplots()
        colours = [WARNING_COLOUR if c < FEW_IMAGES else TRAINING_COLOUR for c in train_values]
        offset = -bar / 2 if validation is not None else 0.0
        containers = [ax.barh(rows + offset, train_values, bar, color=colours)]
        handles = [Patch(color=TRAINING_COLOUR, label=f"training ({sum(train_values)} images)")]
        if validation is not None:
            val_values = [validation.get(name, 0) for name in names]
            containers.append(ax.barh(rows + bar / 2, val_values, bar, color=VALIDATION_COLOUR))
            label = f"validation ({sum(val_values)} images)"
            handles.append(Patch(color=VALIDATION_COLOUR, label=label))
        if len(names) <= 40:
            for container in containers:
                ax.bar_label(container, padding=2, fontsize=fontsize - 1)
        if min(train_values) < FEW_IMAGES:
            handles.append(Patch(color=WARNING_COLOUR, label=f"< {FEW_IMAGES} training images"))
            ax.axvline(FEW_IMAGES, color=WARNING_COLOUR, linestyle=":", linewidth=1)
        ax.set_yticks(rows, [_short(name) for name in names], fontsize=fontsize)
        ax.set_ylim(len(names) - 0.5, -0.5)  # class id order, top down
        ax.set_xlabel("images")
        ax.margins(x=0.12)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        ax.set_title(f"Images per class ({len(names)} classes)", fontsize=11)
    return fig


def samples_figure(
    folder: ImageFolder, per_class: int = 5, max_classes: int = 40, seed: int = 0
) -> Figure:
    """A row of randomly picked images per class (as the model sees them: no EXIF rotation)."""
    rng = np.random.default_rng(seed)
    ordered = sorted(folder.labels.items(), key=lambda item: item[1])
    picks = []
    for name, class_id in ordered:
        indices = np.flatnonzero(folder.class_ids == class_id)
        if indices.size:
            chosen = np.sort(rng.choice(indices, min(per_class, indices.size), replace=False))
            picks.append((name, indices.size, [folder.paths[i] for i in chosen]))
    total_classes = len(picks)
    picks = picks[:max_classes]
    cell = 150 if len(picks) <= 8 else max(80, 1200 // len(picks))  # pixels
    fontsize = 9 if len(picks) <= 20 else 8
    title = f"{folder.directory.name}: {per_class} random images per class"
    if total_classes > len(picks):
        title += f" (first {len(picks)} of {total_classes} classes)"
    with _style():
        labels = [f"{_short(name)}\n({count} images)" for name, count, _ in picks]
        label_width = math.ceil(max(_text_width(label, fontsize) for label in labels)) + 2 * PAD
        grid = (label_width + per_class * cell, len(picks) * cell)
        canvas, left = _canvas(grid, _text_width(title, TITLE_SIZE))
        notes = []
        for row, (_, _, paths) in enumerate(picks):
            for column, path in enumerate(paths):
                box = (left + label_width + column * cell, HEADER + row * cell, cell, cell)
                notes += _paste_image(canvas, path, box, margin=3)
        fig, ax = _photo_figure(canvas, title)
        for row, label in enumerate(labels):
            y = HEADER + (row + 0.5) * cell
            ax.text(left + label_width - PAD, y, label, ha="right", va="center", fontsize=fontsize)
        _write_notes(ax, notes)
    return fig


def history_figure(history: object, fine_tune: object | None = None) -> Figure:
    """Loss and accuracy per epoch, training vs validation, from a Keras History or its dict;
    with `fine_tune` (another), its epochs follow the head's after a dashed line."""
    logs = getattr(history, "history", history)
    if not logs or "loss" not in logs:
        raise ValueError("history_figure: expected a Keras History (or dict) with 'loss'")
    head_epochs = len(logs["loss"])
    tuned = getattr(fine_tune, "history", fine_tune) or {}
    if tuned:
        logs = {key: list(logs[key]) + list(tuned.get(key, [])) for key in logs}
    epochs = np.arange(1, len(logs["loss"]) + 1)
    marker = "o" if len(epochs) <= 30 else None
    with _style():
        fig = Figure(figsize=(10, 3.8))
        fig.set_layout_engine("constrained")
        for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
            last = []
            for key, role, colour in (
                (metric, "training", TRAINING_COLOUR),
                (f"val_{metric}", "validation", VALIDATION_COLOUR),
            ):
                if key in logs:
                    ax.plot(epochs, logs[key], marker=marker, ms=4, color=colour, label=role)
                    last.append(f"{role} {logs[key][-1]:.3f}")
            ax.set_title(f"{metric.capitalize()} (last epoch: {', '.join(last)})", fontsize=10)
            ax.set_xlabel("epoch")
            # Whole epochs only, even with one epoch (only one integer in view: matplotlib's
            # default of at least two ticks would fall back to fractions).
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
            if tuned:
                ax.axvline(head_epochs + 0.5, color="grey", linestyle="--", linewidth=1)
                ax.text(
                    head_epochs + 0.6,
                    0.02,
                    "fine-tuning",
                    transform=ax.get_xaxis_transform(),
                    fontsize=8,
                    color="grey",
                )
            ax.legend(fontsize=8)
            if metric == "accuracy":
                ax.set_ylim(0, 1.02)
            else:
                ax.set_ylim(bottom=0)
        title = "Training of the head, then fine-tuning" if tuned else "Training of the head"
        fig.suptitle(title, fontsize=11)
    return fig


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> Figure:
    """Counts of (true, predicted) classes; colour = share of the true class's images."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(names)
    per_row = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, per_row, out=np.zeros(counts.shape), where=per_row > 0)
    side = min(max(4.5, 0.42 * n + 2.5), 20.0)
    fontsize = 9 if n <= 15 else max(5, 9 - (n - 15) // 6)
    labels = [_short(name) for name in names]
    with _style():
        fig = Figure(figsize=(side + 1.6, side))
        fig.set_layout_engine("constrained")
        ax = fig.subplots()
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(np.arange(n), labels, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(np.arange(n), labels)
        ax.tick_params(labelsize=fontsize)
        if n <= 30:
            for (i, j), count in np.ndenumerate(counts):
                colour = "white" if share[i, j] > 0.5 else ("#999999" if count == 0 else "black")
                ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=fontsize)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        total, correct = int(counts.sum()), int(np.trace(counts))
        top1 = f" (Top-1 {correct / total:.3f})" if total else ""
        ax.set_title(f"Confusion matrix: {correct} of {total} correct{top1}", fontsize=11)
        fig.colorbar(image, ax=ax, shrink=0.8).set_label("share of the true class's images")
    return fig


def misclassified_figure(
    misclassified: Sequence[Mapping], num_images: int | None = None, max_images: int = 24
) -> Figure:
    """The wrongly classified images (most confident first): true label, prediction, confidence."""
    shown = list(misclassified[:max_images])
    of = f" of {num_images}" if num_images is not None else ""
    with _style():
        if not shown:
            fig = Figure(figsize=(6, 1.2))
            fig.text(
                0.5, 0.5, f"No misclassified images: all{of} correct.", ha="center", va="center"
            )
            return fig
        rows = math.ceil(len(shown) / 6)
        columns = math.ceil(len(shown) / rows)  # balanced rows: 7 images as 4 + 3, not 6 + 1
        tops = [f"true: {_short(item['true'], 20)}" for item in shown]
        bottoms = [
            f"predicted: {_short(item['predicted'], 20)}\nconfidence {item['confidence']:.1%}"
            for item in shown
        ]
        widest = max(_text_width(text, CAPTION_SIZE) for text in tops + bottoms)
        width = max(MISTAKE_CELL[0], math.ceil(widest) + 2 * PAD)  # long names widen the cells
        height = MISTAKE_CELL[1]
        title = f"Misclassified validation images: {len(misclassified)}{of}"
        if len(misclassified) > len(shown):
            title += f" (the {len(shown)} most confident mistakes)"
        canvas, left = _canvas((columns * width, rows * height), _text_width(title, TITLE_SIZE))
        image_box = height - 2 * CAPTION_BAND  # the image's square, between the captions
        notes, places = [], []
        for index, item in enumerate(shown):
            row, column = divmod(index, columns)
            x, y = left + column * width, HEADER + row * height
            box = (x + (width - image_box) // 2, y + CAPTION_BAND, image_box, image_box)
            notes += _paste_image(canvas, item["image"], box, margin=2)
            places.append((x + width / 2, y))
        fig, ax = _photo_figure(canvas, title)
        for (x, y), top, bottom in zip(places, tops, bottoms, strict=True):
            ax.text(x, y + CAPTION_BAND - 3, top, ha="center", va="bottom", fontsize=CAPTION_SIZE)
            ax.text(
                x,
                y + height - CAPTION_BAND + 3,
                bottom,
                ha="center",
                va="top",
                fontsize=CAPTION_SIZE,
                color=MISTAKE_COLOUR,
            )
        _write_notes(ax, notes)
    return fig


def accuracy_comparison_figure(accuracies: Mapping[str, float | None]) -> Figure:
    """Bars of Top-1 accuracy per model, with their values."""
    names = list(accuracies)
    values = [accuracies[name] for name in names]
    palette = [TRAINING_COLOUR, VALIDATION_COLOUR, "#2ca02c", "#9467bd", "#8c564b"]
    with _style():
        fig = Figure(figsize=(max(4.0, 1.4 * len(names) + 1.5), 3.6))
        fig.set_layout_engine("constrained")
        ax = fig.subplots()
        bars = ax.bar(
            np.arange(len(names)),
            [0.0 if v is None else v for v in values],
            0.6,
            color=[palette[i % len(palette)] for i in range(len(names))],
        )
        ax.bar_label(bars, ["n/a" if v is None else f"{v:.3f}" for v in values], padding=3)
        labels = [textwrap.fill(_short(name), 14) for name in names]  # wrap at spaces
        ax.set_xticks(np.arange(len(names)), labels)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("Top-1 accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title("Top-1 accuracy on the validation images", fontsize=11)
    return fig


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_callbacks(log_dir: str | Path | None, run: str = "") -> list:
    """A Keras TensorBoard callback writing to `log_dir` (in its sub-folder `run`, e.g.
    "fine_tune", so that a second training's epochs are a run of their own), or none when
    `log_dir` is empty (off)."""
    if not log_dir:
        return []
    import tensorflow as tf

    print(f"TensorBoard logs: {log_dir}  (view them with: tensorboard --logdir {log_dir})")
    return [tf.keras.callbacks.TensorBoard(log_dir=str(Path(log_dir) / run) if run else log_dir)]


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Fonts with fallbacks for non-Latin class names; '$' in names is text, not math."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    fonts = ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]
    with rc_context({"font.family": fonts, "text.parse_math": False}):
        yield


def _short(name: str, limit: int = MAX_NAME) -> str:
    """A class name cut to `limit` characters with "…", so long names do not crowd the axes."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _text_width(text: str, fontsize: float) -> float:
    """Width in pixels (at DPI) of the widest line of `text` in the current font settings."""
    renderer = RendererAgg(1, 1, DPI)
    font = FontProperties(size=fontsize)
    return max(
        renderer.get_text_width_height_descent(line, font, ismath=False)[0]
        for line in text.split("\n")
    )


def _canvas(grid: tuple[int, int], title_width: float) -> tuple[np.ndarray, int]:
    """A white RGB canvas for a grid of `grid` (width, height) pixels below a title band.

    The canvas is widened, grid centred, when the title is wider than the grid. Returns the
    canvas and the grid's left edge.
    """
    width = max(grid[0], math.ceil(title_width) + 2 * PAD)
    return np.full((HEADER + grid[1], width, 3), 255, np.uint8), (width - grid[0]) // 2


def _paste_image(
    canvas: np.ndarray, path: str, box: tuple[int, int, int, int], margin: int
) -> list[tuple[float, float, str]]:
    """Draw the image at `path` fitted and centred in `box` (x, y, width, height) of `canvas`.

    Returns the note to write there instead, [(x, y, text)], when the image cannot be read.
    """
    x, y, width, height = box
    size = (width - 2 * margin, height - 2 * margin)
    try:
        with Image.open(path) as image:
            image.draft("RGB", size)  # JPEG: decode at a reduced scale, much faster
            upright = ImageOps.exif_transpose(image)  # as the training pipeline turns it
            pixels = np.asarray(ImageOps.contain(upright.convert("RGB"), size))
    except (OSError, ValueError, Image.DecompressionBombError):
        return [(x + width / 2, y + height / 2, "cannot read\nimage")]
    top = y + (height - pixels.shape[0]) // 2
    left = x + (width - pixels.shape[1]) // 2
    canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    return []


def _photo_figure(canvas: np.ndarray, title: str) -> tuple[Figure, Axes]:
    """A figure the size of `canvas` showing it pixel for pixel, `title` in its top band.

    Photo grids are one image in one Axes (not an Axes per photo): many times faster to build
    and draw. The Axes' data coordinates are the canvas's pixels (x right, y down), for text.
    """
    height, width = canvas.shape[:2]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(canvas, extent=(0, width, height, 0), interpolation="nearest", aspect="auto")
    fig.suptitle(title, fontsize=TITLE_SIZE, y=1 - (HEADER / 2) / height, va="center")
    return fig, ax


def _write_notes(ax: Axes, notes: list[tuple[float, float, str]]) -> None:
    """Write the notes that stand in for images that could not be read."""
    for x, y, text in notes:
        ax.text(x, y, text, ha="center", va="center", fontsize=CAPTION_SIZE)
