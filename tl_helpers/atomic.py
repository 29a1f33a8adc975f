"""Crash-safe outputs: files and folders are replaced so that a kill at any instant leaves the
old or the new complete version under the final name, and the next run tidies up after it.

A folder `final` is written as a temporary sibling `.<name>.tmp-<pid>-<random>` and swapped in
by `replace_directory`. On Linux the swap is one atomic exchange of the two names; elsewhere
(or on a file system without it) the old folder is first moved aside to `.<name>.old-<pid>`.
`recover_directory` (run by `replace_directory` and by `recover_leftovers`) restores an old
folder whose run was killed between the two moves, and removes what killed runs left behind.

No TensorFlow here: tests kill child processes at each step, which must start quickly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Tests set this to a function of the step's name that kills the process, to check that every
# step leaves a state the next run can recover from.
step_hook: Callable[[str], None] | None = None

# `.<name>.tmp-<pid>-<random>` (temporary_sibling), `.<name>.tmp-<random>` (a bare mkdtemp),
# `.<name>.old-<pid>` (replace_directory's fallback).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)(?:-|$))?")


def write_json(path: str | Path, data: object) -> Path:
    """Write JSON to a temporary sibling, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def temporary_sibling(final: Path) -> Path:
    """A new empty folder `.<name>.tmp-<pid>-<random>` beside `final`, to write the new version in.

    The process id in the name tells `recover_directory` whether its writer is still running.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))


def replace_directory(new: Path, final: Path) -> None:
    """Move the complete directory `new` to `final`, replacing what was there.

    Leftovers of killed runs beside `final` are dealt with first (see `recover_directory`).
    """
    recover_directory(final, keep=new)
    _step("start")
    if not final.exists():
        os.replace(new, final)
        _step("moved new in")
        return
    if _exchange(new, final):  # `new` now holds the old version
        _step("exchanged")
        remove(new)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    remove(old)
    os.replace(final, old)
    _step("moved old aside")
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    _step("moved new in")
    remove(old)


def recover_directory(final: Path, keep: Path | None = None) -> str | None:
    """Undo what a killed `replace_directory` of `final` left; print and return what was done.

    When `final` is missing and an old version was moved aside, the old version is put back
    (the new one may be incomplete). Temporary and old siblings of runs no longer alive are
    removed; `keep` (the caller's own new folder) and those of running processes stay.
    """
    restored = None
    old_versions = _leftovers(final, "old", keep)
    if not final.exists() and not final.is_symlink() and old_versions:
        restored = max(old_versions, key=lambda p: p.stat().st_mtime)
        os.replace(restored, final)
        old_versions.remove(restored)
    removed = old_versions + _leftovers(final, "tmp", keep)
    for path in removed:
        remove(path)
    if restored is None and not removed:
        return None
    message = _recovery_message(final, restored, removed)
    print(message)
    return message


def recover_leftovers(folder: str | Path) -> list[str]:
    """Run `recover_directory` for every folder in `folder` that a killed run left traces of."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted({m["name"] for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))})
    messages = [recover_directory(folder / name) for name in names]
    return [m for m in messages if m]


def recover_copy(source: Path, copy: Path) -> bool:
    """Make `copy` hold the bytes of `source` again when a killed run left it missing or stale."""
    if not source.is_file():
        return False
    if copy.is_file() and copy.read_bytes() == source.read_bytes():
        return False
    write_bytes(copy, source.read_bytes())
    print(f"Restored {copy} from {source} (an earlier run stopped before writing it).")
    return True


def replace_directory_with_copy(new: Path, final: Path, inner: str, copy: Path) -> None:
    """`replace_directory`, with the file `copy` at every instant equal to `final / inner` or
    missing, never another version's.

    `copy` (e.g. labels.json beside the model folder) is removed before the swap when it would
    change, and written after it. The next run restores a missing copy from the folder
    (`recover_copy`).
    """
    content = (new / inner).read_bytes()
    if copy.exists() and copy.read_bytes() != content:
        copy.unlink()
        _step("removed copy")
    replace_directory(new, final)
    write_bytes(copy, content)
    _step("wrote copy")


def write_bytes(path: Path, content: bytes) -> None:
    """Write a file through a temporary sibling, so it is whole or absent."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: str | Path) -> None:
    """Remove a file or a folder tree if it is there (a symlink itself, never its target)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _leftovers(final: Path, kind: str, keep: Path | None) -> list[Path]:
    """`.<name>.<kind>-*` siblings of `final` whose writer is gone, except `keep`."""
    if not final.parent.is_dir():
        return []
    found = []
    for path in final.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != final.name or match["kind"] != kind:
            continue
        if keep is not None and path.name == keep.name:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another process is writing it now
        found.append(path)
    return sorted(found)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs (names without an id count as left behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recovery_message(final: Path, restored: Path | None, removed: list[Path]) -> str:
    """One line saying what `recover_directory` did."""
    parts = []
    if restored is not None:
        parts.append(f"restored the previous {final.name} from {restored.name}")
    if removed:
        parts.append(f"removed {', '.join(p.name for p in removed)}")
    return f"An earlier run was stopped while replacing {final}: {' and '.join(parts)}."


def _step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux 3.15+): swap two names in one step
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot (then nothing moved)."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2()
    if _renameat2 is False:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _load_renameat2():
    """The C library's renameat2, or False where there is none (not Linux, old glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function
