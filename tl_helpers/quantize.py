"""Post-training quantization for the IMX500 with Sony's Model Compression Toolkit (MCT 2.6.1).

The trained classifier already contains its preprocessing, so calibration feeds it raw pixels
from the same loading path as training and inference (`dataset.iter_batches`). MCT flattens
the nested base model itself. Two files are written to `output_dir/quantized/`, atomically:

- `quantized_model.keras`: MCT's quantized Keras model (MCTQ quantizers, MCT's default export),
  the file Sony's IMX500 converter (`imxconv-tf`) takes;
- `quantized_model_int8.tflite`: the same quantization as an int8 TFLite model.

Both are then evaluated on every validation image, batched, beside the float model.
MCT is imported on first use: it takes seconds, and runs without quantization never need it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf

from tl_helpers.config import Config
from tl_helpers.dataset import ImageFolder, iter_batches
from tl_helpers.errors import TLError
from tl_helpers.evaluate import classification_report, top_score_ties
from tl_helpers.export import LABELS_FILE, replace_directory, write_json
from tl_helpers.inference import INFERENCE_BATCH_SIZE, keras_runner, predict_batches
from tl_helpers.progress import ticking, without_tensorflow_notices

keras = tf.keras

TARGET_PLATFORM = "imx500"
QUANTIZED_DIR = "quantized"
KERAS_FILE = "quantized_model.keras"
TFLITE_FILE = "quantized_model_int8.tflite"
# Keys added to results.json; "top_1_accuracy" stays the float model's.
KERAS_TOP1_KEY = "quantized_keras_top_1_accuracy"
TFLITE_TOP1_KEY = "quantized_tflite_top_1_accuracy"
QUANTIZATION_KEY = "quantization"
_BUILTIN_LAYER_PACKAGES = ("keras", "tensorflow")  # MCT's own test for a non-custom layer
# The int8 TFLite model takes one image per call, as an edge runtime feeds it: with a fixed
# batch its shapes are all static, so TFLite's default CPU path (the XNNPACK delegate) runs it.
TFLITE_BATCH_SIZE = 1


@dataclass(frozen=True)
class QuantizedModel:
    """The quantized files in output_dir/quantized and how they were made."""

    directory: Path
    keras_file: Path
    tflite_file: Path
    tpc_version: str
    calibration_images: int
    calibration_batch_size: int
    quantization_seconds: float
    export_seconds: float
    settings: dict[str, object]  # MCT settings that differ from its defaults


@functools.cache
def _mct() -> ModuleType:
    """Import MCT on first use (several seconds), not when tl_helpers is imported."""
    import model_compression_toolkit

    return model_compression_toolkit


# --------------------------------------------------------------------------- model check


def unsupported_layers(model: keras.Model) -> list[str]:
    """Describe each layer (nested models included) that MCT cannot quantize and export."""
    problems = []
    for path, layer in iter_layers(model):
        cls = type(layer)
        module = cls.__module__ or ""
        where = f'layer "{path}" ({cls.__name__})'
        if "saved_model.load" in module:
            problems.append(
                f"{where} was loaded from a SavedModel without its Python class, so the "
                "quantized model cannot be saved"
            )
        elif module.split(".")[0] not in _BUILTIN_LAYER_PACKAGES:
            problems.append(
                f"{where} is a custom layer (from {module}); MCT quantizes built-in Keras "
                "layers only"
            )
        elif isinstance(layer, keras.layers.Lambda):
            problems.append(
                f"{where} holds Python code, which the quantized .keras file cannot carry and "
                "the IMX500 converter cannot read"
            )
    return problems


def check_quantizable(model: keras.Model) -> None:
    """Refuse, before any calibration, a model with layers MCT cannot quantize or export."""
    problems = unsupported_layers(model)
    if not problems:
        return
    listed = "\n".join(f"- {problem}" for problem in problems)
    raise TLError(
        f"The model cannot be quantized for the IMX500:\n{listed}\n"
        "Rebuild the base model (source_keras_model) from built-in Keras layers, or set "
        '"quantize": false in configuration.json to skip quantization.'
    )


def iter_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield (path, layer) for every layer, descending into nested models ("base/conv1")."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, f"{path}/")
        else:
            yield path, layer


# --------------------------------------------------------------------------- calibration


def calibration_paths(
    images: ImageFolder, batch_size: int, batches: int, seed: int = 0
) -> list[str]:
    """Draw batch_size x batches training images at random (all classes), capped by the set."""
    count = min(batch_size * batches, len(images))
    order = np.random.default_rng(seed).permutation(len(images))[:count]
    return [images.paths[i] for i in order]


class CalibrationData:
    """MCT's representative dataset: calling it gives an iterable of [raw-pixel batch] lists.

    Batches stream from the image files (never all in memory). MCT reads the first batch once
    before calibrating; it is kept, so every image is decoded once. It has a length, so MCT's
    "Statistics Collection" bar shows batches done out of the total.
    """

    def __init__(self, paths: Sequence[str], image_size: int, batch_size: int) -> None:
        if not paths:
            raise ValueError("CalibrationData: no images")
        self.paths = list(paths)
        self.image_size = image_size
        self.batch_size = batch_size
        self._first: np.ndarray | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __call__(self) -> CalibrationData:
        return self

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        first, rest = self.paths[: self.batch_size], self.paths[self.batch_size :]
        if self._first is None:
            self._first = next(iter_batches(first, self.image_size, self.batch_size)).numpy()
        yield [self._first]
        for batch in iter_batches(rest, self.image_size, self.batch_size):
            yield [batch.numpy()]


# --------------------------------------------------------------------------- quantize, export


def target_platform(tpc_version: str) -> Any:
    """MCT's IMX500 target platform capabilities of the given version (e.g. "1.0")."""
    return _mct().get_target_platform_capabilities(
        tpc_version=tpc_version, device_type=TARGET_PLATFORM
    )


