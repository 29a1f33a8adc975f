"""The notebook itself, executed headless through nbclient / a real Jupyter kernel."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOK, ROOT, SAMPLES, make_dataset, write_config
from jupyter_client import KernelManager
from nbclient.exceptions import CellExecutionError

from tl_helpers.run_notebook import kernel_environment, run_notebook


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("evalue", ""))
            parts.extend(out.get("traceback", []))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    ids = [cell["id"] for cell in json.loads(Path(NOTEBOOK).read_text())["cells"]]
    assert len(ids) == len(set(ids)), "cell ids repeat: Jupyter renumbers them on every load"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    sources = "\n".join(c.source for c in nb.cells)
    assert "def remove_top_layer_if_needed(" in sources
    assert "pip install" not in sources


def test_notebook_runs_on_tiny_configuration(tiny_notebook_run):
    run = tiny_notebook_run
    model_dir = run.folder / "out" / "model" / "saved_model"
    assert (model_dir / "saved_model.pb").is_file()
    assert json.loads((run.folder / "out" / "model" / "labels.json").read_text()) == dict(
        sorted(run.labels.items(), key=lambda kv: kv[1])
    )
    results = json.loads((run.folder / "out" / "evaluation" / "results.json").read_text())
    # 4 classes of distinct colours, validation images unlike the training ones: chance is 0.25
    # (the run reaches 0.83).
    assert results["top_1_accuracy"] >= 0.6, results["top_1_accuracy"]
    assert results["num_images"] == 12
    assert set(results["per_class"]) == set(run.labels)
    text = _outputs_text(run.nb)
    assert "Epoch 3/3" in text and "val_accuracy" in text
    # Fine-tuning is on by default: the default MobileNetV2 is cut at block_12_add and its
    # top trains for the default 3 epochs after the head's 3; evaluation still runs from the
    # (recomputed) validation features.
    assert "the base is cut after block_12_add" in text
    assert "Fine-tuning" in text and "3 epochs, learning rate" in text
    assert text.count("Epoch 3/3") == 2, "the head's last epoch, then fine-tuning's"
    assert results["evaluation"]["method"].startswith("saved model's head on the validation")
    assert "Top-1 accuracy" in text
    assert run.executed.is_file()


@pytest.mark.notebook
def test_missing_configuration_stops_at_step_1(tmp_path):
    with pytest.raises(CellExecutionError) as err:
        run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", cwd=tmp_path)
    assert err.value.ename == "TLError"
    assert "configuration.json not found" in err.value.evalue
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1
    assert len(errors[0].traceback) == 1  # the message, not a page of traceback


class Kernel:
    """A real Jupyter kernel running the notebook's cells one by one, as a user would."""

    def __init__(self, cwd: Path):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=kernel_environment())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.output: list[str] = []

    def run(self, source: str, timeout: float = 300) -> dict:
        def hook(msg):
            content = msg["content"]
            self.output.append(content.get("text", "") or content.get("evalue", ""))

        reply = self.kc.execute_interactive(source, output_hook=hook, timeout=timeout)
        return reply["content"]

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


BAD_CONFIGURATIONS = [
    ({"batch_size": 0}, "batch_size"),
    ({"epoch": 3}, 'Did you mean "epochs"'),
    ({"dataset_training_dir": "nowhere/training"}, "dataset_training_dir"),
]


@pytest.mark.notebook
def test_bad_configuration_stops_with_clear_message(tmp_path):
    """Each bad configuration stops at step 2 with one line naming the key; nothing written.

    One kernel, as a user fixing configuration.json and running the cells again would.
    """
    make_dataset(tmp_path / "data", {"a": 0, "b": 1}, 2, 1)
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    load_cell = next(i for i, s in enumerate(cells) if "load_configuration(" in s)
    kernel = Kernel(tmp_path)
    try:
        for change, culprit in BAD_CONFIGURATIONS:
            write_config(tmp_path, **change)
            replies = [kernel.run(source) for source in cells[: load_cell + 1]]
            assert [r["status"] for r in replies[:-1]] == ["ok"] * load_cell, kernel.output
            error = replies[-1]
            assert error["status"] == "error" and error["ename"] == "TLError", error
            assert culprit in error["evalue"]
            assert len(error["traceback"]) == 1  # the message, not a page of traceback
            assert not (tmp_path / "out").exists()
    finally:
        kernel.close()


