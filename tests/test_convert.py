"""IMX500 conversion: the real converter (imxconv-tf in .venv-imx500, Java) on tiny quantized
models, plus the parts that need no converter (labels.txt, memory report, layer check, messages)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, make_dataset, tiny_base_model, write_config

from tl_helpers import compat, convert, quantize
from tl_helpers.config import load_configuration
from tl_helpers.dataset import scan_image_folder
from tl_helpers.errors import TLError
from tl_helpers.model import build_classifier

keras = tf.keras
LABELS = {"red": 1, "green": 0, "blue": 2}
CONVERTER = convert.find_converter()
_converter_ready = pytest.mark.skipif(
    convert.missing_tools() is not None,
    reason=f"IMX500 converter not ready: {convert.missing_tools()} (make venv installs it)",
)


def needs_converter(test):
    """The real converter on a model quantized with MCT: not in the fast tier."""
    return pytest.mark.mct(_converter_ready(test))


# A memory report as imxconv-tf 3.19.2 writes it.
REPORT = {
    "Memory Report": {
        "Name": "quantized_model",
        "Runtime Memory Physical Size": "1.20MB",
        "Model Memory Physical Size": "472.50KB",
        "Reserved Memory": "1.00KB",
        "Memory Usage": "1.67MB",
        "Total Memory Available On Chip": "8.00MB",
        "Memory Utilization": "21%",
        "Fit In Chip": True,
        "Input Persistent": True,
        "Networks": [],
    }
}


def _quantized_keras_file(folder: Path, model: keras.Model, tpc_version: str = "1.0") -> Path:
    """Quantize `model` with MCT on random raw-pixel batches and export its .keras file."""
    rng = np.random.default_rng(0)
    size = model.inputs[0].shape[1]

    def batches():
        for _ in range(2):
            yield [rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)]

    quantized = quantize.quantize_model(model, batches, tpc_version)
    exporter = quantize.mct().exporter
    path = folder / quantize.KERAS_FILE
    exporter.keras_export_model(
        model=quantized,
        save_model_path=str(path),
        serialization_format=exporter.KerasExportSerializationFormat.KERAS,
        quantization_format=exporter.QuantizationFormat.MCTQ,
    )
    return path


def _tiny_classifier(preprocessing: str = "minus_one_to_one") -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(tiny_base_model(32), LABELS, 32, preprocessing)


def _with_rescaling() -> keras.Model:
    """A classifier whose preprocessing is Keras's Rescaling layer, which the converter refuses."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, -1.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _previous_conversion(output_dir: Path) -> dict[str, bytes]:
    """An earlier run's output_dir/imx500 (stand-in files); returns its content."""
    folder = output_dir / convert.IMX500_DIR
    folder.mkdir(parents=True)
    (folder / convert.PACKER_FILE).write_bytes(b"PK previous")
    (folder / convert.LABELS_TXT).write_text("old\n")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def tiny_keras_file(tmp_path_factory) -> Path:
    """One tiny quantized classifier (TPC 1.0) for the converter tests; tests only read it."""
    return _quantized_keras_file(tmp_path_factory.mktemp("quantized"), _tiny_classifier())


# --------------------------------------------------------------------------- without the converter


def test_labels_txt_line_number_is_class_id():
    assert convert.labels_text({"car": 1, "bike": 2, "human": 0}) == "human\ncar\nbike\n"
    # A gap in the ids keeps every later class on its line; "-" is picamera2's undefined label.
    assert convert.labels_text({"a": 0, "c": 3}) == "a\n-\n-\nc\n"


def test_intrinsics_follow_picamera2_schema():
    intrinsics = convert.intrinsics({"b": 1, "a": 0, "d": 3})
    assert intrinsics == {
        "task": "classification",
        "classes": {"labels": ["a", "b", "-", "d"], "ignore_undefined": True},
    }


def test_memory_report_parsed_and_shown(tmp_path):
    path = tmp_path / "quantized_model_MemoryReport.json"
    path.write_text(json.dumps(REPORT))
    memory = convert.read_memory_report(path)
    assert memory.usage_bytes == round(1.67 * 1024**2)
    assert memory.model_bytes == round(472.5 * 1024)
    assert memory.available_bytes == 8 * 1024**2
    assert (memory.utilization_percent, memory.fits, memory.input_persistent) == (21.0, True, True)
    table = convert.format_memory_report(memory)
    assert "1.67 MB of 8.00 MB on the chip" in table
    assert "fits in the chip        yes" in table
    assert "21 %" in table

    path.write_text("{}")
    with pytest.raises(TLError, match="Cannot read the IMX500 converter's memory report"):
        convert.read_memory_report(path)


def test_not_fitting_message_gives_figures_and_changes():
    memory = convert.MemoryReport(
        "m", 9 * 1024**2, 2 * 1024**2, 1024, 11 * 1024**2, 8 * 1024**2, 137.5, False, True
    )
    message = convert.not_fitting_message(memory, input_persistency=True)
    assert "needs 11.00 MB of the 8.00 MB on the chip (137.5 %" in message
    for change in ('"mobilenet_alpha"', '"input_tensor_size"', '"imx500_input_persistency": false'):
        assert change in message
    assert "persistency" not in convert.not_fitting_message(memory, input_persistency=False)


