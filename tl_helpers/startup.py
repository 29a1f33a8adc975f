"""Import TensorFlow without the lines its C++ side writes to stderr on start-up.

On a machine without a GPU, `import tensorflow` writes about ten log lines to stderr, three of
them marked `E` ("Unable to register cuDNN factory", ...). None of them is a problem, yet
JupyterLab shows them as a pink box under the very first cell, which reads like a failure.
`TF_CPP_MIN_LOG_LEVEL` cannot hide only those: the `E` lines need level 3, which would also
hide every real error TensorFlow logs later. So the import runs with the process's stderr
(file descriptor 2) sent to a temporary file, and afterwards every line of it that is not one
of the known start-up notices (`STARTUP_NOTICES`) is written to stderr as usual. TensorFlow's
log level is left as it is: what it logs after the import shows.

Before the import, glibc's mmap threshold is fixed (`fix_mmap_threshold`), so that the
process's memory does not creep up over a long run. While they run, the base's passes raise
it and the trim threshold a little (`pass_allocations`) and fine-tuning much more
(`heap_allocations`): mapping each of their tensors on its own, or trimming the heap after
each step, cost the passes a quarter of their speed and fine-tuning half.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

# What TensorFlow 2.15 logs on import on a machine without a GPU (or without TensorRT).
STARTUP_NOTICES = re.compile(
    "|".join(
        [
            r"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory",
            r"Could not find cuda drivers on your machine, GPU will not be used",
            r"TF-TRT Warning: Could not find TensorRT",
            r"oneDNN custom operations are on\.",
            r"This TensorFlow binary is optimized to use available CPU instructions",
            r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate",
        ]
    )
)


# glibc gives memory back to the system at once only for blocks it mapped on their own (larger
# than its mmap threshold); smaller blocks come from the heap, where a free leaves holes that are
# reused only by blocks that fit them. glibc raises the threshold each time a mapped block is
# freed (up to 32 MB), so TensorFlow's tensors of a few MB soon come from the heap, which then
# fragments: a long backbone pass crept up by 20-55 MB per 20,000 images, and fine-tuning left
# about 150 MB behind. Kept at glibc's starting value, 128 KiB, they stay mapped
# (docs/performance.md, "Where the kernel's memory goes").
MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
# glibc's largest dynamic threshold on 64-bit systems: `heap_allocations` uses it, with the
# trim threshold glibc's dynamic rule would pair with it (twice as large).
HEAP_THRESHOLD = 32 * 2**20
# glibc's default trim threshold: the heap's top is given back once this much of it is free.
# Setting the mmap threshold stops glibc from adjusting it, so it stays at this value.
TRIM_THRESHOLD = 128 * 1024
# During the base's passes (`pass_allocations`): one image's tensors (602 KB at 224 px) come
# from the heap, a batch's (9.6 MB for 16 images) is still mapped on its own. Over 100,000
# photos the pass's memory stayed as flat as with the fixed threshold (docs/performance.md,
# "The passes at 4 MiB").
PASS_THRESHOLD = 4 * 2**20
_threshold_fixed = False  # set by fix_mmap_threshold


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at MMAP_THRESHOLD for the rest of the process; True when set.

    Nothing on other C libraries (macOS, musl) or when `MALLOC_MMAP_THRESHOLD_` is set in the
    environment (the user's own choice).
    """
    global _threshold_fixed
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _threshold_fixed = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return _threshold_fixed


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """Within: blocks up to HEAP_THRESHOLD come from the heap, which keeps up to twice that
    free at its top. After: the fixed thresholds again, and the heap's free pages given back
    to the system (`malloc_trim`).

    A training step allocates and frees tensors of a few MB; mapping each on its own (the
    fixed threshold), or giving the heap's top back after each (the trim threshold glibc then
    keeps), made fine-tuning 2x as slow on a 2-core AMD EPYC machine (docs/performance.md,
    "Where the kernel's memory goes"). Does nothing unless `fix_mmap_threshold` fixed the
    threshold.
    """
    with _thresholds_raised(HEAP_THRESHOLD):
        yield


@contextlib.contextmanager
def pass_allocations() -> Iterator[None]:
    """As `heap_allocations`, for the base's passes: blocks up to PASS_THRESHOLD come from the
    heap, which keeps up to twice that free at its top.

    The passes free and allocate tensors of a few hundred KB for each image; mapping each on
    its own cost them a quarter of their speed. Not HEAP_THRESHOLD: with it the pass over
    flowers128 peaked about 300 MB higher (docs/performance.md, "A lead for the passes").
    """
    with _thresholds_raised(PASS_THRESHOLD):
        yield


@contextlib.contextmanager
def _thresholds_raised(threshold: int) -> Iterator[None]:
    """Within: mmap threshold `threshold`, trim threshold twice that (glibc's dynamic pairing).
    After: the fixed thresholds and `malloc_trim`. Nothing unless the threshold was fixed."""
    mallopt = _mallopt() if _threshold_fixed else None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    mallopt(M_TRIM_THRESHOLD, 2 * threshold)
    try:
        yield
    finally:
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        ctypes.CDLL(None).malloc_trim(0)


def _mallopt():
    """glibc's `mallopt` from the C library the process already runs on, or None."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def import_tensorflow() -> ModuleType:
    """`import tensorflow`, keeping its start-up notices off stderr (other lines still show),
    with glibc's mmap threshold fixed first (`fix_mmap_threshold`)."""
    fix_mmap_threshold()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with stderr_filtered(STARTUP_NOTICES):
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def stderr_filtered(hidden: re.Pattern[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 in the block; then write it out less the
    lines that match `hidden`."""
    collected: list[str] = []
    try:
        with stderr_collected() as collected:
            yield
    finally:
        lines = "".join(collected).splitlines(keepends=True)
        kept = [line for line in lines if not hidden.search(line)]
        if kept:
            sys.stderr.write("".join(kept))
            _flush_stderr()


@contextlib.contextmanager
def stderr_collected() -> Iterator[list[str]]:
    """Keep what is written to file descriptor 2 in the block off stderr; the list the block
    gets receives it as text when the block ends."""
    collected: list[str] = []
    _flush_stderr()
    with tempfile.TemporaryFile() as file:
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield collected
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            collected.append(file.read().decode("utf-8", "replace"))


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()
