"""Progress for steps that have no natural progress bar (saving, loading a model).

`ticking` prints the step's name and updates the seconds elapsed on the same line while the
step runs, so that no step is silent for more than a few seconds, in JupyterLab and in headless
runs (`python -m tl_helpers.run_notebook` echoes the kernel's output as it arrives)::

    with ticking("Writing the SavedModel"):
        model.save(...)

`without_tensorflow_notices` keeps known, harmless TensorFlow log lines out of the notebook
(they print twice in a Jupyter kernel, and one reads like a problem: see SAVE_NOTICES).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

TICK_SECONDS = 2.0
# What TensorFlow logs on every SavedModel write (also inside the TFLite converter): the assets
# folder written, and a warning Keras gives for any model saved without compile(); ours are
# never compiled (only their training head is), so it says nothing about them.
SAVE_NOTICES = (
    "Assets written to: ",
    "Compiled the loaded model, but the compiled metrics have yet to be built.",
)


@contextlib.contextmanager
def ticking(
    message: str, interval: float = TICK_SECONDS, stream: TextIO | None = None
) -> Iterator[None]:
    """Show `message` and the seconds elapsed, updated every `interval` s, while the block runs."""
    stream = stream if stream is not None else sys.stdout
    start = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            _write(stream, f"\r{message} ... {time.monotonic() - start:.0f} s")

    _write(stream, f"{message} ...")
    thread = threading.Thread(target=tick, name="tl-progress", daemon=True)
    thread.start()
    outcome = "stopped after"
    try:
        yield
        outcome = "done in"
    finally:
        stop.set()
        thread.join()
        _write(stream, f"\r{message}: {outcome} {time.monotonic() - start:.1f} s\n")


def _write(stream: TextIO, text: str) -> None:
    """Write and flush at once, so the line shows while the step is still running."""
    stream.write(text)
    stream.flush()


@contextlib.contextmanager
def without_tensorflow_notices(prefixes: tuple[str, ...] = SAVE_NOTICES) -> Iterator[None]:
    """Drop the TensorFlow log records whose message starts with one of `prefixes`, while
    the block runs; every other TensorFlow message still shows."""
    tf_logger = logging.getLogger("tensorflow")
    notices = _StartsWith(prefixes)
    tf_logger.addFilter(notices)
    try:
        yield
    finally:
        tf_logger.removeFilter(notices)


class _StartsWith(logging.Filter):
    """Rejects records whose message starts with one of the given prefixes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)
