"""The feature store: features of many images and models on disk, grown by appending shards.

Layout of a store folder (the `feature_cache_dir`)::

    .lock                       taken (fcntl.flock) while an index is read, merged and replaced
    files.npz                   the stat index: (path, size, mtime, ctime, inode, device) -> digest
    features-<model key>/       one folder per model key (see tl_helpers.cache.model_key)
      index.npz                 digest -> (shard, row), and each shard's rows and SHA-256
      shard-<random>.npy        float32 or float16 [rows, features], at most `shard_rows`
                                rows, never changed

Rules:

- **Append only.** `add` writes new shards (temporary file, fsync, `os.replace`), then, holding
  the lock, re-reads the index, adds the digests it does not hold yet and replaces the index
  with `os.replace`. A run killed at any point leaves the previous index whole; shards that no
  index names are deleted once they are STALE_SECONDS old. Two runs at once each add their
  own shards and merge into the newest index, so neither loses the other's entries.
- **Fixed-size shards.** A pass writes full shards of `shard_rows(features per image)` images
  as the base runs (SHARD_ROWS of pooled features, fewer of wider activations, so that a
  shard and the chunk of the pass that fills it stay within SHARD_BYTES), and one partly
  filled shard at its end; once a model has COMPACT_AFTER partly filled shards,
  `compact` (run after each pass) merges them into full ones.
- **Two precisions.** A shard holds float32 or float16 rows (its index records which). The
  caller chooses per row: tl_helpers.cache stores training rows, which only train, as float16
  (half the bytes) and validation rows, which evaluation must reproduce exactly, as float32.
  Readers always get float32.
- **Read by memory map.** Features are gathered from read-only memory maps of the shards, a
  batch at a time (`StoredFeatures`), and each map's pages are released after the gather; the
  store is never loaded whole. Readers take no lock: an index is replaced, never changed.
- **Checked before use.** Every shard a run reads is checked against the size and SHA-256 its
  index records, once per run (the shards a run writes are hashed as they are written). A
  damaged shard (truncated, changed, missing) is reported in one warning line, dropped from
  its index, and its images are computed again.
- **Change detection without reading.** A file whose size, modification time, status-change
  time, inode and device are those recorded in the stat index gets its recorded digest without
  being opened. Other files are hashed (SHA-256, in a thread pool). A file changed less than
  RACY_SECONDS before it was looked at is hashed but not recorded, so that a second change
  within the file system's clock tick is never missed. The status-change time is in the key
  because no program can set it: an edit that restores the old modification time
  (`cp -p`, `rsync -t`, `touch -d`) still changes it.
- **What is dropped, and when.** Nothing is dropped because another dataset or another run
  wrote it. After each run, whole model folders are deleted, least recently used first
  (the index's modification time, refreshed by every run that uses it), while there are more
  than KEEP_MODELS of them or the store is larger than its size budget (DEFAULT_MAX_BYTES, or
  the `max_bytes` given); the model in use is never dropped. Stat-index entries not seen for
  STAT_KEEP_SECONDS are dropped when the stat index is next written.

`python -m tl_helpers.store show <folder>` lists the store; `prune <folder> --max-gb G` prunes.
This module does not import TensorFlow, so the command starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tl_helpers.errors import TLError

FORMAT_VERSION = 1
STORED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
DIGEST_BYTES = 32
SHARD_ROWS = 4096  # images per shard at most: 20 MB of 1,280 float32 features, 10 MB of float16
SHARD_BYTES = SHARD_ROWS * 1280 * 4  # wider features: fewer rows, so a shard stays within this
MODEL_PREFIX = "features-"
INDEX_NAME = "index.npz"
STAT_INDEX_NAME = "files.npz"
LOCK_NAME = ".lock"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".npy"
TEMP_SUFFIX = ".tmp"
KEEP_MODELS = 4  # model folders kept, most recently used first
COMPACT_AFTER = 8  # partly filled shards of a model that make `compact` merge them
DEFAULT_MAX_BYTES = 20 * 10**9  # a store's size budget (GB: 10**9 bytes), model in use excepted
STALE_SECONDS = 3600  # an unnamed shard or temporary file this old was left by a killed run
RACY_SECONDS = 2.0  # files changed this recently are hashed but not recorded in the stat index
STAT_KEEP_SECONDS = 30 * 86400  # stat-index entries not seen this long are dropped
STAT_REFRESH_SECONDS = 86400  # rewrite the stat index this often even when nothing changed
HASH_THREADS = min(16, 4 * (os.cpu_count() or 1))  # hashlib releases the GIL: threads overlap
HASH_CHUNK = 1024  # files handed to the hashing threads at a time (memory does not grow with N)


class _Damaged(Exception):
    """A file of the store that must not be used; the message says why."""


@dataclass
class StatIndex:
    """What the stat index records per path: (size, mtime_ns, ctime_ns, inode, device), the
    digest those gave, and when a run last saw the path (seconds). Row i is paths[i]."""

    paths: list[str]
    stats: np.ndarray  # int64 [n, 5]
    digests: np.ndarray  # uint8 [n, 32]
    seen: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        self.seen = np.asarray(self.seen, dtype=np.int64)
        self.row = {path: i for i, path in enumerate(self.paths)}

    @classmethod
    def empty(cls) -> StatIndex:
        no_rows = np.zeros((0, 5), np.int64)
        return cls([], no_rows, np.zeros((0, DIGEST_BYTES), np.uint8), np.zeros(0, np.int64))


# --------------------------------------------------------------------------- small helpers


def _file_digest(path: str) -> bytes:
    """SHA-256 of a file's bytes (read in chunks: memory does not grow with the file)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