def test_layers_the_converter_refuses_are_named():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = tf.math.exp(x)  # a TensorFlow op the converter does not map
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    base = keras.Model(inputs, x, name="user_base")
    classifier = build_classifier(base, LABELS, 32)
    problems = compat.unconvertible_layers(classifier)
    assert len(problems) == 3
    text = "\n".join(problems)
    assert 'layer "user_base/scale" (Rescaling)' in text and "x * scale + offset" in text
    assert "runs tf.math.exp" in text
    assert 'layer "user_base/gmp" (GlobalMaxPooling2D)' in text
    assert '"user_base/conv"' not in text
    # The project's own classifier (TFOpLambda preprocessing) passes.
    assert compat.unconvertible_layers(_tiny_classifier()) == []


def test_refused_layer_stops_before_calibration(tmp_path):
    """A layer the converter refuses is named before any calibration image is read."""
    make_dataset(tmp_path / "data", LABELS, train_per_class=2, val_per_class=1)
    train = scan_image_folder(tmp_path / "data" / "training", LABELS, role="training")
    for path in train.paths:
        os.remove(path)  # reading any image would now fail with another message
    write_config(tmp_path, quantize=True)
    config = load_configuration(tmp_path / "configuration.json")
    with pytest.raises(TLError) as err:
        quantize.quantize_for_imx500(_with_rescaling(), train, LABELS, config)
    message = str(err.value)
    assert "IMX500 converter would refuse the model (1 layer)" in message
    assert 'layer "rescale" (Rescaling)' in message
    assert '"convert_for_imx500": false' in message


def test_missing_converter_and_java_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(convert.CONVERTER_ENV_VAR, str(tmp_path / "nowhere" / "imxconv-tf"))
    message = convert.missing_tools()
    assert message.count("\n") == 0
    assert "imxconv-tf" in message and "make venv" in message

    fake = tmp_path / "imxconv-tf"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv(convert.CONVERTER_ENV_VAR, str(fake))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    message = convert.missing_tools()
    assert message.count("\n") == 0
    assert "Java 17" in message and "apt-get install openjdk-17-jre-headless" in message


def test_old_java_is_refused(tmp_path, monkeypatch):
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    java.chmod(0o755)
    fake = tmp_path / "imxconv-tf"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv(convert.CONVERTER_ENV_VAR, str(fake))
    monkeypatch.setenv("PATH", str(java.parent))
    assert convert.java_version() == 11
    assert "`java` is Java 11" in convert.missing_tools()


def test_step_skipped_when_off_or_tools_missing(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "data", LABELS, train_per_class=1, val_per_class=1)
    write_config(tmp_path, quantize=True, convert_for_imx500=False)
    config = load_configuration(tmp_path / "configuration.json")
    placeholder = quantize.QuantizedModel(
        tmp_path, tmp_path / "q.keras", tmp_path, "1.0", 1, 1, 0, 0, {}
    )
    off = convert.convert_for_imx500(placeholder, LABELS, config)
    assert not off.ran and '"convert_for_imx500": false' in off.reason
    assert convert.convert_for_imx500(None, LABELS, config).reason.startswith("quantization is off")

    write_config(tmp_path, quantize=True)
    config = load_configuration(tmp_path / "configuration.json")
    monkeypatch.setenv(convert.CONVERTER_ENV_VAR, str(tmp_path / "missing"))
    capsys.readouterr()
    missing = convert.convert_for_imx500(placeholder, LABELS, config)
    assert not missing.ran
    assert capsys.readouterr().out.strip() == missing.reason
    results = convert.add_conversion_results({"top_1_accuracy": 0.5}, missing)
    assert results[convert.CONVERSION_KEY] == {"ran": False, "reason": missing.reason}
    assert results["top_1_accuracy"] == 0.5


# --------------------------------------------------------------------------- the real converter


@needs_converter
def test_tiny_classifier_converts(tmp_path, tiny_keras_file, capsys):
    conversion = convert.convert(tiny_keras_file, tmp_path / "model", LABELS)
    folder = tmp_path / "model" / "imx500"
    assert conversion.ran and conversion.directory == folder
    expected = (convert.PACKER_FILE, convert.LABELS_TXT, convert.INTRINSICS_FILE, convert.PI_SCRIPT)
    for name in (*expected, "dnnParams.xml"):
        assert (folder / name).is_file(), name
    assert (folder / "quantized_model_MemoryReport.json").is_file()
    assert (folder / convert.PACKER_FILE).stat().st_size > 1000
    assert (folder / convert.LABELS_TXT).read_text() == "green\nred\nblue\n"
    memory = conversion.memory
    assert memory.fits and memory.input_persistent
    assert 0 < memory.model_bytes < memory.usage_bytes < memory.available_bytes == 8 * 1024**2
    assert conversion.converter_version == "3.19.2"
    assert "Converter Backend successfully completed" in (folder / convert.LOG_FILE).read_text()
    shown = capsys.readouterr().out
    assert "packer zip successfully generated" in shown  # progress streamed into the cell
    assert "cuDNN" not in shown and "TensorRT" not in shown
    # Nothing temporary left beside the result.
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["imx500"]
    results = convert.add_conversion_results({}, conversion)[convert.CONVERSION_KEY]
    assert results["ran"] and results["fits_in_chip"] and results["memory"]["usage_bytes"] > 0
    assert results["converter"] == "imx500-converter 3.19.2"
    assert set(results["files"]) >= {"packerOut.zip", "labels.txt", "dnnParams.xml"}


