"""Augmented views in the feature cache, validation never augmented, training that does not
look at the validation images."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import COLOURS, make_dataset, quadrant_pixels, write_jpeg, write_oriented_jpeg

from tl_helpers import augment, cache, dataset, inference, model, store, train

keras = tf.keras
SIZE = 32
LABELS = {"zebra": 0, "apple": 2, "mango": 1}
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2
TRAIN_IMAGES, VAL_IMAGES = 3 * TRAIN_PER_CLASS, 3 * VAL_PER_CLASS


@pytest.fixture(autouse=True)
def settled_files(monkeypatch):
    """Record files in the stat index however recently they were written."""
    monkeypatch.setattr(store, "RACY_SECONDS", -1.0)


@pytest.fixture
def data(tmp_path) -> Path:
    """3 classes, 4 training and 2 validation images each, all different, not symmetric."""
    root = make_dataset(
        tmp_path / "data", LABELS, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS
    )
    for k, path in enumerate(sorted((root / "validation").glob("*/*.jpg"))):
        write_jpeg(path, COLOURS[LABELS[path.parent.name]], size=(40, 36), seed=100 + k)
    return root


@pytest.fixture
def passes(monkeypatch) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every backbone pass, as (views, paths), in order: each path gives one row per view."""
    calls = []
    real = inference.predict_chunks

    def counting(run, paths, *args, view="", **kwargs):
        calls.append(((view,) if isinstance(view, str) else tuple(view), tuple(paths)))
        return real(run, paths, *args, view=view, **kwargs)

    monkeypatch.setattr(inference, "predict_chunks", counting)
    return calls


def _sets(root: Path) -> tuple[dataset.ImageFolder, dataset.ImageFolder]:
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    return train_set, val_set


