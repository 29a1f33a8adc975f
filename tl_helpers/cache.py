"""The feature cache: pooled base features kept on disk, so re-runs skip the base for old images.

An entry is keyed by everything that decides a feature, and nothing else:

- the image's content (SHA-256 of the file's bytes, not its path or modification time: an edit
  is seen even when the time is kept, as `rsync -t` or `cp -p` do, and moving a photo to
  another class folder or copying the dataset elsewhere costs nothing);
- the feature extractor (preprocessing + base model after `remove_top_layer_if_needed()` +
  pooling): its architecture with layer names normalised, and every weight array's bytes;
- `input_tensor_size`, the TensorFlow version, and the image loading code (the source of
  `dataset.load_images`, `inference.predict_images` and `inference.predict_batches`, plus
  `PIPELINE_VERSION`).

The model part of the key names one file, `<cache dir>/features-<key>.npz`, holding the images'
digests, their float32 features (stored as computed: a cache hit gives the very same numbers)
and a SHA-256 checksum over both. Each run rewrites the file with exactly its own images (new
images added, removed ones dropped) through a temporary file and `os.replace`, so an interrupted
or failed run leaves the previous file whole. A file that fails any check is reported in one
warning line, ignored and rebuilt. Only the `MAX_FILES` most recently used files are kept.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl_helpers import dataset, inference
from tl_helpers.errors import TLError

keras = tf.keras

# Bump when something that changes features, but not the code hashed below, changes.
PIPELINE_VERSION = 1
FORMAT_VERSION = 1
FILE_PREFIX = "features-"
FILE_SUFFIX = ".npz"
MAX_FILES = 4  # feature files kept (one per model / input size / pipeline), most recent first
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a killed run
DIGEST_BYTES = 32
PROGRESS_AFTER_SECONDS = 2.0  # reading the images shows a bar only when it takes longer


@dataclass
class CacheReport:
    """What one feature pass took from the cache and what it computed."""

    images: int
    from_cache: int
    computed: int
    path: Path | None = None  # the feature file, None when the cache is off or not written
    file_bytes: int = 0
    key: str | None = None  # the extractor's model_key; None when it cannot be described

    def summary(self) -> str:
        """One line, e.g. "features: 4,317 images, 4,297 from cache, 20 computed"."""
        return (
            f"features: {self.images:,} images, {self.from_cache:,} from cache, "
            f"{self.computed:,} computed"
        )

    def size_line(self) -> str:
        """Where the cache is and how big it is, per image."""
        per_image = self.file_bytes / max(self.images, 1) / 1024
        return (
            f"feature cache: {self.path} ({self.file_bytes / 1e6:.1f} MB, "
            f"{per_image:.1f} KB per image)"
        )


class _Damaged(Exception):
    """A feature file that must not be used; the message says why."""


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


def _code_digest() -> str:
    """SHA-256 of the code that turns a file into the extractor's input (changes invalidate)."""
    digest = hashlib.sha256()
    for function in (dataset.load_images, inference.predict_images, inference.predict_batches):
        try:
            digest.update(inspect.getsource(function).encode())
        except (OSError, TypeError):  # installed without sources: PIPELINE_VERSION must do
            digest.update(function.__qualname__.encode())
    return digest.hexdigest()


def image_digests(paths: Sequence[str]) -> list[bytes]:
    """SHA-256 of each file's bytes (about 0.2 s for 4,300 small JPEGs; a bar if it is slow)."""
    digests = []
    start, progress = time.monotonic(), None
    for done, path in enumerate(paths, start=1):
        try:
            with open(path, "rb") as file:
                digests.append(hashlib.file_digest(file, "sha256").digest())
        except OSError as err:
            raise TLError(
                f"Cannot read {path} ({err.strerror}): it was moved or deleted after the "
                "dataset was read. Run the dataset cell again."
            ) from None
        if progress is None and time.monotonic() - start > PROGRESS_AFTER_SECONDS:
            print("Reading the images to compare them with the feature cache")
            progress = keras.utils.Progbar(len(paths), interval=1.0, unit_name="image")
        if progress is not None:
            progress.update(done)
    return digests


# --------------------------------------------------------------------------- the file


def feature_file(cache_dir: str | Path, key: str) -> Path:
    """The file that holds the features of one model key."""
    return Path(cache_dir) / f"{FILE_PREFIX}{key[:32]}{FILE_SUFFIX}"


def read_features(path: Path, key: str) -> tuple[dict[bytes, int], np.ndarray] | None:
    """Return ({image digest: row}, features) from a feature file; None when missing or damaged.

    A damaged file (truncated, half-written, wrong checksum, another key) is reported in one
    warning line and never used.
    """
    if not path.exists():
        return None
    try:
        digests, features = _load_checked(path, key)
    except _Damaged as err:
        print(f"Warning: feature cache file {path} is damaged ({err}); rebuilding it.")
        return None
    rows = {digest.tobytes(): row for row, digest in enumerate(digests)}
    return rows, features


