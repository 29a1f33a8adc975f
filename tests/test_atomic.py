"""Crash-safe outputs: a child process killed at each step of a swap leaves a state the next run
recovers to the old or the new complete folder, with the copy of its labels beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_helpers import atomic

ROOT = Path(__file__).resolve().parents[1]
OLD_LABELS = {"a": 0, "b": 1}
NEW_LABELS = {"a": 0, "b": 1, "c": 2}
INNER = "assets/labels.json"

# The child: write a new version of out/saved_model and swap it in, killing itself (os._exit,
# no clean-up of any kind) when the swap reaches the step named on the command line.
CHILD = """
import json, os, sys
from pathlib import Path
from tl_helpers import atomic

out, step, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "two renames":
    atomic._renameat2 = False
atomic.step_hook = lambda name: os._exit(9) if name == step else None
final = out / "saved_model"
new = atomic.temporary_sibling(final)
(new / "assets").mkdir()
(new / "assets" / "labels.json").write_text(json.dumps(NEW_LABELS))
(new / "model.txt").write_text("new")
atomic.replace_directory_with_copy(new, final, "assets/labels.json", out / "labels.json")
"""

# For each step the child is killed at: the version the next run ends with, and whether it
# says it tidied the folder and restored the labels copy ("wrote copy": killed after the end).
EXPECTED = {
    ("exchange", "removed copy"): ("old", True, True),
    ("exchange", "start"): ("old", True, True),
    ("exchange", "exchanged"): ("new", True, True),
    ("exchange", "wrote copy"): ("new", False, False),
    ("exchange", None): ("new", False, False),
    ("two renames", "removed copy"): ("old", True, True),
    ("two renames", "start"): ("old", True, True),
    ("two renames", "moved old aside"): ("old", True, True),
    ("two renames", "moved new in"): ("new", True, True),
    ("two renames", "wrote copy"): ("new", False, False),
    ("two renames", None): ("new", False, False),
}


def _write_version(folder: Path, text: str, labels: dict[str, int]) -> None:
    (folder / "assets").mkdir(parents=True)
    (folder / "assets" / "labels.json").write_text(json.dumps(labels))
    (folder / "model.txt").write_text(text)


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    _write_version(out / "saved_model", "old", OLD_LABELS)
    (out / "labels.json").write_text(json.dumps(OLD_LABELS))
    return out


def _run_child(out: Path, step: str | None, mode: str) -> int:
    code = f"NEW_LABELS = {NEW_LABELS!r}\n{CHILD}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), str(step), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 9), done.stderr
    return done.returncode


def _version(folder: Path) -> tuple[str, dict]:
    """The version a folder holds, checked to be complete."""
    return (folder / "model.txt").read_text(), json.loads((folder / INNER).read_text())


def _dot_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exchange_works(tmp_path_factory) -> bool:
    """Whether this file system swaps two names in one step (most Linux file systems do)."""
    folder = tmp_path_factory.mktemp("exchange")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return atomic._exchange(folder / "a", folder / "b")


@pytest.mark.parametrize(("mode", "step"), EXPECTED)
def test_kill_at_each_step_then_recover(tmp_path, mode, step, exchange_works, capsys):
    if mode == "exchange" and not exchange_works:
        pytest.skip("this file system cannot exchange two names (renameat2 RENAME_EXCHANGE)")
    out = _old_output(tmp_path)
    killed = _run_child(out, step, mode) == 9
    assert killed == (step is not None)

    # Right after the kill: under its name the old or the new complete version, and beside it
    # the copy of that version's labels or none. Only the two renames have a moment with no
    # folder under the name, and then the old one is complete beside it.
    final, copy = out / "saved_model", out / "labels.json"
    if final.exists():
        text, labels = _version(final)
        assert (text, labels) in (("old", OLD_LABELS), ("new", NEW_LABELS))
        assert not copy.exists() or json.loads(copy.read_text()) == labels
    else:
        assert (mode, step) == ("two renames", "moved old aside")
        (aside,) = out.glob(".saved_model.old-*")
        assert _version(aside) == ("old", OLD_LABELS)

    # The next run recovers: a complete version, the matching copy, nothing left over, and
    # one line for each thing it did.
    capsys.readouterr()
    atomic.recover_leftovers(out)
    atomic.recover_copy(final / INNER, copy)
    expected_text, tidied, restored_copy = EXPECTED[mode, step]
    assert _version(final) == (
        (expected_text, NEW_LABELS) if expected_text == "new" else (expected_text, OLD_LABELS)
    )
    assert json.loads(copy.read_text()) == _version(final)[1]
    assert _dot_entries(out) == []
    printed = capsys.readouterr().out.splitlines()
    expected_lines = []
    if tidied:
        expected_lines.append(f"An earlier run was stopped while replacing {final}: ")
    if restored_copy:
        expected_lines.append(f"Restored {copy} from {final / INNER} (an earlier run stopped")
    assert len(printed) == len(expected_lines), printed
    for line, start in zip(printed, expected_lines, strict=True):
        assert line.startswith(start), line
    if step == "moved old aside":
        assert "restored the previous saved_model from .saved_model.old-" in printed[0]


def test_recovery_removes_bare_temporaries_and_keeps_those_of_running_processes(tmp_path, capsys):
    final = tmp_path / "quantized"
    _write_version(final, "old", OLD_LABELS)
    (tmp_path / ".quantized.tmp-k3x_9a2b").mkdir()  # tempfile.mkdtemp's name: no process id
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / f".quantized.tmp-{dead.stdout.strip()}-abc").mkdir()
    running = tmp_path / f".quantized.tmp-{os.getppid()}-abc"  # a live writer's
    running.mkdir()
    messages = atomic.recover_leftovers(tmp_path)
    assert _dot_entries(tmp_path) == [running.name]
    assert _version(final) == ("old", OLD_LABELS)
    assert len(messages) == 1 and capsys.readouterr().out == messages[0] + "\n"
    assert "removed .quantized.tmp-" in messages[0]


def test_recovery_with_nothing_left_over_says_nothing(tmp_path, capsys):
    _write_version(tmp_path / "imx500", "old", OLD_LABELS)
    assert atomic.recover_leftovers(tmp_path) == []
    assert atomic.recover_directory(tmp_path / "imx500") is None
    assert capsys.readouterr().out == ""


def test_replace_directory_creates_and_replaces(tmp_path):
    final = tmp_path / "imx500"
    for text in ("first", "second"):
        new = atomic.temporary_sibling(final)
        (new / "model.txt").write_text(text)
        atomic.replace_directory(new, final)
        assert (final / "model.txt").read_text() == text
        assert _dot_entries(tmp_path) == []