def quantization_config() -> Any:
    """MCT's quantization settings: its defaults, except weight thresholds that clip nothing.

    MCT's default picks each output channel's weight threshold by minimising the squared
    error, which may clip the largest weights; with NOCLIPPING the threshold covers the
    channel's largest weight. On MobileNetV2 alpha 0.35 this cut the quantized .keras model's
    Top-1 loss on flowers128 from 1.7 to 0.3 points, and the int8 TFLite file's from 2.1 to 1.3
    (README, "Measured accuracy and time").
    """
    mct = _mct()
    return mct.core.QuantizationConfig(
        weights_error_method=mct.core.QuantizationErrorMethod.NOCLIPPING
    )


def changed_settings(config: Any) -> dict[str, object]:
    """The settings of an MCT QuantizationConfig that differ from MCT's defaults (for results)."""
    default = vars(_mct().core.QuantizationConfig())
    return {
        name: getattr(value, "name", value)
        for name, value in vars(config).items()
        if default.get(name) != value
    }


def quantize_model(
    model: keras.Model,
    calibration: CalibrationData,
    tpc_version: str = "1.0",
    settings: Any = None,
) -> keras.Model:
    """Run MCT post-training quantization for the IMX500 with `settings` (an MCT
    QuantizationConfig; default: `quantization_config()`)."""
    check_quantizable(model)
    mct = _mct()
    quantized, _ = mct.ptq.keras_post_training_quantization(
        model,
        calibration,
        core_config=mct.core.CoreConfig(quantization_config=settings or quantization_config()),
        target_platform_capabilities=target_platform(tpc_version),
    )
    return quantized


