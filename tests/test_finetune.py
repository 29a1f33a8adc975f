"""Fine-tuning from cached activations: the cut, what trains, what is cached, the saved model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_dataset, tiny_base_model, write_config
from mct_quantizers import KerasActivationQuantizationHolder

from tl_helpers import (
    calibration,
    dataset,
    evaluate,
    export,
    finetune,
    model,
    quantize,
    store,
    train,
)
from tl_helpers.config import load_configuration
from tl_helpers.errors import TLError
from tl_helpers.inference import predict_images

keras = tf.keras
SIZE = 32
LABELS = {"zebra": 0, "apple": 3, "mango": 1}


def residual_base(size: int = SIZE) -> keras.Model:
    """conv_in -> [conv_a -> conv_b] + conv_in (a skip connection) -> conv_out."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv_in")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv_out")(x)
    return keras.Model(inputs, x, name="residual")


@pytest.mark.parametrize(
    ("cut", "says"),
    [
        ("conv_a", '"add" above the cut also reads the output of "conv_in" below it'),
        ("conv_b", '"add" above the cut also reads the output of "conv_in" below it'),
        ("conv_out", "is the last layer of residual, so nothing above it"),
        ("input_layer", "is the input of residual"),
        ("add_", 'is not a layer of the base model residual. Did you mean "add"?'),
    ],
)
def test_a_cut_that_does_not_split_the_base_is_refused_with_why(cut, says):
    base = residual_base()
    if cut == "input_layer":
        cut = base.layers[0].name
    with pytest.raises(TLError) as error:
        finetune.check_cut(base, cut)
    message = str(error.value)
    assert message.startswith("fine_tune_cut: ")
    assert says in message
    assert "\n" not in message
    if cut in ("conv_a", "conv_b", "conv_out"):  # the valid cuts nearest it are named
        assert '"conv_in"' in message or '"add"' in message


def test_the_valid_cuts_are_where_one_tensor_joins_the_parts():
    assert finetune.valid_cuts(residual_base()) == ["conv_in", "add"]
    base = model.load_base_model(None, SIZE, 0.35)
    valid = finetune.valid_cuts(base)
    assert "block_12_add" in valid and "block_12_project_BN" not in valid
    assert finetune.choose_cut(base, "") == "block_12_add"
    assert finetune.choose_cut(base, "block_15_add") == "block_15_add"
    assert finetune.choose_cut(residual_base(), "") is None


