"""The feature cache and its store: hits, invalidation, damage, change detection, concurrency."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import COLOURS, ROOT, make_dataset, write_config, write_jpeg

from tl_helpers import augment, cache, dataset, inference, model, store, train
from tl_helpers.config import load_configuration
from tl_helpers.errors import TLError
from tl_helpers.store import FeatureStore, StoredFeatures

keras = tf.keras
SIZE = 32
LABELS = {"zebra": 0, "apple": 2, "mango": 1}


@pytest.fixture(autouse=True)
def settled_files(monkeypatch):
    """Record files in the stat index however recently they were written (tests write them
    milliseconds before use; the racy-file rule has its own test)."""
    monkeypatch.setattr(store, "RACY_SECONDS", -1.0)


@pytest.fixture
def data(tmp_path) -> Path:
    """A tiny dataset: 3 classes, 4 training and 2 validation images each, all different."""
    root = make_dataset(tmp_path / "data", LABELS, train_per_class=4, val_per_class=2)
    for k, path in enumerate(sorted((root / "validation").glob("*/*.jpg"))):  # no duplicates
        write_jpeg(path, COLOURS[LABELS[path.parent.name]], seed=100 + k)
    return root


def _paths(root: Path) -> list[str]:
    """Training then validation image paths, as compute_features orders them."""
    train_set = dataset.scan_image_folder(root / "training", LABELS)
    val_set = dataset.scan_image_folder(root / "validation", LABELS, role="validation")
    return train_set.paths + val_set.paths


def _computed(extractor: keras.Model, paths: list[str]) -> np.ndarray:
    """The features of `paths` as the feature pass computes them (`inference.backbone_runner`:
    TFLite's CPU path for these models), without the cache."""
    run = inference.backbone_runner(extractor, SIZE)
    return inference.predict_batches(run, paths, SIZE)


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


def _tiny_extractor() -> keras.Model:
    return _extractor(model.strip_classification_head(_base_with_top()))


def _run(extractor, paths, cache_dir, input_size: int = SIZE):
    features, report = cache.cached_features(extractor, paths, input_size, cache_dir)
    return np.asarray(features), report


def _model_folder(cache_dir: Path) -> Path:
    folders = list(cache_dir.glob(f"{store.MODEL_PREFIX}*"))
    assert len(folders) == 1, folders
    return folders[0]


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{store.SHARD_PREFIX}*{store.SHARD_SUFFIX}"))


def _features_of(digest: bytes, dim: int = 6) -> np.ndarray:
    """Made-up features that follow from the digest, to check a lookup returns the right row."""
    return np.random.default_rng(list(digest[:8])).normal(size=dim).astype(np.float32)


def _digest(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


class _CountingDigest:
    """Stands in for store._file_digest and counts the image files it reads (not shards)."""

    def __init__(self, real, images: Path):
        self.real, self.images, self.read = real, str(images), []

    def __call__(self, path: str) -> bytes:
        if path.startswith(self.images):
            self.read.append(path)
        return self.real(path)


@pytest.fixture
def reads(monkeypatch, data) -> _CountingDigest:
    counter = _CountingDigest(store._file_digest, data)
    monkeypatch.setattr(store, "_file_digest", counter)
    return counter


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
    extractor = _tiny_extractor()
    paths = _paths(data)
    first, report = _run(extractor, paths, tmp_path / "cache")
    assert (report.images, report.from_cache, report.computed) == (18, 0, 18)
    folder = _model_folder(tmp_path / "cache")
    written = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    second, report = _run(extractor, paths, tmp_path / "cache")
    assert (report.from_cache, report.computed) == (18, 0)
    out = capsys.readouterr().out
    assert "features: 18 images, 18 from cache, 0 computed" in out
    assert f"feature cache: {folder} (18 images," in out
    np.testing.assert_array_equal(first, second)  # the very same float32 numbers
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == written  # nothing rewritten
    assert 0 < report.file_bytes / report.images < 1024  # 8 features: tiny; 1280 -> ~5 KB


def test_partial_hit_added_modified_and_removed_images(data, tmp_path):
    extractor = _tiny_extractor()
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
    # Append only: the removed image and the edit's old version are still there.
    assert report.stored_images == 18 + 3


def test_duplicate_images_get_one_entry_and_every_row(data, tmp_path):
    extractor = _tiny_extractor()
    paths = _paths(data)
    copy = data / "training" / "zebra" / "zebra_copy.jpg"
    original = data / "training" / "zebra" / "zebra_000.jpg"
    shutil.copyfile(original, copy)
    paths = _paths(data)
    features, report = _run(extractor, paths, tmp_path / "cache")
    assert (report.images, report.computed, report.stored_images) == (19, 19, 18)
    row = paths.index(str(copy))
    np.testing.assert_array_equal(features[row], features[paths.index(str(original))])


# --------------------------------------------------------------------------- invalidation


def test_changed_top_removal_recomputes_and_the_old_entries_stay(data, tmp_path):
    paths, cache_dir = _paths(data), tmp_path / "cache"
    full = _base_with_top()
    at_b = model.strip_classification_head(full)  # ends at conv_b
    at_a = keras.Model(full.input, full.get_layer("conv_a").output)  # an edited cut, same size
    _run(_extractor(at_b), paths, cache_dir)
    features_a, report = _run(_extractor(at_a), paths, cache_dir)
    assert (report.from_cache, report.computed) == (0, 18)
    np.testing.assert_array_equal(features_a, _computed(_extractor(at_a), paths))
    _, report = _run(_extractor(at_b), paths, cache_dir)  # back to the first cut: still cached
    assert (report.from_cache, report.computed) == (18, 0)
    assert len(list(cache_dir.glob("features-*"))) == 2


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


def test_wide_features_get_fewer_rows_per_shard(data, tmp_path, monkeypatch):
    """A shard, and the chunk of the pass that fills it, holds at most SHARD_BYTES of float32:
    SHARD_ROWS pooled features, fewer rows of wide ones (the activations at a fine-tuning cut)."""
    assert store.shard_rows(1280) == store.SHARD_ROWS == 4096
    assert store.shard_rows(6272) == 835  # MobileNetV2 alpha 0.35 at block_12_add
    extractor = _tiny_extractor()  # 8 features per image
    monkeypatch.setattr(store, "SHARD_BYTES", 5 * 8 * 4)  # 5 rows of 8 float32
    chunk_rows = []
    predict_chunks = inference.predict_chunks

    def watched(run, paths, image_size, rows, *args, **kwargs):
        chunk_rows.append(rows)
        return predict_chunks(run, paths, image_size, rows, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_chunks", watched)
    paths, cache_dir = _paths(data), tmp_path / "cache"
    features, _ = _run(extractor, paths, cache_dir)
    assert chunk_rows == [5]  # one pass, handing the store 5 images at a time
    index = FeatureStore(cache_dir).index(cache.model_key(extractor, SIZE))
    assert sorted(shard.rows for shard in index.shards) == [3, 5, 5, 5]  # 18 images
    again, report = _run(extractor, paths, cache_dir)
    assert (report.from_cache, chunk_rows) == (18, [5])
    np.testing.assert_array_equal(again, features)


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "deleted"])
def test_damaged_shard_is_reported_once_and_rebuilt(data, tmp_path, capsys, monkeypatch, damage):
    monkeypatch.setattr(store, "SHARD_ROWS", 8)  # 18 images: shards of 8, 8 and 2
    extractor = _tiny_extractor()
    paths, cache_dir = _paths(data), tmp_path / "cache"
    expected, _ = _run(extractor, paths, cache_dir)
    shards = _shards(_model_folder(cache_dir))
    assert len(shards) == 3
    index = FeatureStore(cache_dir).index(cache.model_key(extractor, SIZE))
    shard = next(s for s in shards if index.shards[0].name == s.name)  # one of 8 images
    content = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(content[: len(content) - 5])
    elif damage == "flipped byte":
        last = len(content) - 1  # inside the feature array: same size, other numbers
        shard.write_bytes(content[:last] + bytes([content[last] ^ 1]))
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        shard.unlink()
    capsys.readouterr()

    features, report = _run(extractor, paths, cache_dir)

    warnings = [line for line in capsys.readouterr().out.splitlines() if "Warning" in line]
    assert len(warnings) == 1, warnings
    assert shard.name in warnings[0] and "damaged" in warnings[0] and "8 images" in warnings[0]
    assert (report.from_cache, report.computed) == (10, 8)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    _, report = _run(extractor, paths, cache_dir)
    assert report.from_cache == 18 and "Warning" not in capsys.readouterr().out


def test_damaged_index_is_reported_once_and_rebuilt(data, tmp_path, capsys):
    extractor = _tiny_extractor()
    paths, cache_dir = _paths(data), tmp_path / "cache"
    expected, _ = _run(extractor, paths, cache_dir)
    index = _model_folder(cache_dir) / store.INDEX_NAME
    index.write_bytes(index.read_bytes()[:100])
    capsys.readouterr()
    features, report = _run(extractor, paths, cache_dir)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and str(index) in warnings[0] and "damaged" in warnings[0]
    assert (report.from_cache, report.computed) == (0, 18)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    _, report = _run(extractor, paths, cache_dir)
    assert report.from_cache == 18 and "Warning" not in capsys.readouterr().out


def test_interrupted_pass_keeps_the_shards_it_added(data, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 4)
    extractor = _tiny_extractor()
    paths, cache_dir = _paths(data), tmp_path / "cache"
    real_batches, batches = inference.iter_batches, []

    def stopping_at_batch_3(*args):
        for batch in real_batches(*args):
            batches.append(len(batch))
            if len(batches) == 3:
                raise KeyboardInterrupt  # Kernel -> Interrupt during the base's pass
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(inference, "iter_batches", stopping_at_batch_3)
        with pytest.raises(KeyboardInterrupt):
            cache.cached_features(extractor, paths, SIZE, cache_dir, batch_size=4)
    _, report = _run(extractor, paths, cache_dir)
    assert (report.from_cache, report.computed) == (8, 10)  # two batches of 4 were kept


def test_interrupted_index_write_leaves_the_old_index_whole(data, tmp_path, monkeypatch):
    extractor = _tiny_extractor()
    cache_dir = tmp_path / "cache"
    _run(extractor, _paths(data), cache_dir)
    folder = _model_folder(cache_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_jpeg(data / "training" / "zebra" / "new.jpg", (10, 10, 10), seed=5)
    paths = _paths(data)

    def half_written(out, **arrays):
        out.write(b"PK\x03\x04 half of a zip")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", half_written)
        with pytest.raises(KeyboardInterrupt):
            _run(extractor, paths, cache_dir)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no shard, no temp
    _, report = _run(extractor, paths, cache_dir)
    assert (report.from_cache, report.computed) == (18, 1)


def test_unwritable_store_costs_a_warning_not_the_run(data, tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the store's folder should be")
    features, report = _run(_tiny_extractor(), _paths(data), blocker)
    assert "Warning: could not use the feature cache" in capsys.readouterr().out
    assert features.shape == (18, 8) and report.computed == 18


# --------------------------------------------------------------------------- the store


def test_add_appends_shards_and_a_reopened_store_finds_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 4)
    key = "k" * 64
    first = [_digest(i) for i in range(10)]
    FeatureStore(tmp_path).add(key, first, np.stack([_features_of(d) for d in first]))
    folder = FeatureStore(tmp_path).model_folder(key)
    old_shards = {p.name: p.read_bytes() for p in _shards(folder)}
    assert len(old_shards) == 3  # 4 + 4 + 2

    second = [_digest(i) for i in range(8, 15)]  # 8 and 9 are there already
    FeatureStore(tmp_path).add(key, second, np.stack([_features_of(d) for d in second]))

    reopened = FeatureStore(tmp_path)
    wanted = [_digest(i) for i in (14, 0, 9, 3, 3, 12)]
    located = reopened.lookup(key, wanted)
    assert located.found.all() and located.missing == []
    assert isinstance(located.features, StoredFeatures) and located.features.shape == (6, 6)
    np.testing.assert_array_equal(
        np.asarray(located.features), np.stack([_features_of(d) for d in wanted])
    )
    assert len(reopened.index(key).digests) == 15  # 8 and 9 once each
    shards = {p.name: p.read_bytes() for p in _shards(folder)}
    assert len(shards) == 5 and all(shards[name] == data for name, data in old_shards.items())
    located = reopened.lookup(key, [_digest(99), _digest(1), _digest(99)])
    assert located.found.tolist() == [False, True, False] and located.missing == [_digest(99)]


def test_compact_merges_small_shards_into_full_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 4)
    monkeypatch.setattr(store, "COMPACT_AFTER", 3)
    key, feature_store = "k" * 64, FeatureStore(tmp_path)
    feature_store.add(
        key, [_digest(i) for i in range(4)], np.stack([_features_of(_digest(i)) for i in range(4)])
    )
    for run in range(5):  # five runs of two new images each, one repeated
        digests = [_digest(10 + 2 * run), _digest(11 + 2 * run), _digest(0)]
        feature_store.add(key, digests, np.stack([_features_of(d) for d in digests]))
        assert feature_store.compact(key) == (3 if run in (2, 4) else 0)
    folder = feature_store.model_folder(key)
    rows = sorted(shard.rows for shard in feature_store.index(key).shards)
    assert rows == [2, 4, 4, 4]  # the first, then twice 3 small shards merged into 4 + 2 rows
    assert {p.name for p in _shards(folder)} == {s.name for s in feature_store.index(key).shards}
    wanted = [_digest(i) for i in (*range(4), *range(10, 20))]
    located = FeatureStore(tmp_path).lookup(key, wanted)
    assert located.missing == []
    np.testing.assert_array_equal(
        np.asarray(located.features), np.stack([_features_of(d) for d in wanted])
    )


def test_float16_rows_are_stored_in_half_the_bytes_and_read_as_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 4)
    monkeypatch.setattr(store, "COMPACT_AFTER", 2)
    key, feature_store = "k" * 64, FeatureStore(tmp_path)
    exact = np.stack([_features_of(_digest(i)) for i in range(6)]) + np.float32(1 / 3)
    feature_store.add(key, [_digest(i) for i in range(3)], exact[:3])
    feature_store.add(key, [_digest(i) for i in range(3, 6)], exact[3:].astype(np.float16))
    index = feature_store.index(key)
    assert [shard.dtype for shard in index.shards] == ["float32", "float16"]
    sizes = [shard.size for shard in index.shards]
    assert sizes[1] - 128 == (sizes[0] - 128) // 2  # same rows, half the bytes after the header
    features = FeatureStore(tmp_path).lookup(key, [_digest(i) for i in range(6)]).features
    read = np.asarray(features)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read[:3], exact[:3])  # float32 rows exactly as given
    np.testing.assert_array_equal(read[3:], exact[3:].astype(np.float16).astype(np.float32))
    assert not np.array_equal(read[3:], exact[3:])
    # Small shards merge only with small shards of their own type.
    feature_store.add(key, [_digest(6)], exact[:1] + 1)
    assert feature_store.compact(key) == 2
    index = feature_store.index(key)
    assert sorted((shard.dtype, shard.rows) for shard in index.shards) == [
        ("float16", 3),
        ("float32", 4),
    ]
    read = np.asarray(feature_store.lookup(key, [_digest(i) for i in range(7)]).features)
    np.testing.assert_array_equal(read[:3], exact[:3])
    np.testing.assert_array_equal(read[3:6], exact[3:].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(read[6], exact[0] + 1)


@pytest.mark.parametrize("views", [(), ("mirror",)])
def test_training_rows_are_float16_in_the_store_validation_rows_float32(data, tmp_path, views):
    """Training rows only train; evaluation runs the saved model's head on validation rows, so
    those are kept exactly. An image in both folders is kept exactly too (and its mirror view,
    computed from the same decode, as float16)."""
    train_set = dataset.scan_image_folder(data / "training", LABELS)
    val_set = dataset.scan_image_folder(data / "validation", LABELS, role="validation")
    copy = data / "training" / "apple" / "also-validation.jpg"
    shutil.copy(val_set.paths[0], copy)
    train_set = dataset.scan_image_folder(data / "training", LABELS)
    keras.utils.set_random_seed(0)
    base = model.strip_classification_head(_base_with_top())
    classifier = model.build_classifier(base, LABELS, SIZE)
    cache_dir = tmp_path / "cache"
    features = train.compute_features(
        classifier, train_set, val_set, SIZE, cache_dir=cache_dir, views=views
    )
    index = FeatureStore(cache_dir).index(features.model_key)
    rows = {"float16": 0, "float32": 0}
    for shard in index.shards:
        rows[shard.dtype] += shard.rows
    n = len(train_set)
    assert rows == {"float16": len(views) * n + n - 1, "float32": len(val_set)}
    exact = train.compute_features(classifier, train_set, val_set, SIZE, views=views)  # no cache
    np.testing.assert_array_equal(np.asarray(features.train)[n:], exact.train[n:])  # views
    np.testing.assert_array_equal(np.asarray(features.validation), exact.validation)
    copied = train_set.paths.index(str(copy))
    only_training = np.arange(len(train_set)) != copied
    stored = np.asarray(features.train)[:n]  # the images as they are
    np.testing.assert_array_equal(stored[only_training], exact.train[:n][only_training])
    unrounded = inference.predict_images(model.feature_extractor(classifier), train_set.paths, SIZE)
    assert not np.array_equal(stored[only_training], unrounded[only_training])
    np.testing.assert_allclose(stored, unrounded, rtol=1e-3)
    np.testing.assert_array_equal(stored[copied], exact.validation[0])  # kept exactly


def test_stored_features_index_like_an_array(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 3)
    key = "k" * 64
    digests = [_digest(i) for i in range(7)]
    expected = np.stack([_features_of(d) for d in digests])
    feature_store = FeatureStore(tmp_path)
    feature_store.add(key, digests, expected)
    stored = feature_store.lookup(key, digests).features
    assert len(stored) == 7 and stored.shape == (7, 6)
    np.testing.assert_array_equal(np.asarray(stored[2:6]), expected[2:6])
    np.testing.assert_array_equal(stored[np.array([6, 0, 4])], expected[[6, 0, 4]])
    np.testing.assert_array_equal(stored[5], expected[5])
    batches = list(store.feature_batches(stored, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_features_found_stay_readable_when_another_run_prunes_their_model(tmp_path):
    digests = [_digest(i) for i in range(5)]
    expected = np.stack([_features_of(d) for d in digests])
    FeatureStore(tmp_path).add("a" * 64, digests, expected)
    found = FeatureStore(tmp_path).lookup("a" * 64, digests).features
    other = FeatureStore(tmp_path)
    other.add("b" * 64, digests, expected)
    assert other.prune(current="b" * 64, keep_models=1) == [other.model_folder("a" * 64)]
    np.testing.assert_array_equal(np.asarray(found), expected)


def _mapped_file_kb() -> int:
    """This process's resident file-backed memory (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_the_store_does_not_keep_its_pages_in_the_process(tmp_path):
    """Rows read through the memory maps leave no resident pages behind (40 MB read here)."""
    digests = [_digest(i) for i in range(4096)]
    FeatureStore(tmp_path).add("k" * 64, digests, np.ones((4096, 2560), np.float32))
    found = FeatureStore(tmp_path).lookup("k" * 64, digests).features
    before = _mapped_file_kb()
    total = sum(float(batch.sum()) for batch in store.feature_batches(found, 512))
    assert total == 4096 * 2560
    assert _mapped_file_kb() - before < 8 * 1024  # without the release: about 40,000 KB


def test_another_datasets_entries_are_kept(tmp_path):
    """Two datasets, one cache folder, one base: neither run evicts the other's features."""
    one = make_dataset(tmp_path / "one", LABELS, train_per_class=3, val_per_class=1)
    two = make_dataset(
        tmp_path / "two",
        LABELS,
        train_per_class=2,
        val_per_class=1,
        colour_of=lambda name: (90, 90, 90 + 40 * LABELS[name]),
    )
    extractor, cache_dir = _tiny_extractor(), tmp_path / "cache"
    _run(extractor, _paths(one), cache_dir)
    _, report = _run(extractor, _paths(two), cache_dir)
    assert report.computed == 9
    _, report = _run(extractor, _paths(one), cache_dir)
    assert (report.from_cache, report.computed) == (12, 0)
    _, report = _run(extractor, _paths(two), cache_dir)
    assert (report.from_cache, report.computed) == (9, 0)


def test_prune_drops_least_recently_used_models_and_never_the_current(tmp_path):
    feature_store = FeatureStore(tmp_path)
    keys = [f"{i}" * 64 for i in range(4)]
    for age, key in enumerate(keys):  # key 0 newest ... key 3 oldest
        digests = [_digest(i) for i in range(50)]
        feature_store.add(key, digests, np.ones((50, 100), np.float32))
        os.utime(feature_store.model_folder(key) / store.INDEX_NAME, (1e9 - age, 1e9 - age))
    one_model = sum(f.stat().st_size for f in feature_store.model_folder(keys[0]).iterdir())

    removed = feature_store.prune(current=keys[3], keep_models=3)  # the oldest is in use
    assert removed == [feature_store.model_folder(keys[2])]
    removed = feature_store.prune(current=keys[3], max_bytes=int(2.5 * one_model))
    assert removed == [feature_store.model_folder(keys[1])]
    assert sorted(p.name for p in tmp_path.glob("features-*")) == sorted(
        feature_store.model_folder(k).name for k in (keys[0], keys[3])
    )


def test_prune_deletes_leftovers_of_killed_runs_only_when_stale(tmp_path):
    feature_store = FeatureStore(tmp_path)
    key = "k" * 64
    feature_store.add(key, [_digest(1)], np.ones((1, 4), np.float32))
    folder = feature_store.model_folder(key)
    named = _shards(folder)
    orphan = folder / f"{store.SHARD_PREFIX}orphan{store.SHARD_SUFFIX}"
    temp = folder / f".{store.INDEX_NAME}.x{store.TEMP_SUFFIX}"
    fresh = folder / f"{store.SHARD_PREFIX}fresh{store.SHARD_SUFFIX}"  # another run's, unnamed yet
    for path in (orphan, temp, fresh):
        path.write_bytes(b"x")
    old = 1e9
    os.utime(orphan, (old, old))
    os.utime(temp, (old, old))
    os.utime(named[0], (old, old))
    feature_store.prune(current=key)
    assert _shards(folder) == sorted([*named, fresh]) and not temp.exists()


def test_command_shows_and_prunes_the_store(tmp_path):
    feature_store = FeatureStore(tmp_path)
    for age, key in enumerate(["a" * 64, "b" * 64]):
        feature_store.add(key, [_digest(1), _digest(2)], np.ones((2, 4), np.float32))
        os.utime(feature_store.model_folder(key) / store.INDEX_NAME, (1e9 - age, 1e9 - age))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tl_helpers.store"]
    shown = subprocess.run(
        [*command, "show", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "features-" + "a" * 32 + ": 2 images, 1 shards" in shown.stdout
    assert "features-" + "b" * 32 in shown.stdout
    pruned = subprocess.run(
        [*command, "prune", str(tmp_path), "--keep-models", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert pruned.returncode == 0, pruned.stderr
    assert f"deleted {feature_store.model_folder('b' * 64)}" in pruned.stdout
    assert not feature_store.model_folder("b" * 64).exists()
    assert feature_store.model_folder("a" * 64).exists()


def test_index_entries_finds_each_digest_and_none_for_others(tmp_path):
    key = "k" * 64
    digests = [bytes([n]) * 31 + bytes([0]) for n in (5, 1, 9)]  # a trailing zero byte too
    feature_store = FeatureStore(tmp_path / "store")
    feature_store.add(key, digests, np.arange(6, dtype=np.float32).reshape(3, 2))
    index = feature_store.index(key)
    asked = [digests[2], bytes([7]) * 32, digests[0], digests[1], bytes([5]) * 31 + b"\x01"]
    assert index.entries(store._digest_array(asked)).tolist() == [2, -1, 0, 1, -1]
    assert store.ModelIndex.empty(key).entries(store._digest_array(asked)).tolist() == [-1] * 5


def test_a_pass_of_many_shards_runs_one_pipeline(data, tmp_path, monkeypatch):
    """Shards are cut from one input pipeline, not one pipeline per shard (each leaves memory
    behind inside TensorFlow), and the rows are the same as one whole-array pass."""
    monkeypatch.setattr(store, "SHARD_ROWS", 5)  # 18 images in batches of 4: shards cut batches
    extractor = _tiny_extractor()
    paths, cache_dir = _paths(data), tmp_path / "cache"
    real_batches, pipelines = inference.iter_batches, []

    def counting(*args):
        pipelines.append(args[0])
        yield from real_batches(*args)

    monkeypatch.setattr(inference, "iter_batches", counting)
    features, report = cache.cached_features(extractor, paths, SIZE, cache_dir, batch_size=4)
    assert report.computed == 18 and len(pipelines) == 1
    shards = FeatureStore(cache_dir).index(cache.model_key(extractor, SIZE)).shards
    assert sorted(shard.rows for shard in shards) == [3, 5, 5, 5]
    np.testing.assert_array_equal(np.asarray(features), _computed(extractor, paths))


def test_chunks_of_a_pass_join_to_the_whole_pass(data):
    run = inference.keras_runner(_tiny_extractor(), SIZE)
    paths = _paths(data)[:13]
    chunks = list(inference.predict_chunks(run, paths, SIZE, 5, batch_size=4))
    assert [len(chunk) for chunk in chunks] == [5, 5, 3]
    whole = inference.predict_batches(run, paths, SIZE, batch_size=4)
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from tl_helpers import store
    from tl_helpers.store import FeatureStore

    folder, first, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    store.SHARD_ROWS = 3
    store.RACY_SECONDS = -1.0  # the test wrote the files just now
    while not go.exists():
        time.sleep(0.01)
    for round in range(30):
        numbers = range(first + 4 * round, first + 4 * round + 6)  # overlaps the next round
        digests = [n.to_bytes(4, "big") * 8 for n in numbers]
        rows = np.stack([np.full(6, n, np.float32) for n in numbers])
        FeatureStore(folder).add("k" * 64, digests, rows)
        paths = [str(folder.parent / f"file-{n % 40}") for n in numbers]
        FeatureStore(folder).digests(paths)
        FeatureStore(folder).prune(current="k" * 64)  # as every run does at its end
    """
)


def test_two_processes_writing_one_store_lose_nothing(tmp_path):
    """Two real processes add overlapping entries and stat-index records at the same time."""
    folder, go = tmp_path / "store", tmp_path / "go"
    for n in range(40):
        (tmp_path / f"file-{n}").write_bytes(f"content {n}".encode())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(folder), str(first), str(go)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in (0, 60)  # 0..121 and 60..181: 60..121 written by both
    ]
    try:
        go.touch()
        for writer in writers:
            assert writer.wait(timeout=120) == 0, writer.stderr.read()
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    numbers = sorted(set(range(0, 122)) | set(range(60, 182)))
    located = FeatureStore(folder).lookup("k" * 64, [n.to_bytes(4, "big") * 8 for n in numbers])
    assert located.missing == []
    np.testing.assert_array_equal(np.asarray(located.features)[:, 0], numbers)
    index = FeatureStore(folder).index("k" * 64)
    assert len(index.digests) == len(numbers)  # each entry once
    folder_files = {p.name for p in FeatureStore(folder).model_folder("k" * 64).iterdir()}
    assert folder_files == {store.INDEX_NAME} | {s.name for s in index.shards}  # no leftovers
    known = FeatureStore(folder)._read_stat_index()
    assert set(known.paths) == {str(tmp_path / f"file-{n}") for n in range(40)}


# --------------------------------------------------------------------------- change detection


def test_stat_index_is_rewritten_only_for_new_digests_or_once_a_refresh_is_due(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(store, "RACY_SECONDS", -1.0)  # the files were written just now
    files = [tmp_path / f"file-{n}" for n in range(3)]
    for n, file in enumerate(files):
        file.write_bytes(bytes([n]) * 10)
    folder = tmp_path / "store"
    first = FeatureStore(folder).digests(files)
    stat_index = folder / store.STAT_INDEX_NAME
    written = stat_index.stat().st_mtime_ns
    os.utime(stat_index, ns=(written - 10**9, written - 10**9))  # as if written a second ago
    assert FeatureStore(folder).digests(files) == first
    assert stat_index.stat().st_mtime_ns == written - 10**9  # nothing new, seen recently
    monkeypatch.setattr(store, "STAT_REFRESH_SECONDS", -1)
    assert FeatureStore(folder).digests(files) == first
    assert stat_index.stat().st_mtime_ns != written - 10**9  # a refresh was due
    assert set(FeatureStore(folder)._read_stat_index().paths) == set(map(str, files))


def test_unchanged_files_are_not_read_again(data, tmp_path, reads):
    extractor, paths, cache_dir = _tiny_extractor(), _paths(data), tmp_path / "cache"
    first, _ = _run(extractor, paths, cache_dir)
    assert sorted(reads.read) == sorted(paths)  # each image read once, to hash it
    reads.read.clear()
    second, report = _run(extractor, paths, cache_dir)
    assert reads.read == [] and report.from_cache == 18
    np.testing.assert_array_equal(first, second)


def test_touched_but_identical_file_is_hashed_not_recomputed(data, tmp_path, reads):
    extractor, paths, cache_dir = _tiny_extractor(), _paths(data), tmp_path / "cache"
    _run(extractor, paths, cache_dir)
    reads.read.clear()
    os.utime(paths[4], (1.5e9, 1.5e9))  # another modification time, the same bytes
    _, report = _run(extractor, paths, cache_dir)
    assert reads.read == [paths[4]]
    assert (report.from_cache, report.computed) == (18, 0)
    reads.read.clear()
    _run(extractor, paths, cache_dir)
    assert reads.read == []  # its new times were recorded


def test_changed_file_is_recomputed_even_with_its_old_size_and_time(data, tmp_path, reads):
    extractor, paths, cache_dir = _tiny_extractor(), _paths(data), tmp_path / "cache"
    before, _ = _run(extractor, paths, cache_dir)
    changed = Path(paths[7])
    content, times = bytearray(changed.read_bytes()), changed.stat()
    table = content.index(b"\xff\xdb") + 5  # the first quantisation table's DC entry
    content[table] = content[table] + 3 if content[table] < 250 else 1  # other pixels, same size
    changed.write_bytes(bytes(content))
    os.utime(changed, ns=(times.st_atime_ns, times.st_mtime_ns))  # as rsync -t or cp -p keep it
    assert changed.stat().st_size == times.st_size
    reads.read.clear()
    after, report = _run(extractor, paths, cache_dir)
    assert reads.read == [str(changed)]
    assert (report.from_cache, report.computed) == (17, 1)
    np.testing.assert_allclose(
        after[7], inference.predict_images(extractor, [str(changed)], SIZE)[0], atol=1e-6
    )
    assert not np.array_equal(after[7], before[7])


def test_recently_changed_files_are_hashed_every_time(data, tmp_path, reads, monkeypatch):
    """A file changed within RACY_SECONDS could change again within the same clock tick."""
    monkeypatch.setattr(store, "RACY_SECONDS", 3600.0)  # every file of the test is that recent
    paths = _paths(data)
    FeatureStore(tmp_path / "cache").digests(paths)
    FeatureStore(tmp_path / "cache").digests(paths)
    assert sorted(reads.read) == sorted(paths * 2)


def test_hashing_runs_in_threads_and_keeps_the_order(data, tmp_path, monkeypatch):
    import threading

    threads = set()
    real = store._file_digest

    def recording(path):
        threads.add(threading.get_ident())
        return real(path)

    monkeypatch.setattr(store, "HASH_THREADS", 4)
    monkeypatch.setattr(store, "_file_digest", recording)
    paths = _paths(data)
    digests = FeatureStore(tmp_path / "cache").digests(paths)
    assert threading.get_ident() not in threads  # the pool's threads, not the caller's
    assert digests == [real(p) for p in paths]


def test_a_file_gone_since_the_scan_is_named(data, tmp_path):
    paths = _paths(data)
    Path(paths[3]).unlink()
    with pytest.raises(TLError, match=Path(paths[3]).name):
        FeatureStore(tmp_path / "cache").digests(paths)


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
    assert isinstance(warm[0].train, StoredFeatures)  # trained from the store's shards
    # A hit returns the very numbers the first pass computed, hence the very same head.
    np.testing.assert_array_equal(warm[0].train, cold[0].train)
    np.testing.assert_array_equal(warm[0].validation, cold[0].validation)
    for warm_array, cold_array in zip(warm[1], cold[1], strict=True):
        np.testing.assert_array_equal(warm_array, cold_array)
    # The same model as without the cache, up to TensorFlow's own pass-to-pass noise (~1e-9):
    # training features are float16 both ways (one float16 step apart at most).
    np.testing.assert_allclose(warm[0].train, without[0].train, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(warm[0].validation, without[0].validation, rtol=1e-6, atol=1e-6)
    for warm_array, array in zip(warm[1], without[1], strict=True):
        np.testing.assert_allclose(warm_array, array, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(warm[2], without[2], atol=1e-6)
    np.testing.assert_array_equal(warm[2].argmax(axis=1), without[2].argmax(axis=1))


def test_head_trains_from_the_store_a_batch_at_a_time(data, tmp_path, monkeypatch):
    """No step gathers more than a batch of features; the head learns; evaluation from the
    stored validation features gives the classifier's own predictions."""
    from tl_helpers import evaluate

    train_set = dataset.scan_image_folder(data / "training", LABELS)
    val_set = dataset.scan_image_folder(data / "validation", LABELS, role="validation")
    keras.utils.set_random_seed(0)
    classifier = model.build_classifier(
        model.strip_classification_head(_base_with_top()), LABELS, SIZE
    )
    features = train.compute_features(classifier, train_set, val_set, SIZE, cache_dir=tmp_path)
    gathered = []
    real_take = StoredFeatures.take

    def recording_take(self, rows):
        gathered.append(len(rows))
        return real_take(self, rows)

    def refuse(*args, **kwargs):
        raise AssertionError("all features loaded at once")

    with monkeypatch.context() as patch:
        patch.setattr(StoredFeatures, "take", recording_take)
        patch.setattr(StoredFeatures, "__array__", refuse)
        history = train.train_head(
            classifier, features, epochs=30, batch_size=4, learning_rate=0.05, verbose=0
        )
    assert gathered and max(gathered) <= train.gather_rows(features.train.shape[1])
    assert sum(gathered) == 30 * (12 + 6)  # every epoch: 12 training and 6 validation images
    loss = history.history["loss"]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    assert history.history["val_accuracy"][-1] >= 0.8
    probabilities = inference.predict_images(classifier, val_set.paths, SIZE)
    assert (probabilities.argmax(axis=1) == val_set.class_ids).mean() >= 0.8
    from_features, method = evaluate.head_on_features(classifier, val_set, SIZE, features)
    assert method["method"].startswith("saved model's head on the validation features")
    np.testing.assert_allclose(from_features, probabilities, atol=1e-5)


def test_feature_dataset_follows_the_seed_and_reshuffles_each_epoch():
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    ids = np.arange(10, dtype=np.int32)

    def epochs(seed):
        keras.utils.set_random_seed(seed)
        source = train.feature_dataset(values, ids, 4, shuffle=True)
        return [np.concatenate([y.numpy() for _, y in source]).tolist() for _ in range(2)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again and first != other
    assert first[0] != first[1] and sorted(first[0]) == list(range(10))
    ordered = train.feature_dataset(values, ids, 4, shuffle=False)
    batches = [(x.numpy(), y.numpy()) for x, y in ordered]
    assert [len(y) for _, y in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), values)
    # No autotuning thread: deleting an epoch's iterator would wait for it (up to 10 s).
    assert ordered.options().autotune.enabled is False


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
    cfg = load_configuration(run.folder / "configuration.json")
    # The kernel's first run: 24 training images in each view (as they are, then the default
    # augmentation's views, then fine-tuning's noise view) and 12 validation images.
    tune_views = augment.FINE_TUNE_VIEWS if cfg.fine_tune and cfg.fine_tune_noise else ()
    rows = 24 * (1 + len(augment.views_of(cfg.augmentation)) + len(tune_views)) + 12
    assert f"features: {rows} images, 0 from cache, {rows} computed" in text
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
    train.compute_features(  # as the notebook calls it: its views and its fine-tuning cut
        classifier,
        train_set,
        val_set,
        cfg.input_tensor_size,
        cache_dir=cache_dir,
        views=augment.views_of(cfg.augmentation),
        fine_tune_cut=cfg.fine_tune_cut if cfg.fine_tune else None,
        fine_tune_noise=cfg.fine_tune_noise,
    )
    assert f"features: {rows} images, {rows} from cache, 0 computed" in capsys.readouterr().out