def _load_checked(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a feature file and check its format, key, shapes and checksum."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta_text = str(data["meta"])
            digests = data["digests"]
            features = data["features"]
            checksum = str(data["checksum"])
    except Exception as err:  # zipfile, numpy and OS errors all mean: not a usable file
        raise _Damaged(f"unreadable: {type(err).__name__}: {err}") from None
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError:
        raise _Damaged("unreadable description") from None
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        raise _Damaged("written for another format or model")
    if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != DIGEST_BYTES:
        raise _Damaged("bad image digests")
    if features.dtype != np.float32 or features.ndim != 2 or len(features) != len(digests):
        raise _Damaged("bad feature array")
    if checksum != _checksum(meta_text, digests, features):
        raise _Damaged("checksum mismatch")
    return digests, features


def _checksum(meta_text: str, digests: np.ndarray, features: np.ndarray) -> str:
    """SHA-256 over the description, the digests and the features."""
    digest = hashlib.sha256(meta_text.encode())
    digest.update(_buffer(digests))
    digest.update(_buffer(features))  # no copy: features can be tens of MB
    return digest.hexdigest()


def _buffer(array: np.ndarray) -> memoryview:
    """The array's bytes, without copying a C-contiguous array."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def write_features(path: Path, key: str, digests: Sequence[bytes], features: np.ndarray) -> None:
    """Write a feature file through a temporary file and os.replace: whole or not at all."""
    digest_array = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    features = np.ascontiguousarray(features, dtype=np.float32)
    meta_text = json.dumps(
        {"format": FORMAT_VERSION, "key": key, "images": len(features), "size": features.shape[1]}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(
                file,
                meta=np.array(meta_text),
                digests=digest_array,
                features=features,
                checksum=np.array(_checksum(meta_text, digest_array, features)),
            )
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as the model
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """Delete temporary files left by runs that were killed before they could clean up."""
    now = time.time()
    for tmp in cache_dir.glob(f".{FILE_PREFIX}*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass  # another run removed it, or it is not ours to remove


def prune(cache_dir: Path, current: Path, keep: int = MAX_FILES) -> list[Path]:
    """Delete all but `current` and the `keep` - 1 most recently used feature files."""
    others = [p for p in cache_dir.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}") if p != current]
    others.sort(key=_last_used, reverse=True)
    removed = []
    for old in others[keep - 1 :]:
        try:
            old.unlink()
            removed.append(old)
        except OSError:
            pass
    return removed


def _last_used(path: Path) -> float:
    """A feature file's modification time (0 when another run just removed it)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- the pass


def cached_features(
    extractor: keras.Model,
    paths: Sequence[str],
    image_size: int,
    cache_dir: str | Path,
    batch_size: int = inference.INFERENCE_BATCH_SIZE,
) -> tuple[np.ndarray, CacheReport]:
    """Features of `paths` (in order): cached ones read, the others computed and stored."""
    paths = list(paths)
    if not paths:
        raise ValueError("cached_features: no images")
    key = describable_key(extractor, image_size)
    if key is None:
        print("Note: feature cache not used: the base model cannot be described.")
        return uncached_features(extractor, paths, image_size, batch_size)
    path = feature_file(cache_dir, key)
    digests = image_digests(paths)
    stored = read_features(path, key)
    rows, old = stored if stored is not None else ({}, None)
    unique = list(dict.fromkeys(digests))
    missing = [digest for digest in unique if digest not in rows]
    from_cache = sum(digest in rows for digest in digests)
    report = CacheReport(len(paths), from_cache, len(paths) - from_cache, key=key)
    print(report.summary())
    new = None
    if missing:
        first_path = {}
        for digest, image in zip(digests, paths, strict=True):
            first_path.setdefault(digest, image)
        new = inference.predict_images(
            extractor, [first_path[d] for d in missing], image_size, batch_size
        )
    table = _merge(unique, rows, old, missing, new)
    if missing or stored is None or len(unique) != len(rows):
        report.path = _store(path, key, unique, table)
    else:
        report.path = _touch(path)
    if report.path is not None:
        report.file_bytes = report.path.stat().st_size
        print(report.size_line())
    if len(unique) == len(digests):  # no duplicate images: the table is in the paths' order
        return table, report
    position = {digest: row for row, digest in enumerate(unique)}
    return table[[position[digest] for digest in digests]], report


def _merge(
    unique: list[bytes],
    rows: dict[bytes, int],
    old: np.ndarray | None,
    missing: list[bytes],
    new: np.ndarray | None,
) -> np.ndarray:
    """One float32 row per unique digest: from the old file or from the new computation."""
    if len(missing) == len(unique):  # nothing from the cache: the new rows are the table
        return np.ascontiguousarray(new, dtype=np.float32)
    new_rows = {digest: row for row, digest in enumerate(missing)}
    size = (new if new is not None else old).shape[1]
    table = np.empty((len(unique), size), dtype=np.float32)
    cached = [row for row, digest in enumerate(unique) if digest not in new_rows]
    if cached:
        table[cached] = old[[rows[unique[row]] for row in cached]]
    if missing:
        table[[row for row, digest in enumerate(unique) if digest in new_rows]] = new
    return table


def _store(path: Path, key: str, digests: list[bytes], table: np.ndarray) -> Path | None:
    """Write the feature file and prune old ones; a failure costs a warning, not the run."""
    try:
        write_features(path, key, digests, table)
        prune(path.parent, path)
    except OSError as err:
        print(f"Warning: could not write the feature cache {path} ({err}); continuing without it.")
        return None
    return path


def _touch(path: Path) -> Path:
    """Mark a feature file as just used, so pruning keeps it."""
    try:
        os.utime(path)
    except OSError:
        pass
    return path


def uncached_features(
    extractor: keras.Model,
    paths: Sequence[str],
    image_size: int,
    batch_size: int = inference.INFERENCE_BATCH_SIZE,
) -> tuple[np.ndarray, CacheReport]:
    """Compute every image's features, without the cache (the opt-out)."""
    paths = list(paths)
    report = CacheReport(len(paths), 0, len(paths), key=describable_key(extractor, image_size))
    print(f"features: {len(paths):,} images, {len(paths):,} computed (feature cache off)")
    features = inference.predict_images(extractor, paths, image_size, batch_size)
    return features, report