def test_a_base_without_a_default_cut_trains_the_head_only(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", LABELS, train_per_class=3, val_per_class=2)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    classifier = model.build_classifier(tiny_base_model(SIZE), LABELS, SIZE)
    features = train.compute_features(classifier, train_set, None, SIZE, fine_tune_cut="")
    assert features.split is None
    assert 'name the layer to cut at in "fine_tune_cut"' in capsys.readouterr().out
    assert train.fine_tune(classifier, features, 2, 4) is None


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny run on the real MobileNetV2 (alpha 0.35) cut at its default layer: head, then
    fine-tuning from the activations in a feature store."""
    root = make_dataset(tmp_path_factory.mktemp("ds"), LABELS, train_per_class=8, val_per_class=4)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    train.setup_tensorflow(0)
    base = model.load_base_model(None, SIZE, 0.35)
    classifier = model.build_classifier(base, LABELS, SIZE)
    loaded = {w.name: w.numpy().copy() for w in classifier.weights}
    store = tmp_path_factory.mktemp("store")
    features = train.compute_features(
        classifier, train_set, val_set, SIZE, cache_dir=store, views=("mirror",), fine_tune_cut=""
    )
    pooled_before = np.asarray(features.validation).copy()
    train.train_head(classifier, features, epochs=5, batch_size=8, learning_rate=0.01, verbose=0)
    head = {w.name: w.numpy().copy() for w in classifier.weights}
    history = train.fine_tune(classifier, features, 4, 8, learning_rate=1e-3, verbose=0)
    return {
        "classifier": classifier,
        "base": base,
        "features": features,
        "train_set": train_set,
        "val_set": val_set,
        "store": store,
        "loaded": loaded,
        "head": head,
        "history": history,
        "pooled_before": pooled_before,
        "out": tmp_path_factory.mktemp("out"),
    }


def test_pooled_features_from_activations_are_the_base_features(tuned):
    """Before fine-tuning, activations -> upper part == the whole base's pooled features."""
    extractor = model.feature_extractor(
        model.build_classifier(model.load_base_model(None, SIZE, 0.35), LABELS, SIZE)
    )
    direct = predict_images(extractor, tuned["val_set"].paths, SIZE)
    # The activations come from TFLite's CPU path, `direct` from TensorFlow: rounding differs.
    np.testing.assert_allclose(tuned["pooled_before"], direct, atol=1e-4)


def test_fine_tuning_changes_only_the_layers_above_the_cut(tuned):
    classifier, base, loaded = tuned["classifier"], tuned["base"], tuned["loaded"]
    names = [layer.name for layer in base.layers]
    cut = names.index("block_12_add")
    changed_above = 0
    for number, layer in enumerate(base.layers):
        for weight in layer.weights:
            same = np.array_equal(weight.numpy(), loaded[weight.name])
            if number <= cut or isinstance(layer, keras.layers.BatchNormalization):
                assert same, f"{weight.name} changed (below the cut or a BatchNorm)"
            elif not same:
                changed_above += 1
    # Every convolution above the cut moved (4 blocks x 3 + Conv_1), and the head did.
    assert changed_above == 13
    for weight in classifier.get_layer(model.PREDICTIONS_LAYER).weights:
        assert not np.array_equal(weight.numpy(), tuned["head"][weight.name])
    assert not any(layer.trainable for layer in base.layers)  # the classifier stays frozen


def normalized_base() -> keras.Model:
    """Convolutions with BatchNormalization after them, as in MobileNetV2, and two that cannot
    be folded: a normalization after an Add, and a convolution that a second layer reads."""
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
    x = keras.layers.BatchNormalization(name="expand_BN")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(8, 1, name="biased")(x)  # a convolution with a bias of its own
    x = keras.layers.BatchNormalization(name="biased_BN")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_BN")(x)
    y = keras.layers.Conv2D(16, 1, name="shared")(x)
    z = keras.layers.BatchNormalization(name="shared_BN")(y)
    x = keras.layers.Add(name="add")([y, z])
    x = keras.layers.BatchNormalization(name="add_BN")(x)
    base = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    for layer in base.layers:  # statistics and weights far from a normalization's identity
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, gamma.shape),
                    rng.normal(0, 1, beta.shape),
                    rng.normal(0, 1, mean.shape),
                    rng.uniform(0.1, 3, variance.shape),
                ]
            )
    base.trainable = False  # as the classifier's base is
    return base


