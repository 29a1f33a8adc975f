"""MCT quantization for the IMX500: real MCT, real files, tiny models (one real backbone test)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, SAMPLES, make_dataset, tiny_base_model, write_config
from mct_quantizers import KerasQuantizationWrapper
from PIL import Image

from tl_helpers import calibration, compat, inference, quantize, quantized_evaluation, tflite
from tl_helpers.config import load_configuration
from tl_helpers.dataset import iter_batches, read_labels, scan_image_folder
from tl_helpers.errors import TLError
from tl_helpers.evaluate import evaluate_saved_model, top_score_ties
from tl_helpers.export import save_model
from tl_helpers.inference import predict_batches, predict_images
from tl_helpers.model import build_classifier, load_base_model
from tl_helpers.train import compute_features, train_head

keras = tf.keras
LABELS = {"red": 1, "green": 0, "blue": 2}


class Doubling(keras.layers.Layer):
    """A custom layer, which MCT refuses."""

    def call(self, inputs):
        return inputs * 2.0


def _folders(root: Path, labels: dict[str, int]):
    return (
        scan_image_folder(root / "training", labels, role="training"),
        scan_image_folder(root / "validation", labels, role="validation"),
    )


def _trained_tiny_classifier(train, validation, size: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)
    classifier = build_classifier(tiny_base_model(size), train.labels, size)
    features = compute_features(classifier, train, validation, size)
    train_head(classifier, features, epochs=15, batch_size=8, learning_rate=0.05)
    return classifier


def test_tiny_model_quantized_end_to_end(tmp_path, capfd, monkeypatch):
    make_dataset(tmp_path / "data", LABELS, train_per_class=8, val_per_class=4)
    train, validation = _folders(tmp_path / "data", LABELS)
    classifier = _trained_tiny_classifier(train, validation)
    model_dir = save_model(classifier, tmp_path / "out" / "model", LABELS)
    write_config(tmp_path, quantize=True, calibration_batch_size=5, calibration_batches=2)
    config = load_configuration(tmp_path / "configuration.json")

    requested: list[str] = []

    def watched_iter_batches(paths, image_size, batch_size, view=""):
        requested.extend(paths)
        return iter_batches(paths, image_size, batch_size, view)

    monkeypatch.setattr(calibration, "iter_batches", watched_iter_batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize.quantize_for_imx500(classifier, train, LABELS, config)
    # No notices that say nothing to the user (TFLite's input statistics, assets written).
    assert not [w for w in caught if "Statistics for quantized inputs" in str(w.message)]
    output = capfd.readouterr()
    assert "Assets written" not in output.out + output.err
    assert "10 of 24 training images, 2 batches" in output.out
    # One pass: MCT reads the first batch before calibrating, yet each image is loaded once.
    assert len(requested) == len(set(requested)) == 10

    # The logits reach the softmax through a ReLU that MCT fused with the Dense: quantized
    # once, unsigned (with_clipped_logits), not on a signed grid around zero.
    reloaded = quantized_evaluation.load_quantized_keras(quantized.keras_file)
    names = [layer.name for layer in reloaded.layers]
    softmax = names.index("predictions")
    holder = reloaded.layers[softmax - 1].get_config()["activation_holder_quantizer"]["config"]
    assert holder["signed"] is False
    assert reloaded.layers[softmax - 2].name == "predictions_logits_clipped"
    assert (
        "predictions_logits" in reloaded.layers[softmax - 3].get_config()["layer"]["config"]["name"]
    )

    folder = tmp_path / "out" / "model" / "quantized"
    assert quantized.directory == folder
    assert quantized.keras_file.is_file() and quantized.tflite_file.is_file()
    assert json.loads((folder / "labels.json").read_text()) == {"green": 0, "red": 1, "blue": 2}
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
    assert quantized.calibration_images == 10 and quantized.tpc_version == "1.0"

    # The files on disk behave like the float model (a tiny model, quantized to 8 bits).
    float_out = predict_images(classifier, validation.paths, 32)
    keras_out = predict_images(
        quantized_evaluation.load_quantized_keras(quantized.keras_file), validation.paths, 32
    )
    capfd.readouterr()
    run_tflite = tflite.tflite_runner(quantized.tflite_file)
    tflite_out = predict_batches(run_tflite, validation.paths, 32, batch_size=5)
    assert "dynamic-sized" not in capfd.readouterr().err  # XNNPACK took the graph: no warning
    assert "DELEGATE" in tflite_ops(quantized.tflite_file)  # ... and runs it
    # int8 from the first operator to the softmax: one QUANTIZE in, one DEQUANTIZE out.
    builtin = tf.lite.Interpreter(
        model_path=str(quantized.tflite_file),
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    ops = [op["op_name"] for op in builtin._get_ops_details()]
    assert ops.count("QUANTIZE") == ops.count("DEQUANTIZE") == 1 and ops[-2:] == [
        "SOFTMAX",
        "DEQUANTIZE",
    ], ops
    assert keras_out.shape == tflite_out.shape == float_out.shape == (12, 3)
    assert np.abs(keras_out - float_out).max() < 0.1
    assert np.abs(tflite_out - keras_out).max() < 0.05

    results = evaluate_saved_model(model_dir, validation, 32)
    requested.clear()
    monkeypatch.setattr(inference, "iter_batches", watched_iter_batches)
    merged = quantized_evaluation.add_quantized_results(results, quantized, validation, 32)
    assert sorted(requested) == sorted(validation.paths)  # one pass for both quantized models
    assert merged["top_1_accuracy"] == results["top_1_accuracy"]
    keras_top1 = float((keras_out.argmax(1) == validation.class_ids).mean())
    tflite_top1 = float((tflite_out.argmax(1) == validation.class_ids).mean())
    assert merged["quantized_keras_top_1_accuracy"] == pytest.approx(keras_top1)
    assert merged["quantized_tflite_top_1_accuracy"] == pytest.approx(tflite_top1)
    models = merged["quantization"]["models"]
    assert models["quantized_tflite"]["size_bytes"] == quantized.tflite_file.stat().st_size
    assert models["float"]["size_bytes"] > 0
    assert models["quantized_tflite"]["top_score_ties"] == top_score_ties(
        tflite_out, validation.class_ids
    )
    assert models["quantized_keras"]["top_score_ties"] == top_score_ties(
        keras_out, validation.class_ids
    )
    table = quantized_evaluation.format_comparison(merged)
    assert "float (SavedModel)" in table and "int8 TFLite" in table and " pt" in table
    models["quantized_tflite"]["top_score_ties"] = {"images": 3, "true_class_not_taken": 2}
    models["quantized_keras"]["top_score_ties"] = {"images": 0, "true_class_not_taken": 0}
    lines = quantized_evaluation.format_comparison(merged).splitlines()
    assert lines[-1].startswith("int8 TFLite (.tflite): 3 images have classes tied at the top")
    assert "in 2 of them the true class was tied but not taken" in lines[-1]
    assert not any(line.startswith("quantized Keras (.keras): ") for line in lines)


def test_clipped_logits_give_the_same_probabilities(tmp_path):
    """The head MCT quantizes (Dense with its logits shifted, ReLU, Softmax) gives the float
    classifier's classes, and its probabilities wherever no logit is clipped: a head whose
    logits span little is only shifted (its lowest logit on the calibration images to 0); a
    wide one is clipped LOGIT_HEADROOM below their lowest top logit."""
    make_dataset(tmp_path / "data", LABELS, train_per_class=8, val_per_class=4)
    train, validation = _folders(tmp_path / "data", LABELS)
    narrow = _trained_tiny_classifier(train, validation)
    wide = keras.models.clone_model(narrow)
    wide.set_weights(narrow.get_weights())
    wide.get_layer("predictions").set_weights(
        [10 * w for w in narrow.get_layer("predictions").get_weights()]
    )
    data = calibration.CalibrationData(train.paths[:10], 32, 5)
    images = next(iter_batches(validation.paths, 32, len(validation.paths))).numpy()
    shifted = {}
    for name, classifier in (("narrow", narrow), ("wide", wide)):
        clipped = quantize.with_clipped_logits(classifier, data)
        kinds = [type(layer).__name__ for layer in clipped.layers[-3:]]
        assert kinds == ["Dense", "ReLU", "Softmax"] and clipped.layers[-1].name == "predictions"
        head = classifier.get_layer("predictions")
        np.testing.assert_array_equal(clipped.layers[-3].kernel.numpy(), head.kernel.numpy())
        shift = clipped.layers[-3].bias.numpy() - head.bias.numpy()
        np.testing.assert_allclose(shift, shift[0], rtol=1e-6)
        before_relu = keras.Model(clipped.inputs, clipped.layers[-3].output)
        shifted[name] = before_relu(data.first_batch()).numpy()
        original, probabilities = classifier(images).numpy(), clipped(images).numpy()
        np.testing.assert_array_equal(probabilities.argmax(axis=1), original.argmax(axis=1))
        # An image none of whose classes is clipped gets exactly the float probabilities.
        whole = (before_relu(images).numpy() > 0).all(axis=1)
        assert whole.sum() >= len(images) // 2 if name == "narrow" else not whole.all()
        np.testing.assert_allclose(probabilities[whole], original[whole], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(probabilities, original, atol=0.02)
    assert shifted["narrow"].min() == pytest.approx(0, abs=1e-4)
    lowest_top = shifted["wide"].max(axis=1).min()
    assert lowest_top == pytest.approx(quantize.LOGIT_HEADROOM, rel=1e-4)
    assert (shifted["wide"] < 0).any()  # the wide head's unlikely classes are clipped
    # A model that does not end in a softmax Dense is quantized as it is.
    features = keras.Model(narrow.inputs, narrow.get_layer("predictions").input)
    assert quantize.with_clipped_logits(features, data) is features


def comparison_models(float_correct: int, keras_correct: int, tflite_correct: int) -> dict:
    """results.json's quantization part for a 200-image validation set (no files)."""
    models = {}
    for name, correct in (
        ("float", float_correct),
        ("quantized_keras", keras_correct),
        ("quantized_tflite", tflite_correct),
    ):
        models[name] = {
            "file": f"/out/{name}",
            "size_bytes": 1000,
            "top_1_accuracy": correct / 200,
            "num_correct": correct,
            "num_images": 200,
        }
    return {"quantization": {"models": models}}


