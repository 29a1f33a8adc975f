"""Run the notebook headless (nbclient), streaming its output, and keep an executed copy.

    python -m tl_helpers.run_notebook [NOTEBOOK] [--output EXECUTED.ipynb] [--cwd DIR]

The notebook runs in DIR (default: the notebook's folder), which must hold configuration.json.
Exit status 0 when every cell ran; 1 when a cell failed (its error is printed).
With TF_CONFIG set, start it on every machine of the cluster (docs/distributed.md): a worker
that is not the chief writes its executed copy to a temporary folder unless --output is given,
and reports no Top-1 (the chief writes the results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tl_helpers.config import import_jsonschema
from tl_helpers.distribute import is_chief

import_jsonschema()  # before nbformat imports it: seconds faster (see import_jsonschema)

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

DEFAULT_NOTEBOOK = "image_classification.ipynb"


class StreamingClient(NotebookClient):
    """A NotebookClient that also prints each cell's heading and output as it arrives."""

    def __init__(self, nb, echo=sys.stdout, **kwargs):
        super().__init__(nb, **kwargs)
        self.echo = echo
        self.on_cell_start = self._announce

    def _announce(self, cell, cell_index):
        for previous in reversed(self.nb.cells[:cell_index]):
            if previous.cell_type != "markdown":
                break
            heading = previous.source.strip().splitlines()[0] if previous.source.strip() else ""
            if heading.startswith("#"):
                self.echo.write(f"\n{heading}\n")
                break
        self.echo.flush()

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        kind = msg.get("msg_type")
        if kind == "stream":
            self.echo.write(content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text:
                self.echo.write(text + "\n")
        self.echo.flush()
        return super().output(outs, msg, display_id, cell_index)


def kernel_environment() -> dict[str, str]:
    """Put this interpreter first on PATH so the kernel uses the same virtual environment."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_notebook(
    notebook: str | Path = DEFAULT_NOTEBOOK,
    output: str | Path | None = None,
    cwd: str | Path | None = None,
    timeout: int | None = None,
    echo=sys.stdout,
) -> nbformat.NotebookNode:
    """Execute `notebook` in `cwd`; write the executed copy to `output` even when a cell fails."""
    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    cwd = Path(cwd) if cwd is not None else notebook.resolve().parent
    client = StreamingClient(
        nb,
        echo=echo,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = kernel_environment()["PATH"]
    try:
        client.execute()
    finally:
        os.environ["PATH"] = old_path
        if output is not None:
            output = Path(output)
            output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, output)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=DEFAULT_NOTEBOOK)
    parser.add_argument("--output", help="where to write the executed notebook")
    parser.add_argument("--cwd", help="execution directory (holds configuration.json)")
    args = parser.parse_args(argv)
    output = args.output or default_output(args.notebook)
    try:
        run_notebook(args.notebook, output, args.cwd)
    except CellExecutionError as err:
        print(f"\nThe notebook stopped: {err.ename}: {err.evalue}", file=sys.stderr)
        print(f"Executed notebook (up to the failing cell): {output}", file=sys.stderr)
        return 1
    print(f"\nExecuted notebook: {output}")
    if not is_chief():
        print("Not the chief of the TF_CONFIG cluster: the chief writes the model and results.")
        return 0
    summary = top1_summary(Path(args.cwd or Path(args.notebook).resolve().parent))
    if summary:
        print(summary)
    return 0


def default_output(notebook: str) -> Path:
    """output/NAME.executed.ipynb; a temporary folder on a worker that is not the chief."""
    name = f"{Path(notebook).stem}.executed.ipynb"
    if is_chief():
        return Path("output") / name
    return Path(tempfile.mkdtemp(prefix="tl-worker-notebook-")) / name


def top1_summary(cwd: Path) -> str | None:
    """Top-1 from the results.json that the configuration in `cwd` points at."""
    from tl_helpers.config import load_configuration

    cfg = load_configuration(cwd / "configuration.json")
    results_path = Path(cfg.evaluate_result_dir) / "results.json"
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    return (
        f"Top-1 accuracy: {results['top_1_accuracy']:.4f} "
        f"({results['num_correct']}/{results['num_images']} validation images) -> {results_path}"
    )


if __name__ == "__main__":
    sys.exit(main())