def _classifier() -> keras.Model:
    """A tiny random base (two convolutions) in the notebook's classifier."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    return model.build_classifier(keras.Model(inputs, x), LABELS, SIZE)


def _features(root: Path, cache_dir: Path | None, views=()) -> train.Features:
    train_set, val_set = _sets(root)
    return train.compute_features(
        _classifier(), train_set, val_set, SIZE, cache_dir=cache_dir, views=views
    )


def _view_counts(calls) -> dict[str, int]:
    """Rows computed per view."""
    counts: dict[str, int] = {}
    for views, paths in calls:
        for view in views:
            counts[view] = counts.get(view, 0) + len(paths)
    return counts


def _reads(calls) -> collections.Counter:
    """How often each file was read (decoded) by the passes."""
    return collections.Counter(path for _, paths in calls for path in paths)


def test_views_are_computed_once_and_a_rerun_computes_none(data, tmp_path, passes):
    first = _features(data, tmp_path / "cache", views=("mirror", "crop"))
    assert _view_counts(passes) == {"": TRAIN_IMAGES + VAL_IMAGES, "mirror": 12, "crop": 12}
    assert set(_reads(passes).values()) == {1}  # each photo decoded once for all its views
    assert len(first.train) == 3 * TRAIN_IMAGES
    np.testing.assert_array_equal(first.train_ids[:12], first.train_ids[12:24])
    rows = np.asarray(first.train)
    as_is, mirrored, cropped = rows[:12], rows[12:24], rows[24:]
    assert not np.allclose(as_is, mirrored) and not np.allclose(as_is, cropped)
    passes.clear()
    second = _features(data, tmp_path / "cache", views=("mirror", "crop"))
    assert passes == []  # nothing through the base again
    np.testing.assert_array_equal(np.asarray(second.train), rows)
    np.testing.assert_array_equal(np.asarray(second.validation), np.asarray(first.validation))
    uncached = _features(data, None, views=("mirror", "crop"))  # the same rows without a cache
    np.testing.assert_allclose(np.asarray(uncached.train), rows, atol=1e-5)


def test_a_view_has_the_features_of_its_transformed_image(data, tmp_path):
    features = _features(data, tmp_path / "cache", views=("mirror",))
    train_set, _ = _sets(data)
    extractor = model.feature_extractor(_classifier())
    batch = next(iter(dataset.load_images(train_set.paths, SIZE, 64)))
    expected = extractor(tf.image.flip_left_right(batch), training=False).numpy()
    # Training rows are float16 in the store: within a float16 step of the base's output.
    np.testing.assert_allclose(np.asarray(features.train)[12:], expected, rtol=2e-3, atol=1e-4)


def test_one_decode_gives_each_view_exactly_as_its_own_pipeline(data):
    paths = _sets(data)[0].paths[:5]
    views = ("", "mirror", "crop", "noise")
    together = np.concatenate(list(dataset.load_images(paths, SIZE, 3, views)))  # batches cut files
    apart = [np.concatenate(list(dataset.load_images(paths, SIZE, 3, view))) for view in views]
    np.testing.assert_array_equal(together, np.stack(apart, axis=1).reshape(together.shape))
    assert together.shape == (5 * len(views), SIZE, SIZE, 3)


def test_changed_view_recomputes_only_the_views_it_affects(data, tmp_path, passes, monkeypatch):
    first = np.asarray(_features(data, tmp_path / "cache", views=("mirror", "crop")).train)
    passes.clear()
    monkeypatch.setattr(augment, "CROP_FRACTION", 0.6)
    second = np.asarray(_features(data, tmp_path / "cache", views=("mirror", "crop")).train)
    assert _view_counts(passes) == {"crop": TRAIN_IMAGES}
    np.testing.assert_array_equal(second[:24], first[:24])  # as is and mirrored: from cache
    assert not np.allclose(second[24:], first[24:])
    passes.clear()
    _features(data, tmp_path / "cache", views=("mirror", "crop", "mirror_crop"))
    assert _view_counts(passes) == {"mirror_crop": TRAIN_IMAGES}  # a view added: only it
    passes.clear()
    _features(data, tmp_path / "cache", views=())
    assert passes == []  # views dropped: the images as they are were cached all along


def test_validation_images_are_never_augmented(data, tmp_path, passes):
    _, val_set = _sets(data)
    with_views = _features(data, tmp_path / "cache", views=("mirror", "crop", "mirror_crop"))
    for views, paths in passes:
        if views != ("",):
            assert not set(paths) & set(val_set.paths), views
    assert len(with_views.validation) == VAL_IMAGES
    without = _features(data, tmp_path / "other", views=())
    np.testing.assert_array_equal(np.asarray(with_views.validation), np.asarray(without.validation))


def test_unknown_view_and_view_set_are_refused():
    with pytest.raises(ValueError, match="unknown view"):
        augment.view_digest(b"\0" * 32, "sideways")
    with pytest.raises(ValueError, match="augmentation must be one of"):
        augment.views_of("sideways")


def test_a_changed_exif_orientation_is_computed_again(tmp_path, passes):
    extractor = model.feature_extractor(_classifier())
    path = write_oriented_jpeg(tmp_path / "photo.jpg", quadrant_pixels(32, 32), 1)
    first, report = cache.cached_features(extractor, [str(path)], SIZE, tmp_path / "cache")
    first = np.asarray(first)
    write_oriented_jpeg(path, quadrant_pixels(32, 32), 6)  # the same pixels, turned
    second, report = cache.cached_features(extractor, [str(path)], SIZE, tmp_path / "cache")
    assert (report.from_cache, report.computed) == (0, 1)
    assert not np.allclose(np.asarray(second), first)


def test_pipeline_code_of_the_upright_step_is_in_the_key(monkeypatch):
    sources = []
    real = cache.inspect.getsource
    monkeypatch.setattr(cache.inspect, "getsource", lambda f: sources.append(f) or real(f))
    cache._code_digest()
    assert dataset.upright in sources and dataset.exif_orientation in sources


def test_the_validation_images_choose_nothing_in_training(data, tmp_path):
    """Top-1 is measured on validation images that decided nothing: training with or without
    them gives the very same head."""
    features = _features(data, tmp_path / "cache", views=("mirror",))
    heads = []
    for validation in (features.validation, None):
        run = train.Features(
            features.train, features.train_ids, validation, features.validation_ids
        )
        classifier = _classifier()
        keras.utils.set_random_seed(7)
        train.train_head(classifier, run, epochs=3, batch_size=8, verbose=0)
        heads.append(classifier.layers[-1].get_weights())
    for with_validation, without in zip(*heads, strict=True):
        np.testing.assert_array_equal(with_validation, without)


def test_augmentation_key_is_checked_and_names_the_view_sets(tmp_path):
    from conftest import write_config

    from tl_helpers.config import load_configuration
    from tl_helpers.errors import TLError

    make_dataset(tmp_path / "data", LABELS, train_per_class=2, val_per_class=1)
    cfg = load_configuration(write_config(tmp_path))
    assert augment.views_of(cfg.augmentation) == ()  # the default: "none"
    cfg = load_configuration(write_config(tmp_path, augmentation="mirror_crop"))
    assert augment.views_of(cfg.augmentation) == ("mirror", "crop")
    with pytest.raises(TLError, match="augmentation") as error:
        load_configuration(write_config(tmp_path, augmentation="Mirror"))
    assert '"mirror"' in str(error.value)
    schema = json.loads((Path(augment.__file__).parent / "configuration_schema.json").read_text())
    assert schema["properties"]["augmentation"]["enum"] == list(augment.VIEW_SETS)
    for name in augment.VIEW_SETS:
        assert set(augment.views_of(name)) <= set(augment.VIEWS)


def test_the_noise_view_is_faint_fixed_and_follows_the_file(tmp_path, monkeypatch):
    """The fine-tuning-only "noise" view: the resized image plus Gaussian noise of
    NOISE_STDDEV (0..255 scale), the same for the same bytes wherever they lie, different for
    another photo, and keyed by its constant."""
    first = write_jpeg(tmp_path / "a.jpg", (128, 128, 128), size=(40, 36), seed=1)
    copy = tmp_path / "elsewhere" / "a.jpg"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    other = write_jpeg(tmp_path / "b.jpg", (128, 128, 128), size=(40, 36), seed=2)
    paths = [str(first), str(copy), str(other)]
    noisy = next(iter(dataset.load_images(paths, SIZE, 3, "noise"))).numpy()
    plain = next(iter(dataset.load_images(paths, SIZE, 3))).numpy()
    noise = noisy - plain
    np.testing.assert_array_equal(noisy[0], noisy[1])  # same bytes, same noise
    assert 0.8 * augment.NOISE_STDDEV < noise[0].std() < 1.2 * augment.NOISE_STDDEV
    assert abs(np.corrcoef(noise[0].ravel(), noise[2].ravel())[0, 1]) < 0.2  # another draw
    assert noisy.min() >= 0 and noisy.max() <= 255
    digest = augment.view_digest(b"\0" * 32, "noise")
    monkeypatch.setattr(augment, "NOISE_STDDEV", 3.0)
    assert augment.view_digest(b"\0" * 32, "noise") != digest
    assert augment.view_digest(b"\0" * 32, "mirror") == augment.view_digest(b"\0" * 32, "mirror")
