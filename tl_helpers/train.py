"""One backbone pass to cached features, then head training with Keras `fit`.

The base is frozen, so its output for an image never changes during training: running it
once per image and training the softmax head on the pooled features gives the same model as
running the whole network every epoch, at a fraction of the cost. The head trains from a
tf.data pipeline that gathers each batch from the feature store's memory-mapped shards
(`feature_dataset`), so memory does not grow with the number of images.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers import augment, cache, finetune, startup
from tl_helpers.dataset import ImageFolder, without_autotune
from tl_helpers.distribute import Distribution, lost_worker_errors
from tl_helpers.inference import INFERENCE_BATCH_SIZE
from tl_helpers.model import build_head, feature_extractor, set_head_weights
from tl_helpers.quantize import LowerQuantization
from tl_helpers.store import DEFAULT_MAX_BYTES, ConcatenatedRows, FeatureStore, StoredFeatures

keras = tf.keras

VALIDATION_BATCH_SIZE = 512
FINE_TUNE_VALIDATION_BATCH_SIZE = 256  # rows of activations are 5x wider than pooled features
# Bytes of features read from the store per Python call while training: about 410 rows of
# pooled MobileNetV2 features (1,280 float32), 83 of activations at block_12_add. Larger
# blocks saved no time and raised the peak memory (docs/performance.md).
GATHER_BYTES = 2 * 2**20


@dataclass
class Features:
    """Pooled base features of the training and validation images, with their class ids.

    `train` and `validation` are arrays, or StoredFeatures (rows memory-mapped from the feature
    store) when the feature cache is on: index them, or use `store.feature_batches`.
    """

    train: np.ndarray | StoredFeatures
    train_ids: np.ndarray
    validation: np.ndarray | StoredFeatures | None = None
    validation_ids: np.ndarray | None = None
    model_key: str | None = None  # cache.model_key of the extractor that computed them
    validation_paths: tuple[str, ...] = ()  # the validation images, in the order of the rows
    # With fine-tuning: the base's cut, and the activations at the cut (flattened) of the same
    # rows as `train` and `validation`, from which the pooled features above were computed.
    # `train_activations` may go on with rows that only fine-tuning trains on (the views of
    # augment.FINE_TUNE_VIEWS, through the float or the quantized lower part), whose class ids
    # `fine_tune_ids` then holds; None: the same rows as `train`, `train_ids`.
    split: finetune.Split | None = None
    train_activations: np.ndarray | StoredFeatures | ConcatenatedRows | None = None
    validation_activations: np.ndarray | StoredFeatures | None = None
    train_is_stale: bool = False  # fine-tuned since `train` was pooled (see train_head)
    fine_tune_ids: np.ndarray | None = None

    def head_activations(self) -> np.ndarray | StoredFeatures:
        """The activations of the rows of `train` (without the fine-tuning-only rows)."""
        return self.train_activations[: len(self.train_ids)]


def setup_tensorflow(seed: int = 0) -> None:
    """Seed Python, NumPy and TensorFlow, and use every core for TensorFlow's ops."""
    keras.utils.set_random_seed(seed)
    cores = os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(min(cores, 4))
    except RuntimeError:
        pass  # TensorFlow already initialised (a re-run in the same kernel): keep its settings
    print(f"TensorFlow {tf.__version__}, {cores} CPU cores, seed {seed}")