def export_quantized(
    quantized: keras.Model, output_dir: str | Path, labels: dict[str, int] | None = None
) -> Path:
    """Write output_dir/quantized (.keras for the IMX500 converter, int8 .tflite), atomically."""
    exporter = _mct().exporter
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / QUANTIZED_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{QUANTIZED_DIR}.tmp-", dir=output_dir))
    try:
        # The .keras first: the TFLite exporter removes MCT's metadata layer from the model.
        serialization, quantization = (
            exporter.KerasExportSerializationFormat,
            exporter.QuantizationFormat,
        )
        formats = (
            ("Writing", KERAS_FILE, serialization.KERAS, quantization.MCTQ),
            ("Converting to", TFLITE_FILE, serialization.TFLITE, quantization.INT8),
        )
        for verb, file_name, serialization_format, quantization_format in formats:
            with (
                ticking(f"{verb} {file_name}"),
                without_tensorflow_notices(),
                warnings.catch_warnings(),
                tflite_converts_traced_call(),
            ):
                # TFLite asks for input statistics for a quantized input; ours stays float32.
                warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
                exporter.keras_export_model(
                    model=quantized,
                    save_model_path=str(tmp / file_name),
                    serialization_format=serialization_format,
                    quantization_format=quantization_format,
                )
        if labels is not None:
            write_json(tmp / LABELS_FILE, dict(sorted(labels.items(), key=lambda kv: kv[1])))
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextlib.contextmanager
def tflite_converts_traced_call() -> Iterator[None]:
    """While active, TFLite converts a Keras model from its traced call, not a Keras SavedModel,
    with a batch of `TFLITE_BATCH_SIZE` images.

    MCT's int8 exporter calls `tf.lite.TFLiteConverter.from_keras_model`, whose converter
    first writes the whole model as a Keras SavedModel, per-layer traces and all: that made the
    int8 export of flowers128's MobileNetV2 take 36-40 s on 2 cores. Here the model's call is
    traced once into a `tf.function` with the model's input and output names, saved with its
    variables and nothing else, and converted with `from_concrete_functions`: 9 s, and the same
    quantization parameters in every tensor. The batch is fixed: with the batch left open, the
    reshapes around MCT's Dense head get run-time shapes, and TFLite's default XNNPACK delegate
    refuses the whole graph. TensorFlow's own method is back on leaving, error or not.
    """
    converter_class = tf.lite.TFLiteConverter
    original = converter_class.__dict__["from_keras_model"]

    def from_keras_model(model: keras.Model) -> tf.lite.TFLiteConverter:
        specs = [
            tf.TensorSpec((TFLITE_BATCH_SIZE, *tensor.shape[1:]), tensor.dtype, name=name)
            for tensor, name in zip(model.inputs, model.input_names, strict=True)
        ]

        @tf.function(input_signature=specs)
        def serve(*inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            return dict(zip(model.output_names, outputs, strict=True))

        holder = tf.Module()  # what gets saved: the function and the variables it reads
        holder.model_variables = list(model.variables)
        holder.serve = serve
        return converter_class.from_concrete_functions([serve.get_concrete_function()], holder)

    converter_class.from_keras_model = staticmethod(from_keras_model)
    try:
        yield
    finally:
        converter_class.from_keras_model = original


def quantize_for_imx500(
    classifier: keras.Model, training: ImageFolder, labels: dict[str, int], config: Config
) -> QuantizedModel | None:
    """The notebook's quantization step: check, calibrate, quantize and export (if "quantize")."""
    if not config.quantize:
        print('Quantization is off: set "quantize": true in configuration.json to run it.')
        return None
    paths = calibration_paths(
        training, config.calibration_batch_size, config.calibration_batches, config.seed
    )
    calibration = CalibrationData(paths, config.input_tensor_size, config.calibration_batch_size)
    print(
        f"Calibration: {len(paths)} of {len(training)} training images, {len(calibration)} "
        f"batches of up to {config.calibration_batch_size}; target {TARGET_PLATFORM.upper()}, "
        f"TPC {config.imx500_tpc_version}, MCT {_mct().__version__}"
    )
    settings = quantization_config()
    start = time.perf_counter()
    quantized = quantize_model(classifier, calibration, config.imx500_tpc_version, settings)
    quantization_seconds = time.perf_counter() - start
    start = time.perf_counter()
    directory = export_quantized(quantized, config.output_dir, labels)
    export_seconds = time.perf_counter() - start
    result = QuantizedModel(
        directory=directory,
        keras_file=directory / KERAS_FILE,
        tflite_file=directory / TFLITE_FILE,
        tpc_version=config.imx500_tpc_version,
        calibration_images=len(paths),
        calibration_batch_size=config.calibration_batch_size,
        quantization_seconds=quantization_seconds,
        export_seconds=export_seconds,
        settings=changed_settings(settings),
    )
    print(
        f"Quantized in {quantization_seconds:.1f} s, exported in {export_seconds:.1f} s:\n"
        f"  {result.keras_file} ({_megabytes(result.keras_file)})\n"
        f"  {result.tflite_file} ({_megabytes(result.tflite_file)})"
    )
    return result


# --------------------------------------------------------------------------- evaluation


def load_quantized_keras(path: str | Path) -> keras.Model:
    """Load MCT's quantized .keras file (its quantizers are MCT custom objects)."""
    with ticking(f"Loading {Path(path).name}"):
        return _mct().keras_load_quantized_model(str(path), compile=False)


def tflite_runner(model_file: str | Path) -> Callable[[tf.Tensor], np.ndarray]:
    """A batch of raw-pixel images -> the TFLite model's outputs, as floats.

    One image per call, as the file is exported (`TFLITE_BATCH_SIZE`), on TFLite's default
    CPU path (the XNNPACK delegate).
    """
    interpreter = tf.lite.Interpreter(model_path=str(model_file), num_threads=os.cpu_count())
    interpreter.allocate_tensors()

    def run(batch: tf.Tensor) -> np.ndarray:
        outputs = []
        for image in batch.numpy():
            _set_input(interpreter, image[None])
            interpreter.invoke()
            outputs.append(_get_output(interpreter))
        return np.concatenate(outputs)

    return run


def _set_input(interpreter: tf.lite.Interpreter, batch: np.ndarray) -> None:
    """Feed a float batch, quantizing it first if the model takes integers."""
    detail = interpreter.get_input_details()[0]
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        batch = np.clip(np.round(batch / scale + zero_point), info.min, info.max)
    interpreter.set_tensor(detail["index"], batch.astype(detail["dtype"]))


def _get_output(interpreter: tf.lite.Interpreter) -> np.ndarray:
    """Read the output batch as floats, dequantizing it if the model returns integers."""
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    if np.issubdtype(output.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        output = (output.astype(np.float32) - zero_point) * scale
    return output


def evaluate_quantized(
    quantized: QuantizedModel,
    validation: ImageFolder,
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
) -> dict[str, dict]:
    """Top-1 reports of the quantized .keras and int8 .tflite files on every validation image.

    One pass over the images: each decoded batch goes through both models.
    """
    run_keras = keras_runner(load_quantized_keras(quantized.keras_file), image_size)
    run_tflite = tflite_runner(quantized.tflite_file)
    both = predict_batches(
        lambda batch: np.stack([run_keras(batch), run_tflite(batch)], axis=1),
        validation.paths,
        image_size,
        batch_size,
        "quantized Keras and int8 TFLite models",
    )
    keras_probabilities, tflite_probabilities = both[:, 0], both[:, 1]
    reports = {}
    for name, probabilities in (
        ("quantized_keras", keras_probabilities),
        ("quantized_tflite", tflite_probabilities),
    ):
        reports[name] = {
            **classification_report(
                validation.class_ids,
                probabilities.argmax(axis=1),
                validation.labels,
                probabilities.shape[1],
            ),
            "top_score_ties": top_score_ties(probabilities, validation.class_ids),
        }
    return reports


def add_quantized_results(
    results: dict, quantized: QuantizedModel, validation: ImageFolder, image_size: int
) -> dict:
    """Return `results` (the float model's) with the quantized models' Top-1 and details added."""
    reports = evaluate_quantized(quantized, validation, image_size)
    files = {
        "float": results.get("model"),
        "quantized_keras": str(quantized.keras_file),
        "quantized_tflite": str(quantized.tflite_file),
    }
    models = {
        "float": {
            "file": files["float"],
            "size_bytes": _size_bytes(files["float"]) if files["float"] else None,
            "top_1_accuracy": results["top_1_accuracy"],
            "num_correct": results["num_correct"],
            "num_images": results["num_images"],
        }
    }
    for name, report in reports.items():
        models[name] = {"file": files[name], "size_bytes": _size_bytes(files[name]), **report}
    return {
        **results,
        KERAS_TOP1_KEY: reports["quantized_keras"]["top_1_accuracy"],
        TFLITE_TOP1_KEY: reports["quantized_tflite"]["top_1_accuracy"],
        QUANTIZATION_KEY: {
            "tool": f"model-compression-toolkit {_mct().__version__}",
            "target_platform": TARGET_PLATFORM,
            "tpc_version": quantized.tpc_version,
            "settings_changed_from_mct_defaults": quantized.settings,
            "calibration_images": quantized.calibration_images,
            "calibration_batch_size": quantized.calibration_batch_size,
            "quantization_seconds": round(quantized.quantization_seconds, 1),
            "export_seconds": round(quantized.export_seconds, 1),
            "models": models,
        },
    }


def format_comparison(results: dict) -> str:
    """A table of the float, quantized Keras and int8 TFLite models: Top-1, change, file size."""
    models = results[QUANTIZATION_KEY]["models"]
    names = {
        "float": "float (SavedModel)",
        "quantized_keras": "quantized Keras (.keras)",
        "quantized_tflite": "int8 TFLite (.tflite)",
    }
    float_top1 = models["float"]["top_1_accuracy"]
    lines = [f"{'model':<26}{'Top-1':>8}{'correct':>11}{'vs float':>10}{'size':>11}"]
    for key, label in names.items():
        row = models[key]
        change = "" if key == "float" else f"{100 * (row['top_1_accuracy'] - float_top1):+.1f} pt"
        size = "-" if row["size_bytes"] is None else _format_size(row["size_bytes"])
        correct = f"{row['num_correct']}/{row['num_images']}"
        lines.append(f"{label:<26}{row['top_1_accuracy']:>8.4f}{correct:>11}{change:>10}{size:>11}")
    folder = Path(models["quantized_keras"]["file"]).parent
    lines.append(f"(size: files on disk; the quantized files are in {folder})")
    for key in ("quantized_keras", "quantized_tflite"):
        ties = models[key].get("top_score_ties") or {}
        if ties.get("images"):
            lines.append(
                f"{names[key]}: {ties['images']} images have classes tied at the top score "
                f"(8-bit outputs); Top-1 takes the lowest class id of the tied, and in "
                f"{ties['true_class_not_taken']} of them the true class was tied but not taken."
            )
    return "\n".join(lines)


def _size_bytes(path: str | Path) -> int:
    """Size of a file, or of every file in a folder (a SavedModel)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _format_size(size: int) -> str:
    """Bytes as kB or MB (decimal units), for the tables."""
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _megabytes(path: Path) -> str:
    """The size of a file or folder, formatted."""
    return _format_size(_size_bytes(path))
