"""The benchmark's variants, each run in a child process: `benchmark.py --child SPEC RESULT`.

- project: the notebook's own code cells, executed in order in this process, each cell timed
  and booked to a phase by what it calls (CELL_PHASES);
- classic: the per-epoch procedure of the public reference notebook;
- floor:   one batched backbone pass over every training and validation image.

Each writes a JSON report: seconds and CPU seconds per phase, peak RSS after each phase, the
backbone calls made inside phases (spans), per-epoch wall times, Top-1.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MB = 1_000_000
# A notebook cell's phase: the first pattern its source matches (order matters: the training
# cell also names tl.plots, the figures cell also names tl.dataset, the features cell names
# tl.quantize.lower_quantization, the quantized-results cell also saves results.json).
CELL_PHASES = (
    ("backbone", r"\.compute_features\("),
    ("quantization", r"quantiz"),
    ("training", r"\.train_head\("),
    ("fine-tuning", r"\.fine_tune\("),
    ("save", r"\.save_model\("),
    ("evaluation", r"\.evaluate_saved_model\("),
    ("results", r"\.save_results\("),
    ("figures", r"\.plots\.|print_class_warnings"),
    ("model", r"load_base_model|remove_top_layer_if_needed|build_classifier"),
    ("scan", r"\.dataset\."),
    ("config", r"\.config\.|setup_tensorflow"),
    ("import", r"^\s*(import|from)\s"),
)


def child_main(argv: list[str]) -> int:
    """Run one variant (spec file) and write its report (result file)."""
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    clock = Clock()
    with clock.phase("import"):
        import tensorflow as tf

        import tl_helpers.evaluate
        import tl_helpers.inference
        import tl_helpers.train  # noqa: F401  (imported to be instrumented)
    runners = {"floor": run_floor, "project": run_project, "classic": run_classic}
    report = runners[spec["variant"].split("_")[0]](spec, clock)
    report.update(
        ok=True,
        phases=clock.phases,
        cpu_phases=clock.cpu,
        spans=clock.spans,
        rss_after_phase_mb=clock.rss_after_phase,
        tensorflow=tf.__version__,
    )
    result_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def _vm_hwm_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return 0.0


class Clock:
    """Wall and CPU time per phase, calls inside phases (spans), peak RSS after each phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.spans: list[dict] = []
        self.rss_after_phase: dict[str, float] = {}
        self.current = ""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block; a phase entered twice adds up."""
        self.current = name
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu_start
            self.rss_after_phase[name] = _vm_hwm_mb()

    def span(self, call: str, seconds: float, **extra: object) -> None:
        """Record a call made inside the current phase."""
        self.spans.append({"phase": self.current, "call": call, "seconds": seconds, **extra})


def epoch_timer(seconds: list[float]):
    """A Keras callback appending the wall time of every epoch of a fit to `seconds`."""
    from tensorflow import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    return EpochTimer()


# --------------------------------------------------------------------------- project


def run_project(spec: dict, clock: Clock) -> dict:
    """Execute the notebook's code cells in order, in the folder of configuration.json."""
    epoch_s: list[float] = []
    instrument(clock, epoch_s)
    os.chdir(spec["work_dir"])
    cells = notebook_cells(Path(spec["notebook"]))
    namespace: dict = {"__name__": "__main__"}
    executed = []
    for index, source in cells:
        phase = cell_phase(source)
        start = time.perf_counter()
        with clock.phase(phase):
            exec(compile(source, f"<notebook cell {index}>", "exec"), namespace)
        first_line = source.strip().splitlines()[0] if source.strip() else ""
        executed.append(
            {
                "cell": index,
                "phase": phase,
                "seconds": time.perf_counter() - start,
                "peak_rss_mb": _vm_hwm_mb(),
                "source": first_line[:80],
            }
        )
    split_reload(clock)
    cfg = namespace["cfg"]
    results = json.loads((Path(cfg.evaluate_result_dir) / "results.json").read_text())
    train_set, validation_set = namespace["train_set"], namespace["validation_set"]
    images = len(train_set) + len(validation_set)
    # Backbone runs of the pipeline; the quantized models' evaluation is reported on its own.
    passes = [
        s
        for s in clock.spans
        if s["call"] == "predict_images" and s["phase"] in ("backbone", "evaluation")
    ]
    cache_dir = Path(cfg.feature_cache_dir) if getattr(cfg, "feature_cache", False) else None
    return {
        "images": {"training": len(train_set), "validation": len(validation_set)},
        "cells": executed,
        "epoch_s": epoch_s,
        "top_1": results["top_1_accuracy"],
        "backbone_images_per_s": rate([s for s in passes if s["phase"] == "backbone"]),
        "backbone_passes": sum(s["images"] for s in passes) / images,
        "evaluation_images_per_s": rate([s for s in passes if s["phase"] == "evaluation"]),
        "feature_cache_bytes": folder_bytes(cache_dir) if cache_dir else None,
        "saved_model_bytes": folder_bytes(Path(namespace["model_dir"])),
        "quantization": quantization_report(clock, results),
    }


