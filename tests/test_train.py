"""One-pass training: the head trained on cached features gives the saved model's predictions."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import folder_state, make_dataset, tiny_base_model

from tl_helpers import dataset, evaluate, export, model, train
from tl_helpers.inference import predict_images
from tl_helpers.store import StoredFeatures

keras = tf.keras
SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run: labels.json ids not alphabetical and not contiguous, real MobileNetV2 base."""
    root = tmp_path_factory.mktemp("ds")
    labels = {"zebra": 0, "apple": 3, "mango": 1, "kiwi": 4}
    make_dataset(root, labels, train_per_class=8, val_per_class=4)
    train_set = dataset.scan_image_folder(root / "training", labels)
    val_set = dataset.scan_image_folder(root / "validation", labels, role="validation")
    train.setup_tensorflow(0)
    base = model.load_base_model(None, SIZE, 0.35)
    classifier = model.build_classifier(base, labels, SIZE)
    store = tmp_path_factory.mktemp("feature_store")  # the notebook's path: features in a store
    features = train.compute_features(classifier, train_set, val_set, SIZE, cache_dir=store)
    history = train.train_head(classifier, features, epochs=30, batch_size=8, learning_rate=0.01)
    weights = [w.copy() for w in classifier.get_weights()]
    yield {
        "labels": labels,
        "train_set": train_set,
        "val_set": val_set,
        "classifier": classifier,
        "features": features,
        "history": history,
        "root": root,
    }
    # Shared by the module's tests, so they must only read it: a test that trained it further
    # would make the results of the others depend on the order they run in.
    for before, after in zip(weights, classifier.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before, "a test changed the shared classifier")


@pytest.fixture(scope="module")
def model_dir(trained, tmp_path_factory):
    """The trained classifier written once as a SavedModel (tests only read it: checked)."""
    out = tmp_path_factory.mktemp("saved") / "out"
    path = export.save_model(trained["classifier"], out, trained["labels"])
    before = folder_state(out)
    yield path
    assert folder_state(out) == before, "a test changed the shared SavedModel"


