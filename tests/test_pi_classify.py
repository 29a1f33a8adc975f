"""The Raspberry Pi script: arguments, labels.txt, top-k on a recorded output vector.

The camera loop needs a Pi with an AI Camera and picamera2; everything else runs here, as the
script itself (a subprocess), the way a user runs it on the Pi.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tl_helpers import convert, pi_classify

SCRIPT = Path(pi_classify.__file__)
LABELS = {"shoes": 2, "hat": 0, "dress": 3}  # id 1 has no class


def _deployed(tmp_path: Path) -> Path:
    """An output_dir/imx500 as the conversion step writes it (script, labels, intrinsics)."""
    folder = tmp_path / "imx500"
    folder.mkdir()
    (folder / convert.PI_SCRIPT).write_bytes(SCRIPT.read_bytes())
    (folder / convert.LABELS_TXT).write_text(convert.labels_text(LABELS))
    (folder / convert.INTRINSICS_FILE).write_text(json.dumps(convert.intrinsics(LABELS)))
    return folder


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(folder / convert.PI_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_recorded_output_gives_top_classes_by_label_file(tmp_path):
    folder = _deployed(tmp_path)
    scores = tmp_path / "scores.json"
    # Output index = class id: 0 hat, 1 (no class), 2 shoes, 3 dress.
    scores.write_text(json.dumps([0.10, 0.50, 0.15, 0.25]))
    shown = _run(folder, "--scores", str(scores), "--top", "2")
    assert shown.returncode == 0, shown.stderr
    # Id 1 scores highest but has no class ("-"): never shown.
    assert shown.stdout.strip() == "dress 0.25 | shoes 0.15"


def test_top_k_orders_and_breaks_ties_by_class_id():
    labels = ["a", "b", "-", "c"]
    assert pi_classify.top_classes([0.2, 0.4, 0.9, 0.4], labels, 3) == [
        ("b", 0.4),
        ("c", 0.4),
        ("a", 0.2),
    ]
    assert pi_classify.top_classes([0.2, 0.4, 0.9, 0.4], labels, 10) == [
        ("b", 0.4),
        ("c", 0.4),
        ("a", 0.2),
    ]


def test_scores_that_do_not_match_labels_are_refused(tmp_path):
    folder = _deployed(tmp_path)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps([0.5, 0.5]))
    shown = _run(folder, "--scores", str(scores))
    assert shown.returncode != 0
    assert "2 scores but labels.txt has 4 lines" in shown.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --model network.rpk"),
        (["--model", "missing.rpk"], "run imx500-package -i packerOut.zip first"),
        (["--scores", "x.json", "--top", "0"], "--top must be 1 or more"),
    ],
)
def test_argument_errors(tmp_path, args, message):
    shown = _run(_deployed(tmp_path), *args)
    assert shown.returncode == 2
    assert message in shown.stderr


def test_labels_file_read_as_written(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(convert.labels_text(LABELS))
    assert pi_classify.read_labels(path) == ["hat", "-", "shoes", "dress"]


def test_empty_labels_file_is_refused(tmp_path):
    empty = tmp_path / "labels.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no labels"):
        pi_classify.read_labels(empty)


def test_script_imports_nothing_from_the_project():
    """On the Pi there is no tl_helpers (nor TensorFlow): the script stands alone."""
    source = SCRIPT.read_text()
    assert "tl_helpers" not in source.replace("tl_helpers/pi_classify.py", "")
    assert "tensorflow" not in source