def quantization_report(clock: Clock, results: dict) -> dict | None:
    """The quantization step's parts (quantize on): MCT, calibration loading, export, evaluation.

    Calibration batches are loaded inside MCT's call (it iterates the representative dataset);
    the time MCT waits for them is measured apart and taken out of MCT's share.
    """
    details = results.get("quantization")
    if not details:
        return None
    spans = [s for s in clock.spans if s["phase"] == "quantization"]

    def seconds(call: str) -> float:
        return sum(s["seconds"] for s in spans if s["call"] == call)

    batches = [s for s in spans if s["call"] == "calibration_batch"]
    decoded = [s for s in spans if s["call"] == "calibration_decode"]
    images = details["calibration_images"]
    return {
        "calibration_images": images,
        "calibration_batch_size": details["calibration_batch_size"],
        "tpc_version": details["tpc_version"],
        "tool": details["tool"],
        "mct_import_s": seconds("mct"),
        "calibration_loading_s": sum(s["seconds"] for s in batches),
        "calibration_images_decoded": sum(s["images"] for s in decoded),
        "calibration_images_given_to_mct": sum(s["images"] for s in batches),
        "mct_quantization_s": seconds("quantize_model") - sum(s["seconds"] for s in batches),
        "export_s": seconds("export_quantized"),
        "evaluation_s": seconds("evaluate_quantized"),
        "validation_images": details["models"]["float"]["num_images"],
        "top_1": {name: model["top_1_accuracy"] for name, model in details["models"].items()},
        "size_bytes": {name: model["size_bytes"] for name, model in details["models"].items()},
    }


def notebook_cells(path: Path) -> list[tuple[int, str]]:
    """(index, source) of the notebook's code cells, in order."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def cell_phase(source: str) -> str:
    """The phase a notebook cell's time is booked to (see CELL_PHASES)."""
    for phase, pattern in CELL_PHASES:
        if re.search(pattern, source, flags=re.MULTILINE):
            return phase
    return "other"


def instrument(clock: Clock, epoch_s: list[float]) -> None:
    """Time backbone passes and the reload from inside; time the head's epochs; no extra work."""
    import tl_helpers.calibration
    import tl_helpers.evaluate
    import tl_helpers.inference
    import tl_helpers.quantize
    import tl_helpers.quantized_evaluation
    import tl_helpers.train

    in_predict_images = [0]  # predict_images runs through predict_chunks: count it once

    def timed(original: Callable, call: str) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            in_predict_images[0] += call == "predict_images"
            try:
                value = original(*args, **kwargs)
            finally:
                in_predict_images[0] -= call == "predict_images"
            extra = {"images": _rows(args, kwargs)} if call == "predict_images" else {}
            clock.span(call, time.perf_counter() - start, **extra)
            return value

        return wrapper

    def with_epoch_timer(original: Callable) -> Callable:
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            callbacks = list(bound.arguments.get("callbacks") or [])
            bound.arguments["callbacks"] = [*callbacks, epoch_timer(epoch_s)]
            return original(*bound.args, **bound.kwargs)

        return wrapper

    def timed_chunks(original: Callable, call: str) -> Callable:
        # The feature store's pass yields chunks; only the time inside the generator counts
        # (the store's writes between chunks are the caller's), booked like predict_images.
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            chunks, seconds = original(*args, **kwargs), 0.0
            while True:
                start = time.perf_counter()
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                finally:
                    seconds += time.perf_counter() - start
                yield chunk
            if not in_predict_images[0]:
                clock.span("predict_images", seconds, images=_rows(args, kwargs))

        return wrapper

    replace(tl_helpers.inference.predict_images, timed, "predict_images")
    replace(tl_helpers.inference.predict_chunks, timed_chunks, "predict_chunks")
    for name in ("mct", "quantize_model", "export_quantized"):
        replace(getattr(tl_helpers.quantize, name), timed, name)
    evaluate_quantized = tl_helpers.quantized_evaluation.evaluate_quantized
    replace(evaluate_quantized, timed, "evaluate_quantized")
    # What MCT is given (CalibrationData batches, waits timed) and what is decoded (the
    # calibration module's loader is used by CalibrationData only).
    calibration = tl_helpers.calibration.CalibrationData
    calibration.__iter__ = timed_batches(
        clock, calibration.__iter__, "calibration_batch", lambda batch: len(batch[0])
    )
    tl_helpers.calibration.iter_batches = timed_batches(
        clock, tl_helpers.calibration.iter_batches, "calibration_decode", len
    )
    replace(tl_helpers.evaluate.load_saved_model, timed, "load_saved_model")
    replace(tl_helpers.train.train_head, lambda f, _: with_epoch_timer(f), "train_head")