def test_comparison_advises_another_seed_when_a_quantized_model_loses_much():
    # 160 -> 156 images is 2.0 points: advice naming that file; 159 is 0.5: not named.
    lines = quantized_evaluation.format_comparison(comparison_models(160, 156, 159)).splitlines()
    assert lines[-1].startswith("Below the float model by more than 1.5 points: ")
    assert "quantized Keras (.keras) 2.0 points (4 images)" in lines[-1]
    assert "int8 TFLite" not in lines[-1]
    assert 'set another "seed" in configuration.json' in lines[-1]
    # Both files: both named.
    both = quantized_evaluation.format_comparison(comparison_models(160, 156, 150))
    assert "int8 TFLite (.tflite) 5.0 points (10 images)" in both.splitlines()[-1]
    # Within 1.5 points, or better than the float model: no advice.
    for keras_correct, tflite_correct in ((157, 160), (165, 170)):
        table = quantized_evaluation.format_comparison(
            comparison_models(160, keras_correct, tflite_correct)
        )
        assert "seed" not in table
    # One image of a small set is more than 1.5 points, and not enough to advise anything.
    small = comparison_models(30, 29, 29)
    for row in small["quantization"]["models"].values():
        row["num_images"] = 40
        row["top_1_accuracy"] = row["num_correct"] / 40
    assert "seed" not in quantized_evaluation.format_comparison(small)