def test_frozen_normalizations_are_folded_with_the_same_function_and_gradients():
    """The training copy folds each normalization into the convolution before it, and computes
    what the frozen original computes, with the same gradients for every trained weight."""
    base = normalized_base()
    copy = finetune.folded_copy(base)
    assert [layer.name for layer in copy.layers] == [layer.name for layer in base.layers]
    kinds = {layer.name: type(layer).__name__ for layer in copy.layers}
    assert kinds["expand"] == kinds["biased"] == "FoldedConv2D"
    assert kinds["dw"] == "FoldedDepthwiseConv2D"
    assert kinds["expand_BN"] == kinds["biased_BN"] == kinds["dw_BN"] == "Activation"
    # "shared" is read by the Add too; "add_BN" follows no convolution: both stay as they are.
    assert kinds["shared"] == "Conv2D" and kinds["shared_BN"] == "BatchNormalization"
    assert kinds["add_BN"] == "BatchNormalization"
    assert not copy.get_layer("shared_BN").trainable and copy.get_layer("dw").trainable
    frozen = keras.models.clone_model(base)  # the copy before folding existed
    frozen.set_weights(base.get_weights())
    for layer in frozen.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    assert len(copy.trainable_weights) == len(frozen.trainable_weights) == 7
    x = tf.constant(np.random.default_rng(1).normal(0, 1, (4, 6, 6, 4)), tf.float32)
    target = tf.constant(np.random.default_rng(2).normal(0, 1, (4, 6, 6, 16)), tf.float32)
    results = []
    for network in (frozen, copy):
        with tf.GradientTape() as tape:
            out = network(x, training=True)
            loss = tf.reduce_mean((out - target) ** 2)
        results.append(
            (out.numpy(), [g.numpy() for g in tape.gradient(loss, network.trainable_weights)])
        )
    (out_frozen, grads_frozen), (out_copy, grads_copy) = results
    np.testing.assert_allclose(out_copy, out_frozen, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_copy, grads_frozen, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
        assert np.abs(b).max() > 0


def test_activations_are_cached_and_a_rerun_computes_none(tuned, capsys):
    capsys.readouterr()
    fresh = model.build_classifier(model.load_base_model(None, SIZE, 0.35), LABELS, SIZE)
    again = train.compute_features(
        fresh,
        tuned["train_set"],
        tuned["val_set"],
        SIZE,
        cache_dir=tuned["store"],
        views=("mirror",),
        fine_tune_cut="",
    )
    out = capsys.readouterr().out
    assert "features: 60 images, 60 from cache, 0 computed" in out
    # 24 training images and their mirrors (the 12 validation images are apart)
    assert again.train_activations.shape == (48, 2 * 2 * 32)


def test_the_saved_fine_tuned_model_is_one_model_on_raw_pixels(tuned):
    classifier = tuned["classifier"]
    path = export.save_model(classifier, tuned["out"], LABELS)
    reloaded = evaluate.load_saved_model(path)
    assert reloaded.input_shape == (None, SIZE, SIZE, 3)
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in classifier.layers]
    paths = tuned["val_set"].paths
    np.testing.assert_allclose(
        predict_images(reloaded, paths, SIZE), predict_images(classifier, paths, SIZE), atol=1e-5
    )
    # Evaluation from the fine-tuned features is the full pass's, and is accepted as such.
    full = evaluate.evaluate_saved_model(path, tuned["val_set"], SIZE)
    fast = evaluate.evaluate_saved_model(path, tuned["val_set"], SIZE, features=tuned["features"])
    assert fast["evaluation"]["method"].startswith("saved model's head on the validation features")
    assert fast["top_1_accuracy"] == full["top_1_accuracy"] >= 0.9


def test_fine_tuning_history_has_its_epochs(tuned):
    history = tuned["history"].history
    assert len(history["loss"]) == len(history["val_accuracy"]) == 4


def test_a_named_cut_fine_tunes_a_users_base_and_the_head_can_train_again(tmp_path):
    """A base of the user's own, cut where they name it; the head cell run again after
    fine-tuning trains on the pooled features of the fine-tuned base, not the stale ones."""
    root = make_dataset(tmp_path / "ds", LABELS, train_per_class=3, val_per_class=1)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    classifier = model.build_classifier(residual_base(), LABELS, SIZE, "zero_to_one")
    features = train.compute_features(classifier, train_set, None, SIZE, fine_tune_cut="add")
    assert features.split.cut == "add" and features.split.shape == (16, 16, 8)
    before = classifier.get_layer("residual").get_layer("conv_out").get_weights()[0].copy()
    train.train_head(classifier, features, 2, 4, verbose=0)
    assert train.fine_tune(classifier, features, 2, 4, learning_rate=0.01, verbose=0)
    after = classifier.get_layer("residual").get_layer("conv_out").get_weights()[0]
    assert not np.array_equal(before, after)
    train.train_head(classifier, features, 1, 4, verbose=0)
    direct = predict_images(model.feature_extractor(classifier), train_set.paths, SIZE)
    # (From float16 activations: within float16 rounding of the direct pass, far from stale.)
    np.testing.assert_allclose(np.asarray(features.train), direct, rtol=2e-3, atol=1e-4)


def residual_features(
    train_set, val_set, store, noise: bool, quantization=None
) -> tuple[keras.Model, train.Features]:
    """A classifier on `residual_base` (the same weights each call, so the same store entries)
    and its features with the mirror view, cut at "add"."""
    keras.utils.set_random_seed(5)
    classifier = model.build_classifier(residual_base(), LABELS, SIZE, "zero_to_one")
    found = train.compute_features(
        classifier,
        train_set,
        val_set,
        SIZE,
        cache_dir=store,
        views=("mirror",),
        fine_tune_cut="add",
        fine_tune_noise=noise,
        quantization=quantization,
    )
    return classifier, found


