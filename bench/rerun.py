"""Time a first run of the notebook and a re-run with only `epochs` changed, in one kernel.

    .venv/bin/python bench/rerun.py FOLDER [--epochs 10] [--epochs-after 20]

FOLDER holds a configuration.json (its feature cache should be empty for a true first run;
use a new output_dir or feature_cache_dir). One Jupyter kernel runs every code cell with
`epochs` set to --epochs, then, as a JupyterLab user's "Run All" after editing the file, every
cell again with --epochs-after. Prints the time of all cells of each run, the slowest cells,
the notebook's "features:" line and the ratio (issue 6: at most a third). configuration.json
is restored afterwards. For a new kernel per run, time `python -m tl_helpers.run_notebook`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# nbformat and nbclient as tl_helpers.run_notebook imports them: after importing jsonschema
# without its slow optional grammar.
from tl_helpers.run_notebook import DEFAULT_NOTEBOOK, NotebookClient, kernel_environment, nbformat

REPO = Path(__file__).resolve().parents[1]


def run_all(client: NotebookClient, nb: nbformat.NotebookNode) -> tuple[float, list, str]:
    """Execute every code cell; return the total seconds, (seconds, first line) per cell, and
    the notebook's "features:" line."""
    cells, features, start = [], "", time.perf_counter()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        begin = time.perf_counter()
        client.execute_cell(cell, index)
        cells.append((time.perf_counter() - begin, cell.source.strip().splitlines()[0][:60]))
        for output in cell.get("outputs", []):
            for line in str(output.get("text", "")).splitlines():
                if line.startswith("features:"):
                    features = line
    return time.perf_counter() - start, cells, features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder holding configuration.json")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epochs-after", type=int, default=20)
    parser.add_argument("--notebook", type=Path, default=REPO / DEFAULT_NOTEBOOK)
    args = parser.parse_args(argv)
    config = args.folder / "configuration.json"
    original = config.read_text(encoding="utf-8")
    if not re.search(r'"epochs"\s*:\s*\d+', original):
        parser.error(f'{config} has no "epochs" key to change')
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=3600,
        kernel_name="python3",
        resources={"metadata": {"path": str(args.folder.resolve())}},
    )
    os.environ["PATH"] = kernel_environment()["PATH"]  # the kernel runs this environment
    totals = []
    try:
        with client.setup_kernel():
            for run, epochs in ((1, args.epochs), (2, args.epochs_after)):
                config.write_text(
                    re.sub(r'"epochs"\s*:\s*\d+', f'"epochs": {epochs}', original),
                    encoding="utf-8",
                )
                total, cells, features = run_all(client, nb)
                totals.append(total)
                print(f"run {run} (epochs {epochs}): all cells {total:.2f} s; {features}")
                for seconds, source in sorted(cells, reverse=True)[:8]:
                    print(f"  {seconds:6.2f}  {source}")
    finally:
        config.write_text(original, encoding="utf-8")
    print(f"re-run / first run: {totals[1] / totals[0]:.3f} (target: at most 0.333)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
