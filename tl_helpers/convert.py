"""Conversion for the IMX500: Sony's converter turns quantized_model.keras into packerOut.zip.

The converter (`imx500-converter[tf]`, command `imxconv-tf`) cannot share the project's virtual
environment (it pins older MCT quantizers than MCT 2.6.1 needs), so `make venv` installs it in
a virtual environment of its own, `.venv-imx500`, and this module runs its command as a
subprocess, streaming its progress into the notebook. Its back end is Java, 17 or newer.

`output_dir/imx500/` is written atomically, like every other output:

- `packerOut.zip`: the input of `imx500-package` on a Raspberry Pi, or of the AITRIOS console;
- `labels.txt`: one class name per line, line number = class id ("-" for an id no class has);
- `dnnParams.xml`, `<name>_MemoryReport.json` and `<name>.pbtxt`: the converter's own reports;
- `intrinsics.json`: picamera2's network intrinsics (a classification task and its labels);
- `classify.py`: a script for the Raspberry Pi that prints the top classes of each frame;
- `converter.log`: everything the converter printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tl_helpers.atomic import remove, replace_directory, temporary_sibling, write_bytes, write_json
from tl_helpers.config import Config
from tl_helpers.errors import TLError
from tl_helpers.pi_classify import UNUSED_LABEL

if TYPE_CHECKING:  # a type only: importing quantize would load TensorFlow
    from tl_helpers.quantize import QuantizedModel

IMX500_DIR = "imx500"
PACKER_FILE = "packerOut.zip"
LABELS_TXT = "labels.txt"
INTRINSICS_FILE = "intrinsics.json"
PI_SCRIPT = "classify.py"  # tl_helpers/pi_classify.py, for the Raspberry Pi
LOG_FILE = "converter.log"
FAILED_LOG_FILE = "imx500-failed-converter.log"  # in output_dir, when a conversion fails
CONVERSION_KEY = "imx500_conversion"  # the results.json section

CONVERTER_COMMAND = "imxconv-tf"
CONVERTER_VENV = ".venv-imx500"  # made by `make venv`, beside the project's .venv
CONVERTER_ENV_VAR = "IMX500_CONVERTER"  # path of imxconv-tf, to use another installation
MIN_JAVA = 17
PROJECT_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = f"run `make venv` in {PROJECT_ROOT} (it creates {CONVERTER_VENV})"
JAVA_HINT = (
    "install Java 17 or newer, e.g. `sudo apt-get install openjdk-17-jre-headless` "
    "(Debian/Ubuntu) or `brew install openjdk@17` (macOS), and put `java` on the PATH"
)

# Start-up lines of TensorFlow inside the converter that say nothing about the conversion
# (no GPU on this machine, CPU instructions, the oneDNN note); everything else is shown.
_NOISE = re.compile(
    r"cuda|cuDNN|cuFFT|cuBLAS|TensorRT|oneDNN|cpu_feature_guard|rebuild TensorFlow with|"
    r"Picked up JAVA_TOOL_OPTIONS|^\s*$|^\s+at [\w.$]+\(|^Exception in thread"
)
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMG]?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


@dataclass(frozen=True)
class MemoryReport:
    """The converter's memory report: what the network takes of the IMX500's memory."""

    name: str
    runtime_bytes: int
    model_bytes: int
    reserved_bytes: int
    usage_bytes: int
    available_bytes: int
    utilization_percent: float
    fits: bool
    input_persistent: bool

    def as_dict(self) -> dict[str, object]:
        """For results.json."""
        return asdict(self)


@dataclass
class Conversion:
    """What the conversion step did: ran or not (and why), its files and figures."""

    ran: bool
    reason: str | None = None  # why it did not run
    directory: Path | None = None
    converter_version: str | None = None
    seconds: float | None = None
    memory: MemoryReport | None = None
    files: dict[str, str] = field(default_factory=dict)
    input_persistency: bool = True


# --------------------------------------------------------------------------- finding the tools


def find_converter() -> Path | None:
    """The `imxconv-tf` to run: $IMX500_CONVERTER, else the project's .venv-imx500, else PATH."""
    override = os.environ.get(CONVERTER_ENV_VAR)
    if override:
        return Path(override)
    candidates = [PROJECT_ROOT / CONVERTER_VENV / "bin" / CONVERTER_COMMAND]
    on_path = shutil.which(CONVERTER_COMMAND)
    if on_path:
        candidates.append(Path(on_path))
    return next((path for path in candidates if _is_executable(path)), None)