def _write_atomically(path: Path, write) -> None:
    """Call write(binary file) on a temporary file beside `path`, fsync it, os.replace it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; features are as readable as the model
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest_array(digests: Sequence[bytes]) -> np.ndarray:
    """Digests as a [n, 32] uint8 array."""
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)


def _digest_keys(digests: np.ndarray) -> np.ndarray:
    """[n, 32] uint8 digests as n fixed-width byte strings, which NumPy sorts and compares."""
    return np.ascontiguousarray(digests, dtype=np.uint8).view(f"S{DIGEST_BYTES}").reshape(-1)


def _age(path: Path, now: float) -> float:
    """Seconds since `path` was last modified (0 when it is already gone)."""
    modified = _mtime(path)
    return now - modified if modified else 0.0


def _mtime(path: Path) -> float:
    """A file's modification time; 0 when it is gone (another run replaced or removed it)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _file_size(path: Path) -> int:
    """A plain file's size; 0 for anything else, or when it is already gone."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


# --------------------------------------------------------------------------- one model's index


@dataclass
class Shard:
    """One shard file as its index records it."""

    name: str
    rows: int
    size: int  # bytes
    sha256: str
    dtype: str = "float32"  # or "float16" (see `FeatureStore.add`)


@dataclass
class ModelIndex:
    """The entries of one model key: digest -> (shard number, row)."""

    key: str
    dim: int
    shards: list[Shard]
    digests: np.ndarray  # [n, 32] uint8
    shard_of: np.ndarray  # [n] int32, into shards
    row_of: np.ndarray  # [n] int32

    @classmethod
    def empty(cls, key: str, dim: int = 0) -> ModelIndex:
        """An index with no entries."""
        none = np.zeros(0, dtype=np.int32)
        return cls(key, dim, [], np.zeros((0, DIGEST_BYTES), np.uint8), none, none.copy())

    def entries(self, digests: np.ndarray) -> np.ndarray:
        """The entry number of each digest ([n, 32] uint8), -1 where the index lacks it.

        Sorted arrays, not a dict: at 100,000 entries a dict of digests takes tens of MB.
        """
        table = _digest_keys(self.digests)
        order = np.argsort(table, kind="stable")
        table = table[order]
        wanted = _digest_keys(digests)
        if not len(table):
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(table, wanted), len(table) - 1)
        return np.where(table[at] == wanted, order[at], -1).astype(np.int64)

    def without_shards(self, names: set[str]) -> ModelIndex:
        """This index less the shards named (and their entries), shard numbers renumbered."""
        keep = [i for i, shard in enumerate(self.shards) if shard.name not in names]
        renumber = np.full(len(self.shards) + 1, -1, dtype=np.int32)
        renumber[keep] = np.arange(len(keep), dtype=np.int32)
        new_shard = renumber[self.shard_of] if len(self.shard_of) else self.shard_of
        rows = new_shard >= 0
        return ModelIndex(
            self.key,
            self.dim,
            [self.shards[i] for i in keep],
            self.digests[rows],
            new_shard[rows],
            self.row_of[rows],
        )

    def bytes_on_disk(self) -> int:
        """The shards' bytes."""
        return sum(shard.size for shard in self.shards)


