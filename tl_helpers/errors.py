"""The one exception type for the project's own checks."""

from __future__ import annotations


class TLError(Exception):
    """A problem the user can fix: the message names the culprit and says what to change.

    In Jupyter it is shown as its message alone (no page of traceback), yet the cell still
    fails, so "Run All" and headless runs stop there.
    """

    def _render_traceback_(self) -> list[str]:
        # IPython calls this hook instead of formatting a full traceback.
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]