@needs_converter
def test_converter_failure_quotes_its_message_and_keeps_previous(tmp_path):
    before = _previous_conversion(tmp_path)
    (tmp_path / "refused").mkdir()
    refused = _quantized_keras_file(tmp_path / "refused", _with_rescaling())
    with pytest.raises(TLError) as err:
        convert.convert(refused, tmp_path, LABELS)
    message = str(err.value)
    assert "The IMX500 converter failed" in message
    assert "[USOP] The network contains unsupported ops" in message and "Rescaling" in message
    after = {p.name: p.read_bytes() for p in (tmp_path / "imx500").iterdir()}
    assert after == before
    failed_log = tmp_path / convert.FAILED_LOG_FILE
    assert str(failed_log) in message and "[USOP]" in failed_log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["imx500", "refused", convert.FAILED_LOG_FILE]
    )


@needs_converter
def test_network_too_large_for_the_chip_stops_with_figures(tmp_path):
    """Activations of 16 x 640 x 640 bytes per layer do not fit in 8 MB: the converter's own
    memory report gives the figures; the previous folder stays."""
    before = _previous_conversion(tmp_path)
    inputs = keras.Input((640, 640, 3), name="image")
    x = inputs * (1 / 127.5) - 1.0
    for _ in range(2):
        x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    large = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    (tmp_path / "large").mkdir()
    keras_file = _quantized_keras_file(tmp_path / "large", large)
    with pytest.raises(TLError) as err:
        convert.convert(keras_file, tmp_path, LABELS)
    message = str(err.value)
    assert "does not fit in the IMX500" in message
    assert "of the 8.00 MB on the chip" in message
    assert '"input_tensor_size"' in message and '"imx500_input_persistency": false' in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "imx500").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["imx500", "large", convert.FAILED_LOG_FILE]
    )


@needs_converter
def test_interrupted_conversion_keeps_previous(tmp_path, tiny_keras_file):
    """Ctrl-C (the notebook's interrupt) during conversion: the previous folder stays as it was,
    the converter is stopped, and nothing temporary is left."""
    before = _previous_conversion(tmp_path)
    # A process started in the background inherits SIGINT ignored (CI runs so): the child takes
    # Python's own handler back, as a Jupyter kernel handles its interrupt.
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from tl_helpers import convert\n"
        "try:\n"
        f"    convert.convert({str(tiny_keras_file)!r}, {str(tmp_path)!r}, {LABELS!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('INTERRUPTED', flush=True)\n"
        "    sys.exit(3)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    seen = []
    for line in child.stdout:
        seen.append(line)
        if "INFO : Converting" in line:
            break  # the converter runs
    child.send_signal(signal.SIGINT)
    try:
        rest, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 3, "".join(seen) + rest
    assert "INTERRUPTED" in rest
    after = {p.name: p.read_bytes() for p in (tmp_path / "imx500").iterdir()}
    assert after == before
    time.sleep(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imx500"]
    leftover = subprocess.run(
        ["pgrep", "-f", f"{tmp_path}/.imx500.tmp-"], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", "the converter still runs"


@needs_converter
def test_every_tpc_version_converts(tmp_path):
    """Each IMX500 TPC version the configuration accepts quantizes and converts (converter 3.19);
    6.0 also without input persistency. (1.0: the tests above.) The three conversions run at
    once, each in its own folder, as three notebooks would."""
    versions = ["4.0", "5.0", "6.0"]
    keras_files = {}
    for version in versions:
        (tmp_path / version).mkdir()
        keras_files[version] = _quantized_keras_file(
            tmp_path / version, _tiny_classifier("zero_to_one"), version
        )

    def converted(version: str) -> convert.Conversion:
        persistency = version != "6.0"
        folder = tmp_path / version
        return convert.convert(keras_files[version], folder, LABELS, input_persistency=persistency)

    with ThreadPoolExecutor(len(versions)) as pool:
        conversions = dict(zip(versions, pool.map(converted, versions), strict=True))
    for version, conversion in conversions.items():
        assert conversion.memory.fits, version
        assert conversion.memory.input_persistent == (version != "6.0"), version
        assert (tmp_path / version / "imx500" / convert.PACKER_FILE).is_file(), version


def test_tpc_versions_tested_are_the_accepted_ones():
    schema = json.loads((ROOT / "tl_helpers" / "configuration_schema.json").read_text())
    assert schema["properties"]["imx500_tpc_version"]["enum"] == ["1.0", "4.0", "5.0", "6.0"]