def compute_features(
    classifier: keras.Model,
    train: ImageFolder,
    validation: ImageFolder | None,
    image_size: int,
    batch_size: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    cache_max_gb: float = DEFAULT_MAX_BYTES / 1e9,
    distribution: Distribution | None = None,
    views: Sequence[str] = (),
    fine_tune_cut: str | None = None,
    fine_tune_noise: bool = False,
    quantization: LowerQuantization | None = None,
) -> Features:
    """Run the preprocessing + frozen base + pooling once per image, reusing cached features.

    With `cache_dir`, features of unchanged images come from the feature store there (see
    tl_helpers.cache and tl_helpers.store; `cache_max_gb` is its size budget) and only new or
    changed images go through the base; None: no cache, the features are held in memory.
    `distribution` (tl_helpers.distribute) gives the devices the base runs on and, when
    `batch_size` is None, its batch size; with several workers and a store, each worker first
    computes its share into the store and waits for the others (`shared_features`).
    `views` names augmented views (tl_helpers.augment): the training rows are every training
    image as it is, then every training image in each view, in that order; validation images
    are only ever used as they are.
    `fine_tune_cut` (None: no fine-tuning) names the layer where the base is cut for
    `fine_tune` ("": the default cut, tl_helpers.finetune): the store then keeps the activations
    at the cut, and the pooled features come from them through the rest of the base.
    With `fine_tune_noise` and a cut, fine-tuning also trains on the view "noise" of every
    training image (augment.FINE_TUNE_VIEWS): its activations follow the head's rows in
    `train_activations`; the head never sees them.
    With a `quantization` (tl_helpers.quantize.lower_quantization) and a cut, those rows go
    through the lower part as the quantized model will compute it (quantized by MCT as the
    quantization step will quantize it), kept in the store under a key of their own
    (`_quantized_rows`); without `fine_tune_noise`, the images as they are do.
    """
    split = None if fine_tune_cut is None else finetune.split_for(classifier, fine_tune_cut)
    extractor = split.lower if split else feature_extractor(classifier)
    has_validation = validation is not None and len(validation) > 0
    quantized = split is not None and quantization is not None
    noise = split is not None and fine_tune_noise
    tune_views = augment.FINE_TUNE_VIEWS if noise and not quantized else ()
    all_views = ("", *views, *tune_views)
    train_paths = list(train.paths) * len(all_views)
    train_views = [view for view in all_views for _ in train.paths]
    validation_paths = list(validation.paths) if has_validation else []
    paths = train_paths + validation_paths
    row_views = train_views + [""] * len(validation_paths)
    head_rows = len(train.paths) * (1 + len(views))
    if views:
        print(f"training views: as is, {', '.join(views)} ({head_rows:,} training rows)")
    if tune_views:
        print(
            f"fine-tuning also on the view {', '.join(tune_views)} of each training image "
            f"({len(train_paths):,} fine-tuning rows)"
        )
    devices = distribution.devices if distribution else ()
    if batch_size is None:
        batch_size = distribution.backbone_batch_size if distribution else INFERENCE_BATCH_SIZE
    max_bytes = int(cache_max_gb * 1e9)
    # Training rows only train: float16 (in the store, and rounded alike without it).
    # Validation rows stay float32, as computed, so that evaluation from them reproduces the
    # saved model.
    float16_rows = [True] * len(train_paths) + [False] * len(validation_paths)
    # Each image's tensors of a few hundred KB come from glibc's heap during the passes
    # (startup.pass_allocations).
    with startup.pass_allocations():
        if cache_dir is None:
            vectors, report = cache.uncached_features(
                extractor, paths, image_size, batch_size, row_views, devices, float16_rows
            )
        else:
            vectors, report = shared_features(
                extractor,
                paths,
                row_views,
                float16_rows,
                image_size,
                cache_dir,
                batch_size,
                max_bytes,
                devices,
                distribution,
            )
    count = len(train_paths)
    class_ids = np.asarray(train.class_ids, dtype=np.int32)
    train_ids = np.tile(class_ids, 1 + len(views))
    if split is None:
        features = Features(vectors[:count], train_ids, model_key=report.key)
    else:
        features = Features(
            finetune.pooled_features(split, vectors[:head_rows]),
            train_ids,
            model_key=cache.describable_key(feature_extractor(classifier), image_size),
            split=split,
            train_activations=vectors[:count],
        )
        if tune_views:
            features.fine_tune_ids = np.tile(class_ids, len(all_views))
        if quantized:
            print(
                f"fine-tuning also on each training image{' with noise' if noise else ''} "
                "through the base below the cut as the quantized model computes it "
                f"({count + len(train.paths):,} fine-tuning rows)"
            )
            view = augment.FINE_TUNE_VIEWS[0] if noise else ""
            rows = _quantized_rows(
                split,
                quantization,
                train,
                view,
                image_size,
                None if cache_dir is None else report.key,
                cache_dir,
                batch_size,
                max_bytes,
                devices,
                distribution,
            )
            features.train_activations = ConcatenatedRows(vectors[:count], rows)
            features.fine_tune_ids = np.tile(class_ids, len(all_views) + 1)
        if has_validation:
            features.validation_activations = vectors[count:]
    if has_validation:
        features.validation = (
            vectors[count:] if split is None else finetune.pooled_features(split, vectors[count:])
        )
        features.validation_ids = np.asarray(validation.class_ids, dtype=np.int32)
        features.validation_paths = tuple(map(str, validation.paths))
    return features