def _rows(args: tuple, kwargs: dict) -> int:
    """Rows of a predict_images / predict_chunks call: one per image and view."""
    from tl_helpers.dataset import view_names

    return len(args[1]) * len(view_names(kwargs.get("view", "")))


def timed_batches(clock: Clock, original: Callable, call: str, count: Callable) -> Callable:
    """Wrap a batch generator function: record each batch's wait and image count (`count`)."""

    def batches(*args, **kwargs):
        iterator = original(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            clock.span(call, time.perf_counter() - start, images=count(batch))
            yield batch

    return batches


def replace(original: Callable, make: Callable, name: str) -> None:
    """Swap a function for its wrapper in every tl_helpers module that refers to it."""
    wrapper = make(original, name)
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("tl_helpers") and getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def split_reload(clock: Clock) -> None:
    """Move the SavedModel reload out of the evaluation phase into a phase of its own."""
    reload = sum(s["seconds"] for s in clock.spans if s["call"] == "load_saved_model")
    clock.phases["reload"] = reload
    clock.phases["evaluation"] = clock.phases.get("evaluation", 0.0) - reload


def rate(spans: list[dict]) -> float | None:
    """Images per second over some predict_images calls."""
    seconds = sum(s["seconds"] for s in spans)
    return sum(s["images"] for s in spans) / seconds if seconds else None


def folder_bytes(folder: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# --------------------------------------------------------------------------- classic


def run_classic(spec: dict, clock: Clock) -> dict:
    """The per-epoch procedure of the public reference notebook, on the same classifier."""
    import tensorflow as tf

    import tl_helpers as tl

    keras = tf.keras
    dataset, work, size = Path(spec["dataset"]), Path(spec["work_dir"]), spec["input_size"]
    epoch_s: list[float] = []
    with clock.phase("config"):
        tl.train.setup_tensorflow(spec["seed"])  # the same seed and thread settings
    with clock.phase("scan"):
        labels = tl.dataset.read_labels(dataset / "labels.json")
        train_ds, train_count = folder_dataset(dataset / "training", labels, size, spec)
        val_ds, val_count = folder_dataset(dataset / "validation", labels, size, spec)
    with clock.phase("model"):
        base = tl.model.load_base_model("", size, spec["alpha"])
        model = tl.model.build_classifier(base, labels, size, spec["preprocessing"])
        model.compile(
            optimizer=keras.optimizers.Adam(spec["learning_rate"]),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["acc"],
        )
    with clock.phase("training"):
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=spec["epochs"],
            callbacks=[epoch_timer(epoch_s)],
            verbose=2,
        )
    export_path = work / "output" / "saved_model"
    with clock.phase("save"):
        model.save(export_path)
    with clock.phase("reload"):
        reloaded = keras.models.load_model(export_path)
    with clock.phase("evaluation"):
        paths, ids = validation_files(dataset / "validation", labels)
        top_1 = evaluate_batch_1(reloaded, paths, ids, size)
        print(f"\nTop1 accuracy: {top_1}")
    with clock.phase("results"):
        result_dir = work / "output" / "evaluation"
        result_dir.mkdir(parents=True, exist_ok=True)
        with open(result_dir / "results.json", "w") as f:
            json.dump({"top_1_accuracy": top_1}, f, ensure_ascii=False, indent=4)
    per_epoch = train_count + val_count
    return {
        "images": {"training": train_count, "validation": val_count},
        "epoch_s": epoch_s,
        "top_1": top_1,
        "backbone_images_per_s": per_epoch * spec["epochs"] / clock.phases["training"],
        "backbone_passes": (per_epoch * spec["epochs"] + len(paths)) / per_epoch,
        "evaluation_images_per_s": len(paths) / clock.phases["evaluation"],
        "saved_model_bytes": folder_bytes(export_path),
    }


def folder_dataset(directory: Path, labels: dict[str, int], size: int, spec: dict) -> tuple:
    """keras.utils.image_dataset_from_directory, its folder-order labels mapped to labels.json."""
    import tensorflow as tf

    ds = tf.keras.utils.image_dataset_from_directory(
        directory, image_size=(size, size), batch_size=spec["batch_size"], seed=spec["seed"]
    )
    to_id = tf.constant([labels[name] for name in ds.class_names], dtype=tf.int32)
    count = sum(len(list((directory / name).iterdir())) for name in ds.class_names)
    return ds.map(lambda x, y: (x, tf.gather(to_id, y))), count


def validation_files(directory: Path, labels: dict[str, int]) -> tuple[list[str], list[int]]:
    """Every validation file with its labels.json id (the reference lists them with glob)."""
    paths, ids = [], []
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir() and p.name in labels):
        for image in sorted(class_dir.iterdir()):
            paths.append(str(image))
            ids.append(labels[class_dir.name])
    return paths, ids