def tflite_ops(model_file: Path) -> list[str]:
    """The operators TFLite's default interpreter runs, "DELEGATE" for each XNNPACK part."""
    interpreter = tf.lite.Interpreter(model_path=str(model_file))
    interpreter.allocate_tensors()
    return [op["op_name"] for op in interpreter._get_ops_details()]


def builtin_kernels_outputs(model_file: Path, images: np.ndarray) -> np.ndarray:
    """Outputs of TFLite's built-in kernels (no delegate), one image per call."""
    builtin = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = tf.lite.Interpreter(
        model_path=str(model_file), experimental_op_resolver_type=builtin
    )
    interpreter.allocate_tensors()
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in images:
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(result["index"])[0])
    return np.stack(outputs)


def test_tflite_from_the_traced_call_equals_tensorflows_own_conversion(tmp_path):
    """The fast int8 conversion gives TensorFlow's model, with a batch of one image: tensors,
    signature, outputs; TFLite's default XNNPACK delegate takes it (not TensorFlow's own)."""
    make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=3)
    train, validation = _folders(tmp_path / "data", LABELS)
    keras.utils.set_random_seed(0)
    classifier = build_classifier(tiny_base_model(32), LABELS, 32)
    # The head as MCT splits it without clipped logits (Dense, then Softmax): TensorFlow's own
    # converter keeps a clipped head's Dense in float with a dynamic batch, so the two paths are
    # compared on this one (the clipped head's fast conversion is int8 throughout: next test).
    head = classifier.get_layer("predictions")
    logits = keras.layers.Dense(head.units)(head.input)
    unclipped = keras.Model(classifier.inputs, keras.layers.Softmax()(logits))
    logits.node.layer.set_weights(head.get_weights())
    assert quantize.with_clipped_logits(unclipped, lambda: iter([])) is unclipped
    quantized = quantize.quantize_model(unclipped, calibration.CalibrationData(train.paths, 32, 6))
    exporter = quantize.mct().exporter
    tensorflows_own = tf.lite.TFLiteConverter.from_keras_model

    def export(path: Path) -> tf.lite.Interpreter:
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        exporter.keras_export_model(
            model=quantized,
            save_model_path=str(path),
            serialization_format=exporter.KerasExportSerializationFormat.TFLITE,
            quantization_format=exporter.QuantizationFormat.INT8,
        )
        return tf.lite.Interpreter(model_path=str(path))

    with tflite.tflite_converts_traced_call():
        assert tf.lite.TFLiteConverter.from_keras_model != tensorflows_own
        fast = export(tmp_path / "fast.tflite")
    assert tf.lite.TFLiteConverter.from_keras_model == tensorflows_own
    own = export(tmp_path / "own.tflite")

    assert fast.get_signature_list() == own.get_signature_list() != {}
    assert fast.get_input_details()[0]["shape_signature"].tolist() == [1, 32, 32, 3]
    assert own.get_input_details()[0]["shape_signature"].tolist() == [-1, 32, 32, 3]

    # The same per-channel weights and biases, in order, and the same activation grids (with
    # a fixed batch the converter joins the pooling's reshape to it, one activation fewer).
    def weights_and_grids(interpreter: tf.lite.Interpreter) -> tuple[list, set]:
        weights, grids = [], set()
        for t in interpreter.get_tensor_details():
            params = t["quantization_parameters"]
            if params["scales"].size > 1:
                weights.append((t["shape"].tolist(), interpreter.get_tensor(t["index"]), params))
            elif params["scales"].size == 1:
                grids.add((t["dtype"], float(params["scales"][0]), int(params["zero_points"][0])))
        return weights, grids

    fast.allocate_tensors()
    own.allocate_tensors()
    (fast_weights, fast_grids), (own_weights, own_grids) = map(weights_and_grids, (fast, own))
    assert fast_grids == own_grids and len(fast_grids) >= 3
    assert len(fast_weights) == len(own_weights) == 6  # 3 kernels, 3 biases
    for (shape, values, params), (own_shape, own_values, own_params) in zip(
        fast_weights, own_weights, strict=True
    ):
        assert shape == own_shape  # (names differ: MCT numbers its copies of layers anew)
        np.testing.assert_array_equal(values, own_values)
        for key in ("scales", "zero_points", "quantized_dimension"):
            np.testing.assert_array_equal(params[key], own_params[key])
    images = np.concatenate(list(iter_batches(validation.paths, 32, 16)))
    np.testing.assert_array_equal(
        builtin_kernels_outputs(tmp_path / "fast.tflite", images),
        builtin_kernels_outputs(tmp_path / "own.tflite", images),
    )
    assert "DELEGATE" in tflite_ops(tmp_path / "fast.tflite")
    assert "DELEGATE" not in tflite_ops(tmp_path / "own.tflite")

    with pytest.raises(RuntimeError), tflite.tflite_converts_traced_call():
        raise RuntimeError("interrupted export")
    assert tf.lite.TFLiteConverter.from_keras_model == tensorflows_own


