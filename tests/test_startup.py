"""TensorFlow's start-up notices stay off stderr; everything else written there still shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
