"""The feature pass with its cache: pooled base features kept in a feature store, so re-runs
skip the base for old images.

An entry is keyed by everything that decides a feature, and nothing else:

- the image's content (SHA-256 of the file's bytes, not its path or modification time: an edit
  is seen even when the time is kept, as `rsync -t` or `cp -p` do, and moving a photo to
  another class folder or copying the dataset elsewhere costs nothing). The store's stat index
  remembers each file's digest, so an unchanged file is not read again (tl_helpers.store);
- the feature extractor (preprocessing + base model after `remove_top_layer_if_needed()` +
  pooling): its architecture with layer names normalised, and every weight array's bytes;
- `input_tensor_size`, the TensorFlow version, and the image loading code (the source of
  `dataset.load_images`, the runners `inference.keras_runner`, `inference.backbone_runner`
  and `tflite.float_runner`, `inference.predict_images`, `inference.predict_batches` and
  `inference.predict_chunks`, plus `PIPELINE_VERSION`).

An augmented view of an image (tl_helpers.augment) is an entry of the same model, keyed by
`augment.view_digest(image digest, view)`: views are computed once, like the images, and a
changed view is computed again without touching the others.

The model part of the key names a folder of the store (tl_helpers.store), in shards appended
one at a time while the base runs (`store.shard_rows` images each), so an interrupted first
pass keeps what it computed. Entries of other datasets and other runs sharing the folder are
kept; what is dropped and when is the store's rule (least recently used models beyond a size
budget).

Fine-tuning's rows through the MCT-quantized lower part (`train._quantized_rows`) are kept the
same way, under a key made from the float lower part's key and the quantization step's
settings (`quantize.LowerQuantization.key`), so that finding them needs no MCT run.

Rows that only train (`float16_rows`: training images and their views) are stored as float16,
half the bytes; training reads them widened back to float32 (the head's Top-1 on flowers128
and clothing10 is the same as from float32 rows, fine-tuning's within noise:
docs/feature-cache.md). Validation rows are stored as float32, exactly as computed,
because evaluation runs the saved model's head on them and checks that against the whole model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import tensorflow as tf

from tl_helpers import augment, dataset, inference, store, tflite
from tl_helpers.store import FeatureStore, StoredFeatures

keras = tf.keras
T = TypeVar("T")  # a row's payload in _passes_by_file

# Bump when something that changes features, but not the code hashed below, changes.
# 2: images turned upright by their EXIF orientation; 3: large JPEGs decoded at a reduced scale
PIPELINE_VERSION = 3
FORMAT_VERSION = 2
ATTEMPTS = 3  # lookups before giving up on a store that loses entries as fast as they are added


@dataclass
class CacheReport:
    """What one feature pass took from the cache and what it computed."""

    images: int
    from_cache: int
    computed: int
    path: Path | None = None  # the model's folder in the store; None when the cache is off
    file_bytes: int = 0
    key: str | None = None  # the extractor's model_key; None when it cannot be described
    stored_images: int = 0  # images of this model in the store, all datasets together

    def summary(self) -> str:
        """One line, e.g. "features: 4,317 images, 4,297 from cache, 20 computed"."""
        return (
            f"features: {self.images:,} images, {self.from_cache:,} from cache, "
            f"{self.computed:,} computed"
        )

    def size_line(self) -> str:
        """Where the model's features are and how big they are, per stored image."""
        per_image = self.file_bytes / max(self.stored_images, 1) / 1024
        return (
            f"feature cache: {self.path} ({self.stored_images:,} images, "
            f"{self.file_bytes / 1e6:.1f} MB, {per_image:.1f} KB per image)"
        )


# --------------------------------------------------------------------------- the keys


