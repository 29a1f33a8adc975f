"""MCT's post-training quantization (PTQ, the notebook's) against its gradient-based PTQ
(GPTQ), or against PTQ with other QuantizationConfig settings, on one trained classifier
(not a test; docs/quantization.md has the results). CASE=clothing10 in the environment: that
case's classifier and dataset instead of flowers128's; SEED=1: another calibration sample.

The classifier is the fine-tuned flowers128 SavedModel that `bench/convert_check.py --cases
flowers128` writes (float Top-1 0.7699); the notebook's calibration (200 training images, 4
batches of 50, seed 0), TPC 1.0; Top-1 of the quantized .keras and .tflite on all 865
validation images.

    .venv/bin/python bench/quantization_methods.py TAG ptq [SETTING=VALUE ...]
    .venv/bin/python bench/quantization_methods.py TAG gptq EPOCHS none|sla|tensor
        (environment: GPTQ_GRADUAL=0 turns gradual activation quantization off,
         GPTQ_REG=<float> sets the regularization factor)

SETTING=VALUE sets a field of MCT's QuantizationConfig (e.g. activation_bias_correction=True,
activation_error_method=NOCLIPPING). Writes bench/out/quantization_methods/TAG/result.json.

Environment, PTQ only: TPC=4.0 another IMX500 target platform version (default 1.0);
A16=Add,ReLU 16-bit activations for the outputs of every layer of these Keras classes (MCT's
manual bit-width selection; the TPC must offer 16 bits for them: 4.0 and later);
MODEL=path another SavedModel (default: convert_check's for CASE).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

import tl_helpers as tl
from tl_helpers.calibration import CalibrationData, calibration_paths
from tl_helpers.quantize import KERAS_FILE, TFLITE_FILE
from tl_helpers.quantized_evaluation import load_quantized_keras

ROOT = Path(__file__).resolve().parents[1]
CASE = os.environ.get("CASE", "flowers128")  # a case of bench/convert_check.py
CONVERT_CHECK_MODEL = ROOT / "bench" / "out" / "convert_check" / CASE / "output" / "model"
MODEL = Path(os.environ.get("MODEL", CONVERT_CHECK_MODEL / "saved_model"))
TPC = os.environ.get("TPC", "1.0")
A16 = [name for name in os.environ.get("A16", "").split(",") if name]
DATA = ROOT.parent / "shared" / "datasets" / CASE
SEED = int(os.environ.get("SEED", "0"))  # of the calibration sample (the notebook's: 0)
OUT = ROOT / "bench" / "out" / "quantization_methods" / CASE


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def layer_types(model):
    outer, inner = set(), set()
    for layer in model.layers:
        outer.add(type(layer).__name__)
        inner.add(type(getattr(layer, "layer", layer)).__name__)
    return sorted(outer), sorted(inner)


def main():
    tag, method = sys.argv[1], sys.argv[2]
    epochs = int(sys.argv[3]) if method == "gptq" else None
    hessian = sys.argv[4] if method == "gptq" else None
    out = OUT / tag
    out.mkdir(parents=True, exist_ok=True)

    labels = tl.dataset.read_labels(DATA / "labels.json")
    train = tl.dataset.scan_image_folder(DATA / "training", labels, role="training")
    val = tl.dataset.scan_image_folder(DATA / "validation", labels, role="validation")
    paths = calibration_paths(train, 50, 4, SEED)
    calibration = CalibrationData(paths, 224, 50)
    model = tf.keras.models.load_model(str(MODEL), compile=False)
    mct = tl.quantize.mct()

    result = {
        "calibration_seed": SEED,
        "tag": tag,
        "method": method,
        "epochs": epochs,
        "hessian": hessian,
        "calibration_images": len(paths),
        "load_before": loadavg(),
    }
    start = time.perf_counter()
    if method == "ptq":
        settings = tl.quantize.quantization_config()
        mct_enums = {"activation_error_method": mct.core.QuantizationErrorMethod}
        for assignment in sys.argv[3:]:
            name, value = assignment.split("=", 1)
            if name in mct_enums:
                value = mct_enums[name][value]
            else:
                value = json.loads(value.lower() if value in ("True", "False") else value)
            setattr(settings, name, value)
        result["settings"] = sys.argv[3:]
        result["tpc"], result["a16"] = TPC, A16
        if A16:
            from model_compression_toolkit.core.common.network_editors import NodeTypeFilter

            bit_widths = mct.core.BitWidthConfig()
            filters = [NodeTypeFilter(getattr(tf.keras.layers, name)) for name in A16]
            bit_widths.set_manual_activation_bit_width(filters, 16)
            with tl.quantize.faster_statistics():
                quantized, _ = mct.ptq.keras_post_training_quantization(
                    model,
                    calibration,
                    core_config=mct.core.CoreConfig(
                        quantization_config=settings, bit_width_config=bit_widths
                    ),
                    target_platform_capabilities=tl.quantize.target_platform(TPC),
                )
        else:
            quantized = tl.quantize.quantize_model(model, calibration, TPC, settings)
    else:
        if hessian == "none":
            kw = dict(use_hessian_based_weights=False, use_hessian_sample_attention=False)
        elif hessian == "tensor":  # Hessian-weighted loss, per tensor, 32 samples (pre-SLA default)
            kw = dict(use_hessian_based_weights=True, use_hessian_sample_attention=False)
        else:  # MCT 2.6.1 default: sample-layer attention
            kw = dict(use_hessian_based_weights=True, use_hessian_sample_attention=True)
        losses = []
        kw["log_function"] = lambda loss, *_: losses.append(float(loss))
        if os.environ.get("GPTQ_GRADUAL") == "0":
            kw["gradual_activation_quantization"] = False
        if os.environ.get("GPTQ_REG"):
            kw["regularization_factor"] = float(os.environ["GPTQ_REG"])
        config = mct.gptq.get_keras_gptq_config(n_epochs=epochs, **kw)
        if os.environ.get("GPTQ_BIAS") == "0":
            config.train_bias = False
        result["train_bias"] = config.train_bias
        result["regularization_factor"] = config.regularization_factor
        result["gradual_activation_quantization"] = (
            config.gradual_activation_quantization_config is not None
        )
        with tl.quantize.faster_statistics():
            quantized, _ = mct.gptq.keras_gradient_post_training_quantization(
                model,
                # MCT's GPTQ calls next(data_gen_fn()): CalibrationData() is only an iterable
                lambda: iter(calibration()),
                gptq_config=config,
                target_platform_capabilities=tl.quantize.target_platform("1.0"),
                core_config=mct.core.CoreConfig(
                    quantization_config=tl.quantize.quantization_config()
                ),
            )
    result["quantize_seconds"] = round(time.perf_counter() - start, 1)
    if method == "gptq":
        result["losses"] = [round(x, 5) for x in losses]
    result["load_after_quantize"] = loadavg()
    print(
        "QUANTIZE_SECONDS",
        result["quantize_seconds"],
        "load",
        result["load_after_quantize"],
        flush=True,
    )
    result["layer_types_outer"], result["layer_types_inner"] = layer_types(quantized)

    start = time.perf_counter()
    folder = tl.quantize.export_quantized(quantized, out, labels)
    result["export_seconds"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    run_keras = tl.inference.keras_runner(load_quantized_keras(folder / KERAS_FILE), 224)
    run_tflite = tl.tflite.tflite_runner(folder / TFLITE_FILE)
    both = tl.inference.predict_batches(
        lambda b: np.stack([run_keras(b), run_tflite(b)], axis=1), val.paths, 224, 32
    )
    ids = np.asarray(val.class_ids)
    result["keras_top1"] = float(np.mean(both[:, 0].argmax(1) == ids))
    result["tflite_top1"] = float(np.mean(both[:, 1].argmax(1) == ids))
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["num_val"] = len(ids)
    result["load_end"] = loadavg()
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
