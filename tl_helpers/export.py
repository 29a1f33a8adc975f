"""Atomic writes: a failed or interrupted run leaves the previous model and results intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

keras = tf.keras

SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.json"


def write_json(path: str | Path, data: object) -> Path:
    """Write JSON to a temporary sibling, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def replace_directory(new: Path, final: Path) -> None:
    """Move the complete directory `new` to `final`, replacing what was there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        _remove(old)


def save_model(model: keras.Model, output_dir: str | Path, labels: dict[str, int]) -> Path:
    """Save `model` as a Keras SavedModel at output_dir/saved_model, labels.json beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / SAVED_MODEL_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{SAVED_MODEL_DIR}.tmp-", dir=output_dir))
    try:
        model.save(tmp, save_format="tf", include_optimizer=False)
        replace_directory(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    write_json(output_dir / LABELS_FILE, dict(sorted(labels.items(), key=lambda kv: kv[1])))
    return final


def _remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
