"""TensorFlow's start-up notices stay off stderr; everything else written there still shows."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tl_helpers.startup import STARTUP_NOTICES, stderr_filtered

ROOT = Path(__file__).resolve().parents[1]


def test_stderr_filtered_drops_only_the_matching_lines(capfd):
    with stderr_filtered(re.compile("notice")):
        os.write(2, b"a notice\nreal problem\n")
        print("python-level line", file=sys.stderr)
    # (sys.stderr bypasses descriptor 2 under pytest's capture, so the order may differ.)
    assert sorted(capfd.readouterr().err.splitlines()) == ["python-level line", "real problem"]


def test_filtered_lines_show_even_when_the_block_fails(capfd):
    try:
        with stderr_filtered(STARTUP_NOTICES):
            os.write(
                2,
                b"E cuda_dnn.cc] Unable to register cuDNN factory: Attempting to register "
                b"factory for plugin cuDNN when one has already been registered\nboom\n",
            )
            raise RuntimeError("import failed")
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "boom\n"


def test_preload_in_a_fresh_process_writes_no_startup_notices_but_later_logs_show():
    code = """
import tl_helpers as tl
tl.preload()
import tensorflow as tf
for _ in tf.data.Dataset.range(3).cache().take(1):
    pass  # TensorFlow logs a warning (W) about the partly read cache
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if STARTUP_NOTICES.search(line)]
    assert "Unable to register" not in done.stderr and "TensorRT" not in done.stderr
    assert "did not fully read the dataset being cached" in done.stderr


_MAPPED_AGAIN = """
import ctypes, sys
fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
MallInfo2 = type(
    "MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]}
)
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    from tl_helpers.startup import fix_mmap_threshold
    assert fix_mmap_threshold()
size = 4 * 2**20
libc.free(libc.malloc(size))  # a mapped block freed: glibc would raise its threshold past it
before = libc.mallinfo2().hblks
block = libc.malloc(size)
print(libc.mallinfo2().hblks - before)  # 1: mapped on its own again; 0: taken from the heap
libc.free(block)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33 or newer only",
)
def test_large_blocks_stay_mapped_after_one_is_freed():
    """After `fix_mmap_threshold`, a block of a few MB freed and asked for again is mapped on its
    own (given back to the system when freed), where glibc's default would take it from the
    heap; the default is checked too, so the test shows the setting is what makes it so."""
    assert _glibc_script(_MAPPED_AGAIN, "default") == "0"
    assert _glibc_script(_MAPPED_AGAIN, "fixed") == "1"


def _glibc_script(script: str, mode: str) -> str:
    """What `script` prints, run with `mode` as its argument in a new Python process, without a
    MALLOC_MMAP_THRESHOLD_ from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    command = [sys.executable, "-c", script, mode]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


_HEAP_ALLOCATIONS = (
    _MAPPED_AGAIN.split("if sys.argv[1]")[0]
    + """
from tl_helpers.startup import fix_mmap_threshold, heap_allocations

def mapped(size=4 * 2**20):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    count = libc.mallinfo2().hblks - before
    libc.free(block)
    return count

def kept(blocks=64, size=64 * 2**10):
    # 4 MiB of small blocks at the heap's top, all freed: 1 if the heap keeps them, 0 if its
    # top is given back to the system (the trim threshold)
    taken = [libc.malloc(size) for _ in range(blocks)]
    arena = libc.mallinfo2().arena
    for block in reversed(taken):
        libc.free(block)
    return int(libc.mallinfo2().arena >= arena)

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
print(mapped(), kept(), end=" ")
with heap_allocations():
    print(mapped(), kept(), end=" ")
print(mapped(), kept())
"""
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33 or newer only",
)
def test_heap_allocations_lifts_the_fixed_threshold_for_its_duration():
    """With the threshold fixed, a 4 MB block is mapped on its own before `heap_allocations`,
    comes from the heap within it, and is mapped on its own again after it; 4 MB freed at the
    heap's top are kept within it only. Without the fixed threshold (a user's
    MALLOC_MMAP_THRESHOLD_, another C library) it changes nothing."""
    assert _glibc_script(_HEAP_ALLOCATIONS, "fixed") == "1 0 0 1 1 0"
    # glibc's default raises its thresholds past the first mapped block freed (trim: twice
    # that); not fixed, the context leaves them as they are (fixing them on leaving: "1 0").
    assert _glibc_script(_HEAP_ALLOCATIONS, "default") == "1 1 0 1 0 1"


_PASS_ALLOCATIONS = (
    _HEAP_ALLOCATIONS.split("if sys.argv[1]")[0].replace("heap_allocations", "pass_allocations")
    + """
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
print(mapped(2 * 2**20), kept(), end=" ")
with pass_allocations():
    print(mapped(2 * 2**20), mapped(8 * 2**20), kept(), end=" ")
print(mapped(2 * 2**20), kept())
"""
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33 or newer only",
)
def test_pass_allocations_raises_the_fixed_threshold_to_4_mib_for_its_duration():
    """With the threshold fixed, a 2 MB block is mapped on its own before and after
    `pass_allocations` and comes from the heap within it, where an 8 MB block (a batch of
    images) is still mapped on its own; 4 MB freed at the heap's top are kept within it only
    (its trim threshold is 8 MiB). Not fixed, it changes nothing."""
    assert _glibc_script(_PASS_ALLOCATIONS, "fixed") == "1 0 0 1 1 1 0"
    # glibc's default raises its thresholds past each larger mapped block freed (2 MB, then
    # 8 MB); not fixed, the context leaves them as they are (fixing them on leaving: "1 0").
    assert _glibc_script(_PASS_ALLOCATIONS, "default") == "1 1 0 1 1 0 1"