def _classifier_with_features_of_size(size: int, labels: dict[str, int]) -> keras.Model:
    """A fresh classifier whose head takes `size` features, on a base far cheaper to build than
    MobileNetV2 (for tests of the head alone)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    base = keras.Model(inputs, keras.layers.Conv2D(size, 3, strides=4)(inputs), name="cheap")
    return model.build_classifier(base, labels, SIZE)


def test_features_follow_labels_json_ids(trained):
    f = trained["features"]
    assert isinstance(f.train, StoredFeatures)  # memory-mapped from the feature store
    assert f.train.shape == (32, 1280)
    assert f.validation.shape == (16, 1280)
    np.testing.assert_array_equal(f.train_ids, trained["train_set"].class_ids)
    assert set(f.train_ids) == {0, 1, 3, 4}


def test_history_has_per_epoch_metrics(trained):
    history = trained["history"].history
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(history[key]) == 30
    assert history["loss"][-1] < history["loss"][0]


def test_one_call_per_epoch_trains_the_model_step_by_step_fit_trains(trained):
    """train_head runs each epoch's steps in one call; the model must be the one a step-by-step
    fit on the same batches gives (same seed, dropout included), last partial batch included
    (30 / 8)."""
    f = trained["features"]
    features = train.Features(f.train[:30], f.train_ids[:30])
    num_classes = trained["classifier"].output_shape[-1]
    classifier = _classifier_with_features_of_size(f.train.shape[1], trained["labels"])
    weights, losses = [], []
    for steps in (None, 1):
        keras.utils.set_random_seed(7)
        if steps is None:
            history = train.train_head(classifier, features, 3, 8, verbose=0)
            layer = classifier.get_layer(model.PREDICTIONS_LAYER)
        else:
            head = model.build_head(f.train.shape[1], num_classes)
            head.compile(
                optimizer=keras.optimizers.Adam(0.001),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
                steps_per_execution=steps,
            )
            batches = train.feature_dataset(features.train, features.train_ids, 8, shuffle=True)
            history = head.fit(batches, epochs=3, verbose=0)
            layer = head.get_layer(model.PREDICTIONS_LAYER)
        weights.append(layer.get_weights())
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    for a, b in zip(weights[0], weights[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_label_smoothing_spreads_the_target_over_every_output():
    """The smoothed loss is the cross-entropy against 1 - e on the true class plus e / K on
    each of the K outputs (a gap in the class ids is an output too)."""
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]], np.float32)
    ids = np.array([[0], [2]])
    loss = train.cross_entropy(4, 0.2)(tf.constant(ids), tf.constant(probabilities)).numpy()
    targets = np.full((2, 4), 0.2 / 4) + 0.8 * np.eye(4)[[0, 2]]
    expected = -(targets * np.log(probabilities)).sum(axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert train.cross_entropy(4, 0.0) == "sparse_categorical_crossentropy"


def test_label_smoothing_keeps_the_logits_of_unlikely_classes_near_the_highest(trained):
    """Trained long on a tiny separable set, plain cross-entropy pushes the true class's
    probability to 1 and the other logits far below; with label smoothing the head learns the
    smoothed target instead (1 - e + e / K), so its logits span a few units."""
    f = trained["features"]
    labels = trained["labels"]
    outputs = trained["classifier"].output_shape[-1]  # ids 0, 1, 3, 4: five outputs
    spans, tops = {}, {}
    for smoothing in (0.0, 0.3):
        classifier = _classifier_with_features_of_size(f.train.shape[1], labels)
        keras.utils.set_random_seed(0)
        features = train.Features(np.asarray(f.train), f.train_ids)
        train.train_head(classifier, features, 300, 8, 0.05, verbose=0, label_smoothing=smoothing)
        head = classifier.get_layer(model.PREDICTIONS_LAYER)
        logits = np.asarray(f.train) @ head.kernel.numpy() + head.bias.numpy()
        probabilities = head(np.asarray(f.train)).numpy()
        true = probabilities[np.arange(len(f.train_ids)), f.train_ids]
        tops[smoothing] = float(np.median(true))
        spans[smoothing] = float(np.median(logits.max(axis=1) - logits.min(axis=1)))
    assert tops[0.0] > 0.98
    assert abs(tops[0.3] - (0.7 + 0.3 / outputs)) < 0.05
    assert spans[0.3] < spans[0.0] / 2


def test_full_model_matches_head_on_cached_features(trained):
    """The classifier (preprocessing + base + pooling + head) equals head(features)."""
    classifier, f = trained["classifier"], trained["features"]
    head = model.build_head(f.train.shape[1], classifier.output_shape[-1], dropout=0)
    head.get_layer(model.PREDICTIONS_LAYER).set_weights(
        classifier.get_layer(model.PREDICTIONS_LAYER).get_weights()
    )
    from_features = head.predict(f.validation, verbose=0)
    from_images = predict_images(classifier, trained["val_set"].paths, SIZE)
    np.testing.assert_allclose(from_images, from_features, atol=1e-5)


@pytest.mark.savedmodel
def test_saved_model_gives_the_same_predictions(trained, model_dir):
    classifier = trained["classifier"]
    reloaded = evaluate.load_saved_model(model_dir)
    paths = trained["val_set"].paths
    np.testing.assert_allclose(
        predict_images(reloaded, paths, SIZE), predict_images(classifier, paths, SIZE), atol=1e-5
    )


@pytest.mark.savedmodel
def test_non_alphabetical_ids_give_high_accuracy(trained, model_dir):
    """Training and evaluation both use labels.json ids: the reference's bug would give ~0."""
    results = evaluate.evaluate_saved_model(model_dir, trained["val_set"], SIZE)
    assert results["top_1_accuracy"] >= 0.9
    assert results["per_class"]["apple"]["id"] == 3
    assert results["per_class"]["apple"]["accuracy"] >= 0.75


@pytest.mark.savedmodel
def test_evaluation_from_features_equals_the_full_pass(trained, model_dir, monkeypatch):
    """The head of the reloaded model on the pass's features gives the full pass's report."""
    val_set = trained["val_set"]
    assert len(val_set) > 3
    monkeypatch.setattr(evaluate, "CHECK_BATCH_SIZE", 3)  # the check runs in several calls
    full = evaluate.evaluate_saved_model(model_dir, val_set, SIZE)
    fast = evaluate.evaluate_saved_model(model_dir, val_set, SIZE, features=trained["features"])
    assert full["evaluation"]["method"] == "saved model on every validation image"
    assert fast["evaluation"]["method"].startswith("saved model's head on the validation features")
    assert fast["evaluation"]["checked_images"] == len(val_set)
    assert fast["evaluation"]["max_probability_difference"] < 1e-4
    for key in ("top_1_accuracy", "per_class", "confusion_matrix"):
        assert fast[key] == full[key]
    assert [m["image"] for m in fast["misclassified"]] == [
        m["image"] for m in full["misclassified"]
    ]


