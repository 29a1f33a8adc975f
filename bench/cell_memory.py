"""Resident memory of the notebook's kernel after each code cell (not a test).

Runs a copy of image_classification.ipynb headless, with a cell after every code cell that
prints the kernel's current RSS (/proc/self/statm) and its peak so far (ru_maxrss), on
configuration.json with the keys given as JSON overriding it; prints one line per cell.

    .venv/bin/python bench/cell_memory.py /tmp/cells '{"dataset_training_dir":
        "../shared/datasets/flowers128/training", ..., "quantize": false}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_helpers.run_notebook import run_notebook  # noqa: E402

PROBE = (
    "import resource as _r\n"
    "_s = open('/proc/self/statm').read().split()\n"
    "print('RSSPROBE %s now %.0f MB peak %.0f MB' % ({!r}, int(_s[1]) * 4096 / 2**20, "
    "_r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024))"
)


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((ROOT / "configuration.json").read_text())
    config.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    (work / "configuration.json").write_text(json.dumps(config, indent=2))
    notebook = nbformat.read(ROOT / "image_classification.ipynb", as_version=4)
    cells = []
    for number, cell in enumerate(notebook.cells):
        cells.append(cell)
        if cell.cell_type == "code":
            lines = [line for line in cell.source.splitlines() if line.strip()]
            title = f"{number}: {lines[0][:50] if lines else ''}"
            cells.append(nbformat.v4.new_code_cell(PROBE.format(title)))
    notebook.cells = cells
    for cell in notebook.cells:
        cell.pop("id", None)  # nbformat gives the copy fresh ids
    nbformat.write(notebook, work / "probed.ipynb")
    run_notebook(work / "probed.ipynb", work / "executed.ipynb", cwd=work)
    executed = nbformat.read(work / "executed.ipynb", as_version=4)
    for cell in executed.cells:
        for output in cell.get("outputs", []):
            for line in output.get("text", "").splitlines():
                if line.startswith("RSSPROBE"):
                    print(line.removeprefix("RSSPROBE "))


if __name__ == "__main__":
    main()
