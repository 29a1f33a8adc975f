"""Import TensorFlow without the lines its C++ side writes to stderr on start-up.

On a machine without a GPU, `import tensorflow` writes about ten log lines to stderr, three of
them marked `E` ("Unable to register cuDNN factory", ...). None of them is a problem, yet
JupyterLab shows them as a pink box under the very first cell, which reads like a failure.
`TF_CPP_MIN_LOG_LEVEL` cannot hide only those: the `E` lines need level 3, which would also
hide every real error TensorFlow logs later. So the import runs with the process's stderr
(file descriptor 2) sent to a temporary file, and afterwards every line of it that is not one
of the known start-up notices (`STARTUP_NOTICES`) is written to stderr as usual. TensorFlow's
log level is left as it is: what it logs after the import shows.
"""

from __future__ import annotations

import contextlib
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


def import_tensorflow() -> ModuleType:
    """`import tensorflow`, keeping its start-up notices off stderr (other lines still show)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with stderr_filtered(STARTUP_NOTICES):
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def stderr_filtered(hidden: re.Pattern[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 in the block; then write it out less the
    lines that match `hidden`."""
    _flush_stderr()
    with tempfile.TemporaryFile() as collected:
        saved = os.dup(2)
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            kept = [
                line
                for line in collected.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not hidden.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                _flush_stderr()


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()