def _quantized_rows(
    split: finetune.Split,
    quantization: LowerQuantization,
    train: ImageFolder,
    view: str,
    image_size: int,
    lower_key: str | None,
    cache_dir: str | Path | None,
    batch_size: int,
    max_bytes: int,
    devices: Sequence[str],
    distribution: Distribution | None = None,
) -> np.ndarray | StoredFeatures:
    """The activations at the cut of every training image (in `view`) through the lower part
    quantized by MCT (`quantization`), from the store when it has them: MCT runs only if one is
    missing.

    Their store key is made from the float lower part's key (`lower_key`, the key of the float
    rows' pass; None: no store) and how the quantization step will quantize
    (`LowerQuantization.key`), so a re-run neither quantizes nor computes again. With several
    workers and a store, each computes its share first, as for the float rows (`shared_features`).
    """

    @functools.cache
    def quantized_lower() -> keras.Model:
        print(
            f"Quantizing the base below the cut with MCT, as the quantization step will "
            f"({len(quantization.paths)} calibration images, TPC {quantization.tpc_version})"
        )
        return quantization.quantize(split.lower)

    paths = list(map(str, train.paths))
    views = [view] * len(paths)
    float16_rows = [True] * len(paths)
    shared = cache_dir is not None and distribution is not None and distribution.num_workers > 1
    key = lower_key
    if key is not None:
        try:
            digests = FeatureStore(cache_dir, max_bytes).digests(quantization.paths)
        except OSError:
            key = None  # an unreadable store: cached_features has said so for the float rows
    if key is None:
        if shared:
            distribution.barrier()  # the other workers wait for every share
        rows, _ = cache.uncached_features(
            quantized_lower,
            paths,
            image_size,
            batch_size,
            views=views,
            devices=devices,
            float16_rows=float16_rows,
        )
        return rows
    rows, _ = shared_features(
        quantized_lower,
        paths,
        views,
        float16_rows,
        image_size,
        cache_dir,
        batch_size,
        max_bytes,
        devices,
        distribution,
        key=quantization.key(key, digests),
    )
    return rows


def shared_features(
    extractor: keras.Model | Callable[[], keras.Model],
    paths: list[str],
    views: list[str],
    float16_rows: list[bool],
    image_size: int,
    cache_dir: str | Path,
    batch_size: int,
    max_bytes: int,
    devices: Sequence[str],
    distribution: Distribution | None,
    key: str | None = None,
) -> tuple[StoredFeatures | np.ndarray, cache.CacheReport]:
    """`cache.cached_features` of every row (`views`: each row's augmented view;
    `float16_rows`, `key` and a function as `extractor`: see there).

    With several workers, each first computes its share into the shared store and waits for
    the others: worker k of n takes files k, k + n, k + 2n, ... with all their rows, so each
    file is decoded by one worker, once. A store a worker cannot see (not a shared folder)
    costs time, not correctness: the lookup that follows computes what it lacks.
    """
    if distribution is not None and distribution.num_workers > 1:
        files = set(distribution.share(list(dict.fromkeys(paths))))
        rows = [row for row, path in enumerate(paths) if path in files]
        print(
            f"Worker {distribution.worker_index} of {distribution.num_workers}: "
            f"its share, {len(rows):,} of {len(paths):,} images and views"
        )
        if rows:
            cache.cached_features(
                extractor,
                [paths[row] for row in rows],
                image_size,
                cache_dir,
                batch_size,
                max_bytes,
                views=[views[row] for row in rows],
                devices=distribution.devices,
                float16_rows=[float16_rows[row] for row in rows],
                key=key,
            )
        print("Waiting for the other workers' shares ...")
        distribution.barrier()
    return cache.cached_features(
        extractor,
        paths,
        image_size,
        cache_dir,
        batch_size,
        max_bytes,
        views=views,
        devices=devices,
        float16_rows=float16_rows,
        key=key,
    )


def check_batch_size(batch_size: int, num_images: int) -> int:
    """Clamp a batch_size larger than the training set, and say so."""
    if batch_size > num_images:
        print(
            f"Warning: batch_size {batch_size} is larger than the training set ({num_images} "
            f"images); using {num_images}. Set a smaller batch_size in configuration.json."
        )
        return num_images
    return batch_size