def java_version(java: str | None = None) -> int | None:
    """The major version of the `java` on the PATH (17 for "17.0.15"), None if there is none."""
    java = java or shutil.which("java")
    if not java:
        return None
    try:
        shown = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', shown.stderr + shown.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major  # "1.8" is Java 8


def missing_tools() -> str | None:
    """One line saying what the converter needs and lacks, with the fix; None when all is there."""
    converter = find_converter()
    if converter is None or not _is_executable(converter):
        where = f"{converter} is not an executable file" if converter else "it is not installed"
        return f"The IMX500 converter ({CONVERTER_COMMAND}) cannot run: {where}; {INSTALL_HINT}."
    version = java_version()
    if version is None:
        return f"The IMX500 converter needs Java {MIN_JAVA}+, and no `java` was found: {JAVA_HINT}."
    if version < MIN_JAVA:
        return (
            f"The IMX500 converter needs Java {MIN_JAVA}+, and `java` is Java {version}: "
            f"{JAVA_HINT}."
        )
    return None


def converter_version(converter: Path) -> str:
    """The converter's version ("3.19.2"), as its own `--version` prints it."""
    shown = subprocess.run(
        [str(converter), "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    match = re.search(r"\d+\.\d+(?:\.\d+)?", shown.stdout + shown.stderr)
    return match.group(0) if match else "unknown"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------- the files


def labels_text(labels: dict[str, int]) -> str:
    """labels.txt: line i holds the class whose id is i; an id no class has is "-"
    (picamera2's mark for an undefined label)."""
    names = {class_id: name for name, class_id in labels.items()}
    lines = [names.get(i, UNUSED_LABEL) for i in range(max(labels.values()) + 1)]
    return "\n".join(lines) + "\n"


def intrinsics(labels: dict[str, int]) -> dict[str, object]:
    """The network's description in picamera2's NetworkIntrinsics JSON schema.

    A classification task; the labels in class-id order, "-" ids ignored. No `cpu.softmax`
    (the network ends in softmax) and no `input_aspect_ratio` (the camera scales the whole
    frame to the square input, as the model was trained on whole photos resized).
    """
    return {
        "task": "classification",
        "classes": {"labels": labels_text(labels).splitlines(), "ignore_undefined": True},
    }


def parse_size(text: str) -> int:
    """Bytes of a size as the memory report writes it ("86.00KB", "1.67MB", "512B")."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_memory_report(path: str | Path) -> MemoryReport:
    """Parse the converter's `<name>_MemoryReport.json`."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))["Memory Report"]
        return MemoryReport(
            name=str(report["Name"]),
            runtime_bytes=parse_size(report["Runtime Memory Physical Size"]),
            model_bytes=parse_size(report["Model Memory Physical Size"]),
            reserved_bytes=parse_size(report.get("Reserved Memory", "0B")),
            usage_bytes=parse_size(report["Memory Usage"]),
            available_bytes=parse_size(report["Total Memory Available On Chip"]),
            utilization_percent=float(str(report["Memory Utilization"]).rstrip("%")),
            fits=bool(report["Fit In Chip"]),
            input_persistent=bool(report.get("Input Persistent", True)),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TLError(
            f"Cannot read the IMX500 converter's memory report {path} ({err}); see "
            f"{LOG_FILE} beside it."
        ) from err


def format_memory_report(memory: MemoryReport) -> str:
    """The memory report as one table."""
    rows = [
        ("model (weights)", _mb(memory.model_bytes)),
        ("runtime (activations)", _mb(memory.runtime_bytes)),
        ("reserved", _mb(memory.reserved_bytes)),
        ("total", f"{_mb(memory.usage_bytes)} of {_mb(memory.available_bytes)} on the chip"),
        ("utilisation", f"{memory.utilization_percent:g} %"),
        ("input kept on the chip", "yes" if memory.input_persistent else "no"),
        ("fits in the chip", "yes" if memory.fits else "NO"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"IMX500 memory ({memory.name})"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 1024**2:.2f} MB"


# --------------------------------------------------------------------------- running it


def show(line: str) -> None:
    """Print a line at once (the converter's progress, as it comes)."""
    print(line, flush=True)


def run_converter(
    converter: Path,
    keras_file: Path,
    output_dir: Path,
    *,
    input_persistency: bool = True,
    echo: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Run `imxconv-tf` on `keras_file` into `output_dir`, echoing its progress line by line.

    Returns the exit status and every line it printed. Its temporary files go to a folder
    inside `output_dir`'s parent that is removed afterwards; Ctrl-C (the notebook's interrupt)
    stops the converter and its Java back end before the interrupt goes on.
    """
    echo = echo or show
    scratch = temporary_sibling(output_dir.parent / "imxconv-scratch")
    command = [str(converter), "-i", str(keras_file), "-o", str(output_dir), "--overwrite-output"]
    if not input_persistency:
        command.append("--no-input-persistency")
    env = {
        **os.environ,
        "TMPDIR": str(scratch),
        "JAVA_TOOL_OPTIONS": f"-Djava.io.tmpdir={scratch} -XX:-UsePerfData",
        "TF_CPP_MIN_LOG_LEVEL": "1",
        "PYTHONUNBUFFERED": "1",
    }
    lines: list[str] = []
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,  # its own process group: an interrupt stops all of it
        )
        try:
            for line in _lines(process.stdout):
                lines.append(line)
                if not _NOISE.search(line):
                    echo(_short(line))
            return process.wait(), lines
        except BaseException:
            _stop(process)
            raise
    finally:
        remove(scratch)


def _lines(stream: Iterable[str] | None) -> Iterable[str]:
    for line in stream or ():
        yield line.rstrip("\n")


def _short(line: str) -> str:
    """A converter log line without its Python source location."""
    return re.sub(r"\s*\[/[^\]]*\.py:\d+\]\s*$", "", line)


def _stop(process: subprocess.Popen) -> None:
    """Stop the converter and everything it started (the Java back end)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def converter_error(lines: list[str]) -> str:
    """The converter's own error lines (or its last lines), for the message."""
    errors = [_short(line).strip() for line in lines if re.search(r"\bERROR\b", line)]
    return "\n".join(errors or [_short(line).strip() for line in lines[-5:]])


# --------------------------------------------------------------------------- the notebook step


def convert(
    keras_file: str | Path,
    output_dir: str | Path,
    labels: dict[str, int],
    *,
    input_persistency: bool = True,
    converter: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> Conversion:
    """Convert `keras_file` and write output_dir/imx500/ atomically; return what was done.

    Raises TLError when the converter fails (its own message quoted) or when the network does
    not fit in the IMX500's memory (the figures and what to change); the previous
    output_dir/imx500/ is then left as it was.
    """
    echo = echo or show
    converter = converter or find_converter()
    if converter is None:
        raise TLError(
            f"The IMX500 converter ({CONVERTER_COMMAND}) is not installed: {INSTALL_HINT}."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / IMX500_DIR
    version = converter_version(converter)
    tmp = temporary_sibling(final)
    try:
        echo(f"Converting {keras_file} with {CONVERTER_COMMAND} {version} ({converter})")
        start = time.perf_counter()
        status, lines = run_converter(
            converter, Path(keras_file), tmp, input_persistency=input_persistency, echo=echo
        )
        seconds = time.perf_counter() - start
        memory = checked_outcome(tmp, status, lines, Path(keras_file), input_persistency)
        add_camera_files(tmp, labels)
        names = sorted(path.name for path in tmp.iterdir())
        _readable(tmp)
        replace_directory(tmp, final)
    except BaseException:
        remove(tmp)
        raise
    return Conversion(
        ran=True,
        directory=final,
        converter_version=version,
        seconds=seconds,
        memory=memory,
        files={name: str(final / name) for name in names},
        input_persistency=input_persistency,
    )


def checked_outcome(
    folder: Path, status: int, lines: list[str], keras_file: Path, input_persistency: bool
) -> MemoryReport:
    """The memory report of a successful conversion into `folder`; TLError otherwise.

    The converter's log goes into `folder`, and beside it (FAILED_LOG_FILE) when it failed.
    A network too large for the chip makes the converter fail after writing its memory report:
    that failure is reported with the report's figures.
    """
    log = "\n".join(lines) + "\n"
    (folder / LOG_FILE).write_text(log, encoding="utf-8")
    reports = sorted(folder.glob("*_MemoryReport.json"))
    memory = read_memory_report(reports[0]) if reports else None
    packed = (folder / PACKER_FILE).is_file()
    if memory is not None and memory.fits and status == 0 and packed:
        return memory
    failed_log = folder.parent / FAILED_LOG_FILE
    write_bytes(failed_log, log.encode("utf-8"))
    if memory is not None and not memory.fits:
        raise TLError(not_fitting_message(memory, input_persistency))
    outcome = f"exit status {status}" if status else f"no {PACKER_FILE} was written"
    if not status and packed:
        outcome = "no memory report was written"
    raise TLError(
        f"The IMX500 converter failed ({outcome}) on {keras_file}:\n"
        f"{converter_error(lines)}\n(all it printed: {failed_log})"
    )


def add_camera_files(folder: Path, labels: dict[str, int]) -> None:
    """labels.txt, intrinsics.json and the Raspberry Pi script, beside packerOut.zip."""
    (folder / LABELS_TXT).write_text(labels_text(labels), encoding="utf-8")
    write_json(folder / INTRINSICS_FILE, intrinsics(labels))
    shutil.copyfile(Path(__file__).with_name("pi_classify.py"), folder / PI_SCRIPT)


def not_fitting_message(memory: MemoryReport, input_persistency: bool) -> str:
    """Why the network cannot run on the IMX500, with the figures and what to change."""
    changes = [
        'a smaller "mobilenet_alpha" (0.35 is the smallest) or a smaller base model',
        'a smaller "input_tensor_size" (the activations grow with its square)',
    ]
    if input_persistency:
        changes.append('"imx500_input_persistency": false (frees the input image\'s memory)')
    return (
        f"The network does not fit in the IMX500: it needs {_mb(memory.usage_bytes)} of the "
        f"{_mb(memory.available_bytes)} on the chip ({memory.utilization_percent:g} %: weights "
        f"{_mb(memory.model_bytes)}, activations {_mb(memory.runtime_bytes)}). Try "
        + "; ".join(changes)
        + ". output_dir/imx500 was left as it was."
    )


def _readable(folder: Path) -> None:
    """Give the folder and its files the usual permissions (temporary ones are private)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def convert_for_imx500(
    quantized: QuantizedModel | None, labels: dict[str, int], config: Config
) -> Conversion:
    """The notebook's conversion step: convert quantized_model.keras, or say why it does not run.

    A missing converter or Java is one line with the command that fixes it, and the run goes
    on (results.json records that the conversion did not run); a failing conversion stops.
    """
    reason = None
    if not config.chief:
        reason = "the chief worker converts"
    elif quantized is None:
        reason = 'quantization is off ("quantize": false)'
    elif not config.convert_for_imx500:
        reason = 'conversion is off ("convert_for_imx500": false)'
    else:
        reason = missing_tools()
    if reason is not None:
        print(
            reason if reason.startswith("The IMX500") else f"IMX500 conversion skipped: {reason}."
        )
        return Conversion(ran=False, reason=reason)
    conversion = convert(
        quantized.keras_file,
        config.output_dir,
        labels,
        input_persistency=config.imx500_input_persistency,
    )
    print(format_memory_report(conversion.memory))
    print(f"Converted in {conversion.seconds:.1f} s: {conversion.directory}")
    for name in (PACKER_FILE, LABELS_TXT):
        print(f"  {conversion.files[name]}")
    return conversion


def add_conversion_results(results: dict, conversion: Conversion) -> dict:
    """Return `results` with the conversion recorded under "imx500_conversion"."""
    if not conversion.ran:
        record: dict[str, object] = {"ran": False, "reason": conversion.reason}
    else:
        record = {
            "ran": True,
            "converter": f"imx500-converter {conversion.converter_version}",
            "input_persistency": conversion.input_persistency,
            "seconds": round(conversion.seconds or 0.0, 1),
            "memory": conversion.memory.as_dict() if conversion.memory else None,
            "fits_in_chip": conversion.memory.fits if conversion.memory else None,
            "directory": str(conversion.directory),
            "files": conversion.files,
        }
    return {**results, CONVERSION_KEY: record}


if __name__ == "__main__":  # python -m tl_helpers.convert: is the converter ready?
    problem = missing_tools()
    print(
        problem or f"{CONVERTER_COMMAND} {converter_version(find_converter())} and Java are ready."
    )
    sys.exit(1 if problem else 0)