def evaluate_batch_1(model, paths: list[str], ids: list[int], size: int) -> float:
    """The reference's evaluation: a tf.data of decoded images, `evaluate` on batch(1)."""
    import numpy as np
    import tensorflow as tf

    def load_image(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        # 0..255 like this project's loader: the preprocessing is inside the model.
        return tf.image.resize(image, (size, size), method="bilinear")

    images = tf.data.Dataset.from_tensor_slices(paths).map(load_image)
    labels = tf.data.Dataset.from_tensor_slices(np.asarray(ids, dtype=np.uint32))
    data = tf.data.Dataset.zip((images, labels)).shuffle(len(paths))
    model.trainable = False
    model.compile(
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
    )
    return float(model.evaluate(data.batch(1), verbose=2)[1])


# --------------------------------------------------------------------------- floor


def run_floor(spec: dict, clock: Clock) -> dict:
    """One batched backbone pass over every training and validation image, nothing else."""
    import tensorflow as tf

    import tl_helpers as tl

    dataset, size = Path(spec["dataset"]), spec["input_size"]
    batch_size = spec.get("floor_batch_size") or tl.inference.INFERENCE_BATCH_SIZE
    with clock.phase("config"):
        tl.train.setup_tensorflow(spec["seed"])
    with clock.phase("scan"):
        labels = tl.dataset.read_labels(dataset / "labels.json")
        paths = [
            path
            for role in ("training", "validation")
            for path in tl.dataset.scan_image_folder(dataset / role, labels, role=role).paths
        ]
    with clock.phase("model"):
        base = tl.model.load_base_model("", size, spec["alpha"])
        classifier = tl.model.build_classifier(base, labels, size, spec["preprocessing"])
        extractor = tl.model.feature_extractor(classifier)

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, (size, size), method="bilinear")

    data = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    data = data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    first_batch_s = 0.0
    with clock.phase("backbone"):
        start = time.perf_counter()
        # The base as the project's passes run it (TFLite's CPU path where it applies, its
        # conversion included; TL_HELPERS_TFLITE=0: TensorFlow).
        run = tl.inference.backbone_runner(extractor, size)
        for k, batch in enumerate(data):
            run(batch)
            if k == 0:
                first_batch_s = time.perf_counter() - start
    seconds = clock.phases["backbone"]
    later = len(paths) - batch_size
    print(f"floor: {len(paths)} images in {seconds:.1f} s ({len(paths) / seconds:.1f} images/s)")
    return {
        "images": {"all": len(paths)},
        "batch_size": batch_size,
        "backbone_images_per_s": len(paths) / seconds,
        "steady_images_per_s": later / (seconds - first_batch_s) if later > 0 else None,
        "first_batch_s": first_batch_s,
        "backbone_passes": 1,
    }