def train_head(
    classifier: keras.Model,
    features: Features,
    epochs: int,
    batch_size: int,
    learning_rate: float = 0.001,
    verbose: int = 2,
    callbacks: list | None = None,
    distribution: Distribution | None = None,
    label_smoothing: float = 0.0,
) -> keras.callbacks.History:
    """Train the softmax head on the stored features and copy it into the classifier.

    With a `distribution`, the head is built and compiled in its strategy's scope, so Keras
    splits each batch of `batch_size` (all replicas together) between the replicas and keeps
    their weights in step; with several workers, every worker must call this together.
    `label_smoothing`: see `cross_entropy`.
    """
    num_classes = classifier.output_shape[-1]
    if features.train_is_stale:  # the head cell run again after fine-tuning: pool anew
        features.train = finetune.pooled_features(features.split, features.head_activations())
        features.train_is_stale = False
    batch_size = check_batch_size(batch_size, len(features.train))
    with lost_worker_errors(distribution, "training the head"):
        head = _compiled(
            lambda: build_head(features.train.shape[1], num_classes),
            learning_rate,
            # A head step takes microseconds, so Keras's per-step Python overhead dominated: run
            # a whole epoch's steps in one call (same batches, same updates, same model).
            math.ceil(len(features.train) / batch_size),
            distribution,
            label_smoothing,
        )
        history = _fit(
            head,
            (features.train, features.train_ids),
            (features.validation, features.validation_ids),
            batch_size,
            VALIDATION_BATCH_SIZE,
            epochs,
            verbose,
            callbacks,
            distribution,
        )
    set_head_weights(classifier, head)
    return history


def fine_tune(
    classifier: keras.Model,
    features: Features,
    epochs: int,
    batch_size: int,
    learning_rate: float = 3e-4,
    verbose: int = 2,
    callbacks: list | None = None,
    distribution: Distribution | None = None,
    decay: bool = True,
    label_smoothing: float = 0.0,
) -> keras.callbacks.History | None:
    """Train the base above the cut together with the (already trained) head, from the
    activations at the cut, and copy the result into the classifier.

    The Keras transfer-learning guide's second step: a low learning rate, BatchNormalization
    frozen in inference mode, the layers below the cut untouched. With `decay`, the learning
    rate falls from `learning_rate` to 0 along a cosine over the epochs, so the last epoch's
    weights, the ones kept, come from small steps. Returns None (and changes nothing) when
    `features` has no cut (fine-tuning off, or no cut for this base). The validation rows'
    pooled features are then recomputed with the fine-tuned layers, so that evaluation from
    features sees the saved model's own base. `label_smoothing`: see `cross_entropy`.
    """
    split = features.split
    if split is None or epochs == 0:
        return None
    rows = len(features.train_activations)
    ids = features.train_ids if features.fine_tune_ids is None else features.fine_tune_ids
    batch_size = check_batch_size(batch_size, rows)
    # Each step's tensors of a few MB come from glibc's heap (startup.heap_allocations), which
    # is given back once the training copy is freed.
    with startup.heap_allocations():
        with lost_worker_errors(distribution, "fine-tuning"):
            steps = epochs * math.ceil(rows / batch_size)
            rate = learning_rate
            if decay:
                rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
            model = _compiled(
                lambda: finetune.fine_tune_model(classifier, split),
                rate,
                finetune.steps_per_execution(rows, batch_size),
                distribution,
                label_smoothing,
            )
            trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            print(
                f"Fine-tuning {trainable:,} weights above {split.cut} and the head on {rows:,} "
                f"training rows, {epochs} epochs, learning rate {learning_rate:g}"
                + (" falling to 0 (cosine)" if decay else "")
            )
            history = _fit(
                model,
                (features.train_activations, ids),
                (features.validation_activations, features.validation_ids),
                batch_size,
                FINE_TUNE_VALIDATION_BATCH_SIZE,
                epochs,
                verbose,
                callbacks,
                distribution,
            )
        finetune.copy_back(classifier, split, model)
        # The training copy (layers, optimizer state, traced steps) is held in reference cycles:
        # collect it now, so that the steps after this one reuse its memory.
        del model
        gc.collect()
    features.train_is_stale = True
    if features.validation_activations is not None:
        features.validation = finetune.pooled_features(split, features.validation_activations)
        features.model_key = cache.describable_key(
            feature_extractor(classifier), classifier.input_shape[1]
        )
    return history


def _compiled(
    build,
    learning_rate,
    steps_per_execution: int,
    distribution: Distribution | None,
    label_smoothing: float = 0.0,
) -> keras.Model:
    """`build()`'s model, built and compiled (Adam at `learning_rate`, a rate or a schedule;
    cross-entropy, see `cross_entropy`) in the distribution's strategy scope, so Keras splits
    each batch between the replicas and keeps their weights in step."""
    strategy = distribution.strategy if distribution else tf.distribute.get_strategy()
    with strategy.scope():
        model = build()
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=cross_entropy(model.output_shape[-1], label_smoothing),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
    return model