def test_quantization_off_writes_nothing(tmp_path, capsys):
    make_dataset(tmp_path / "data", LABELS, 2, 1)
    write_config(tmp_path)
    config = load_configuration(tmp_path / "configuration.json")
    train, _ = _folders(tmp_path / "data", LABELS)
    assert quantize.quantize_for_imx500(tiny_base_model(), train, LABELS, config) is None
    assert '"quantize": true' in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_calibration_images_are_capped_seeded_and_mixed(tmp_path):
    make_dataset(tmp_path / "data", LABELS, train_per_class=6, val_per_class=1)
    train, _ = _folders(tmp_path / "data", LABELS)
    paths = calibration.calibration_paths(train, batch_size=4, batches=2, seed=3)
    assert len(paths) == 8 == len(set(paths))
    assert paths == calibration.calibration_paths(train, 4, 2, seed=3)
    assert len({Path(p).parent.name for p in paths}) > 1  # not just the first class folder
    assert sorted(calibration.calibration_paths(train, 50, 10)) == sorted(train.paths)

    data = calibration.CalibrationData(paths[:7], image_size=16, batch_size=3)
    assert data() is data and len(data) == 3
    first, second = list(data()), list(data())
    assert [b[0].shape for b in first] == [(3, 16, 16, 3), (3, 16, 16, 3), (1, 16, 16, 3)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert 0 <= first[0][0].min() and first[0][0].max() <= 255  # raw pixels
    one_batch = calibration.CalibrationData(paths[:2], image_size=16, batch_size=5)
    assert [b[0].shape for b in one_batch()] == [(2, 16, 16, 3)]


def test_unquantizable_layers_are_refused_before_calibration(tmp_path):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = Doubling(name="doubling")(x)
    x = keras.layers.Lambda(lambda t: t + 1.0, name="plus_one")(x)
    base = keras.Model(inputs, x, name="user_base")
    base.save(tmp_path / "base_sm", save_format="tf")
    revived = keras.models.load_model(tmp_path / "base_sm", compile=False)
    classifier = build_classifier(revived, LABELS, 32, "zero_to_one")
    missing = calibration.CalibrationData([str(tmp_path / "missing.jpg")], 32, 1)
    with pytest.raises(TLError) as err:
        quantize.quantize_model(classifier, missing)  # no image is read: the check comes first
    message = str(err.value)
    assert 'layer "user_base/doubling" (Doubling) was loaded from a SavedModel' in message
    assert 'layer "user_base/plus_one" (Lambda) holds Python code' in message
    assert '"user_base/conv"' not in message
    assert '"quantize": false' in message

    with pytest.raises(TLError, match=r'"user_base/doubling" \(Doubling\) is a custom layer'):
        compat.check_quantizable(build_classifier(base, LABELS, 32, "zero_to_one"))


def test_real_backbone_on_real_images():
    """The bundled MobileNetV2 (alpha 0.35, 96 px) quantized with MCT on the sample's photos."""
    labels = read_labels(SAMPLES / "labels.json")
    train = scan_image_folder(SAMPLES / "training", labels, role="training")
    validation = scan_image_folder(SAMPLES / "validation", labels, role="validation")
    keras.utils.set_random_seed(0)
    classifier = build_classifier(load_base_model(None, 96, 0.35), labels, 96)
    features = compute_features(classifier, train, validation, 96)
    train_head(classifier, features, epochs=10, batch_size=16)
    paths = calibration.calibration_paths(train, batch_size=10, batches=2)
    quantized = quantize.quantize_model(classifier, calibration.CalibrationData(paths, 96, 10))

    # MCT flattened the nested MobileNetV2: every convolution and the Dense are quantized.
    float_layers = [layer for _, layer in compat.iter_layers(classifier)]
    weighted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    wrappers = [layer for layer in quantized.layers if isinstance(layer, KerasQuantizationWrapper)]
    assert len(wrappers) == sum(isinstance(layer, weighted) for layer in float_layers) > 50
    assert not any(isinstance(layer, keras.Model) for layer in quantized.layers)

    # Weight thresholds clip nothing (quantization_config): each output channel's largest
    # weight survives quantization. MCT's default (MSE search) keeps it in about 4% of them.
    channels = kept = 0
    for wrapper in wrappers:
        for _, weight, quantizer in wrapper.get_weights_vars():
            weight = weight.numpy()
            others = tuple(
                i for i in range(weight.ndim) if i != quantizer.channel_axis % weight.ndim
            )
            largest = np.abs(weight).max(axis=others)
            largest_quantized = np.abs(quantizer(tf.constant(weight)).numpy()).max(axis=others)
            channels += largest.size
            kept += int(np.isclose(largest_quantized, largest, rtol=1e-5, atol=0).sum())
    assert channels > 5000 and kept >= 0.99 * channels
    settings = quantize.changed_settings(quantize.quantization_config())
    assert settings == {"weights_error_method": "NOCLIPPING", "relu_bound_to_power_of_2": True}
    # ReLU bounds moved to a power of two (quantization_config): MobileNetV2's ReLU6 layers
    # between two convolutions are bounded at 8 in the quantized model.
    float_bounds = [
        float(layer.max_value)
        for layer in float_layers
        if isinstance(layer, keras.layers.ReLU) and layer.max_value is not None
    ]
    bounds = [
        float(layer.max_value)
        for layer in quantized.layers
        if isinstance(layer, keras.layers.ReLU) and layer.max_value is not None
    ]
    assert set(float_bounds) == {6.0} and len(float_bounds) > 30
    # (The ReLU6 layers not between two convolutions, such as the last one, keep their 6.)
    assert len(bounds) == len(float_bounds) and bounds.count(8.0) >= 30 > bounds.count(6.0)

    float_ids = predict_images(classifier, validation.paths, 96).argmax(1)
    quantized_ids = predict_images(quantized, validation.paths, 96).argmax(1)
    float_correct = int((float_ids == validation.class_ids).sum())
    quantized_correct = int((quantized_ids == validation.class_ids).sum())
    assert float_correct >= 25  # of 40: the head did learn
    assert abs(quantized_correct - float_correct) <= 2
    assert (float_ids == quantized_ids).mean() >= 0.9


def test_notebook_with_quantization_on(tmp_path, monkeypatch):
    """The whole notebook with quantization on and a user's .h5 base; the IMX500 converter is
    made missing, so the conversion step says so in one line and the run still completes."""
    from tl_helpers import convert
    from tl_helpers.run_notebook import run_notebook

    monkeypatch.setenv(convert.CONVERTER_ENV_VAR, str(tmp_path / "no-converter" / "imxconv-tf"))
    make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=2)
    tiny_base_model(32).save(tmp_path / "base.h5")
    write_config(
        tmp_path,
        source_keras_model="base.h5",
        epochs=2,
        quantize=True,
        calibration_batch_size=4,
        calibration_batches=2,
    )
    nb = run_notebook(
        ROOT / "image_classification.ipynb", tmp_path / "executed.ipynb", cwd=tmp_path
    )
    folder = tmp_path / "out" / "model" / "quantized"
    assert (folder / "quantized_model.keras").is_file()
    assert (folder / "quantized_model_int8.tflite").is_file()
    results = json.loads((tmp_path / "out" / "evaluation" / "results.json").read_text())
    for key in (
        "top_1_accuracy",
        "quantized_keras_top_1_accuracy",
        "quantized_tflite_top_1_accuracy",
    ):
        # The int8 models give the float model's Top-1 to within one image of the 6.
        assert abs(results[key] - results["top_1_accuracy"]) <= 1 / 6 + 1e-9, results[key]
    assert results["quantization"]["calibration_images"] == 8
    assert results["quantization"]["settings_changed_from_mct_defaults"] == {
        "weights_error_method": "NOCLIPPING",
        "relu_bound_to_power_of_2": True,
    }
    assert results["quantization"]["models"]["quantized_keras"]["num_images"] == 6
    assert results["configuration"]["quantize"] is True
    chart = tmp_path / "out" / "model" / "figures" / "float_vs_quantized.png"
    with Image.open(chart) as image:  # the float vs quantized Top-1 chart
        assert image.width >= 300 and image.height >= 200
    conversion = results[convert.CONVERSION_KEY]
    assert conversion["ran"] is False and "make venv" in conversion["reason"]
    last = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
    assert "".join(o.text for o in last).strip() == conversion["reason"]
    assert not (tmp_path / "out" / "model" / "imx500").exists()