def model_key(extractor: keras.Model, image_size: int) -> str:
    """Hex SHA-256 of everything but the image that decides a feature (see the module doc)."""
    description = {
        "format": FORMAT_VERSION,
        "pipeline": PIPELINE_VERSION,
        "code": _code_digest(),
        "tensorflow": tf.__version__,
        "image_size": int(image_size),
        "architecture": architecture(extractor),
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for array in extractor.get_weights():
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(_buffer(array))
    return digest.hexdigest()


def describable_key(extractor: keras.Model, image_size: int) -> str | None:
    """`model_key`, or None for a model Keras cannot describe as JSON (some custom layers)."""
    try:
        return model_key(extractor, image_size)
    except (NotImplementedError, TypeError, ValueError):
        return None


def architecture(model: keras.Model) -> object:
    """The model's JSON config with layer names and node numbers made build-independent.

    Keras numbers auto-named layers per session ("dense_3", "model_1") and counts the calls of
    a layer (a base reused by a rebuilt classifier gets node 2), so building the same model
    twice gives different JSON. Names become their position ("#0", "#1", ...) and node indices
    are renumbered by first use, and build and compile configs are dropped (a reloaded model
    lacks some); what the layers compute, and how they are wired, is kept.
    """
    names: dict[str, str] = {}
    for layer in _all_layers(model):
        names.setdefault(layer.name, f"#{len(names)}")
    nodes: dict[tuple[str, int], int] = {}
    return _normalise(json.loads(model.to_json()), names, nodes)


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The model and its layers, depth first, nested models included."""
    layers = [model]
    for layer in getattr(model, "layers", []):
        layers += _all_layers(layer)
    return layers


def _normalise(value: object, names: dict[str, str], nodes: dict[tuple[str, int], int]) -> object:
    """Replace layer names and node indices in a parsed JSON config (see `architecture`)."""
    if isinstance(value, dict):
        return {
            key: _normalise(item, names, nodes)
            for key, item in value.items()
            if key not in _NOT_COMPUTATION
        }
    if isinstance(value, list):
        if _is_node_reference(value, names):
            node = nodes.setdefault((value[0], value[1]), len(nodes))
            rest = [_normalise(item, names, nodes) for item in value[2:]]
            return [names[value[0]], node, *rest]
        return [_normalise(item, names, nodes) for item in value]
    if isinstance(value, str):
        return names.get(value, value)
    return value


# Config entries that say how a layer was built or compiled, not what it computes: a model
# reloaded from a SavedModel lacks the build_config of its weightless layers.
_NOT_COMPUTATION = frozenset({"build_config", "compile_config"})


def _is_node_reference(value: list, names: dict[str, str]) -> bool:
    """Tell a [layer name, node index, tensor index(, kwargs)] reference in a Keras config."""
    return (
        len(value) in (3, 4)
        and isinstance(value[0], str)
        and value[0] in names
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value[1:3])
    )


def _buffer(array: np.ndarray) -> memoryview:
    """The array's bytes, without copying a C-contiguous array."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _code_digest() -> str:
    """SHA-256 of the code that turns a file into the extractor's input (changes invalidate)."""
    digest = hashlib.sha256()
    for function in (
        dataset.load_images,
        dataset.decode_jpeg,
        dataset.decode_ratio_index,
        dataset.exif_orientation,
        dataset.upright,
        inference.keras_runner,
        inference.backbone_runner,
        tflite.float_runner,
        inference.predict_images,
        inference.predict_batches,
        inference.predict_chunks,
    ):
        try:
            digest.update(inspect.getsource(function).encode())
        except (OSError, TypeError):  # installed without sources: PIPELINE_VERSION must do
            digest.update(function.__qualname__.encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the pass


def cached_features(
    extractor: keras.Model | Callable[[], keras.Model],
    paths: Sequence[str],
    image_size: int,
    cache_dir: str | Path,
    batch_size: int = inference.INFERENCE_BATCH_SIZE,
    max_bytes: int = store.DEFAULT_MAX_BYTES,
    views: Sequence[str] | None = None,
    devices: Sequence[str] = (),
    float16_rows: Sequence[bool] | None = None,
    key: str | None = None,
) -> tuple[StoredFeatures | np.ndarray, CacheReport]:
    """Features of `paths` (in order): stored ones found, the others computed and stored.

    `views`, one per path, names the augmented view of each row (tl_helpers.augment; ""
    or None: the image as it is). `float16_rows`, one per path (None: none), marks the rows
    that may be stored as float16; an image any other row needs is stored as float32.
    `key` (None: `model_key` of the extractor) names the extractor in the store; with a key,
    `extractor` may be a function that builds it, called only if an image is missing.

    Returns a StoredFeatures (memory-mapped, see tl_helpers.store), or an array when the store
    cannot be written (one warning line; the run goes on without the cache). Afterwards the
    store is pruned to `max_bytes` (see `FeatureStore.prune`). `devices`: see
    `inference.predict_images`.
    """
    paths = list(paths)
    views = list(views) if views is not None else [""] * len(paths)
    float16_rows = list(float16_rows) if float16_rows is not None else [False] * len(paths)
    if not paths:
        raise ValueError("cached_features: no images")
    if not isinstance(extractor, keras.Model):
        extractor = functools.cache(extractor)
    key = key or describable_key(extractor, image_size)
    if key is None:
        print("Note: feature cache not used: the base model cannot be described.")
        return uncached_features(
            extractor, paths, image_size, batch_size, views, devices, float16_rows
        )
    feature_store = FeatureStore(cache_dir, max_bytes)
    try:
        feature_store.folder.mkdir(parents=True, exist_ok=True)
        features, report = _pass(
            feature_store,
            key,
            extractor,
            paths,
            views,
            float16_rows,
            image_size,
            batch_size,
            devices,
        )
        feature_store.touch(key)
        feature_store.compact(key)
        feature_store.prune(current=key)
        index = feature_store.index(key)
    except OSError as err:
        print(
            f"Warning: could not use the feature cache {cache_dir} ({err}); continuing without it."
        )
        return uncached_features(
            extractor, paths, image_size, batch_size, views, devices, float16_rows
        )
    report.path = feature_store.model_folder(key)
    report.file_bytes = index.bytes_on_disk()
    report.stored_images = len(index.digests)
    print(report.size_line())
    return features, report


def _pass(
    feature_store: FeatureStore,
    key: str,
    extractor: keras.Model,
    paths: list[str],
    views: list[str],
    float16_rows: list[bool],
    image_size: int,
    batch_size: int,
    devices: Sequence[str] = (),
) -> tuple[StoredFeatures, CacheReport]:
    """Look the images up, compute and add the missing ones, and look them up again."""
    unique_paths = list(dict.fromkeys(paths))  # a path given once per view is read once
    file_digest = dict(zip(unique_paths, feature_store.digests(unique_paths), strict=True))
    digests = augment.view_digests([file_digest[path] for path in paths], views)
    del file_digest, unique_paths
    # digest -> (image, view, float16): the first row's image and view; float16 only when
    # every row of that digest allows it.
    first_path: dict[bytes, tuple[str, str, bool]] = {}
    for digest, image, view, half in zip(digests, paths, views, float16_rows, strict=True):
        known = first_path.get(digest)
        if known is None:
            first_path[digest] = (image, view, half)
        elif known[2] and not half:
            first_path[digest] = (known[0], known[1], False)
    report, run = None, None
    for _ in range(ATTEMPTS):
        located = feature_store.lookup(key, digests)
        if report is None:
            from_cache = int(located.found.sum())
            report = CacheReport(len(paths), from_cache, len(paths) - from_cache, key=key)
            print(report.summary())
        if not located.missing:
            return located.features, report
        missing = []  # (file, view, (view, float16), digest): what _passes_by_file groups
        for digest in located.missing:
            path, view, half = first_path[digest]
            missing.append((path, view, (view, half), digest))
        if run is None:  # one runner (one TFLite conversion) for every pass below
            run = inference.backbone_runner(built(extractor), image_size, devices)
        for group_paths, group_views, group_digests in _passes_by_file(
            missing, list(dict.fromkeys(views))
        ):
            compute_into_store(
                feature_store,
                key,
                built(extractor),
                group_paths,
                group_digests,
                image_size,
                batch_size,
                [view for view, _ in group_views],
                [half for _, half in group_views],
                run=run,
            )
    raise OSError("entries vanish as fast as they are added (is another run pruning the store?)")


def _passes_by_file(
    rows: Iterable[tuple[str, str, Hashable, T]], view_order: list[str]
) -> list[tuple[list[str], tuple[Hashable, ...], list[T]]]:
    """Rows to compute, (file, view, what the pass needs to know of the row, payload), as
    passes that decode each file once: (files, each file's rows in `view_order`, the payloads
    in row order: file 0's rows, then file 1's, ...).

    Files that lack the same rows share a pass (a first run: the training images, which lack
    every view, and the validation images, which lack themselves).
    """
    of_file: dict[str, list[tuple[str, Hashable, T]]] = {}
    for path, view, row, payload in rows:
        of_file.setdefault(path, []).append((view, row, payload))
    passes: dict[tuple[Hashable, ...], tuple[list[str], list[T]]] = {}
    for path, file_rows in of_file.items():
        file_rows.sort(key=lambda file_row: view_order.index(file_row[0]))
        files, payloads = passes.setdefault(tuple(row for _, row, _ in file_rows), ([], []))
        files.append(path)
        payloads.extend(payload for _, _, payload in file_rows)
    return [(files, rows, payloads) for rows, (files, payloads) in passes.items()]


def compute_into_store(
    feature_store: FeatureStore,
    key: str,
    extractor: keras.Model,
    paths: list[str],
    digests: list[bytes],
    image_size: int,
    batch_size: int = inference.INFERENCE_BATCH_SIZE,
    views: Sequence[str] = ("",),
    float16: Sequence[bool] | None = None,
    *,
    run: Callable[[tf.Tensor], np.ndarray],
) -> None:
    """Run the extractor over `paths`, each decoded once for all its `views` (augmented views,
    tl_helpers.augment), adding one row per file and view to the store a shard at a time.

    `digests` name the rows in order (file 0's views, then file 1's, ...); `float16`, one per
    view (None: none), says which views' rows are stored as float16. Memory holds at most one
    shard's features, and an interrupted pass keeps the shards it added. One pipeline and one
    progress bar run over all the rows. `run`: the extractor's runner
    (`inference.backbone_runner`, made once per feature pass by the caller).
    """
    views = list(views)
    float16 = list(float16) if float16 is not None else [False] * len(views)
    shown = [view or "as is" for view in views]
    title = f"views {', '.join(shown)}" if views != [""] else ""
    dim = int(np.prod(extractor.output_shape[1:]))
    chunks = inference.predict_chunks(
        run, paths, image_size, store.shard_rows(dim), batch_size, title, view=views
    )
    start = 0
    for features in chunks:
        end = start + len(features)
        halves = np.resize(np.asarray(float16, dtype=bool), end)[start:]  # each row's view
        for half in (True, False):
            rows = np.flatnonzero(halves == half)
            if len(rows):
                part = features[rows] if len(rows) < len(features) else features
                feature_store.add(
                    key,
                    [digests[start + row] for row in rows],
                    part.astype(np.float16 if half else np.float32, copy=False),
                )
        start = end


def built(extractor: keras.Model | Callable[[], keras.Model]) -> keras.Model:
    """The extractor itself, or the model its function builds."""
    return extractor if isinstance(extractor, keras.Model) else extractor()


def uncached_features(
    extractor: keras.Model | Callable[[], keras.Model],
    paths: Sequence[str],
    image_size: int,
    batch_size: int = inference.INFERENCE_BATCH_SIZE,
    views: Sequence[str] | None = None,
    devices: Sequence[str] = (),
    float16_rows: Sequence[bool] | None = None,
) -> tuple[np.ndarray, CacheReport]:
    """Compute every image's features (of its view, see `cached_features`), without the cache.

    The rows of `float16_rows` are rounded to float16 as the store would keep them, so that
    the cache never changes the model.
    """
    paths = list(paths)
    views = list(views) if views is not None else [""] * len(paths)
    extractor = built(extractor)
    report = CacheReport(len(paths), 0, len(paths), key=describable_key(extractor, image_size))
    print(f"features: {len(paths):,} images, {len(paths):,} computed (feature cache off)")
    rows_of: dict[tuple[str, str], list[int]] = {}  # a file in a view may be several rows
    for row, path_view in enumerate(zip(paths, views, strict=True)):
        rows_of.setdefault(path_view, []).append(row)
    features, run = None, inference.backbone_runner(extractor, image_size, devices)
    for files, group, rows in _passes_by_file(
        ((path, view, view, rows) for (path, view), rows in rows_of.items()),
        list(dict.fromkeys(views)),
    ):
        part = inference.predict_batches(run, files, image_size, batch_size, view=list(group))
        if features is None:
            features = np.empty((len(paths), *part.shape[1:]), dtype=part.dtype)
        for computed, same in zip(part, rows, strict=True):
            features[same] = computed
    if float16_rows is not None:
        rounded = np.flatnonzero(float16_rows)
        features[rounded] = features[rounded].astype(np.float16)
    return features, report
