"""Post-training quantization for the IMX500 with Sony's Model Compression Toolkit (MCT 2.6.1).

The trained classifier already contains its preprocessing, so calibration feeds it raw pixels
from the same loading path as training and inference (`tl_helpers.calibration`). MCT flattens
the nested base model itself, and quantizes the classifier with its logits shifted and clipped
by a ReLU before the softmax (`with_clipped_logits`: the same probabilities, a finer 8-bit grid
for the logits). Two files are written to `output_dir/quantized/`, atomically:

- `quantized_model.keras`: MCT's quantized Keras model (MCTQ quantizers, MCT's default export),
  the input of Sony's IMX500 converter (`tl_helpers.convert`);
- `quantized_model_int8.tflite`: the same quantization as an int8 TFLite model.

MCT is imported on first use: it takes seconds, and runs without quantization never need it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf

from tl_helpers.atomic import remove, replace_directory, temporary_sibling, write_json
from tl_helpers.calibration import CalibrationData, calibration_paths
from tl_helpers.compat import check_convertible, check_quantizable
from tl_helpers.config import Config
from tl_helpers.dataset import ImageFolder
from tl_helpers.export import LABELS_FILE
from tl_helpers.progress import ticking, without_tensorflow_notices
from tl_helpers.tflite import tflite_converts_traced_call

keras = tf.keras

TARGET_PLATFORM = "imx500"
QUANTIZED_DIR = "quantized"
KERAS_FILE = "quantized_model.keras"
TFLITE_FILE = "quantized_model_int8.tflite"
QUANTIZATION_KEY = "quantization"  # the results.json section


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


@dataclass(frozen=True)
class LowerQuantization:
    """How the quantization step will quantize, known before training: its calibration images,
    their batch size and the TPC version.

    MCT sets the quantization of a layer from that layer's float outputs on the calibration
    images, so the layers below the fine-tuning cut, which training never changes, are
    quantized the same way whether MCT quantizes the base below the cut now or the whole
    classifier after fine-tuning. Fine-tuning can then train on the very activations at the
    cut that the quantized model will compute (docs/fine-tuning.md).
    """

    paths: tuple[str, ...]  # the calibration images, in order
    image_size: int
    batch_size: int
    tpc_version: str

    def quantize(self, model: keras.Model) -> keras.Model:
        """`model` quantized as the quantization step quantizes the classifier."""
        calibration = CalibrationData(self.paths, self.image_size, self.batch_size)
        return quantize_model(model, calibration, self.tpc_version)

    def key(self, model_key: str, calibration_digests: list[bytes]) -> str:
        """A feature-store key for the outputs of `quantize(model)`, made without running MCT:
        the float model's key, the calibration images' contents in order, the batch size, the
        TPC version, MCT's version and the code that sets MCT up."""
        description = {
            "quantized": model_key,
            "calibration": [digest.hex() for digest in calibration_digests],
            "batch_size": self.batch_size,
            "tpc_version": self.tpc_version,
            "mct": importlib.metadata.version("model-compression-toolkit"),
            "code": [
                inspect.getsource(function)
                for function in (quantize_model, quantization_config, target_platform)
            ],
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def calibration_for(training: ImageFolder, config: Config) -> CalibrationData:
    """The quantization step's calibration images (`calibration_batch_size` x
    `calibration_batches` training images drawn with `seed`)."""
    paths = calibration_paths(
        training, config.calibration_batch_size, config.calibration_batches, config.seed
    )
    return CalibrationData(paths, config.input_tensor_size, config.calibration_batch_size)


def lower_quantization(training: ImageFolder, config: Config) -> LowerQuantization | None:
    """With "quantize", "fine_tune" and "fine_tune_quantized" on: how the quantization step
    will quantize, for fine-tuning to train on the quantized base below the cut; else None."""
    if not (config.quantize and config.fine_tune and config.fine_tune_quantized):
        return None
    calibration = calibration_for(training, config)
    return LowerQuantization(
        tuple(calibration.paths),
        config.input_tensor_size,
        config.calibration_batch_size,
        config.imx500_tpc_version,
    )


@functools.cache
def mct() -> ModuleType:
    """Import MCT on first use (several seconds), not when tl_helpers is imported."""
    import model_compression_toolkit

    return model_compression_toolkit


def target_platform(tpc_version: str) -> Any:
    """MCT's IMX500 target platform capabilities of the given version (e.g. "1.0")."""
    return mct().get_target_platform_capabilities(
        tpc_version=tpc_version, device_type=TARGET_PLATFORM
    )


def quantization_config() -> Any:
    """MCT's quantization settings: its defaults, except two that keep MobileNetV2's quantized
    Top-1 closer to the float model's (docs/quantization.md).

    - Weight thresholds that clip nothing: MCT's default picks each output channel's weight
      threshold by minimising the squared error, which may clip the largest weights; with
      NOCLIPPING the threshold covers the channel's largest weight.
    - ReLU bounds moved to a power of two: the IMX500's activation thresholds are powers of
      two, so a ReLU6 output gets the threshold 8 and leaves a quarter of its 8-bit grid
      unused; MCT scales the convolutions on each side of a bounded ReLU (by 8/6, then 6/8)
      so that its bound is 8 and the same function uses the whole grid.
    """
    core = mct().core
    return core.QuantizationConfig(
        weights_error_method=core.QuantizationErrorMethod.NOCLIPPING,
        relu_bound_to_power_of_2=True,
    )


def changed_settings(config: Any) -> dict[str, object]:
    """The settings of an MCT QuantizationConfig that differ from MCT's defaults (for results)."""
    default = vars(mct().core.QuantizationConfig())
    return {
        name: getattr(value, "name", value)
        for name, value in vars(config).items()
        if default.get(name) != value
    }


# How far below the lowest top logit of the calibration images (first batch) the logits of the
# quantized head may be clipped (`with_clipped_logits`): a class that far below the top has a
# probability under exp(-8) = 0.03 % of the top class's.
LOGIT_HEADROOM = 8.0
LOGITS_LAYER = "predictions_logits"


def with_clipped_logits(
    model: keras.Model, calibration: CalibrationData | Callable[[], Iterable[list]]
) -> keras.Model:
    """The classifier to quantize: its softmax `Dense` split into `Dense` (logits + c) -> `ReLU`
    -> `Softmax`, the same probabilities for every class within c of the top; `model` itself
    when its last layer is not a softmax `Dense`.

    MCT quantizes the logits to 8 bits before the softmax, on a grid set by their whole range,
    which the least likely classes stretch far below zero (to -24 on a clothing10 model: a
    threshold of 32, steps of 0.25). Two classes whose logits round to the same step get the
    same score, and Top-1 then takes the lower class id: a tie the float model did not have.
    Shifted by c (so that 0 is LOGIT_HEADROOM below the calibration images' lowest top logit,
    or their lowest logit if that is higher) and clipped at 0 by a ReLU, which MCT fuses with
    the `Dense`, the logits are quantized unsigned from 0, on a grid as fine as the signed one
    or finer (twice as fine on the notebook's models), and nothing the softmax resolves is lost
    (docs/quantization.md, "Clipped logits"). Costs one pass of the model over the first batch,
    which is decoded once and kept for MCT.
    """
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.get_config()["activation"] != "softmax":
        return model
    kernel = head.kernel.numpy()
    bias = head.bias.numpy() if head.use_bias else np.zeros(head.units, np.float32)
    if isinstance(calibration, CalibrationData):
        images = calibration.first_batch()  # kept: MCT reads it next, and it is decoded once
    else:  # any MCT representative dataset: a function giving [batch] lists
        images = next(iter(calibration()))[0]
    features = keras.Model(model.inputs, head.input)(images, training=False)
    logits = np.asarray(features) @ kernel + bias
    # Clipped at LOGIT_HEADROOM below the lowest top logit, or at the lowest logit if that is
    # higher: a model whose logits span less than that is only shifted, never clipped.
    floor = max(float(logits.min()), float(logits.max(axis=1).min()) - LOGIT_HEADROOM)
    shift = -floor
    dense = keras.layers.Dense(head.units, name=LOGITS_LAYER)
    x = dense(head.input)
    dense.set_weights([kernel, bias + np.float32(shift)])
    x = keras.layers.ReLU(name=f"{LOGITS_LAYER}_clipped")(x)
    outputs = keras.layers.Softmax(name=head.name)(x)
    return keras.Model(model.inputs, outputs, name=model.name)


def quantize_model(
    model: keras.Model,
    calibration: CalibrationData | Callable[[], Iterable[list]],
    tpc_version: str = "1.0",
    settings: Any = None,
    fast_statistics: bool = True,
) -> keras.Model:
    """Run MCT post-training quantization for the IMX500 with `settings` (an MCT
    QuantizationConfig; default: `quantization_config()`) on `model` with its logits clipped
    (`with_clipped_logits`). MCT's statistics are collected by `faster_statistics` unless
    `fast_statistics` is False (MCT's own code: the same quantized model, slower)."""
    check_quantizable(model)
    toolkit = mct()
    faster = faster_statistics() if fast_statistics else contextlib.nullcontext()
    with faster:
        quantized, _ = toolkit.ptq.keras_post_training_quantization(
            with_clipped_logits(model, calibration),
            calibration,
            core_config=toolkit.core.CoreConfig(
                quantization_config=settings or quantization_config()
            ),
            target_platform_capabilities=target_platform(tpc_version),
        )
    return quantized


def collect_statistics(collector: Any, x: Any, weights: Any = None) -> bool:
    """Update an MCT `StatsCollector` as its `update_statistics` does, with less work; False
    (nothing done) where this does not apply: Hessian weights, not an array with a channel
    axis, values that are not finite.

    MCT keeps, per layer output, a histogram and a weighted histogram (2,048 bins each,
    `np.histogram` finding the range itself), the per-channel mean and the per-channel min/max.
    Here the mean and min/max are MCT's own expressions on the same float64 array; the
    histogram is given its range from those minima and maxima (the same edges `np.histogram`
    would find, so the same bins and counts); and with no Hessian weights the weighted
    histogram is the plain one in float64 (MCT weighs every value by 1.0: the same counts).
    """
    from model_compression_toolkit.constants import LAST_AXIS
    from model_compression_toolkit.core.common.collectors.statistics_collector import (
        standardize_tensor,
    )

    mean, extremes = collector.mc, collector.mpcc
    if (
        weights is not None
        or not isinstance(x, np.ndarray)
        or x.ndim == 0
        or x.size == 0
        or mean.axis != extremes.axis
        or mean.axis not in (LAST_AXIS, *range(x.ndim))
    ):
        return False
    x = standardize_tensor(x)  # float64, as MCT's collectors see it
    axis = x.ndim - 1 if mean.axis == LAST_AXIS else mean.axis
    order = [axis, *(i for i in range(x.ndim) if i != axis)]
    rows = np.reshape(np.transpose(x, order), [x.shape[axis], -1])  # MCT's own expression
    high, low = np.max(rows, axis=-1), np.min(rows, axis=-1)
    first, last = low.min(), high.max()
    if not (np.isfinite(first) and np.isfinite(last)):
        return False  # MCT's own code, and its own error
    counts, bins = np.histogram(x, bins=collector.hc._n_bins, range=(first, last))
    collector.hc._histogram_per_iteration.append((counts, bins))
    collector.weighted_hc._histogram_per_iteration.append((counts.astype(np.float64), bins.copy()))
    mean.i += 1
    mean.current_sum += np.mean(rows, axis=-1)
    mean.current_mean = mean.current_sum / mean.i
    if extremes.state is not None:
        high = np.maximum(high, extremes.state[:, 0])
        low = np.minimum(low, extremes.state[:, 1])
    extremes.state = np.stack([high, low], axis=-1)
    return True


@contextlib.contextmanager
def faster_statistics(workers: int | None = None) -> Iterator[None]:
    """While active, MCT collects its statistics with `collect_statistics`, in parallel threads.

    For each calibration batch MCT runs the model, then updates one statistics collector per
    layer output (histograms, means, min/max) one after the other in NumPy, which is most of
    its time and uses one core. The collectors share no state, and NumPy releases the GIL in
    its array work, so here each update runs in a thread pool; all of a batch's updates finish
    before MCT goes on, so every collector sees the batches in order and computes exactly what
    it computes alone. At most 2 x `workers` updates wait at a time, which bounds the memory
    of the layer outputs they hold. MCT's own methods are back on leaving, error or not.
    """
    from model_compression_toolkit.core.common.collectors.statistics_collector import (
        StatsCollector,
    )
    from model_compression_toolkit.core.common.model_collector import ModelCollector

    workers = workers or os.cpu_count() or 1
    update, infer = StatsCollector.update_statistics, ModelCollector.infer
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mct-statistics")
    slots = threading.BoundedSemaphore(2 * workers)
    pending: list[Future] = []

    def collect(collector: StatsCollector, x: Any, weights: Any) -> None:
        if not collect_statistics(collector, x, weights):
            update(collector, x, weights)

    def queued_update(collector: StatsCollector, x: Any, weights: Any = None) -> None:
        slots.acquire()
        future = pool.submit(collect, collector, x, weights)
        future.add_done_callback(lambda _: slots.release())
        pending.append(future)

    def infer_then_wait(collector: ModelCollector, inputs_list: Any) -> None:
        try:
            infer(collector, inputs_list)
        finally:
            done, pending[:] = list(pending), []
            for future in done:
                future.result()  # re-raises an update's error here

    StatsCollector.update_statistics = queued_update
    ModelCollector.infer = infer_then_wait
    try:
        yield
    finally:
        StatsCollector.update_statistics = update
        ModelCollector.infer = infer
        pool.shutdown(wait=True, cancel_futures=True)


def export_quantized(
    quantized: keras.Model, output_dir: str | Path, labels: dict[str, int] | None = None
) -> Path:
    """Write output_dir/quantized (.keras for the IMX500 converter, int8 .tflite), atomically."""
    exporter = mct().exporter
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / QUANTIZED_DIR
    tmp = temporary_sibling(final)
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
        remove(tmp)
        raise
    return final


def quantize_for_imx500(
    classifier: keras.Model, training: ImageFolder, labels: dict[str, int], config: Config
) -> QuantizedModel | None:
    """The notebook's quantization step: check, calibrate, quantize and export (if "quantize")."""
    if not config.quantize:
        print('Quantization is off: set "quantize": true in configuration.json to run it.')
        return None
    if not config.chief:
        print("Quantization: the chief worker quantizes; this worker does not.")
        return None
    check_quantizable(classifier)
    if config.convert_for_imx500:
        check_convertible(classifier)
    calibration = calibration_for(training, config)
    paths = calibration.paths
    print(
        f"Calibration: {len(paths)} of {len(training)} training images, {len(calibration)} "
        f"batches of up to {config.calibration_batch_size}; target {TARGET_PLATFORM.upper()}, "
        f"TPC {config.imx500_tpc_version}, MCT {mct().__version__}"
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


def size_bytes(path: str | Path) -> int:
    """Size of a file, or of every file in a folder (a SavedModel)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def format_size(size: int) -> str:
    """Bytes as kB or MB (decimal units), for the tables."""
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _megabytes(path: Path) -> str:
    """The size of a file or folder, formatted."""
    return format_size(size_bytes(path))