def test_noise_rows_fine_tune_but_never_train_the_head(tmp_path, capsys):
    """With `fine_tune_noise`, each training image's "noise" view is cached after the head's
    rows and fine-tuning trains on both; the head trains on its own rows only, a re-run
    computes nothing, and turning the option on later computes the noise views alone."""
    root = make_dataset(tmp_path / "ds", LABELS, train_per_class=3, val_per_class=1)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    store = tmp_path / "store"

    def features_of(noise: bool) -> tuple[keras.Model, train.Features]:
        return residual_features(train_set, val_set, store, noise)

    _, plain = features_of(False)
    capsys.readouterr()
    classifier, features = features_of(True)
    out = capsys.readouterr().out
    assert "features: 30 images, 21 from cache, 9 computed" in out  # only the 9 noise views
    head_rows = 2 * len(train_set)
    assert len(features.train) == len(features.train_ids) == head_rows
    assert len(features.train_activations) == len(features.fine_tune_ids) == 3 * len(train_set)
    np.testing.assert_array_equal(features.fine_tune_ids[-9:], features.train_ids[:9])
    activations = np.asarray(features.train_activations, dtype=np.float32)
    np.testing.assert_array_equal(activations[:head_rows], np.asarray(plain.train_activations))
    noisy, as_is = activations[head_rows:], activations[: len(train_set)]
    assert not np.array_equal(noisy, as_is)
    assert np.linalg.norm(noisy - as_is) < 0.1 * np.linalg.norm(as_is)  # faint noise
    np.testing.assert_array_equal(np.asarray(features.train), np.asarray(plain.train))

    train.train_head(classifier, features, 1, 4, verbose=0)
    history = train.fine_tune(classifier, features, 1, 4, learning_rate=0.01, verbose=0)
    assert history.params["steps"] == math.ceil(3 * len(train_set) / 4)  # noise rows in
    head = train.train_head(classifier, features, 1, 4, verbose=0)
    assert head.params["steps"] == math.ceil(head_rows / 4)  # and not in the head's
    assert len(features.train) == head_rows
    capsys.readouterr()
    features_of(True)
    assert "features: 30 images, 30 from cache, 0 computed" in capsys.readouterr().out


def _output_at(quantized: keras.Model, layer_name: str) -> keras.Model:
    """MCT's quantized model up to the quantizer of `layer_name`'s output."""
    holder = next(
        layer
        for layer in quantized.layers
        if isinstance(layer, KerasActivationQuantizationHolder)
        and layer._inbound_nodes[0].inbound_layers.name == layer_name
    )
    return keras.Model(quantized.inputs, holder.output)