def read_index(path: Path, key: str) -> ModelIndex:
    """Load and check an index file (raises _Damaged when it cannot be trusted)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            digests, shard_of, row_of = data["digests"], data["shard_of"], data["row_of"]
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            raise _Damaged("written for another format or model")
        shards = [Shard(**shard) for shard in meta["shards"]]
        dim = int(meta["dim"])
    except _Damaged:
        raise
    except Exception as err:  # zipfile (CRC), numpy, JSON and OS errors: not a usable index
        raise _Damaged(f"unreadable: {type(err).__name__}: {err}") from None
    n = len(digests)
    if digests.shape != (n, DIGEST_BYTES) or shard_of.shape != (n,) or row_of.shape != (n,):
        raise _Damaged("bad entry arrays")
    if n and (shard_of.min() < 0 or shard_of.max() >= len(shards)):
        raise _Damaged("entries name shards it does not list")
    rows = np.array([shard.rows for shard in shards], dtype=np.int64)
    if n and (row_of.min() < 0 or (row_of >= rows[shard_of]).any()):
        raise _Damaged("entries point past the end of their shards")
    return ModelIndex(key, dim, shards, digests, shard_of, row_of)


def write_index(path: Path, index: ModelIndex) -> None:
    """Replace an index file atomically."""
    meta = {
        "format": FORMAT_VERSION,
        "key": index.key,
        "dim": index.dim,
        "shards": [vars(shard) for shard in index.shards],
    }

    def write(file):
        np.savez(
            file,
            meta=np.array(json.dumps(meta)),
            digests=index.digests,
            shard_of=index.shard_of,
            row_of=index.row_of,
        )

    _write_atomically(path, write)


def shard_rows(dim: int) -> int:
    """Images per shard of `dim` features each: SHARD_ROWS, or fewer when SHARD_ROWS rows of
    float32 would exceed SHARD_BYTES (the activations at a fine-tuning cut: 6,272 numbers per
    image for MobileNetV2 at `block_12_add`), which bounds the memory of a pass's chunk."""
    return max(1, min(SHARD_ROWS, SHARD_BYTES // (4 * max(1, dim))))


# --------------------------------------------------------------------------- stored features


class ShardMaps:
    """Read-only memory maps of a model's shards, opened once, their pages released after use.

    Pages a process reads through a memory map count in its resident memory until the kernel
    needs them back, and a read maps the pages around it too (fault-around, readahead): a few
    thousand random rows map most of a shard. After each gather the maps it read are told to
    drop their pages (`madvise(MADV_DONTNEED)`: the data stays in the page cache, nothing is
    lost), so training over a large store keeps the process small.
    """

    def __init__(self, folder: Path, names: list[str]):
        self.folder = folder
        self.names = names
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def array(self, shard: int) -> np.ndarray:
        """The float32 or float16 [rows, dim] array of one shard."""
        if shard not in self._maps:
            self._maps[shard] = _map_npy(self.folder / self.names[shard])
        return self._maps[shard][1]

    def release(self, shard: int) -> None:
        """Drop the pages of one shard's map from this process (they stay in the page cache)."""
        if shard in self._maps and hasattr(mmap, "MADV_DONTNEED"):
            self._maps[shard][0].madvise(mmap.MADV_DONTNEED)


def _map_npy(path: Path) -> tuple[mmap.mmap, np.ndarray]:
    """Map a 2-D float32 or float16 .npy file read-only; the array is a view of the map."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        if len(shape) != 2 or fortran or dtype not in STORED_DTYPES:
            raise ValueError(f"{path} is not a float32 or float16 [rows, features] array")
        handle = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        count = shape[0] * shape[1]
        array = np.frombuffer(handle, dtype=dtype, count=count, offset=file.tell())
    return handle, array.reshape(shape)


class _Rows:
    """A read-only float32 [n, dim] array-like: `len`, `shape`, `x[int]`, `x[int array]` and
    `np.asarray(x)` from `take`; `x[start:stop]` from `_slice`."""

    dtype = np.dtype(np.float32)
    ndim = 2
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self._slice(item)
        if isinstance(item, int | np.integer):
            return self.take(np.array([item]))[0]
        return self.take(np.asarray(item))

    def __array__(self, dtype=None, copy=None):
        array = self.take(np.arange(len(self)))
        return array if dtype is None else array.astype(dtype)


class StoredFeatures(_Rows):
    """The features of a list of images, gathered from memory-mapped shards on demand.

    Behaves like a read-only float32 [n, dim] array (float16 entries are widened) for what
    training and evaluation need:
    `len`, `shape`, `x[start:stop]` (another StoredFeatures), `x[int array]` and `np.asarray(x)`
    (arrays); `tl_helpers.train.feature_dataset` makes it a tf.data source.
    """

    def __init__(self, maps: ShardMaps, shard_of, row_of, dim: int):
        self.maps = maps
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.row_of = np.asarray(row_of, dtype=np.int64)
        self.dim = dim

    def __len__(self) -> int:
        return len(self.shard_of)

    def _slice(self, item: slice) -> StoredFeatures:
        return StoredFeatures(self.maps, self.shard_of[item], self.row_of[item], self.dim)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The features of entries `rows`, in that order, as a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard_of, row_of = self.shard_of[rows], self.row_of[rows]
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self.maps.array(int(shard))[row_of[mask]]
            self.maps.release(int(shard))
        return out

    def open(self) -> None:
        """Map every shard these rows are in now, so that a prune by another run later (which
        deletes files, not mappings) cannot take them away."""
        for shard in np.unique(self.shard_of):
            self.maps.array(int(shard))


class ConcatenatedRows(_Rows):
    """The rows of several arrays or StoredFeatures of one width, one after the other.

    Read like a StoredFeatures (`len`, `shape`, slices, integer-array indexing,
    `np.asarray`), without copying the parts: fine-tuning's rows from two extractors.
    """

    def __init__(self, *parts) -> None:
        widths = {part.shape[1] for part in parts}
        if len(widths) != 1:
            raise ValueError(f"ConcatenatedRows: parts of different widths {sorted(widths)}")
        self.parts = parts
        self.dim = widths.pop()
        self.starts = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _slice(self, item: slice):
        rows = np.arange(len(self))[item]
        if len(rows) and (np.diff(rows) == 1).all():
            part = int(np.searchsorted(self.starts, rows[0], side="right")) - 1
            if rows[-1] < self.starts[part + 1]:  # within one part: a view of it
                offset = self.starts[part]
                return self.parts[part][rows[0] - offset : rows[-1] + 1 - offset]
        return self.take(rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows`, in that order, as a new float32 array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(part_of):
            mask = part_of == part
            out[mask] = np.asarray(self.parts[part][rows[mask] - self.starts[part]])
        return out


def feature_batches(values, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of an array or a StoredFeatures, in order."""
    for start in range(0, len(values), batch_size):
        yield np.asarray(values[start : start + batch_size], dtype=np.float32)


# --------------------------------------------------------------------------- the store


@dataclass
class Located:
    """Where a run's images are in the store, and which are not there."""

    features: StoredFeatures | None  # the found images, in the order asked (None: none found)
    found: np.ndarray  # [n] bool, per digest asked
    missing: list[bytes]  # digests not in the store, unique, in first-asked order


class FeatureStore:
    """A folder of features keyed by (model key, image digest); see the module docstring."""

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._verified: set[tuple[str, str]] = set()  # (key, shard) checked in this run
        self._lock_depth = 0  # the lock is re-entrant within one FeatureStore

    # ------------------------------------------------------------------ paths and the lock

    def model_folder(self, key: str) -> Path:
        """The folder of one model key's shards and index."""
        return self.folder / f"{MODEL_PREFIX}{key[:32]}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (other processes' writers wait; readers never do)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ change detection

    def digests(self, paths: Sequence[str]) -> list[bytes]:
        """SHA-256 of each file's content; files unchanged since they were last seen not read.

        Per file, memory holds a path, a row of five integers and a digest: the stat index is
        kept as arrays, and files are hashed a chunk at a time.
        """
        paths = [str(path) for path in paths]
        known = self._read_stat_index()
        stats = np.empty((len(paths), 5), dtype=np.int64)
        for i, path in enumerate(paths):
            stats[i] = _stat(path)
        rows = np.fromiter((known.row.get(path, -1) for path in paths), np.int64, len(paths))
        same = rows >= 0
        same[same] = (known.stats[rows[same]] == stats[same]).all(axis=1)
        digests = np.zeros((len(paths), DIGEST_BYTES), dtype=np.uint8)
        digests[same] = known.digests[rows[same]]
        todo = np.flatnonzero(~same)
        if len(todo) > 1000:
            print(f"Reading {len(todo):,} new or changed images to compare them with the store")
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            for start in range(0, len(todo), HASH_CHUNK):
                chunk = todo[start : start + HASH_CHUNK]
                hashed = b"".join(pool.map(_hash, [paths[i] for i in chunk]))
                digests[chunk] = np.frombuffer(hashed, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        now_ns = time.time_ns()
        settled = todo[now_ns - stats[todo, 1:3].max(axis=1) > RACY_SECONDS * 1e9]
        updates = StatIndex(
            [paths[i] for i in settled], stats[settled], digests[settled], np.zeros(len(settled))
        )
        last_seen = known.seen[rows[rows >= 0]]
        oldest_seen = int(last_seen.min()) if len(last_seen) else None
        self._update_stat_index(updates, seen=paths, oldest_seen=oldest_seen)
        return [row.tobytes() for row in digests]

    def _read_stat_index(self) -> StatIndex:
        """The stat index (empty when missing or unreadable)."""
        try:
            with np.load(self.folder / STAT_INDEX_NAME, allow_pickle=False) as data:
                if int(data["format"]) != FORMAT_VERSION:
                    return StatIndex.empty()
                names = bytes(data["paths"]).split(b"\0") if len(data["paths"]) else []
                stats, digests, seen = data["stats"], data["digests"], data["seen"]
        except Exception:  # missing, or damaged: every file is hashed once more, nothing lost
            return StatIndex.empty()
        if not (len(names) == len(stats) == len(digests) == len(seen)):
            return StatIndex.empty()
        paths = [name.decode("utf-8", "surrogateescape") for name in names]
        return StatIndex(paths, stats.reshape(-1, 5), digests.reshape(-1, DIGEST_BYTES), seen)

    def _update_stat_index(
        self, updates: StatIndex, seen: list[str], oldest_seen: int | None
    ) -> None:
        """Record new digests and refresh this run's entries, keeping other runs' entries.

        `oldest_seen`: when the least recently seen of `seen` was last seen by a run (None:
        none of them was known); nothing is written when no digest is new and that was recent.
        """
        now = int(time.time())
        if oldest_seen is None:
            oldest_seen = now
        if not updates.paths and now - oldest_seen < STAT_REFRESH_SECONDS:
            return
        try:
            with self.locked():
                index = self._read_stat_index()  # the newest, with other runs' entries
                seen_rows = [index.row[path] for path in seen if path in index.row]
                index.seen[seen_rows] = now
                changed = [index.row.get(path, -1) for path in updates.paths]
                old = np.array([row for row in changed if row >= 0], dtype=np.int64)
                fresh = np.array([i for i, row in enumerate(changed) if row >= 0], dtype=np.int64)
                index.stats[old], index.digests[old] = updates.stats[fresh], updates.digests[fresh]
                index.seen[old] = now
                added = list({updates.paths[i]: i for i, r in enumerate(changed) if r < 0}.values())
                paths = index.paths + [updates.paths[i] for i in added]
                stats = np.concatenate([index.stats, updates.stats[added]])
                digests = np.concatenate([index.digests, updates.digests[added]])
                seen_times = np.concatenate([index.seen, np.full(len(added), now, np.int64)])
                keep = np.flatnonzero(now - seen_times < STAT_KEEP_SECONDS)
                self._write_stat_index(
                    [paths[i] for i in keep], stats[keep], digests[keep], seen_times[keep]
                )
        except OSError:
            pass  # a store that cannot be written still answers; the files are hashed next time

    def _write_stat_index(
        self, paths: list[str], stats: np.ndarray, digests: np.ndarray, seen: np.ndarray
    ) -> None:
        """Replace the stat index atomically."""
        names = b"\0".join(p.encode("utf-8", "surrogateescape") for p in paths)

        def write(file):
            np.savez(
                file,
                format=np.array(FORMAT_VERSION),
                paths=np.frombuffer(names, dtype=np.uint8),
                stats=stats,
                digests=digests,
                seen=seen,
            )

        _write_atomically(self.folder / STAT_INDEX_NAME, write)

    # ------------------------------------------------------------------ entries

    def index(self, key: str) -> ModelIndex:
        """The newest index of a model key (empty when there is none, or it is damaged)."""
        path = self.model_folder(key) / INDEX_NAME
        if not path.exists():
            return ModelIndex.empty(key)
        try:
            return read_index(path, key)
        except _Damaged as err:
            print(f"Warning: feature store index {path} is damaged ({err}); rebuilding it.")
        with self.locked():
            if path.exists():
                try:
                    return read_index(path, key)  # another run replaced it meanwhile
                except _Damaged:
                    path.unlink()  # its shards go as leftovers (see `prune`)
            return ModelIndex.empty(key)

    def lookup(self, key: str, digests: Sequence[bytes]) -> Located:
        """Find images in the store, checking once per run every shard they are read from.

        Damaged shards are reported in one warning line and dropped from the index; their
        images come back as missing.
        """
        index = self.index(key)
        asked = _digest_array(digests)
        entry = index.entries(asked)
        needed = {int(s) for s in np.unique(index.shard_of[entry[entry >= 0]])}
        damaged = self._check_shards(index, needed)
        if damaged:
            self._report_damage(key, index, damaged)
            self._drop_shards(key, set(damaged))
            index = self.index(key)
            entry = index.entries(asked)
        found = entry >= 0
        missing = list(dict.fromkeys(d for d, hit in zip(digests, found, strict=True) if not hit))
        features = None
        if found.any():
            features = StoredFeatures(
                ShardMaps(self.model_folder(key), [shard.name for shard in index.shards]),
                index.shard_of[entry[found]],
                index.row_of[entry[found]],
                index.dim,
            )
            features.open()
        return Located(features, found, missing)

    def _check_shards(self, index: ModelIndex, numbers: set[int]) -> dict[str, str]:
        """{shard name: what is wrong} for the shards (not yet checked in this run) that fail."""
        folder = self.model_folder(index.key)
        todo = [index.shards[n] for n in sorted(numbers)]
        todo = [s for s in todo if (index.key, s.name) not in self._verified]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            problems = list(pool.map(lambda s: _shard_problem(folder / s.name, s), todo))
        damaged = {}
        for shard, problem in zip(todo, problems, strict=True):
            if problem is None:
                self._verified.add((index.key, shard.name))
            else:
                damaged[shard.name] = problem
        return damaged

    def _report_damage(self, key: str, index: ModelIndex, damaged: dict[str, str]) -> None:
        """One warning line for all the damaged shards a lookup found."""
        numbers = {i for i, s in enumerate(index.shards) if s.name in damaged}
        images = int(np.isin(index.shard_of, list(numbers)).sum())
        first = next(iter(damaged))
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        print(
            f"Warning: feature store {self.model_folder(key)}: {len(damaged)} damaged shard(s) "
            f"({first}: {damaged[first]}{more}); their {images:,} images are computed again."
        )

    def _drop_shards(self, key: str, names: set[str]) -> None:
        """Remove shards from a model's index and delete their files."""
        folder = self.model_folder(key)
        with self.locked():
            index = self.index(key)
            write_index(folder / INDEX_NAME, index.without_shards(names))
            for name in names:
                (folder / name).unlink(missing_ok=True)

    def add(self, key: str, digests: Sequence[bytes], features: np.ndarray) -> None:
        """Append features ([n, dim], one row per digest) as new shards.

        float16 features are stored as float16 (half the bytes; what training rows use, see
        tl_helpers.cache), any other type as float32.
        """
        dtype = np.float16 if features.dtype == np.float16 else np.float32
        features = np.ascontiguousarray(features, dtype=dtype)
        if features.ndim != 2 or len(features) != len(digests):
            raise ValueError("add: one feature row per digest")
        folder = self.model_folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        rows_per_shard = shard_rows(features.shape[1])
        try:
            for start in range(0, len(digests), rows_per_shard):
                part = features[start : start + rows_per_shard]
                written.append((start, self._write_shard(folder, part)))
            with self.locked():
                self._merge_into_index(key, list(digests), features.shape[1], written)
        finally:
            for _, shard in written:  # shards the index did not take (or a failed merge)
                if (key, shard.name) not in self._verified:
                    (folder / shard.name).unlink(missing_ok=True)

    def _write_shard(self, folder: Path, rows: np.ndarray) -> Shard:
        """Write one shard file; return its index record."""
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
        _write_atomically(folder / name, lambda file: np.save(file, rows, allow_pickle=False))
        path = folder / name
        size, sha256 = path.stat().st_size, _file_digest(str(path)).hex()
        return Shard(name, len(rows), size, sha256, rows.dtype.name)

    def _merge_into_index(
        self, key: str, digests: list[bytes], dim: int, written: list[tuple[int, Shard]]
    ) -> None:
        """Add the new shards' rows whose digests the newest index lacks (lock held)."""
        index = self.index(key)
        if index.dim and index.dim != dim:
            raise ValueError(f"add: {dim} features per image, the store has {index.dim}")
        added = _digest_array(digests)
        # New to the index, and the first of its digest in this add (a repeat is added once).
        take = index.entries(added) < 0
        first = np.zeros(len(added), dtype=bool)
        first[np.unique(_digest_keys(added), return_index=True)[1]] = True
        take &= first
        shards, new_digests, shard_of, row_of = list(index.shards), [], [], []
        for start, shard in written:
            rows = np.flatnonzero(take[start : start + shard.rows]).astype(np.int32)
            if not len(rows):
                continue  # another run added them all first: the shard is deleted by `add`
            new_digests.append(added[start + rows])
            shard_of.append(np.full(len(rows), len(shards), dtype=np.int32))
            row_of.append(rows)
            shards.append(shard)
            self._verified.add((key, shard.name))
        if not new_digests:
            return
        merged = ModelIndex(
            key,
            dim,
            shards,
            np.concatenate([index.digests, *new_digests]),
            np.concatenate([index.shard_of, *shard_of]),
            np.concatenate([index.row_of, *row_of]),
        )
        write_index(self.model_folder(key) / INDEX_NAME, merged)

    def compact(self, key: str) -> int:
        """Merge a model's partly filled shards into full ones once there are COMPACT_AFTER.

        Runs that add a few images each leave a small shard each; merged, a model has at most
        COMPACT_AFTER shards that are not full per stored type (float32, float16). Rows no
        entry points to (an image two runs computed at once) are left out. Returns the number
        of shards merged (0: none).
        """
        merged = 0
        for dtype in STORED_DTYPES:
            merged += self._compact(key, dtype.name)
        return merged

    def _compact(self, key: str, dtype: str) -> int:
        """`compact` for the shards of one type."""
        with self.locked():
            index = self.index(key)
            rows_per_shard = shard_rows(index.dim)
            small = [
                i
                for i, shard in enumerate(index.shards)
                if shard.rows < rows_per_shard and shard.dtype == dtype
            ]
            if len(small) < COMPACT_AFTER:
                return 0
            folder = self.model_folder(key)
            damaged = self._check_shards(index, set(small))
            if damaged:  # left for the run that reads them to report and rebuild
                return 0
            moved = np.flatnonzero(np.isin(index.shard_of, small))
            rows = StoredFeatures(
                ShardMaps(folder, [shard.name for shard in index.shards]),
                index.shard_of[moved],
                index.row_of[moved],
                index.dim,
            )
            kept = index.without_shards({index.shards[i].name for i in small})
            written: list[Shard] = []
            try:
                for start in range(0, len(moved), rows_per_shard):
                    part = np.arange(start, min(start + rows_per_shard, len(moved)))
                    written.append(self._write_shard(folder, rows.take(part).astype(dtype)))
                    self._verified.add((key, written[-1].name))
                merged = ModelIndex(
                    key,
                    index.dim,
                    kept.shards + written,
                    np.concatenate([kept.digests, index.digests[moved]]),
                    np.concatenate(
                        [
                            kept.shard_of,
                            np.repeat(
                                np.arange(len(written), dtype=np.int32) + len(kept.shards),
                                [shard.rows for shard in written],
                            ),
                        ]
                    ),
                    np.concatenate(
                        [kept.row_of, np.arange(len(moved), dtype=np.int32) % rows_per_shard]
                    ),
                )
                write_index(folder / INDEX_NAME, merged)
            except BaseException:
                for shard in written:
                    (folder / shard.name).unlink(missing_ok=True)
                raise
            for i in small:  # readers that mapped them keep their maps
                (folder / index.shards[i].name).unlink(missing_ok=True)
            return len(small)

    # ------------------------------------------------------------------ housekeeping

    def touch(self, key: str) -> None:
        """Mark a model key as just used, so pruning keeps it."""
        with contextlib.suppress(OSError):
            os.utime(self.model_folder(key) / INDEX_NAME)

    def models(self) -> list[tuple[Path, float, int]]:
        """(folder, last used, bytes) of each model folder, most recently used first."""
        found = []
        for folder in self.folder.glob(f"{MODEL_PREFIX}*"):
            if not folder.is_dir():
                continue
            used = _mtime(folder / INDEX_NAME)  # 0 when there is none (yet)
            try:  # other runs add files meanwhile, and a prune may delete the folder
                size = sum(_file_size(f) for f in folder.iterdir())
            except FileNotFoundError:
                continue
            found.append((folder, used, size))
        return sorted(found, key=lambda item: item[1], reverse=True)

    def prune(
        self,
        current: str | None = None,
        max_bytes: int | None = None,
        keep_models: int = KEEP_MODELS,
    ) -> list[Path]:
        """Delete least recently used model folders beyond the budget; return those deleted.

        The folder of `current` (a model key) is never deleted. Unnamed shards and temporary
        files older than STALE_SECONDS (left by killed runs) are deleted too.
        """
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        keep = self.model_folder(current) if current is not None else None
        removed = []
        with self.locked():
            models = self.models()
            models.sort(key=lambda model: model[0] != keep)  # the current one first, then by use
            total, kept, now = 0, 0, time.time()
            for folder, used, size in models:
                if not used and _age(folder, now) < STALE_SECONDS:
                    continue  # another run is adding this model's first shards
                if folder == keep or (kept < keep_models and total + size <= max_bytes):
                    total += size
                    kept += 1
                    continue
                gone = folder.with_name(f".deleting-{uuid.uuid4().hex}")
                with contextlib.suppress(OSError):
                    folder.rename(gone)  # disappears at once for readers of the store
                    shutil.rmtree(gone, ignore_errors=True)
                    removed.append(folder)
            self._remove_leftovers()
        return removed

    def _remove_leftovers(self) -> None:
        """Delete stale temporaries and shards no index names (lock held)."""
        now = time.time()
        for tmp in self.folder.glob(f"**/.*{TEMP_SUFFIX}"):
            if _age(tmp, now) > STALE_SECONDS:
                tmp.unlink(missing_ok=True)
        for folder in self.folder.glob(f"{MODEL_PREFIX}*"):
            key = folder.name[len(MODEL_PREFIX) :]
            named = self._shard_names(folder, key)
            if named is None:
                continue
            for shard in folder.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"):
                if shard.name not in named and _age(shard, now) > STALE_SECONDS:
                    shard.unlink(missing_ok=True)

    @staticmethod
    def _shard_names(folder: Path, key_prefix: str) -> set[str] | None:
        """The shard names a model folder's index lists (None when it cannot be read)."""
        try:
            with np.load(folder / INDEX_NAME, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
        except FileNotFoundError:
            return set()
        except Exception:
            return None  # leave a folder whose index cannot be read to the run that uses it
        if not str(meta.get("key", "")).startswith(key_prefix):
            return None
        return {shard["name"] for shard in meta["shards"]}

    def describe(self) -> str:
        """A text table of the store: each model's images, shards, size and last use."""
        lines = [f"feature store {self.folder}"]
        total = 0
        for folder, used, size in self.models():
            total += size
            names = self._shard_names(folder, folder.name[len(MODEL_PREFIX) :])
            try:
                with np.load(folder / INDEX_NAME, allow_pickle=False) as data:
                    images = len(data["row_of"])
            except Exception:
                images = 0
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(used)) if used else "-"
            shards = len(names) if names is not None else "?"
            lines.append(
                f"  {folder.name}: {images:,} images, {shards} shards, "
                f"{size / 1e6:.1f} MB, last used {when}"
            )
        stat_index = self.folder / STAT_INDEX_NAME
        files = len(self._read_stat_index().paths)
        if stat_index.exists():
            total += stat_index.stat().st_size
        lines.append(f"  {STAT_INDEX_NAME}: {files:,} files known")
        lines.append(f"  total {total / 1e6:.1f} MB (budget {self.max_bytes / 1e9:.1f} GB)")
        return "\n".join(lines)


def _stat(path: str) -> tuple[int, int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode, device) of a file; a TLError naming it if it is gone."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise TLError(
            f"Cannot read {path} ({err.strerror}): it was moved or deleted after the "
            "dataset was read. Run the dataset cell again."
        ) from None
    # 63 bits of inode and device, so that the five fit an int64 row of the stat index.
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino & _INT63, st.st_dev & _INT63)


_INT63 = 2**63 - 1


def _hash(path: str) -> bytes:
    """`_file_digest`, with a TLError naming the file when it cannot be read."""
    try:
        return _file_digest(path)
    except OSError as err:
        raise TLError(
            f"Cannot read {path} ({err.strerror}): it was moved or deleted after the "
            "dataset was read. Run the dataset cell again."
        ) from None


def _shard_problem(path: Path, shard: Shard) -> str | None:
    """What is wrong with a shard file (None: its size and SHA-256 are those recorded)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != shard.size:
        return f"{size:,} bytes, expected {shard.size:,}: truncated or overwritten"
    try:
        if _file_digest(str(path)).hex() != shard.sha256:
            return "checksum mismatch"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return None


# --------------------------------------------------------------------------- the command


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tl_helpers.store show|prune <folder>`: list or prune a feature store."""
    parser = argparse.ArgumentParser(prog="python -m tl_helpers.store", description=__doc__)
    parser.add_argument("action", choices=["show", "prune"])
    parser.add_argument("folder", type=Path, help="the store folder (feature_cache_dir)")
    parser.add_argument("--max-gb", type=float, default=DEFAULT_MAX_BYTES / 1e9)
    parser.add_argument("--keep-models", type=int, default=KEEP_MODELS)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"{args.folder} is not a folder: give the feature_cache_dir of a run.")
        return 2
    store = FeatureStore(args.folder, int(args.max_gb * 1e9))
    if args.action == "prune":
        for folder in store.prune(keep_models=args.keep_models):
            print(f"deleted {folder}")
    print(store.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