def cross_entropy(num_outputs: int, label_smoothing: float = 0.0):
    """The training loss for class ids and softmax outputs: cross-entropy against a target of
    `1 - label_smoothing` on the true class plus `label_smoothing / num_outputs` on every output.

    Label smoothing keeps every logit within a few units of the highest (without it, those of
    unlikely classes are pushed ever lower), which gives the 8-bit quantized model's logits a
    finer grid and fewer tied top scores; off by default, as it cost Top-1 on clothing10
    (docs/quantization.md, "Label smoothing").
    """
    if not label_smoothing:
        return "sparse_categorical_crossentropy"

    def smoothed_cross_entropy(class_ids: tf.Tensor, probabilities: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(tf.reshape(class_ids, [-1]), tf.int32)
        targets = tf.one_hot(ids, num_outputs, dtype=probabilities.dtype)
        return keras.losses.categorical_crossentropy(
            targets, probabilities, label_smoothing=label_smoothing
        )

    return smoothed_cross_entropy


def _fit(
    model: keras.Model,
    train: tuple,
    validation: tuple,
    batch_size: int,
    validation_batch_size: int,
    epochs: int,
    verbose: int,
    callbacks: list | None,
    distribution: Distribution | None,
) -> keras.callbacks.History:
    """Keras `fit` of a compiled model on (rows, class ids) read from the store in batches;
    `validation` rows None: no validation."""
    # Workers shard the batches of one dataset, so they must shuffle alike: the chief's seed.
    seed = np.random.randint(2**31)
    if distribution is not None:
        seed = distribution.same_on_all_workers(seed)
    training = feature_dataset(*train, batch_size, shuffle=True, seed=seed)
    validation_data = None
    if validation[0] is not None:
        # Validation only measures, so its batch size does not change the model (the metrics
        # are means over images); large batches take fewer steps.
        validation_data = feature_dataset(
            *validation, max(batch_size, validation_batch_size), shuffle=False
        )
    history = model.fit(
        training,
        epochs=epochs,
        validation_data=validation_data,
        verbose=verbose,
        callbacks=callbacks,
    )
    # The notebook keeps the History for its figures; the model it names (a training copy with
    # its optimizer state and traced steps) can then be freed.
    history.model = None
    for callback in callbacks or ():
        callback.model = None
    return history


def gather_rows(dim: int) -> int:
    """Rows of `dim` float32 numbers that make GATHER_BYTES (at least one)."""
    return max(1, GATHER_BYTES // (4 * dim))


def feature_dataset(
    values: np.ndarray | StoredFeatures,
    class_ids: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
) -> tf.data.Dataset:
    """A tf.data source of (features, class ids) batches, read from `values` in blocks.

    With `shuffle`, each epoch visits the rows in a new random order, drawn from `seed`, or by
    default from NumPy's global generator when the dataset is made (seeded by
    `setup_tensorflow`), so a seeded run repeats. Under a multi-worker strategy every worker
    makes the same batches and takes its part of each (data sharding: the source is no files).
    Rows are gathered GATHER_BYTES at a time (whole batches, in the epoch's order) and cut into
    batches by tf.data: the same batches as gathering each batch alone, without a Python call
    per batch. Memory holds the order (8 bytes per image) and a few blocks, never all features.
    """
    count, dim = len(values), values.shape[1]
    class_ids = np.asarray(class_ids, dtype=np.int32)
    rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)
    block = batch_size * max(1, gather_rows(dim) // batch_size)
    order = np.arange(count)

    def gather(number: np.int64) -> tuple[np.ndarray, np.ndarray]:
        nonlocal order
        if number == 0 and shuffle:  # blocks are read in order: block 0 starts an epoch
            order = rng.permutation(count)
        rows = order[number * block : (number + 1) * block]
        return np.asarray(values[rows], dtype=np.float32), class_ids[rows]

    def read(number):
        features, ids = tf.numpy_function(gather, [number], (tf.float32, tf.int32))
        return tf.ensure_shape(features, (None, dim)), tf.ensure_shape(ids, (None,))

    blocks = tf.data.Dataset.range(math.ceil(count / block)).map(read)
    steps = math.ceil(count / batch_size)
    batches = blocks.rebatch(batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = batches.apply(tf.data.experimental.assert_cardinality(steps)).with_options(options)
    return without_autotune(batches.prefetch(2))