@pytest.mark.mct
def test_quantized_rows_are_what_the_quantized_model_computes_at_the_cut(tmp_path, capsys):
    """With a LowerQuantization, fine-tuning's extra rows are the activations at the cut of the
    lower part quantized by MCT, of the noise view (or, without `fine_tune_noise`, of the images
    as they are): exactly what the classifier quantized after fine-tuning (with the same
    calibration images) computes there. They replace the float noise rows, are stored, and a
    re-run takes them from the store without running MCT; other calibration images are
    another key."""
    root = make_dataset(tmp_path / "ds", LABELS, train_per_class=4, val_per_class=1)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    store = tmp_path / "store"
    n = len(train_set)

    def lower_quantization(seed: int) -> quantize.LowerQuantization:
        paths = calibration.calibration_paths(train_set, 4, 2, seed)
        return quantize.LowerQuantization(tuple(paths), SIZE, 4, "1.0")

    def features_of(quantization, noise=True) -> tuple[keras.Model, train.Features, str]:
        classifier, found = residual_features(train_set, val_set, store, noise, quantization)
        return classifier, found, capsys.readouterr().out

    quantization = lower_quantization(0)
    classifier, features, out = features_of(quantization)
    assert "Quantizing the base below the cut with MCT" in out
    # The float pass: the images and their mirror views only; then the quantized noise views.
    assert f"features: {2 * n + 3} images, 0 from cache, {2 * n + 3} computed" in out
    assert f"features: {n} images, 0 from cache, {n} computed" in out
    assert len(features.train_activations) == len(features.fine_tune_ids) == 3 * n
    np.testing.assert_array_equal(features.fine_tune_ids[-n:], features.train_ids[:n])
    activations = np.asarray(features.train_activations, dtype=np.float32)
    quantized_rows = activations[2 * n :]

    train.train_head(classifier, features, 1, 4, verbose=0)
    history = train.fine_tune(classifier, features, 1, 4, learning_rate=0.01, verbose=0)
    assert history.params["steps"] == math.ceil(3 * n / 4)  # the quantized rows train too
    final = quantize.quantize_model(
        classifier, calibration.CalibrationData(quantization.paths, SIZE, 4)
    )
    at_cut = _output_at(final, "add")
    noisy = predict_images(at_cut, train_set.paths, SIZE, view="noise").reshape(n, -1)
    np.testing.assert_array_equal(quantized_rows, noisy.astype(np.float16))
    as_is = predict_images(at_cut, train_set.paths, SIZE).reshape(n, -1)
    assert not np.array_equal(quantized_rows, as_is.astype(np.float16))

    _, again, out = features_of(quantization)
    assert "Quantizing the base below the cut" not in out  # nothing missing: MCT never ran
    assert f"features: {n} images, {n} from cache, 0 computed" in out
    np.testing.assert_array_equal(np.asarray(again.train_activations), activations)

    # Without noise: the images as they are, through the same quantized lower part.
    _, plain, out = features_of(quantization, noise=False)
    assert f"features: {n} images, 0 from cache, {n} computed" in out
    plain_rows = np.asarray(plain.train_activations, dtype=np.float32)[2 * n :]
    np.testing.assert_array_equal(plain_rows, as_is.astype(np.float16))

    _, _, out = features_of(lower_quantization(1))
    assert "Quantizing the base below the cut with MCT" in out
    assert f"features: {n} images, 0 from cache, {n} computed" in out


def test_lower_quantization_follows_the_quantization_steps_settings(tmp_path):
    root = make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=1)
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    settings = dict(quantize=True, calibration_batch_size=2, calibration_batches=3, seed=4)
    write_config(tmp_path, **settings)
    config = load_configuration(tmp_path / "configuration.json")
    assert config.fine_tune and config.fine_tune_quantized  # both on by default
    lower = quantize.lower_quantization(train_set, config)
    step = quantize.calibration_for(train_set, config)
    assert lower.paths == tuple(step.paths) and len(lower.paths) == 6
    assert (lower.batch_size, lower.image_size) == (2, config.input_tensor_size)
    assert lower.tpc_version == config.imx500_tpc_version
    for off in ({"quantize": False}, {"fine_tune": False}, {"fine_tune_quantized": False}):
        write_config(tmp_path, **{**settings, **off})
        assert (
            quantize.lower_quantization(
                train_set, load_configuration(tmp_path / "configuration.json")
            )
            is None
        )


def test_concatenated_rows_read_like_one_array():
    first = np.arange(12, dtype=np.float32).reshape(4, 3)
    second = -np.arange(6, dtype=np.float32).reshape(2, 3)
    rows = store.ConcatenatedRows(first, second)
    whole = np.concatenate([first, second])
    assert len(rows) == 6 and rows.shape == (6, 3)
    np.testing.assert_array_equal(np.asarray(rows), whole)
    np.testing.assert_array_equal(rows[np.array([5, 0, 4, 3])], whole[[5, 0, 4, 3]])
    np.testing.assert_array_equal(rows[2:5], whole[2:5])
    assert rows[:4] is not None and np.shares_memory(rows[:4], first)  # a view of one part
    np.testing.assert_array_equal(rows[3], whole[3])
    with pytest.raises(ValueError, match="different widths"):
        store.ConcatenatedRows(first, np.zeros((2, 4), np.float32))