@pytest.mark.notebook
def test_interrupt_during_training_keeps_previous_model_and_kernel(tmp_path):
    make_dataset(tmp_path / "data", {"a": 0, "b": 1, "c": 2}, 6, 2)
    model_dir = tmp_path / "out" / "model" / "saved_model"
    results_file = tmp_path / "out" / "evaluation" / "results.json"
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    train_cell = next(i for i, s in enumerate(cells) if "train_head(" in s)
    quick = {"augmentation": "none", "fine_tune": False}  # this test is about the interrupt
    kernel = Kernel(tmp_path)
    try:
        # A complete first run: the model and results the interrupted run must not touch.
        write_config(tmp_path, **quick, epochs=2)
        for source in cells:
            assert kernel.run(source)["status"] == "ok", kernel.output[-5:]
        model_before = (model_dir / "saved_model.pb").read_bytes()
        results_before = results_file.read_text()

        # A long training run, interrupted in the middle of head training.
        write_config(tmp_path, **quick, epochs=100000)
        for source in cells[:train_cell]:
            assert kernel.run(source)["status"] == "ok", kernel.output
        msg_id = kernel.kc.execute(cells[train_cell])
        deadline = time.time() + 120
        while "Epoch 3/100000" not in "".join(kernel.output) and time.time() < deadline:
            msg = kernel.kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id:
                kernel.output.append(msg["content"].get("text", ""))
        assert "Epoch 3/100000" in "".join(kernel.output)
        kernel.km.interrupt_kernel()
        reply = kernel.kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kernel.kc.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # Nothing was written: the previous model and results are intact, no partial files.
        assert (model_dir / "saved_model.pb").read_bytes() == model_before
        assert results_file.read_text() == results_before
        leftovers = [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".")]
        assert leftovers == []

        # The same kernel runs the whole notebook again.
        write_config(tmp_path, **quick, epochs=2)
        for source in cells:
            assert kernel.run(source)["status"] == "ok", kernel.output[-5:]
    finally:
        kernel.close()
    assert json.loads(results_file.read_text())["created"] != json.loads(results_before)["created"]


@pytest.mark.slow
@pytest.mark.notebook
def test_end_to_end_on_real_photos_with_bundled_weights(tmp_path):
    """The default configuration on the bundled real photos: Top-1 far above chance (0.2)."""
    config = json.loads((ROOT / "configuration.json").read_text())
    for key in ("dataset_training_dir", "dataset_validation_dir", "evaluate_label_file"):
        config[key] = str(ROOT / config[key])
    labels_file = config["evaluate_label_file"]
    (tmp_path / "configuration.json").write_text(json.dumps(config))
    shutil.copy(NOTEBOOK, tmp_path)
    run_notebook(tmp_path / NOTEBOOK.name, tmp_path / "executed.ipynb", cwd=tmp_path)
    results = json.loads((tmp_path / config["evaluate_result_dir"] / "results.json").read_text())
    assert results["num_images"] == 40
    assert results["top_1_accuracy"] >= 0.6
    assert config["quantize"]  # the bundled default quantizes and converts for the IMX500
    # ... a fine-tuned model: fine-tuning is on by default
    executed = _outputs_text(nbformat.read(tmp_path / "executed.ipynb", as_version=4))
    assert "the base is cut after block_12_add" in executed and "Fine-tuning" in executed
    assert results["quantized_keras_top_1_accuracy"] >= 0.6
    assert results["quantized_tflite_top_1_accuracy"] >= 0.6
    imx500 = tmp_path / config["output_dir"] / "imx500"
    conversion = results["imx500_conversion"]
    assert conversion["ran"] and conversion["fits_in_chip"], conversion
    assert (imx500 / "packerOut.zip").stat().st_size > 100_000
    labels = json.loads(Path(labels_file).read_text())
    lines = (imx500 / "labels.txt").read_text().splitlines()
    assert lines == sorted(labels, key=labels.get)
    assert 0 < conversion["memory"]["usage_bytes"] < conversion["memory"]["available_bytes"]
    assert SAMPLES.is_dir()