def test_faster_statistics_give_the_same_quantized_model(tmp_path):
    """MCT's statistics collected by `faster_statistics` (the default: fewer passes, parallel
    threads) or by MCT's own code give the same weights and the same quantizer thresholds."""
    make_dataset(tmp_path / "data", LABELS, train_per_class=6, val_per_class=2)
    train, validation = _folders(tmp_path / "data", LABELS)
    classifier = _trained_tiny_classifier(train, validation)
    paths = calibration.calibration_paths(train, batch_size=6, batches=3)

    def quantized(fast: bool):
        data = calibration.CalibrationData(paths, 32, 6)
        model = quantize.quantize_model(classifier, data, fast_statistics=fast)
        thresholds = [
            layer.activation_holder_quantizer.get_config()
            for layer in model.layers
            if hasattr(layer, "activation_holder_quantizer")
        ]
        return model.get_weights(), thresholds

    mct_weights, mct_thresholds = quantized(False)
    fast_weights, fast_thresholds = quantized(True)
    assert len(mct_thresholds) > 5
    assert fast_thresholds == mct_thresholds
    assert len(fast_weights) == len(mct_weights)
    for a, b in zip(fast_weights, mct_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_collect_statistics_equals_mcts_own_update():
    """Histogram, weighted histogram, per-channel mean and min/max after several batches are
    exactly MCT's, for channels last and first, a constant batch, ReLU-like zeros and values
    whose sum depends on the order of the additions."""
    quantize.mct()
    from model_compression_toolkit.core.common.collectors.statistics_collector import (
        StatsCollector,
    )

    rng = np.random.default_rng(0)
    batches = [
        np.maximum(rng.normal(size=(4, 9, 7, 5)), 0).astype(np.float32),
        (rng.normal(size=(3, 9, 7, 5)) * 3 + 1).astype(np.float32),
        np.full((2, 9, 7, 5), 0.25, np.float32),
        # float64 over many magnitudes: a sum in another order rounds differently
        rng.normal(size=(6, 9, 7, 5)) * 10.0 ** rng.uniform(-8, 8, size=(6, 9, 7, 5)),
    ]
    for axis in (-1, 1):
        ours, theirs = StatsCollector(axis), StatsCollector(axis)
        for batch in batches:
            assert quantize.collect_statistics(ours, batch)
            theirs.update_statistics(batch)
        for name in ("hc", "weighted_hc"):
            ours_bins, ours_counts = getattr(ours, name).get_histogram()
            their_bins, their_counts = getattr(theirs, name).get_histogram()
            for a, b in ((ours_bins, their_bins), (ours_counts, their_counts)):
                np.testing.assert_array_equal(a, b)
                assert a.dtype == b.dtype
        np.testing.assert_array_equal(ours.mc.state, theirs.mc.state)
        np.testing.assert_array_equal(ours.mpcc.state, theirs.mpcc.state)
    # Left to MCT's own code, untouched: Hessian weights, values that are not finite.
    untouched = StatsCollector(-1)
    assert not quantize.collect_statistics(untouched, batches[0], np.ones(5))
    assert not quantize.collect_statistics(untouched, np.full((2, 3, 3, 5), np.nan))
    assert untouched.hc._histogram_per_iteration == [] and untouched.mpcc.state is None
