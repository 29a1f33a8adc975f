"""The feature cache: hits, partial hits, invalidation, damaged files, and unchanged predictions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_dataset, write_config, write_jpeg

from tl_helpers import cache, dataset, inference, model, train
from tl_helpers.config import load_configuration

keras = tf.keras
SIZE = 32
LABELS = {"zebra": 0, "apple": 2, "mango": 1}


@pytest.fixture
def data(tmp_path) -> Path:
    """A tiny dataset: 3 classes, 4 training and 2 validation images each."""
    return make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=2)


def _paths(root: Path) -> list[str]:
    """Training then validation image paths, as compute_features orders them."""
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    return train_set.paths + val_set.paths


def _base_with_top(input_size: int = SIZE) -> keras.Model:
    """conv_a (8 ch) -> conv_b (8 ch) -> pooling -> Dense: two cuts give same-sized features."""
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="with_top")


def _extractor(base: keras.Model, input_size: int = SIZE) -> keras.Model:
    """The feature extractor the notebook builds around a base (preprocessing, pooling)."""
    return model.feature_extractor(model.build_classifier(base, LABELS, input_size))


def _run(extractor, paths, cache_dir, input_size: int = SIZE):
    return cache.cached_features(extractor, paths, input_size, cache_dir)


def _only_file(cache_dir: Path) -> Path:
    files = list(cache_dir.glob("features-*.npz"))
    assert len(files) == 1, files
    return files[0]


# --------------------------------------------------------------------------- keys


def test_model_key_is_stable_across_builds_and_follows_the_weights():
    keras.utils.set_random_seed(1)
    first = _extractor(model.strip_classification_head(_base_with_top()))
    keras.utils.set_random_seed(1)
    base = model.strip_classification_head(_base_with_top())  # new auto names: dense_1, ...
    second = _extractor(base)
    assert cache.model_key(first, SIZE) == cache.model_key(second, SIZE)
    # The same base in a rebuilt classifier (Keras counts a second call of the base).
    assert cache.model_key(_extractor(base), SIZE) == cache.model_key(first, SIZE)
    kernel = base.get_layer("conv_b").kernel
    kernel.assign(kernel + 1e-6)
    assert cache.model_key(_extractor(base), SIZE) != cache.model_key(first, SIZE)


# --------------------------------------------------------------------------- hits


def test_second_run_takes_every_feature_from_the_cache(data, tmp_path, capsys):
    extractor = _extractor(model.strip_classification_head(_base_with_top()))
    paths = _paths(data)
    first, report = _run(extractor, paths, tmp_path / "cache")
    assert (report.images, report.from_cache, report.computed) == (18, 0, 18)
    file = _only_file(tmp_path / "cache")
    written = file.read_bytes()
    capsys.readouterr()
    second, report = _run(extractor, paths, tmp_path / "cache")
    assert (report.from_cache, report.computed) == (18, 0)
    assert "features: 18 images, 18 from cache, 0 computed" in capsys.readouterr().out
    np.testing.assert_array_equal(first, second)  # the very same float32 numbers
    assert file.read_bytes() == written  # nothing to rewrite
    assert 0 < report.file_bytes / report.images < 1024  # 8 features: tiny; 1280 -> ~5 KB


def test_partial_hit_added_modified_and_removed_images(data, tmp_path):
    extractor = _extractor(model.strip_classification_head(_base_with_top()))
    cache_dir = tmp_path / "cache"
    _run(extractor, _paths(data), cache_dir)
    zebra = data / "training" / "zebra"
    write_jpeg(zebra / "new_1.jpg", (200, 30, 30), seed=11)
    write_jpeg(zebra / "new_2.jpg", (200, 30, 30), seed=12)
    (data / "training" / "apple" / "apple_000.jpg").unlink()
    # Edited in place with its old modification time kept (as rsync -t / cp -p do).
    edited = data / "training" / "mango" / "mango_001.jpg"
    times = edited.stat()
    write_jpeg(edited, (0, 0, 0), seed=99)
    os.utime(edited, ns=(times.st_atime_ns, times.st_mtime_ns))
    paths = _paths(data)

    features, report = _run(extractor, paths, cache_dir)

    assert (report.images, report.from_cache, report.computed) == (19, 16, 3)
    np.testing.assert_allclose(
        features, inference.predict_images(extractor, paths, SIZE), rtol=1e-6, atol=1e-6
    )
    with np.load(_only_file(cache_dir)) as stored:  # exactly the current images, once each
        kept = {row.tobytes() for row in stored["digests"]}
    assert kept == set(cache.image_digests(paths))


# --------------------------------------------------------------------------- invalidation


def test_changed_top_removal_recomputes_and_the_old_entries_stay(data, tmp_path):
    paths, cache_dir = _paths(data), tmp_path / "cache"
    full = _base_with_top()
    at_b = model.strip_classification_head(full)  # ends at conv_b
    at_a = keras.Model(full.input, full.get_layer("conv_a").output)  # an edited cut, same size
    _run(_extractor(at_b), paths, cache_dir)
    features_a, report = _run(_extractor(at_a), paths, cache_dir)
    assert (report.from_cache, report.computed) == (0, 18)
    np.testing.assert_allclose(features_a, inference.predict_images(_extractor(at_a), paths, SIZE))
    _, report = _run(_extractor(at_b), paths, cache_dir)  # back to the first cut: still cached
    assert (report.from_cache, report.computed) == (18, 0)
    assert len(list(cache_dir.glob("features-*.npz"))) == 2


def test_changed_input_tensor_size_recomputes(data, tmp_path):
    paths, cache_dir = _paths(data), tmp_path / "cache"
    base = model.strip_classification_head(_base_with_top(SIZE))
    _run(_extractor(base), paths, cache_dir)
    larger = model.strip_classification_head(_base_with_top(40))
    larger.set_weights(base.get_weights())  # only the input size differs
    _, report = _run(_extractor(larger, 40), paths, cache_dir, 40)
    assert (report.from_cache, report.computed) == (0, 18)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_changed_base_model_file_recomputes(data, tmp_path):
    paths, cache_dir, file = _paths(data), tmp_path / "cache", tmp_path / "base.h5"
    model.strip_classification_head(_base_with_top()).save(file)
    _run(_extractor(model.load_base_model(file, SIZE)), paths, cache_dir)
    _, report = _run(_extractor(model.load_base_model(file, SIZE)), paths, cache_dir)
    assert report.computed == 0  # the same file, loaded again
    base = model.load_base_model(file, SIZE)
    bias = base.get_layer("conv_a").bias
    bias.assign(bias + 0.5)
    base.save(file)
    _, report = _run(_extractor(model.load_base_model(file, SIZE)), paths, cache_dir)
    assert (report.from_cache, report.computed) == (0, 18)


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty"])
def test_damaged_cache_file_is_reported_once_and_rebuilt(data, tmp_path, capsys, damage):
    extractor = _extractor(model.strip_classification_head(_base_with_top()))
    paths, cache_dir = _paths(data), tmp_path / "cache"
    expected, _ = _run(extractor, paths, cache_dir)
    file = _only_file(cache_dir)
    content = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(content[: len(content) // 2])
    elif damage == "flipped byte":
        middle = len(content) // 2  # inside the feature array
        file.write_bytes(content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1 :])
    else:
        file.write_bytes(b"")
    capsys.readouterr()

    features, report = _run(extractor, paths, cache_dir)

    warnings = [line for line in capsys.readouterr().out.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and str(file) in warnings[0] and "damaged" in warnings[0]
    assert (report.from_cache, report.computed) == (0, 18)
    np.testing.assert_array_equal(features, expected)
    _, report = _run(extractor, paths, cache_dir)
    assert report.from_cache == 18 and "Warning" not in capsys.readouterr().out


def test_interrupted_pass_or_write_leaves_the_old_file_whole(data, tmp_path, monkeypatch):
    extractor = _extractor(model.strip_classification_head(_base_with_top()))
    cache_dir = tmp_path / "cache"
    _run(extractor, _paths(data), cache_dir)
    file = _only_file(cache_dir)
    before = file.read_bytes()
    write_jpeg(data / "training" / "zebra" / "new.jpg", (10, 10, 10), seed=5)
    paths = _paths(data)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # Kernel -> Interrupt during the base's pass
        patch.setattr(inference, "predict_images", interrupt)
        with pytest.raises(KeyboardInterrupt):
            _run(extractor, paths, cache_dir)
    assert file.read_bytes() == before

    def half_written(out, **arrays):
        out.write(b"PK\x03\x04 half of a zip")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # ... or while the new file is being written
        patch.setattr(np, "savez", half_written)
        with pytest.raises(KeyboardInterrupt):
            _run(extractor, paths, cache_dir)
    assert file.read_bytes() == before
    assert sorted(p.name for p in cache_dir.iterdir()) == [file.name]  # no temporary left
    _, report = _run(extractor, paths, cache_dir)
    assert (report.from_cache, report.computed) == (18, 1)


def test_only_the_most_recent_files_are_kept(tmp_path):
    for i in range(cache.MAX_FILES + 2):
        old = tmp_path / f"{cache.FILE_PREFIX}{i:032d}{cache.FILE_SUFFIX}"
        old.write_bytes(b"x")
        os.utime(old, (1000 + i, 1000 + i))
    current = tmp_path / f"{cache.FILE_PREFIX}current{cache.FILE_SUFFIX}"
    current.write_bytes(b"x")
    os.utime(current, (1, 1))  # oldest time, yet it is the file in use
    removed = cache.prune(tmp_path, current)
    assert len(removed) == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == cache.MAX_FILES and current.name in left


# --------------------------------------------------------------------------- the pipeline


def test_identical_predictions_with_and_without_the_cache(data, tmp_path, capsys):
    train_set = dataset.scan_image_folder(data / "training", LABELS)
    val_set = dataset.scan_image_folder(data / "validation", LABELS, role="validation")

    def trained(cache_dir):
        keras.utils.set_random_seed(0)  # the same base weights and head training each time
        base = model.strip_classification_head(_base_with_top())
        classifier = model.build_classifier(base, LABELS, SIZE)
        features = train.compute_features(classifier, train_set, val_set, SIZE, cache_dir=cache_dir)
        train.train_head(classifier, features, epochs=3, batch_size=4, verbose=0)
        head = classifier.get_layer(model.PREDICTIONS_LAYER).get_weights()
        return features, head, inference.predict_images(classifier, val_set.paths, SIZE)

    without = trained(None)
    assert "(feature cache off)" in capsys.readouterr().out
    assert not any(tmp_path.glob("**/features-*"))  # the opt-out writes nothing
    cold = trained(tmp_path / "cache")
    warm = trained(tmp_path / "cache")
    assert "18 from cache, 0 computed" in capsys.readouterr().out
    # A hit returns the very numbers the first pass computed, hence the very same head.
    np.testing.assert_array_equal(warm[0].train, cold[0].train)
    np.testing.assert_array_equal(warm[0].validation, cold[0].validation)
    for warm_array, cold_array in zip(warm[1], cold[1], strict=True):
        np.testing.assert_array_equal(warm_array, cold_array)
    # The same model as without the cache, up to TensorFlow's own pass-to-pass noise (~1e-9).
    np.testing.assert_allclose(warm[0].train, without[0].train, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(warm[0].validation, without[0].validation, rtol=1e-6, atol=1e-6)
    for warm_array, array in zip(warm[1], without[1], strict=True):
        np.testing.assert_allclose(warm_array, array, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(warm[2], without[2], atol=1e-6)
    np.testing.assert_array_equal(warm[2].argmax(axis=1), without[2].argmax(axis=1))


def test_configuration_keys_default_to_output_dir_and_opt_out(tmp_path):
    make_dataset(tmp_path / "data", {"a": 0, "b": 1}, 1, 1)
    cfg = load_configuration(write_config(tmp_path))
    assert cfg.feature_cache is True
    assert cfg.feature_cache_dir == tmp_path / "out" / "model" / "feature_cache"
    cfg = load_configuration(write_config(tmp_path, feature_cache=False, feature_cache_dir="fc"))
    assert cfg.feature_cache is False and cfg.feature_cache_dir == tmp_path / "fc"


def test_features_a_notebook_kernel_cached_are_found_in_another_process(
    tiny_notebook_run, tmp_path, capsys
):
    """The key does not depend on the session: this process finds the entries a kernel wrote."""
    run = tiny_notebook_run
    text = "".join(o.get("text", "") for c in run.nb.cells for o in c.get("outputs", []))
    assert "features: 36 images, 0 from cache, 36 computed" in text  # the kernel's first run
    cfg = load_configuration(run.folder / "configuration.json")
    cache_dir = shutil.copytree(cfg.feature_cache_dir, tmp_path / "cache")  # the run's stays as is
    train_set = dataset.scan_image_folder(cfg.dataset_training_dir, run.labels)
    val_set = dataset.scan_image_folder(cfg.dataset_validation_dir, run.labels, role="validation")
    keras.layers.Dense(1)  # shift Keras' automatic layer numbering away from the kernel's
    classifier = model.build_classifier(
        model.load_base_model(None, cfg.input_tensor_size, cfg.mobilenet_alpha),
        run.labels,
        cfg.input_tensor_size,
        cfg.preprocessing,
    )
    capsys.readouterr()
    train.compute_features(
        classifier, train_set, val_set, cfg.input_tensor_size, cache_dir=cache_dir
    )
    assert "features: 36 images, 36 from cache, 0 computed" in capsys.readouterr().out