@pytest.mark.savedmodel
def test_evaluation_runs_every_image_when_the_saved_base_differs(trained, tmp_path):
    """Features from another base (here: weights changed after the pass) are never used."""
    labels, val_set = trained["labels"], trained["val_set"]
    base = model.load_base_model(None, SIZE, 0.35)
    other = model.build_classifier(base, labels, SIZE)
    other.set_weights(trained["classifier"].get_weights())
    conv = next(layer for layer in base.layers if layer.get_weights())
    conv.set_weights([w * 1.5 for w in conv.get_weights()])
    model_dir = export.save_model(other, tmp_path / "out", labels)
    results = evaluate.evaluate_saved_model(model_dir, val_set, SIZE, features=trained["features"])
    assert results["evaluation"]["method"] == "saved model on every validation image"
    assert "base differs" in results["evaluation"]["why"]
    expected = predict_images(other, val_set.paths, SIZE).argmax(axis=1)  # what was saved
    assert results["num_correct"] == int((expected == val_set.class_ids).sum())


@pytest.mark.savedmodel
def test_evaluation_check_catches_features_that_do_not_match(trained, model_dir):
    """Same key but wrong numbers (e.g. a damaged feature array): the check falls back."""
    f = trained["features"]
    wrong = train.Features(
        f.train,
        f.train_ids,
        np.asarray(f.validation)[::-1].copy(),
        f.validation_ids,
        f.model_key,
        f.validation_paths,
    )
    results = evaluate.evaluate_saved_model(model_dir, trained["val_set"], SIZE, features=wrong)
    assert results["evaluation"]["method"] == "saved model on every validation image"
    assert "check failed" in results["evaluation"]["why"]
    assert results["top_1_accuracy"] >= 0.9


@pytest.mark.savedmodel
def test_evaluation_runs_every_image_when_the_validation_set_changed(trained, model_dir):
    """Features of other validation images (the folder changed after the pass) are not used."""
    f = trained["features"]
    other = train.Features(
        f.train, f.train_ids, f.validation, f.validation_ids, f.model_key, f.validation_paths[1:]
    )
    results = evaluate.evaluate_saved_model(model_dir, trained["val_set"], SIZE, features=other)
    assert results["evaluation"]["why"] == "the features are not of these validation images"
    assert results["num_images"] == len(trained["val_set"])


def test_batch_size_larger_than_training_set_is_clamped(trained, capsys):
    f = trained["features"]
    small = train.Features(f.train[:5], f.train_ids[:5])
    classifier = _classifier_with_features_of_size(f.train.shape[1], trained["labels"])
    train.train_head(classifier, small, epochs=1, batch_size=64, verbose=0)
    out = capsys.readouterr().out
    assert "batch_size 64 is larger than the training set (5 images)" in out


def test_corrupt_image_is_named_during_the_pass(tmp_path):
    labels = {"a": 0, "b": 1}
    root = make_dataset(tmp_path / "ds", labels, train_per_class=5, val_per_class=1)
    bad = root / "training" / "b" / "b_002.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    folder = dataset.scan_image_folder(root / "training", labels)
    classifier = model.build_classifier(tiny_base_model(SIZE), labels, SIZE)
    from tl_helpers.errors import TLError

    with pytest.raises(TLError, match="b_002.jpg"):
        train.compute_features(classifier, folder, None, SIZE, batch_size=4)


def test_the_pass_runs_within_pass_allocations_which_it_leaves_when_a_photo_fails(
    tmp_path, monkeypatch
):
    """The base's pass runs inside `startup.pass_allocations` (glibc's 4 MiB threshold, tested
    in test_startup.py), and leaves it when the pass stops on a bad photo."""
    from tl_helpers import cache, startup
    from tl_helpers.errors import TLError

    events = []
    real_context, real_pass = startup.pass_allocations, cache.uncached_features

    @contextlib.contextmanager
    def recorded_context():
        events.append("enter")
        try:
            with real_context():
                yield
        finally:
            events.append("leave")

    def recorded_pass(*args, **kwargs):
        events.append("pass")
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(startup, "pass_allocations", recorded_context)
    monkeypatch.setattr(cache, "uncached_features", recorded_pass)
    labels = {"a": 0, "b": 1}
    root = make_dataset(tmp_path / "ds", labels, train_per_class=3, val_per_class=1)
    folder = dataset.scan_image_folder(root / "training", labels)
    classifier = model.build_classifier(tiny_base_model(SIZE), labels, SIZE)
    features = train.compute_features(classifier, folder, None, SIZE, batch_size=4)
    assert features.train.shape[0] == 6
    assert events == ["enter", "pass", "leave"]
    bad = root / "training" / "b" / "b_002.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    folder = dataset.scan_image_folder(root / "training", labels)
    with pytest.raises(TLError, match="b_002.jpg"):
        train.compute_features(classifier, folder, None, SIZE, batch_size=4)
    assert events == ["enter", "pass", "leave"] * 2
